"""The offline lm-eval example of docs/ecosystem.md runs as written (issue 23).

The first command of docs/ecosystem.md, taken from the page itself, runs
lm-evaluation-harness on the task shipped in examples/lmeval/ against a real
server on a tiny model, from the repository's root, with the Hugging Face Hub
switched off: the task's data are local files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from harness.models import make_engine  # noqa: E402
from harness.servers import ROOT  # noqa: E402

TASK = "arithmetic_words_mc"


def documented_command() -> list[str]:
    """The first bash block of docs/ecosystem.md, as argv."""
    text = (ROOT / "docs" / "ecosystem.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block, "docs/ecosystem.md lost its first command"
    argv = shlex.split(block[1].replace("\\\n", " "))
    assert argv[0] == ".venv/bin/pairscore-lm-eval" and TASK in argv, argv
    return argv


def test_the_shipped_task_is_small_and_well_formed() -> None:
    for split, n in (("train", 10), ("test", 40)):
        rows = [json.loads(line) for line in (ROOT / f"examples/lmeval/arithmetic_{split}.jsonl").open()]
        assert len(rows) == n
        for row in rows:
            assert len(row["choices"]) == 4 and 0 <= row["label"] < 4
            assert len(set(row["choices"])) == 4


def test_the_offline_example_runs_as_documented(gpt2_family: Any, start_server: Any, tmp_path: Path) -> None:
    model, tokenizer = gpt2_family
    server = start_server(make_engine(model, tokenizer))
    argv = [a.replace("localhost:50051", server.target) for a in documented_command()]
    argv[0] = str(ROOT / ".venv" / "bin" / "pairscore-lm-eval")
    if not Path(argv[0]).exists():
        pytest.skip(".venv/bin/pairscore-lm-eval is missing: run make install")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")]),
        "HF_HUB_OFFLINE": "1",  # the example must not need the network
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    out = subprocess.run(
        [*argv, "--output_path", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["n-samples"][TASK] == {"original": 40, "effective": 40}
    assert data["results"][TASK]["acc,none"] * 40 == pytest.approx(
        round(data["results"][TASK]["acc,none"] * 40)
    )
    assert data["config"]["model"] == "pairscore"
    assert TASK in out.stdout  # lm-eval's table
