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


def error_from_rpc(error: grpc.RpcError) -> ScoringError:
    """Map a grpc.RpcError (sync or ``grpc.aio.AioRpcError``) to its typed exception."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details or str(error))
