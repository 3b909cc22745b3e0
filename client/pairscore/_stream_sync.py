"""The threaded driver of :meth:`ScoringClient.score_iter <pairscore.client.ScoringClient.score_iter>`.

One worker thread per lane (ScoreStream call) reads the answers; gRPC's own
thread pulls the lane's requests from :meth:`_SyncDriver._requests`. The
caller's thread takes results in order from the :class:`Sequencer`. All
bookkeeping lives in :mod:`pairscore._sequencer`; the reconnect rule in
:mod:`pairscore._reconnect`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from pairscore._base import ClientCore, IterSettings
from pairscore._reconnect import Reconnector, item_retry_delays, lane_error, unanswered_error
from pairscore._sequencer import Lane, Sequencer
from pairscore.errors import ScoringError
from pairscore.inputs import PairLike, to_pair
from pairscore.types import ScoreOptions, ScoreOutcome

#: Longest the consumer sleeps between checks for stalled lanes.
_POLL_S = 0.5


class _SyncDriver:
    def __init__(
        self,
        *,
        open_call: Callable[..., Any],
        core: ClientCore,
        pairs: Iterable[PairLike],
        options: ScoreOptions,
        settings: IterSettings,
    ) -> None:
        self._open_call = open_call
        self._core = core
        self._input = iter(pairs)
        self._options = options
        self._settings = settings
        self._seq = Sequencer(
            batch_size=settings.batch_size,
            max_in_flight=settings.max_in_flight,
            item_retry_delay=item_retry_delays(core.settings.retry),
        )
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._lanes: list[Lane] = []
        self._threads: list[threading.Thread] = []

    # --- the caller's side ----------------------------------------------------------

    def results(self) -> Iterator[ScoreOutcome]:
        for i in range(self._settings.streams):
            thread = threading.Thread(target=self._worker, name=f"pairscore-stream-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()
        timeout = self._settings.progress_timeout
        poll = _POLL_S if timeout is None else min(_POLL_S, timeout / 4)
        try:
            while True:
                with self._cond:
                    while True:
                        ready = self._seq.pop_ready()
                        if ready:
                            self._cond.notify_all()  # room in flight again
                            break
                        if self._seq.error is not None:
                            raise self._seq.error
                        if self._seq.finished:
                            return
                        self._cond.wait(poll)
                        for lane in self._seq.stalled_lanes(self._lanes, timeout):
                            lane.call.cancel()
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
                while True:
                    if lane.dead or self._closing.is_set() or seq.lane_may_close():
                        return
                    batch = seq.take_retry(lane)
                    if batch is not None or seq.wants_input():
                        break
                    self._cond.wait(seq.next_retry_in())
                if batch is None:
                    seq.begin_read()
            if batch is None:
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
            yield self._core.request(batch.to_send(), self._options)

    # --- a lane's answers ---------------------------------------------------------

    def _worker(self) -> None:
        reconnect = Reconnector(self._core.settings.retry, connect_timeout=self._settings.progress_timeout)
        while not self._closing.is_set():
            lane = Lane()
            with self._cond:
                if self._seq.lane_may_close():
                    return
                self._lanes.append(lane)
                lane.call = self._open_call(self._requests(lane), **self._core.stream_kwargs())
            try:
                for response in lane.call:
                    with self._cond:
                        outcomes = self._core.outcomes(response, self._seq.expected(lane))
                        self._seq.answered(lane, outcomes)
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
                self._seq.lane_broken(lane)
                self._lanes.remove(lane)
                self._cond.notify_all()
            if self._closing.is_set():
                return
            delay = reconnect.next_delay(error)
            if delay is not None and self._settings.on_retry is not None:
                self._settings.on_retry(error, delay)  # e.g. "waiting for the server" on a progress line
            if delay is None:
                with self._cond:
                    self._seq.fail(reconnect.final_error(error))
                    self._cond.notify_all()
                return
            self._closing.wait(delay)


def iterate(
    *,
    open_call: Callable[..., Any],
    core: ClientCore,
    pairs: Iterable[PairLike],
    options: ScoreOptions,
    settings: IterSettings,
) -> Iterator[ScoreOutcome]:
    """Score ``pairs`` over ``settings.streams`` ScoreStream calls; results in input order."""
    driver = _SyncDriver(open_call=open_call, core=core, pairs=pairs, options=options, settings=settings)
    return driver.results()
