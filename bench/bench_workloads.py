"""The benchmark's seeded workloads (bench/throughput.py ``--workloads``).

Every workload is a pure function of the tokenizer, its size and the seed:
texts are decoded from random vocabulary ids, so every method and every run
scores the same pairs.
"""

from __future__ import annotations

import random

#: Workloads (--workloads): distinct prompts, whole prompts shared by several responses,
#: few-shot multiple choice (exemplars shared by every item, candidates sharing the
#: item) and chat (one system prompt shared by every conversation).
WORKLOADS = ("distinct", "shared", "fewshot", "chat", "chatrows")


def make_workload(tokenizer, *, pairs: int, shared: tuple[int, int] | None, seed: int):
    """Seeded (prompt, response) texts: prompts 20-200 tokens, responses 10-200.

    Texts are decoded from random vocabulary ids; prompts are stripped and
    responses start with a space, so every method splits x and y at the same
    token boundary.
    """
    rng = random.Random(seed)
    low, high = _id_range(tokenizer)

    def text(n_min: int, n_max: int) -> str:
        ids = [rng.randrange(low, high) for _ in range(rng.randint(n_min, n_max))]
        return " ".join(tokenizer.decode(ids).split())

    if shared is None:
        return [(text(20, 200), " " + text(10, 200)) for _ in range(pairs)]
    n_prompts, per_prompt = shared
    out = []
    for _ in range(n_prompts):
        prompt = text(20, 200)
        out += [(prompt, " " + text(10, 200)) for _ in range(per_prompt)]
    return out


def make_fewshot(tokenizer, *, items: int, choices: int, seed: int, exemplars: int = 5):
    """Seeded few-shot multiple choice: ``exemplars`` question/answer blocks (~80 tokens
    each) before every item's question (~30 tokens); each item is scored with
    ``choices`` candidate answers (2-12 tokens) as responses."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    shots = "".join(f"Question: {text(55, 65)}\nAnswer: {text(8, 14)}\n\n" for _ in range(exemplars))
    out = []
    for _ in range(items):
        prompt = f"{shots}Question: {text(21, 25)}\nAnswer:"
        out += [(prompt, " " + text(2, 12)) for _ in range(choices)]
    return out


def make_chat(tokenizer, *, conversations: int, seed: int):
    """Seeded chat: one ~150-token system prompt, then per conversation a distinct user
    turn (20-80 tokens) and response (20-150 tokens), in SmolLM2's chat template.
    Responses start with a space, as in make_workload, so that every method splits
    x and y at the same token boundary."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = f"<|im_start|>system\n{text(130, 136)}<|im_end|>\n"
    return [
        (f"{system}<|im_start|>user\n{text(20, 80)}<|im_end|>\n<|im_start|>assistant\n", " " + text(20, 150))
        for _ in range(conversations)
    ]


def make_chat_rows(tokenizer, *, rows: int, seed: int):
    """Seeded chat rows of about 200 tokens each (issue 25's comparison with vLLM): a
    32-token system block shared by every row, then a distinct user turn (~60 tokens)
    and response (~100 tokens), in SmolLM2's chat template."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = f"<|im_start|>system\n{text(26, 26)}<|im_end|>\n"
    return [
        (f"{system}<|im_start|>user\n{text(55, 65)}<|im_end|>\n<|im_start|>assistant\n", " " + text(95, 105))
        for _ in range(rows)
    ]


def _id_range(tokenizer) -> tuple[int, int]:
    """Ids the random texts are drawn from: 1000-40000 (past the special and
    byte tokens) on a real vocabulary, the upper half of a tiny test one."""
    high = min(40000, len(tokenizer) - 1)
    return min(1000, high // 2), high


def _random_text(tokenizer, rng: random.Random):
    low, high = _id_range(tokenizer)

    def text(n_min: int, n_max: int) -> str:
        ids = [rng.randrange(low, high) for _ in range(rng.randint(n_min, n_max))]
        return " ".join(tokenizer.decode(ids).split())

    return text
