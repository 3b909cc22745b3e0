"""Shared pieces of the engine tests: seeded mixed pairs and the float32 agreement bound."""

from __future__ import annotations

import random

import pytest

from pairscore.types import Pair, PairScore

# Batch invariance is not bitwise on CPU: float32 GEMMs block differently for
# different batch shapes (and a 1-row chunk takes a GEMV path), which moves a
# log-prob by a few float32 ulps. Measured on the tiny models (random weights,
# init range 0.4, so |log-prob| per token reaches ~20 and sums ~670 nats):
# per token <= 5.7e-6 nats, per sum <= 1.4e-5 nats = 1.0e-7 relative.
# The bounds below are those figures with a margin, per token and relative
# to the sum, rather than one absolute bound that long sums would outgrow.
TOKEN_TOL = 1e-5
SUM_REL_TOL = 1e-6


def assert_same_scores(a: PairScore, b: PairScore) -> None:
    """a and b agree up to float32 GEMM-shape noise (see the bounds above)."""
    for x, y in (
        (a.joint_logprob, b.joint_logprob),
        (a.prompt_logprob, b.prompt_logprob),
        (a.conditional_logprob, b.conditional_logprob),
    ):
        assert x == pytest.approx(y, rel=SUM_REL_TOL, abs=TOKEN_TOL)
    assert (a.prompt_tokens, a.response_tokens) == (b.prompt_tokens, b.response_tokens)
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=TOKEN_TOL)


WORDS = (
    "the capital of France is Paris Rome banana café 😀 你好 naïve e\u0301 "
    "return x + y ? ! \n \t 42 0123 hello world"
).split(" ")


def mixed_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Seeded pairs of mixed lengths, including empty sides and odd whitespace."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice([" ", "", "  "]) + rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    pairs = [Pair(text(0, 12), text(0, 12), id=f"p{i}") for i in range(n)]
    pairs[1] = Pair("", text(1, 5), id="empty-x")
    pairs[2] = Pair(text(1, 5), "", id="empty-y")
    return pairs


#: A run long enough (> 16 tokens in each tiny tokenizer) to be shared below whole
#: prompts (packing.MIN_SHARED_TOKENS), as few-shot exemplars or a system prompt are.
PREAMBLE = (
    "The capital of France is Paris. The capital of Italy is Rome.\n"
    "Question: what is two plus two? Answer: four.\n"
)


#: Where the "crosses-boundary" pair's prompt ends, inside the preamble: past 16
#: tokens, since a prompt shorter than MIN_SHARED_TOKENS is shared only whole.
CROSS = PREAMBLE.index("two plus") + len("two plus")


def prefix_pairs() -> list[Pair]:
    """Pairs whose token sequences share leading runs below (and beyond) their prompts:
    a preamble shared by several prompts, so the shared run ends in the middle of each
    prompt's tokens; prompts that share the preamble and a question, with different
    answers; a pair that is all preamble (the shared run covers it whole); a response
    that extends another pair's response (it covers that pair whole); a shared run
    that crosses one pair's prompt/response boundary; identical pairs."""
    question = PREAMBLE + "Question: what is the capital of Italy? Answer:"
    return [
        Pair(question, " Rome.", id="q-rome"),
        Pair(question, " Paris.", id="q-paris"),
        Pair(question, " Rome. The capital of Italy is Rome.", id="q-rome-longer"),
        Pair(PREAMBLE + "Hello world! How are you today?", " I am fine.", id="hello"),
        Pair(PREAMBLE + "def add(x, y):", "\n    return x + y", id="code"),
        Pair(PREAMBLE, "", id="preamble-only"),
        Pair(PREAMBLE[:CROSS], PREAMBLE[CROSS:] + "Question: what?", id="crosses-boundary"),
        Pair(question, " Rome.", id="q-rome-again"),
    ]
