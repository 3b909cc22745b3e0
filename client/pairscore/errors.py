"""Typed exceptions for failed RPCs, one per gRPC status code that a caller acts on.

Every exception is a :class:`ScoringError` carrying the gRPC ``code`` and the
server's ``message`` (the status details), so ``except ScoringError`` catches
them all and ``except OverloadedError`` catches just one kind::

    try:
        client.score(pairs)
    except pairscore.UnauthenticatedError as exc:
        sys.exit(f"check your token: {exc.message}")

A pair that the server could not score is *not* an exception: it comes back
as a :class:`~pairscore.types.ItemError` in its place.
"""

from __future__ import annotations

import re

import grpc

#: Status codes that a retry can cure: the server is restarting or overloaded.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class ScoringError(Exception):
    """An RPC to the pairscore server failed.

    ``code`` is the :class:`grpc.StatusCode` and ``message`` the server's
    explanation (the status details). Subclasses name the common codes.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether trying again later may succeed (UNAVAILABLE, RESOURCE_EXHAUSTED)."""
        return self.code in RETRYABLE_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ScoringError:
        """The typed exception for a grpc.RpcError (sync or asyncio); see :func:`error_from_rpc`."""
        return error_from_rpc(error)


class InvalidArgumentError(ScoringError):
    """INVALID_ARGUMENT: the request cannot be read or breaks a limit; do not retry as is."""


class OverloadedError(ScoringError):
    """RESOURCE_EXHAUSTED: the server (or a message size limit) refused the work for now."""


class UnavailableError(ScoringError):
    """UNAVAILABLE: no server answered, the model is still loading, or the server is stopping."""


class ConnectionFailedError(UnavailableError):
    """UNAVAILABLE because no connection could be made at all.

    ``cause`` says why in plain words (connection refused, no such host,
    TLS handshake failed...) and ``hint`` what to change (the target, the
    TLS settings); both are in the message too. Waiting rarely cures it, so
    :meth:`~pairscore.client.ScoringClient.score_iter` stops reconnecting
    after its ``timeout`` instead of the long ``stream_reconnect_timeout_s``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, cause: str = "", hint: str = "") -> None:
        super().__init__(code, message)
        self.cause = cause
        self.hint = hint


class MessageTooLargeError(OverloadedError):
    """RESOURCE_EXHAUSTED because a message was larger than a gRPC message size limit.

    Unlike overload this is deterministic: the same request fails the same
    way every time, so it is never retried (``retryable`` is False).
    """

    @property
    def retryable(self) -> bool:
        return False


class DeadlineExceededError(ScoringError):
    """DEADLINE_EXCEEDED: the call's deadline passed before the server answered."""


class UnauthenticatedError(ScoringError):
    """UNAUTHENTICATED: the server wants a (valid) bearer token."""


class PermissionDeniedError(ScoringError):
    """PERMISSION_DENIED: the token is valid but not allowed to make this call."""


class NotFoundError(ScoringError):
    """NOT_FOUND: e.g. a health check for a service the server does not know."""


class InternalError(ScoringError):
    """INTERNAL: the server failed while scoring (e.g. a forward pass raised)."""


class CallCancelledError(ScoringError):
    """CANCELLED: the call was cancelled before it finished."""


class UnimplementedError(ScoringError):
    """UNIMPLEMENTED: the server does not offer this RPC (an older or a different server)."""


_BY_CODE: dict[grpc.StatusCode, type[ScoringError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def error_for(code: grpc.StatusCode, message: str) -> ScoringError:
    """The typed exception for a status code (plain :class:`ScoringError` for the rest)."""
    return _BY_CODE.get(code, ScoringError)(code, message)


def error_from_rpc(error: grpc.RpcError, *, secure: bool | None = None) -> ScoringError:
    """Map a grpc.RpcError (sync or ``grpc.aio.AioRpcError``) to its typed exception.

    A failure to connect becomes a :class:`ConnectionFailedError` naming the
    cause and the fix (``secure``: whether the channel used TLS, for the
    hint); a message over gRPC's size limit a :class:`MessageTooLargeError`.
    """
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return classify(code, details or str(error), secure=secure)


def classify(code: grpc.StatusCode, message: str, *, secure: bool | None = None) -> ScoringError:
    """The typed exception for ``code`` and ``message``, recognising connection failures and
    messages over the size limit by gRPC's own texts."""
    if code == grpc.StatusCode.UNAVAILABLE:
        problem = connection_problem(message, secure=secure)
        if problem is not None:
            cause, hint = problem
            return ConnectionFailedError(
                code, f"cannot connect: {cause}; {hint} (gRPC said: {message})", cause=cause, hint=hint
            )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and is_message_too_large(message):
        return MessageTooLargeError(code, message_too_large_text(message))
    return error_for(code, message)


#: gRPC's texts for a message over the size limit (grpc core, either side).
_TOO_LARGE = ("received message larger than max", "sent message larger than max")


def is_message_too_large(message: str) -> bool:
    """Whether a RESOURCE_EXHAUSTED message is gRPC's "message larger than max" (deterministic)."""
    lowered = message.lower()
    return any(text in lowered for text in _TOO_LARGE)


def message_too_large_text(message: str) -> str:
    """Explain a message-size failure: which limit, and the three ways out."""
    sizes = re.search(r"\((\d+) vs\. (\d+)\)", message)
    lowered = message.lower()
    if "client:" in lowered:
        what = "the server's answer" if "received" in lowered else "the request"
        limit = "this client's message limit"
    else:
        what, limit = "a message", "a gRPC message limit"
    if sizes:
        what += f" ({int(sizes.group(1)):,} bytes)"
        limit += f" ({int(sizes.group(2)):,} bytes)"
    return (
        f"{what} is larger than {limit} (gRPC said: {message}). This is not overload, and resending "
        "cannot help: send fewer pairs per request (batch_size / --batch-size), leave out per-token "
        "detail (return_tokens=False / no --tokens), or raise the limit (max_message_bytes= / "
        "--max-message-bytes, and the server's --max-message-bytes)"
    )


def connection_problem(message: str, *, secure: bool | None = None) -> tuple[str, str] | None:
    """``(cause, hint)`` when an UNAVAILABLE message says no connection could be made, else None.

    It reads gRPC core's texts: "Connection refused", "errors resolving" /
    "DNS resolution failed", "Tls/Ssl handshake failed", and "Socket closed"
    on a plaintext channel (a TLS server hangs up on a plaintext client).
    """
    text = message.lower()
    if "connection refused" in text:
        return (
            "connection refused (nothing listens at that address)",
            "is the server running, and is the address right? Set it with --target HOST:PORT "
            "(or $PAIRSCORE_TARGET)",
        )
    if "errors resolving" in text or "dns resolution failed" in text or "name not found" in text:
        return ("no such host (the name does not resolve)", "check the host name in --target")
    if "handshake failed" in text:
        if "wrong_version_number" in text or "wrong version number" in text:
            return (
                "TLS handshake failed: the server does not speak TLS on that port",
                "drop --tls/--ca-cert for a plaintext server, or check the port in --target",
            )
        if "certificate_verify_failed" in text or "certificate verify failed" in text:
            return (
                "TLS handshake failed: the server's certificate is not trusted",
                "give the CA bundle that signed it with --ca-cert PEM (and --server-name NAME if "
                "the certificate is for another name than the one in --target)",
            )
        return (
            "TLS handshake failed",
            "check --ca-cert, --client-cert/--client-key and --server-name against the server's TLS setup",
        )
    if secure is False and ("socket closed" in text or "connection reset" in text):
        return (
            "the server hung up at once (it probably expects TLS)",
            "add --tls, or --ca-cert PEM for a private CA",
        )
    if "failed to connect" in text or "connections to all backends failing" in text:
        return ("no connection could be made", "check --target and the TLS flags (--tls, --ca-cert)")
    return None
