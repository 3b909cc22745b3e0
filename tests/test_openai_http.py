"""Issue 16 item 2: the OpenAI-compatible completions port scores like the engine.

A real server (``--openai-port``) on the tiny GPT-2-style model, real HTTP
calls over loopback and the ``openai`` Python client; the numbers are checked
against an independent float64 forward pass written here, and against the
same server's gRPC answer.
"""

from __future__ import annotations

import copy
import json
import urllib.request

import pytest
import torch

from pairscore.types import PairScore, Side
from pairscore_server.openai_json import ANSWER_BYTES, answer_bytes_bound
from pairscore_server.openai_protocol import parse_completion_request, to_pairs

from harness.openai_http import http_call, openai_base
from harness.servers import metric_samples

TOL = 1e-4  # nats per token: fp32 engine vs float64 reference (as test_engine_math)
PROMPTS = ["The capital of France is", "Hello world! How are", " café 😀 naïve\n"]


@pytest.fixture(scope="module")
def reference(gpt2_family):
    """(float64 model, tokenizer): log-probs of one unbatched sequence, from scratch."""
    model, tokenizer = gpt2_family
    return copy.deepcopy(model).double().eval(), tokenizer


def pairs_scored(server) -> float:
    """pairscore_pairs_total, all outcomes together."""
    samples = metric_samples(server.metrics_text())
    return sum(v for (name, _), v in samples.items() if name == "pairscore_pairs_total")


def reference_logprobs(model64, ids: list[int]) -> torch.Tensor:
    """log P(. | ids[:j+1]) for every position j, float64."""
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture
def server(start_server, tiny_engine):
    return start_server(tiny_engine, openai_port=0)


def test_echo_scores_each_prompt_token_against_the_prefix_token_and_the_float64_reference(
    server, tiny_engine, reference
):
    model64, tokenizer = reference
    p = tiny_engine.info.prefix_token_id
    answer = http_call(
        f"{openai_base(server)}/completions",
        body={"model": "tiny", "prompt": PROMPTS, "echo": True, "max_tokens": 0, "logprobs": 3},
    )
    assert answer.status == 200, answer.body
    body = answer.body
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    total = 0
    for prompt, choice in zip(PROMPTS, body["choices"], strict=True):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        total += len(ids)
        logp = reference_logprobs(model64, [p, *ids])
        lp = choice["logprobs"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        # text_offset: where each token starts in the returned text (tokens holding part
        # of a character, here the emoji's bytes, decode to U+FFFD and share its offset)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
            assert "\ufffd" in token or prompt[offset:].startswith(token)
        if prompt.isascii():
            assert "".join(lp["tokens"]) == prompt
        for j, tid in enumerate(ids):
            # the first token too: scored against the prefix token, not null as in vLLM
            assert lp["token_logprobs"][j] == pytest.approx(float(logp[j, tid]), abs=TOL)
            top = lp["top_logprobs"][j]
            best = torch.topk(logp[j], 3).indices.tolist()
            expected = {tokenizer.decode([t]): float(logp[j, t]) for t in best}
            expected.setdefault(lp["tokens"][j], float(logp[j, tid]))  # the scored token is in it too
            assert top.keys() == expected.keys()
            for key, value in expected.items():
                assert top[key] == pytest.approx(value, abs=TOL)
    assert body["usage"] == {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}


def test_max_tokens_1_returns_the_greedy_next_token_after_the_echoed_prompt(server, tiny_engine, reference):
    model64, tokenizer = reference
    p = tiny_engine.info.prefix_token_id
    body = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": PROMPTS[0], "echo": True, "max_tokens": 1, "logprobs": 2, "temperature": 0},
    ).body
    ids = tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    logp = reference_logprobs(model64, [p, *ids])
    greedy = int(torch.argmax(logp[-1]))
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # lm-eval reads token_logprobs[ctxlen:-1]
    assert lp["tokens"][-1] == tokenizer.decode([greedy])
    assert choice["text"] == PROMPTS[0] + tokenizer.decode([greedy])
    assert lp["token_logprobs"][-1] == pytest.approx(float(logp[-1, greedy]), abs=TOL)
    assert lp["text_offset"][-1] == len(PROMPTS[0])
    assert max(lp["top_logprobs"][-1].values()) == pytest.approx(lp["token_logprobs"][-1], abs=TOL)
    assert len(lp["top_logprobs"][-1]) == 2
    assert body["usage"]["completion_tokens"] == 1

    # without echo: only the generated token
    body = http_call(
        f"{openai_base(server)}/completions", body={"prompt": PROMPTS[0], "max_tokens": 1, "logprobs": 0}
    ).body
    [choice] = body["choices"]
    assert choice["text"] == tokenizer.decode([greedy])
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([greedy])]
    assert choice["logprobs"]["text_offset"] == [0]
    assert choice["logprobs"]["top_logprobs"] == [
        {tokenizer.decode([greedy]): pytest.approx(float(logp[-1, greedy]), abs=TOL)}
    ]


def test_the_http_answer_matches_the_grpc_answer_of_the_same_server(server):
    body = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": PROMPTS, "echo": True, "max_tokens": 0, "logprobs": 1},
    ).body
    with server.client() as client:
        results = client.score([(p, "") for p in PROMPTS], return_tokens=True, top_k=1)
    for choice, result in zip(body["choices"], results, strict=True):
        assert isinstance(result, PairScore)
        tokens = [t for t in result.tokens if t.side is Side.PROMPT]
        assert choice["logprobs"]["tokens"] == [t.text for t in tokens]
        assert choice["logprobs"]["token_logprobs"] == [
            t.logprob for t in tokens
        ]  # same numbers, bit for bit
        assert choice["logprobs"]["text_offset"] == [t.char_start for t in tokens]


def test_models_lists_the_served_model(server, tiny_engine):
    answer = http_call(f"{openai_base(server)}/models")
    assert answer.status == 200
    [model] = answer.body["data"]
    assert model["id"] == "tiny" and model["object"] == "model"
    assert model["max_model_len"] == tiny_engine.info.max_context_tokens


def test_the_openai_python_client_scores_through_the_endpoint(server, tiny_engine, reference):
    openai = pytest.importorskip("openai")
    model64, tokenizer = reference
    client = openai.OpenAI(base_url=openai_base(server), api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(
        model="tiny", prompt=PROMPTS[1], echo=True, max_tokens=1, logprobs=1, temperature=0
    )
    ids = tokenizer(PROMPTS[1], add_special_tokens=False).input_ids
    logp = reference_logprobs(model64, [tiny_engine.info.prefix_token_id, *ids])
    [choice] = completion.choices
    assert choice.logprobs is not None
    expected = [float(logp[j, t]) for j, t in enumerate(ids)] + [float(torch.max(logp[-1]))]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=TOL)
    assert completion.usage is not None and completion.usage.prompt_tokens == len(ids)

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", echo=True, max_tokens=5)
    assert "max_tokens" in str(info.value) and "at most 1" in str(info.value)


def test_token_id_prompts_are_scored_as_given_with_the_first_id_as_context(server, reference):
    model64, tokenizer = reference
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS[:2]]
    prompts.append([0, *prompts[0]])  # an explicit document separator first, as lm-eval's rolling windows
    before = pairs_scored(server)
    body = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": prompts, "echo": True, "max_tokens": 1, "logprobs": 1},
    ).body
    # one scoring pass, one pair per prompt: the first ids' texts come from the tokenizer
    # (before issue 22, a second queued forward pass scored each distinct first id)
    assert pairs_scored(server) - before == len(prompts)
    for ids, choice in zip(prompts, body["choices"], strict=True):
        logp = reference_logprobs(model64, ids)  # no prefix token: the ids alone
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1
        assert lp["tokens"][:-1] == [tokenizer.decode([t]) for t in ids]
        # as vLLM: the first id is context, its entries null
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert lp["token_logprobs"][j] == pytest.approx(float(logp[j - 1, ids[j]]), abs=TOL)
        greedy = int(torch.argmax(logp[-1]))
        assert lp["tokens"][-1] == tokenizer.decode([greedy])
        assert lp["token_logprobs"][-1] == pytest.approx(float(logp[-1, greedy]), abs=TOL)
        assert choice["text"] == "".join(lp["tokens"])
        assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(lp["tokens"]))]
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in prompts)

    # a single list of ids is one prompt; one id scores nothing but still yields the next token
    [choice] = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": prompts[0][:1], "echo": True, "max_tokens": 1, "logprobs": 0},
    ).body["choices"]
    assert choice["logprobs"]["token_logprobs"][0] is None and len(choice["logprobs"]["tokens"]) == 2


def test_an_id_outside_the_vocabulary_fails_the_request_naming_prompt_and_id(server, tiny_engine):
    vocab = tiny_engine.info.vocab_size
    answer = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": [[5, 6], [7, vocab + 3]], "echo": True, "max_tokens": 1, "logprobs": 1},
    )
    assert answer.status == 400
    error = answer.body["error"]
    assert error["param"] == "prompt" and error["code"] == "invalid_argument"
    assert (
        error["message"].startswith("prompt 1: prompt_ids[1] is")
        and "outside the model's vocabulary" in error["message"]
    )
    # a negative id: the same rule (one place, the engine's), not a check of the port's own
    answer = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": [[5, 6], [7, -2]], "echo": True, "max_tokens": 0, "logprobs": 0},
    )
    assert answer.status == 400 and answer.body["error"]["param"] == "prompt"
    assert answer.body["error"]["message"].startswith(
        "prompt 1: prompt_ids[1] is -2, outside the model's vocabulary"
    )
    # the first id too, though it is context only (its text is shown with echo)
    answer = http_call(
        f"{openai_base(server)}/completions",
        body={"prompt": [[vocab + 3, 5]], "echo": True, "max_tokens": 0, "logprobs": 0},
    )
    assert answer.status == 400 and "outside the model's vocabulary" in answer.body["error"]["message"]
    assert (
        http_call(
            f"{openai_base(server)}/completions", body={"prompt": [[5, 6]], "echo": True, "max_tokens": 0}
        ).status
        == 200
    )


def test_the_answer_bound_counts_only_what_was_asked_for_and_holds(start_server, tiny_engine):
    st = start_server(tiny_engine, openai_port=0, max_response_bytes=512 << 10)
    words = "The capital of France is Paris, and the capital of Italy is Rome. "
    prompts = [f"{i} {words * 7}" for i in range(200)]  # 200 prompts of ~100 tokens
    url = f"{openai_base(st)}/completions"
    # before issue 22: refused ("could take up to ..."), the bound counting every prompt
    # token's per-token detail that echo false does not return
    answer = http_call(url, body={"prompt": prompts, "echo": False, "max_tokens": 1})
    assert answer.status == 200, answer.body
    assert all(len(c["text"]) >= 1 for c in answer.body["choices"])
    # the bound is a bound: never below the answer's real size, for each shape of request
    info = tiny_engine.info
    for shape in (
        {"echo": False, "max_tokens": 1},
        {"echo": False, "max_tokens": 1, "logprobs": 5},
        {"echo": True, "max_tokens": 0},
        {"echo": True, "max_tokens": 1, "logprobs": 2},
    ):
        body = {"prompt": [*PROMPTS, "x" * 50, "\x00\x01 \u00e9"], **shape}
        request = parse_completion_request(body, max_top_k=info.max_top_k)
        pairs, options = to_pairs(request)
        bound = answer_bytes_bound(request, max_token_text_bytes=info.max_token_text_bytes)
        prepared = tiny_engine.prepare(pairs, options)
        total = (
            ANSWER_BYTES
            + len(info.model_name)
            + sum(bound(p, item) for p, item in zip(pairs, prepared, strict=True))
        )
        raw = urllib.request.urlopen(
            urllib.request.Request(url, data=json.dumps(body).encode(), method="POST"), timeout=30
        ).read()
        assert len(raw) <= total, (shape, len(raw), total)
