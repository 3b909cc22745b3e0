"""Shared pieces of the engine tests: seeded mixed pairs, the float32 agreement bound, and the
real model's float64 reference with its measured natural-text bounds."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

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

# A pair whose sequence a batch mate cuts below its prompt end (a shared run of
# MIN_SHARED_TOKENS or more) has its attention computed over its keys in another
# layout: split into more calls, and in packed rows grouped with its trie siblings'
# nodes in one masked call (packing.attention_groups), where its keys fall into
# other blocks of the kernel's online softmax. Measured on the tiny models (packed
# rows, every tokenization mode, prefix_pairs beside mixed_pairs): per token
# <= 1.14e-5 nats (llama; gpt2 8.1e-6, qwen2 4.8e-6), per sum <= 5.6e-7 relative
# (before grouping: 5.7e-6 per token). Bound: that with the same margin as above.
SHARED_RUN_TOKEN_TOL = 2e-5


def assert_same_scores(a: PairScore, b: PairScore, token_tol: float = TOKEN_TOL) -> None:
    """a and b agree up to float32 GEMM-shape noise (see the bounds above);
    ``token_tol``: SHARED_RUN_TOKEN_TOL for a pair a batch mate cuts below its prompt."""
    for x, y in (
        (a.joint_logprob, b.joint_logprob),
        (a.prompt_logprob, b.prompt_logprob),
        (a.conditional_logprob, b.conditional_logprob),
    ):
        assert x == pytest.approx(y, rel=SUM_REL_TOL, abs=TOKEN_TOL)
    assert (a.prompt_tokens, a.response_tokens) == (b.prompt_tokens, b.response_tokens)
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=token_tol)


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
#: prompts (tries.MIN_SHARED_TOKENS), as few-shot exemplars or a system prompt are.
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


# The real model in float32 is further from float64 than the random-weight
# test models: a plain transformers fp32 forward is as far off as the engine.
# Measured on NATURAL_PAIRS (26 pairs, 76 prompt/conditional/joint sums of 1-72
# tokens, packed and padded alike): per token up to 3.2e-5 nats; per sum up to
# 6.2e-4 nats (39 of the 76 sums over 1e-4), which is at most 2.0e-5 nats per
# token of the sum (token errors share their sign, so they add up) and at most
# 3.4e-5 of the sum. The bounds are those figures with ~2x margin, per token,
# per token of a sum and relative to the sum: an absolute bound per sum would
# grow with its length. docs/contract.md ("Accuracy") states them.
NATURAL_TOKEN_TOL = 6e-5
NATURAL_SUM_PER_TOKEN_TOL = 4e-5
NATURAL_SUM_REL_TOL = 7e-5


def float64_logprobs(model64, ids: Sequence[int]) -> list[float]:
    """log P(ids[j] | ids[:j]) for j >= 1: one plain transformers forward in float64,
    nothing before ``ids``."""
    import torch

    with torch.no_grad():
        logits = model64(torch.tensor([list(ids)])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


class Float64Errors:
    """The worst distance of scores from their float64 reference, in the three
    natural-text measures: per token, per token of a sum, relative to the sum."""

    def __init__(self) -> None:
        self.token = self.sum_per_token = self.sum_rel = 0.0

    def add(self, got: PairScore, ref: Sequence[float], m: int) -> None:
        """``got`` (with its tokens) against ``ref``, the float64 log-probs of its
        scored tokens, the first ``m`` of them the prompt's."""
        for value, part in (
            (got.prompt_logprob, ref[:m]),
            (got.conditional_logprob, ref[m:]),
            (got.joint_logprob, ref),
        ):
            if part:
                err = abs(value - math.fsum(part))
                self.sum_per_token = max(self.sum_per_token, err / len(part))
                self.sum_rel = max(self.sum_rel, err / -math.fsum(part))
        self.token = max(self.token, *(abs(t.logprob - r) for t, r in zip(got.tokens, ref, strict=True)))

    def assert_within_natural_bounds(self, label: str) -> None:
        print(
            f"{label}: worst per token {self.token:.2e} nats, worst sum {self.sum_per_token:.2e} "
            f"nats per token and {self.sum_rel:.2e} of the sum"
        )
        assert self.token < NATURAL_TOKEN_TOL
        assert self.sum_per_token < NATURAL_SUM_PER_TOKEN_TOL
        assert self.sum_rel < NATURAL_SUM_REL_TOL
