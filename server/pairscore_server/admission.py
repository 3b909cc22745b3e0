"""Admission on tokens: whether a tokenized request may join the batching queue now.

:class:`Admission` owns the queue's token budget and what it needs to decide:
the tokens of the pairs waiting (whose caller still waits), the tokens of the
batch in the model, and the measured throughput. The
:class:`~pairscore_server.batcher.Batcher` tells it what enters and leaves the
queue and the model; it refuses (and counts in
``pairscore_rejected_pairs_total``):

* a request larger than the whole queue: :class:`RequestLimitError`;
* one that does not fit now: :class:`QueueFullError`, with a retry hint from
  the measured throughput;
* one whose deadline the measured throughput cannot meet (the tokens ahead of
  it and its own take longer than it has left): :class:`DeadlineUnmeetableError`;
* any work while the server shuts down (:class:`BatcherClosedError`) or the
  model worker is stuck (:class:`WorkerUnavailableError`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pairscore_server.accounting import (
    DROP_DEADLINE,
    DROP_SHUTDOWN,
    DROP_WORKER,
    REJECT_QUEUE_FULL,
    REJECT_REQUEST_LIMIT,
    PairCounters,
)
from pairscore_server.errors import (
    BatcherClosedError,
    DeadlineUnmeetableError,
    QueueFullError,
    RequestLimitError,
    WorkerUnavailableError,
)

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics

#: Bounds of the retry hint given with QueueFullError, in seconds.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0
#: Retry hint before any batch has been timed.
DEFAULT_RETRY_AFTER_S = 1.0
_THROUGHPUT_SMOOTHING = 0.3  # weight of the newest batch in the tokens/s estimate

_REFUSALS = (BatcherClosedError, RequestLimitError, QueueFullError)


def refusal_reason(exc: BaseException) -> str:
    """The ``reason`` label of a refusal at admission."""
    if isinstance(exc, WorkerUnavailableError):
        return DROP_WORKER
    if isinstance(exc, BatcherClosedError):
        return DROP_SHUTDOWN
    if isinstance(exc, RequestLimitError):
        return REJECT_REQUEST_LIMIT
    if isinstance(exc, DeadlineUnmeetableError):
        return DROP_DEADLINE
    return REJECT_QUEUE_FULL


class Admission:
    """The batching queue's token budget (``max_queue_tokens``; ``None``: unbounded)."""

    def __init__(self, max_queue_tokens: int | None, metrics: Metrics | None = None) -> None:
        if max_queue_tokens is not None and max_queue_tokens < 1:
            raise ValueError(f"max_queue_tokens must be >= 1, got {max_queue_tokens}")
        self.max_queue_tokens = max_queue_tokens
        self._metrics = metrics
        self.counters = PairCounters(metrics)
        self.queued_pairs = 0  # queued pairs whose request still waits
        self.queued_tokens = 0  # and their tokens
        self.in_flight_tokens = 0  # tokens of the batch in the model
        self.tokens_per_s: float | None = None

    # --- what the batcher reports ----------------------------------------------------

    def queued(self, pairs: int, tokens: int) -> None:
        """``pairs`` live pairs of ``tokens`` tokens joined (negative: left) the queue."""
        self.queued_pairs += pairs
        self.queued_tokens += tokens

    def publish(self) -> None:
        """Set the queue gauges."""
        if self._metrics is not None:
            self._metrics.queue_pairs.set(self.queued_pairs)
            self._metrics.queue_tokens.set(self.queued_tokens)

    def measured(self, tokens: int, seconds: float) -> None:
        """A batch of ``tokens`` tokens took ``seconds`` in the model: update the throughput."""
        if seconds > 0:
            rate = tokens / seconds
            old = self.tokens_per_s
            self.tokens_per_s = rate if old is None else old + _THROUGHPUT_SMOOTHING * (rate - old)

    # --- decisions -------------------------------------------------------------------

    def check(
        self,
        *,
        tokens: int,
        pairs: int,
        at_least: bool = False,
        deadline: float | None = None,
        closed: bool = False,
        stalled_s: float | None = None,
        ahead_tokens: int | None = None,
    ) -> None:
        """Raise if a request of ``tokens`` tokens / ``pairs`` pairs cannot be queued now,
        counting the refused pairs. ``closed``: the server takes no work;
        ``stalled_s``: how long a stuck model worker has not answered (None: it is fine).
        ``at_least``: ``tokens`` is a lower bound (before tokenizing). ``ahead_tokens``:
        how many queued tokens the queue's order can serve before the request's own
        (default: all of them)."""
        try:
            self._check(tokens, at_least, deadline, closed, stalled_s, ahead_tokens)
        except _REFUSALS as exc:
            self.counters.rejected(refusal_reason(exc), pairs)
            raise

    def _check(
        self,
        tokens: int,
        at_least: bool,
        deadline: float | None,
        closed: bool,
        stalled_s: float | None,
        ahead_tokens: int | None,
    ) -> None:
        if closed:
            raise BatcherClosedError("the server is shutting down and takes no new work")
        if stalled_s is not None:
            raise WorkerUnavailableError(
                f"the model worker has not answered for {stalled_s:.0f} s; "
                "the server refuses work until it does (retry on another replica)"
            )
        cap = self.max_queue_tokens
        needs = f"at least {tokens}" if at_least else f"{tokens}"
        if cap is not None and tokens > cap:
            raise RequestLimitError(
                f"request needs {needs} tokens but the server queues at most {cap} tokens "
                "(max_queue_tokens); split it into smaller requests"
            )
        if cap is not None and self.queued_tokens + tokens > cap:
            retry = self.retry_after_s()
            raise QueueFullError(
                f"server overloaded: its queue holds {self.queued_tokens} of {cap} tokens and "
                f"this request needs {needs}; retry in about {retry * 1000:.0f} ms",
                retry,
            )
        rate = self.tokens_per_s
        if deadline is not None and rate:
            queued = self.queued_tokens if ahead_tokens is None else ahead_tokens
            ahead = queued + self.in_flight_tokens
            wait = (ahead + tokens) / rate
            left = deadline - time.monotonic()
            if 0 < left < wait:  # one already past is DeadlineExceededError, in submit()
                raise DeadlineUnmeetableError(
                    f"the server cannot meet this request's deadline: at the measured "
                    f"{rate:.0f} tokens/s, the {ahead} tokens queued ahead of it and its own "
                    f"{needs} take about {wait:.2f} s, and it has {left:.2f} s left; "
                    "retry with a longer deadline, later, or on another replica",
                    self.retry_after_s(),
                )

    def retry_after_s(self) -> float:
        """How long the queued work will take at the measured throughput (clamped)."""
        rate = self.tokens_per_s
        if not rate:
            return DEFAULT_RETRY_AFTER_S
        backlog = self.queued_tokens + self.in_flight_tokens
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, backlog / rate))
