"""Tier 1: the data-selection scores (docs/scores.md) against independent references.

* unconditional_logprob, PMI and IFD against a float64 forward pass over
  p ⊕ y (the same response ids), alone and in batches mixed with pairs that
  did not ask for them;
* ranks and response_is_greedy against an argmax / comparison over the
  full float32 log-softmax of the model's own logits;
* top-k against torch.topk over that log-softmax, as a set.

The references share no code with the engine except the token ids.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pairscore.types import ItemError, Pair, PairScore, ScoreOptions, TokenizationMode

from harness.scoring import assert_same_scores, mixed_pairs

TOL = 1e-4  # nats, on each sum, fp32 engine vs float64 reference
#: Two log-probs closer than this (float32 noise between batch shapes, measured
#: <= 5.7e-6 per token, see harness/scoring.py) may be ordered either way.
TIE_EPS = 2e-5


@pytest.fixture(scope="module")
def reference_model(family):
    model, _ = family
    return copy.deepcopy(model).double().eval()


def reference_logprobs(model64, ids: tuple[int, ...]) -> list[float]:
    """log P(t_j | t_<j), j = 1..L-1, float64, one unbatched sequence."""
    if len(ids) < 2:
        return []
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def full_float32_logsoftmax(model, ids: tuple[int, ...]) -> torch.Tensor:
    """[L-1 x vocab] float32 log-softmax of the model's own logits, one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _prepared(engine, pair: Pair, options: ScoreOptions):
    [prep] = engine.prepare([pair], options)
    return prep


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_unconditional_pmi_ifd_match_float64_reference(engine, reference_model, mode):
    options = ScoreOptions(tokenization=mode, unconditional=True)
    pairs = mixed_pairs(24, seed=3)
    results = engine.score_pairs(pairs, options)
    worst = 0.0
    for pair, got in zip(pairs, results, strict=True):
        assert isinstance(got, PairScore), got
        prep = _prepared(engine, pair, options)
        m = prep.prompt_tokens
        ref_cond = math.fsum(reference_logprobs(reference_model, prep.input_ids)[m:])
        # the same response ids, after the prefix token alone
        ref_uncond = math.fsum(reference_logprobs(reference_model, (prep.input_ids[0], *prep.response_ids)))
        worst = max(worst, abs(got.unconditional_logprob - ref_uncond))
        assert got.unconditional_logprob == pytest.approx(ref_uncond, abs=TOL)
        assert got.pmi == pytest.approx(ref_cond - ref_uncond, abs=2 * TOL)
        if got.response_tokens == 0:
            assert got.unconditional_logprob == 0.0 and got.pmi == 0.0 and math.isnan(got.ifd)
        else:
            # IFD = mean NLL(y | x) / mean NLL(y): the token count cancels
            ref_ifd = (-ref_cond / prep.response_tokens) / (-ref_uncond / prep.response_tokens)
            assert got.ifd == pytest.approx(ref_ifd, rel=1e-4, abs=1e-6)
    print(f"worst |unconditional - float64| = {worst:.2e} nats")


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_mixed_batch_with_and_without_unconditional(engine, reference_model, mode):
    """Pairs that ask and pairs that do not, in one score call: the latter are scored as
    without the option, the former get the same unconditional scores as alone."""
    pairs = mixed_pairs(16, seed=5)
    plain = ScoreOptions(tokenization=mode)
    asking = ScoreOptions(tokenization=mode, unconditional=True)
    prepared = [engine.prepare([p], asking if i % 2 else plain)[0] for i, p in enumerate(pairs)]
    mixed = engine.score(prepared).scores
    alone_plain = engine.score_pairs(pairs, plain)
    alone_asking = engine.score_pairs(pairs, asking)
    for i, got in enumerate(mixed):
        assert_same_scores(got, alone_plain[i])
        if i % 2:
            assert got.unconditional_logprob == pytest.approx(alone_asking[i].unconditional_logprob, abs=TOL)
            assert got.ifd == pytest.approx(alone_asking[i].ifd, rel=1e-4, nan_ok=True)
        else:
            assert got.unconditional_logprob is None and got.pmi is None and got.ifd is None
            assert got.response_is_greedy is None


def test_unconditional_equals_scoring_the_response_with_an_empty_prompt(engine):
    """SEPARATE mode: y's ids do not depend on x, so log P(y) is the conditional score of ("", y)."""
    options = ScoreOptions(unconditional=True)
    for pair in mixed_pairs(12, seed=7):
        [got, direct] = engine.score_pairs([pair, Pair("", pair.response)], options)
        assert got.unconditional_logprob == pytest.approx(direct.conditional_logprob, abs=TOL)
        assert direct.unconditional_logprob == direct.conditional_logprob  # x = "": its own p ⊕ y
        assert direct.pmi == 0.0


def test_identical_responses_are_scored_once(engine):
    prepared = [
        engine.prepare([p], ScoreOptions(unconditional=True))[0]
        for p in (Pair("a b", " the capital"), Pair("x", " the capital"), Pair("", " the capital"))
    ]
    seqs, prompt_lens, sources = engine.sequences(prepared)
    assert len(seqs) == 3  # the pairs; ("", y) is the p ⊕ y of all three
    assert sources == [2, 2, 2]
    scores = engine.score(prepared).scores
    assert scores[0].unconditional_logprob == scores[2].conditional_logprob


def test_joint_mode_counts_the_straddling_token(engine):
    """JOINT: the unconditional score runs over the very ids of the response side,
    the straddling token included (docs/scores.md)."""
    options = ScoreOptions(tokenization=TokenizationMode.JOINT, unconditional=True, return_tokens=True)
    pair = Pair("The capital of Fr", "ance is Paris")
    [got] = engine.score_pairs([pair], options)
    prep = _prepared(engine, pair, options)
    response = [t.token_id for t in got.tokens[got.prompt_tokens :]]
    assert tuple(response) == prep.response_ids
    alone = engine.score(
        [
            type(prep)(
                id="",
                input_ids=(prep.input_ids[0], *prep.response_ids),
                prompt_tokens=0,
                response_tokens=len(response),
                offsets=(),
                boundary_straddled=False,
                return_tokens=False,
            )
        ]
    ).scores[0]
    assert got.unconditional_logprob == pytest.approx(alone.conditional_logprob, abs=TOL)


def _bounds_rank(lp_row: torch.Tensor, target: int) -> tuple[int, int]:
    """The ranks the target may have, allowing for float32 noise near ties."""
    t = float(lp_row[target])
    lo = 1 + int((lp_row > t + TIE_EPS).sum())
    hi = 1 + int((lp_row > t - TIE_EPS).sum()) - 1  # the target itself is within eps
    return lo, max(lo, hi)


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_ranks_and_greedy_match_full_logsoftmax(engine, family, mode):
    model, _ = family
    options = ScoreOptions(tokenization=mode, greedy=True, return_tokens=True)
    pairs = mixed_pairs(12, seed=11)
    results = engine.score_pairs(pairs, options)
    for pair, got in zip(pairs, results, strict=True):
        prep = _prepared(engine, pair, options)
        if len(prep.input_ids) < 2:
            continue
        lps = full_float32_logsoftmax(model, prep.input_ids)
        greedy_ref = True
        for j, tok in enumerate(got.tokens):
            lo, hi = _bounds_rank(lps[j], tok.token_id)
            assert lo <= tok.rank <= hi, (j, tok.rank, lo, hi)
            if j >= got.prompt_tokens:
                greedy_ref &= int(lps[j].argmax()) == tok.token_id or lo == 1 == tok.rank
        assert got.response_is_greedy == greedy_ref


def test_greedy_continuation_is_greedy(engine, family):
    """A response made of the model's own argmax tokens is greedy, rank 1 everywhere;
    changing its last token makes it not greedy."""
    model, _ = family
    prep = _prepared(engine, Pair("the capital of France is", ""), ScoreOptions(greedy=True))
    ids = list(prep.input_ids)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = type(prep)(
        id="g",
        input_ids=tuple(ids),
        prompt_tokens=prep.prompt_tokens,
        response_tokens=6,
        offsets=((0, 0),) * (len(ids) - 1),
        boundary_straddled=False,
        return_tokens=True,
        greedy=True,
    )
    worse = type(greedy)(**{**greedy.__dict__, "input_ids": (*ids[:-1], (ids[-1] + 1) % 50)})
    got, bad = engine.score([greedy, worse]).scores
    assert got.response_is_greedy is True
    assert all(t.rank == 1 for t in got.tokens[greedy.prompt_tokens :])
    assert bad.response_is_greedy is False and bad.tokens[-1].rank > 1


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_top_k_matches_torch_topk(engine, family, mode):
    model, _ = family
    k = 20
    options = ScoreOptions(tokenization=mode, top_k=k)
    pairs = mixed_pairs(8, seed=13)
    results = engine.score_pairs(pairs, options)
    for pair, got in zip(pairs, results, strict=True):
        prep = _prepared(engine, pair, options)
        assert len(got.tokens) == len(prep.input_ids) - 1  # top_k implies per-token detail
        if not got.tokens:
            continue
        lps = full_float32_logsoftmax(model, prep.input_ids)
        values, ids = lps.topk(k, dim=-1)
        for j, tok in enumerate(got.tokens):
            assert len(tok.top_k) == k
            got_lps = [a.logprob for a in tok.top_k]
            assert got_lps == sorted(got_lps, reverse=True)
            for a, v in zip(tok.top_k, values[j].tolist(), strict=True):
                assert a.logprob == pytest.approx(v, abs=TOL)
                assert a.logprob == pytest.approx(float(lps[j, a.token_id]), abs=TOL)
            # as sets, except for tokens within float noise of the k-th value (ties)
            kth = float(values[j, -1])
            sure = {int(t) for t, v in zip(ids[j], values[j], strict=True) if v > kth + TIE_EPS}
            got_ids = {a.token_id for a in tok.top_k}
            assert sure <= got_ids
            assert all(float(lps[j, t]) >= kth - TIE_EPS for t in got_ids)
            assert (
                tok.top_k[0].text
                == engine.pair_tokenizer.token_texts(engine.prefix.token_id, (tok.top_k[0].token_id,))[0]
            )


def test_detail_does_not_change_log_probs(engine):
    """Ranks and top-k come from the same head; the log-probs stay those of plain scoring."""
    pairs = mixed_pairs(10, seed=17)
    plain = engine.score_pairs(pairs, ScoreOptions(return_tokens=True))
    detailed = engine.score_pairs(pairs, ScoreOptions(greedy=True, top_k=5, unconditional=True))
    for a, b in zip(plain, detailed, strict=True):
        assert_same_scores(a, b)


@pytest.mark.parametrize("k", [-1, 21])
def test_top_k_out_of_range_is_an_item_error_naming_the_limit(engine, k):
    [got] = engine.score_pairs([Pair("a", "b")], ScoreOptions(top_k=k))
    assert isinstance(got, ItemError)
    assert "max_top_k" in got.message and "20" in got.message


def test_the_head_stays_chunked_with_ranks_and_top_k(family, monkeypatch):
    """With ranks and top-20 on, no log-softmax sees more rows than one chunk: the
    [tokens x vocab] tensor is never built (docs/scores.md, Cost and memory)."""
    from harness.models import make_engine

    model, tokenizer = family
    vocab = model.get_output_embeddings().weight.shape[0]
    eng = make_engine(model, tokenizer, chunk_bytes=4 * vocab * 8)  # 8 rows a chunk
    assert eng._logprobs.chunk_rows == 8
    seen: list[int] = []
    real = torch.log_softmax

    def recording(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    long_pair = Pair(" ".join(["the capital of France is Paris"] * 6), " hello world 42" * 5)
    plain = eng.score_pairs([long_pair], ScoreOptions(unconditional=True, return_tokens=True))
    monkeypatch.setattr(torch, "log_softmax", recording)
    [got] = eng.score_pairs([long_pair], ScoreOptions(unconditional=True, greedy=True, top_k=20))
    monkeypatch.undo()
    assert got.prompt_tokens + got.response_tokens > 40 and seen and max(seen) <= 8
    assert_same_scores(got, plain[0])
    assert got.unconditional_logprob == pytest.approx(plain[0].unconditional_logprob, abs=TOL)


def test_response_size_bound_covers_top_k(engine):
    """The bound the server checks before scoring (response_size.result_bytes_bound) holds with
    top-20 alternatives, ranks and the data-selection scores on."""
    from pairscore.convert import response_to_pb
    from pairscore_server.response_size import result_bytes_bound

    pairs = [*mixed_pairs(12, seed=19), Pair("e\u0301 😀 你好", " naïve\n\t", id="x" * 50)]
    outcomes = engine.score_pairs(pairs, ScoreOptions(top_k=20, greedy=True, unconditional=True))
    actual = response_to_pb(outcomes).ByteSize()
    bound = sum(
        result_bytes_bound(
            id=p.id,
            tokens=o.prompt_tokens + o.response_tokens,
            text_bytes=len(p.prompt.encode()) + len(p.response.encode()),
            top_k=20,
            max_token_text_bytes=engine.info.max_token_text_bytes,
        )
        for p, o in zip(pairs, outcomes, strict=True)
    )
    assert actual <= bound, (actual, bound)


def test_work_tokens_count_the_unconditional_rows(engine):
    """The batcher queues and measures throughput in work_tokens: p ⊕ x ⊕ y, plus p ⊕ y
    when asked (none for an empty response, or an empty prompt: its own p ⊕ y)."""
    pairs = [Pair("a question", " an answer"), Pair("a question", ""), Pair("", " an answer")]
    plain = engine.prepare(pairs, ScoreOptions())
    asking = engine.prepare(pairs, ScoreOptions(unconditional=True))
    assert [p.work_tokens for p in plain] == [p.num_tokens for p in plain]
    assert asking[0].work_tokens == asking[0].num_tokens + 1 + asking[0].response_tokens
    assert [p.work_tokens for p in asking[1:]] == [p.num_tokens for p in asking[1:]]
