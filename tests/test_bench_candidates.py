"""Tier 4 (slow): bench/candidates.py runs end to end in its tiny mode.

Not a speed test (this machine is too noisy for one in CI): it checks that the
benchmark still runs every method, in-process and over gRPC, that candidates
and separate pairs give the same scores, and that the engine computes fewer
forward tokens for a candidate set than for its pairs one by one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "candidates.py"


def test_candidates_benchmark_runs_and_agrees(bpe_tokenizer, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    bpe_tokenizer.save_pretrained(tokenizer_dir)
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--model",
            "tiny",
            "--tokenizer",
            str(tokenizer_dir),
            "--prompt-tokens",
            "60",
            "--n",
            "2,4",
            "--sets",
            "1",
            "--repeats",
            "1",
            "--threads",
            "2",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for n in (2, 4):
        assert f"== 60-token prompt, N = {n} responses" in out
    diffs = re.findall(r"max \|(\w+) - (\w+)\|: (\S+) nats", out)
    assert len(diffs) == 6
    for _, _, diff in diffs:
        assert float(diff) <= 1e-5
    summary = json.loads(out_json.read_text())
    for n in ("2", "4"):
        rows = summary["results"][n]
        assert set(rows) == {
            "engine_candidates",
            "engine_separate",
            "grpc_candidates",
            "grpc_pairs",
            "grpc_separate",
        }
        # the prompt (1 prefix + 60 tokens) is computed once per set instead of N times,
        saved = (
            rows["engine_separate"]["forward_tokens_per_set"]
            - rows["engine_candidates"]["forward_tokens_per_set"]
        )
        assert saved >= 61 * (int(n) - 1)  # more where responses share leading tokens (prefix trie)
        assert rows["grpc_candidates"]["request_bytes_per_set"] < rows["grpc_pairs"]["request_bytes_per_set"]
