"""The scoring service in plain Python: what the gRPC servicer calls.

It ties the engine (tokenization) to the batcher (forward passes) and puts
per-item errors back in request order. It knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    ScoreOptions,
    ScoreOutcome,
)
from pairscore_server.batcher import Batcher, BatchFailedError

if TYPE_CHECKING:
    from pairscore_server.engine import PreparedPair, ScoringEngine
    from pairscore_server.metrics import Metrics

log = logging.getLogger(__name__)

#: Requests with more pairs than this are tokenized on a worker thread
#: instead of on the event loop.
DEFAULT_INLINE_PREPARE_PAIRS = 16


class ScoringService:
    """Scores pairs: tokenize, queue for batching, merge per-item errors in order.

    ``prepare_executor`` runs tokenization of large requests off the event
    loop (the engine's ``prepare`` is thread-safe); ``None`` uses the loop's
    default executor.
    """

    def __init__(
        self,
        *,
        engine: ScoringEngine,
        batcher: Batcher,
        metrics: Metrics | None = None,
        prepare_executor: Executor | None = None,
        inline_prepare_pairs: int = DEFAULT_INLINE_PREPARE_PAIRS,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._metrics = metrics
        self._prepare_executor = prepare_executor
        self._inline_prepare_pairs = inline_prepare_pairs
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        """The served model's description (read once from the engine, then cached)."""
        if self._info is None:
            self._info = self._engine.info
        return self._info

    async def score(
        self,
        pairs: Sequence[Pair],
        options: ScoreOptions,
        *,
        batch_errors_as_items: bool = False,
    ) -> list[ScoreOutcome]:
        """Score ``pairs``; one PairScore or ItemError per pair, in order.

        Items the engine rejects (too long, invalid) come back as ItemError.
        When a forward pass holding some of these pairs fails, this raises
        :class:`~pairscore_server.batcher.BatchFailedError`, or, with
        ``batch_errors_as_items=True``, returns ``INTERNAL`` item errors for
        the pairs that were not already rejected.
        """
        if not pairs:
            return []
        prepared = await self._prepare(pairs, options)
        ready = [p for p in prepared if not isinstance(p, ItemError)]
        scores: Iterator[ScoreOutcome]
        try:
            scores = iter(await self._batcher.submit(ready) if ready else [])
        except BatchFailedError as exc:
            if not batch_errors_as_items:
                raise
            failure = ItemError(code=ItemErrorCode.INTERNAL, message=str(exc))
            scores = iter([failure] * len(ready))
        outcomes: list[ScoreOutcome] = []
        for pair, item in zip(pairs, prepared, strict=True):
            outcome = item if isinstance(item, ItemError) else next(scores)
            if outcome.id != pair.id:
                outcome = dataclasses.replace(outcome, id=pair.id)
            outcomes.append(outcome)
        if self._metrics is not None:
            self._metrics.observe_outcomes(outcomes)
        return outcomes

    async def _prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions
    ) -> list[PreparedPair | ItemError]:
        if len(pairs) <= self._inline_prepare_pairs:
            prepared = self._engine.prepare(pairs, options)
        else:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self._prepare_executor, self._engine.prepare, pairs, options
            )
        if len(prepared) != len(pairs):
            raise RuntimeError(f"engine prepared {len(prepared)} items for {len(pairs)} pairs")
        return list(prepared)
