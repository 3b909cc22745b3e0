"""The benchmark's seeded workloads (bench/throughput.py ``--workloads``).

Every workload is a pure function of the tokenizer, its size and the seed:
texts are decoded from random vocabulary ids, so every method and every run
scores the same pairs. Each is a list of :class:`pairscore.types.Pair`: text
prompts for ``distinct``, ``shared`` and ``fewshot``, conversations
(``prompt_messages``) for ``chat`` and ``chatrows``, sent as a user would send
them, so that the server renders them with the model's own chat template and
the scored ids are exactly ``apply_chat_template(messages,
add_generation_prompt=True)`` followed by the reply's (:data:`SCORE_OPTIONS`).
"""

from __future__ import annotations

import random

from pairscore.types import ChatMessage, EndOfTurn, Pair, ScoreOptions

#: Workloads (--workloads): distinct prompts, whole prompts shared by several responses,
#: few-shot multiple choice (exemplars shared by every item, candidates sharing the
#: item) and chat (one system prompt shared by every conversation).
WORKLOADS = ("distinct", "shared", "fewshot", "chat", "chatrows")
#: What every pairscore method scores with: a chat reply without the template's end of
#: turn (``<|im_end|>``), so y is the reply's tokens alone, as for a text response and as
#: lm-eval and vLLM are given it. Text pairs are unaffected.
SCORE_OPTIONS = ScoreOptions(end_of_turn=EndOfTurn.EXCLUDED)
#: The workloads whose prompts are conversations.
CHAT_WORKLOADS = ("chat", "chatrows")


def make_pairs(args, tokenizer) -> list[Pair]:
    """The pairs of workload ``args.run_workload`` at the sizes and seed of ``args``."""
    if args.run_workload == "fewshot":
        return make_fewshot(tokenizer, items=args.fewshot[0], choices=args.fewshot[1], seed=args.seed)
    if args.run_workload in CHAT_WORKLOADS and not getattr(tokenizer, "chat_template", None):
        raise SystemExit(
            f"the {args.run_workload} workload needs a tokenizer with a chat template "
            "(SmolLM2's has one; give another with --tokenizer)"
        )
    if args.run_workload == "chat":
        return make_chat(tokenizer, conversations=args.chat, seed=args.seed)
    if args.run_workload == "chatrows":
        return make_chat_rows(tokenizer, rows=args.chat_rows, seed=args.seed)
    return make_workload(tokenizer, pairs=args.pairs, shared=args.shared, seed=args.seed)


def make_workload(tokenizer, *, pairs: int, shared: tuple[int, int] | None, seed: int) -> list[Pair]:
    """Seeded (prompt, response) texts: prompts 20-200 tokens, responses 10-200.

    Texts are decoded from random vocabulary ids; prompts are stripped and
    responses start with a space, so every method splits x and y at the same
    token boundary.
    """
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    if shared is None:
        return [Pair(text(20, 200), " " + text(10, 200)) for _ in range(pairs)]
    n_prompts, per_prompt = shared
    out = []
    for _ in range(n_prompts):
        prompt = text(20, 200)
        out += [Pair(prompt, " " + text(10, 200)) for _ in range(per_prompt)]
    return out


def make_fewshot(tokenizer, *, items: int, choices: int, seed: int, exemplars: int = 5) -> list[Pair]:
    """Seeded few-shot multiple choice: ``exemplars`` question/answer blocks (~80 tokens
    each) before every item's question (~30 tokens); each item is scored with
    ``choices`` candidate answers (2-12 tokens) as responses."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    shots = "".join(f"Question: {text(55, 65)}\nAnswer: {text(8, 14)}\n\n" for _ in range(exemplars))
    out = []
    for _ in range(items):
        prompt = f"{shots}Question: {text(21, 25)}\nAnswer:"
        out += [Pair(prompt, " " + text(2, 12)) for _ in range(choices)]
    return out


def make_chat(tokenizer, *, conversations: int, seed: int) -> list[Pair]:
    """Seeded chat: one ~130-token system message, then per conversation a distinct user
    turn (20-80 tokens) and the assistant's reply (20-150 tokens); with the template's
    markup (SmolLM2's ChatML) the system turn is ~135 tokens."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = ChatMessage("system", text(130, 136))
    return [_chat_pair(system, text(20, 80), text(20, 150)) for _ in range(conversations)]


def make_chat_rows(tokenizer, *, rows: int, seed: int) -> list[Pair]:
    """Seeded chat rows of about 200 tokens each (issue 25's comparison with vLLM): a
    26-token system message (a 32-token turn in SmolLM2's ChatML) shared by every row,
    then a distinct user turn (~60 tokens) and reply (~100 tokens)."""
    rng = random.Random(seed)
    text = _random_text(tokenizer, rng)
    system = ChatMessage("system", text(26, 26))
    return [_chat_pair(system, text(55, 65), text(95, 105)) for _ in range(rows)]


def _chat_pair(system: ChatMessage, user: str, reply: str) -> Pair:
    return Pair(prompt_messages=(system, ChatMessage("user", user)), response=reply)


def chat_ids(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """What the model generates from and what it replies, outside pairscore: the ids of
    ``apply_chat_template(messages, add_generation_prompt=True)`` (the rendering
    tokenized with its control strings as special tokens, as the template's own
    ``tokenize=True`` does), and the ids of that rendering followed by the reply."""
    messages = [{"role": m.role, "content": m.content} for m in pair.prompt_messages or ()]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(rendered, add_special_tokens=False).input_ids)
    return prompt, list(tokenizer(rendered + pair.response, add_special_tokens=False).input_ids)


def _id_range(tokenizer) -> tuple[int, int]:
    """Ids the random texts are drawn from: 1000-40000 (past the special and
    byte tokens) on a real vocabulary, the upper half of a tiny test one."""
    high = min(40000, len(tokenizer) - 1)
    return min(1000, high // 2), high


def _random_text(tokenizer, rng: random.Random):
    """Draws texts of n_min-n_max random ids, never an added token (a control string such
    as ``<|im_start|>`` in a message's content is plain text to the engine but not to a
    tokenizer fed the rendering; no real vocabulary has one in 1000-40000)."""
    low, high = _id_range(tokenizer)
    added = set(tokenizer.added_tokens_decoder)

    def draw() -> int:
        while (token := rng.randrange(low, high)) in added:
            pass
        return token

    def text(n_min: int, n_max: int) -> str:
        ids = [draw() for _ in range(rng.randint(n_min, n_max))]
        return " ".join(tokenizer.decode(ids).split())

    return text
