"""The threaded driver of :meth:`ScoringClient.score_iter <pairscore.client.ScoringClient.score_iter>`.

One worker thread per lane (ScoreStream call) reads the answers; gRPC's own
thread pulls the lane's requests from :meth:`SyncDriver._requests`. The
caller's thread takes results in order. The decisions are
:class:`~pairscore._stream_base.DriverBase`'s (shared with the asyncio driver),
the bookkeeping :mod:`pairscore._sequencer`'s, the reconnect rule
:mod:`pairscore._reconnect`'s; this module only waits, with threads.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from pairscore._reconnect import lane_error, unanswered_error
from pairscore._sequencer import Batch, Lane
from pairscore._stream_base import STOP, WAIT, DriverBase
from pairscore.errors import ScoringError
from pairscore.inputs import PairLike, to_pair
from pairscore.types import ScoreOutcome


class SyncDriver(DriverBase):
    """Score ``pairs`` over ``settings.streams`` ScoreStream calls; :meth:`results` in input order."""

    def __init__(self, *, pairs: Iterable[PairLike], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._input = iter(pairs)
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- the caller's side ----------------------------------------------------------

    def results(self) -> Iterator[ScoreOutcome]:
        """The outcomes, in input order; leaving early cancels the streams."""
        for i in range(self._settings.streams):
            thread = threading.Thread(target=self._worker, name=f"pairscore-stream-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()
        try:
            while True:
                with self._cond:
                    while not (ready := self.take()):
                        if ready is None:
                            return
                        self._cond.wait(self.poll_s)
                        self.cancel_stalled()
                    self._cond.notify_all()  # room in flight again
                yield from ready
        finally:
            self._close()

    def _close(self) -> None:
        self._closing.set()
        with self._cond:
            for lane in self._lanes:
                if lane.call is not None:
                    lane.call.cancel()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    # --- a lane's requests (pulled by gRPC's thread) -------------------------------

    def _requests(self, lane: Lane) -> Iterator[Any]:
        seq, size = self._seq, self._settings.batch_size
        while True:
            with self._cond:
                while (step := self.claim(lane, self._closing.is_set())) == WAIT:
                    self._cond.wait(seq.next_retry_in())
            if step == STOP:
                return
            batch = step if isinstance(step, Batch) else None
            if batch is None:  # READ: this lane reads the next batch of input
                try:
                    pairs = [to_pair(p) for p in itertools.islice(self._input, size)]
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    with self._cond:
                        seq.read_failed(exc)
                        self._cond.notify_all()
                    return
                with self._cond:
                    batch = seq.end_read(pairs, lane)
                    self._cond.notify_all()
                if batch is None:
                    continue
            yield self.request(batch)

    # --- a lane's answers ---------------------------------------------------------

    def _worker(self) -> None:
        reconnect = self.reconnector()
        while not self._closing.is_set():
            with self._cond:
                lane = self.open_lane(self._requests)
            if lane is None:
                return
            try:
                for response in lane.call:
                    with self._cond:
                        self.answered(lane, response)
                        self._cond.notify_all()
                    reconnect.progress()
                if not lane.outstanding:
                    return  # the request stream ended: all input read and answered
                error = unanswered_error(lane)
            except grpc.RpcError as exc:
                error = lane_error(exc, lane, secure=self._core.settings.secure)
            except ScoringError as exc:  # an answer that does not fit the request
                error = exc
            with self._cond:
                self.broken(lane)
                self._cond.notify_all()
            if self._closing.is_set():
                return
            delay = self.retry_delay(reconnect, error)
            if delay is None:
                with self._cond:
                    self.give_up(reconnect, error)
                    self._cond.notify_all()
                return
            self._closing.wait(delay)
