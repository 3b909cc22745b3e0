"""The server's lifecycle: ports, health, reflection, metrics, model loading, shutdown.

:class:`RunningServer` is the whole server inside the current event loop
(tests use it with port 0). :mod:`pairscore_server.main` runs one as a
process (signals, logging, exit status); :mod:`pairscore_server.wiring`
builds what serves a loaded engine; :mod:`pairscore_server.watchdog` keeps
health in step with the model worker.

Start-up order: the gRPC port opens first with health ``NOT_SERVING`` (so
orchestrators can probe it while the model loads), then the model is loaded
and warmed up on the model thread, then health turns ``SERVING``. If the
model cannot be loaded (bad path, corrupt file, unknown architecture, out of
memory) or warmed up, ``pairscore serve`` logs one ``cannot load the model:``
line and exits 1.

While serving, a watchdog turns health ``NOT_SERVING`` when the batching
loop has died or one forward pass has run longer than
``forward_timeout_s``; in the latter case the callers waiting on the stuck
worker get ``UNAVAILABLE`` instead of hanging, and health turns ``SERVING``
again if the worker ever answers.

On :meth:`RunningServer.stop` health turns ``NOT_SERVING`` (open health
Watch streams get that and end), the server stops taking RPCs and running
RPCs get ``grace_period_s`` to finish (then they are cancelled).

With ``--openai-port`` an OpenAI-compatible HTTP port
(:mod:`pairscore_server.openai_http`) opens after the gRPC port, answers 503
until the model is ready, shares the service, tokens, TLS files and limits,
and drains within the same grace as the gRPC port on stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import pairscore
from pairscore_server.auth import BearerTokenInterceptor, TokenSet
from pairscore_server.batcher import Batcher
from pairscore_server.config import ServerConfig
from pairscore_server.engine.interface import Engine
from pairscore_server.engine.memory import is_out_of_memory
from pairscore_server.engine.spec import ModelLoadError, ModelSpec
from pairscore_server.health import HealthService
from pairscore_server.limits import Limits
from pairscore_server.metrics import Metrics
from pairscore_server.servicer import SERVICE_NAME, ScoringServicer, add_to_server
from pairscore_server.tls import server_credentials
from pairscore_server.watchdog import watch_worker
from pairscore_server.wiring import wire

if TYPE_CHECKING:
    from pairscore_server.openai_http import OpenAIEndpoint

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Services whose health is reported: the whole server ("") and ScoringService.
HEALTH_SERVICES = ("", SERVICE_NAME)

#: Of the grace period, the part kept for after the RPCs have ended (the batcher's
#: drain, closing the ports): at most this, and at most a fifth of the grace.
_SHUTDOWN_RESERVE_S = 1.0


class StartupError(RuntimeError):
    """The server cannot start: a TLS file or the auth token set is unusable."""


def load_default_engine(spec: ModelSpec) -> Engine:
    """Load the engine ``spec`` describes (imports torch and transformers on first use)."""
    from pairscore_server.engine.loading import load_engine

    return load_engine(spec)


def _load_failure(what: str, exc: BaseException) -> ModelLoadError:
    """A ModelLoadError with a one-line reason for an unexpected loading/warm-up failure."""
    if isinstance(exc, ModelLoadError):
        return exc
    text = str(exc).replace("\n", " ")[:500]
    if is_out_of_memory(exc):
        return ModelLoadError(f"out of memory during {what}: {type(exc).__name__}: {text}")
    return ModelLoadError(f"{what} failed: {type(exc).__name__}: {text}")


class RunningServer:
    """One pairscore server in the running event loop.

    ``await start()`` opens the ports and begins loading the model in the
    background; ``await wait_ready()`` waits until it serves (and raises if
    loading failed); ``await stop()`` shuts down gracefully. As an async
    context manager it does start + wait_ready on entry and stop on exit.
    Pass ``engine`` to serve an engine built elsewhere (then
    ``config.model`` is ignored), or ``engine_loader`` to replace how the
    engine is built from ``config.model``.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: Engine | None = None,
        engine_loader: Callable[[ModelSpec], Engine] = load_default_engine,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.health = HealthService(HEALTH_SERVICES)
        self._engine = engine
        self._engine_loader = engine_loader
        self._servicer = ScoringServicer(
            metrics=self.metrics, stream_max_in_flight=config.stream_max_in_flight
        )
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="pairscore-model")
        # one thread more than --prepare-workers: small requests never wait behind a large
        # request's chunk (preparing.py)
        self._prepare_executor = ThreadPoolExecutor(
            config.prepare_workers + 1, thread_name_prefix="pairscore-prepare"
        )
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._openai: OpenAIEndpoint | None = None
        self._tokens: TokenSet | None = None
        self._batcher: Batcher | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._serving = False
        self._stopped = False
        self._aborted = False
        self.limits: Limits | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.openai_port: int | None = None

    # --- lifecycle -------------------------------------------------------------------

    def _grpc_options(self) -> list[tuple[str, Any]]:
        cfg = self.config
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if cfg.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", round(cfg.max_connection_age_s * 1000)))
        if cfg.max_connection_age_grace_s is not None:
            options.append(("grpc.max_connection_age_grace_ms", round(cfg.max_connection_age_grace_s * 1000)))
        return options

    def _security(self) -> tuple[list[grpc.aio.ServerInterceptor], grpc.ServerCredentials | None]:
        """The auth interceptor and TLS credentials the config asks for; StartupError if unusable."""
        cfg = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = []
        try:
            if cfg.auth_enabled:
                tokens = self._tokens = TokenSet(cfg.auth_tokens, file=cfg.auth_token_file)
                interceptors.append(BearerTokenInterceptor(tokens, metrics=self.metrics))
            creds = None
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        return interceptors, creds

    async def start(self) -> None:
        """Open the gRPC (and metrics) ports and start loading the model in the background."""
        if self._server is not None:
            raise RuntimeError("the server was already started")
        interceptors, creds = self._security()
        server = grpc.aio.server(
            options=self._grpc_options(),
            interceptors=interceptors,
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        add_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http_server(
                    port=self.config.metrics_port, host=self.config.metrics_host
                )
            except OSError as exc:
                raise OSError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc}"
                ) from exc
        try:
            if creds is not None:
                self.port = server.add_secure_port(self.config.address, creds)
            else:
                self.port = server.add_insecure_port(self.config.address)
        except RuntimeError as exc:
            self.metrics.stop_http_server()
            raise OSError(f"cannot listen on {self.config.address}: {exc}") from exc
        await server.start()
        self._server = server
        if self.config.health_port is not None:
            await self._start_health_server()
        if creds is None:
            transport = "plaintext"
        else:
            transport = "mutual TLS" if self.config.tls_client_ca else "TLS"
        log.info(
            "gRPC listening on %s:%d (%s%s)",
            self.config.host,
            self.port,
            transport,
            ", bearer-token auth" if interceptors else "",
        )
        if self.config.openai_port is not None:
            await self._start_openai()
        self._ready_task = asyncio.get_running_loop().create_task(
            self._become_ready(), name="pairscore-load-model"
        )

    async def _start_health_server(self) -> None:
        """The plaintext health-only port, for probes that cannot speak TLS."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=64)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.config.host}:{self.config.health_port}"
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for health checks on {address}: {exc}") from exc
        await server.start()
        self._health_server = server
        log.info("health checks (plaintext, health only) on %s:%d", self.config.host, self.health_port)

    async def _start_openai(self) -> None:
        """The OpenAI-compatible HTTP port: same host, tokens, TLS files and body limit."""
        from pairscore_server.openai_http import OpenAIEndpoint, ssl_context

        cfg = self.config
        assert cfg.openai_port is not None
        context = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            try:
                context = ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            except ValueError as exc:
                raise StartupError(str(exc)) from exc
        host = cfg.openai_host or cfg.host
        endpoint = OpenAIEndpoint(
            metrics=self.metrics,
            tokens=self._tokens,
            max_body_bytes=cfg.max_message_bytes,
            header_timeout_s=cfg.openai_header_timeout_s,
            body_timeout_s=cfg.openai_body_timeout_s,
            max_connections=cfg.max_concurrent_rpcs,
        )
        try:
            self.openai_port = await endpoint.start(host, cfg.openai_port, ssl_context=context)
        except OSError as exc:
            raise OSError(f"cannot listen for the OpenAI port on {host}:{cfg.openai_port}: {exc}") from exc
        self._openai = endpoint
        log.info(
            "OpenAI-compatible completions on %s://%s:%d/v1 (%s)",
            "https" if context is not None else "http",
            host,
            self.openai_port,
            "bearer-token auth" if self._tokens is not None else "no auth",
        )

    async def wait_ready(self) -> None:
        """Wait until the model is loaded and warmed up; raises what loading raised."""
        if self._ready_task is None:
            raise RuntimeError("start() was not called")
        await asyncio.shield(self._ready_task)

    @property
    def ready(self) -> bool:
        """Whether the model is loaded, warmed up and being served."""
        task = self._ready_task
        return task is not None and task.done() and not task.cancelled() and task.exception() is None

    @property
    def batcher(self) -> Batcher | None:
        """The batcher, once the model is loaded."""
        return self._batcher

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: health NOT_SERVING, refuse new RPCs, let running ones finish.

        The whole stop fits in ``grace`` seconds (default
        ``config.grace_period_s``, from which Kubernetes'
        terminationGracePeriodSeconds is sized): running RPCs get it less a
        reserve (a fifth, at most 1 s) and are cancelled after that; the
        batcher drains in what is left, and a forward pass still running then
        is abandoned (its thread cannot be interrupted). Then the ports and the
        metrics endpoint close. Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace is None else grace
        end = time.monotonic() + grace
        rpc_grace = grace - min(_SHUTDOWN_RESERVE_S, grace / 5)
        await self.health.enter_graceful_shutdown()
        self._serving = False
        self.metrics.serving.set(0)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()  # a load/warmup thread cannot be interrupted; drop it
        if self._server is not None:
            log.info("shutting down: finishing running requests (grace %.1f s)", grace)
            started = time.monotonic()
            if self._openai is not None:  # both ports drain side by side, within the same grace
                await asyncio.gather(self._server.stop(rpc_grace), self._openai.stop(rpc_grace))
            else:
                await self._server.stop(rpc_grace)
            if rpc_grace > 0 and time.monotonic() - started >= rpc_grace * 0.99:
                log.warning("the grace period of %.1f s ran out; running calls were cancelled", grace)
        if self._batcher is not None:
            drain = 0.0 if self._aborted else max(0.0, end - time.monotonic())
            await self._batcher.stop(timeout=drain)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self._model_executor.shutdown(wait=False, cancel_futures=True)
        self._prepare_executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.model_loaded.set(0)
        self.metrics.stop_http_server()
        if self._server is not None:
            log.info("server stopped")

    async def abort(self) -> None:
        """Cancel every running RPC at once (cuts short a stop() in progress: it waits for
        nothing more, not for the batcher's drain either)."""
        self._aborted = True
        if self._openai is not None:
            self._openai.abort()
        if self._server is not None:
            await self._server.stop(0)

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> RunningServer:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- health ----------------------------------------------------------------------

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self._stopped:
            return
        self._serving = serving
        status = _SERVING if serving else _NOT_SERVING
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)
        self.metrics.serving.set(1 if serving else 0)

    async def _become_ready(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self._engine
        if engine is None:
            log.info("loading model %s", self.config.model.model or "(embedded default)")
            try:
                engine = await loop.run_in_executor(
                    self._model_executor, self._engine_loader, self.config.model
                )
            except Exception as exc:
                log.debug("loading the model failed", exc_info=exc)
                raise _load_failure("loading the model", exc) from exc
            self._engine = engine
        log.info("warming up the model")
        try:
            await loop.run_in_executor(self._model_executor, engine.warmup)
        except Exception as exc:
            log.debug("warming up the model failed", exc_info=exc)
            raise _load_failure("the warm-up forward pass", exc) from exc
        serving = wire(
            engine,
            self.config,
            model_executor=self._model_executor,
            prepare_executor=self._prepare_executor,
            metrics=self.metrics,
        )
        self.limits, self._batcher = serving.limits, serving.batcher
        self._servicer.set_service(serving.service)
        if self._openai is not None:
            self._openai.set_service(serving.service)
        info = serving.info
        self.metrics.set_model(
            version=info.server_version or pairscore.__version__,
            model=info.model_name,
            dtype=info.dtype,
            device=info.device,
        )
        await self._set_serving(True)
        self._watchdog = loop.create_task(
            watch_worker(
                serving.batcher,
                forward_timeout_s=self.config.forward_timeout_s,
                set_serving=self._set_serving,
                stopped=lambda: self._stopped,
            ),
            name="pairscore-watchdog",
        )
