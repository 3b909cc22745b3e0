"""The asyncio driver of :meth:`AsyncScoringClient.score_iter <pairscore.aio.AsyncScoringClient.score_iter>`.

The same decisions as :mod:`pairscore._stream_sync`
(:class:`~pairscore._stream_base.DriverBase`) with tasks instead of threads:
one task per lane reads the answers, grpc.aio pulls the lane's requests from
:meth:`AioDriver._requests`, and the caller's coroutine takes results in
order. The input may be a sync or an async iterable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc

from pairscore._reconnect import lane_error, unanswered_error
from pairscore._sequencer import Batch, Lane
from pairscore._stream_base import STOP, WAIT, DriverBase
from pairscore.errors import ScoringError
from pairscore.inputs import PairLike, to_pair
from pairscore.types import Pair, ScoreOutcome


class AioDriver(DriverBase):
    """Score ``pairs`` over ``settings.streams`` ScoreStream calls; :meth:`results` in input order."""

    def __init__(self, *, pairs: Iterable[PairLike] | AsyncIterable[PairLike], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._async_input = aiter(pairs) if isinstance(pairs, AsyncIterable) else None
        self._sync_input = None if self._async_input is not None else iter(pairs)  # type: ignore[arg-type]
        self._cond = asyncio.Condition()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def results(self) -> AsyncIterator[ScoreOutcome]:
        """The outcomes, in input order; leaving early cancels the streams."""
        for i in range(self._settings.streams):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"pairscore-stream-{i}"))
        try:
            while True:
                async with self._cond:
                    while not (ready := self.take()):
                        if ready is None:
                            return
                        await self._wait(self.poll_s)
                        self.cancel_stalled()
                    self._cond.notify_all()
                for outcome in ready:
                    yield outcome
        finally:
            await self._close()

    async def _wait(self, timeout: float | None) -> None:
        """Wait (lock held) for a notify or ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._cond.wait(), timeout)

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
                while (step := self.claim(lane, self._closing.is_set())) == WAIT:
                    await self._wait(seq.next_retry_in())
            if step == STOP:
                return
            batch = step if isinstance(step, Batch) else None
            if batch is None:  # READ: this lane reads the next batch of input
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
            yield self.request(batch)

    async def _worker(self) -> None:
        reconnect = self.reconnector()
        while not self._closing.is_set():
            async with self._cond:
                lane = self.open_lane(self._requests)
            if lane is None:
                return
            try:
                async for response in lane.call:
                    async with self._cond:
                        self.answered(lane, response)
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
                self.broken(lane)
                self._cond.notify_all()
            if self._closing.is_set():
                return
            delay = self.retry_delay(reconnect, error)
            if delay is None:
                async with self._cond:
                    self.give_up(reconnect, error)
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
