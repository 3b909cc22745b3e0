"""Bookkeeping of ``score_iter``, without any I/O: one copy for the sync and asyncio drivers.

Input pairs are cut into numbered batches. Each batch is sent on one *lane*
(one ScoreStream call); the server answers a lane's batches in the order it
got them. When a lane breaks, its unanswered batches go back to a retry
queue and are sent again, first, on whichever lane asks next. Answers wait
in a reorder buffer until every earlier batch is answered, so results come
out in input order. Pairs the server refuses for overload (item error
RESOURCE_EXHAUSTED) are resent after a backoff. Pairs count as *in flight* from the moment they are read
until the consumer takes their results: at most ``max_in_flight`` (plus at
most one batch being read), whatever the input size and however slow the
consumer.

The drivers (:mod:`pairscore._stream_sync`, :mod:`pairscore._stream_aio`)
call these methods while holding their own lock.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pairscore.types import ItemError, ItemErrorCode, Pair, ScoreOutcome


@dataclass(eq=False)
class Batch:
    """Pairs read together; ``seq`` is the batch's place in the input.

    ``pending`` lists the indices of the pairs still to be scored (all of
    them at first; those the server refused for overload after an answer),
    ``results`` the outcomes known so far.
    """

    seq: int
    pairs: list[Pair]
    results: list[ScoreOutcome | None] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    overloaded_answers: int = 0
    not_before: float = 0.0

    def __post_init__(self) -> None:
        if not self.results:
            self.results = [None] * len(self.pairs)
            self.pending = list(range(len(self.pairs)))

    def to_send(self) -> list[Pair]:
        """The pairs to put in the next message for this batch."""
        return [self.pairs[i] for i in self.pending]

    def __lt__(self, other: Batch) -> bool:
        return self.seq < other.seq


@dataclass(eq=False)
class Lane:
    """One ScoreStream call: the batches sent on it and not yet answered, oldest first."""

    outstanding: deque[Batch] = field(default_factory=deque)
    dead: bool = False
    stalled: bool = False
    last_progress: float = 0.0
    call: Any = None


class Sequencer:
    """Numbering, in-flight accounting, retry queue and reorder buffer of one score_iter."""

    def __init__(
        self,
        *,
        batch_size: int,
        max_in_flight: int,
        item_retry_delay: Callable[[int], float | None] = lambda attempt: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batch_size = batch_size
        self._item_retry_delay = item_retry_delay
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._next_seq = 0
        self._next_out = 0
        self._retry: list[Batch] = []
        self._ready: dict[int, list[ScoreOutcome]] = {}
        self._unanswered = 0  # batches read but not answered (on a lane or queued for retry)
        self.in_flight = 0  # pairs read whose results the consumer has not taken
        self.reading = False
        self.exhausted = False
        self.error: BaseException | None = None
        self.pairs_answered = 0

    # --- the input side -------------------------------------------------------------

    def wants_input(self) -> bool:
        """Whether a lane should read the next batch now (nothing to resend, room in flight)."""
        return (
            not self.exhausted
            and not self.reading
            and not self._retry
            and self.error is None
            and self.in_flight + self.batch_size <= self.max_in_flight
        )

    def begin_read(self) -> None:
        """A lane starts reading a batch from the input (outside the lock)."""
        self.reading = True

    def end_read(self, pairs: list[Pair], lane: Lane) -> Batch | None:
        """The batch just read, assigned to ``lane``; ``None`` when the input had no more pairs.

        If ``lane`` died meanwhile the batch goes to the retry queue instead
        and ``None`` is returned.
        """
        self.reading = False
        if not pairs:
            self.exhausted = True
            return None
        batch = Batch(self._next_seq, pairs)
        self._next_seq += 1
        self._unanswered += 1
        self.in_flight += len(pairs)
        if lane.dead:
            heapq.heappush(self._retry, batch)
            return None
        self._assign(lane, batch)
        return batch

    def read_failed(self, error: BaseException) -> None:
        """Reading the input raised: the whole iteration fails with that error."""
        self.reading = False
        self.fail(error)

    # --- the sending side -----------------------------------------------------------

    def take_retry(self, lane: Lane) -> Batch | None:
        """The oldest batch due to be resent, now assigned to ``lane``; else ``None``."""
        if not self._retry or self.error is not None:
            return None
        now = self._clock()
        due = [b for b in self._retry if b.not_before <= now]
        if not due:
            return None
        batch = min(due)
        self._retry.remove(batch)
        heapq.heapify(self._retry)
        self._assign(lane, batch)
        return batch

    def next_retry_in(self) -> float | None:
        """Seconds until a batch waiting to be resent is due (``None``: none waits)."""
        if not self._retry:
            return None
        return max(0.0, min(b.not_before for b in self._retry) - self._clock())

    def _assign(self, lane: Lane, batch: Batch) -> None:
        if not lane.outstanding:
            lane.last_progress = self._clock()  # the lane's wait for an answer starts now
        lane.outstanding.append(batch)

    def lane_may_close(self) -> bool:
        """Whether a lane's request stream may end: all input read and every batch answered."""
        return self.error is not None or (
            self.exhausted and not self.reading and not self._retry and self._unanswered == 0
        )

    # --- the answering side ---------------------------------------------------------

    def answered(self, lane: Lane, outcomes: list[ScoreOutcome]) -> None:
        """The server answered the oldest batch outstanding on ``lane``.

        Pairs refused with an item error RESOURCE_EXHAUSTED (the server is
        overloaded) are sent again after a backoff, as long as
        ``item_retry_delay`` allows; then the error is their result.
        """
        batch = lane.outstanding.popleft()
        lane.last_progress = self._clock()
        if len(outcomes) != len(batch.pending):
            raise ValueError(
                f"the server answered {len(outcomes)} results for a message of {len(batch.pending)} pairs"
            )
        overloaded = [
            i
            for i, outcome in zip(batch.pending, outcomes, strict=True)
            if isinstance(outcome, ItemError) and outcome.code is ItemErrorCode.RESOURCE_EXHAUSTED
        ]
        delay = self._item_retry_delay(batch.overloaded_answers + 1) if overloaded else None
        retry = set(overloaded) if delay is not None else set()
        for i, outcome in zip(batch.pending, outcomes, strict=True):
            if i not in retry:
                batch.results[i] = outcome
        self.pairs_answered += len(outcomes) - len(retry)
        if retry:
            batch.overloaded_answers += 1
            batch.pending = [i for i in batch.pending if i in retry]
            batch.not_before = self._clock() + (delay or 0.0)
            heapq.heappush(self._retry, batch)
            return
        self._ready[batch.seq] = cast("list[ScoreOutcome]", batch.results)  # all filled now
        self._unanswered -= 1

    def expected(self, lane: Lane) -> int:
        """How many results the next answer on ``lane`` must hold."""
        return len(lane.outstanding[0].pending)

    def lane_broken(self, lane: Lane) -> int:
        """``lane``'s call failed: its unanswered batches go back to be resent; returns how many."""
        lane.dead = True
        lost = len(lane.outstanding)
        for batch in lane.outstanding:
            heapq.heappush(self._retry, batch)
        lane.outstanding.clear()
        return lost

    def stalled_lanes(self, lanes: list[Lane], timeout: float | None) -> list[Lane]:
        """Live lanes waiting longer than ``timeout`` for an answer; marks them stalled."""
        if timeout is None:
            return []
        now = self._clock()
        stalled = [
            lane
            for lane in lanes
            if not lane.dead and not lane.stalled and lane.outstanding and now - lane.last_progress > timeout
        ]
        for lane in stalled:
            lane.stalled = True
        return stalled

    # --- the consumer side ----------------------------------------------------------

    def pop_ready(self) -> list[ScoreOutcome]:
        """Results that are next in input order (possibly none)."""
        out: list[ScoreOutcome] = []
        while self._next_out in self._ready:
            out.extend(self._ready.pop(self._next_out))
            self._next_out += 1
        self.in_flight -= len(out)
        return out

    @property
    def finished(self) -> bool:
        """Every input pair's result was handed to the consumer."""
        return self.exhausted and not self.reading and self._next_out == self._next_seq

    def fail(self, error: BaseException) -> None:
        """End the iteration with ``error`` (the first failure wins)."""
        if self.error is None:
            self.error = error
