"""Tier 3: token-id sides, prefix NONE and left truncation through the real
in-process server and the real clients (Score, ScoreStream, asyncio).

The server must carry every form and option over the wire unchanged: each
result equals what the same engine computes in process, bad items fail alone
with a message naming the cause, and the server keeps serving.
"""

from __future__ import annotations

import asyncio

from pairscore.aio import AsyncScoringClient
from pairscore.types import (
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    Side,
    Truncation,
)

from harness.scoring import assert_same_scores

LONG = "The capital of France is Paris. The capital of Italy is Rome. " * 4
MAX_ITEM_TOKENS = 40


def forms(engine) -> list[Pair]:
    vocab = engine.info.vocab_size
    [x, y] = engine.tokenize(["The capital of France is", " Paris."])
    return [
        Pair("The capital of France is", " Paris.", id="text"),
        Pair(prompt_ids=x, response_ids=y, id="ids"),
        Pair(prompt_ids=x, response=" Paris.", id="ids-text"),
        Pair(prompt="The capital of France is", response_ids=(5, 6), id="text-ids"),
        Pair(prompt_ids=(1, vocab + 3), response="x", id="out-of-range"),
        Pair(prompt="a", prompt_ids=(1,), response="x", id="two-forms"),
        Pair(LONG, " Rome.", id="long"),
        Pair(prompt_ids=(3,) * 10, response_ids=(4,) * 45, id="response-too-long"),
    ]


def check(engine, pairs, got, options: ScoreOptions) -> None:
    want = engine.prepare(pairs, options, max_tokens=MAX_ITEM_TOKENS)
    ready = [p for p in want if not isinstance(p, ItemError)]
    scores = iter(engine.score(ready).scores)
    for pair, w, g in zip(pairs, want, got, strict=True):
        if isinstance(w, ItemError):
            assert isinstance(g, ItemError) and g.code is ItemErrorCode.INVALID_ARGUMENT, (pair.id, g)
            assert g.id == pair.id
            continue
        expected = next(scores)
        assert isinstance(g, PairScore), (pair.id, g)
        assert_same_scores(expected, g)
        assert g.prompt_tokens_dropped == expected.prompt_tokens_dropped
        assert [(t.side, t.char_start, t.char_end) for t in g.tokens] == [
            (t.side, t.char_start, t.char_end) for t in expected.tokens
        ]


def test_forms_and_options_travel_unchanged(tiny_engine, start_server):
    st = start_server(tiny_engine, max_item_tokens=MAX_ITEM_TOKENS)
    pairs = forms(tiny_engine)
    vocab = tiny_engine.info.vocab_size
    with st.client() as client:
        for prefix in PrefixMode:
            for truncation in Truncation:
                options = ScoreOptions(return_tokens=True, truncation=truncation, prefix=prefix)
                got = client.score(pairs, return_tokens=True, truncation=truncation, prefix=prefix.value)
                check(tiny_engine, pairs, got, options)
                by_id = {r.id: r for r in got}
                assert isinstance(by_id["out-of-range"], ItemError)
                assert f"prompt_ids[1] is {vocab + 3}" in by_id["out-of-range"].message
                assert "given twice" in by_id["two-forms"].message
                assert "the response alone needs 46 tokens" in by_id["response-too-long"].message
                long = by_id["long"]
                if truncation is Truncation.NONE:
                    assert isinstance(long, ItemError) and "max_item_tokens" in long.message
                else:
                    assert isinstance(long, PairScore) and long.prompt_tokens_dropped > 0
                    assert 1 + long.prompt_tokens + long.response_tokens == MAX_ITEM_TOKENS
                ids = by_id["ids"]
                assert isinstance(ids, PairScore)
                assert all((t.char_start, t.char_end) == (0, 0) for t in ids.tokens)
                text = by_id["text"]
                assert isinstance(text, PairScore)
                if prefix is PrefixMode.NONE:
                    # the first prompt token is context: one fewer counted and detailed
                    x = tiny_engine.tokenize(["The capital of France is"])[0]
                    assert text.prompt_tokens == ids.prompt_tokens == len(x) - 1
                    assert text.tokens[0].side is Side.PROMPT and text.tokens[0].char_start > 0
        # ScoreStream carries the forms and options too
        options = ScoreOptions(truncation=Truncation.LEFT, prefix=PrefixMode.NONE)
        streamed = list(client.score_iter(pairs, batch_size=3, truncation="left", prefix="none"))
        check(tiny_engine, pairs, streamed, options)
        # the server keeps serving
        assert isinstance(client.score([("Hello", " world")])[0], PairScore)

    async def via_aio():
        async with AsyncScoringClient(st.target, timeout=20) as aio:
            return await aio.score(pairs, truncation=Truncation.LEFT, prefix=PrefixMode.NONE)

    check(tiny_engine, pairs, asyncio.run(via_aio()), options)
