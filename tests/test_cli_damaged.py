"""A truncated or damaged input never ends in a success exit, a traceback or a committed output (issue 23).

Every decoder (gzip, zstd, bz2, xz; JSONL, CSV, Parquet; local files and
fsspec URLs) is driven through the real ``pairscore score`` command against
the real server with the fake engine. A damaged input must stop the run with
exit 1, a message naming the file, where (byte or row) and what to do, and
nothing under the output's name, with or without ``--resume``. Inputs are
written with the standard library, zstandard and pyarrow, not the code under
test, and cut at several points, the first inside the first compressed
block; a property test cuts them anywhere.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairscore import cli

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, cli_env
from harness.storage import COMPRESSIONS, compress

ROWS = [
    {"id": i, "prompt": "Q" * (i % 7), "response": "r" * (1 + i % 5), "note": f"n{i}"} for i in range(400)
]
#: Where a file is cut: fractions of its size (the first lands inside the first compressed block).
CUTS = (0.05, 0.5, 0.9)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    st_ = ServerThread(FakeEngine(max_context=64)).start()
    yield st_
    st_.stop()


def run(server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", server.target, "--progress", "none", "--timeout", "30"])


def jsonl_bytes(rows: list[dict[str, Any]] = ROWS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict[str, Any]] = ROWS) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def parquet_bytes(rows: list[dict[str, Any]] = ROWS) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=100)
    return sink.getvalue()


def leftovers(directory: Path, out: str = "out.jsonl") -> list[str]:
    """What a failed run left under (or beside) the output's name."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(out))


def assert_refused(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], src: Path, *flags: str
) -> str:
    """The run on ``src`` fails with exit 1 naming it, commits nothing, and so does a --resume run."""
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert run(server, "score", str(src), "-o", str(out), *flags) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "Traceback" not in err, err
    assert leftovers(tmp_path) == [], "a failed run without --resume leaves nothing"
    assert run(server, "score", str(src), "-o", str(out), "--resume", *flags) == 1
    assert capsys.readouterr().err.strip() == err.strip()
    assert not out.exists(), "nothing is committed under the output's name"
    assert run(server, "score", str(src), "-o", str(out), "--resume", *flags) == 1, "nor on a rerun"
    assert not out.exists()
    return err


# --- compressed streams ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_truncated_compressed_input_fails_naming_the_file_and_the_byte(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], compression: str, cut: float
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    data = compress(jsonl_bytes(), compression)
    src = tmp_path / f"in.jsonl{COMPRESSIONS[compression]}"
    src.write_bytes(data[: int(len(data) * cut)])
    err = assert_refused(server, tmp_path, capsys, src)
    assert f"the {compression} stream ends at compressed byte {int(len(data) * cut):,}" in err, err
    assert "truncated" in err and "Re-create or re-download the file" in err, err


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_truncated_compressed_input_fails_with_on_bad_row_skip_and_with_shard(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], compression: str
) -> None:
    """The issue's 60 % cut of a .zst with --on-bad-row skip exited 0 with the rows before the cut."""
    if compression == "zstd":
        pytest.importorskip("zstandard")
    data = compress(jsonl_bytes(), compression)
    src = tmp_path / f"in.jsonl{COMPRESSIONS[compression]}"
    src.write_bytes(data[: int(len(data) * 0.6)])
    errors = str(tmp_path / "out.jsonl.errors.jsonl")
    assert_refused(server, tmp_path, capsys, src, "--on-bad-row", "skip", "--errors", errors)
    err = assert_refused(server, tmp_path, capsys, src, "--shard", "1/2")
    assert "counting its rows for --shard" in err


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_damaged_compressed_input_fails_by_its_checksum(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], compression: str
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    data = bytearray(compress(jsonl_bytes(), compression))
    data[len(data) // 2] ^= 0xFF
    src = tmp_path / f"in.jsonl{COMPRESSIONS[compression]}"
    src.write_bytes(bytes(data))
    err = assert_refused(server, tmp_path, capsys, src)
    assert f"corrupt {compression} data" in err and "damaged" in err, err


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_plain_text_file_named_as_compressed_says_so(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], compression: str
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    suffix = COMPRESSIONS[compression]
    src = tmp_path / f"in.jsonl{suffix}"
    src.write_bytes(jsonl_bytes())
    err = assert_refused(server, tmp_path, capsys, src)
    assert f"not {compression} data: it does not start with {compression}'s magic bytes" in err, err
    assert f"name it without {suffix} or pass --compression none" in err, err
    out = tmp_path / "plain.jsonl"
    assert run(server, "score", str(src), "-o", str(out), "--compression", "none") == 0
    assert len(out.read_text().splitlines()) == len(ROWS)


def test_garbage_after_the_last_member_is_refused_and_members_are_all_read(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = len(ROWS) // 2
    members = compress(jsonl_bytes(ROWS[:half]), "gzip") + compress(jsonl_bytes(ROWS[half:]), "gzip")
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(members)
    assert run(server, "score", str(src), "-o", str(tmp_path / "all.jsonl")) == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == len(ROWS)
    src.write_bytes(members + b"not gzip")
    err = assert_refused(server, tmp_path, capsys, src)
    assert f"the bytes after member end at byte {len(members):,} do not start" in err, err


def test_a_zst_cut_in_half_fails_in_a_child_process_without_a_traceback(
    server: ServerThread, tmp_path: Path
) -> None:
    """The issue's first case, as a user runs it: exit 0 with "0 rows" before."""
    pytest.importorskip("zstandard")
    data = compress(jsonl_bytes(), "zstd")
    src, out = tmp_path / "cut.jsonl.zst", tmp_path / "out.jsonl"
    src.write_bytes(data[: len(data) // 2])
    command = [sys.executable, "-m", "pairscore.cli", "score", str(src), "-o", str(out)]
    proc = subprocess.run(
        [*command, "--target", server.target, "--progress", "none"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "truncated" in proc.stderr, proc.stderr
    assert not out.exists()


# --- formats -----------------------------------------------------------------------------------


def test_a_jsonl_file_cut_inside_a_line_fails_even_with_on_bad_row_skip(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jsonl_bytes()
    src = tmp_path / "in.jsonl"
    for cut in (3, len(data) // 2, len(data) - 2):
        assert data[cut - 1 : cut] != b"\n"
        src.write_bytes(data[:cut])
        line, start = data[:cut].count(b"\n") + 1, data.rfind(b"\n", 0, cut) + 1
        err = assert_refused(server, tmp_path, capsys, src)
        assert f"the file ends inside line {line} (from byte {start:,}" in err, err
        errors = str(tmp_path / "errors.jsonl")
        assert_refused(server, tmp_path, capsys, src, "--on-bad-row", "skip", "--errors", errors)
    # a bad line that is not the last still follows --on-bad-row
    src.write_bytes(data[:40] + b"\n" + data)
    out = tmp_path / "skipped.jsonl"
    assert run(server, "score", str(src), "-o", str(out), "--on-bad-row", "skip", "--errors", errors) == 0


def test_a_csv_file_cut_inside_a_row_or_a_quoted_field_fails(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = csv_bytes()
    src = tmp_path / "in.csv"
    header_end = data.index(b"\n")
    for cut in (header_end // 2, header_end + 3, len(data) // 2, len(data) - 6):
        piece = data[:cut]
        last = piece[piece.rfind(b"\n") + 1 :]
        if cut > header_end and last.count(b",") >= 3:
            continue  # cut inside the last field: as long as a shorter file (see docs/pipeline.md)
        src.write_bytes(piece)
        err = assert_refused(server, tmp_path, capsys, src)
        assert "the file ends inside" in err and "truncated" in err, err
    quoted = b'id,prompt,response\n1,"a, b",c\n2,"open quote, never closed'
    src.write_bytes(quoted)
    err = assert_refused(server, tmp_path, capsys, src)
    assert "the file ends inside row 2" in err and "a quoted field not closed" in err, err


@pytest.mark.parametrize("cut", (1, 0.05, 0.5, -1))
def test_a_truncated_parquet_file_fails_before_any_row(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: float
) -> None:
    pytest.importorskip("pyarrow")
    data = parquet_bytes()
    end = {1: 1, -1: len(data) - 1}.get(cut, int(len(data) * cut))  # type: ignore[call-overload]
    src = tmp_path / "in.parquet"
    src.write_bytes(data[:end])
    err = assert_refused(server, tmp_path, capsys, src)
    assert "not a readable Parquet file" in err and "a truncated one is refused here" in err, err


# --- remote files ------------------------------------------------------------------------------


@pytest.fixture
def memfs() -> Iterator[tuple[Any, str]]:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/damaged{os.getpid()}-{id(fs)}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("name", ["in.jsonl.gz", "in.jsonl.xz", "in.csv.bz2", "in.parquet", "in.jsonl"])
def test_a_truncated_remote_input_fails_and_leaves_no_remote_output(
    server: ServerThread, memfs: tuple[Any, str], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    fs, root = memfs
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
        data = parquet_bytes()
    else:
        plain = csv_bytes() if ".csv" in name else jsonl_bytes()
        compression = next((c for c, s in COMPRESSIONS.items() if name.endswith(s)), None)
        data = compress(plain, compression) if compression else plain
    cut = len(data) // 2
    while data[cut - 1 : cut] == b"\n":  # a text file cut at a line's end is a shorter file
        cut -= 1
    fs.pipe_file(f"{root}/{name}", data[:cut])
    src, out = f"memory://{root}/{name}", f"memory://{root}/out.jsonl"
    capsys.readouterr()
    for flags in ((), ("--resume",), ("--resume",)):
        assert run(server, "score", src, "-o", out, *flags) == 1
        err = capsys.readouterr().err
        assert src in err or f"{root}/{name}" in err, err
        assert "truncated" in err, err
        assert not fs.exists(f"{root}/out.jsonl")


# --- property: a cut anywhere ------------------------------------------------------------------


SMALL = ROWS[:60]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_compressed_or_parquet_input_cut_anywhere_never_exits_0(server: ServerThread, data: Any) -> None:
    kind = data.draw(st.sampled_from(["gzip", "zstd", "bz2", "xz", "parquet"]))
    fmt = data.draw(st.sampled_from(["jsonl", "csv"]))
    if kind == "parquet":
        pytest.importorskip("pyarrow")
        whole, name = parquet_bytes(SMALL), "in.parquet"
    else:
        if kind == "zstd":
            pytest.importorskip("zstandard")
        plain = jsonl_bytes(SMALL) if fmt == "jsonl" else csv_bytes(SMALL)
        whole, name = compress(plain, kind), f"in.{fmt}{COMPRESSIONS[kind]}"
    cut = data.draw(st.integers(min_value=1, max_value=len(whole) - 1), label="cut")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / name, Path(tmp) / "out.jsonl"
        src.write_bytes(whole[:cut])
        assert run(server, "score", str(src), "-o", str(out)) == 1
        assert not out.exists()
