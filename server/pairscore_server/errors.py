"""Why the server refused or failed a piece of work, and how each reaches the caller.

The batcher and the service raise these exception types; :data:`FAILURES`
is the one table from exception to gRPC status code (what the servicer ends
an RPC with) and to item error code (what ScoreStream answers a message's
pairs with, so that the stream goes on). The servicer and the service both
read it through :func:`failure_for`; docs/api.md renders it for users.
"""

from __future__ import annotations

from dataclasses import dataclass

from pairscore.convert import ConversionError
from pairscore.types import ItemErrorCode


class BatcherClosedError(RuntimeError):
    """The batcher is stopping or stopped and takes no new work."""


class WorkerUnavailableError(BatcherClosedError):
    """The model worker is stuck or gone; work is refused until it answers again."""


class BatchFailedError(RuntimeError):
    """The forward pass of a batch that held some of this request's pairs failed."""


class RequestLimitError(ValueError):
    """The request as a whole breaks a configured limit; retrying it unchanged cannot succeed."""


class QueueFullError(RuntimeError):
    """The admission queue cannot take this request now; ``retry_after_s`` is a hint."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(RuntimeError):
    """The caller's deadline passed before its pairs reached the model."""


@dataclass(frozen=True)
class Failure:
    """How one kind of failure reaches the caller.

    ``status``: the name of the ``grpc.StatusCode`` that ends a unary RPC
    (this module imports no grpc). ``item_code``: the item error its pairs get
    in ScoreStream, or None where the whole stream ends with ``status``.
    ``prefix``: put before the exception's text in the message.
    """

    exception: type[Exception]
    status: str
    item_code: ItemErrorCode | None
    prefix: str = ""

    def message(self, exc: BaseException) -> str:
        """The text the caller reads."""
        return f"{self.prefix}{exc}"


#: Exception -> gRPC status -> ScoreStream item error, first match wins.
FAILURES: tuple[Failure, ...] = (
    Failure(ConversionError, "INVALID_ARGUMENT", ItemErrorCode.INVALID_ARGUMENT, "invalid request: "),
    Failure(RequestLimitError, "INVALID_ARGUMENT", ItemErrorCode.INVALID_ARGUMENT),
    Failure(QueueFullError, "RESOURCE_EXHAUSTED", ItemErrorCode.RESOURCE_EXHAUSTED),
    Failure(DeadlineExceededError, "DEADLINE_EXCEEDED", ItemErrorCode.DEADLINE_EXCEEDED),
    Failure(BatchFailedError, "INTERNAL", ItemErrorCode.INTERNAL),
    Failure(BatcherClosedError, "UNAVAILABLE", None),  # WorkerUnavailableError too
)


def failure_for(exc: BaseException) -> Failure | None:
    """The row of :data:`FAILURES` for ``exc``, or None for an unexpected exception (a bug)."""
    for failure in FAILURES:
        if isinstance(exc, failure.exception):
            return failure
    return None
