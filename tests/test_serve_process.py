"""Tier 3/4: `pairscore serve` as a real separate process, called from this one.

Covers what a user does in the quickstart: start the server, wait for health
SERVING, score from another process, read /metrics, stop it with SIGTERM and
see it exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pairscore import Pair, PairScore, ScoringClient

from harness.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def spawn_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, int, Path]:
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRSCORE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pairscore_server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            *args,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    return proc, port, metrics_port, log


def wait_serving(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> ScoringClient:
    client = ScoringClient(f"127.0.0.1:{port}", timeout=5.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
        try:
            if client.health() == "SERVING":
                return client
        except Exception:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server not SERVING after {timeout} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def saved_tiny(gpt2_family, tmp_path_factory):
    model, tokenizer = gpt2_family
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_serve_tiny_model_from_another_process(saved_tiny, tiny_engine, tmp_path):
    proc, port, metrics_port, log = spawn_server(tmp_path, "--model", str(saved_tiny))
    try:
        with wait_serving(proc, port, log, timeout=60) as client:
            pairs = [Pair("The capital of France is", " Paris.", id="a"), Pair("", "x", id="b")]
            got = client.score(pairs)
            want = tiny_engine.score_pairs(pairs)
            for g, w in zip(got, want, strict=True):
                assert isinstance(g, PairScore)
                assert g.joint_logprob == pytest.approx(w.joint_logprob, abs=1e-5)
                assert g.id == w.id
            assert client.model_info().model_source == str(saved_tiny.resolve())
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert "pairscore_model_loaded 1.0" in body
    finally:
        stop(proc, log)
    text = log.read_text()
    assert "SIGTERM received" in text
    assert "The capital of France" not in text, "user text must not reach INFO logs"
    # the host allocator is set up before the threads start, and said once
    assert text.count("host allocator: ") == 1, text


def test_bad_model_path_exits_nonzero_with_a_clear_log_line(tmp_path):
    proc, _, _, log = spawn_server(tmp_path, "--model", str(tmp_path / "missing.gguf"))
    assert proc.wait(timeout=60) == 1
    text = log.read_text()
    assert "no such GGUF file" in text and "Traceback" not in text


@pytest.mark.slow
def test_serve_embedded_default_model(smol_cache_dir, tmp_path):
    proc, port, _, log = spawn_server(tmp_path, "--cache-dir", str(smol_cache_dir))
    try:
        with wait_serving(proc, port, log, timeout=180) as client:
            paris, banana = client.score(
                [Pair("The capital of France is", " Paris."), Pair("The capital of France is", " banana.")]
            )
            assert paris.conditional_logprob > banana.conditional_logprob + 10.0
            assert client.model_info().model_name == "SmolLM2-135M-Instruct"
    finally:
        stop(proc, log)
    assert "SmolLM2-135M-Instruct" in log.read_text()
