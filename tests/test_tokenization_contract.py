"""Tier 1: the tokenization and prefix contract, on the three tokenizer families
(byte-level BPE, SentencePiece, and byte-level BPE with an NFC normalizer)."""

from __future__ import annotations

import unicodedata

import pytest

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixPolicy,
    ScoreOptions,
    Side,
    TokenizationMode,
)
from pairscore_server.engine.prefix import resolve_prefix

from harness.models import make_engine

TEXTS = [
    "",
    "Paris",
    " Paris.",
    "The capital of France is",
    "  two leading spaces",
    "\nnewline first",
    "trailing space ",
    "café naïve résumé",
    "emoji 😀🎉 mixed",
    "你好世界",
    "combining e\u0301 a\u0308 n\u0303",
    "zero\u200dwidth and RTL שלום",
    "<s> </s> <|endoftext|> literal specials",
    "tab\tand\r\nCRLF",
]

PAIRS = [Pair(x, y) for x in TEXTS for y in TEXTS[:6] + TEXTS[7:]][::3]

# Text that Unicode normalization changes: combining marks that NFC composes
# (also across the prompt/response boundary), compatibility characters that
# NFC keeps and NFKC would change, conjoining Hangul jamo that NFC composes
# into syllables, and a singleton (Angstrom sign -> Å).
NORMALIZED_TEXTS = [
    "cafe\u0301",
    "e\u0301 a\u0308 n\u0303 o\u0302\u0323",
    "\u0301 starts with a mark",
    "ﬁ ① ｶ ² ™ ＡＢ",
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u116e\u11a8",
    "\u212b and \u2126 signs",
    "Ame\u0301lie 😀 你好",
]
NORMALIZED_PAIRS = [Pair(x, y) for x in NORMALIZED_TEXTS + ["e", ""] for y in NORMALIZED_TEXTS[:4] + [""]]


def contract_text(engine, x: str, y: str, mode: TokenizationMode) -> str:
    """What the scored ids decode to under the contract (docs/contract.md)."""
    forms = engine.pair_tokenizer.normalizers
    if not forms:
        return x + y
    assert forms == ("NFC",), forms  # the one normalizing family of the matrix

    def norm(text: str) -> str:
        return unicodedata.normalize("NFC", text)

    return norm(x) + norm(y) if mode is TokenizationMode.SEPARATE else norm(x + y)


def scored_ids(engine, pair: Pair, mode: TokenizationMode):
    [prep] = engine.prepare([pair], ScoreOptions(tokenization=mode))
    return prep


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_ids_decode_back_to_prompt_plus_response(engine, mode):
    for pair in PAIRS:
        prep = scored_ids(engine, pair, mode)
        expected = contract_text(engine, pair.prompt, pair.response, mode)
        assert engine.pair_tokenizer.decode(prep.input_ids[1:]) == expected
        assert prep.prompt_tokens + prep.response_tokens == len(prep.input_ids) - 1


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_text_that_normalization_changes_round_trips(engine, mode):
    for pair in NORMALIZED_PAIRS:
        prep = scored_ids(engine, pair, mode)
        expected = contract_text(engine, pair.prompt, pair.response, mode)
        assert engine.pair_tokenizer.decode(prep.input_ids[1:]) == expected, pair


def test_normalizing_tokenizer_is_reported(qwen2_family, gpt2_family, llama_family):
    model, tok = qwen2_family
    # transformers 5 loads Qwen2 tokenizers through Qwen2Tokenizer, which adds NFC.
    assert type(tok).__name__ == "Qwen2Tokenizer"
    qwen = make_engine(model, tok)
    assert qwen.pair_tokenizer.normalizers == ("NFC",) and qwen.info.tokenizer_normalizes
    for family in (gpt2_family, llama_family):
        eng = make_engine(*family)
        assert not eng.pair_tokenizer.normalizes and not eng.info.tokenizer_normalizes


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_spans_cover_each_side_exactly(engine, mode):
    """Every code point of x and of y lies in exactly one token span (or the one span
    shared by the tokens of one character); no span leaves its side's text."""
    for pair in NORMALIZED_PAIRS + PAIRS:
        x, y = pair.prompt, pair.response
        [res] = engine.score_pairs([pair], ScoreOptions(tokenization=mode, return_tokens=True))
        for side, text in ((Side.PROMPT, x), (Side.RESPONSE, y)):
            spans = [(t.char_start, t.char_end) for t in res.tokens if t.side is side]
            assert all(0 <= s <= e <= len(text) for s, e in spans), (pair, side, spans)
            distinct = sorted({sp for sp in spans if sp[1] > sp[0]})
            covered = 0
            for s, e in distinct:
                # No gap; an overlap only of the one character whose bytes
                # several tokens hold (byte-level BPE: " 😀" -> "Ġð", "Ł", "ĺ").
                assert s == covered or (s == covered - 1 and e >= covered), (pair, side, spans)
                covered = max(covered, e)
            # The token that straddles the boundary (JOINT) holds x's last code
            # points: x is covered up to where it begins.
            if side is Side.PROMPT and res.boundary_straddled:
                assert covered < len(text)
            else:
                assert covered == len(text), (pair, side, spans)
        for t in res.tokens:
            src = x if t.side is Side.PROMPT else y
            piece = contract_text(engine, src[t.char_start : t.char_end], "", mode)
            assert t.text.strip() in piece or "\ufffd" in t.text or t.straddles_boundary, (pair, t)


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_prefix_token_exactly_once(engine, mode):
    prefix = engine.prefix.token_id
    for pair in PAIRS + [Pair(engine.prefix.token + " x", engine.prefix.token)]:
        prep = scored_ids(engine, pair, mode)
        assert prep.input_ids[0] == prefix
        assert prefix not in prep.input_ids[1:], "user text must never become the prefix token"


def test_special_token_strings_in_user_text_stay_text(engine):
    special_ids = set(engine.tokenizer.all_special_ids)
    for mode in TokenizationMode:
        prep = scored_ids(engine, Pair("<s></s><|endoftext|>", "<|endoftext|></s>"), mode)
        assert not special_ids & set(prep.input_ids[1:])


def test_prefix_policy_per_family(gpt2_family, llama_family):
    _, bpe = gpt2_family
    _, sp = llama_family
    gpt2 = resolve_prefix(bpe)
    assert (gpt2.policy, gpt2.token) == (PrefixPolicy.DOCUMENT_SEPARATOR, "<|endoftext|>")
    llama = resolve_prefix(sp)
    assert (llama.policy, llama.token, llama.token_id) == (PrefixPolicy.BOS, "<s>", sp.bos_token_id)
    custom = resolve_prefix(sp, "</s>")
    assert (custom.policy, custom.token_id) == (PrefixPolicy.CUSTOM, sp.eos_token_id)
    with pytest.raises(ValueError, match="not a single token"):
        resolve_prefix(sp, "definitely not a token")


def test_prefix_override_reaches_engine_and_info(gpt2_family):
    from pairscore_server.engine import ScoringEngine
    from pairscore_server.engine.engine import ModelDescription

    model, tok = gpt2_family
    some_token = tok.convert_ids_to_tokens(5)
    eng = ScoringEngine(model, tok, description=ModelDescription("t", "t"), prefix_token=some_token)
    assert eng.info.prefix_policy is PrefixPolicy.CUSTOM and eng.info.prefix_token_id == 5
    assert eng.prepare([Pair("a", "b")], ScoreOptions())[0].input_ids[0] == 5


def test_separate_mode_response_independent_of_prompt(engine):
    for y in TEXTS[1:]:
        responses = set()
        for x in ("", "a", "Hello there.", "你好", "x "):
            prep = scored_ids(engine, Pair(x, y), TokenizationMode.SEPARATE)
            responses.add(prep.input_ids[1 + prep.prompt_tokens :])
        assert len(responses) == 1, y
        (ids,) = responses
        # No dummy-prefix space at the start of y: after any prompt, y's ids
        # decode to exactly y.
        anchor = scored_ids(engine, Pair("a", ""), TokenizationMode.SEPARATE).input_ids[1:]
        assert engine.pair_tokenizer.decode(anchor + ids) == contract_text(
            engine, "a", y, TokenizationMode.SEPARATE
        )


def test_separate_prompt_is_plain_tokenization(engine):
    """The prompt's ids are the tokenizer's own ids for x without special tokens.

    (Except where x starts with whitespace on a dummy-prefix tokenizer: there
    transformers drops the dummy space and loses x's leading space, while
    pairscore adds it as SentencePiece does, so the ids still decode to x.)
    """
    for x in TEXTS[1:]:
        if engine.pair_tokenizer.dummy_prefix and x[:1].isspace():
            continue
        prep = scored_ids(engine, Pair(x, "!"), TokenizationMode.SEPARATE)
        expected = engine.tokenizer(x, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert list(prep.input_ids[1 : 1 + prep.prompt_tokens]) == expected


def test_sentencepiece_response_has_no_dummy_prefix(llama_family):
    model, sp = llama_family
    eng = make_engine(model, sp)
    prep = scored_ids(eng, Pair("Hello", "world"), TokenizationMode.SEPARATE)
    first_response_piece = sp.convert_ids_to_tokens(prep.input_ids[1 + prep.prompt_tokens])
    assert not first_response_piece.startswith("▁")
    assert sp.convert_ids_to_tokens(prep.input_ids[1]).startswith("▁")  # x keeps its document start
    assert eng.pair_tokenizer.decode(prep.input_ids[1:]) == "Helloworld"


def test_joint_mode_straddling_token_counts_toward_response(gpt2_family):
    model, tok = gpt2_family
    eng = make_engine(model, tok)
    [res] = eng.score_pairs(
        [Pair("The capital of Fra", "nce is Paris")],
        ScoreOptions(tokenization=TokenizationMode.JOINT, return_tokens=True),
    )
    whole = tok("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    assert [t.token_id for t in res.tokens] == whole
    assert res.boundary_straddled
    straddlers = [t for t in res.tokens if t.straddles_boundary]
    assert len(straddlers) == 1 and straddlers[0].side is Side.RESPONSE
    assert straddlers[0].char_start == 0 and "Fra" in straddlers[0].text
    assert res.prompt_tokens + res.response_tokens == len(whole)
    assert all(t.side is Side.PROMPT for t in res.tokens[: res.prompt_tokens])


def test_joint_mode_clean_boundary_matches_separate_for_bpe(gpt2_family):
    model, tok = gpt2_family
    eng = make_engine(model, tok)
    pair = Pair("The capital of France is", " Paris.")
    joint = scored_ids(eng, pair, TokenizationMode.JOINT)
    separate = scored_ids(eng, pair, TokenizationMode.SEPARATE)
    assert joint.input_ids == separate.input_ids and not joint.boundary_straddled


def test_empty_prompt_and_empty_response(engine):
    reference_uncond = engine.score_pairs([Pair("", "Paris is nice")])[0]
    assert reference_uncond.prompt_logprob == 0.0 and reference_uncond.prompt_tokens == 0
    assert reference_uncond.conditional_logprob == reference_uncond.joint_logprob < 0
    # Unconditional = conditioned on the prefix token alone.
    [prep] = engine.prepare([Pair("", "Paris is nice")], ScoreOptions())
    assert prep.input_ids[0] == engine.prefix.token_id and prep.prompt_tokens == 0
    no_y = engine.score_pairs([Pair("Paris is nice", "")])[0]
    assert no_y.conditional_logprob == 0.0 and no_y.response_tokens == 0
    assert no_y.joint_logprob == no_y.prompt_logprob < 0
    # The same text as prompt or as response gets the same score when it gets the
    # same tokens (byte-level BPE); SentencePiece gives the prompt a dummy prefix.
    [as_prompt] = engine.prepare([Pair("Paris is nice", "")], ScoreOptions())
    if as_prompt.input_ids == prep.input_ids:
        assert no_y.joint_logprob == pytest.approx(reference_uncond.joint_logprob, abs=1e-5)
    else:
        assert engine.prefix.policy is PrefixPolicy.BOS


def test_too_long_item_fails_alone(engine):
    limit = engine.max_context
    long_text = "hello world " * limit
    results = engine.score_pairs([Pair("a", "b"), Pair(long_text, "tail"), Pair("c", "d")])
    assert isinstance(results[0], PairScore) and isinstance(results[2], PairScore)
    err = results[1]
    assert isinstance(err, ItemError) and err.code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    [prep_len] = [len(engine.pair_tokenizer.encode(long_text, "tail", TokenizationMode.SEPARATE).ids)]
    assert f"needs {prep_len + 1} tokens" in err.message
    assert f"context is {limit} tokens" in err.message


def test_exactly_context_length_is_accepted(engine):
    limit = engine.max_context
    tok = engine.pair_tokenizer
    text = ""
    while len(tok.encode(text + "a", "", TokenizationMode.SEPARATE).ids) + 1 <= limit:
        text += "a"
    assert len(tok.encode(text, "", TokenizationMode.SEPARATE).ids) + 1 <= limit
    assert isinstance(engine.score_pairs([Pair(text, "")])[0], PairScore)


def _rebuild(text: str, spans) -> str:
    out, pos = [], 0
    for start, end in spans:
        assert 0 <= start <= end <= len(text)
        assert start <= pos or start == pos, "spans must be in order without gaps"
        out.append(text[max(start, pos) : end])
        pos = max(pos, end)
    return "".join(out)


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_unicode_character_spans_round_trip(engine, mode):
    for x, y in [
        ("emoji 😀🎉 and CJK 你好", " combining e\u0301 a\u0308"),
        ("naïve café", "😀"),
        ("", "你好世界 😀"),
        ("שלום", " مرحبا\u200d"),
    ]:
        [res] = engine.score_pairs([Pair(x, y)], ScoreOptions(tokenization=mode, return_tokens=True))
        prompt_spans = [(t.char_start, t.char_end) for t in res.tokens if t.side is Side.PROMPT]
        response_spans = [(t.char_start, t.char_end) for t in res.tokens if t.side is Side.RESPONSE]
        assert len(prompt_spans) == res.prompt_tokens and len(response_spans) == res.response_tokens
        if not res.boundary_straddled:
            assert _rebuild(x, prompt_spans).lstrip() == x.lstrip()
            assert _rebuild(y, response_spans) == y
        for t in res.tokens:
            src = x if t.side is Side.PROMPT else y
            if t.char_end > t.char_start:
                piece = contract_text(engine, src[t.char_start : t.char_end], "", mode)
                assert piece and (t.text.strip() in piece or "\ufffd" in t.text or not t.text.strip())


@pytest.mark.parametrize("mode", list(TokenizationMode))
def test_batched_tokenization_equals_one_by_one(engine, mode):
    """prepare() tokenizes a request in one batched call; each pair gets what it gets alone."""
    pairs = [(p.prompt, p.response) for p in PAIRS]
    many = engine.pair_tokenizer.encode_many(pairs, mode)
    for (x, y), batched in zip(pairs, many, strict=True):
        assert engine.pair_tokenizer.encode_many([(x, y)], mode) == [batched]
        assert len(batched.offsets) == len(batched.ids)
