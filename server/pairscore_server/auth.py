"""Optional bearer-token authentication for the gRPC port.

Callers send ``authorization: Bearer <token>`` metadata. Tokens come from
the environment (``PAIRSCORE_AUTH_TOKENS``) and/or a file (one per line,
``#`` comments), which is re-read when it changes so tokens can be rotated
without a restart. Presented tokens are compared in constant time against
every accepted token (SHA-256 digests, so neither the position of the first
differing byte nor the tokens' lengths leak through timing).

Health checks (``grpc.health.v1.Health``) stay open for probes; everything
else, server reflection and methods the server does not have included,
answers ``UNAUTHENTICATED`` without a valid token (so an unauthenticated
caller cannot tell which methods exist). A refused call's request bytes are
never parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)

#: Methods reachable without a token: health checks, for load balancers and probes.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = "bearer"
_UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_token_file(text: str) -> list[str]:
    """Tokens of a token file: one per line; blank lines and ``#`` comments are skipped."""
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    return tokens


class TokenSet:
    """The accepted bearer tokens: fixed ones plus those of a file re-read when it changes.

    Raises ValueError at construction when there is no token at all or the
    file cannot be read. Later, a file that cannot be read keeps the tokens
    last read (and logs why); a file that was emptied accepts none of its
    own tokens.
    """

    def __init__(
        self,
        tokens: Sequence[str] = (),
        *,
        file: str | None = None,
        recheck_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed = [_digest(t) for t in tokens]
        self._file = file
        self._recheck_s = recheck_s
        self._clock = clock
        self._file_digests: list[bytes] = []
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = clock()
        if file is not None:
            try:
                self._load_file()
            except OSError as exc:
                raise ValueError(f"cannot read the auth token file {file}: {exc}") from exc
        if not self._fixed and not self._file_digests:
            raise ValueError(
                "bearer-token auth is on but no token was given"
                + (f" (the token file {file} holds none)" if file else "")
            )

    def _load_file(self) -> None:
        assert self._file is not None
        stat = os.stat(self._file)
        with open(self._file, encoding="utf-8") as fh:
            tokens = parse_token_file(fh.read())
        self._file_digests = [_digest(t) for t in tokens]
        self._file_stamp = (stat.st_mtime_ns, stat.st_size)

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = self._clock()
        if now - self._checked_at < self._recheck_s:
            return
        self._checked_at = now
        try:
            stat = os.stat(self._file)
            if (stat.st_mtime_ns, stat.st_size) == self._file_stamp:
                return
            self._load_file()
            log.info("auth token file changed: %d token(s) accepted from it", len(self._file_digests))
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot re-read the auth token file (keeping the old tokens): %s", exc)

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted tokens (constant time in the token)."""
        self._maybe_reload()
        presented = _digest(token)
        ok = False
        for digest in (*self._fixed, *self._file_digests):
            ok |= hmac.compare_digest(digest, presented)
        return ok


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == _SCHEME and token.strip():
            return token.strip()
        return None
    return None


def _deny_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED unread.

    ``None`` (a method the server does not have) gets a streaming one: it
    answers before reading any message, whatever the caller's shape.
    """

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED_MESSAGE)

    async def deny_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    # No deserializer: an unauthenticated caller's bytes are never parsed.
    if handler is None or (handler.request_streaming and handler.response_streaming):
        return grpc.stream_stream_rpc_method_handler(deny_streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_streaming)
    return grpc.unary_unary_rpc_method_handler(deny_unary)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a valid bearer token (health checks always pass)."""

    def __init__(
        self,
        tokens: TokenSet,
        *,
        open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
        metrics: Metrics | None = None,
    ) -> None:
        self._tokens = tokens
        self._open = tuple(open_prefixes)
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._tokens.accepts(token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            # An unknown method answers like a known one: UNIMPLEMENTED would tell
            # a caller without a token which methods exist. Not counted in the
            # metrics: made-up method names would be unbounded label values.
            log.info("refused an unauthenticated call to an unknown method")
            return _deny_handler(None)
        log.info("refused an unauthenticated call to %s", method)
        if self._metrics is not None:
            self._metrics.observe_request(
                method=method.rsplit("/", 1)[-1], code="UNAUTHENTICATED", seconds=0.0
            )
        return _deny_handler(handler)
