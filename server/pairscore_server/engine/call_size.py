"""How many positions a ``score`` call computes, tallied as its pairs are added.

The batcher closes a batch, and :func:`~.interface.engine_calls` an in-process
call, when the next pair would take the call over the engine's
``max_call_tokens``: counted here exactly as the call's tries
(:mod:`.tries`) will compute it, so a run many pairs share counts once.
Plans on ids only (no torch).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from pairscore_server.engine.tries import MIN_SHARED_TOKENS, shared_depth


@dataclass
class CallSize:
    """Token positions a ``score`` call computes, tallied as its sequences are added.

    Exactly what :func:`build_tries` computes for the sequences added so far
    (the sum of its nodes' tokens), kept up to date one sequence at a time: the
    trie's positions are, over its sorted sequences, each one's length less
    the run it shares with the sequence before it, so adding a sequence
    between two neighbours changes only their terms. A run is shared as
    the trie shares it (at least ``min_shared`` tokens, ``None``: only whole
    prompts; else the same whole prompt) and identical sequences count once;
    without ``share_prompts`` every sequence counts all its tokens. Padding,
    and the ancestors a trie too large for one forward pass repeats in each
    (:func:`~.tries.row_items`), are not counted. A batcher sizes calls by this, so a
    preamble many pairs share (few-shot exemplars, a system prompt) counts
    once, not once a pair.
    """

    min_shared: int | None = MIN_SHARED_TOKENS
    share_prompts: bool = True
    positions: int = 0
    #: each distinct sequence's prompt lengths (identical sequences run once)
    _prompts: dict[tuple[int, ...], frozenset[int]] = field(default_factory=dict, repr=False)
    #: the distinct sequences of each group (build_tries' sort key), sorted
    _groups: dict[tuple[int, ...], list[tuple[int, ...]]] = field(default_factory=dict, repr=False)

    def cost(self, sequence: Sequence[int], prompt_length: int) -> int:
        """Positions ``sequence`` (its first ``prompt_length`` ids: prefix and prompt)
        would add to the call."""
        seq = tuple(sequence)
        if not self.share_prompts:
            return len(seq)
        old = self._prompts.get(seq)
        if old is None:
            return self._term(seq, frozenset((prompt_length,)))
        if prompt_length in old:
            return 0
        return self._term(seq, old | {prompt_length}, leaving=old) - self._term(seq, old, leaving=old)

    def add(self, sequence: Sequence[int], prompt_length: int) -> int:
        """Add ``sequence`` to the call; returns the positions it added."""
        added = self.cost(sequence, prompt_length)
        self.positions += added
        seq = tuple(sequence)
        if not self.share_prompts:
            return added
        old = self._prompts.get(seq)
        if old is not None:
            if prompt_length in old:
                return added
            self._groups[self._group(seq, old)].remove(seq)
        prompts = frozenset((prompt_length,)) | (old or frozenset())
        self._prompts[seq] = prompts
        members = self._groups.setdefault(self._group(seq, prompts), [])
        members.insert(bisect_left(members, seq), seq)
        return added

    def _group(self, seq: tuple[int, ...], prompts: frozenset[int]) -> tuple[int, ...]:
        """build_tries' group: a prompt shorter than ``min_shared`` is shared only whole."""
        plen = min(prompts)
        return seq[:plen] if self.min_shared is None or plen < self.min_shared else ()

    def _term(
        self, seq: tuple[int, ...], prompts: frozenset[int], leaving: frozenset[int] | None = None
    ) -> int:
        """What ``seq`` with ``prompts`` adds to the sorted sum, the call's other sequences as
        they are (``leaving``: the prompts ``seq`` is in the call with now, to leave out)."""
        members = self._groups.get(self._group(seq, prompts), [])
        i = bisect_left(members, seq)
        j = i + 1 if leaving is not None and self._group(seq, leaving) == self._group(seq, prompts) else i
        before = members[i - 1] if i > 0 else None
        after = members[j] if j < len(members) else None
        term = len(seq)
        if before is not None:
            term -= self._shared(before, seq, self._prompts[before], prompts)
        if after is not None:
            term -= self._shared(seq, after, prompts, self._prompts[after])
            if before is not None:
                term += self._shared(before, after, self._prompts[before], self._prompts[after])
        return term

    def _shared(self, a: tuple[int, ...], b: tuple[int, ...], pa: frozenset[int], pb: frozenset[int]) -> int:
        return shared_depth(a, b, set(pa), set(pb), self.min_shared)
