"""A batch in the model: its requests, the model-thread call, the results handed back.

The :class:`~pairscore_server.batcher.Batcher` forms batches of
:class:`QueuedPair`\\ s (each knowing its :class:`PendingRequest`) and gives
each to :meth:`BatchRunner.run`, which scores it on the model thread (through
:class:`~pairscore_server.worker.ModelWorker`: out-of-memory splits happen
there) and hands every outcome to its request, or the failure to exactly the
requests that had pairs in the batch. It also keeps what the watchdog reads:
how long the forward pass now running has taken, and whether the worker was
declared stuck.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pairscore.types import ScoreOutcome
from pairscore_server.accounting import DROP_FAILED
from pairscore_server.engine.interface import ScoreCancelled
from pairscore_server.errors import BatchFailedError
from pairscore_server.worker import ModelWorker, short_reason

if TYPE_CHECKING:
    from pairscore_server.admission import Admission
    from pairscore_server.engine import PreparedPair
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PendingRequest:
    """One ``Batcher.submit`` call: its pairs, its future and the results gathered so far."""

    future: asyncio.Future[list[ScoreOutcome]]
    results: list[ScoreOutcome | None]
    pairs: int  # all its pairs
    remaining: int  # pairs not scored yet
    deadline: float | None = None  # time.monotonic() after which the caller no longer waits
    dropped: bool = False  # finished early (failed/cancelled): its pairs are dead and counted

    def expired(self, now: float) -> bool:
        """Whether its deadline has passed at ``now``."""
        return self.deadline is not None and now >= self.deadline

    def fail(self, exc: BaseException) -> None:
        """Give the caller ``exc`` (unless it already has its answer or left)."""
        if not self.future.done():
            self.future.set_exception(exc)

    def deliver(self, index: int, outcome: ScoreOutcome) -> None:
        """Its pair ``index`` was scored; answer the caller once all are."""
        if self.future.done():  # cancelled (or abandoned) while its batch ran
            return
        self.results[index] = outcome
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)  # type: ignore[arg-type]


@dataclass(eq=False)
class QueuedPair:
    """One pair of a request, queued or in a batch, and where its result goes."""

    request: PendingRequest
    index: int
    prepared: PreparedPair
    enqueued_at: float = field(default_factory=time.monotonic)
    key: tuple[int, ...] | None = None  # its group key (batcher.group_key)

    @property
    def tokens(self) -> int:
        """What the pair costs the model (its share of the fair queue and of admission)."""
        return self.prepared.work_tokens


def _all_left(batch: Sequence[QueuedPair]) -> bool:
    """Whether no caller of ``batch`` waits any more (polled by the engine, on the model thread)."""
    return all(item.request.future.done() for item in batch)


class BatchRunner:
    """Runs one batch at a time on the model thread and answers its requests.

    ``drop(request, reason)`` ends a request early (its pairs counted as
    dropped); ``expire(request)`` fails one whose deadline passed: the
    :class:`~pairscore_server.batcher.Batcher` owns both.
    """

    def __init__(
        self,
        worker: ModelWorker,
        executor: Executor,
        admission: Admission,
        metrics: Metrics | None,
        *,
        drop: Callable[[PendingRequest, str], None],
        expire: Callable[[PendingRequest], None],
    ) -> None:
        self._worker = worker
        self._executor = executor
        self._admission = admission
        self._metrics = metrics
        self._drop = drop
        self._expire = expire
        self.in_flight: list[QueuedPair] = []  # the batch the model is scoring now
        self.stalled = False  # the worker was declared stuck and has not answered since
        self._forward_started: float | None = None

    @property
    def busy_seconds(self) -> float:
        """How long the forward pass now running has taken so far (0 when idle)."""
        started = self._forward_started
        return 0.0 if started is None else time.monotonic() - started

    def _live(self, batch: list[QueuedPair]) -> list[QueuedPair]:
        """The batch without pairs whose caller left or whose deadline passed meanwhile."""
        now = time.monotonic()
        live = []
        for item in batch:
            request = item.request
            if not request.future.done() and request.expired(now):
                self._expire(request)
            if not request.future.done():
                live.append(item)
        return live

    async def run(self, batch: list[QueuedPair]) -> None:
        """Score one batch and hand results (or the failure) to its requests."""
        self.in_flight = batch
        batch = self._live(batch)
        if not batch:
            self.in_flight = []
            return
        prepared = [item.prepared for item in batch]
        tokens = sum(p.work_tokens for p in prepared)
        loop = asyncio.get_running_loop()
        self.in_flight, self._admission.in_flight_tokens = batch, tokens
        self._forward_started = time.monotonic()
        try:
            forward = await loop.run_in_executor(
                self._executor, self._worker.run, prepared, functools.partial(_all_left, batch)
            )
        except ScoreCancelled:  # every caller left: their pairs are already dropped and counted
            log.debug("a batch of %d pairs stopped early: all its callers left", len(batch))
            return
        except Exception as exc:  # the whole batch failed: fail exactly its requests
            log.error("a batch of %d pairs failed: %s", len(batch), short_reason(exc), exc_info=exc)
            for request in {id(item.request): item.request for item in batch}.values():
                err = BatchFailedError(f"scoring failed: {short_reason(exc)}")
                err.__cause__ = exc
                request.fail(err)
                self._drop(request, DROP_FAILED)
            return
        finally:
            if self.stalled:
                log.warning(
                    "the model worker answered again after %.0f s; taking work again",
                    self.busy_seconds,
                )
                self.stalled = False
            self.in_flight, self._admission.in_flight_tokens = [], 0
            self._forward_started = None
        seconds = forward.seconds
        self._admission.measured(tokens, seconds)
        if self._metrics is not None:
            stats = forward.stats
            self._metrics.observe_batch(
                pairs=len(prepared),
                padded_tokens=stats.padded_tokens,
                seconds=seconds,
                real_tokens=stats.real_tokens,
                reused_tokens=stats.reused_tokens,
                replica_seconds=forward.replica_seconds,
            )
        for item, outcome in zip(batch, forward.outcomes, strict=True):
            item.request.deliver(item.index, outcome)
