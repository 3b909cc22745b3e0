"""Prometheus metrics of one pairscore server.

Every :class:`Metrics` object owns its own ``CollectorRegistry``, so several
servers (for example in one test process) never share or clash on series.
All names carry the ``pairscore_`` prefix and use base units (seconds);
only counters end in ``_total``.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)

from pairscore.types import ItemError, PairScore

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: ``pairscore_pairs_total{outcome}`` label for a pair that was scored.
OUTCOME_OK = "ok"

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_PAIRS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_TOKENS_BUCKETS = tuple(2**i for i in range(4, 19))  # 16 .. 262144


class _MetricsHTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _MetricsHTTPServerV6(_MetricsHTTPServer):
    address_family = socket.AF_INET6


#: ``pairscore_http_refusals_total{reason}``: why the OpenAI HTTP port refused a
#: connection or request (openai_listener.py, openai_http.py).
REFUSED_CONNECTION_CAP = "connection_cap"
REFUSED_HEADER_TIMEOUT = "header_timeout"
REFUSED_BODY_TIMEOUT = "body_timeout"
REFUSAL_REASONS = (REFUSED_CONNECTION_CAP, REFUSED_HEADER_TIMEOUT, REFUSED_BODY_TIMEOUT)

#: The one path the metrics HTTP server answers on; every other path is 404.
METRICS_PATH = "/metrics"


def _only_metrics_path(app: WSGIApp) -> WSGIApp:
    """``app`` on :data:`METRICS_PATH` (with any query string), 404 Not Found elsewhere."""

    def serve(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return app(environ, start_response)
        body = b"Not Found: metrics are at /metrics\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return serve


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # one log line per scrape would drown the server's own log


class Metrics:
    """The server's metrics, registered in a registry of their own.

    Attributes are the ``prometheus_client`` objects; the helper methods
    below are what the server code calls.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pairscore_requests",
            "Finished RPCs by method and final gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "pairscore_request_duration_seconds",
            "Time from the start of an RPC to its end, in seconds.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pairs = Counter(
            "pairscore_pairs",
            "Pairs answered, by outcome: 'ok' or the item error code.",
            ["outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "pairscore_tokens",
            "Tokens of scored pairs, by side (prompt or response); prefix token excluded.",
            ["side"],
            registry=r,
        )
        self.batch_pairs = Histogram(
            "pairscore_batch_pairs",
            "Pairs per batch handed to the model.",
            buckets=_BATCH_PAIRS_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "pairscore_batch_tokens",
            "Padded tokens (rows x longest row, summed over forward passes) per batch handed to the model.",
            buckets=_BATCH_TOKENS_BUCKETS,
            registry=r,
        )
        self.replica_busy = Counter(
            "pairscore_replica_busy_seconds",
            "Seconds each model replica (one per GPU, --workers) spent in forward passes.",
            ["replica"],
            registry=r,
        )
        self.forward_tokens = Counter(
            "pairscore_forward_tokens",
            "Token positions run through the model, by kind: 'real' tokens, 'padded' positions "
            "(real + padding; padding efficiency = real / padded; packed rows have none), and "
            "'reused' tokens not run again because several pairs began with the same run of "
            "token ids (a shared prompt, few-shot exemplars, a system prompt) or were identical.",
            ["kind"],
            registry=r,
        )
        self.forward_duration = Histogram(
            "pairscore_forward_duration_seconds",
            "Time the model took to score one batch, in seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_pairs = Gauge(
            "pairscore_queue_pairs",
            "Pairs waiting in the batcher's queue.",
            registry=r,
        )
        self.queue_tokens = Gauge(
            "pairscore_queue_tokens",
            "Tokens of the pairs waiting in the batcher's queue (bounded by max_queue_tokens).",
            registry=r,
        )
        self.rejected_pairs = Counter(
            "pairscore_rejected_pairs",
            "Pairs refused at admission with RESOURCE_EXHAUSTED, by reason (queue_full).",
            ["reason"],
            registry=r,
        )
        self.dropped_pairs = Counter(
            "pairscore_dropped_pairs",
            "Admitted pairs dropped before they reached the model, by reason: cancelled, "
            "deadline, shutdown, worker_unavailable.",
            ["reason"],
            registry=r,
        )
        self.http_refusals = Counter(
            "pairscore_http_refusals",
            "Connections and requests the OpenAI HTTP port refused, by reason: connection_cap "
            "(a connection over --max-concurrent-rpcs, answered 503 before its request was "
            "read), header_timeout (a connection closed after --openai-header-timeout without "
            "a complete request head), body_timeout (a request answered 408: its body did not "
            "arrive within --openai-body-timeout).",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.http_refusals.labels(reason=reason)
        self.oom_splits = Counter(
            "pairscore_oom_splits",
            "Batches that ran out of memory and were split in two to be retried.",
            registry=r,
        )
        self.serving = Gauge(
            "pairscore_serving",
            "1 while health reports SERVING, else 0 (loading, draining, stuck or crashed worker).",
            registry=r,
        )
        self.model_loaded = Gauge(
            "pairscore_model_loaded",
            "1 once the model is loaded and warmed up, else 0.",
            registry=r,
        )
        self.build = Info(
            "pairscore_build",
            "Server version and the model it serves.",
            registry=r,
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # --- helpers the server calls --------------------------------------------

    def observe_request(self, *, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC: its method, final status name and duration."""
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method).observe(seconds)

    def observe_http_refusal(self, reason: str) -> None:
        """Count one refusal of the OpenAI HTTP port (openai_listener.REFUSAL_REASONS)."""
        self.http_refusals.labels(reason=reason).inc()

    def observe_outcomes(self, outcomes: Iterable[PairScore | ItemError]) -> None:
        """Count answered pairs by outcome and the tokens of the scored ones."""
        ok = prompt_tokens = response_tokens = 0
        errors: dict[str, int] = {}
        for outcome in outcomes:
            if isinstance(outcome, ItemError):
                errors[outcome.code.value] = errors.get(outcome.code.value, 0) + 1
            else:
                ok += 1
                prompt_tokens += outcome.prompt_tokens
                response_tokens += outcome.response_tokens
        if ok:
            self.pairs.labels(outcome=OUTCOME_OK).inc(ok)
            self.tokens.labels(side="prompt").inc(prompt_tokens)
            self.tokens.labels(side="response").inc(response_tokens)
        for code, n in errors.items():
            self.pairs.labels(outcome=code).inc(n)

    def observe_batch(
        self,
        *,
        pairs: int,
        padded_tokens: int,
        seconds: float,
        real_tokens: int | None = None,
        reused_tokens: int = 0,
        replica_seconds: tuple[float, ...] = (),
    ) -> None:
        """Record one batch handed to the model, its token accounting and how long it took."""
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(padded_tokens)
        self.forward_duration.observe(seconds)
        if real_tokens is not None:
            self.forward_tokens.labels(kind="real").inc(real_tokens)
            self.forward_tokens.labels(kind="padded").inc(padded_tokens)
            self.forward_tokens.labels(kind="reused").inc(reused_tokens)
        for replica, busy in enumerate(replica_seconds):
            self.replica_busy.labels(replica=str(replica)).inc(busy)

    def set_model(self, *, version: str, model: str, dtype: str, device: str) -> None:
        """Publish ``pairscore_build_info`` for the loaded model and mark it loaded."""
        self.build.info({"version": version, "model": model, "dtype": dtype, "device": device})
        self.model_loaded.set(1)

    # --- HTTP endpoint -------------------------------------------------------------

    def start_http_server(self, *, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` from this registry on ``host:port`` in a daemon thread.

        Only ``/metrics`` answers (404 elsewhere). ``host`` is an address, not
        a bracketed IPv6 literal (``"::"`` for every interface); the server
        passes its gRPC ``--host``. ``port=0`` binds a free ephemeral port.
        Returns the bound port.
        """
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        server_class = _MetricsHTTPServerV6 if ":" in host else _MetricsHTTPServer
        self._http = make_server(
            host,
            port,
            _only_metrics_path(make_wsgi_app(self.registry)),
            server_class,
            handler_class=_QuietHandler,
        )
        self._http_thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast stop_http_server() returns
            name="pairscore-metrics-http",
            daemon=True,
        )
        self._http_thread.start()
        bound = int(self._http.server_port)
        shown = f"[{host}]" if ":" in host else host  # IPv6 literals go in brackets in URLs
        log.info("metrics at http://%s:%d/metrics", shown, bound)
        return bound

    def stop_http_server(self) -> None:
        """Stop the ``/metrics`` HTTP server if it runs; safe to call twice."""
        http, self._http = self._http, None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
