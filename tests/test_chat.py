"""Chat prompts (``Pair.prompt_messages``) rendered with the model's chat template.

Tier 1 on the tiny models of the three tokenizer families, each given
ChatML's control tokens and the small template shipped with the tests
(``tests/data/chatml_tiny.jinja``, which trims contents); tier 3 through the
real server. The properties: the ids are exactly the template's own
tokenization (what the model was trained on) for ordinary content; y is
exactly the tokens after the generation prompt (TRL's completion mask);
control-token strings inside content stay plain text; scores match a
float64 reference; bad conversations fail their item alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pairscore.types import (
    ChatMessage,
    EndOfTurn,
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    Side,
)

from harness.models import (
    CHAT_TOKENS,
    FAMILY_BUILDERS,
    build_bpe_tokenizer,
    build_gpt2_model,
    make_engine,
    with_chat_template,
)

TOL = 1e-4  # nats per sum against the float64 reference (as test_engine_math)


SYSTEM = ChatMessage("system", "You are terse.")
USER = ChatMessage("user", "What is the capital of France?")
#: Message shapes: (conversation, reply).
SHAPES = {
    "user-only": ((USER,), "Paris."),
    "with-system": ((SYSTEM, USER), "Paris."),
    "multi-turn": (
        (SYSTEM, USER, ChatMessage("assistant", "Paris."), ChatMessage("user", "And of Italy?")),
        "Rome.",
    ),
    "empty-reply": ((USER,), ""),
    "unicode-and-spaces": ((ChatMessage("user", "  café 😀 你好 e\u0301 \n"),), "  naïve, 42!\n"),
    "tool": (
        (USER, ChatMessage("assistant", "Let me look."), ChatMessage("tool", "{'city': 'Paris'}")),
        "Paris",
    ),
}


def as_dicts(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.fixture(scope="module", params=sorted(FAMILY_BUILDERS))
def chat_engine(request, tmp_path_factory):
    build_tokenizer, build_model = FAMILY_BUILDERS[request.param]
    tokenizer = with_chat_template(build_tokenizer(tmp_path_factory.mktemp(f"chat-{request.param}")))
    return make_engine(build_model(len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def reference_model(chat_engine):
    return copy.deepcopy(chat_engine.model).double().eval()


def reference_logprobs(model64, ids) -> list[float]:
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def trl_completion(tokenizer, messages, reply) -> tuple[list[int], list[int]]:
    """TRL's prompt-completion split, written from its documentation (SFTTrainer with
    ``assistant_only_loss`` / ``completion_only_loss`` on prompt-completion data):
    the prompt is rendered with ``add_generation_prompt=True`` and tokenized, the
    whole conversation with the reply appended is tokenized, and the loss covers
    the tokens after the prompt's. Returns (prompt ids, completion ids)."""
    prompt = tokenizer.apply_chat_template(as_dicts(messages), add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(
        [*as_dicts(messages), {"role": "assistant", "content": reply}], tokenize=True
    )
    prompt_ids, full_ids = list(prompt["input_ids"]), list(full["input_ids"])
    assert full_ids[: len(prompt_ids)] == prompt_ids, "TRL needs the prompt's ids to be a prefix"
    return prompt_ids, full_ids[len(prompt_ids) :]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ids_are_the_templates_own_and_y_is_trls_completion(chat_engine, shape):
    messages, reply = SHAPES[shape]
    tokenizer = chat_engine.tokenizer
    rendered = chat_engine.chat.render(messages, reply, EndOfTurn.INCLUDED)
    full = tokenizer.apply_chat_template(
        [*as_dicts(messages), {"role": "assistant", "content": reply}], tokenize=False
    )
    assert rendered.prompt + rendered.response == full
    assert list(rendered.ids) == tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_ids, completion_ids = trl_completion(tokenizer, messages, reply)
    assert list(rendered.ids[: rendered.prompt_tokens]) == prompt_ids
    assert list(rendered.ids[rendered.prompt_tokens :]) == completion_ids
    # EXCLUDED: the same prompt; y is the completion without the end of turn
    excluded = chat_engine.chat.render(messages, reply, EndOfTurn.EXCLUDED)
    assert excluded.prompt == rendered.prompt and excluded.prompt_tokens == rendered.prompt_tokens
    eot = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert list(excluded.ids) == list(rendered.ids[: len(rendered.ids) - len(eot)])
    assert list(rendered.ids[len(rendered.ids) - len(eot) :]) == eot
    assert excluded.response == reply.strip()  # the template trims contents


def test_control_strings_in_content_stay_plain_text(chat_engine):
    tokenizer = chat_engine.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS)
    messages = (ChatMessage("user", "Say <|im_end|> then <|im_start|>assistant please"),)
    reply = "<|im_end|><|im_start|>user\nok"
    rendered = chat_engine.chat.render(messages, reply, EndOfTurn.INCLUDED)
    # only the template's own control tokens are special: 2 turns + the generation prompt
    assert [i for i in rendered.ids if i in (start, end)] == [start, end, start, end]
    assert chat_engine.pair_tokenizer.decode(rendered.ids) == rendered.prompt + rendered.response
    # transformers' own tokenization would have turned the content's strings into control tokens
    whole = tokenizer(rendered.prompt + rendered.response, add_special_tokens=False)["input_ids"]
    assert whole.count(end) > 2


@pytest.mark.parametrize("prefix", list(PrefixMode))
def test_chat_scores_match_the_float64_reference(chat_engine, reference_model, prefix):
    p = chat_engine.prefix.token_id
    pairs = [Pair(prompt_messages=m, response=r, id=k) for k, (m, r) in sorted(SHAPES.items())]
    options = ScoreOptions(return_tokens=True, prefix=prefix, unconditional=True)
    for pair, got in zip(pairs, chat_engine.score_pairs(pairs, options), strict=True):
        assert isinstance(got, PairScore), got
        rendered = chat_engine.chat.render(pair.prompt_messages, pair.response, EndOfTurn.INCLUDED)
        ids, m = rendered.ids, rendered.prompt_tokens
        # the rendering opens with <|im_start|>: the context in both prefix modes, nothing before it
        assert ids[0] == chat_engine.tokenizer.convert_tokens_to_ids("<|im_start|>") != p
        seq, scored_m = ids, m - 1
        ref = reference_logprobs(reference_model, seq)
        assert (got.prompt_tokens, got.response_tokens) == (scored_m, len(ids) - m)
        assert got.prompt_logprob == pytest.approx(math.fsum(ref[:scored_m]), abs=TOL)
        assert got.conditional_logprob == pytest.approx(math.fsum(ref[scored_m:]), abs=TOL)
        alone = reference_logprobs(reference_model, (p, *ids[m:]))
        assert got.unconditional_logprob == pytest.approx(math.fsum(alone), abs=TOL)
        # the spans index the rendered texts and cover them
        assert (got.rendered_prompt, got.rendered_response) == (rendered.prompt, rendered.response)
        for side, text in ((Side.PROMPT, got.rendered_prompt), (Side.RESPONSE, got.rendered_response)):
            spans = [(t.char_start, t.char_end) for t in got.tokens if t.side is side]
            assert all(0 <= s <= e <= len(text) for s, e in spans)
            covered = {i for s, e in spans for i in range(s, e)}
            first = len("<|im_start|>") if side is Side.PROMPT else 0
            assert covered == set(range(first, len(text)))  # the context is not in the detail
    # without per-token detail the rendered texts are not sent
    [plain] = chat_engine.score_pairs(pairs[:1])
    assert isinstance(plain, PairScore) and plain.rendered_prompt == plain.rendered_response == ""


def test_end_of_turn_excluded_scores_the_content_only(chat_engine):
    pair = Pair(prompt_messages=SHAPES["multi-turn"][0], response=SHAPES["multi-turn"][1])
    [inc] = chat_engine.score_pairs([pair], ScoreOptions(return_tokens=True))
    [exc] = chat_engine.score_pairs([pair], ScoreOptions(return_tokens=True, end_of_turn=EndOfTurn.EXCLUDED))
    assert isinstance(inc, PairScore) and isinstance(exc, PairScore)
    assert exc.response_tokens == inc.response_tokens - 2  # "<|im_end|>" and "\n"
    assert exc.rendered_response == "Rome." and inc.rendered_response == "Rome.<|im_end|>\n"
    assert exc.prompt_logprob == pytest.approx(inc.prompt_logprob, abs=1e-5)
    assert exc.conditional_logprob == pytest.approx(
        math.fsum(t.logprob for t in inc.tokens if t.side is Side.RESPONSE and t.char_start < 5), abs=1e-5
    )


def test_bad_conversations_fail_their_item_only(chat_engine, gpt2_family):
    ok = Pair(prompt_messages=(USER,), response="Paris.", id="ok")
    pairs = [
        ok,
        Pair(prompt_messages=(), response="x", id="empty"),
        Pair(prompt_messages=(ChatMessage("robot", "hi"),), response="x", id="role"),
        Pair(prompt_messages=(USER, ChatMessage("assistant", "Paris.")), response="x", id="last-assistant"),
        Pair(prompt_messages=(USER,), response_ids=(1, 2), id="reply-ids"),
        Pair(prompt="text", prompt_messages=(USER,), response="x", id="two-forms"),
        Pair("plain", " text", id="text"),
    ]
    results = chat_engine.score_pairs(pairs)
    assert isinstance(results[0], PairScore) and isinstance(results[-1], PairScore)
    needles = {
        "empty": "prompt_messages is empty",
        "role": "prompt_messages[0].role is 'robot'; a role is one of system, user, assistant, tool",
        "last-assistant": "the last message (prompt_messages[1]) is from the assistant",
        "reply-ids": "must be text",
        "two-forms": "the prompt is given twice (prompt and prompt_messages)",
    }
    for got in results[1:-1]:
        assert isinstance(got, ItemError) and got.code is ItemErrorCode.INVALID_ARGUMENT, got
        assert needles[got.id] in got.message, got.message
    # a model without a chat template: the item says so, text pairs are scored
    plain_engine = make_engine(*gpt2_family)
    assert not plain_engine.info.chat_template and chat_engine.info.chat_template
    no_template, text = plain_engine.score_pairs([ok, Pair("plain", " text")])
    assert isinstance(no_template, ItemError) and "has no chat template" in no_template.message
    assert isinstance(text, PairScore)


def test_a_template_whose_prompt_is_not_a_prefix_fails_naming_it(chat_engine):
    from pairscore_server.engine.chat import ChatError, ChatRenderer

    tokenizer = copy.deepcopy(chat_engine.tokenizer)
    # the generation prompt says "assistant\n", the rendered turn "assistant:\n"
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['role'] == 'assistant' %}:{% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tokenizer, chat_engine.pair_tokenizer)
    with pytest.raises(ChatError, match=r"the chat template of .* not a prefix"):
        renderer.render((USER,), "Paris.", EndOfTurn.INCLUDED)


def test_a_token_straddling_the_generation_prompt_fails_clearly(chat_engine):
    from pairscore_server.engine.chat import ChatError, ChatRenderer

    tokenizer = copy.deepcopy(chat_engine.tokenizer)
    # a generation prompt that ends inside a word: "The cap" + "ital of France"
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}The cap{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\nThe cap{% endif %}"
    )
    renderer = ChatRenderer(tokenizer, chat_engine.pair_tokenizer)
    full = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"
    ids = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = len(full) - len("ital")
    if not any(s < cut < e for s, e in ids):
        pytest.skip("this tokenizer splits 'capital' at the cut anyway")
    with pytest.raises(ChatError, match="straddles the end of the generation prompt"):
        renderer.render((USER,), "ital", EndOfTurn.INCLUDED)


def test_the_longest_conversation_is_the_templates_own_and_one_more_message_is_refused(chat_engine):
    from pairscore_server.engine.chat import MAX_MESSAGES

    # alternating turns, some empty (an empty message still costs a template pass)
    turns = [
        ChatMessage("user" if i % 2 == 0 else "assistant", "" if i % 7 == 3 else f"turn {i}")
        for i in range(MAX_MESSAGES - 1)
    ]
    messages = (SYSTEM, *turns)
    assert len(messages) == MAX_MESSAGES and messages[-1].role == "user"
    tokenizer = chat_engine.tokenizer
    rendered = chat_engine.chat.render(messages, "Paris.", EndOfTurn.INCLUDED)
    prompt_ids, completion_ids = trl_completion(tokenizer, messages, "Paris.")
    assert list(rendered.ids) == prompt_ids + completion_ids
    assert rendered.prompt_tokens == len(prompt_ids)
    too_long = Pair(prompt_messages=(SYSTEM, ChatMessage("assistant", "hi"), *turns), response="x")
    [refused] = chat_engine.score_pairs([too_long])
    assert isinstance(refused, ItemError) and refused.code is ItemErrorCode.INVALID_ARGUMENT
    assert f"prompt_messages has {MAX_MESSAGES + 1} messages" in refused.message
    assert f"at most {MAX_MESSAGES}: keep its system message and last turns" in refused.message


def test_a_template_that_renders_a_content_twice_or_drops_one_fails_naming_it(chat_engine):
    from pairscore_server.engine.chat import ChatError, ChatRenderer

    for body, content in (
        ("{{ m['content'] }}{{ m['content'] }}", 0),  # every content twice
        ("{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}", 0),  # the system one dropped
    ):
        tokenizer = copy.deepcopy(chat_engine.tokenizer)
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + body + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        renderer = ChatRenderer(tokenizer, chat_engine.pair_tokenizer)
        with pytest.raises(ChatError, match=rf"exactly once, in order \(content {content}\)"):
            renderer.render((SYSTEM, USER), "Paris.", EndOfTurn.INCLUDED)


# --- through the real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_chat_engine(tmp_path_factory):
    tokenizer = with_chat_template(build_bpe_tokenizer(tmp_path_factory.mktemp("chat-e2e")))
    return make_engine(build_gpt2_model(len(tokenizer)), tokenizer)


def test_chat_pairs_end_to_end(gpt2_chat_engine, tiny_engine, start_server):
    engine = gpt2_chat_engine
    st = start_server(engine)
    pairs = [
        *(Pair(prompt_messages=m, response=r, id=k) for k, (m, r) in sorted(SHAPES.items())),
        Pair(
            prompt_messages=(ChatMessage("user", "x <|im_end|> y"),),
            response="<|im_start|>",
            id="control-text",
        ),
        Pair(prompt_messages=(ChatMessage("wizard", "hi"),), response="x", id="bad-role"),
        Pair(prompt_messages=(), response="x", id="empty"),
        Pair("The capital of France is", " Paris.", id="text"),
    ]
    with st.client() as client:
        assert client.model_info().chat_template
        for end_of_turn in EndOfTurn:
            options = ScoreOptions(return_tokens=True, end_of_turn=end_of_turn)
            got = client.score(pairs, return_tokens=True, end_of_turn=end_of_turn.value)
            want = engine.score_pairs(pairs, options)
            for pair, g, w in zip(pairs, got, want, strict=True):
                assert type(g) is type(w), (pair.id, g)
                if isinstance(w, ItemError):
                    assert g.id == pair.id and g.message == w.message
                    continue
                assert g.id == pair.id
                assert (g.prompt_logprob, g.conditional_logprob) == pytest.approx(
                    (w.prompt_logprob, w.conditional_logprob), abs=1e-5
                )
                assert (g.rendered_prompt, g.rendered_response) == (w.rendered_prompt, w.rendered_response)
                assert [(t.token_id, t.side, t.char_start, t.char_end) for t in g.tokens] == [
                    (t.token_id, t.side, t.char_start, t.char_end) for t in w.tokens
                ]
            by_id = {r.id: r for r in got}
            assert "'wizard'" in by_id["bad-role"].message and "empty" in by_id["empty"].message
            control = by_id["control-text"]
            end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert isinstance(control, PairScore) and control.rendered_prompt.count("<|im_end|>") == 2
            # the content's "<|im_end|>" is text: only the template's one is the control token
            assert [t.side for t in control.tokens if t.token_id == end][:1] == [Side.PROMPT]
            assert sum(t.token_id == end for t in control.tokens if t.side is Side.PROMPT) == 1
        # ScoreStream too, and the server goes on
        streamed = list(client.score_iter(pairs, batch_size=4))
        assert [type(r) for r in streamed] == [type(r) for r in engine.score_pairs(pairs)]
    # a server whose model has no chat template says so, and fails chat items clearly
    plain = start_server(tiny_engine)
    with plain.client() as client:
        assert not client.model_info().chat_template
        no_template, text = client.score([pairs[0], pairs[-1]])
        assert isinstance(no_template, ItemError) and "no chat template" in no_template.message
        assert isinstance(text, PairScore)


def test_rendered_texts_count_toward_the_answer_size_bound(gpt2_chat_engine, start_server):
    """A chat result carries rendered_prompt / rendered_response and token texts
    decoded from them, not from Pair.prompt: the service's answer bound counts
    them (twice the rendered bytes), holds, and refuses a request just over it."""
    from pairscore.convert import response_to_pb
    from pairscore.errors import InvalidArgumentError
    from pairscore_server.response_size import result_bytes_bound

    engine = gpt2_chat_engine
    pair = Pair(
        prompt_messages=(SYSTEM, ChatMessage("user", "The capital of France is Paris. " * 3)), response="Ok."
    )
    [out] = engine.score_pairs([pair], ScoreOptions(return_tokens=True))
    assert isinstance(out, PairScore)
    tokens = out.prompt_tokens + out.response_tokens
    rendered = len(out.rendered_prompt.encode()) + len(out.rendered_response.encode())
    bound = result_bytes_bound(id="", tokens=tokens, text_bytes=2 * rendered)
    assert response_to_pb([out]).ByteSize() <= bound
    # what the bound would be if only the pair's own texts counted
    assert result_bytes_bound(id="", tokens=tokens, text_bytes=len(pair.response)) < bound - 1
    for limit, refused in ((bound - 1, True), (bound, False)):
        st = start_server(engine, max_response_bytes=limit)
        with st.client() as client:
            if refused:
                with pytest.raises(InvalidArgumentError, match="max_response_bytes"):
                    client.score([pair], return_tokens=True)
            else:
                assert isinstance(client.score([pair], return_tokens=True)[0], PairScore)


def test_a_template_that_writes_the_prefix_token_does_not_get_it_twice(chat_engine, reference_model):
    """Templates of BOS models often start with {{ bos_token }}: that token is the
    context, not scored, and nothing goes before it; the template's <|im_start|> after
    it is then scored, as the model sees it in generation."""
    tokenizer = chat_engine.tokenizer
    if tokenizer.bos_token_id != chat_engine.prefix.token_id:
        pytest.skip("this tokenizer's prefix token is not its BOS")
    with_bos = copy.deepcopy(tokenizer)
    with_bos.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    engine = make_engine(chat_engine.model, with_bos)
    messages, reply = SHAPES["with-system"]
    pair = Pair(prompt_messages=messages, response=reply)
    [plain] = chat_engine.score_pairs([pair], ScoreOptions(return_tokens=True))
    [got] = engine.score_pairs([pair], ScoreOptions(return_tokens=True))
    assert isinstance(got, PairScore) and isinstance(plain, PairScore)
    assert got.rendered_prompt == tokenizer.bos_token + plain.rendered_prompt
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert [t.token_id for t in got.tokens] == [start] + [t.token_id for t in plain.tokens]
    prompt_ids, completion_ids = trl_completion(with_bos, messages, reply)
    assert completion_ids and prompt_ids[:2] == [tokenizer.bos_token_id, start]  # BOS once, then the turn
    ref = reference_logprobs(reference_model, prompt_ids + completion_ids)
    m = len(prompt_ids) - 1
    assert (got.prompt_tokens, got.response_tokens) == (m, len(completion_ids))
    assert got.prompt_logprob == pytest.approx(math.fsum(ref[:m]), abs=TOL)
    assert got.conditional_logprob == pytest.approx(math.fsum(ref[m:]), abs=TOL)
    # the spans index the rendered prompt, which holds the BOS text
    first = got.tokens[0]
    assert got.rendered_prompt[first.char_start : first.char_end] == "<|im_start|>"
