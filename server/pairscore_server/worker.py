"""The model thread's side of batching: one batch through the engine, split on out-of-memory.

The :class:`~pairscore_server.batcher.Batcher` runs :meth:`ModelWorker.run`
on its single model thread. When ``engine.score`` runs out of (accelerator)
memory, the batch is split in halves and each half retried, down to single
pairs; only a pair that does not fit alone fails, with an
``ITEM_ERROR_CODE_RESOURCE_EXHAUSTED`` item error. Splits are counted in
``pairscore_oom_splits_total``. Any other exception propagates: it fails the
batch's requests.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pairscore.types import ItemError, ItemErrorCode, ScoreOutcome
from pairscore_server.engine.interface import Cancelled, Engine, ForwardStats, ScoredBatch
from pairscore_server.engine.memory import is_out_of_memory, release_memory
from pairscore_server.engine.prepared import PreparedPair

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)

_MAX_REASON_CHARS = 300


def short_reason(exc: BaseException) -> str:
    """``Type: message`` on one line, cut to a length fit for logs and error messages."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


@dataclass(frozen=True)
class Forward:
    """One batch's trip through the model thread: its outcomes, what the engine measured
    (added up over the calls an out-of-memory split made) and the wall time."""

    outcomes: list[ScoreOutcome]
    stats: ForwardStats
    replica_seconds: tuple[float, ...]
    seconds: float


def _takes_cancelled(engine: Engine) -> bool:
    """Whether ``engine.score`` takes the ``cancelled`` keyword (older engines do not)."""
    try:
        parameters = inspect.signature(engine.score).parameters
    except (TypeError, ValueError):
        return False
    return "cancelled" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


class ModelWorker:
    """Runs batches through ``engine`` (from one thread at a time), splitting on out-of-memory."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._cancellable = _takes_cancelled(engine)

    def run(self, prepared: list[PreparedPair], cancelled: Cancelled | None = None) -> Forward:
        """Score the batch (splitting on out-of-memory), timed. Call it on the model thread.

        ``cancelled`` goes to ``engine.score``: when every caller of the batch has
        left, the engine stops at its next forward chunk (ScoreCancelled)."""
        started = time.perf_counter()
        measured: list[ScoredBatch] = []
        outcomes = self._score_splitting(prepared, measured, cancelled)
        seconds = time.perf_counter() - started
        stats = sum((m.stats for m in measured), ForwardStats())
        replicas = [0.0] * max((len(m.replica_seconds) for m in measured), default=0)
        for m in measured:
            for i, busy in enumerate(m.replica_seconds):
                replicas[i] += busy
        return Forward(outcomes, stats, tuple(replicas), seconds)

    def _score_splitting(
        self, prepared: list[PreparedPair], measured: list[ScoredBatch], cancelled: Cancelled | None
    ) -> list[ScoreOutcome]:
        """engine.score; on out-of-memory, score each half, down to single pairs."""
        try:
            if self._cancellable:
                scored = self._engine.score(prepared, cancelled=cancelled)
            else:  # an engine written before score() took ``cancelled``: it runs to the end
                scored = self._engine.score(prepared)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = short_reason(exc)
        else:
            if len(scored.scores) != len(prepared):
                raise RuntimeError(
                    f"engine returned {len(scored.scores)} scores for a batch of {len(prepared)} pairs"
                )
            measured.append(scored)
            return list(scored.scores)
        # The exception (and the traceback holding the failed pass's tensors) is gone here.
        release_memory()
        tokens = sum(p.num_tokens for p in prepared)
        if len(prepared) == 1:
            pair = prepared[0]
            log.warning("a pair of %d tokens does not fit in memory even alone", tokens)
            message = (
                f"out of memory scoring this pair ({tokens} tokens) even alone in its batch; "
                f"shorten it or retry later ({reason})"
            )
            return [ItemError(ItemErrorCode.RESOURCE_EXHAUSTED, message, pair.id)]
        log.warning(
            "out of memory on a batch of %d pairs (%d tokens); retrying it in two halves",
            len(prepared),
            tokens,
        )
        if self._metrics is not None:
            self._metrics.oom_splits.inc()
        mid = len(prepared) // 2
        return self._score_splitting(prepared[:mid], measured, cancelled) + self._score_splitting(
            prepared[mid:], measured, cancelled
        )
