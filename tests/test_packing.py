"""Tier 1: packed rows (layout, planning, the attention switch and its probe)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pairscore.types import Pair, ScoreOptions
from pairscore_server.engine import packed_attention
from pairscore_server.engine.packing import Tree, build_trees, pack_row, plan_rows

from harness.models import make_engine
from harness.scoring import assert_same_scores, mixed_pairs


def test_lone_pairs_are_trees_of_their_own():
    seqs = [(0, 5, 6, 7), (0, 5, 6, 8), (0, 9)]
    trees = build_trees(seqs, [2, 2, 1], share_prompts=False, capacity=100)
    assert [t.members for t in trees] == [((0, ()),), ((1, ()),), ((2, ()),)]
    assert [t.size for t in trees] == [3, 3, 1]  # the last token is a target only


def test_shared_prompt_is_one_tree_split_at_capacity():
    prompt = (0, 5, 6)
    seqs = [prompt + (1, 2, 3, 4), prompt + (7,), prompt + (8, 9), prompt, (0, 5, 11)]
    trees = build_trees(seqs, [3, 3, 3, 3, 2], share_prompts=True, capacity=100)
    assert len(trees) == 2
    shared = trees[0]
    assert shared.prompt == prompt
    assert [i for i, _ in shared.members] == [0, 2, 1, 3]  # longest response first
    # The prompt's last token is an input (it predicts each y_1); responses drop theirs.
    assert shared.size == 3 + 3 + 1 + 0 + 0
    assert shared.reused_tokens == 3 * 3
    # A pair alone on its prompt is still prompt + response (batch invariance:
    # the same attention calls whatever shares the call).
    assert trees[1] == Tree((0, 5), ((4, (11,)),))
    split = build_trees(seqs, [3, 3, 3, 3, 2], share_prompts=True, capacity=6)
    assert [[i for i, _ in t.members] for t in split[:-1]] == [[0], [2, 1, 3]]


def test_plan_rows_first_fit_decreasing():
    sizes = [5, 9, 3, 0, 12, 4]
    rows = plan_rows(sizes, capacity=10)
    assert rows == [[4], [1], [0, 5], [2]]
    assert all(sum(sizes[i] for i in r) <= 10 or len(r) == 1 for r in rows)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 4, 5]  # size 0: nothing to run


def test_pack_row_layout_follows_the_token_shift():
    lone = Tree((0, 5, 6, 7), ((9, ()),))
    tree = Tree((0, 3), ((1, (20, 21, 22)), (2, (30,)), (3, ())))
    row = pack_row([lone, tree], device=torch.device("cpu"))
    assert row.input_ids.tolist() == [[0, 5, 6, 0, 3, 20, 21]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert [(s.start, s.stop, s.context_start, s.context_stop) for s in row.segments] == [
        (0, 3, 0, 0),
        (3, 5, 0, 0),
        (5, 7, 3, 5),
    ]
    assert row.segments[2].mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    # lone: rows 0,1,2 predict 5,6,7; tree: row 3 predicts 3, row 4 predicts y_1 of
    # both responses, rows 5,6 predict 21, 22.
    assert row.score_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 4]
    assert row.targets.tolist() == [5, 6, 7, 3, 20, 21, 22, 30]
    lps = torch.arange(8, dtype=torch.float32)
    split = dict(row.split(lps))
    assert split[9].tolist() == [0, 1, 2]
    assert split[1].tolist() == [3, 4, 5, 6]
    assert split[2].tolist() == [3, 7]
    assert split[3].tolist() == [3]
    assert row.reused_tokens == 2 * 2


def test_packed_attention_is_plain_sdpa_without_segments(gpt2_family):
    """Switching a model to packed attention leaves unpacked calls unchanged."""
    model, _ = gpt2_family
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    switched = copy.deepcopy(model)
    assert packed_attention.enable_packed_attention(switched) is None
    ids = torch.tensor([[3, 7, 1, 9, 4], [5, 2, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.inference_mode():
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = switched(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_eager_model_falls_back_to_padded_batches(gpt2_family):
    model, tokenizer = gpt2_family
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    eng = make_engine(eager, tokenizer)
    assert not eng.packing
    pairs = mixed_pairs(8, seed=11)
    reference = make_engine(model, tokenizer, packing=False).score_pairs(pairs)
    for a, b in zip(eng.score_pairs(pairs), reference, strict=True):
        assert_same_scores(a, b)


def test_probe_catches_a_model_that_drops_the_segments(gpt2_family, monkeypatch):
    """If the segments never reach attention (the whole row attends causally), the
    engine notices on its probe and serves padded batches instead."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def ignores_segments(module, q, k, v, mask, **kwargs):
        kwargs.pop(packed_attention.SEGMENTS_KWARG, None)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    model, tokenizer = gpt2_family
    leaky = copy.deepcopy(model)
    leaky.set_attn_implementation("sdpa")
    real = packed_attention.packed_sdpa_attention
    monkeypatch.setattr(packed_attention, "packed_sdpa_attention", ignores_segments)
    try:
        eng = make_engine(leaky, tokenizer)
        assert not eng.packing
        assert leaky.config._attn_implementation == "sdpa"
        [got] = eng.score_pairs([Pair("The capital of France is", " Paris.")])
        [want] = make_engine(model, tokenizer, packing=False).score_pairs(
            [Pair("The capital of France is", " Paris.")]
        )
        assert_same_scores(got, want)
    finally:
        AttentionInterface.register(packed_attention.PACKED_ATTENTION, real)


@pytest.mark.parametrize("capacity", [16, 64, 2048])
def test_scores_do_not_depend_on_row_capacity(family, capacity):
    """Batch invariance for packed rows: the same pairs packed differently score the same."""
    model, tokenizer = family
    pairs = mixed_pairs(24, seed=12) + [Pair("shared", y) for y in (" a", " b c", "")]
    want = make_engine(model, tokenizer, packing=False, share_prompts=False).score_pairs(pairs)
    eng = make_engine(model, tokenizer, max_batch_tokens=capacity)
    for a, b in zip(eng.score_pairs(pairs), want, strict=True):
        assert_same_scores(a, b)


def test_identical_pairs_run_once(gpt2_family):
    """A dataset's duplicate pairs cost one computation; each still gets its answer."""
    model, tokenizer = gpt2_family
    eng = make_engine(model, tokenizer)
    once = [Pair("The capital of France is", " Paris."), Pair("lone", "")]
    pairs = [once[0], once[1], once[0], Pair("other", " y"), once[0], once[1]]
    prepared = eng.prepare(pairs, ScoreOptions())
    scored = eng.score(prepared)
    got, stats = scored.scores, scored.stats
    distinct = eng.score(eng.prepare(once + [Pair("other", " y")], ScoreOptions())).stats
    assert stats.real_tokens == distinct.real_tokens, "the repeats computed nothing"
    assert stats.reused_tokens == 2 * prepared[0].num_tokens + prepared[1].num_tokens
    for i, j in ((0, 2), (0, 4), (1, 5)):
        assert got[i] == dataclasses.replace(got[j], id=got[i].id)
    want = make_engine(model, tokenizer, packing=False, share_prompts=False).score_pairs(pairs)
    for a, b in zip(got, want, strict=True):
        assert_same_scores(a, b)
