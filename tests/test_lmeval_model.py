"""The lm-evaluation-harness model type ``pairscore`` (pairscore.lmeval) against lm-eval's own
``hf`` backend on the same weights.

* Tokenization: the (context, continuation) ids and rolling windows are lm-eval's, on the
  three tokenizer families (no server needed: the tokenizer stands in for the Tokenize RPC).
* End to end: lm-eval runs the local few-shot multiple-choice task (harness/lmeval.py)
  once with ``hf`` loading a tiny model directory and once with ``pairscore`` calling a
  real server that loaded the same directory: accuracy identical, every request's
  log-likelihood within 1e-3 nats, is_greedy equal; the same for rolling perplexity with a
  text several windows long; and the ``pairscore-lm-eval`` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from pairscore.lmeval import LmevalTokens, PairscoreLM, rolling_windows  # noqa: E402

from harness.lmeval import MC_TASK, ROLLING_TASK, run_lmeval, save_model_dir, write_tasks  # noqa: E402
from harness.models import make_engine  # noqa: E402
from harness.servers import ROOT  # noqa: E402

#: Largest allowed |pairscore - hf| per request, in nats (the issue's bound).
TOLERANCE = 1e-3

REQUESTS = [
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("Answer: ", "five"),  # a trailing space moves to the continuation
    ("Hello  \n ", " there"),
    ("", "Hello world"),  # empty context: lm-eval's prefix token
    ("", "<|endoftext|>hi"),
    ("<s> x", " y"),
    ("café", "\u0301 naïve"),
    ("<|endoftext|>The capital", " of France"),
]


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = request.getfixturevalue(f"{request.param}_family")
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp(f"lmeval-{request.param}"))


@pytest.fixture(scope="module")
def hflm(model_dir: Path) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture
def server(model_dir: Path, start_server: Any) -> Any:
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    return start_server(load_engine(ModelSpec(model=str(model_dir), device="cpu", dtype="float32")))


def _tokens_like_hf(hflm: Any) -> LmevalTokens:
    tok = hflm.tokenizer
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    return LmevalTokens(
        lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        prefix_id=hflm.prefix_token_id,
        prefix_text=tok.decode(hflm.prefix_token_id),
        bos_id=tok.bos_token_id if adds_bos else None,
    )


def test_request_ids_are_lm_evals(hflm: Any) -> None:
    """lm-eval's own split (TemplateLM.loglikelihood / _encode_pair), on every family."""
    got = _tokens_like_hf(hflm).pairs(REQUESTS)
    for (context, continuation), (ctx, cont) in zip(REQUESTS, got, strict=True):
        if context == "":
            enc = hflm.tok_encode(continuation, add_special_tokens=False)
            want = ([hflm.prefix_token_id], enc) if enc[0] != hflm.prefix_token_id else (enc[:1], enc[1:])
        else:
            want = hflm._encode_pair(context, continuation)
        assert (ctx, cont) == (list(want[0]), list(want[1])), (context, continuation)


def test_rolling_windows_are_lm_evals(hflm: Any) -> None:
    from lm_eval import utils

    text = " ".join(["The capital of France is Paris, the capital of Italy is Rome."] * 12)
    [ids] = _tokens_like_hf(hflm).texts([text])
    assert ids == hflm.tok_encode(text)
    for max_length in (1, 7, 64, len(ids) - 1, len(ids), len(ids) + 5):
        want = [
            (list(a), list(b))
            for a, b in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(ids, hflm.prefix_token_id, max_length, 1),
            )
        ]
        got = rolling_windows(ids, hflm.prefix_token_id, max_length)
        assert got == want, max_length
        assert [t for _, pred in got for t in pred] == ids  # every token predicted once
        assert all(len(c) + len(p) <= max_length + 1 for c, p in got)


def _compare(hf: Any, ps: Any, task: str) -> None:
    assert [r.arguments for r in ps.for_task(task)] == [r.arguments for r in hf.for_task(task)]
    worst = max(abs(a.logprob - b.logprob) for a, b in zip(ps.for_task(task), hf.for_task(task), strict=True))
    assert worst <= TOLERANCE, f"{task}: largest difference {worst:.2e} nats"
    assert [r.is_greedy for r in ps.for_task(task)] == [r.is_greedy for r in hf.for_task(task)]


@pytest.mark.parametrize("trailing_space", [False, True], ids=["delimiter-space", "context-space"])
def test_few_shot_task_matches_the_hf_backend(
    model_dir: Path, hflm: Any, server: Any, tmp_path: Path, trailing_space: bool
) -> None:
    tasks = write_tasks(tmp_path / "tasks", trailing_space=trailing_space)
    hf = run_lmeval(hflm, None, tasks, [MC_TASK])
    ps = run_lmeval("pairscore", {"target": server.target}, tasks, [MC_TASK])
    assert len(ps.for_task(MC_TASK)) == 24 * 4
    _compare(hf, ps, MC_TASK)
    assert ps.accuracy() == hf.accuracy()
    assert ps.metrics[MC_TASK]["acc_norm,none"] == hf.metrics[MC_TASK]["acc_norm,none"]


def test_rolling_perplexity_matches_the_hf_backend(model_dir: Path, server: Any, task_dir: Path) -> None:
    lm = PairscoreLM(server.target)
    # The hf backend with pairscore's window size: the server keeps one position of the
    # model's context for the last token, so its windows are one token shorter.
    assert lm.max_length == lm.info.max_context_tokens - 1
    hf = run_lmeval(
        "hf",
        {"pretrained": str(model_dir), "dtype": "float32", "max_length": lm.max_length},
        task_dir,
        [ROLLING_TASK],
        device="cpu",
    )
    ps = run_lmeval(lm, None, task_dir, [ROLLING_TASK])
    _compare(hf, ps, ROLLING_TASK)
    longest = max((r.arguments[0] for r in ps.for_task(ROLLING_TASK)), key=len)
    [ids] = lm.tokens.texts([longest])
    assert len(rolling_windows(ids, lm.tokens.prefix_id, lm.max_length)) >= 3  # several windows
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ps.metrics[ROLLING_TASK][metric] == pytest.approx(hf.metrics[ROLLING_TASK][metric], rel=1e-4)


def test_registering_pairscore_keeps_lm_evals_own_backends() -> None:
    # lm-eval loads its backends only into an empty registry: pairscore must not hide them
    # (a fresh interpreter: in this one other tests may have filled the registry already)
    probe = (
        "import pairscore.lmeval\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('pairscore') is pairscore.lmeval.PairscoreLM\n"
        "print(get_model('hf').__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "HFLM"


def test_generation_is_refused_with_the_reason(server: Any) -> None:
    lm = PairscoreLM(server.target)
    with pytest.raises(NotImplementedError, match="does not generate"):
        lm.generate_until([])
    with pytest.raises(ValueError, match="one token"):
        PairscoreLM(server.target, prefix_token="two words")
    with pytest.raises(ValueError, match="streams"):
        PairscoreLM(server.target, streams=0)


def test_the_command_line(gpt2_family: Any, start_server: Any, task_dir: Path, tmp_path: Path) -> None:
    """``python -m pairscore.lmeval`` is ``pairscore-lm-eval``: lm-eval's CLI with the model registered."""
    model, tokenizer = gpt2_family
    server = start_server(make_engine(model, tokenizer))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pairscore.lmeval",
            "--model",
            "pairscore",
            "--model_args",
            f"target={server.target}",
            "--tasks",
            MC_TASK,
            "--include_path",
            str(task_dir),
            "--output_path",
            str(tmp_path / "out"),
            "--limit",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["results"][MC_TASK]["acc,none"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert data["config"]["model"] == "pairscore"


@pytest.mark.slow
def test_smollm2_matches_the_hf_backend_in_the_benchmark(smol_cache_dir: Path, tmp_path: Path) -> None:
    """bench/lmeval_speed.py on the embedded SmolLM2 (dequantised copy, loaded by both), small."""
    env = {
        **os.environ,
        "PAIRSCORE_CACHE_DIR": str(smol_cache_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")]),
    }
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "lmeval_speed.py"),
            "--docs",
            "8",
            "--fewshot",
            "3",
            "--repeats",
            "1",
            "--no-warmup",
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["requests"] == 8 * 4 + 4
    assert figures["accuracy_pairscore"] == figures["accuracy_hf"]
    assert figures["max_abs_diff_nats"] <= TOLERANCE
    assert figures["is_greedy_mismatches"] == 0
