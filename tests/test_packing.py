"""Tier 1: packed rows (layout, planning, the attention switch and its probe)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pairscore.types import Pair, ScoreOptions
from pairscore_server.engine import packed_attention, packing
from pairscore_server.engine.packing import pack_row
from pairscore_server.engine.tries import build_tries, plan_rows, row_items

from harness.models import make_engine
from harness.scoring import assert_same_scores, mixed_pairs


def shape(trie):
    """(tokens, depth, parent) of each node, preorder."""
    return [(n.tokens, n.depth, n.parent) for n in trie.nodes]


def test_lone_pairs_are_tries_of_their_own():
    seqs = [(0, 5, 6, 7), (0, 5, 6, 8), (0, 9)]
    tries = build_tries(seqs, [2, 2, 1], share_prompts=False)
    assert [shape(t) for t in tries] == [[(s, 0, -1)] for s in seqs]
    assert [t.size for t in tries] == [3, 3, 1]  # the last token is a target only


def test_shared_prompt_is_one_trie_split_at_capacity():
    prompt = (0, 5, 6)
    seqs = [prompt + (1, 2, 3, 4), prompt + (7,), prompt + (8, 9), prompt, (0, 5, 11)]
    tries = build_tries(seqs, [3, 3, 3, 3, 2], min_shared=None)
    assert len(tries) == 2
    shared, lone = tries
    assert shape(shared) == [(prompt, 0, -1), ((1, 2, 3, 4), 3, 0), ((7,), 3, 0), ((8, 9), 3, 0)]
    assert [(m.indices, m.path) for m in shared.members] == [
        ((0,), (0, 1)),
        ((1,), (0, 2)),
        ((2,), (0, 3)),
        ((3,), (0,)),
    ]
    # The prompt's last token is an input (it predicts each y_1); responses drop theirs.
    assert shared.size == 3 + 3 + 0 + 1
    [item] = row_items(shared, 100)
    assert item.reused_tokens == 3 * 3
    # A pair alone on its prompt is still prompt + response (batch invariance:
    # the same attention calls whatever shares the call).
    assert shape(lone) == [((0, 5), 0, -1), ((11,), 2, 0)]
    split = row_items(shared, 6)
    # first fit, largest first, each part with its own copy of the prompt
    assert [item.nodes for item in split] == [(0, 1, 2), (0, 3)]
    assert [item.size for item in split] == [3 + 3 + 0, 3 + 1]
    assert [item.members for item in split] == [(0, 1, 3), (2,)]
    assert [item.reused_tokens for item in split] == [3 * 2, 0]


def test_prefix_shared_below_the_prompt_and_inside_the_response():
    """Runs of at least ``min_shared`` tokens are shared wherever they end: mid-prompt
    (A, B), inside a response (C, D: same prompt, responses share 3 tokens); shorter
    runs are not (E); a pair whose whole sequence is a shared run (F) ends inside the
    trie; identical pairs (G) are one member; every prompt end is a node boundary."""
    a = (0, 1, 2, 3, 4, 5, 6)  # prompt (0, 1, 2, 3, 4)
    b = (0, 1, 2, 3, 9, 8)  # prompt (0, 1, 2, 3, 9): shares 4 tokens with a, mid-prompt
    c = (0, 1, 2, 3, 9, 20, 21, 22, 23)  # b's prompt, response shares 3 tokens with d
    d = (0, 1, 2, 3, 9, 20, 21, 22, 30, 31)
    e = (0, 1, 7, 7, 7)  # shares 2 < 3 tokens with the others
    f = (0, 1, 2, 3, 9, 20, 21)  # a prefix of c and d, prompt (0, 1, 2, 3, 9)
    seqs = [a, b, c, d, e, f, a]
    plens = [5, 5, 5, 5, 3, 5, 5]
    tries = build_tries(seqs, plens, min_shared=3)
    assert len(tries) == 2
    big, lone = tries
    assert shape(lone) == [((0, 1, 7), 0, -1), ((7, 7), 3, 0)]
    assert shape(big) == [
        ((0, 1, 2, 3), 0, -1),
        ((4,), 4, 0),
        ((5, 6), 5, 1),
        ((9,), 4, 0),
        ((8,), 5, 3),
        ((20, 21), 5, 3),
        ((22,), 7, 5),
        ((23,), 8, 6),
        ((30, 31), 8, 6),
    ]
    paths = {m.indices: m.path for m in big.members}
    assert paths == {
        (0, 6): (0, 1, 2),
        (1,): (0, 3, 4),
        (2,): (0, 3, 5, 6, 7),
        (3,): (0, 3, 5, 6, 8),
        (5,): (0, 3, 5),
    }
    for m in big.members:  # a member's path spells its sequence
        assert sum((big.nodes[i].tokens for i in m.path), ()) == seqs[m.indices[0]]
    assert big.size == 4 + 1 + 1 + 1 + 0 + 2 + 1 + 0 + 1
    [item] = row_items(big, 100)
    assert item.reused_tokens == sum(len(s) for s in seqs) - len(e) - sum(len(n.tokens) for n in big.nodes)
    assert sum(len(n.tokens) for n in big.nodes) == 15
    # Below the threshold only identical prompts are shared: b, c, d, f share theirs.
    prompts_only = build_tries(seqs, plens, min_shared=None)
    assert sorted(len(t.nodes) for t in prompts_only) == [2, 2, 5]  # prompt + 4 responses


def test_plan_rows_first_fit_decreasing():
    sizes = [5, 9, 3, 0, 12, 4]
    rows = plan_rows(sizes, capacity=10)
    assert rows == [[4], [1], [0, 5], [2]]
    assert all(sum(sizes[i] for i in r) <= 10 or len(r) == 1 for r in rows)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 4, 5]  # size 0: nothing to run


def calls(segment) -> list[tuple[list[int], list[int]]]:
    """Each attention call of a segment as (query rows, key rows); no keys: causal."""
    if isinstance(segment, packing.SegmentBatch):
        return list(zip(segment.queries.tolist(), segment.keys.tolist(), strict=True))
    keys = [k for a, b in segment.keys for k in range(a, b)]
    return [(list(range(segment.start, segment.stop)), keys)]


def test_pack_row_layout_follows_the_token_shift():
    lone, shared = build_tries(
        [(0, 5, 6, 7), (0, 3, 20, 21, 22), (0, 3, 30), (0, 3)], [4, 2, 2, 2], min_shared=None
    )
    row = pack_row(row_items(lone, 100) + row_items(shared, 100), device=torch.device("cpu"))
    assert row.input_ids.tolist() == [[0, 5, 6, 0, 3, 20, 21]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert [calls(s) for s in row.segments] == [
        [([0, 1, 2], [])],
        [([3, 4], [])],
        [([5, 6], [3, 4, 5, 6])],
    ]
    assert row.segments[2].mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    # lone: rows 0,1,2 predict 5,6,7; tree: row 3 predicts 3, row 4 predicts y_1 of
    # both responses, rows 5,6 predict 21, 22.
    assert row.score_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 4]
    assert row.targets.tolist() == [5, 6, 7, 3, 20, 21, 22, 30]
    lps = torch.arange(8, dtype=torch.float32)
    split = dict(row.split(lps))
    assert split[0].tolist() == [0, 1, 2]
    assert split[1].tolist() == [3, 4, 5, 6]
    assert split[2].tolist() == [3, 7]
    assert split[3].tolist() == [3]
    assert row.reused_tokens == 2 * 2


def test_pack_row_context_is_every_ancestor():
    """A node attends to all its ancestors' rows, which need not be contiguous: the
    second child of a node sits after its first sibling's subtree."""
    [trie] = build_tries([(0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 6), (0, 1, 2, 7, 8)], [3, 3, 3], min_shared=2)
    assert shape(trie) == [((0, 1, 2), 0, -1), ((3, 4), 3, 0), ((5,), 5, 1), ((6,), 5, 1), ((7, 8), 3, 0)]
    row = pack_row(row_items(trie, 100), device=torch.device("cpu"))
    assert row.input_ids.tolist() == [[0, 1, 2, 3, 4, 7]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert [calls(s) for s in row.segments] == [
        [([0, 1, 2], [])],
        [([3, 4], [0, 1, 2, 3, 4])],  # (3, 4), below the shared run: a call of its own
        [([5], [0, 1, 2, 5])],  # (7, 8), a pair laid out as alone: a call of its own
    ]
    split = dict(row.split(torch.arange(len(row.targets), dtype=torch.float32)))
    targets = row.targets.tolist()
    for i, seq in enumerate([(0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 6), (0, 1, 2, 7, 8)]):
        assert [targets[int(k)] for k in split[i]] == list(seq[1:])


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


def as_rows(nodes):
    """(start, stop, context, groupable) tuples as attention_groups takes them."""
    return [(packing.NodeRows(start, stop, context), groupable) for start, stop, context, groupable in nodes]


def test_attention_groups_give_each_query_its_own_nodes_pattern():
    """Groupable nodes with the same root share one masked call in which every query sees
    exactly what its node's own call would show it (its ancestors' rows, then its own rows
    causally); a root and a pair laid out as alone keep calls of their own."""
    nodes = [
        (0, 10, (), False),  # root: a shared run
        (10, 14, ((0, 10),), True),
        (14, 16, ((0, 10), (10, 14)), True),  # a child of the node before
        (16, 20, ((0, 10),), True),
        (20, 22, ((0, 10),), False),  # laid out as alone: its own call
    ]
    segments = packing.attention_groups(as_rows(nodes), torch.device("cpu"))
    root, group, lone = segments
    assert calls(root) == [(list(range(10)), [])] and root.mask is None
    assert calls(group) == [(list(range(10, 20)), list(range(20)))]
    assert calls(lone) == [([20, 21], [*range(10), 20, 21])]
    for start, stop, context, _ in nodes[1:4]:
        for q in range(start, stop):
            seen = [any(a <= k < b for a, b in context) or start <= k <= q for k in range(20)]
            assert group.mask[q - 10].tolist() == seen


def test_single_node_calls_of_one_shape_run_as_one_batch():
    """Nodes left with a call of their own (four answers to one prompt, laid out as
    alone) run as one batched call a shape, each with its own keys and the shared mask."""
    nodes = [(0, 8, (), False)] + [(8 + 2 * i, 10 + 2 * i, ((0, 8),), False) for i in range(4)]
    nodes.append((16, 19, ((0, 8),), False))  # another length: another batch
    root, twos, three = packing.attention_groups(as_rows(nodes), torch.device("cpu"))
    assert calls(twos) == [([8 + 2 * i, 9 + 2 * i], [*range(8), 8 + 2 * i, 9 + 2 * i]) for i in range(4)]
    assert twos.mask.tolist() == [[True] * 9 + [False], [True] * 10]
    assert calls(three) == [([16, 17, 18], [*range(8), 16, 17, 18])]


def test_attention_groups_stay_within_their_waste_bound():
    """Siblings below a long shared run are grouped only while the call's square stays
    within GROUP_WASTE of their own blocks (plus the per-node slack)."""
    nodes = [(0, 400, (), False)] + [(400 + 20 * i, 420 + 20 * i, ((0, 400),), True) for i in range(60)]
    segments = packing.attention_groups(as_rows(nodes), torch.device("cpu"))
    assert 2 < len(segments) < 20  # 61 calls without grouping
    own = {(s, e): (e - s) * (e - s + 400) for s, e, _, _ in nodes[1:]}
    for seg in segments[1:]:
        if isinstance(seg, packing.SegmentBatch):  # nodes left alone: their own blocks
            continue
        width = sum(b - a for a, b in seg.keys)
        mine = sum(v for (s, e), v in own.items() if seg.start <= s < seg.stop)
        members = sum(seg.start <= s < seg.stop for s, _ in own)
        assert (seg.stop - seg.start) * width <= (
            packing.GROUP_WASTE * mine + packing.GROUP_SLACK_SCORES * members
        )
