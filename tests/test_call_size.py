"""CallSize (engine/call_size.py): the positions a call computes, counted as pairs are added,
are exactly what the engine's trie computes for the same sequences; the batcher and
``engine_calls`` cut calls by it, so a preamble many pairs share counts once."""

from __future__ import annotations

import random

import pytest

from pairscore.types import Pair, ScoreOptions
from pairscore_server.engine.call_size import CallSize
from pairscore_server.engine.interface import add_to_call, engine_calls
from pairscore_server.engine.tries import build_tries


def _trie_positions(seqs, prompt_lengths, **sharing) -> int:
    return sum(len(n.tokens) for t in build_tries(seqs, prompt_lengths, **sharing) for n in t.nodes)


def _random_sequences(rng: random.Random, n: int) -> tuple[list[tuple[int, ...]], list[int]]:
    preambles = [tuple(rng.randrange(1, 6) for _ in range(rng.choice([3, 12, 20, 40]))) for _ in range(3)]
    seqs, plens = [], []
    for _ in range(n):
        pre = rng.choice(preambles) if rng.random() < 0.8 else ()
        prompt = (0, *pre, *(rng.randrange(1, 6) for _ in range(rng.randrange(0, 25))))
        response = tuple(rng.randrange(1, 6) for _ in range(rng.randrange(0, 6)))
        if seqs and rng.random() < 0.15:  # the same ids again, cut elsewhere (or as p + y: 1)
            again = rng.choice(seqs)
            seqs.append(again)
            plens.append(rng.choice([1, rng.randrange(1, len(again) + 1)]))
            continue
        seqs.append(prompt + response)
        plens.append(len(prompt))
    return seqs, plens


@pytest.mark.parametrize("sharing", [{}, {"min_shared": None}, {"min_shared": 4}, {"share_prompts": False}])
@pytest.mark.parametrize("seed", range(25))
def test_call_size_counts_what_the_trie_computes(seed, sharing):
    rng = random.Random(seed)
    seqs, plens = _random_sequences(rng, rng.randrange(1, 40))
    size = CallSize(**sharing)
    added = [size.add(s, p) for s, p in zip(seqs, plens, strict=True)]
    assert size.positions == sum(added)
    for k in range(1, len(seqs) + 1):  # at every step, the tally is what the trie computes
        assert sum(added[:k]) == _trie_positions(seqs[:k], plens[:k], **sharing)


def test_engine_calls_on_a_real_engine_compute_what_they_were_sized_by(engine):
    """On every tiny model family, in both layouts: calls cut under a budget compute
    (the engine's own ForwardStats) what CallSize tallied for them, within one position a
    distinct sequence (a packed row does not feed a sequence's last token), and a few-shot
    preamble is computed once a call, not once a pair."""
    preamble = "Q: two plus two? A: four. " * 6
    pairs = [Pair(preamble + f"Q: item {i}?", f" A: {i}") for i in range(24)]
    prepared = engine.prepare(pairs, ScoreOptions(unconditional=True))
    longest = max(p.num_tokens for p in prepared)
    budget = 4 * longest  # pairs x longest would fit 4 pairs a call
    calls = engine_calls(engine, prepared, budget)
    assert [p for call in calls for p in call] == prepared
    assert len(calls) < len(prepared) / 4
    for call in calls:
        size = engine.call_size()
        for p in call:
            assert add_to_call(size, p, None)
        assert size.positions <= budget or len(call) == 1
        seqs, _, _ = engine.sequences(call)
        computed = engine.score(call).stats.real_tokens
        assert size.positions - len(set(seqs)) <= computed <= size.positions
