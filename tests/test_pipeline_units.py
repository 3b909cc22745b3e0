"""Pipeline pieces on their own: formats, cut-offs, reservoir quantiles, progress display, parts."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pairscore.pipeline.columns import metric, score_columns, score_table
from pairscore.pipeline.formats import FormatError, detect_format
from pairscore.pipeline.line_writer import LineWriter
from pairscore.pipeline.parts import LinePart
from pairscore.pipeline.progress import Progress, human_count, human_duration
from pairscore.pipeline.row_reader import RowReader
from pairscore.pipeline.selection import Bound, Cutoff, Thresholds, TopSelector, parse_bound
from pairscore.pipeline.state_file import StateFile
from pairscore.pipeline.stats import Reservoir
from pairscore.types import ItemError, ItemErrorCode, PairScore


def test_formats_follow_the_extension_and_stdin_is_jsonl() -> None:
    assert [detect_format(p) for p in ("a.jsonl", "b.NDJSON", "c.csv", "d.tsv", "e.parquet", "-")] == [
        "jsonl", "jsonl", "csv", "tsv", "parquet", "jsonl",
    ]  # fmt: skip
    assert detect_format("x.txt", "csv") == "csv"
    with pytest.raises(FormatError, match="extension"):
        detect_format("x.txt")


def test_jsonl_reader_skips_rows_and_reports_bytes_read(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    reader = RowReader(str(path), "jsonl")
    assert [r["a"] for r in reader.rows(skip=1)] == [2, 3]
    assert reader.fraction_done() == 1.0
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(FormatError, match="line 2 is not a JSON object"):
        list(RowReader(str(path), "jsonl").rows())


def test_csv_writer_refuses_a_row_with_unknown_columns() -> None:
    out = io.BytesIO()
    writer = LineWriter(out, "csv")
    writer.write({"a": 1, "b": None, "c": math.nan, "d": True, "e": {"k": [1]}})
    assert out.getvalue().decode() == 'a,b,c,d,e\n1,,,true,"{""k"": [1]}"\n'
    with pytest.raises(FormatError, match=r"columns \['z'\]"):
        writer.write({"a": 2, "z": 3})


def test_line_part_resume_cuts_back_to_the_checkpoint(tmp_path: Path) -> None:
    final = str(tmp_path / "out.jsonl")
    part = LinePart(final, "jsonl")
    part.open(None)
    part.write({"i": 0})
    saved = part.checkpoint()
    part.write({"i": 1})  # written after the checkpoint: must not survive a crash
    part.checkpoint()
    part.close()
    again = LinePart(final, "jsonl")
    again.open(saved)
    again.write({"i": 2})
    again.finish()
    assert [json.loads(line) for line in Path(final).read_text().splitlines()] == [{"i": 0}, {"i": 2}]


def test_state_file_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "s.json")
    assert state.load() is None
    state.save({"rows": 1})
    state.save({"rows": 2})
    assert state.load() == {"rows": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    state.remove()
    assert state.load() is None


def test_score_columns_for_scores_and_errors() -> None:
    ok = PairScore(-3.0, -1.0, -2.0, 2, 4)
    empty = PairScore(-1.0, -1.0, 0.0, 2, 0)
    bad = ItemError(ItemErrorCode.CONTEXT_LENGTH_EXCEEDED, "too long")
    table = score_table([ok, empty, bad])
    assert table["mean_conditional_logprob"] == [-0.5, None, None]
    assert table["perplexity"] == [pytest.approx(math.exp(0.5)), None, None]
    assert table["error"] == [None, None, "context_length_exceeded"]
    assert score_columns(bad)["error_message"] == "too long"


def test_bounds_are_inclusive_and_nan_never_passes() -> None:
    b = parse_bound("mean=-2.5", upper=False)
    assert b == Bound(metric("mean_conditional_logprob"), low=-2.5)
    assert b.holds(-2.5) and not b.holds(-2.6) and not b.holds(math.nan)
    t = Thresholds([b, parse_bound("ppl=10", upper=True)])
    assert t.describe() == ["mean_conditional_logprob >= -2.5", "perplexity <= 10"]
    assert t.passes({"mean_conditional_logprob": -1.0, "perplexity": 10.0})
    assert not t.passes({"mean_conditional_logprob": None, "perplexity": 1.0})


@given(
    keys=st.lists(st.one_of(st.integers(-5, 5).map(float), st.just(math.nan)), max_size=60),
    fraction=st.floats(0.01, 1.0),
)
def test_cutoff_keeps_exactly_ceil_q_n_best_with_ties_by_order(keys: list[float], fraction: float) -> None:
    m = metric("conditional_logprob")
    cutoff = Cutoff.find(keys, fraction)
    selector = TopSelector(m, cutoff)
    kept = [i for i, k in enumerate(keys) if selector.keeps({"conditional_logprob": k})]
    valid = [i for i, k in enumerate(keys) if not math.isnan(k)]
    want_count = math.ceil(fraction * len(valid) - 1e-9)
    assert len(kept) == want_count
    brute = sorted(sorted(valid, key=lambda i: (-keys[i], i))[:want_count])
    assert kept == brute


def test_reservoir_is_exact_when_small_and_close_when_sampling() -> None:
    small = Reservoir(size=100)
    for v in range(11):
        small.add(float(v))
    small.add(math.nan)
    assert small.exact and small.quantile(0.5) == 5.0 and (small.min, small.max) == (0.0, 10.0)
    big = Reservoir(size=2000, seed=1)
    rng = random.Random(3)
    for _ in range(50_000):
        big.add(rng.random())
    assert not big.exact and big.seen == 50_000
    assert big.quantile(0.5) == pytest.approx(0.5, abs=0.05)
    restored = Reservoir.from_state(json.loads(json.dumps(big.to_state())))
    assert restored.quantile(0.9) == big.quantile(0.9)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_on_a_terminal_shows_rate_eta_and_errors() -> None:
    stream, clock = FakeTty(), Clock()
    done = {"f": 0.0}
    progress = Progress(label="score", fraction=lambda: done["f"], stream=stream, clock=clock)
    assert progress.mode == "bar"
    for _ in range(10):
        clock.now += 1.0
        done["f"] += 0.05
        progress.update(rows=100, tokens=2000, errors=1)
    progress.close()
    drawn = stream.getvalue()
    last = drawn.split("\r")[-1]
    assert " 50.0%|█████" in last and "1,000 rows scored" in last  # tqdm's bar, redrawn in place
    assert "100 pairs/s" in last and "2,000 tok/s" in last
    assert "ETA 10.0s" in last and "errors 10" in last
    assert drawn.count("\r") >= 10 and drawn.endswith("\n")


def test_progress_bar_shows_waiting_for_the_server_until_a_row_comes_back() -> None:
    stream, clock = FakeTty(), Clock()
    progress = Progress(label="score", fraction=lambda: 0.25, stream=stream, clock=clock, target="h:5")
    progress.update(rows=10)
    clock.now += 7
    progress.waiting("connection refused; retrying")
    clock.now += 6
    progress.waiting("connection refused; retrying")  # redrawn: the wait is 6 s old now
    assert "waiting for the server at h:5 for 6s: connection refused" in stream.getvalue().split("\r")[-1]
    clock.now += 1
    progress.update(rows=1)
    assert "waiting" not in stream.getvalue().split("\r")[-1]
    progress.close()


def test_progress_log_lines_say_waiting_at_most_every_five_seconds() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(
        label="score", fraction=lambda: None, stream=stream, log_every=60, clock=clock, target="h:5"
    )
    for _ in range(12):
        clock.now += 1.0
        progress.waiting("connection refused")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "pairscore score: waiting for the server at h:5 for 0s: connection refused",
        "pairscore score: waiting for the server at h:5 for 5s: connection refused",
        "pairscore score: waiting for the server at h:5 for 10s: connection refused",
    ]


def test_progress_writes_plain_lines_when_not_a_terminal() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(label="filter", fraction=lambda: None, stream=stream, log_every=5, clock=clock)
    assert progress.mode == "log"
    for _ in range(12):
        clock.now += 1.0
        progress.update(rows=10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("pairscore filter: 50 rows scored") and "ETA" not in lines[0]
    assert "pairs/s" in lines[0] and "tok/s" in lines[0] and "errors 0" in lines[0]
    assert "\r" not in stream.getvalue()


def test_human_readable_numbers() -> None:
    assert human_count(999) == "999" and human_count(12_345) == "12.3k" and human_count(45e6) == "45.0M"
    assert (
        human_duration(4.2) == "4.2s" and human_duration(73) == "1m13s" and human_duration(3725) == "1h02m05s"
    )


# --- storage: compression, names, chunked parts ------------------------------------------------


def test_formats_look_through_compression_and_infixes_go_before_every_suffix() -> None:
    from pairscore.pipeline.compression import compression_of, split_compression
    from pairscore.pipeline.job import with_infix

    assert [detect_format(p) for p in ("a.jsonl.gz", "b.csv.zst", "s3://b/c.parquet", "d.tsv.xz")] == [
        "jsonl", "csv", "parquet", "tsv",
    ]  # fmt: skip
    assert split_compression("s3://b/k.jsonl.bz2") == ("s3://b/k.jsonl", "bz2")
    assert compression_of("x.jsonl", "gzip") == "gzip" and compression_of("x.jsonl.gz", "none") is None
    assert with_infix("kept.jsonl.gz", ".errors") == "kept.errors.jsonl.gz"
    assert with_infix("s3://b/dir/kept.parquet", ".errors") == "s3://b/dir/kept.errors.parquet"
    assert with_infix("/abs/kept.csv", ".errors") == "/abs/kept.errors.csv"
    assert with_infix("gs://b/kept/", ".errors") == "gs://b/kept.errors/"
    with pytest.raises(FormatError, match="unknown compression"):
        compression_of("x", "lz4")


@pytest.mark.parametrize("compression", ["gzip", "bz2", "xz", "zstd"])
def test_a_compressed_line_part_ends_a_member_per_checkpoint_so_resume_can_cut_it(
    tmp_path: Path, compression: str
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    from harness.storage import decompress

    final = str(tmp_path / "out.jsonl.x")
    part = LinePart(final, "jsonl", compression)
    part.open(None)
    part.write({"i": 0})
    saved = part.checkpoint()
    part.write({"i": 1})  # after the checkpoint: gone after a crash
    part.checkpoint()
    part.close()
    again = LinePart(final, "jsonl", compression)
    again.open(saved)
    again.write({"i": 2})
    again.finish()
    data = Path(final).read_bytes()
    assert decompress(data, compression) == b'{"i": 0}\n{"i": 2}\n'
    assert decompress(data[: saved["bytes"]], compression) == b'{"i": 0}\n'  # a complete file on its own


def test_chunked_part_on_a_url_resumes_from_its_checkpoint_and_commits_by_rename() -> None:
    import fsspec

    from pairscore.pipeline.parts import ChunkedPart, open_part

    fs = fsspec.filesystem("memory")
    final = "memory://units/chunked/out.csv.gz"
    part = open_part(final, "csv", compression="gzip")
    assert isinstance(part, ChunkedPart)
    part.open(None)
    part.write({"a": 1, "b": "x"})
    saved = part.checkpoint()
    part.write({"a": 2, "b": "y"})
    part.checkpoint()  # chunk 1: past the saved checkpoint, so the resume deletes it
    part.close()
    again = ChunkedPart(final, "csv", compression="gzip")
    again.open(saved)
    assert fs.ls("/units/chunked/out.csv.gz.parts", detail=False) == [
        "/units/chunked/out.csv.gz.parts/chunk-000000.csv.gz"
    ]
    again.write({"a": 3, "b": "z"})
    again.finish()
    from harness.storage import decompress

    assert decompress(fs.cat_file("/units/chunked/out.csv.gz"), "gzip") == b"a,b\n1,x\n3,z\n"  # one header
    assert sorted(fs.ls("/units/chunked", detail=False)) == ["/units/chunked/out.csv.gz"]
    fs.rm("/units", recursive=True)


def test_parquet_is_read_by_row_groups_and_a_resume_skips_whole_groups_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"i": list(range(100))}), path, row_group_size=10)
    read: list[int] = []
    original = pq.ParquetFile.iter_batches

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        read.extend(kwargs["row_groups"])
        for batch in original(self, *args, **kwargs):
            assert batch.num_rows <= 4  # streamed in batches, never a whole group
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    reader = RowReader(str(path), "parquet", batch_rows=4)
    assert [r["i"] for r in reader.rows(skip=35)] == list(range(35, 100))
    assert read == list(range(3, 10))  # groups 0-2 (rows 0-29) were skipped by their metadata alone
    assert reader.fraction_at(reader.position()) == 1.0
    reader.close()


def test_the_cli_loads_no_filesystem_or_compression_package_until_a_run_needs_one() -> None:
    import subprocess
    import sys

    from harness.servers import cli_env

    code = (
        "import sys\n"
        "import pairscore.cli, pairscore.pipeline.runner, pairscore.pipeline.commands\n"
        "pairscore.cli._make_parser()\n"
        "lazy = ('fsspec', 's3fs', 'gcsfs', 'adlfs', 'huggingface_hub', 'zstandard', 'tqdm', 'botocore')\n"
        "print(','.join(m for m in lazy if m in sys.modules) or 'clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


@pytest.mark.parametrize("compression", ["gzip", "bz2", "xz", "zstd"])
def test_decompression_holds_a_bounded_amount_of_a_highly_compressed_file(compression: str) -> None:
    """Every member is checked by pipeline.compression's own reader; it must stay streamed: a file
    of 64 MiB of one repeated row (zeros for the codecs with an output limit) is read in steps."""
    import io
    import tracemalloc

    from pairscore.pipeline.compression import open_decompressed

    from harness.storage import compress

    if compression == "zstd":
        pytest.importorskip("zstandard")
        plain = b'{"prompt": "the same row", "response": "again and again"}\n' * (64 << 20 >> 6)
    else:
        plain = b"\0" * (64 << 20)
    data, size = compress(plain, compression), len(plain)
    del plain
    tracemalloc.start()
    try:
        stream = open_decompressed(io.BytesIO(data), compression)
        total = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 16), b""))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 16 << 20, f"{peak >> 20} MiB held while reading"
