"""Tier 1: the input forms of issue 14/16 in the engine, against a float64 reference.

Token-id sides (``prompt_ids`` / ``response_ids``), ``PrefixMode.NONE``
(the first prompt token is context only, as lm-evaluation-harness) and
``Truncation.LEFT`` (drop prompt tokens from the start until the pair fits),
on the three tiny tokenizer families and both forward-pass layouts. The
reference is one unbatched float64 forward pass over the exact ids the
contract says are scored, written here from the contract, not the engine.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    Side,
    TokenizationMode,
    Truncation,
)

from harness.scoring import assert_same_scores, mixed_pairs

TOL = 1e-4  # nats, on each sum, fp32 engine vs float64 reference (as test_engine_math)


@pytest.fixture(scope="module")
def reference_model(family):
    model, _ = family
    return copy.deepcopy(model).double().eval()


def reference_logprobs(model64, ids: tuple[int, ...]) -> list[float]:
    """log P(t_j | t_<j) for j = 1..L-1 in float64, one unbatched sequence."""
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def sides(engine, pair: Pair) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The x and y ids a text pair is scored with (SEPARATE), however long."""
    tok = engine.pair_tokenizer.encode(pair.prompt, pair.response, TokenizationMode.SEPARATE)
    return tok.ids[: tok.prompt_tokens], tok.ids[tok.prompt_tokens :]


def check_against_reference(model64, got: PairScore, ids: tuple[int, ...], m: int) -> None:
    """``got`` scores ids[1:] with the first ``m`` of them the prompt's."""
    ref = reference_logprobs(model64, ids)
    assert got.prompt_tokens == m and got.response_tokens == len(ids) - 1 - m
    assert got.prompt_logprob == pytest.approx(math.fsum(ref[:m]), abs=TOL)
    assert got.conditional_logprob == pytest.approx(math.fsum(ref[m:]), abs=TOL)
    assert got.joint_logprob == pytest.approx(got.prompt_logprob + got.conditional_logprob, abs=1e-9)
    if got.tokens:
        assert [t.token_id for t in got.tokens] == list(ids[1:])
        for tok, r in zip(got.tokens, ref, strict=True):
            assert tok.logprob == pytest.approx(r, abs=TOL)


# --- token ids ------------------------------------------------------------------------


def test_ids_score_exactly_as_the_text_they_tokenize_to(engine):
    """A pair sent as ids (either side or both) scores as the text pair whose
    tokenization those ids are; text sides keep their spans, id sides have none."""
    options = ScoreOptions(return_tokens=True)
    texts = [p for p in mixed_pairs(12, seed=5) if p.prompt and p.response]
    forms = []
    for p in texts:
        x, y = sides(engine, p)
        forms += [
            (p, Pair(prompt_ids=x, response_ids=y, id=p.id)),
            (p, Pair(prompt_ids=x, response=p.response, id=p.id)),
            (p, Pair(prompt=p.prompt, response_ids=y, id=p.id)),
        ]
    text_results = engine.score_pairs([t for t, _ in forms], options)
    id_results = engine.score_pairs([f for _, f in forms], options)
    for (_, form), want, got in zip(forms, text_results, id_results, strict=True):
        assert isinstance(got, PairScore), got
        assert_same_scores(want, got)
        for w, g in zip(want.tokens, got.tokens, strict=True):
            given_as_ids = (
                form.prompt_ids is not None if g.side is Side.PROMPT else form.response_ids is not None
            )
            assert g.side == w.side
            assert (g.char_start, g.char_end) == ((0, 0) if given_as_ids else (w.char_start, w.char_end))


def test_arbitrary_ids_match_the_float64_reference(engine, reference_model):
    """Ids no text tokenizes to (special tokens included) are scored as given after p."""
    vocab = engine.info.vocab_size
    rng = random.Random(7)
    pairs = []
    for i in range(10):
        x = tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 20)))
        y = tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 20)))
        pairs.append(Pair(prompt_ids=x, response_ids=y, id=str(i)))
    pairs.append(Pair(prompt_ids=(engine.prefix.token_id, 0, vocab - 1), response_ids=(vocab - 1,)))
    results = engine.score_pairs(pairs, ScoreOptions(return_tokens=True, unconditional=True))
    for pair, got in zip(pairs, results, strict=True):
        assert isinstance(got, PairScore), got
        assert pair.prompt_ids is not None and pair.response_ids is not None
        check_against_reference(
            reference_model,
            got,
            (engine.prefix.token_id, *pair.prompt_ids, *pair.response_ids),
            len(pair.prompt_ids),
        )
        alone = reference_logprobs(reference_model, (engine.prefix.token_id, *pair.response_ids))
        assert got.unconditional_logprob == pytest.approx(math.fsum(alone), abs=TOL)


def test_bad_ids_and_forms_fail_their_item_only(engine):
    vocab = engine.info.vocab_size
    pairs = [
        Pair("Hello", " world", id="ok"),
        Pair(prompt_ids=(1, vocab, 2), response="x", id="too-big"),
        Pair(prompt="a", response_ids=(3, -1), id="negative"),
        Pair(prompt="Hello", prompt_ids=(1,), response="x", id="two-prompts"),
        Pair(prompt="Hello", response="x", response_ids=(1,), id="two-responses"),
        Pair(prompt_ids=(), response_ids=(5,), id="empty-ids-ok"),
    ]
    results = engine.score_pairs(pairs)
    assert isinstance(results[0], PairScore) and isinstance(results[5], PairScore)
    assert results[5].prompt_tokens == 0 and results[5].response_tokens == 1
    for got, needles in zip(
        results[1:5],
        (
            ["prompt_ids[1]", str(vocab), f"0 .. {vocab - 1}"],
            ["response_ids[1]", "-1", str(vocab)],
            ["prompt is given twice", "prompt_ids"],
            ["response is given twice", "response_ids"],
        ),
        strict=True,
    ):
        assert isinstance(got, ItemError) and got.code is ItemErrorCode.INVALID_ARGUMENT, got
        for needle in needles:
            assert needle in got.message, got.message


# --- prefix NONE ----------------------------------------------------------------------


def test_prefix_none_conditions_on_the_first_prompt_token(engine, reference_model):
    """PREFIX_MODE_NONE: x_1 is context only (lm-eval's convention): prompt_logprob
    sums x_2..x_m, prompt_tokens = m - 1, the detail leaves x_1 out, spans still
    index the prompt text; an empty prompt still gets p; the unconditional score
    uses p."""
    none = ScoreOptions(prefix=PrefixMode.NONE, return_tokens=True, unconditional=True)
    server = ScoreOptions(return_tokens=True, unconditional=True)
    pairs = [*mixed_pairs(12, seed=8), Pair(prompt_ids=(5,), response=" b")]
    got_none = engine.score_pairs(pairs, none)
    got_server = engine.score_pairs(pairs, server)
    for pair, got, base in zip(pairs, got_none, got_server, strict=True):
        assert isinstance(got, PairScore) and isinstance(base, PairScore)
        x, y = (
            (pair.prompt_ids, sides(engine, Pair("", pair.response))[1])
            if pair.prompt_ids
            else sides(engine, pair)
        )
        if not x:  # an empty prompt still gets the server's prefix token
            assert_same_scores(base, got)
            continue
        check_against_reference(reference_model, got, (*x, *y), len(x) - 1)
        # by hand: the same ids, the first one given, nothing before it scored
        ref = reference_logprobs(reference_model, (*x, *y))
        assert got.prompt_logprob == pytest.approx(math.fsum(ref[: len(x) - 1]), abs=TOL)
        assert got.conditional_logprob == pytest.approx(math.fsum(ref[len(x) - 1 :]), abs=TOL)
        assert [(t.side, t.char_start, t.char_end) for t in got.tokens] == [
            (t.side, t.char_start, t.char_end) for t in base.tokens[1:]
        ]
        # unconditional: y after p alone, as with the server's prefix
        assert got.unconditional_logprob == pytest.approx(base.unconditional_logprob, abs=TOL)


def test_prefix_none_one_token_prompt_scores_y_given_that_token(engine, reference_model):
    [got] = engine.score_pairs(
        [Pair(prompt_ids=(7,), response_ids=(8, 9))], ScoreOptions(prefix=PrefixMode.NONE)
    )
    assert isinstance(got, PairScore)
    assert (got.prompt_tokens, got.prompt_logprob) == (0, 0.0)
    ref = reference_logprobs(reference_model, (7, 8, 9))
    assert got.conditional_logprob == pytest.approx(math.fsum(ref), abs=TOL)


# --- left truncation ------------------------------------------------------------------


LONG_PROMPT = "The capital of France is Paris. The capital of Italy is Rome. " * 12


@pytest.mark.parametrize("prefix", list(PrefixMode))
def test_left_truncation_drops_the_start_of_the_prompt(engine, reference_model, prefix):
    """TRUNCATION_LEFT: the fewest tokens are dropped from the start of x so that
    c ⊕ x ⊕ y fits the limit; the scores are those of the kept tokens, whose spans
    still index the original prompt text."""
    limit = 40
    pair = Pair(LONG_PROMPT, " Hello world!")
    x, y = sides(engine, pair)
    full = engine.pair_tokenizer.encode(pair.prompt, pair.response, TokenizationMode.SEPARATE)
    options = ScoreOptions(truncation=Truncation.LEFT, prefix=prefix, return_tokens=True)
    [prep] = engine.prepare([pair], options, max_tokens=limit)
    assert prep.num_tokens == limit
    [got] = engine.score([prep]).scores
    dropped = len(x) + len(y) + 1 - limit if prefix is PrefixMode.SERVER else len(x) + len(y) - limit
    assert got.prompt_tokens_dropped == dropped > 0
    kept = x[dropped:]
    if prefix is PrefixMode.SERVER:
        check_against_reference(reference_model, got, (engine.prefix.token_id, *kept, *y), len(kept))
        spans = full.offsets[dropped:]
    else:
        check_against_reference(reference_model, got, (*kept, *y), len(kept) - 1)
        spans = full.offsets[dropped + 1 :]
    assert [(t.char_start, t.char_end) for t in got.tokens] == list(spans)
    # the kept prompt tokens' spans cover the end of the original prompt text
    prompt_spans = [t for t in got.tokens if t.side is Side.PROMPT]
    assert prompt_spans[-1].char_end == len(LONG_PROMPT)


def test_left_truncation_edge_cases(engine):
    vocab = engine.info.vocab_size
    limit = 20
    left = ScoreOptions(truncation=Truncation.LEFT)
    pairs = [
        Pair(prompt_ids=(3,) * 30, response_ids=(4,) * 19, id="prompt-all-dropped"),
        Pair(prompt_ids=(3,) * 30, response_ids=(4,) * 20, id="response-too-long"),
        Pair(prompt_ids=(3,) * 5, response_ids=(4,) * 5, id="fits"),
        Pair(prompt_ids=(vocab,), response_ids=(4,), id="bad-id"),
    ]
    dropped, too_long, fits, bad = _score(engine, pairs, left, limit)
    assert isinstance(dropped, PairScore) and (dropped.prompt_tokens, dropped.prompt_tokens_dropped) == (
        0,
        30,
    )
    assert isinstance(too_long, ItemError) and too_long.code is ItemErrorCode.INVALID_ARGUMENT
    assert "21 tokens" in too_long.message and "max_item_tokens" in too_long.message
    assert isinstance(fits, PairScore) and fits.prompt_tokens_dropped == 0
    assert isinstance(bad, ItemError) and str(vocab) in bad.message
    # without truncation, past the model's context: the item fails, nothing dropped
    ctx = engine.max_context
    [over] = engine.score_pairs([Pair(prompt_ids=(3,) * ctx, response_ids=(4,))])
    assert isinstance(over, ItemError) and over.code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    [cut] = engine.score_pairs([Pair(prompt_ids=(3,) * ctx, response_ids=(4,))], left)
    assert isinstance(cut, PairScore) and cut.prompt_tokens_dropped == 2 and cut.prompt_tokens == ctx - 2
    [none_cut] = engine.score_pairs(
        [Pair(prompt_ids=(3,) * ctx, response_ids=(4,))],
        ScoreOptions(truncation=Truncation.LEFT, prefix=PrefixMode.NONE),
    )
    assert isinstance(none_cut, PairScore) and none_cut.prompt_tokens_dropped == 1
    assert none_cut.prompt_tokens == ctx - 2  # ctx - 1 kept, the first of them context


def _score(engine, pairs, options, limit):
    prepared = engine.prepare(pairs, options, max_tokens=limit)
    ready = [p for p in prepared if not isinstance(p, ItemError)]
    scores = iter(engine.score(ready).scores)
    return [p if isinstance(p, ItemError) else next(scores) for p in prepared]


# --- Tokenize -------------------------------------------------------------------------


SPECIAL_TEXTS = [
    "Hello world",
    " leading space",
    "café 😀 你好",
    "<|endoftext|> and <s> </s> typed by a user",
    "",
]


def test_tokenize_plain_gives_the_ids_a_prompt_is_scored_with(family):
    from harness.models import make_engine

    eng = make_engine(*family)
    got = eng.tokenize(SPECIAL_TEXTS)
    for text, ids in zip(SPECIAL_TEXTS, got, strict=True):
        x, _ = sides(eng, Pair(text, ""))
        assert ids == x
        [via_ids] = eng.score_pairs([Pair(prompt_ids=ids, response=" ok")])
        [via_text] = eng.score_pairs([Pair(text, " ok")])
        assert_same_scores(via_text, via_ids)


def test_tokenize_parsing_special_tokens_is_what_transformers_gives(family):
    from harness.models import make_engine

    model, tokenizer = family
    eng = make_engine(model, tokenizer)
    got = eng.tokenize(SPECIAL_TEXTS, parse_special_tokens=True)
    for text, ids in zip(SPECIAL_TEXTS, got, strict=True):
        assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    # the user-typed special string differs between the two readings where the
    # vocabulary has it as a special token
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(special, int) and special != tokenizer.unk_token_id:
        assert special in got[3]
        assert special not in eng.tokenize(SPECIAL_TEXTS)[3]
