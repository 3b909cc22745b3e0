"""Outputs and reruns (issue 23): a missing output directory, and rerunning a finished ``--resume`` command.

Against the real server with the fake engine, through ``pairscore score``/``filter``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import cli

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread

ROWS = [{"id": i, "prompt": "Q" * (i % 4), "response": "r" * (1 + i % 5)} for i in range(30)]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=64)).start()
    yield st
    st.stop()


def run(server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", server.target, "--progress", "none", "--timeout", "30"])


def write_input(path: Path, rows: list[dict[str, Any]] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- an output whose directory does not exist -----------------------------------------------------


@pytest.mark.parametrize("output", ["nodir/sub/out.jsonl", "nodir/out.parquet", "nodir/out.jsonl.gz"])
def test_an_output_in_a_missing_directory_names_the_path_and_the_fix(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    if output.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / output
    assert run(server, "score", str(src), "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}: the directory {out.parent} does not exist" in err, err
    assert f"mkdir -p {out.parent}" in err and ".part" not in err, err
    assert not (tmp_path / "nodir").exists(), "nothing is created on the way"


def test_rejected_and_errors_outputs_are_checked_too(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_input(tmp_path / "in.jsonl")
    flags = ["--max", "joint=-2", "-o", str(tmp_path / "kept.jsonl")]
    assert run(server, "filter", str(src), *flags, "--rejected", str(tmp_path / "no/rej.jsonl")) == 1
    assert f"cannot write {tmp_path / 'no/rej.jsonl'}: the directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(server, "filter", str(src), *flags, "--errors", str(tmp_path / "file/err.jsonl")) == 1
    assert f"the directory {tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "kept.jsonl").exists()


# --- rerunning a finished --resume command --------------------------------------------------------


@pytest.mark.parametrize("output", ["out.jsonl", "out.jsonl.gz", "out.parquet", "out/"])
def test_rerunning_a_finished_resume_command_says_complete_and_exits_0(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    if output.endswith(("parquet", "/")):
        pytest.importorskip("pyarrow")
    src = write_input(tmp_path / "in.jsonl")
    out = str(tmp_path / output) + ("/" if output.endswith("/") else "")  # a directory of shards
    args = ["score", str(src), "-o", out, "--resume"]
    assert run(server, *args) == 0
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    for _ in range(2):  # idempotent: as a scheduler reruns it
        assert run(server, *args) == 0
        err = capsys.readouterr().err
        assert f"{out} is complete (30 input rows, written by an earlier run of this command)" in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written, (
        "nothing rewritten"
    )
    # without --resume it is still a run of its own, which refuses to replace the output
    assert run(server, "score", str(src), "-o", out) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_complete_needs_no_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = ServerThread(FakeEngine(max_context=64)).start()
    src = write_input(tmp_path / "in.jsonl")
    out = str(tmp_path / "out.jsonl")
    try:
        assert run(st, "score", str(src), "-o", out, "--resume") == 0
    finally:
        st.stop()
    capsys.readouterr()
    assert run(st, "score", str(src), "-o", out, "--resume") == 0  # nothing listens there now
    assert "is complete" in capsys.readouterr().err


def test_a_changed_output_input_or_argument_is_not_complete(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["filter", str(src), "-o", str(out), "--max", "joint=-2", "--resume"]
    assert run(server, *args) == 0
    capsys.readouterr()
    # another threshold: not this run's output
    assert run(server, "filter", str(src), "-o", str(out), "--max", "joint=-3", "--resume") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # the output was edited since: not what the run wrote
    out.write_text(out.read_text()[:-10])
    assert run(server, *args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # --overwrite scores again and records the new output
    assert run(server, *args, "--overwrite") == 0
    assert "rows in" in capsys.readouterr().err
    assert run(server, *args) == 0
    assert "is complete" in capsys.readouterr().err
    # the input changed: a new run, refused because the output exists
    os.utime(src, ns=(1, 1))
    assert run(server, *args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_a_deleted_shard_of_a_directory_output_is_not_complete(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    args = ["score", str(src), "-o", f"{out}/", "--resume"]
    assert run(server, *args) == 0
    (out / "_SUCCESS").unlink()
    capsys.readouterr()
    assert run(server, *args) == 1
    assert "already exist" in capsys.readouterr().err
