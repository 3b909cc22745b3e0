"""The OpenAI-compatible HTTP port (``--openai-port``): ``POST /v1/completions`` and
``GET /v1/models`` for scoring, served by aiohttp in the server's event loop.

Thin like the gRPC servicer: JSON becomes pairscore's plain types
(:mod:`pairscore_server.openai_protocol`), the same
:class:`~pairscore_server.service.ScoringService` scores them (limits,
admission, batching and pair metrics shared with the gRPC port), and
failures map through the one table, :data:`pairscore_server.errors.FAILURES`,
to HTTP statuses: 400 invalid, 401 without a valid bearer token (the gRPC
port's tokens), 404 unknown path or model, 413 body over
``--max-message-bytes``, 429 with ``Retry-After`` for a full queue, 503
while the model loads or the server drains, 504 past a deadline, 500 for a
bug. Every error has an OpenAI-style body ``{"error": {"message", "type",
"param", "code"}}``. docs/openai.md describes it for users.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pairscore_server.answer_bound import AnswerBound
from pairscore_server.auth import TokenSet, bearer_token
from pairscore_server.errors import QueueFullError, failure_for
from pairscore_server.metrics import REFUSED_BODY_TIMEOUT
from pairscore_server.openai_json import (
    ANSWER_BYTES,
    answer_bytes_bound,
    decode_body,
    encode_answer,
    inflate_body,
)
from pairscore_server.openai_listener import (
    CappedSite,
    ConnectionCap,
    listen_sockets,
)
from pairscore_server.openai_protocol import (
    GRPC_TO_HTTP,
    OpenAIError,
    check_outcomes,
    completion_response,
    first_token_ids,
    models_response,
    parse_completion_request,
    parse_prompts,
    to_pairs,
)
from pairscore_server.response_size import error_result_bytes

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics
    from pairscore_server.service import ScoringService

log = logging.getLogger(__name__)

#: ``method`` label of pairscore_requests_total / _duration_seconds for the HTTP routes.
METHOD_COMPLETIONS = "OpenAICompletions"
METHOD_MODELS = "OpenAIModels"
_ROUTES = {"/v1/completions": METHOD_COMPLETIONS, "/v1/models": METHOD_MODELS}

#: ``reason`` of pairscore_rejected_pairs_total for prompts of a body that is not valid
#: (the same reason the gRPC servicer counts for a message it cannot convert).
REJECT_INVALID = "invalid_request"

_HTTP_TO_GRPC = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Default seconds a connection has to send a complete request head, from its opening or
#: from the end of its previous answer (also the idle keep-alive timeout).
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Default seconds a request has to send its whole body once its head has arrived.
DEFAULT_BODY_TIMEOUT_S = 60.0
#: Most seconds the port keeps reading (and dropping) the rest of a body it answered
#: without reading (413, 408), so that the client reads the answer rather than a reset.
_LINGER_S = 2.0
#: Bodies up to this size are decoded on the event loop; larger ones on a thread.
_INLINE_BODY_BYTES = 256 * 1024


def _decode(raw: bytes, encoding: str, limit: int) -> Any:
    """A body's JSON value: decompressed within ``limit``, then depth-checked and decoded."""
    return decode_body(inflate_body(raw, encoding, limit=limit))


def ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server TLS context from the gRPC port's PEM files (client certificates required
    with ``client_ca``); ValueError naming the file when one cannot be used."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the TLS files for the OpenAI port ({cert}, {key}): {exc}") from exc
    return context


def error_response(error: OpenAIError) -> web.Response:
    """The JSON error answer, with ``Retry-After`` (whole seconds) when there is a hint."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(error.body(), status=error.status, headers=headers)


def _from_exception(exc: Exception) -> OpenAIError:
    """The service's exception as an HTTP error, through errors.FAILURES."""
    failure = failure_for(exc)
    if failure is None:
        log.error("unexpected error in an OpenAI-port handler", exc_info=exc)
        return OpenAIError(500, f"internal server error ({type(exc).__name__})", code="internal")
    status = GRPC_TO_HTTP.get(failure.status, 500)
    retry = exc.retry_after_s if isinstance(exc, QueueFullError) else None
    return OpenAIError(status, failure.message(exc), code=failure.status.lower(), retry_after_s=retry)


class OpenAIEndpoint:
    """The HTTP port: an aiohttp application in the running event loop.

    It answers 503 until :meth:`set_service` hands it the ready service (as
    the gRPC servicer does). ``tokens``: bearer tokens required on every
    route (None: no auth). ``max_body_bytes``: larger bodies get 413, after
    decompression (``Content-Encoding: gzip`` or ``deflate``; others get 415) too.
    ``header_timeout_s``: a connection that has not sent a complete request
    head this long after opening, or after its previous answer, is closed.
    ``body_timeout_s``: a body not received this long after its head gets
    408. ``max_connections``: open connections held at once; more are
    answered 503 before their request is read (None: no cap).
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        tokens: TokenSet | None = None,
        max_body_bytes: int = 64 * 1024 * 1024,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        self._metrics = metrics
        self._tokens = tokens
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self.connections = ConnectionCap(
            max_connections,
            header_timeout_s=header_timeout_s,
            on_refused=metrics.observe_http_refusal if metrics is not None else None,
        )
        self._service: ScoringService | None = None
        self._created = int(time.time())
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._aborted = asyncio.Event()
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._middleware])
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        self.port: int | None = None

    def set_service(self, service: ScoringService) -> None:
        """Start answering with ``service``."""
        self._service = service

    # --- running ---------------------------------------------------------------------

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0: a free port) as gRPC does (``[::]``: IPv6 and IPv4,
        openai_listener.py); returns the bound port."""
        # handler_cancellation: a client that disconnects cancels its handler, and so
        # its queued pairs (counted as cancelled), as a cancelled gRPC call does.
        # keepalive_timeout: aiohttp closes a connection that has no complete request
        # head this long after it opened or after its last answer: the header timeout.
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.0,
            keepalive_timeout=self._header_timeout_s,
            lingering_time=min(_LINGER_S, self._body_timeout_s),
            # bodies are decompressed by the handler, to at most the body limit (inflate_body);
            # aiohttp's own decompression held 4x the limit at its peak (docs/reliability.md)
            auto_decompress=False,
        )
        await runner.setup()
        sites: list[web.BaseSite] = []
        socks = []
        try:
            socks = listen_sockets(host, port)
            for sock in socks:
                site = CappedSite(
                    runner,
                    sock,
                    self.connections,
                    ssl_context=ssl_context,
                    handshake_timeout_s=self._header_timeout_s,
                )
                sites.append(site)
                await site.start()
        except OSError:
            for sock in socks:
                sock.close()
            await runner.cleanup()
            raise
        self._runner, self._sites = runner, sites
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop taking connections, give running requests ``grace`` seconds, then close.

        Requests that arrive on open connections meanwhile get 503.
        """
        if self._runner is None:
            return
        self._draining = True
        for site in self._sites:
            await site.stop()
        if self._in_flight and not self._aborted.is_set():
            waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._aborted.wait())]
            await asyncio.wait(waits, timeout=max(0.0, grace), return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self._in_flight:
                log.warning(
                    "OpenAI port: %d request(s) still running at the end of the grace; cancelled",
                    self._in_flight,
                )
        runner, self._runner, self._sites = self._runner, None, []
        await runner.cleanup()

    def abort(self) -> None:
        """Cut short a :meth:`stop` in progress: running requests are cancelled now."""
        self._aborted.set()

    # --- request handling --------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Auth, draining, the in-flight count, metrics, and every error as JSON."""
        method = _ROUTES.get(request.path)
        started = time.perf_counter()
        status = 500
        self._in_flight += 1
        self._idle.clear()
        self.connections.request_started(request.transport)
        try:
            response = await self._guarded(request, handler)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (or the server stopped)
            raise
        finally:
            self.connections.request_ended(request.transport)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if method is not None and self._metrics is not None:
                self._metrics.observe_request(
                    method=method,
                    code=_HTTP_TO_GRPC.get(status, "UNKNOWN"),
                    seconds=time.perf_counter() - started,
                )

    async def _guarded(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            if self._tokens is not None:
                token = bearer_token([("authorization", request.headers.get("Authorization", ""))])
                if token is None or not self._tokens.accepts(token):
                    # checked before routing: a caller without a token learns nothing of the paths
                    raise OpenAIError(
                        401,
                        "missing or invalid bearer token: send the header 'Authorization: Bearer <token>' "
                        "(the OpenAI client's api_key)",
                        code="invalid_api_key",
                    )
            if self._draining:
                raise OpenAIError(
                    503, "the server is shutting down; retry on another replica", code="unavailable"
                )
            return await handler(request)
        except OpenAIError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            # aiohttp's own answers (404, 405, 413) with an OpenAI-style body
            message = exc.text or exc.reason
            if exc.status == 404:
                message = (
                    f"no such path {request.path}: this port serves POST /v1/completions and GET /v1/models"
                )
            elif exc.status == 413:
                message = f"the request body is over this server's {request.client_max_size}-byte limit (--max-message-bytes); send fewer prompts per request"
            return error_response(OpenAIError(exc.status, message, code=exc.reason.lower().replace(" ", "_")))

    def _require_service(self) -> ScoringService:
        if self._service is None:
            raise OpenAIError(503, "the model is still loading; retry later", code="unavailable")
        return self._service

    async def _models(self, request: web.Request) -> web.Response:
        info = self._require_service().model_info()
        return web.json_response(models_response(info, created=self._created))

    async def _completions(self, request: web.Request) -> web.Response:
        service = self._require_service()
        info = service.model_info()
        try:
            raw = await asyncio.wait_for(request.read(), self._body_timeout_s)
        except asyncio.TimeoutError as exc:
            self.connections.refuse(REFUSED_BODY_TIMEOUT)
            raise OpenAIError(
                408,
                f"the request body did not arrive within {self._body_timeout_s:g} s of its head "
                "(--openai-body-timeout); send it at once",
                param="body",
                code="request_timeout",
            ) from exc
        encoding = request.headers.get("Content-Encoding", "")
        if len(raw) <= _INLINE_BODY_BYTES and not encoding:
            body = decode_body(raw)
        else:  # large (or compressed) bodies are decoded off the event loop, which keeps serving
            body = await asyncio.get_running_loop().run_in_executor(
                None, _decode, raw, encoding, request.client_max_size
            )
        try:
            parsed = parse_completion_request(body, max_top_k=info.max_top_k)
            if parsed.model is not None and parsed.model != info.model_name:
                raise OpenAIError(
                    404,
                    f"the model {parsed.model!r} does not exist here; this server serves {info.model_name!r} "
                    "(GET /v1/models)",
                    param="model",
                    code="model_not_found",
                )
        except OpenAIError:
            self._count_invalid(body)
            raise
        pairs, options = to_pairs(parsed)
        limit = service.limits.max_response_bytes
        answer_size = AnswerBound(
            scored=answer_bytes_bound(parsed, max_token_text_bytes=info.max_token_text_bytes),
            refused=error_result_bytes,
            extra_bytes=ANSWER_BYTES + len(info.model_name.encode()),
            less_detail="ask for less per-token detail",
        )
        try:
            outcomes = await service.score(pairs, options, answer=answer_size)
            check_outcomes(outcomes)
            # an echo of ids shows each prompt's first id, which was context only: its text
            # comes from the tokenizer (the scoring above checked that it is in the vocabulary)
            first = first_token_ids(parsed)
            texts = dict(zip(first, service.token_texts(first), strict=True)) if first else {}
        except OpenAIError:
            raise
        except Exception as exc:
            raise _from_exception(exc) from exc
        answer = completion_response(parsed, outcomes, model=info.model_name, first_texts=texts)
        return web.Response(
            body=encode_answer(answer, limit=limit), content_type="application/json", charset="utf-8"
        )

    def _count_invalid(self, body: Any) -> None:
        """Count the prompts of a refused body as rejected, when there are any to count."""
        if self._metrics is None or not isinstance(body, dict):
            return
        try:
            n = len(parse_prompts(body.get("prompt")))
        except OpenAIError:
            return
        self._metrics.rejected_pairs.labels(reason=REJECT_INVALID).inc(n)
