"""``pairscore score``/``filter`` where datasets live: compressed, sharded and remote inputs and outputs.

Against the real server with the fake engine (prompt token -0.5, response
token -0.25, one token per character). Every output is compared byte for
byte (its rows as JSON Lines, decompressed with the standard library, not
the code under test) with the output of the same run on the uncompressed
local file. S3 is moto's standalone server on 127.0.0.1 (the ``s3``
fixture); other schemes use fsspec's memory filesystem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import cli

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, cli_env
from harness.storage import (
    COMPRESSIONS,
    compress,
    decompress,
    kill_when,
    local_output_bytes,
    remote_output_bytes,
    state_rows,
)


@pytest.fixture(scope="module")
def io_server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=64)).start()
    yield st
    st.stop()


@pytest.fixture
def slow_server() -> Iterator[ServerThread]:
    """5 ms per forward pass: a run of ROWS rows takes a few seconds, long enough to kill it."""
    st = ServerThread(FakeEngine(max_context=64, forward_delay_s=0.005)).start()
    yield st
    st.stop()


def rows_fixture(n: int = 40) -> list[dict[str, Any]]:
    return [
        {"id": i, "prompt": "Q" * (i % 4), "response": "r" * (1 + i % 5), "note": f'é,{i}"x"'}
        for i in range(n)
    ]


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def run(server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", server.target, "--progress", "none", "--timeout", "30"])


def reference(server: ServerThread, tmp_path: Path, rows: list[dict[str, Any]], *args: str) -> bytes:
    """The output bytes of the same command on the uncompressed local JSONL input."""
    src, out = tmp_path / "ref-in.jsonl", tmp_path / "ref-out.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    assert run(server, "score", str(src), "-o", str(out), *args) == 0
    return out.read_bytes()


# --- compressed files, in and out ----------------------------------------------------------------


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_every_compression_round_trips_byte_identical_to_the_uncompressed_run(
    io_server: ServerThread, tmp_path: Path, compression: str
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    rows = rows_fixture()
    want = reference(io_server, tmp_path, rows)
    suffix = COMPRESSIONS[compression]
    src, out = tmp_path / f"in.jsonl{suffix}", tmp_path / f"out.jsonl{suffix}"
    src.write_bytes(compress(jsonl_bytes(rows), compression))
    assert run(io_server, "score", str(src), "-o", str(out)) == 0
    assert decompress(out.read_bytes(), compression) == want
    # and back: the compressed output is a valid input of the next run
    again = tmp_path / "again.jsonl"
    assert run(io_server, "score", str(out), "-o", str(again), "--input-format", "jsonl") == 0
    assert len(again.read_text().splitlines()) == len(rows)


def test_compression_flags_override_the_extension(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_fixture(10)
    want = reference(io_server, tmp_path, rows)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(compress(jsonl_bytes(rows), "gzip"))  # gzip, though the name does not say so
    assert (
        run(
            io_server,
            "score",
            str(src),
            "-o",
            str(out),
            "--compression",
            "gzip",
            "--output-compression",
            "xz",
        )
        == 0
    )
    assert decompress(out.read_bytes(), "xz") == want
    # without the flag the gzip bytes are read as text: the first line is not JSON
    assert run(io_server, "score", str(src), "-o", str(tmp_path / "o2.jsonl")) == 1
    assert "line 1 is not" in capsys.readouterr().err


def test_a_csv_gz_input_and_a_tsv_bz2_output(io_server: ServerThread, tmp_path: Path) -> None:
    src, out = tmp_path / "in.csv.gz", tmp_path / "out.tsv.bz2"
    src.write_bytes(compress(b"prompt,response,n\nQ,ab,1\nQQ,c,2\n", "gzip"))
    assert run(io_server, "score", str(src), "-o", str(out)) == 0
    lines = decompress(out.read_bytes(), "bz2").decode().splitlines()
    assert lines[0].startswith("prompt\tresponse\tn\tjoint_logprob")
    assert [line.split("\t")[:3] for line in lines[1:]] == [["Q", "ab", "1"], ["QQ", "c", "2"]]


# --- sharded directories and globs ---------------------------------------------------------------


def write_shards(directory: Path, rows: list[dict[str, Any]], shards: int, suffix: str = ".jsonl.gz") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for k in range(shards):
        data = jsonl_bytes(rows[k * size : (k + 1) * size])
        compression = "gzip" if suffix.endswith(".gz") else None
        (directory / f"part-{k:05d}{suffix}").write_bytes(
            compress(data, compression) if compression else data
        )


def test_a_directory_of_shards_is_one_input_in_sorted_order_and_a_directory_output(
    io_server: ServerThread, tmp_path: Path
) -> None:
    rows = rows_fixture(50)
    want = reference(io_server, tmp_path, rows)
    src = tmp_path / "in"
    write_shards(src, rows, 4)
    (src / "_SUCCESS").write_text("")  # markers and hidden files are not data
    (src / ".part-00009.jsonl.gz.crc").write_text("x")
    (src / "README.md").write_text("not data")
    out = tmp_path / "out"
    assert run(io_server, "score", f"{src}/", "-o", f"{out}/") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == "_SUCCESS" and names[1:] and all(n.endswith(".jsonl.gz") for n in names[1:])
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest == {"format": "jsonl", "compression": "gzip", "shards": names[1:], "rows": len(rows)}
    assert local_output_bytes(out) == want
    # the directory output reads back as one input; a glob picks shards
    again = tmp_path / "again.jsonl"
    assert run(io_server, "score", f"{out}/", "-o", str(again), "--overwrite") == 0
    assert len(again.read_text().splitlines()) == len(rows)
    first_two = tmp_path / "two.jsonl"
    assert run(io_server, "score", str(src / "part-0000[01].jsonl.gz"), "-o", str(first_two)) == 0
    assert first_two.read_bytes() == b"".join(want.splitlines(keepends=True)[:26])


def test_a_csv_directory_output_gives_every_shard_its_header(io_server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl_bytes(rows_fixture(30)))
    out = tmp_path / "out"
    args = [
        "score",
        str(src),
        "-o",
        f"{out}/",
        "--output-format",
        "csv",
        "--checkpoint-every",
        "0",
        "--batch-size",
        "4",
    ]
    assert run(io_server, *args) == 0
    shards = sorted(out.glob("part-*.csv"))
    assert len(shards) > 1
    assert all(p.read_text().startswith("id,prompt,response,note,joint_logprob") for p in shards)
    assert sum(len(p.read_text().splitlines()) - 1 for p in shards) == 30


def test_shard_flag_counts_rows_across_compressed_files(io_server: ServerThread, tmp_path: Path) -> None:
    rows = rows_fixture(21)
    src = tmp_path / "in"
    write_shards(src, rows, 3)
    outs = []
    for i in (1, 2, 3):
        out = tmp_path / f"s{i}.jsonl"
        assert run(io_server, "score", f"{src}/", "-o", str(out), "--shard", f"{i}/3") == 0
        outs.append(out.read_bytes())
    assert b"".join(outs) == reference(io_server, tmp_path, rows)


# --- kill -9 and --resume ------------------------------------------------------------------------

ROWS = 1500


def cli_command(target: str, src: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pairscore.cli", "score", src, "-o", out, "--resume", "--target", target,
        "--batch-size", "8", "--checkpoint-every", "0.1", "--progress", "log", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("kind", [*COMPRESSIONS, "directory", "parquet-directory"])
def test_resume_after_sigkill_of_a_compressed_or_sharded_run_is_byte_identical(
    slow_server: ServerThread, tmp_path: Path, kind: str
) -> None:
    if kind == "zstd":
        pytest.importorskip("zstandard")
    rows = [{"id": i, "prompt": f"q{i % 50}", "response": "r" * (i % 9)} for i in range(ROWS)]
    want = reference(slow_server, tmp_path, rows)
    if kind == "directory":
        src, out = tmp_path / "in", tmp_path / "out"
        write_shards(src, rows, 5)
        src_arg, out_arg = f"{src}/", f"{out}/"
        state = tmp_path / "out.pairscore-state.json"
    elif kind == "parquet-directory":  # Parquet shards in, Parquet shards out
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        src, out = tmp_path / "in", tmp_path / "out"
        src.mkdir()
        for k in range(3):
            pq.write_table(
                pa.Table.from_pylist(rows[k * 500 : (k + 1) * 500]),
                src / f"part-{k}.parquet",
                row_group_size=100,
            )
        src_arg, out_arg = f"{src}/", f"{out}/"
        state = tmp_path / "out.pairscore-state.json"
    else:
        suffix = COMPRESSIONS[kind]
        src, out = tmp_path / f"in.jsonl{suffix}", tmp_path / f"out.jsonl{suffix}"
        src.write_bytes(compress(jsonl_bytes(rows), kind))
        src_arg, out_arg = str(src), str(out)
        state = Path(str(out) + ".pairscore-state.json")
    command = cli_command(slow_server.target, src_arg, out_arg)
    done = kill_when(command, cli_env(), lambda: state_rows(lambda: state.read_bytes()), ROWS // 4)
    assert ROWS // 4 <= done < ROWS, "killed too late to test a resume"
    assert not out.exists(), "a killed run left something under the final name"

    second = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resumed after row {done:,}" in second.stderr
    if kind.endswith("directory"):
        got = local_output_bytes(out)
        if kind == "parquet-directory":  # Parquet keeps the input's int64 ids: compare rows, not bytes
            assert [json.loads(line) for line in got.splitlines()] == [
                json.loads(line) for line in want.splitlines()
            ]
            assert len(list(out.glob("part-*.parquet"))) > 1
        else:
            assert got == want
    else:
        assert decompress(out.read_bytes(), kind) == want
    assert json.loads(state.read_text())["phase"] == "complete" and not list(tmp_path.glob("out*.part*"))


# --- other filesystems: fsspec's memory filesystem -----------------------------------------------


@pytest.fixture
def memfs() -> Iterator[Any]:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/t{os.getpid()}-{id(fs)}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_filesystem_urls_in_and_out_with_resume_after_an_interruption(
    io_server: ServerThread, tmp_path: Path, memfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("zstandard")
    fs, root = memfs
    rows = rows_fixture(40)
    want = reference(io_server, tmp_path, rows)
    fs.pipe_file(f"{root}/in/a.jsonl.zst", compress(jsonl_bytes(rows[:15]), "zstd"))
    fs.pipe_file(f"{root}/in/b.jsonl.zst", compress(jsonl_bytes(rows[15:]), "zstd"))
    src, out = f"memory://{root}/in/", f"memory://{root}/out.jsonl.gz"

    from pairscore.pipeline import runner as runner_module

    original, emitted = runner_module.Runner._emit, [0]

    def stop_after_25(self: Any, *args: Any, **kwargs: Any) -> None:
        if emitted[0] == 25:
            raise KeyboardInterrupt
        emitted[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_emit", stop_after_25)
    args = ["score", src, "-o", out, "--resume", "--checkpoint-every", "0", "--batch-size", "4"]
    assert run(io_server, *args) == 130
    monkeypatch.undo()
    assert not fs.exists(f"{root}/out.jsonl.gz")
    assert fs.exists(f"{root}/out.jsonl.gz.parts") and fs.exists(f"{root}/out.jsonl.gz.pairscore-state.json")
    assert run(io_server, *args) == 0
    assert remote_output_bytes(fs, f"{root}/out.jsonl.gz") == want
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "in",
        "out.jsonl.gz",
        "out.jsonl.gz.pairscore-state.json",  # the record of a complete --resume run
    ]


def test_memory_filesystem_parquet_directory_output(
    io_server: ServerThread, tmp_path: Path, memfs: Any
) -> None:
    pytest.importorskip("pyarrow")
    fs, root = memfs
    rows = rows_fixture(12)
    want = reference(io_server, tmp_path, rows)
    fs.pipe_file(f"{root}/in.jsonl", jsonl_bytes(rows))
    out = f"memory://{root}/scored/"
    assert run(io_server, "score", f"memory://{root}/in.jsonl", "-o", out, "--output-format", "parquet") == 0
    got = remote_output_bytes(fs, f"{root}/scored")
    assert [json.loads(line) for line in got.splitlines()] == [json.loads(line) for line in want.splitlines()]


# --- S3: moto's server on loopback ---------------------------------------------------------------


def s3_env(s3: Any) -> dict[str, str]:
    return {**cli_env(), **s3.env}


@pytest.fixture
def bucket(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    fs = s3.filesystem()
    name = f"b{os.getpid()}-{len(fs.ls(''))}"
    fs.mkdir(name)
    yield fs, name
    fs.rm(name, recursive=True)


def test_filter_a_bucket_prefix_into_parquet_with_resume_after_sigkill(
    slow_server: ServerThread, tmp_path: Path, bucket: tuple[Any, str], s3: Any
) -> None:
    """The README's command: pairscore filter s3://bucket/in/ -o s3://bucket/kept.parquet --resume."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    fs, name = bucket
    rows = [{"id": i, "prompt": f"q{i % 7}", "response": "r" * (i % 9)} for i in range(ROWS)]
    for k in range(3):
        fs.pipe_file(
            f"{name}/in/part-{k}.jsonl.gz", compress(jsonl_bytes(rows[k * 500 : (k + 1) * 500]), "gzip")
        )
    fs.pipe_file(f"{name}/in/_SUCCESS", b"")
    local_in, local_kept = tmp_path / "in.jsonl", tmp_path / "kept.parquet"
    local_in.write_bytes(jsonl_bytes(rows))
    assert run(slow_server, "filter", str(local_in), "-o", str(local_kept), "--max", "joint=-2") == 0

    command = [
        sys.executable, "-m", "pairscore.cli", "filter", f"s3://{name}/in/", "-o", f"s3://{name}/kept.parquet",
        "--resume", "--max", "joint=-2", "--target", slow_server.target, "--batch-size", "8",
        "--checkpoint-every", "0.1", "--progress", "log",
    ]  # fmt: skip
    state = f"{name}/kept.parquet.pairscore-state.json"

    def read_state() -> bytes | None:
        check = s3.filesystem()
        return check.cat_file(state) if check.exists(state) else None

    done = kill_when(command, s3_env(s3), lambda: state_rows(read_state), ROWS // 4)
    assert ROWS // 4 <= done < ROWS
    check = s3.filesystem()
    assert not check.exists(f"{name}/kept.parquet"), "a killed run left an object under the final name"
    assert check.ls(f"{name}/kept.parquet.parts"), "the checkpointed chunks are in the bucket"

    second = subprocess.run(command, env=s3_env(s3), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resumed after row {done:,}" in second.stderr
    check = s3.filesystem()
    import io

    got = pq.read_table(io.BytesIO(check.cat_file(f"{name}/kept.parquet")))
    assert got.to_pylist() == pq.read_table(local_kept).to_pylist()
    left = sorted(p.rsplit("/", 1)[-1] for p in check.ls(name))
    assert left == ["in", "kept.parquet", "kept.parquet.pairscore-state.json"]  # + the completion record


def test_a_failed_s3_run_without_resume_leaves_nothing_in_the_bucket(
    io_server: ServerThread, bucket: tuple[Any, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, name = bucket
    lines = jsonl_bytes(rows_fixture(300)).splitlines(keepends=True)
    lines[250] = b'{"prompt": oops\n'
    fs.pipe_file(f"{name}/in.jsonl", b"".join(lines))
    out = f"s3://{name}/out.jsonl.zst"
    code = run(
        io_server, "score", f"s3://{name}/in.jsonl", "-o", out, "--checkpoint-every", "0", "--batch-size", "4"
    )
    assert code == 1
    assert "line 251 is not JSON" in capsys.readouterr().err
    fs.invalidate_cache()
    assert fs.ls(name) == [f"{name}/in.jsonl"]


def test_an_s3_output_round_trips_through_the_client_and_is_refused_when_it_exists(
    io_server: ServerThread, tmp_path: Path, bucket: tuple[Any, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, name = bucket
    rows = rows_fixture(20)
    want = reference(io_server, tmp_path, rows)
    fs.pipe_file(f"{name}/in.jsonl.xz", compress(jsonl_bytes(rows), "xz"))
    out = f"s3://{name}/scored.jsonl.bz2"
    assert run(io_server, "score", f"s3://{name}/in.jsonl.xz", "-o", out) == 0
    assert remote_output_bytes(s3_fs := fs, f"{name}/scored.jsonl.bz2") == want
    assert run(io_server, "score", f"s3://{name}/in.jsonl.xz", "-o", out) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    del s3_fs


# --- what a user sees when something is missing --------------------------------------------------


def test_an_s3_url_without_the_s3_extra_names_the_pip_command(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['s3fs'] = None\n"  # as if pairscore[s3] were not installed
        "from pairscore.cli import main\n"
        "sys.exit(main(['score', 's3://bucket/in.jsonl', '-o', 'out.jsonl', '--target', '127.0.0.1:1']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'pairscore[s3]'" in result.stderr, result.stderr


def test_unknown_compression_empty_glob_and_a_directory_without_data(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl.lz4").write_bytes(b"x")
    assert run(io_server, "score", str(tmp_path / "in.jsonl.lz4"), "-o", str(tmp_path / "o.jsonl")) == 1
    err = capsys.readouterr().err
    assert "cannot tell the format of" in err and ".zst" in err
    with pytest.raises(SystemExit) as info:
        run(
            io_server,
            "score",
            str(tmp_path / "in.jsonl.lz4"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--compression",
            "lz4",
        )
    assert info.value.code == 2 and "invalid choice: 'lz4'" in capsys.readouterr().err
    assert run(io_server, "score", str(tmp_path / "nothing-*.jsonl"), "-o", str(tmp_path / "o.jsonl")) == 1
    assert "no file matches" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    assert run(io_server, "score", str(tmp_path / "empty"), "-o", str(tmp_path / "o.jsonl")) == 1
    assert "holds no data files" in capsys.readouterr().err
    (tmp_path / "in.parquet.gz").write_bytes(b"x")
    assert run(io_server, "score", str(tmp_path / "in.parquet.gz"), "-o", str(tmp_path / "o.jsonl")) == 1
    assert "Parquet compresses its own pages" in capsys.readouterr().err


def test_stdout_can_be_compressed(
    io_server: ServerThread, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    rows = rows_fixture(8)
    want = reference(io_server, tmp_path, rows)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    capfdbinary.readouterr()
    assert run(io_server, "score", str(src), "-o", "-", "--output-compression", "gzip") == 0
    assert decompress(capfdbinary.readouterr().out, "gzip") == want


def test_resume_refuses_when_an_input_object_was_rewritten(
    io_server: ServerThread, memfs: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fs, root = memfs
    rows = rows_fixture(30)
    fs.pipe_file(f"{root}/in.jsonl", jsonl_bytes(rows))
    from pairscore.pipeline import runner as runner_module

    original, emitted = runner_module.Runner._emit, [0]

    def stop_after_10(self: Any, *args: Any, **kwargs: Any) -> None:
        if emitted[0] == 10:
            raise KeyboardInterrupt
        emitted[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_emit", stop_after_10)
    args = [
        "score",
        f"memory://{root}/in.jsonl",
        "-o",
        f"memory://{root}/out.jsonl",
        "--resume",
        "--checkpoint-every",
        "0",
    ]
    assert run(io_server, *args) == 130
    monkeypatch.undo()
    import time

    time.sleep(0.01)
    fs.pipe_file(f"{root}/in.jsonl", jsonl_bytes(rows[::-1]))  # same size, other rows
    capsys.readouterr()
    assert run(io_server, *args) == 1
    assert "cannot resume: files differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("gs://b/in.jsonl", "gcsfs", "gcs"),
        ("az://c/in.jsonl", "adlfs", "azure"),
        ("hf://datasets/u/d/x.jsonl", "huggingface_hub", "hf"),
    ],
)
def test_every_scheme_with_an_extra_names_it_when_its_package_is_missing(
    url: str, module: str, extra: str
) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from pairscore.pipeline.storage import FormatError, filesystem\n"
        "try:\n"
        f"    filesystem({url!r})\n"
        "except FormatError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install 'pairscore[{extra}]'" in result.stdout, result.stdout


def test_report_reads_a_compressed_directory_output(io_server: ServerThread, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "in"
    write_shards(src, rows_fixture(20), 2)
    assert run(io_server, "score", f"{src}/", "-o", f"{tmp_path / 'scored'}/") == 0
    png = tmp_path / "r.png"
    assert cli.main(["report", f"{tmp_path / 'scored'}/", "-o", str(png), "--metric", "conditional"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_a_kill_while_committing_a_remote_output_is_completed_by_resume(
    io_server: ServerThread, tmp_path: Path, memfs: Any, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """Killed between the merge and the rename (one file), or half-way through moving shards."""
    fs, root = memfs
    rows = rows_fixture(30)
    want = reference(io_server, tmp_path, rows)
    fs.pipe_file(f"{root}/in.jsonl", jsonl_bytes(rows))
    out = f"memory://{root}/out.jsonl" if layout == "file" else f"memory://{root}/out/"
    from pairscore.pipeline import parts

    moves = [0]
    original = parts.ChunkedPart._move

    def die_on_second_move(self: Any, src: str, dst: str) -> None:
        moves[0] += 1
        if moves[0] == (1 if layout == "file" else 2):
            raise KeyboardInterrupt  # killed: one file merged but not renamed / one shard moved
        original(self, src, dst)

    monkeypatch.setattr(parts.ChunkedPart, "_move", die_on_second_move)
    args = [
        "score",
        f"memory://{root}/in.jsonl",
        "-o",
        out,
        "--resume",
        "--checkpoint-every",
        "0",
        "--batch-size",
        "8",
    ]
    assert run(io_server, *args) == 130
    monkeypatch.undo()
    if layout == "file":
        assert not fs.exists(f"{root}/out.jsonl") and fs.exists(f"{root}/out.jsonl.pairscore-tmp")
    else:
        assert not fs.exists(f"{root}/out/_SUCCESS") and fs.exists(f"{root}/out/part-00000.jsonl")
    assert run(io_server, *args) == 0
    assert remote_output_bytes(fs, f"{root}/out.jsonl" if layout == "file" else f"{root}/out") == want
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    final = "out.jsonl" if layout == "file" else "out"
    assert left == ["in.jsonl", final, f"{final}.pairscore-state.json"]  # + the completion record


def test_top_fraction_on_urls_ranks_through_a_remote_intermediate(
    io_server: ServerThread, tmp_path: Path, memfs: Any
) -> None:
    fs, root = memfs
    rows = rows_fixture(40)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    local = tmp_path / "kept.jsonl"
    args = ["--top-fraction", "0.25", "--by", "joint"]
    assert run(io_server, "filter", str(src), "-o", str(local), *args) == 0
    fs.pipe_file(f"{root}/in.jsonl.gz", compress(jsonl_bytes(rows), "gzip"))
    out = f"memory://{root}/kept.jsonl.zst"
    assert run(io_server, "filter", f"memory://{root}/in.jsonl.gz", "-o", out, *args, "--resume") == 0
    assert remote_output_bytes(fs, f"{root}/kept.jsonl.zst") == local.read_bytes()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "in.jsonl.gz",
        "kept.jsonl.zst",
        "kept.jsonl.zst.pairscore-state.json",  # the record of a complete --resume run
    ]


def test_stdin_can_be_compressed(
    io_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    rows = rows_fixture(9)
    want = reference(io_server, tmp_path, rows)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(compress(jsonl_bytes(rows), "bz2"))))
    out = tmp_path / "out.jsonl"
    assert run(io_server, "score", "-", "-o", str(out), "--compression", "bz2") == 0
    assert out.read_bytes() == want


def test_an_output_at_the_root_of_a_bucket_is_refused_before_anything_runs(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_bytes(jsonl_bytes(rows_fixture(2)))
    with pytest.raises(SystemExit) as info:
        run(io_server, "score", str(tmp_path / "in.jsonl"), "-o", "memory://bucket/")
    assert info.value.code == 2
    assert "is the root of a bucket: name an object or a prefix inside it" in capsys.readouterr().err


def test_a_directory_mixing_formats_is_refused_and_a_glob_picks_one(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl_bytes(rows_fixture(3)))
    (src / "b.csv").write_text("prompt,response\nq,r\n")
    assert run(io_server, "score", str(src), "-o", str(tmp_path / "o.jsonl")) == 1
    assert "holds files of different formats (csv, jsonl)" in capsys.readouterr().err
    assert run(io_server, "score", str(src / "*.jsonl"), "-o", str(tmp_path / "o.jsonl")) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


def test_overwrite_of_a_directory_output_leaves_no_shard_of_the_earlier_run(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_fixture(30)
    want = reference(io_server, tmp_path, rows)
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_bytes(jsonl_bytes(rows))
    assert (
        run(io_server, "score", str(src), "-o", f"{out}/", "--checkpoint-every", "0", "--batch-size", "4")
        == 0
    )
    assert len(list(out.glob("part-*"))) > 1
    assert run(io_server, "score", str(src), "-o", f"{out}/") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert run(io_server, "score", str(src), "-o", f"{out}/", "--overwrite") == 0
    assert [p.name for p in sorted(out.glob("part-*"))] == ["part-00000.jsonl"]
    assert local_output_bytes(out) == want


def test_file_urls_are_local_files(io_server: ServerThread, tmp_path: Path) -> None:
    rows = rows_fixture(6)
    want = reference(io_server, tmp_path, rows)
    (tmp_path / "in.jsonl.xz").write_bytes(compress(jsonl_bytes(rows), "xz"))
    out = tmp_path / "out.jsonl"
    assert run(io_server, "score", f"file://{tmp_path}/in.jsonl.xz", "-o", f"file://{out}") == 0
    assert out.read_bytes() == want and not list(tmp_path.glob("out.jsonl.*"))


def test_max_in_flight_below_the_batch_size_is_a_usage_error(
    io_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_bytes(jsonl_bytes(rows_fixture(2)))
    with pytest.raises(SystemExit) as info:  # was a ValueError traceback from the client
        run(
            io_server,
            "score",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--max-in-flight",
            "16",
        )
    assert info.value.code == 2
    assert "--max-in-flight (16) must be at least --batch-size (32)" in capsys.readouterr().err


def test_parquet_shards_at_a_url_are_read_through_fsspec_file_handles(
    io_server: ServerThread, tmp_path: Path, memfs: Any
) -> None:
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    fs, root = memfs
    rows = rows_fixture(25)
    want = reference(io_server, tmp_path, rows)
    for k in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows[k * 13 : (k + 1) * 13]), buffer, row_group_size=5)
        fs.pipe_file(f"{root}/pq/part-{k}.parquet", buffer.getvalue())
    out = tmp_path / "out.jsonl"
    assert run(io_server, "score", f"memory://{root}/pq/", "-o", str(out), "--shard", "2/2") == 0
    assert out.read_bytes() == b"".join(want.splitlines(keepends=True)[12:])
