"""Dynamic batching: pairs from concurrent requests share forward passes.

One asyncio task collects queued pairs into a batch and hands it to the
engine on a single-thread executor, so the event loop never runs model code
and the (not thread-safe) engine is only ever used from one thread.

Batch formation is fair between requests (request_queue.py states the rule
and what it guarantees): each request's pairs queue in a lane of their own,
and a batch takes, pair after pair, from the request that has had the fewest
tokens taken so far (a request joins level with the least-served one still
queued); within the chosen request, and between requests tied at that level,
a pair beginning with the same :data:`GROUP_PREFIX_TOKENS` token ids as a pair
already in the batch (few-shot exemplars, a system prompt: the engine computes
such a run once, see engine/packing.py) comes first. So a small request's pairs
go into the next batch formed after it arrives, whatever is queued before it:
it waits for about one batch of model work, not for every large request ahead
of it. A batch closes when the next pair so chosen would push the positions the
engine computes for it over ``engine.max_call_tokens`` (several forward passes'
worth, for the engine to group by length and shared prompt; counted by
:func:`~pairscore_server.engine.interface.add_to_call`, so a run that many
pairs share, such as few-shot exemplars, counts once, not once a pair),
when it holds ``max_batch_pairs`` pairs, or when the queue is empty and its
oldest pair has waited ``max_wait_s``. A request may span several batches; it
completes when its last pair is scored.

Overload, time and faults:

* **Admission** (admission.py, an :class:`~pairscore_server.admission.Admission`
  the batcher keeps informed). The queue holds at most ``max_queue_tokens`` tokens (the
  sum of ``PreparedPair.work_tokens`` of the waiting pairs: p ⊕ x ⊕ y, and p ⊕ y
  for a pair that asked for its unconditional score). A request that
  does not fit now raises :class:`QueueFullError` at once, with a retry hint
  from the measured throughput; one larger than the whole queue raises
  :class:`RequestLimitError`. Memory held by queued work is thus bounded.
* **Deadlines and cancellation.** A request whose deadline the measured
  throughput cannot meet (the queued work the fair queue serves before all of
  it, :meth:`FairQueue.ahead_of <pairscore_server.request_queue.FairQueue.ahead_of>`,
  and its own tokens take longer than it has left) is refused at admission with
  :class:`QueueFullError`. Pairs of a caller that cancelled, or whose
  deadline passed, are dropped before they reach the model; their batch
  mates are scored. A batch whose callers have all left stops at the
  engine's next forward chunk (``Engine.score``'s ``cancelled`` check).
* **Accounting.** Every pair offered to :meth:`check_admission` /
  :meth:`submit` ends in exactly one counter: refused ones in
  ``pairscore_rejected_pairs_total{reason}``; admitted ones that never get an
  answer (the caller left, the deadline passed, their batch failed, the
  worker got stuck, the server shut down) in
  ``pairscore_dropped_pairs_total{reason}``, all of the request's pairs at
  the moment it ends, wherever they were (queued, in the model, done); the
  rest are answered, and the service counts their outcomes.
* **Out of memory.** When ``engine.score`` runs out of (accelerator) memory,
  the batch is split in halves and each half retried, down to single pairs;
  only a pair that does not fit alone fails, with an
  ``ITEM_ERROR_CODE_RESOURCE_EXHAUSTED`` item error. Splits are counted in
  ``pairscore_oom_splits_total``. Any other exception fails exactly the
  requests that had pairs in that batch.
* **Stuck worker.** :meth:`Batcher.abandon_in_flight` (called by the
  server's watchdog when a forward pass runs far too long) fails the running
  batch's requests and everything queued, and refuses work with
  :class:`WorkerUnavailableError` until the worker answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from pairscore.types import ScoreOutcome
from pairscore_server.accounting import (
    DROP_DEADLINE,
    DROP_SHUTDOWN,
    DROP_WORKER,
    leave_reason,
)
from pairscore_server.admission import Admission
from pairscore_server.batch_run import BatchRunner, PendingRequest, QueuedPair
from pairscore_server.engine.interface import add_to_call
from pairscore_server.errors import (
    BatcherClosedError,
    BatchFailedError,  # re-exported
    DeadlineExceededError,
    QueueFullError,
    RequestLimitError,
    WorkerUnavailableError,
)
from pairscore_server.request_queue import FairQueue, Pick
from pairscore_server.worker import ModelWorker, short_reason

if TYPE_CHECKING:
    from pairscore_server.engine import Engine, PreparedPair
    from pairscore_server.metrics import Metrics

__all__ = [
    "BatchFailedError",
    "Batcher",
    "BatcherClosedError",
    "DeadlineExceededError",
    "QueueFullError",
    "RequestLimitError",
    "WorkerUnavailableError",
]

log = logging.getLogger(__name__)

#: Pairs whose first this many token ids (prefix included) are the same, within
#: prompts of at least this length, are grouped into one batch: the engine's
#: trie shares runs from packing.MIN_SHARED_TOKENS (the same number) on.
GROUP_PREFIX_TOKENS = 16


def group_key(prepared: PreparedPair) -> tuple[int, ...] | None:
    """The token ids a pair is grouped by: its first GROUP_PREFIX_TOKENS, when its
    prefix and prompt are at least that long (else None: it is taken in order)."""
    if 1 + prepared.prompt_tokens < GROUP_PREFIX_TOKENS:
        return None
    return prepared.input_ids[:GROUP_PREFIX_TOKENS]


class Batcher:
    """Collects pairs from concurrent callers into batches for one engine.

    Create it, call :meth:`start` inside the running event loop, then
    ``await submit(prepared)`` from any number of tasks. :meth:`stop` refuses
    new work, finishes what is queued and ends the loop. ``max_queue_tokens``
    bounds the tokens waiting in the queue (``None``: unbounded).
    """

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        *,
        max_batch_pairs: int,
        max_wait_s: float,
        max_queue_tokens: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_pairs < 1:
            raise ValueError(f"max_batch_pairs must be >= 1, got {max_batch_pairs}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._engine = engine
        self._max_batch_pairs = max_batch_pairs
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._admission = Admission(max_queue_tokens, metrics)
        self._runner = BatchRunner(
            ModelWorker(engine, metrics),
            executor,
            self._admission,
            metrics,
            drop=self._drop,
            expire=self._expire,
        )
        self._queue: FairQueue[PendingRequest, QueuedPair] = (
            FairQueue()
        )  # the queued pairs, one lane a request
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._collecting: list[QueuedPair] = []  # the batch being gathered (taken from the queue)

    # --- public API ----------------------------------------------------------------

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a batch (not counting the batch being scored)."""
        return self._admission.queued_pairs

    @property
    def queued_tokens(self) -> int:
        """Tokens of the pairs waiting for a batch."""
        return self._admission.queued_tokens

    @property
    def max_queue_tokens(self) -> int | None:
        """The admission bound on queued tokens, or None."""
        return self._admission.max_queue_tokens

    @property
    def running(self) -> bool:
        """Whether the batching loop is alive."""
        return self._task is not None and not self._task.done()

    @property
    def stalled(self) -> bool:
        """Whether the model worker was declared stuck and has not answered since."""
        return self._runner.stalled

    @property
    def busy_seconds(self) -> float:
        """How long the forward pass now running has taken so far (0 when idle)."""
        return self._runner.busy_seconds

    def start(self) -> None:
        """Start the batching loop in the running event loop."""
        if self._task is not None:
            raise RuntimeError("the batcher was already started")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pairscore-batcher")

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish everything already queued, then end the loop.

        If that takes longer than ``timeout`` seconds (a stuck model worker),
        the remaining callers fail with BatcherClosedError and the loop is
        cancelled; the worker thread itself cannot be interrupted.
        """
        self._closing = True
        self._wakeup.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            log.warning("the batcher did not drain within %.1f s; abandoning its work", timeout)
            closed = BatcherClosedError("the server is shutting down")
            self._fail_in_flight(closed, DROP_SHUTDOWN)
            self._fail_pending(closed, DROP_SHUTDOWN)
            task.cancel()
        except Exception:  # a crashed loop already logged why
            pass

    def check_admission(
        self, *, tokens: int, pairs: int, at_least: bool = False, deadline: float | None = None
    ) -> None:
        """Raise if a request of ``tokens`` tokens / ``pairs`` pairs cannot be queued now
        (see :meth:`Admission.check <pairscore_server.admission.Admission.check>`).

        :class:`RequestLimitError` if it is larger than the whole queue (it
        never fits), :class:`QueueFullError` if it does not fit now or the
        measured throughput cannot score it before ``deadline`` (a
        ``time.monotonic()`` value), and :class:`BatcherClosedError` /
        :class:`WorkerUnavailableError` when no work is taken at all. The
        refused pairs are counted in ``pairscore_rejected_pairs_total``.
        Cheap; callers may pre-check with a lower bound (one token per pair,
        ``at_least=True``) before tokenizing.
        """
        self._admission.check(
            tokens=tokens,
            pairs=pairs,
            at_least=at_least,
            deadline=deadline,
            closed=self._closing or not self.running,
            stalled_s=self.busy_seconds if self.stalled else None,
            # The fair queue serves it before all of the others' queued work:
            ahead_tokens=None if deadline is None else self._queue.ahead_of(tokens),
        )

    def _count(self, counter: str, reason: str, pairs: int) -> None:
        counters = self._admission.counters
        (counters.rejected if counter == "rejected" else counters.dropped)(reason, pairs)

    def retry_after_s(self) -> float:
        """How long the queued work will take at the measured throughput (clamped)."""
        return self._admission.retry_after_s()

    async def submit(
        self, prepared: Sequence[PreparedPair], *, deadline: float | None = None
    ) -> list[ScoreOutcome]:
        """Score ``prepared`` pairs, batched with other callers' pairs.

        Returns one outcome per pair, in order: a PairScore, or an ItemError
        for a pair that ran out of memory even alone. ``deadline`` is a
        ``time.monotonic()`` value: pairs still queued then are dropped and
        the call raises :class:`DeadlineExceededError`. Raises what
        :meth:`check_admission` raises, :class:`BatchFailedError` when a
        batch holding any of these pairs failed, and
        :class:`WorkerUnavailableError` when the worker got stuck. If the
        caller is cancelled, its pairs that are not yet being scored are
        dropped from the queue.
        """
        if not prepared:
            if self._closing or not self.running:
                raise BatcherClosedError("the server is shutting down and takes no new work")
            return []
        n = len(prepared)
        tokens = sum(p.work_tokens for p in prepared)
        self.check_admission(tokens=tokens, pairs=n, deadline=deadline)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            self._count("dropped", DROP_DEADLINE, n)
            raise DeadlineExceededError("the deadline passed before the pairs were queued")
        loop = asyncio.get_running_loop()
        request = PendingRequest(
            future=loop.create_future(),
            results=[None] * n,
            pairs=n,
            remaining=n,
            deadline=deadline,
        )
        self._queue.add(
            request,
            (
                QueuedPair(request=request, index=i, prepared=p, enqueued_at=now, key=group_key(p))
                for i, p in enumerate(prepared)
            ),
        )
        self._admission.queued(n, tokens)
        self._queue_changed()
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.future.cancel()
            self._drop(request, leave_reason(deadline, now, time.monotonic()))
            raise

    def abandon_in_flight(self, reason: str) -> None:
        """The model worker is stuck: fail its batch and all queued work; refuse new work.

        Work is refused (WorkerUnavailableError) until the stuck forward pass
        returns, if it ever does.
        """
        if self._runner.stalled:
            return
        self._runner.stalled = True
        exc = WorkerUnavailableError(reason)
        self._fail_in_flight(exc, DROP_WORKER)
        self._fail_pending(exc, DROP_WORKER)

    # --- internals -------------------------------------------------------------------

    def _queue_changed(self) -> None:
        self._admission.publish()

    def _drop(self, request: PendingRequest, reason: str) -> None:
        """Mark a request that finished early (failed, cancelled, expired): its pairs are dead.

        All its pairs count as dropped for ``reason``, once, wherever they
        are. Its queued pairs leave the queue; results of ones in the model
        are thrown away.
        """
        if not request.dropped:
            request.dropped = True
            pairs, tokens = self._queue.discard(request)
            self._admission.queued(-pairs, -tokens)
            self._count("dropped", reason, request.pairs)
            self._queue_changed()

    def _expire(self, request: PendingRequest) -> None:
        """Fail a request whose deadline passed; its queued pairs never reach the model."""
        request.fail(DeadlineExceededError("the deadline passed while the pairs were queued"))
        self._drop(request, DROP_DEADLINE)

    def _pick(self, keys: set[tuple[int, ...]]) -> Pick[PendingRequest, QueuedPair] | None:
        """The queued pair the fair queue hands out next (expiring overdue requests on the
        way), or None when nothing is queued. Valid until the next await."""
        now = time.monotonic()
        while (pick := self._queue.peek(keys)) is not None:
            request = pick.item.request
            if not request.expired(now):
                return pick
            self._expire(request)
        return None

    def _take(self, pick: Pick[PendingRequest, QueuedPair]) -> QueuedPair:
        """Take a picked pair out of the queue (and out of the admission count)."""
        item = self._queue.take(pick)
        self._admission.queued(-1, -item.tokens)
        return item

    async def _wait_for_work(self, timeout: float | None) -> bool:
        """Wait until something is queued (or closing); False on timeout."""
        self._wakeup.clear()
        if self._queue or self._closing:
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            return False
        return True

    async def _collect(self) -> list[QueuedPair]:
        """Wait for the first pair, then gather a batch under the limits, in fair order."""
        self._queue.start_batch()
        while (pick := self._pick(set())) is None:
            self._queue_changed()
            if self._closing:
                return []
            await self._wait_for_work(None)
        first = self._take(pick)
        self._collecting = batch = [first]
        size = self._engine.call_size()
        add_to_call(size, first.prepared, None)
        budget = self._engine.max_call_tokens
        oldest = first.enqueued_at
        keys = {first.key} if first.key is not None else set()
        while len(batch) < self._max_batch_pairs:
            pick = self._pick(keys)
            if pick is None:
                remaining = oldest + self._max_wait_s - time.monotonic()
                if self._closing or remaining <= 0 or not await self._wait_for_work(remaining):
                    break
                continue
            nxt = pick.item
            if not add_to_call(size, nxt.prepared, budget):
                break
            batch.append(self._take(pick))
            if nxt.key is not None:
                keys.add(nxt.key)
            oldest = min(oldest, nxt.enqueued_at)
        self._queue_changed()
        self._collecting = []
        return batch

    async def _loop(self) -> None:
        try:
            while True:
                batch = await self._collect()
                if not batch:  # closing and nothing left
                    return
                await self._runner.run(batch)
        except asyncio.CancelledError:
            closed = BatcherClosedError("the batcher was cancelled")
            self._fail_in_flight(closed, DROP_SHUTDOWN)
            self._fail_pending(closed, DROP_SHUTDOWN)
            raise
        except Exception as exc:  # a bug in the loop itself: fail everyone, don't hang them
            log.critical("the batching loop crashed", exc_info=exc)
            crashed = BatcherClosedError(f"the batching loop crashed: {short_reason(exc)}")
            self._fail_in_flight(crashed, DROP_WORKER)
            self._fail_pending(crashed, DROP_WORKER)
            raise
        finally:
            self._closing = True

    def _fail_in_flight(self, exc: Exception, reason: str) -> None:
        """Fail the requests of the batch being gathered or in the model (results are ignored)."""
        for item in (*self._collecting, *self._runner.in_flight):
            item.request.fail(exc)
            self._drop(item.request, reason)

    def _fail_pending(self, exc: Exception, reason: str) -> None:
        """Fail every request that still has pairs queued, and empty the queue."""
        for request in self._queue.owners():
            request.fail(exc)
            self._drop(request, reason)
        self._queue_changed()
