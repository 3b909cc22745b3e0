"""Tier 4 (slow): the throughput benchmark runs end to end on a small workload.

Not a speed test (this machine is too noisy for one in CI): it checks that
bench/throughput.py still runs every in-process layout, prints its ratios, and
that packed rows, padded batches, the engine without the prefix trie and the
naive loop agree on the scores, on every workload (few-shot and chat included).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


# 12 methods x workloads, each a child process: about 4 minutes on 2 idle cores.
@pytest.mark.timeout(1800)
def test_benchmark_runs_and_methods_agree(smol_cache_dir, tmp_path):
    env = {**os.environ, "PAIRSCORE_CACHE_DIR": str(smol_cache_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--model",
            "tiny",
            "--pairs",
            "6",
            "--shared",
            "2x3",
            "--workloads",
            "distinct,shared,fewshot,chat",
            "--fewshot",
            "2x3",
            "--chat",
            "3",
            "--methods",
            "naive_one,engine,engine_padded",
            "--shared-methods",
            "engine,engine_padded,engine_prompts",
            "--gemm-seconds",
            "0.2",
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "skipped" not in out, out
    labels = (
        "distinct prompts (6 pairs)",
        "shared prompts (6 pairs)",
        "few-shot 2 items x 3 choices (6 pairs)",
        "chat, one system prompt (3 pairs)",
    )
    for label in labels:
        assert f"== {label} ==" in out
    assert out.count("engine / engine_padded:") == 4
    # the prefix trie against whole-prompt sharing, in every workload
    assert out.count("engine / engine_prompts:") == 3
    diffs = re.findall(r"max \|(\w+) - engine\|: joint (\S+), conditional (\S+) nats", out)
    assert {m for m, _, _ in diffs} == {"naive_one", "engine_padded", "engine_prompts"}
    assert len(diffs) == 2 * 4
    for _, joint, conditional in diffs:
        assert float(joint) < 1e-4 and float(conditional) < 1e-4
    assert (tmp_path / "out.json").stat().st_size > 0
