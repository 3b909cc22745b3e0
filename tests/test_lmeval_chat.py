"""Chat templates through the lm-evaluation-harness model type ``pairscore``
(``--apply_chat_template``, ``--system_instruction``, ``--fewshot_as_multiturn``).

* The RenderChat RPC renders a conversation exactly as transformers'
  ``apply_chat_template(..., tokenize=False)`` does on the server's tokenizer,
  hands out the template's source, and refuses with the cause and the fix: a
  model without a chat template (FAILED_PRECONDITION), a conversation the rules
  or the template refuse, a content over ``max_text_chars`` (INVALID_ARGUMENT).
* End to end: lm-eval runs the local few-shot task with its chat options once
  with ``hf`` on a tiny model directory whose tokenizer has a chat template
  and once with ``pairscore`` on a server that loaded the same directory, on
  the three tokenizer families: the same rendered contexts, every request's
  log-likelihood within 1e-4 nats, the same is_greedy and accuracy.
* A template that refuses system messages: both backends drop them and agree.
* lm-eval's own command line with ``--apply_chat_template``, and its clear
  failure on a model without a template.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("lm_eval")

from pairscore.aio import AsyncScoringClient  # noqa: E402
from pairscore.errors import InvalidArgumentError, ScoringError  # noqa: E402
from pairscore.lmeval import PairscoreLM  # noqa: E402
from pairscore.types import ChatMessage  # noqa: E402

from harness.lmeval import MC_TASK, run_lmeval, save_model_dir, write_tasks  # noqa: E402
from harness.models import (  # noqa: E402
    CHAT_TEMPLATE,
    FAMILY_BUILDERS,
    make_engine,
    with_chat_template,
)
from harness.servers import ROOT, metric_samples  # noqa: E402

#: Largest allowed |pairscore - hf| per request, in nats (fp32 tiny models).
TOLERANCE = 1e-4


SYSTEM = "You answer arithmetic questions with one word."

#: A ChatML template that refuses system messages (as Gemma's and Mistral's older ones do).
NO_SYSTEM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def chat_model_dir(directory: Path, family: str, template: str | None = None) -> Path:
    """A tiny model of ``family`` whose tokenizer has ChatML's control tokens and a chat
    template (the test one, or ``template``), saved for both lm-eval and the server."""
    build_tokenizer, build_model = FAMILY_BUILDERS[family]
    tokenizer = with_chat_template(build_tokenizer(directory / "tokenizer"))
    if template is not None:
        tokenizer.chat_template = template
    return save_model_dir(build_model(len(tokenizer)), tokenizer, directory / "model")


@pytest.fixture(scope="module", params=sorted(FAMILY_BUILDERS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model_dir(tmp_path_factory.mktemp(f"lmeval-chat-{request.param}"), request.param)


def load(model_dir: Path) -> Any:
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    return load_engine(ModelSpec(model=str(model_dir), device="cpu", dtype="float32"))


@pytest.fixture
def server(model_dir: Path, start_server: Any) -> Any:
    return start_server(load(model_dir))


# --- the RenderChat RPC ------------------------------------------------------------------


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": " <|im_end|> typed by a user  "},
    ],
    [{"role": "user", "content": "what is one plus one?"}, {"role": "assistant", "content": "Answer:"}],
]


def test_render_chat_is_transformers_apply_chat_template(tmp_path: Path, start_server: Any) -> None:
    model_dir = chat_model_dir(tmp_path, "gpt2")
    eng = load(model_dir)
    st = start_server(eng)
    hf = eng.tokenizer
    with st.client() as client:
        for convo in CONVERSATIONS:
            for gen in (True, False):
                want = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
                assert client.render_chat(convo, add_generation_prompt=gen) == want
            if convo[-1]["role"] == "assistant":  # lm-eval's prefilled assistant turn
                want = hf.apply_chat_template(convo, tokenize=False, continue_final_message=True)
                got = client.render_chat(convo, add_generation_prompt=False, continue_final_message=True)
                assert got == want and got.endswith("Answer:")
        messages = [ChatMessage(m["role"], m["content"]) for m in CONVERSATIONS[1]]
        assert client.render_chat(messages) == client.render_chat(CONVERSATIONS[1])
        assert client.render_chat([]) == ""
        assert client.chat_template() == hf.chat_template
        with pytest.raises(InvalidArgumentError, match=r"messages\[0\]\.role is .robot.*one of system, user"):
            client.render_chat([{"role": "robot", "content": "x"}])
        with pytest.raises(InvalidArgumentError, match="set one of them"):
            client.render_chat(CONVERSATIONS[2], continue_final_message=True)
        with pytest.raises(TypeError, match=r"messages\[0\] must be"):
            client.render_chat([("user", "Hi")])  # type: ignore[list-item]
        assert client.render_chat(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")  # still serving
        # a long conversation renders off the event loop (the prepare stage), the same text
        long = [
            {"role": "user", "content": "two plus two " * 3000},
            {"role": "assistant", "content": "x" * 40000},
        ]
        want = hf.apply_chat_template(long, tokenize=False, add_generation_prompt=True)
        assert client.render_chat(long) == want and len(want) > 79000

    async def via_aio() -> tuple[str, str]:
        async with AsyncScoringClient(st.target, timeout=20) as aio:
            return await aio.render_chat(CONVERSATIONS[1]), await aio.chat_template()

    want = hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert asyncio.run(via_aio()) == (want, hf.chat_template)
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_requests_total", (("code", "OK"), ("method", "RenderChat")))] >= 8
    assert (
        samples[("pairscore_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "RenderChat")))] == 2
    )


def test_render_chat_refusals_name_the_cause(gpt2_family: Any, tmp_path: Path, start_server: Any) -> None:
    model, tokenizer = gpt2_family  # no chat template
    plain = start_server(make_engine(model, tokenizer))
    with plain.client() as client:
        for call in (lambda: client.render_chat(CONVERSATIONS[0]), client.chat_template):
            with pytest.raises(ScoringError, match="has no chat template.*serve a chat model") as info:
                call()
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    st = start_server(
        load(chat_model_dir(tmp_path, "gpt2", NO_SYSTEM_TEMPLATE)), max_text_chars=60, max_response_bytes=1024
    )
    with st.client() as client:
        many = [{"role": "user", "content": "y" * 60}] * 20  # 20 x (60 + 28 template) + 22 bytes > 1024
        with pytest.raises(InvalidArgumentError, match=r"takes 1782 bytes, over this server's 1024-byte"):
            client.render_chat(many)
        with pytest.raises(InvalidArgumentError, match="refused the conversation: System role not supported"):
            client.render_chat(CONVERSATIONS[1])
        with pytest.raises(InvalidArgumentError, match=r"messages\[0\]\.content has 61 characters"):
            client.render_chat([{"role": "user", "content": "x" * 61}])
        assert (
            client.render_chat(CONVERSATIONS[0]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        )


# --- lm-eval end to end ------------------------------------------------------------------


def _compare(hf: Any, ps: Any) -> None:
    assert [r.arguments for r in ps.for_task(MC_TASK)] == [r.arguments for r in hf.for_task(MC_TASK)]
    pairs = list(zip(ps.for_task(MC_TASK), hf.for_task(MC_TASK), strict=True))
    worst = max(abs(a.logprob - b.logprob) for a, b in pairs)
    assert worst <= TOLERANCE, f"largest difference {worst:.2e} nats"
    assert [a.is_greedy for a, _ in pairs] == [b.is_greedy for _, b in pairs]
    assert ps.accuracy() == hf.accuracy()


@pytest.mark.parametrize("multiturn", [True, False], ids=["multiturn", "singleturn"])
def test_chat_task_matches_the_hf_backend(
    model_dir: Path, server: Any, tmp_path: Path, multiturn: bool
) -> None:
    tasks = write_tasks(tmp_path / "tasks", n_test=12, num_fewshot=2)
    lm = PairscoreLM(server.target)
    chat = {"apply_chat_template": True, "system_instruction": SYSTEM, "fewshot_as_multiturn": multiturn}
    hf = run_lmeval(
        "hf",
        {"pretrained": str(model_dir), "dtype": "float32", "max_length": lm.max_length},
        tasks,
        [MC_TASK],
        device="cpu",
        **chat,
    )
    ps = run_lmeval(lm, None, tasks, [MC_TASK], **chat)
    contexts = [r.arguments[0] for r in ps.for_task(MC_TASK)]
    assert all(c.startswith("<|im_start|>system\n" + SYSTEM) for c in contexts)
    assert all(c.endswith("<|im_start|>assistant\n") for c in contexts)
    assert contexts[0].count("<|im_start|>user") == (3 if multiturn else 1)  # 2 exemplars + the question
    # the context's control tokens are scored as their special tokens, not as their characters
    [(ctx_ids, _)] = lm.tokens.pairs([ps.for_task(MC_TASK)[0].arguments])
    [im_start] = lm.client.tokenize(["<|im_start|>"], parse_special_tokens=True)
    assert len(im_start) == 1 and ctx_ids.count(im_start[0]) == contexts[0].count("<|im_start|>")
    _compare(hf, ps)


def test_a_template_without_system_role_drops_it_like_the_hf_backend(
    tmp_path: Path, start_server: Any
) -> None:
    model_dir = chat_model_dir(tmp_path, "gpt2", NO_SYSTEM_TEMPLATE)
    st = start_server(load(model_dir))
    tasks = write_tasks(tmp_path / "tasks", n_test=6, num_fewshot=1)
    lm = PairscoreLM(st.target)
    chat = {"apply_chat_template": True, "system_instruction": SYSTEM, "fewshot_as_multiturn": True}
    hf = run_lmeval(
        "hf", {"pretrained": str(model_dir), "dtype": "float32"}, tasks, [MC_TASK], device="cpu", **chat
    )
    ps = run_lmeval(lm, None, tasks, [MC_TASK], **chat)
    assert all("system" not in r.arguments[0] for r in ps.for_task(MC_TASK))
    _compare(hf, ps)


def _cli(target: str, task_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    argv = [sys.executable, "-m", "pairscore.lmeval", "--model", "pairscore", "--model_args"]
    argv += [f"target={target}", "--tasks", MC_TASK, "--include_path", str(task_dir)]
    argv += ["--output_path", str(out), "--limit", "4", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def test_the_command_line_with_a_chat_template(tmp_path: Path, gpt2_family: Any, start_server: Any) -> None:
    model_dir = chat_model_dir(tmp_path, "gpt2")
    st = start_server(load(model_dir))
    task_dir = write_tasks(tmp_path / "tasks", num_fewshot=2)
    done = _cli(
        st.target,
        task_dir,
        tmp_path / "out",
        "--apply_chat_template",
        "--system_instruction",
        SYSTEM,
        "--fewshot_as_multiturn",
        "--log_samples",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["chat_template"] == CHAT_TEMPLATE.read_text()  # lm-eval records the template used
    assert data["system_instruction"] == SYSTEM and data["fewshot_as_multiturn"] is True
    [samples] = list((tmp_path / "out").rglob("samples_*.jsonl"))
    first = json.loads(samples.read_text().splitlines()[0])
    assert first["arguments"]["gen_args_0"]["arg_0"].startswith("<|im_start|>system\n" + SYSTEM)

    model, tokenizer = gpt2_family  # no chat template: a clear refusal
    plain = start_server(make_engine(model, tokenizer))
    done = _cli(plain.target, task_dir, tmp_path / "out2", "--apply_chat_template")
    assert done.returncode != 0
    assert "has no chat template" in done.stderr and "without --apply_chat_template" in done.stderr


@pytest.mark.slow
def test_smollm2_chat_matches_the_hf_backend_in_the_benchmark(smol_cache_dir: Path, tmp_path: Path) -> None:
    """bench/lmeval_speed.py --chat on the embedded SmolLM2 (its own ChatML template), small:
    the same rendered contexts (the script stops otherwise) and log-likelihoods as hf."""
    env = {
        **os.environ,
        "PAIRSCORE_CACHE_DIR": str(smol_cache_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")]),
    }
    argv = [
        sys.executable,
        str(ROOT / "bench" / "lmeval_speed.py"),
        "--chat",
        "--docs",
        "4",
        "--fewshot",
        "2",
    ]
    argv += ["--repeats", "1", "--no-warmup", "--json", str(tmp_path / "out.json")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["chat"] and figures["tasks"] == [MC_TASK] and figures["requests"] == 4 * 4
    assert 140 <= figures["system_prompt_tokens"] <= 160
    assert figures["accuracy_pairscore"] == figures["accuracy_hf"]
    assert figures["max_abs_diff_nats"] <= TOLERANCE
    assert figures["is_greedy_mismatches"] == 0
