"""Dynamic batching: pairs from concurrent requests share forward passes.

One asyncio task collects queued pairs into a batch and hands it to the
engine on a single-thread executor, so the event loop never runs model code
and the (not thread-safe) engine is only ever used from one thread.

A batch closes when the next queued pair would push its padded size
(longest pair x number of pairs) over ``engine.max_batch_tokens``, when it
holds ``max_batch_pairs`` pairs, or when its oldest pair has waited
``max_wait_s``. Pairs are taken in arrival order. A request may span several
batches; it completes when its last pair is scored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pairscore.types import PairScore

if TYPE_CHECKING:
    from pairscore_server.engine import PreparedPair, ScoringEngine
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """The batcher is stopping or stopped and takes no new work."""


class BatchFailedError(RuntimeError):
    """The forward pass of a batch that held some of this request's pairs failed."""


@dataclass(eq=False)
class _Request:
    """One submit() call: its pairs, its future and the results gathered so far."""

    future: asyncio.Future[list[PairScore]]
    results: list[PairScore | None]
    remaining: int  # pairs not scored yet
    queued: int  # pairs still in the queue
    dropped: bool = False  # finished early (failed/cancelled): its queued pairs are dead


@dataclass(eq=False)
class _Item:
    """One queued pair and where its result goes."""

    request: _Request
    index: int
    prepared: PreparedPair
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Collects pairs from concurrent callers into batches for one engine.

    Create it, call :meth:`start` inside the running event loop, then
    ``await submit(prepared)`` from any number of tasks. :meth:`stop` refuses
    new work, finishes what is queued and ends the loop.
    """

    def __init__(
        self,
        engine: ScoringEngine,
        executor: Executor,
        *,
        max_batch_pairs: int,
        max_wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_pairs < 1:
            raise ValueError(f"max_batch_pairs must be >= 1, got {max_batch_pairs}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._engine = engine
        self._executor = executor
        self._max_batch_pairs = max_batch_pairs
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._live = 0  # queued pairs whose request still waits
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # --- public API ----------------------------------------------------------------

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a batch (not counting the batch being scored)."""
        return self._live

    @property
    def running(self) -> bool:
        """Whether the batching loop is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the batching loop in the running event loop."""
        if self._task is not None:
            raise RuntimeError("the batcher was already started")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pairscore-batcher")

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued, then end the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):  # a crashed loop already logged why
                await asyncio.shield(self._task)

    async def submit(self, prepared: Sequence[PreparedPair]) -> list[PairScore]:
        """Score ``prepared`` pairs, batched with other callers' pairs.

        Returns one PairScore per pair, in order. Raises
        :class:`BatchFailedError` when a batch holding any of these pairs
        failed, :class:`BatcherClosedError` when the batcher is stopping. If
        the caller is cancelled, its pairs that are not yet being scored
        are dropped from the queue.
        """
        if self._closing or not self.running:
            raise BatcherClosedError("the server is shutting down and takes no new work")
        if not prepared:
            return []
        loop = asyncio.get_running_loop()
        n = len(prepared)
        request = _Request(future=loop.create_future(), results=[None] * n, remaining=n, queued=n)
        now = time.monotonic()
        self._queue.extend(
            _Item(request=request, index=i, prepared=p, enqueued_at=now)
            for i, p in enumerate(prepared)
        )
        self._live += n
        self._queue_changed()
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.future.cancel()
            self._drop(request)
            raise

    # --- internals -------------------------------------------------------------------

    def _queue_changed(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_pairs.set(self._live)

    def _drop(self, request: _Request) -> None:
        """Mark a request that finished early (failed or cancelled): its queued pairs are dead.

        Dead pairs stay in the deque (removing them would cost O(queue) per
        request) and are skipped when they reach its head.
        """
        if not request.dropped:
            request.dropped = True
            self._live -= request.queued
            self._queue_changed()

    def _popleft(self) -> _Item:
        item = self._queue.popleft()
        item.request.queued -= 1
        if not item.request.dropped:
            self._live -= 1
        return item

    def _pop_live(self) -> _Item | None:
        """Pop the oldest queued pair whose request still waits, or None."""
        while self._queue:
            item = self._popleft()
            if not item.request.future.done():
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
        batch = [first]
        longest = first.prepared.num_tokens
        budget = self._engine.max_batch_tokens
        deadline = first.enqueued_at + self._max_wait_s
        while len(batch) < self._max_batch_pairs:
            if not self._queue:
                remaining = deadline - time.monotonic()
                if self._closing or remaining <= 0:
                    break
                if not await self._wait_for_work(remaining):
                    break
                continue
            nxt = self._queue[0]
            if nxt.request.future.done():
                self._popleft()
                continue
            new_longest = max(longest, nxt.prepared.num_tokens)
            if new_longest * (len(batch) + 1) > budget:
                break
            self._popleft()
            batch.append(nxt)
            longest = new_longest
        self._queue_changed()
        return batch

    def _forward(self, prepared: list[PreparedPair]) -> tuple[list[PairScore], float]:
        """Runs on the model thread: one engine.score call, timed."""
        started = time.perf_counter()
        scores = self._engine.score(prepared)
        return list(scores), time.perf_counter() - started

    async def _run_batch(self, batch: list[_Item]) -> None:
        """Score one batch and hand results (or the failure) to its requests."""
        batch = [item for item in batch if not item.request.future.done()]
        if not batch:
            return
        prepared = [item.prepared for item in batch]
        loop = asyncio.get_running_loop()
        try:
            scores, seconds = await loop.run_in_executor(self._executor, self._forward, prepared)
            if len(scores) != len(prepared):
                raise RuntimeError(
                    f"engine returned {len(scores)} scores for a batch of {len(prepared)} pairs"
                )
        except Exception as exc:  # the whole batch failed: fail exactly its requests
            log.error("a batch of %d pairs failed: %s", len(batch), exc, exc_info=exc)
            failed = {id(item.request): item.request for item in batch}
            for request in failed.values():
                if not request.future.done():
                    err = BatchFailedError(f"scoring failed: {type(exc).__name__}: {exc}")
                    err.__cause__ = exc
                    request.future.set_exception(err)
                self._drop(request)
            return
        if self._metrics is not None:
            longest = max(p.num_tokens for p in prepared)
            self._metrics.observe_batch(
                pairs=len(prepared), padded_tokens=longest * len(prepared), seconds=seconds
            )
        for item, score in zip(batch, scores, strict=True):
            request = item.request
            if request.future.done():  # cancelled while its batch ran
                continue
            request.results[item.index] = score
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
            self._fail_pending(BatcherClosedError("the batcher was cancelled"))
            raise
        except Exception as exc:  # a bug in the loop itself: fail everyone, don't hang them
            log.critical("the batching loop crashed", exc_info=exc)
            self._fail_pending(BatcherClosedError(f"the batching loop crashed: {exc}"))
            raise
        finally:
            self._closing = True

    def _fail_pending(self, exc: Exception) -> None:
        while self._queue:
            future = self._popleft().request.future
            if not future.done():
                future.set_exception(exc)
        self._queue_changed()
