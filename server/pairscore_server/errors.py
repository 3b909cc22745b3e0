"""Why the server refused or failed a piece of work, as exception types.

The batcher and the service raise these; the servicer maps each to one gRPC
status code (in ScoreStream, to an item error for the message's pairs):

==========================  ====================  ==================================
exception                   gRPC status           item error (ScoreStream)
==========================  ====================  ==================================
RequestLimitError           INVALID_ARGUMENT      ITEM_ERROR_CODE_INVALID_ARGUMENT
QueueFullError              RESOURCE_EXHAUSTED    ITEM_ERROR_CODE_RESOURCE_EXHAUSTED
DeadlineExceededError       DEADLINE_EXCEEDED     ITEM_ERROR_CODE_DEADLINE_EXCEEDED
BatchFailedError            INTERNAL              ITEM_ERROR_CODE_INTERNAL
BatcherClosedError (and     UNAVAILABLE           (the stream ends UNAVAILABLE)
WorkerUnavailableError)
==========================  ====================  ==================================
"""

from __future__ import annotations


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
