"""When and after how long a broken ``score_iter`` stream reconnects.

gRPC's channel-level retryPolicy cannot replay a long client stream (it
gives up once the first answer arrived or its replay buffer filled), so a
lane that breaks is reopened here: after UNAVAILABLE or RESOURCE_EXHAUSTED
(or whatever codes the :class:`~pairscore.channel.RetryPolicy` lists), after
a CANCELLED that the client did not ask for (a server shutting down cancels
its streams), and after the lane stalled past its progress deadline. It
waits with the policy's exponential backoff and full jitter, and gives up
when ``stream_reconnect_timeout_s`` passed without any answer, or, when the
server cannot be reached at all (connection refused, unknown host, TLS
handshake failure: :class:`~pairscore.errors.ConnectionFailedError`), when
the caller's progress ``timeout`` passed, so that a wrong target fails in
seconds, naming the cause. A message over gRPC's size limit
(:class:`~pairscore.errors.MessageTooLargeError`) is never retried: it would
fail the same way every time. Scoring has no
side effects, so resending unanswered batches is safe. Pairs that a server
refuses one by one for overload (item error RESOURCE_EXHAUSTED, as
ScoreStream reports admission failures) are resent with the same backoff.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import grpc

from pairscore._sequencer import Lane
from pairscore.channel import RetryPolicy
from pairscore.errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    MessageTooLargeError,
    ScoringError,
    UnavailableError,
    error_from_rpc,
)

#: How often a pair refused for overload is sent again before its error is the result.
ITEM_RETRY_ATTEMPTS = 10


def item_retry_delays(
    policy: RetryPolicy | None, rng: Callable[[float, float], float] = random.uniform
) -> Callable[[int], float | None]:
    """Backoff for pairs the server refused with item error RESOURCE_EXHAUSTED.

    Returns a function of the retry number (1 for the first) giving the
    delay before resending, or ``None`` once ``ITEM_RETRY_ATTEMPTS`` were
    used (or when retries are off).
    """

    def delay(retry: int) -> float | None:
        if policy is None or "RESOURCE_EXHAUSTED" not in policy.retryable_codes:
            return None
        if retry > ITEM_RETRY_ATTEMPTS:
            return None
        return rng(0.0, policy.backoff_ceiling(retry))

    return delay


#: What grpc.aio reports, as INTERNAL, when a write fails because the server
#: already ended the stream (a server stopping, say): the server's own status
#: is lost (grpc/grpc#36066). Our server never sends this text.
CORE_WRITE_FAILURE = "Internal error from Core"


def lane_error(exc: grpc.RpcError, lane: Lane, *, secure: bool | None = None) -> ScoringError:
    """The typed error that broke ``lane`` (a stall reads as DEADLINE_EXCEEDED, and
    grpc.aio's local write failure as UNAVAILABLE: the stream broke under it)."""
    if lane.stalled:
        return DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "no answer on the stream within the timeout; the stream was cancelled",
        )
    error = error_from_rpc(exc, secure=secure)
    if error.code == grpc.StatusCode.INTERNAL and error.message == CORE_WRITE_FAILURE:
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            "the stream broke while a batch was being sent (gRPC reported "
            f"{CORE_WRITE_FAILURE!r}, which hides the server's status: grpc/grpc#36066)",
        )
    return error


def unanswered_error(lane: Lane) -> ScoringError:
    """The server ended a stream although batches sent on it were not answered."""
    return ScoringError(
        grpc.StatusCode.UNKNOWN,
        f"the server ended the stream with {len(lane.outstanding)} messages unanswered",
    )


class Reconnector:
    """Backoff state of one lane: ``next_delay`` after a failure, ``progress`` after an answer."""

    def __init__(
        self,
        policy: RetryPolicy | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[float, float], float] = random.uniform,
        connect_timeout: float | None = None,
    ) -> None:
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._rng = rng
        self._retries = 0
        self._give_up_at: float | None = None
        self._cause: ConnectionFailedError | None = None  # why the server could not be reached
        self._codes = (
            frozenset(grpc.StatusCode[c] for c in policy.retryable_codes)
            | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
            if policy is not None
            else frozenset()
        )

    def progress(self) -> None:
        """An answer arrived: the next failure starts a fresh backoff."""
        self._retries = 0
        self._give_up_at = None
        self._cause = None

    def final_error(self, error: ScoringError) -> ScoringError:
        """What to fail with when giving up after ``error``: the reason the server could not
        be reached, if one was seen since the last answer and ``error`` is only a stream that
        stalled or was cancelled while the channel kept failing to connect."""
        stalled = error.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        if self._cause is not None and stalled and not isinstance(error, ConnectionFailedError):
            return self._cause
        return error

    def next_delay(self, error: ScoringError) -> float | None:
        """Seconds to wait before reopening the stream, or ``None`` to give up with ``error``."""
        if self._policy is None or error.code not in self._codes or isinstance(error, MessageTooLargeError):
            return None
        now = self._clock()
        window = self._policy.stream_reconnect_timeout_s
        if isinstance(error, ConnectionFailedError):
            self._cause = error
            if self._connect_timeout is not None:
                window = min(window, self._connect_timeout)
        give_up_at = now + window
        self._give_up_at = give_up_at if self._give_up_at is None else min(self._give_up_at, give_up_at)
        if now >= self._give_up_at:
            return None
        self._retries += 1
        delay = self._rng(0.0, self._policy.backoff_ceiling(self._retries))
        return min(delay, self._give_up_at - now)
