"""Several model replicas (one per GPU) behind the one-engine interface.

The server's batcher keeps its single queue and single batching loop; each
call it makes is split across the replicas, which run their forward passes
at the same time on their own threads (torch releases the GIL in its
kernels). Pairs that share a prompt stay on one replica, so its key/value
cache still serves all of them, and the split balances tokens: the largest
groups go first, each to the least-loaded replica.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from pairscore.types import ChatMessage, ItemError, ModelInfo, Pair, PairScore, ScoreOptions, ScoreOutcome
from pairscore_server.engine.call_size import CallSize
from pairscore_server.engine.engine import ScoringEngine
from pairscore_server.engine.interface import Cancelled, Engine, ForwardStats, ScoredBatch, score_pairs
from pairscore_server.engine.prefix import Prefix
from pairscore_server.engine.prepared import PreparedPair
from pairscore_server.engine.tokenization import PairTokenizer
from pairscore_server.engine.tries import group_by_prompt


class ReplicatedEngine(Engine):
    """The :class:`~pairscore_server.engine.interface.Engine` over ``engines``, one per device."""

    def __init__(self, engines: Sequence[ScoringEngine]) -> None:
        if not engines:
            raise ValueError("ReplicatedEngine needs at least one engine")
        self.engines = list(engines)
        self._pool = ThreadPoolExecutor(len(self.engines), thread_name_prefix="pairscore-replica")

    # -- the one-engine interface -------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        first = self.engines[0].info
        return replace(first, device=",".join(str(e.device) for e in self.engines))

    @property
    def max_batch_tokens(self) -> int:
        return self.engines[0].max_batch_tokens

    @property
    def max_call_tokens(self) -> int:
        """All replicas' calls together, so one batcher call can keep each of them busy."""
        return sum(e.max_call_tokens for e in self.engines)

    def call_size(self) -> CallSize:
        """Shared runs counted as one replica shares them (the replicas are alike)."""
        return self.engines[0].call_size()

    @property
    def prefix(self) -> Prefix:
        return self.engines[0].prefix

    @property
    def pair_tokenizer(self) -> PairTokenizer:
        return self.engines[0].pair_tokenizer

    def prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, max_tokens: int | None = None
    ) -> list[PreparedPair | ItemError]:
        """Tokenization is the same on every replica: done once."""
        return self.engines[0].prepare(pairs, options, max_tokens=max_tokens)

    def tokenize(self, texts: Sequence[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """The first replica's tokenizer (every replica has the same)."""
        return self.engines[0].tokenize(texts, parse_special_tokens=parse_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The first replica's tokenizer (every replica has the same)."""
        return self.engines[0].token_texts(ids)

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """The first replica's chat template (every replica has the same)."""
        return self.engines[0].render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def chat_template(self) -> str:
        """The first replica's chat template's source."""
        return self.engines[0].chat_template()

    def split(self, prepared: Sequence[PreparedPair]) -> list[list[int]]:
        """Pair indices per replica: shared-prompt groups kept whole, tokens balanced."""
        groups = group_by_prompt([p.input_ids for p in prepared], [1 + p.prompt_tokens for p in prepared])
        load = [0] * len(self.engines)
        parts: list[list[int]] = [[] for _ in self.engines]
        cost = {key: sum(prepared[i].num_tokens for i in idx) for key, idx in groups.items()}
        for key in sorted(groups, key=lambda k: -cost[k]):
            target = load.index(min(load))
            parts[target].extend(groups[key])
            load[target] += cost[key]
        return parts

    def score(self, prepared: Sequence[PreparedPair], *, cancelled: Cancelled | None = None) -> ScoredBatch:
        """Score on all replicas at once; raises the first replica's failure, if any.

        The stats add up every replica's; ``replica_seconds`` holds each
        replica's own busy time (0 for one that got no pairs).
        """
        parts = self.split(prepared)
        futures: list[Future[ScoredBatch] | None] = [
            self._pool.submit(
                functools.partial(engine.score, cancelled=cancelled), [prepared[i] for i in idx]
            )
            if idx
            else None
            for engine, idx in zip(self.engines, parts, strict=True)
        ]
        results: list[PairScore | None] = [None] * len(prepared)
        seconds: list[float] = []
        stats = ForwardStats()
        for future, idx in zip(futures, parts, strict=True):
            if future is None:
                seconds.append(0.0)
                continue
            part = future.result()  # re-raises the replica's exception
            seconds.append(sum(part.replica_seconds))
            stats += part.stats
            for i, score in zip(idx, part.scores, strict=True):
                results[i] = score
        return ScoredBatch(results, stats, tuple(seconds))  # type: ignore[arg-type]

    def score_pairs(self, pairs: Sequence[Pair], options: ScoreOptions | None = None) -> list[ScoreOutcome]:
        """prepare + score in one call, for in-process use."""
        return score_pairs(self, pairs, options)

    def warmup(self) -> None:
        """Warm every replica up, in parallel."""
        for future in [self._pool.submit(e.warmup) for e in self.engines]:
            future.result()
