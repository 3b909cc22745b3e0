"""Dynamic batching: pairs from concurrent requests share forward passes.

One asyncio task collects queued pairs into a batch and hands it to the
engine on a single-thread executor, so the event loop never runs model code
and the (not thread-safe) engine is only ever used from one thread.

A batch closes when the next queued pair would push its padded size
(longest pair x number of pairs) over ``engine.max_call_tokens`` (several
forward passes' worth, for the engine to group by length and shared
prompt), when it holds ``max_batch_pairs`` pairs, or when its oldest pair has waited
``max_wait_s``. A batch starts with the oldest queued pair; then queued pairs
that begin with the same :data:`GROUP_PREFIX_TOKENS` token ids as a pair
already in the batch (few-shot exemplars, a system prompt: the engine computes
such a run once, see engine/packing.py) are taken first, from any request,
among the next :data:`GROUP_LOOKAHEAD` queued pairs; the rest come in arrival
order. A request may span several batches; it completes when its last pair is
scored.

Overload, time and faults:

* **Admission** (admission.py, an :class:`~pairscore_server.admission.Admission`
  the batcher keeps informed). The queue holds at most ``max_queue_tokens`` tokens (the
  sum of ``PreparedPair.work_tokens`` of the waiting pairs: p ⊕ x ⊕ y, and p ⊕ y
  for a pair that asked for its unconditional score). A request that
  does not fit now raises :class:`QueueFullError` at once, with a retry hint
  from the measured throughput; one larger than the whole queue raises
  :class:`RequestLimitError`. Memory held by queued work is thus bounded.
* **Deadlines and cancellation.** A request whose deadline the measured
  throughput cannot meet (the queue ahead of it and its own tokens take
  longer than it has left) is refused at admission with
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
import collections
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pairscore.types import ScoreOutcome
from pairscore_server.accounting import (
    DROP_DEADLINE,
    DROP_FAILED,
    DROP_SHUTDOWN,
    DROP_WORKER,
    leave_reason,
)
from pairscore_server.admission import Admission
from pairscore_server.engine.interface import ScoreCancelled
from pairscore_server.errors import (
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    RequestLimitError,
    WorkerUnavailableError,
)
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
#: How many queued pairs a batch looks through for pairs sharing its prefixes.
GROUP_LOOKAHEAD = 4096


@dataclass(eq=False)
class _Request:
    """One submit() call: its pairs, its future and the results gathered so far."""

    future: asyncio.Future[list[ScoreOutcome]]
    results: list[ScoreOutcome | None]
    pairs: int  # all its pairs
    remaining: int  # pairs not scored yet
    queued: int  # pairs still in the queue
    queued_tokens: int  # their tokens
    deadline: float | None = None  # time.monotonic() after which the caller no longer waits
    dropped: bool = False  # finished early (failed/cancelled): its pairs are dead and counted

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def group_key(prepared: PreparedPair) -> tuple[int, ...] | None:
    """The token ids a pair is grouped by: its first GROUP_PREFIX_TOKENS, when its
    prefix and prompt are at least that long (else None: it is taken in order)."""
    if 1 + prepared.prompt_tokens < GROUP_PREFIX_TOKENS:
        return None
    return prepared.input_ids[:GROUP_PREFIX_TOKENS]


@dataclass(eq=False)
class _Item:
    """One queued pair and where its result goes."""

    request: _Request
    index: int
    prepared: PreparedPair
    enqueued_at: float = field(default_factory=time.monotonic)
    key: tuple[int, ...] | None = None  # group_key(prepared)


def _all_left(batch: Sequence[_Item]) -> bool:
    """Whether no caller of ``batch`` waits any more (polled by the engine, on the model thread)."""
    return all(item.request.future.done() for item in batch)


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
        self._worker = ModelWorker(engine, metrics)
        self._executor = executor
        self._max_batch_pairs = max_batch_pairs
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._admission = Admission(max_queue_tokens, metrics)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_keys: collections.Counter[tuple[int, ...]] = collections.Counter()  # of queued pairs
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._collecting: list[_Item] = []  # the batch being gathered (popped from the queue)
        self._in_flight: list[_Item] = []  # the batch the model is scoring now
        self._forward_started: float | None = None
        self._stalled = False

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
        return self._stalled

    @property
    def busy_seconds(self) -> float:
        """How long the forward pass now running has taken so far (0 when idle)."""
        started = self._forward_started
        return 0.0 if started is None else time.monotonic() - started

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
            stalled_s=self.busy_seconds if self._stalled else None,
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
        request = _Request(
            future=loop.create_future(),
            results=[None] * n,
            pairs=n,
            remaining=n,
            queued=n,
            queued_tokens=tokens,
            deadline=deadline,
        )
        items = [
            _Item(request=request, index=i, prepared=p, enqueued_at=now, key=group_key(p))
            for i, p in enumerate(prepared)
        ]
        self._queue.extend(items)
        self._queued_keys.update(item.key for item in items if item.key is not None)
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
        if self._stalled:
            return
        self._stalled = True
        exc = WorkerUnavailableError(reason)
        self._fail_in_flight(exc, DROP_WORKER)
        self._fail_pending(exc, DROP_WORKER)

    # --- internals -------------------------------------------------------------------

    def _queue_changed(self) -> None:
        self._admission.publish()

    def _drop(self, request: _Request, reason: str) -> None:
        """Mark a request that finished early (failed, cancelled, expired): its pairs are dead.

        All its pairs count as dropped for ``reason``, once, wherever they
        are. Dead pairs stay in the deque (removing them would cost O(queue)
        per request) and are skipped when they reach its head; results of
        ones in the model are thrown away.
        """
        if not request.dropped:
            request.dropped = True
            self._admission.queued(-request.queued, -request.queued_tokens)
            self._count("dropped", reason, request.pairs)
            self._queue_changed()

    def _expire(self, request: _Request) -> None:
        """Fail a request whose deadline passed; its queued pairs never reach the model."""
        if not request.future.done():
            request.future.set_exception(
                DeadlineExceededError("the deadline passed while the pairs were queued")
            )
        self._drop(request, DROP_DEADLINE)

    def _popleft(self, position: int = 0) -> _Item:
        """Take the queued pair at ``position`` (the oldest by default) out of the queue."""
        if position:
            item = self._queue[position]
            del self._queue[position]
        else:
            item = self._queue.popleft()
        if item.key is not None:
            self._queued_keys[item.key] -= 1
            if not self._queued_keys[item.key]:
                del self._queued_keys[item.key]
        request = item.request
        request.queued -= 1
        request.queued_tokens -= item.prepared.work_tokens
        if not request.dropped:
            self._admission.queued(-1, -item.prepared.work_tokens)
        return item

    def _usable(self, item: _Item, now: float) -> bool:
        """Whether a just-popped pair should be scored; expires its request if overdue."""
        request = item.request
        if request.future.done():
            return False
        if request.expired(now):
            self._expire(request)
            return False
        return True

    def _pop_live(self) -> _Item | None:
        """Pop the oldest queued pair whose request still waits, or None."""
        now = time.monotonic()
        while self._queue:
            item = self._popleft()
            if self._usable(item, now):
                return item
        return None

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

    async def _collect(self) -> list[_Item]:
        """Wait for the first pair, then gather a batch under the limits."""
        while True:
            first = self._pop_live()
            if first is not None:
                break
            self._queue_changed()
            if self._closing:
                return []
            await self._wait_for_work(None)
        self._collecting = batch = [first]
        longest = first.prepared.num_tokens
        budget = self._engine.max_call_tokens
        deadline = first.enqueued_at + self._max_wait_s
        keys = {first.key} if first.key is not None else set()
        searched: set[tuple[int, ...]] = set()  # keys with no mate in the lookahead
        while len(batch) < self._max_batch_pairs:
            if not self._queue:
                remaining = deadline - time.monotonic()
                if self._closing or remaining <= 0:
                    break
                if not await self._wait_for_work(remaining):
                    break
                searched.clear()  # new pairs came
                continue
            position = self._find_mate(keys - searched)
            if not position and self._queue[0].key not in keys:
                searched |= keys
            nxt = self._queue[position]
            if nxt.request.future.done() or nxt.request.expired(time.monotonic()):
                self._usable(self._popleft(position), time.monotonic())
                continue
            new_longest = max(longest, nxt.prepared.num_tokens)
            if new_longest * (len(batch) + 1) > budget:
                break
            self._popleft(position)
            batch.append(nxt)
            if nxt.key is not None:
                keys.add(nxt.key)
            longest = new_longest
        self._queue_changed()
        self._collecting = []
        return batch

    def _find_mate(self, keys: set[tuple[int, ...]]) -> int:
        """Position in the queue of the first pair (among the next GROUP_LOOKAHEAD) that
        shares a group key with the batch; 0 (the oldest) when none does."""
        if not keys or not any(key in self._queued_keys for key in keys):
            return 0
        for position, item in enumerate(itertools.islice(self._queue, GROUP_LOOKAHEAD)):
            if item.key in keys:
                return position
        return 0

    def _live_batch(self, batch: list[_Item]) -> list[_Item]:
        """The batch without pairs whose caller left or whose deadline passed meanwhile."""
        now = time.monotonic()
        live = []
        for item in batch:
            request = item.request
            if not request.future.done() and request.expired(now):
                self._expire(request)
            if request.future.done():
                continue
            live.append(item)
        return live

    async def _run_batch(self, batch: list[_Item]) -> None:
        """Score one batch and hand results (or the failure) to its requests."""
        self._in_flight = batch
        batch = self._live_batch(batch)
        if not batch:
            self._in_flight = []
            return
        prepared = [item.prepared for item in batch]
        tokens = sum(p.work_tokens for p in prepared)
        loop = asyncio.get_running_loop()
        self._in_flight, self._admission.in_flight_tokens = batch, tokens
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
            failed = {id(item.request): item.request for item in batch}
            for request in failed.values():
                if not request.future.done():
                    err = BatchFailedError(f"scoring failed: {short_reason(exc)}")
                    err.__cause__ = exc
                    request.future.set_exception(err)
                self._drop(request, DROP_FAILED)
            return
        finally:
            if self._stalled:
                log.warning(
                    "the model worker answered again after %.0f s; taking work again",
                    self.busy_seconds,
                )
                self._stalled = False
            self._in_flight, self._admission.in_flight_tokens = [], 0
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
            request = item.request
            if request.future.done():  # cancelled (or abandoned) while its batch ran
                continue
            request.results[item.index] = outcome
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)  # type: ignore[arg-type]

    async def _loop(self) -> None:
        try:
            while True:
                batch = await self._collect()
                if not batch:  # closing and nothing left
                    return
                await self._run_batch(batch)
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
        for item in (*self._collecting, *self._in_flight):
            request = item.request
            if not request.future.done():
                request.future.set_exception(exc)
            self._drop(request, reason)

    def _fail_pending(self, exc: Exception, reason: str) -> None:
        """Fail every request that still has pairs queued, and empty the queue."""
        for item in self._queue:
            request = item.request
            if not request.dropped:
                if not request.future.done():
                    request.future.set_exception(exc)
                self._drop(request, reason)
        while self._queue:
            self._popleft()
        self._queue_changed()
