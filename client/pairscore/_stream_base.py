"""What both ``score_iter`` drivers decide alike; they differ only in how they wait.

:class:`DriverBase` holds a run's state (the :class:`~pairscore._sequencer.Sequencer`,
the open lanes) and every decision the threaded driver
(:mod:`pairscore._stream_sync`) and the asyncio one (:mod:`pairscore._stream_aio`)
take the same way. Its methods that touch the Sequencer are called with the
driver's lock held (a ``threading.Condition`` or an ``asyncio.Condition``); waiting,
reading the input and notifying are the drivers' own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pairscore._base import ClientCore, IterSettings
from pairscore._reconnect import Reconnector, item_retry_delays
from pairscore._sequencer import Batch, Lane, Sequencer
from pairscore.errors import ScoringError
from pairscore.types import ScoreOptions, ScoreOutcome
from pairscore.v1 import scoring_pb2 as pb

#: Longest the consumer sleeps between checks for stalled lanes.
POLL_S = 0.5

#: :meth:`DriverBase.claim`: the lane's request stream ends.
STOP = "stop"
#: :meth:`DriverBase.claim`: read the next batch of input (``begin_read`` is done).
READ = "read"
#: :meth:`DriverBase.claim`: nothing to send yet; wait for a notify or ``next_retry_in``.
WAIT = "wait"


class DriverBase:
    """A ``score_iter`` run: ``open_call`` opens a ScoreStream call (sync or grpc.aio)."""

    def __init__(
        self,
        *,
        open_call: Callable[..., Any],
        core: ClientCore,
        options: ScoreOptions,
        settings: IterSettings,
    ) -> None:
        self._open_call = open_call
        self._core = core
        self._options = options
        self._settings = settings
        self._seq = Sequencer(
            batch_size=settings.batch_size,
            max_in_flight=settings.max_in_flight,
            item_retry_delay=item_retry_delays(core.settings.retry),
        )
        self._lanes: list[Lane] = []

    @property
    def poll_s(self) -> float:
        """How long the consumer waits before looking for stalled lanes again."""
        timeout = self._settings.progress_timeout
        return POLL_S if timeout is None else min(POLL_S, timeout / 4)

    def reconnector(self) -> Reconnector:
        """A lane worker's reconnect rule."""
        return Reconnector(self._core.settings.retry, connect_timeout=self._settings.progress_timeout)

    # --- under the lock ---------------------------------------------------------------

    def take(self) -> list[ScoreOutcome] | None:
        """The results ready in input order ([]: none yet; then wait and :meth:`cancel_stalled`),
        or None when every pair is answered; raises the run's error."""
        ready = self._seq.pop_ready()
        if ready:
            return ready
        if self._seq.error is not None:
            raise self._seq.error
        return None if self._seq.finished else []

    def cancel_stalled(self) -> None:
        """Cancel the lanes that got no answer within the progress deadline."""
        for lane in self._seq.stalled_lanes(self._lanes, self._settings.progress_timeout):
            lane.call.cancel()

    def claim(self, lane: Lane, closing: bool) -> Batch | str:
        """What ``lane``'s request stream does next: resend a batch, :data:`READ`,
        :data:`STOP` or :data:`WAIT`."""
        seq = self._seq
        if lane.dead or closing or seq.lane_may_close():
            return STOP
        batch = seq.take_retry(lane)
        if batch is not None:
            return batch
        if seq.wants_input():
            seq.begin_read()
            return READ
        return WAIT

    def request(self, batch: Batch) -> pb.ScoreRequest:
        """The ScoreStream message for ``batch``."""
        return self._core.request(batch.to_send(), self._options)

    def open_lane(self, requests: Callable[[Lane], Any]) -> Lane | None:
        """A new lane with its call open (None: no lane is needed any more)."""
        if self._seq.lane_may_close():
            return None
        lane = Lane()
        self._lanes.append(lane)
        lane.call = self._open_call(requests(lane), **self._core.stream_kwargs())
        return lane

    def answered(self, lane: Lane, response: pb.ScoreResponse) -> None:
        """Book an answer of ``lane`` (ScoringError when it does not fit what was sent)."""
        self._seq.answered(lane, self._core.outcomes(response, self._seq.expected(lane)))

    def broken(self, lane: Lane) -> None:
        """``lane`` ended or failed: its unanswered batches go back to be resent."""
        self._seq.lane_broken(lane)
        self._lanes.remove(lane)

    # --- outside the lock ---------------------------------------------------------------

    def retry_delay(self, reconnect: Reconnector, error: ScoringError) -> float | None:
        """How long to wait before reopening a lane broken by ``error`` (``on_retry`` is told),
        or None to give up (then :meth:`give_up` under the lock)."""
        delay = reconnect.next_delay(error)
        if delay is not None and self._settings.on_retry is not None:
            self._settings.on_retry(error, delay)  # e.g. "waiting for the server" on a progress line
        return delay

    def give_up(self, reconnect: Reconnector, error: ScoringError) -> None:
        """Fail the run (under the lock) with the error that made the last lane give up."""
        self._seq.fail(reconnect.final_error(error))
