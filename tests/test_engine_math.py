"""Tier 1: the engine's numbers against an independent float64 reference.

The reference is written here from scratch: one unbatched forward pass of
p ⊕ x ⊕ y through a float64 copy of the model, the model's own logits, a
float64 log-softmax and a gather. It shares no code with the engine except
the token ids.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from pairscore.types import Pair, PairScore, ScoreOptions, TokenizationMode
from pairscore_server.engine.packing import ROW_ALIGN, SegmentBatch, pack_row

from harness.models import make_engine
from harness.scoring import (
    SHARED_RUN_TOKEN_TOL,
    SUM_REL_TOL,
    TOKEN_TOL,
    assert_same_scores,
    mixed_pairs,
    prefix_pairs,
)

TOL = 1e-4  # nats, on each sum, fp32 engine vs float64 reference


@pytest.fixture(scope="module")
def reference_model(family):
    model, _ = family
    return copy.deepcopy(model).double().eval()


def reference_token_logprobs(model64, ids: tuple[int, ...]) -> list[float]:
    """log P(t_j | t_<j) for j = 1..L-1, in float64, one sequence, model's own logits."""
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def forward_passes(engine, prepared) -> int:
    """How many forward passes ``engine`` runs for ``prepared`` (shared prompts aside)."""
    if not engine.packing:
        return len(engine.plan_batches(prepared))
    return len(engine.plan_packed_rows(prepared)[1])


def prepared_ids(engine, pair: Pair, options: ScoreOptions) -> tuple[tuple[int, ...], int]:
    [prep] = engine.prepare([pair], options)
    return prep.input_ids, prep.prompt_tokens


def reused_tokens(engine, prepared) -> int:
    """Token positions the engine's layout of ``prepared`` does not compute again."""
    if engine.packing:
        return sum(item.reused_tokens for item in engine.plan_packed_rows(prepared)[0])
    everyone = sum(p.num_tokens for p in prepared)
    return everyone - sum(len(n.tokens) for t in engine.plan_tries(prepared) for n in t.nodes)


def assert_shares_below_prompts(engine, prepared) -> None:
    """The trie shares more than whole prompts and identical pairs do."""
    prompts_only = dataclasses.replace(engine.limits, share_prefixes=False)
    saved = engine.limits
    try:
        engine.limits = prompts_only
        baseline = reused_tokens(engine, prepared)
    finally:
        engine.limits = saved
    assert reused_tokens(engine, prepared) > baseline + 3 * 16


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_matches_float64_reference(engine, reference_model, mode):
    """Every pair within 1e-4 nats of the reference, with shared runs (the trie) on."""
    options = ScoreOptions(tokenization=mode, return_tokens=True)
    pairs = mixed_pairs(32) + prefix_pairs()
    assert_shares_below_prompts(engine, engine.prepare(pairs, options))
    results = engine.score_pairs(pairs, options)
    worst = 0.0
    for pair, got in zip(pairs, results, strict=True):
        assert isinstance(got, PairScore), got
        ids, m = prepared_ids(engine, pair, options)
        ref = reference_token_logprobs(reference_model, ids)
        ref_prompt, ref_cond = math.fsum(ref[:m]), math.fsum(ref[m:])
        worst = max(worst, abs(got.prompt_logprob - ref_prompt), abs(got.conditional_logprob - ref_cond))
        assert got.prompt_logprob == pytest.approx(ref_prompt, abs=TOL)
        assert got.conditional_logprob == pytest.approx(ref_cond, abs=TOL)
        assert got.joint_logprob == pytest.approx(ref_prompt + ref_cond, abs=TOL)
        for tok, r in zip(got.tokens, ref, strict=True):
            assert tok.logprob == pytest.approx(r, abs=TOL)
    # Measured worst case on the tiny models: 2.1e-5 (GPT-2) and 4.4e-5 (Llama)
    # nats, on sums of up to ~670 nats: the 1e-4 bound holds with 2x margin.
    print(f"worst |engine - float64| = {worst:.2e} nats")
    assert worst < TOL


def test_marginal_equals_separate_forward_on_prompt_alone(engine, reference_model):
    """log P(x) read from the joint pass equals a forward pass over p ⊕ x alone."""
    for pair in mixed_pairs(12, seed=1):
        if not pair.prompt:
            continue
        [joint] = engine.score_pairs([pair])
        ids, m = prepared_ids(engine, pair, ScoreOptions())
        alone = math.fsum(reference_token_logprobs(reference_model, ids[: m + 1]))
        assert joint.prompt_logprob == pytest.approx(alone, abs=TOL)
        [prompt_only] = engine.score_pairs([Pair(pair.prompt, "")])
        assert prompt_only.joint_logprob == pytest.approx(
            joint.prompt_logprob, rel=SUM_REL_TOL, abs=TOKEN_TOL
        )


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_batch_invariance(engine, mode):
    """A pair's scores are the same alone and inside a batch of 32 mixed-length pairs
    and pairs that share runs of tokens below, at and beyond their prompts."""
    options = ScoreOptions(tokenization=mode, return_tokens=True)
    pairs = mixed_pairs(32, seed=2) + prefix_pairs()
    assert_shares_below_prompts(engine, engine.prepare(pairs, options))
    batched = engine.score_pairs(pairs, options)
    lengths = {len(p.input_ids) for p in engine.prepare(pairs, options)}
    assert len(lengths) > 5, "the batch must really mix lengths"
    assert forward_passes(engine, engine.prepare(pairs, options)) == 1
    shares = set(prefix_pairs())
    for pair, in_batch in zip(pairs, batched, strict=True):
        [alone] = engine.score_pairs([pair], options)
        assert_same_scores(alone, in_batch, SHARED_RUN_TOKEN_TOL if pair in shares else TOKEN_TOL)


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_packed_rows_are_bitwise_batch_invariant(family, mode):
    """In packed rows (the CPU default) a pair's scores are bit for bit the same
    alone, duplicated, beside pairs sharing its prompt, beside pairs that share
    long runs with each other (not with it) and in a mixed batch: GEMMs under 16
    rows are padded (kernels.RowStableLinear) and a pair that shares no run of
    MIN_SHARED_TOKENS beyond its whole prompt is always laid out as prompt +
    response segments (tries.build_tries)."""
    eng = make_engine(*family, packing=True)
    options = ScoreOptions(tokenization=mode, return_tokens=True)
    pairs = mixed_pairs(16, seed=4) + [Pair("Hello", ""), Pair("", "Hello world."), Pair("a", "b")]
    shared = [Pair(pairs[0].prompt, " another response"), Pair(pairs[3].prompt, "")]
    others = prefix_pairs()
    for pair in pairs:
        [alone] = eng.score_pairs([pair], options)
        for batch in (pairs, [pair, pair], [pair, *shared], [*shared, pair, *pairs[::-1]], [*others, pair]):
            got = eng.score_pairs(batch, options)[batch.index(pair)]
            assert (got.prompt_logprob, got.conditional_logprob) == (
                alone.prompt_logprob,
                alone.conditional_logprob,
            ), pair
            assert [t.logprob for t in got.tokens] == [t.logprob for t in alone.tokens]


def test_calls_batched_by_shape_stay_bitwise(family):
    """Responses of one length to prompts of one length (answers to a question, several
    questions) run as one batched attention call a layer (packing.SegmentBatch); each
    pair's scores are still bit for bit its scores alone."""
    eng = make_engine(*family, packing=True)
    vocab = len(family[1])
    prompts = [tuple(range(5 + k, 17 + k)) for k in (0, 40)]  # two prompts of 12 ids
    pairs = [Pair(prompt_ids=p, response_ids=(30 + j, 31 + j, 7)) for p in prompts for j in range(4)]
    assert max(max(p.prompt_ids) for p in pairs) < vocab
    prepared = eng.prepare(pairs, ScoreOptions())
    items, rows = eng.plan_packed_rows(prepared)
    [row] = [pack_row([items[j] for j in members], device=torch.device("cpu")) for members in rows]
    batches = [s for s in row.segments if isinstance(s, SegmentBatch)]
    assert [tuple(s.queries.shape) for s in batches] == [
        (8, 2)
    ]  # one call, not eight (a last token feeds nothing)
    for pair, got in zip(pairs, eng.score_pairs(pairs, ScoreOptions(return_tokens=True)), strict=True):
        [alone] = eng.score_pairs([pair], ScoreOptions(return_tokens=True))
        assert [t.logprob for t in got.tokens] == [t.logprob for t in alone.tokens]
        assert (got.prompt_logprob, got.conditional_logprob) == (
            alone.prompt_logprob,
            alone.conditional_logprob,
        )


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_shared_runs_move_scores_by_attention_rounding_only(family, mode):
    """A pair whose sequence a batch mate cuts below its prompt end (a shared run of
    MIN_SHARED_TOKENS or more) runs its attention as more calls over the same keys,
    which rounds differently: not bitwise, but within float32 noise of its scores
    alone (SHARED_RUN_TOKEN_TOL: measured and bounded in harness/scoring.py)."""
    eng = make_engine(*family, packing=True)
    options = ScoreOptions(tokenization=mode, return_tokens=True)
    pairs = prefix_pairs()
    prepared = eng.prepare(pairs, options)
    items, _ = eng.plan_packed_rows(prepared)
    assert max(len(item.nodes) for item in items) > 4, "the batch must build a real trie"
    batched = eng.score_pairs(pairs, options)
    moved = 0
    for pair, in_batch in zip(pairs, batched, strict=True):
        [alone] = eng.score_pairs([pair], options)
        assert_same_scores(alone, in_batch, SHARED_RUN_TOKEN_TOL)
        moved += [t.logprob for t in alone.tokens] != [t.logprob for t in in_batch.tokens]
    print(f"{moved} of {len(pairs)} pairs not bitwise")
    # identical pairs stay identical, bit for bit
    assert batched[0] == dataclasses.replace(batched[-1], id=batched[0].id)


def test_packed_trie_counts_what_it_saves(family):
    """Packed rows: each trie node is computed once, and reused_tokens (the
    pairscore_forward_tokens_total{kind="reused"} counter) is every sequence's tokens
    less the nodes' tokens; real_tokens is the positions fed (a leaf's last token is a
    target only)."""
    eng = make_engine(*family)
    prepared = eng.prepare(prefix_pairs(), ScoreOptions())
    items, rows = eng.plan_packed_rows(prepared)
    assert len(rows) == 1
    [trie] = {id(item.trie): item.trie for item in items if item.size}.values()
    node_tokens = sum(len(n.tokens) for n in trie.nodes)
    stats = eng.score(prepared).stats
    assert stats.reused_tokens == sum(p.num_tokens for p in prepared) - node_tokens
    assert stats.real_tokens == trie.size == node_tokens - sum(1 for n in trie.nodes if not n.children)
    assert stats.reused_tokens > 4 * 16  # the preamble, for 5 more pairs at least


def test_invariants(engine):
    pairs = mixed_pairs(24, seed=3)
    for got in engine.score_pairs(pairs, ScoreOptions(return_tokens=True)):
        assert got.joint_logprob == got.prompt_logprob + got.conditional_logprob
        prompt = [t.logprob for t in got.tokens[: got.prompt_tokens]]
        response = [t.logprob for t in got.tokens[got.prompt_tokens :]]
        assert len(prompt) == got.prompt_tokens and len(response) == got.response_tokens
        assert math.fsum(prompt) == pytest.approx(got.prompt_logprob, abs=1e-9)
        assert math.fsum(response) == pytest.approx(got.conditional_logprob, abs=1e-9)
        assert all(t.logprob <= 0.0 for t in got.tokens)
        assert got.prompt_logprob <= 0.0 and got.conditional_logprob <= 0.0


def test_chunking_and_budget_do_not_change_scores(family):
    """One-row logit chunks and tiny token budgets give the same scores as the defaults."""
    model, tokenizer = family
    pairs = mixed_pairs(16, seed=4)
    default = make_engine(model, tokenizer).score_pairs(pairs)
    vocab = model.get_output_embeddings().weight.shape[0]
    small = make_engine(model, tokenizer, max_batch_tokens=64, chunk_bytes=4 * vocab)
    assert small._logprobs.chunk_rows == 1
    assert len(small.plan_batches(small.prepare(pairs, ScoreOptions()))) > 3
    for a, b in zip(default, small.score_pairs(pairs), strict=True):
        assert_same_scores(a, b)


def test_full_logits_path_matches_split_head(family):
    """The fallback for models with non-plain heads agrees with the split-head path."""
    model, tokenizer = family
    pairs = mixed_pairs(8, seed=5)
    split = make_engine(model, tokenizer)
    full = make_engine(model, tokenizer)
    full._logprobs.use_full_logits()
    for a, b in zip(split.score_pairs(pairs), full.score_pairs(pairs), strict=True):
        assert_same_scores(a, b)


def test_plan_batches_respects_budget(family):
    model, tokenizer = family
    eng = make_engine(model, tokenizer, max_batch_tokens=100)
    prepared = eng.prepare(mixed_pairs(40, seed=6), ScoreOptions())
    batches = eng.plan_batches(prepared)
    assert sorted(i for b in batches for i in b) == list(range(40))
    for batch in batches:
        width = max(prepared[i].num_tokens for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 100


def test_only_prefix_sequences(engine):
    """Pairs with both sides empty score 0 and do not break a batch."""
    results = engine.score_pairs([Pair("", ""), Pair("", ""), Pair("a", "b")])
    assert results[0].joint_logprob == 0.0 and results[0].prompt_tokens == 0
    assert results[1].response_tokens == 0
    assert results[2].joint_logprob < 0.0


SHARED_PROMPTS = ["The capital of France is", "", "Question: what is two plus two? Answer:"]
SHARED_RESPONSES = ["", " Paris.", "x", " a much longer response with several words 😀 你好", " four"]


def test_shared_prompts_run_once_and_score_like_separate_pairs(family):
    """Padded layout: pairs sharing a prompt reuse its key/value cache and get the same scores."""
    model, tokenizer = family
    shared = make_engine(model, tokenizer, max_batch_tokens=120, packing=False)
    plain = make_engine(model, tokenizer, share_prompts=False, packing=False)
    pairs = [Pair(x, y) for x in SHARED_PROMPTS for y in SHARED_RESPONSES] + [Pair("unique prompt", " y")]
    prepared = shared.prepare(pairs, ScoreOptions(return_tokens=True))
    tries = [t for t in shared.plan_tries(prepared) if t.sequences > 1]
    assert sorted(t.sequences for t in tries) == [5, 5, 5]
    calls = []
    original = shared._logprobs.trie
    shared._logprobs.trie = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    scored = shared.score(prepared)
    got, stats = scored.scores, scored.stats
    assert len(calls) == 3, "each distinct prompt runs once"
    prompt_lens = [len(t.nodes[0].tokens) for t in tries]
    assert sorted(prompt_lens) == sorted(1 + prepared[5 * k].prompt_tokens for k in range(3))
    assert stats.reused_tokens == sum(n * 4 for n in prompt_lens)
    computed = sum(p.num_tokens for p in prepared) - stats.reused_tokens
    assert stats.real_tokens == computed and stats.padded_tokens >= computed
    want = plain.score_pairs(pairs, ScoreOptions(return_tokens=True))
    for a, b in zip(got, want, strict=True):
        assert_same_scores(a, b)


def test_padded_trie_runs_each_shared_run_once(family):
    """Padded layout with the trie: a run shared below the prompts is computed once on
    a key/value cache (the root), each prompt's rest once on top of it, and the
    scores are those of the pairs run one by one."""
    model, tokenizer = family
    eng = make_engine(model, tokenizer, packing=False)
    plain = make_engine(model, tokenizer, share_prompts=False, packing=False)
    pairs = prefix_pairs()
    options = ScoreOptions(return_tokens=True)
    prepared = eng.prepare(pairs, options)
    tries = [t for t in eng.plan_tries(prepared) if t.sequences > 1]
    [trie] = tries
    assert trie.sequences == len(pairs)
    root = len(trie.nodes[0].tokens)
    assert root >= 16 and root <= 1 + min(p.prompt_tokens for p in prepared if p.id != "crosses-boundary") + 1
    scored = eng.score(prepared)
    computed = sum(len(n.tokens) for n in trie.nodes)
    assert scored.stats.real_tokens == computed
    assert scored.stats.reused_tokens == sum(p.num_tokens for p in prepared) - computed
    for a, b in zip(scored.scores, plain.score_pairs(pairs, options), strict=True):
        assert_same_scores(a, b)


@pytest.mark.parametrize("capacity", [4096, 12])
def test_packed_rows_share_prompts_and_score_like_separate_pairs(family, capacity):
    """Packed layout: a shared prompt is computed once per row for all its responses
    (once per row it lands in, when its responses overflow the capacity), and every
    pair scores as it does run on its own."""
    model, tokenizer = family
    packed = make_engine(model, tokenizer, max_batch_tokens=capacity)
    plain = make_engine(model, tokenizer, share_prompts=False, packing=False)
    assert packed.packing
    pairs = [Pair(x, y) for x in SHARED_PROMPTS for y in SHARED_RESPONSES] + [Pair("unique prompt", " y")]
    options = ScoreOptions(return_tokens=True)
    prepared = packed.prepare(pairs, options)
    scored = packed.score(prepared)
    got, stats = scored.scores, scored.stats
    # A packed row has no padding, only a filler segment up to a multiple of
    # ROW_ALIGN positions (batch invariance, packing.py).
    rows = len(packed.plan_packed_rows(prepared)[1])
    assert stats.real_tokens <= stats.padded_tokens < stats.real_tokens + ROW_ALIGN * rows
    n = len(SHARED_RESPONSES)
    prompt_lens = [1 + prepared[n * k].prompt_tokens for k in range(len(SHARED_PROMPTS))]
    if capacity == 4096:
        # Each prompt once (with its last token, which predicts every y_1), each
        # response without its last token, the lone pair without its last token.
        want_inputs = (
            sum(prompt_lens)
            + sum(
                max(p.num_tokens - plen - 1, 0)
                for k, plen in enumerate(prompt_lens)
                for p in prepared[n * k : n * (k + 1)]
            )
            + prepared[-1].num_tokens
            - 1
        )
        assert stats.real_tokens == want_inputs
        assert stats.reused_tokens == sum(plen * (n - 1) for plen in prompt_lens)
    else:
        assert 0 < stats.reused_tokens < sum(plen * (n - 1) for plen in prompt_lens)
    for a, b in zip(got, plain.score_pairs(pairs, options), strict=True):
        assert_same_scores(a, b)


def test_padded_batches_keep_padding_efficiency():
    from pairscore_server.engine.logprobs import plan_padded_batches

    lengths = [100, 95, 91, 60, 58, 10, 9, 200, 3]
    batches = plan_padded_batches(lengths, max_tokens=1000, min_efficiency=0.9)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert sum(lengths[i] for i in batch) >= 0.9 * width * len(batch) or len(batch) == 1
        assert width * len(batch) <= 1000 or len(batch) == 1
    assert [0, 1, 2] in batches  # 100, 95, 91 pack at 95% efficiency
    loose = plan_padded_batches(lengths, max_tokens=10_000, min_efficiency=0.0)
    assert len(loose) == 1


def test_a_call_holds_several_forward_passes(family):
    model, tokenizer = family
    eng = make_engine(model, tokenizer, max_batch_tokens=100, call_batches=3)
    assert eng.max_call_tokens == 300
    prepared = eng.prepare(mixed_pairs(30, seed=7), ScoreOptions())
    assert all(
        len(b) * max(prepared[i].num_tokens for i in b) <= 100 or len(b) == 1
        for b in eng.plan_batches(prepared)
    )
