"""The engine interface: what the batcher, the service and the server depend on.

Everything outside :mod:`pairscore_server.engine` talks to an engine through
:class:`Engine` (as vLLM's entrypoints talk to its ``EngineClient``):
:class:`~pairscore_server.engine.engine.ScoringEngine` (one model),
:class:`~pairscore_server.engine.replicas.ReplicatedEngine` (one model per
GPU) and the tests' fake engine implement it. This module imports no torch.

A call returns what it measured: :meth:`Engine.score` hands back a
:class:`ScoredBatch` with the scores, the token accounting of its forward
passes and each replica's busy time, instead of leaving them on the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from pairscore.types import ItemError, ModelInfo, Pair, PairScore, ScoreOptions, ScoreOutcome
from pairscore_server.engine.call_size import CallSize
from pairscore_server.engine.prepared import PreparedPair

#: The model an engine wraps: a transformers causal LM (``PreTrainedModel``). Typed
#: ``Any``: torch types every attribute of a ``torch.nn.Module`` as ``Tensor | Module``,
#: which would make each ``model.base_model`` or ``model.config`` access a type error.
CausalLM: TypeAlias = Any


@dataclass(frozen=True)
class ForwardStats:
    """Token accounting of one ``score`` call.

    ``real_tokens``: token positions computed; ``padded_tokens``: positions
    including padding (real / padded is the padding efficiency);
    ``reused_tokens``: tokens not computed again because several sequences
    of the call begin with the same run of token ids (a shared prompt,
    few-shot exemplars, a system prompt: the prefix trie of tries.py) or
    are identical: every sequence's length, less what was run.
    """

    real_tokens: int = 0
    padded_tokens: int = 0
    reused_tokens: int = 0

    def __add__(self, other: ForwardStats) -> ForwardStats:
        return ForwardStats(
            self.real_tokens + other.real_tokens,
            self.padded_tokens + other.padded_tokens,
            self.reused_tokens + other.reused_tokens,
        )


@dataclass(frozen=True)
class ScoredBatch:
    """What one :meth:`Engine.score` call returns.

    ``scores``: one PairScore per prepared pair, in order. ``stats``: the
    call's token accounting. ``replica_seconds``: how long each model
    replica was busy in the call (one entry for a single-model engine; 0 for
    a replica that got no pairs).
    """

    scores: list[PairScore]
    stats: ForwardStats = field(default_factory=ForwardStats)
    replica_seconds: tuple[float, ...] = ()


#: What ``Engine.score`` polls between forward chunks: True when nobody waits for the
#: call's results any more (every caller left), so the rest is not worth running.
Cancelled: TypeAlias = Callable[[], bool]


class ScoreCancelled(Exception):
    """Raised by :meth:`Engine.score` when its ``cancelled`` check said stop."""


@runtime_checkable
class Engine(Protocol):
    """A scoring engine: tokenization and batched forward passes, no gRPC.

    ``prepare`` is cheap and thread-safe (a server calls it from several
    threads); ``score`` and ``warmup`` block and are called from one thread
    at a time (the server's model thread).
    """

    @property
    def info(self) -> ModelInfo:
        """What is served and under which contract (limits of the server not included)."""
        ...

    @property
    def max_batch_tokens(self) -> int:
        """Token budget of one forward pass (a packed row, or pairs x longest padded row)."""
        ...

    @property
    def max_call_tokens(self) -> int:
        """Size of one ``score`` call a batcher should build, in the positions it computes
        (:meth:`call_size` counts them): several forward passes' worth, so the engine can
        group by length and shared prompt."""
        ...

    def call_size(self) -> CallSize:
        """An empty tally of the positions a ``score`` call computes, counting shared runs
        as this engine shares them (:func:`add_to_call` adds a pair)."""
        ...

    def prepare(
        self, pairs: Sequence[Pair], options: ScoreOptions, *, max_tokens: int | None = None
    ) -> list[PreparedPair | ItemError]:
        """Tokenize ``pairs``; one PreparedPair, or an ItemError for a pair that cannot be
        scored, per pair, in order. ``max_tokens``: the most tokens a pair may take (at most
        the model's context; ``None``: the context), which ``Truncation.LEFT`` cuts prompts
        to fit; a longer pair is an ItemError (INVALID_ARGUMENT naming max_item_tokens
        below the context, CONTEXT_LENGTH_EXCEEDED at it): the one place the per-pair token
        limit is checked."""
        ...

    def tokenize(self, texts: Sequence[str], *, parse_special_tokens: bool = False) -> list[tuple[int, ...]]:
        """Each text's ids, tokenized on its own with no special token added: with
        ``parse_special_tokens=False`` exactly the ids a prompt of that text is scored
        with; with ``True`` special-token strings become their special tokens (as
        transformers' ``tokenizer(text, add_special_tokens=False)``)."""
        ...

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text as :attr:`TokenScore.text <pairscore.types.TokenScore.text>` shows it
        (decoded on its own, leading space kept), from the tokenizer alone; ids in the vocabulary."""
        ...

    def score(self, prepared: Sequence[PreparedPair], *, cancelled: Cancelled | None = None) -> ScoredBatch:
        """Run the forward passes for ``prepared``; scores in the same order, with what was measured.

        ``cancelled`` is checked before each forward chunk (a packed row, a
        padded batch); when it returns True the call raises
        :class:`ScoreCancelled` instead of running the rest."""
        ...

    def warmup(self) -> None:
        """Run a short forward pass, so the first request does not pay for lazy initialisation."""
        ...


def top_k_problem(top_k: int, max_top_k: int) -> str | None:
    """The one rule for ``ScoreOptions.top_k`` against a model's ``max_top_k``: why a
    value is refused, or None. The gRPC/HTTP service (a whole request) and the engine's
    ``prepare`` (in-process callers, one item error a pair) both apply it."""
    if 0 <= top_k <= max_top_k:
        return None
    unavailable = " (top-k alternatives are not available)" if max_top_k == 0 else ""
    return f"top_k must be between 0 and {max_top_k}, this server's max_top_k{unavailable}; got {top_k}"


def merge_outcomes(
    prepared: Sequence[PreparedPair | ItemError], scores: Iterable[ScoreOutcome]
) -> list[ScoreOutcome]:
    """The one merge of every scoring path (the service, the in-process Scorer,
    :func:`score_pairs`): the ready pairs' scores, in order, put back among the item
    errors that preparation answered, so each pair gets its outcome in request order."""
    scores = list(scores)
    ready = sum(isinstance(p, PreparedPair) for p in prepared)
    if len(scores) != ready:
        raise RuntimeError(f"the engine returned {len(scores)} scores for {ready} ready pairs")
    it = iter(scores)
    return [next(it) if isinstance(p, PreparedPair) else p for p in prepared]


def add_to_call(size: CallSize, pair: PreparedPair, max_call_tokens: int | None) -> bool:
    """Add ``pair`` to the call ``size`` tallies when the positions it adds (its p ⊕ x ⊕ y,
    and its p ⊕ y when it asked for its unconditional score, beyond the runs they share
    with the call: :class:`~pairscore_server.engine.tries.CallSize`) keep the call within
    ``max_call_tokens`` (``None``: no limit); the first pair of a call is always added.
    The one rule by which the batcher and :func:`engine_calls` cut calls."""
    sequences = [(pair.input_ids, 1 + pair.prompt_tokens)]
    if pair.unconditional and pair.response_tokens and not pair.is_own_alone:
        sequences.append((pair.alone_ids, 1))
    cost = sum(size.cost(seq, plen) for seq, plen in sequences)
    if max_call_tokens is not None and size.positions and size.positions + cost > max_call_tokens:
        return False
    for seq, plen in sequences:
        size.add(seq, plen)
    return True


def engine_calls(
    engine: Engine, ready: Sequence[PreparedPair], max_call_tokens: int | None
) -> list[list[PreparedPair]]:
    """``ready`` in order, cut into calls of at most ``max_call_tokens`` positions as
    ``engine`` computes them (:func:`add_to_call`, the rule the server's batcher builds
    calls by); ``None``: one call."""
    calls: list[list[PreparedPair]] = []
    call: list[PreparedPair] = []
    size = engine.call_size()
    for p in ready:
        if not add_to_call(size, p, max_call_tokens):
            calls.append(call)
            call, size = [], engine.call_size()
            add_to_call(size, p, None)
        call.append(p)
    if call:
        calls.append(call)
    return calls


def score_pairs(
    engine: Engine,
    pairs: Sequence[Pair],
    options: ScoreOptions | None = None,
    *,
    max_call_tokens: int | None = None,
) -> list[ScoreOutcome]:
    """prepare -> score -> merge in one call, for in-process use: one PairScore or
    ItemError per pair, in order. ``max_call_tokens`` cuts the ready pairs into engine
    calls of at most that many positions (:func:`engine_calls`; ``None``: one call)."""
    prepared = engine.prepare(pairs, options or ScoreOptions())
    ready = [p for p in prepared if isinstance(p, PreparedPair)]
    scores: list[PairScore] = []
    for call in engine_calls(engine, ready, max_call_tokens):
        scores += engine.score(call).scores
    return merge_outcomes(prepared, scores)
