"""The asyncio driver of :meth:`AsyncScoringClient.score_iter <pairscore.aio.AsyncScoringClient.score_iter>`.

The same shape as :mod:`pairscore._stream_sync` with tasks instead of
threads: one task per lane reads the answers, grpc.aio pulls the lane's
requests from :meth:`_AioDriver._requests`, and the caller's coroutine takes
results in order. Bookkeeping: :mod:`pairscore._sequencer`; reconnect rule:
:mod:`pairscore._reconnect`. The input may be a sync or an async iterable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from pairscore._base import ClientCore, IterSettings
from pairscore._reconnect import Reconnector, item_retry_delays, lane_error, unanswered_error
from pairscore._sequencer import Lane, Sequencer
from pairscore.errors import ScoringError
from pairscore.inputs import PairLike, to_pair
from pairscore.types import Pair, ScoreOptions, ScoreOutcome

_POLL_S = 0.5


class _AioDriver:
    def __init__(
        self,
        *,
        open_call: Callable[..., Any],
        core: ClientCore,
        pairs: Iterable[PairLike] | AsyncIterable[PairLike],
        options: ScoreOptions,
        settings: IterSettings,
    ) -> None:
        self._open_call = open_call
        self._core = core
        self._async_input = aiter(pairs) if isinstance(pairs, AsyncIterable) else None
        self._sync_input = None if self._async_input is not None else iter(pairs)  # type: ignore[arg-type]
        self._options = options
        self._settings = settings
        self._seq = Sequencer(
            batch_size=settings.batch_size,
            max_in_flight=settings.max_in_flight,
            item_retry_delay=item_retry_delays(core.settings.retry),
        )
        self._cond = asyncio.Condition()
        self._closing = asyncio.Event()
        self._lanes: list[Lane] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def results(self) -> AsyncIterator[ScoreOutcome]:
        for i in range(self._settings.streams):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"pairscore-stream-{i}"))
        timeout = self._settings.progress_timeout
        poll = _POLL_S if timeout is None else min(_POLL_S, timeout / 4)
        try:
            while True:
                async with self._cond:
                    while True:
                        ready = self._seq.pop_ready()
                        if ready:
                            self._cond.notify_all()
                            break
                        if self._seq.error is not None:
                            raise self._seq.error
                        if self._seq.finished:
                            return
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._cond.wait(), poll)
                        for lane in self._seq.stalled_lanes(self._lanes, timeout):
                            lane.call.cancel()
                for outcome in ready:
                    yield outcome
        finally:
            await self._close()

    async def _close(self) -> None:
        self._closing.set()
        for lane in self._lanes:
            if lane.call is not None:
                lane.call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read_batch(self) -> list[Pair]:
        size = self._settings.batch_size
        pairs: list[Pair] = []
        if self._async_input is not None:
            while len(pairs) < size:
                try:
                    pairs.append(to_pair(await anext(self._async_input)))
                except StopAsyncIteration:
                    break
        else:
            assert self._sync_input is not None
            for item in self._sync_input:
                pairs.append(to_pair(item))
                if len(pairs) == size:
                    break
        return pairs

    async def _requests(self, lane: Lane) -> AsyncIterator[Any]:
        seq = self._seq
        while True:
            async with self._cond:
                while True:
                    if lane.dead or self._closing.is_set() or seq.lane_may_close():
                        return
                    batch = seq.take_retry(lane)
                    if batch is not None or seq.wants_input():
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), seq.next_retry_in())
                if batch is None:
                    seq.begin_read()
            if batch is None:
                try:
                    pairs = await self._read_batch()
                except Exception as exc:  # noqa: BLE001 - handed to the caller's coroutine
                    async with self._cond:
                        seq.read_failed(exc)
                        self._cond.notify_all()
                    return
                async with self._cond:
                    batch = seq.end_read(pairs, lane)
                    self._cond.notify_all()
                if batch is None:
                    continue
            yield self._core.request(batch.to_send(), self._options)

    async def _worker(self) -> None:
        reconnect = Reconnector(self._core.settings.retry, connect_timeout=self._settings.progress_timeout)
        while not self._closing.is_set():
            lane = Lane()
            async with self._cond:
                if self._seq.lane_may_close():
                    return
                self._lanes.append(lane)
                lane.call = self._open_call(self._requests(lane), **self._core.stream_kwargs())
            try:
                async for response in lane.call:
                    async with self._cond:
                        outcomes = self._core.outcomes(response, self._seq.expected(lane))
                        self._seq.answered(lane, outcomes)
                        self._cond.notify_all()
                    reconnect.progress()
                if not lane.outstanding:
                    return
                error = unanswered_error(lane)
            except grpc.RpcError as exc:
                error = lane_error(exc, lane, secure=self._core.settings.secure)
            except ScoringError as exc:
                error = exc
            except asyncio.CancelledError:
                if self._closing.is_set():
                    return
                error = lane_error(_Cancelled(), lane)  # grpc.aio raises CancelledError on cancel()
            async with self._cond:
                self._seq.lane_broken(lane)
                self._lanes.remove(lane)
                self._cond.notify_all()
            if self._closing.is_set():
                return
            delay = reconnect.next_delay(error)
            if delay is not None and self._settings.on_retry is not None:
                self._settings.on_retry(error, delay)  # e.g. "waiting for the server" on a progress line
            if delay is None:
                async with self._cond:
                    self._seq.fail(reconnect.final_error(error))
                    self._cond.notify_all()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)


class _Cancelled(grpc.RpcError):
    """Stands for a lane call that was cancelled (grpc.aio reports it as CancelledError)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "the stream was cancelled"


def iterate(
    *,
    open_call: Callable[..., Any],
    core: ClientCore,
    pairs: Iterable[PairLike] | AsyncIterable[PairLike],
    options: ScoreOptions,
    settings: IterSettings,
) -> AsyncIterator[ScoreOutcome]:
    """Score ``pairs`` over ``settings.streams`` ScoreStream calls; results in input order."""
    driver = _AioDriver(open_call=open_call, core=core, pairs=pairs, options=options, settings=settings)
    return driver.results()
