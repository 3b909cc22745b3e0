"""The one prepare -> score -> merge path (engine/interface.py) that the service, the
in-process Scorer and ``score_pairs`` share: engine calls cut as the batcher cuts
them, item errors merged back in request order, a count mismatch refused."""

from __future__ import annotations

import pytest

from pairscore.types import ItemError, ItemErrorCode, Pair, ScoreOptions
from pairscore_server.engine.interface import engine_calls, merge_outcomes, score_pairs, top_k_problem

from harness.fake_engine import FakeEngine, expected_score


def test_engine_calls_stay_within_the_budget_and_keep_order():
    engine = FakeEngine()  # shares nothing: a call costs the sum of its pairs' tokens
    pairs = [Pair("p" * k, "r" * (k % 5), id=str(k)) for k in range(1, 40)]
    prepared = engine.prepare(pairs, ScoreOptions())
    calls = engine_calls(engine, prepared, 64)
    assert [p for call in calls for p in call] == prepared
    for call, after in zip(calls, calls[1:], strict=False):
        assert sum(p.num_tokens for p in call) <= 64 or len(call) == 1
        assert sum(p.num_tokens for p in call) + after[0].num_tokens > 64  # full before the next call
    assert engine_calls(engine, prepared, None) == [prepared]
    assert engine_calls(engine, [], 64) == [] and engine_calls(engine, [], None) == []


def test_score_pairs_merges_item_errors_in_order_and_splits_calls():
    engine = FakeEngine(max_context=12)
    pairs = [Pair("ab", "c", id="a"), Pair("x" * 30, "y", id="long"), Pair("abc", "de", id="b")]
    out = score_pairs(engine, pairs, max_call_tokens=4)
    assert out[0] == expected_score(pairs[0]) and out[2] == expected_score(pairs[2])
    assert isinstance(out[1], ItemError) and out[1].code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert len(engine.batches) == 2  # 4 positions cannot hold both ready pairs
    assert score_pairs(FakeEngine(max_context=12), pairs) == out  # one call: the same outcomes


def test_merge_refuses_a_count_mismatch():
    engine = FakeEngine()
    prepared = engine.prepare([Pair("a", "b")], ScoreOptions())
    score = expected_score(Pair("a", "b"))
    with pytest.raises(RuntimeError, match="2 scores for 1 ready pairs"):
        merge_outcomes(prepared, [score, score])
    with pytest.raises(RuntimeError, match="0 scores for 1 ready pairs"):
        merge_outcomes(prepared, [])


def test_top_k_is_one_rule_for_the_service_and_the_engine():
    assert top_k_problem(0, 0) is None and top_k_problem(20, 20) is None
    assert "between 0 and 20" in (top_k_problem(21, 20) or "") and "got 21" in (top_k_problem(21, 20) or "")
    assert "not available" in (top_k_problem(1, 0) or "")
    # The engine's item error (test_data_selection) and the service's request error
    # (test_data_selection_e2e) both carry this text.
