"""``pairscore score --resume`` after a SIGKILL half-way, and a run across a server restart.

The CLI runs as a child process (``python -m pairscore.cli``) against the
real server with the fake engine on 127.0.0.1; the test kills it with
SIGKILL once its checkpoint shows part of the input done, reruns the same
command, and checks that the output holds every input row exactly once, in
input order.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, cli_env

ROWS = 3000


@pytest.fixture
def slow_server() -> Iterator[ServerThread]:
    """A server slow enough (5 ms per forward pass) that a run takes a few seconds."""
    st = ServerThread(FakeEngine(max_context=64, forward_delay_s=0.005)).start()
    yield st
    st.stop()


def write_input(path: Path) -> list[dict[str, Any]]:
    rows = [
        {"id": i, "prompt": f"q{i % 50}", "response": "r" * (i % 9), "note": f"n,{i}"} for i in range(ROWS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def command(target: str, src: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "pairscore.cli", "score", str(src), "-o", str(out), "--resume",
        "--target", target, "--batch-size", "8", "--checkpoint-every", "0.1", "--progress", "log",
    ]  # fmt: skip


def read_ids(out: Path) -> list[int]:
    if out.suffix == ".jsonl":
        return [json.loads(line)["id"] for line in out.read_text().splitlines()]
    if out.suffix == ".csv":
        with out.open(newline="") as f:
            return [int(r["id"]) for r in csv.DictReader(f)]
    import pyarrow.parquet as pq

    return [r["id"] for r in pq.read_table(out).to_pylist()]


def rows_done(state: Path) -> int:
    try:
        return json.loads(state.read_text())["stats"]["rows"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_resume_after_sigkill_writes_every_row_exactly_once_in_order(
    slow_server: ServerThread, tmp_path: Path, suffix: str
) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    src, out = tmp_path / "in.jsonl", tmp_path / f"out{suffix}"
    write_input(src)
    state = Path(str(out) + ".pairscore-state.json")
    first = subprocess.Popen(
        command(slow_server.target, src, out),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while rows_done(state) < ROWS // 4:
            assert first.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
    done = rows_done(state)
    assert ROWS // 4 <= done < ROWS, "killed too late to test a resume"
    assert not out.exists()  # nothing half-written under the final name

    second = subprocess.run(
        command(slow_server.target, src, out), env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert f"resumed after row {done:,}" in second.stderr
    assert read_ids(out) == list(range(ROWS))
    assert json.loads(state.read_text())["phase"] == "complete"  # the record that makes a rerun a no-op
    assert not Path(str(out) + ".part").exists() and not Path(str(out) + ".parts").exists()


def test_a_run_goes_on_through_a_server_restart(slow_server: ServerThread, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = write_input(src)
    run = subprocess.Popen(
        command(slow_server.target, src, out),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = Path(str(out) + ".pairscore-state.json")
        deadline = time.monotonic() + 60
        while rows_done(state) < ROWS // 4:
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        slow_server.stop()
        time.sleep(1.0)  # the client sees the server gone and backs off
        slow_server.start()
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)
    assert run.returncode == 0, stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert all(r["error"] is None for r in got)
    assert f"pairscore score: {ROWS:,} rows" in stderr
