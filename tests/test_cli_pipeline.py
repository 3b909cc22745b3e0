"""``pairscore score``, ``filter`` and ``report`` end to end against a real server on 127.0.0.1.

The server runs the fake engine, whose scores are exact functions of the
lengths (prompt token -0.5, response token -0.25, one token per character),
so every expected value is computed here independently.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import cli
from pairscore.pipeline import runner as runner_module

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, cli_env

MAX_CONTEXT = 64
SCORE_COLUMNS = [
    "joint_logprob",
    "prompt_logprob",
    "conditional_logprob",
    "prompt_tokens",
    "response_tokens",
    "mean_conditional_logprob",
    "perplexity",
    "error",
    "error_message",
]


@pytest.fixture(scope="module")
def pipeline_server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=MAX_CONTEXT)).start()
    yield st
    st.stop()


def rows_fixture(n: int = 60) -> list[dict[str, Any]]:
    """Rows with extra columns of several types, some too long, one without a response."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "id": i,
            "prompt": "Q" * (i % 6),
            "response": 'a, "quoted"\nline é'[: (i * 7) % 17],
            "score_hint": i / 3,
            "tags": ["x", str(i)],
            "meta": {"source": "unit", "n": i},
        }
        if i % 13 == 5:
            row["prompt"] = "P" * MAX_CONTEXT  # too long for the context
        rows.append(row)
    if n > 9:
        del rows[9]["response"]
    return rows


def expected(prompt: str, response: str) -> dict[str, Any]:
    m, n = len(prompt), len(response)
    cond = -0.25 * n
    return {
        "joint_logprob": -0.5 * m + cond,
        "prompt_logprob": -0.5 * m,
        "conditional_logprob": cond,
        "prompt_tokens": m,
        "response_tokens": n,
        "mean_conditional_logprob": cond / n if n else None,
        "perplexity": math.exp(0.25) if n else None,
    }


def outcome_kind(row: dict[str, Any]) -> str | None:
    """The error code the tool must give the row, or None if it scores."""
    if not isinstance(row.get("response"), str):
        return "invalid_row"
    if 1 + len(row["prompt"]) + len(row["response"]) > MAX_CONTEXT:
        return "context_length_exceeded"
    return None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(pipeline_server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", pipeline_server.target, "--progress", "none", "--timeout", "30"])


def assert_scored(row: dict[str, Any], source: dict[str, Any]) -> None:
    """``row`` holds all of ``source``'s columns unchanged and the right scores or error."""
    for key, value in source.items():
        assert row[key] == value, key
    kind = outcome_kind(source)
    if kind is None:
        want = expected(source["prompt"], source["response"])
        for key, value in want.items():
            assert row[key] == (pytest.approx(value) if value is not None else None), key
        assert row["error"] is None
    else:
        assert row["error"] == kind and row["error_message"]
        assert row["conditional_logprob"] is None


# --- score -------------------------------------------------------------------------------------


def test_score_jsonl_keeps_every_column_and_row_in_order(
    pipeline_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert (
        run(
            pipeline_server,
            "score",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--batch-size",
            "4",
        )
        == 0
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(rows)
    for got, src in zip(out, rows, strict=True):
        assert list(got)[: len(src)] == list(src)  # input columns first, in their order
        assert list(got)[len(src) :] == SCORE_COLUMNS
        assert_scored(got, src)
    err = capsys.readouterr().err
    assert "pairscore score: 60 rows" in err
    assert "failed 6 (context_length_exceeded 5, invalid_row 1)" in err
    assert "mean_conditional_logprob: min -0.25" in err
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*state*"))


def test_score_sends_failed_rows_to_errors_when_asked(pipeline_server: ServerThread, tmp_path: Path) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = [
        "score",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--errors",
        str(tmp_path / "bad.csv"),
    ]
    assert run(pipeline_server, *args, "--id-field", "id", "--concurrency", "3") == 0
    good = read_jsonl(tmp_path / "out.jsonl")
    with (tmp_path / "bad.csv").open(newline="", encoding="utf-8") as f:
        bad = list(csv.DictReader(f))
    assert [r["id"] for r in good] == [r["id"] for r in rows if outcome_kind(r) is None]
    assert [int(r["id"]) for r in bad] == [r["id"] for r in rows if outcome_kind(r) is not None]
    assert {r["error"] for r in bad} == {"context_length_exceeded", "invalid_row"}


def test_csv_round_trip_keeps_all_columns_and_values(pipeline_server: ServerThread, tmp_path: Path) -> None:
    rows = [
        {
            "text_id": f"r{i}",
            "instruction": "Q" * (i % 4),
            "output": 'y, "q"\nz é'[: i % 9],
            "note": f"n{i}",
            "empty": "",
        }
        for i in range(30)
    ]
    for name, delimiter in (("in.csv", ","), ("in.tsv", "\t")):
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
        out = tmp_path / ("out" + Path(name).suffix)
        args = [
            "score",
            str(tmp_path / name),
            "-o",
            str(out),
            "--prompt-field",
            "instruction",
            "--response-field",
            "output",
        ]
        assert run(pipeline_server, *args) == 0
        with out.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            assert reader.fieldnames == [*rows[0], *SCORE_COLUMNS]
            got = list(reader)
        assert [{k: g[k] for k in rows[0]} for g in got] == rows
        for g, src in zip(got, rows, strict=True):
            want = expected(src["instruction"], src["output"])
            assert float(g["conditional_logprob"]) == want["conditional_logprob"]
            assert int(g["response_tokens"]) == want["response_tokens"]
            assert g["mean_conditional_logprob"] == ("" if not src["output"] else "-0.25")
            assert g["error"] == ""


def test_parquet_round_trip_keeps_all_columns_and_their_types(
    pipeline_server: ServerThread, tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = rows_fixture(40)
    rows[9]["response"] = None  # a null in a string column
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    assert (
        run(pipeline_server, "score", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out.parquet")) == 0
    )
    out = pq.read_table(tmp_path / "out.parquet")
    for field in table.schema:
        assert out.schema.field(field.name).type == field.type
    assert out.schema.field("conditional_logprob").type == pa.float64()
    assert out.schema.field("response_tokens").type == pa.int64()
    assert out.schema.field("error").type == pa.string()
    for got, src in zip(out.to_pylist(), rows, strict=True):
        assert_scored(got, src)
    # and on to JSONL, CSV and back to Parquet: all columns survive
    assert run(pipeline_server, "score", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out.jsonl")) == 0
    assert [r["meta"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["meta"] for r in rows]
    assert (
        run(pipeline_server, "score", str(tmp_path / "out.jsonl"), "-o", str(tmp_path / "again.parquet")) == 0
    )
    again = pq.read_table(tmp_path / "again.parquet").to_pylist()
    assert [r["tags"] for r in again] == [r["tags"] for r in rows]


def test_stdin_to_stdout_is_jsonl() -> None:
    st = ServerThread(FakeEngine(max_context=MAX_CONTEXT)).start()
    try:
        rows = rows_fixture(12)
        data = "".join(json.dumps(r) + "\n" for r in rows)
        result = subprocess.run(
            [sys.executable, "-m", "pairscore.cli", "score", "-", "-o", "-", "--target", st.target],
            input=data,
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=120,
        )
    finally:
        st.stop()
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    for got, src in zip(out, rows, strict=True):
        assert_scored(got, src)
    assert len(out) == len(rows)
    assert "pairscore score: 12 rows" in result.stderr  # not a TTY: the summary, no bar


# --- filter ------------------------------------------------------------------------------------


def test_filter_thresholds_keep_exactly_the_rows_that_pass(
    pipeline_server: ServerThread, tmp_path: Path
) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = [
        "filter", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "kept.jsonl"),
        "--rejected", str(tmp_path / "rejected.jsonl"),
        "--min", "conditional_logprob=-2.5", "--max", "prompt=-1", "--min", "mean=-0.3",
    ]  # fmt: skip
    assert run(pipeline_server, *args) == 0

    def passes(r: dict[str, Any]) -> bool:
        if outcome_kind(r) is not None:
            return False
        e = expected(r["prompt"], r["response"])
        mean = e["mean_conditional_logprob"]
        return (
            e["conditional_logprob"] >= -2.5
            and e["prompt_logprob"] <= -1
            and mean is not None
            and mean >= -0.3
        )

    kept = read_jsonl(tmp_path / "kept.jsonl")
    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    assert [r["id"] for r in kept] == [r["id"] for r in rows if passes(r)]
    assert [r["id"] for r in rejected] == [r["id"] for r in rows if not passes(r)]
    assert 0 < len(kept) < len(rows)
    assert all(r["error"] is None for r in kept)
    assert sum(r["error"] is not None for r in rejected) == 6  # failed rows are not lost
    assert not (tmp_path / "kept.errors.jsonl").exists()


def test_filter_without_rejected_writes_failures_beside_kept(
    pipeline_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert (
        run(
            pipeline_server,
            "filter",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "kept.jsonl"),
            "--max",
            "joint=-3",
        )
        == 0
    )
    errors = read_jsonl(tmp_path / "kept.errors.jsonl")
    assert [r["id"] for r in errors] == [r["id"] for r in rows if outcome_kind(r) is not None]
    kept = read_jsonl(tmp_path / "kept.jsonl")
    assert all(r["joint_logprob"] <= -3 for r in kept)
    assert "failed rows: 6 rows ->" in capsys.readouterr().err


def best_k(rows: list[dict[str, Any]], q: float, key: Any) -> list[int]:
    """Brute force: ids of the ceil(q n) best rows by key (larger better), ties by input order."""
    scored = [r for r in rows if outcome_kind(r) is None and key(r) is not None]
    k = math.ceil(q * len(scored))
    ranked = sorted(scored, key=lambda r: (-key(r), r["id"]))[:k]
    return sorted(r["id"] for r in ranked)


@pytest.mark.parametrize(("fmt", "q"), [("jsonl", 0.25), ("csv", 0.1), ("parquet", 0.5), ("jsonl", 1.0)])
def test_top_fraction_keeps_exactly_the_best_rows_in_input_order(
    pipeline_server: ServerThread, tmp_path: Path, fmt: str, q: float
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    rows = rows_fixture(80)
    write_jsonl(tmp_path / "in.jsonl", rows)
    kept_path, rejected_path = tmp_path / f"kept.{fmt}", tmp_path / f"rejected.{fmt}"
    args = ["filter", str(tmp_path / "in.jsonl"), "-o", str(kept_path), "--rejected", str(rejected_path)]
    assert run(pipeline_server, *args, "--top-fraction", str(q), "--by", "conditional_logprob") == 0

    def ids(path: Path) -> list[int]:
        if fmt == "jsonl":
            return [r["id"] for r in read_jsonl(path)]
        if fmt == "csv":
            with path.open(newline="", encoding="utf-8") as f:
                return [int(r["id"]) for r in csv.DictReader(f)]
        import pyarrow.parquet as pq

        return [r["id"] for r in pq.read_table(path).to_pylist()]

    want = best_k(rows, q, lambda r: expected(r["prompt"], r["response"])["conditional_logprob"])
    kept = ids(kept_path)
    assert kept == want  # exactly ceil(q n) rows, ties by input order, written in input order
    assert sorted(kept + ids(rejected_path)) == [r["id"] for r in rows]
    assert not list(tmp_path.glob("*pairscore*"))  # the intermediate file is gone


def test_top_fraction_by_perplexity_prefers_low_values(pipeline_server: ServerThread, tmp_path: Path) -> None:
    rows = [
        {"id": i, "prompt": "", "response": "r" * (i % 4)} for i in range(20)
    ]  # ppl is constant but n=0 has none
    write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["filter", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "kept.jsonl"), "--top-fraction", "0.5"]
    assert run(pipeline_server, *args, "--by", "perplexity", "--rejected", str(tmp_path / "rej.jsonl")) == 0
    kept = [r["id"] for r in read_jsonl(tmp_path / "kept.jsonl")]
    with_value = [r["id"] for r in rows if r["response"]]
    assert kept == with_value[: math.ceil(0.5 * len(with_value))]  # all tie: the first ones win


def test_filter_refuses_bad_arguments(
    pipeline_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", rows_fixture(3))
    cases = [
        (["--min", "bogus=1"], "unknown metric"),
        (["--min", "mean"], "METRIC=VALUE"),
        (["--top-fraction", "1.5"], "(0, 1]"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as info:
            run(
                pipeline_server, "filter", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "k.jsonl"), *extra
            )
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(pipeline_server, "filter", str(tmp_path / "in.jsonl"), "-o", "-")
    assert "somewhere to go" in capsys.readouterr().err
    assert (
        run(
            pipeline_server,
            "score",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--prompt-field",
            "q",
        )
        == 1
    )
    assert "no column 'q'" in capsys.readouterr().err


# --- resume guards -------------------------------------------------------------------------------


def test_resume_refuses_a_changed_job_and_a_fresh_run_discards_leftovers(
    pipeline_server: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    original = runner_module.Runner._emit

    def crash_half_way(self: Any, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(runner_module.Runner, "_emit", crash_half_way)
    monkeypatch.setattr(runner_module.Runner, "_checkpoint_due", lambda self: True)
    assert run(pipeline_server, "score", str(tmp_path / "in.jsonl"), "-o", str(out), "--resume") == 130
    assert "--resume to continue" in capsys.readouterr().err
    monkeypatch.undo()
    state = json.loads((tmp_path / "out.jsonl.pairscore-state.json").read_text())
    assert state["stats"]["rows"] == 29

    code = run(pipeline_server, "score", str(tmp_path / "in.jsonl"), "-o", str(out), "--resume", "--joint")
    assert code == 1 and "tokenization differ" in capsys.readouterr().err

    assert run(pipeline_server, "score", str(tmp_path / "in.jsonl"), "-o", str(out), "--resume") == 0
    assert "resumed after row 29" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in rows]

    (tmp_path / "out.jsonl.part").write_text("garbage\n")
    (tmp_path / "out.jsonl.pairscore-state.json").write_text(json.dumps({**state, "version": 1}))
    # no --resume: start over (out.jsonl exists from the finished run, so --overwrite is needed)
    assert run(pipeline_server, "score", str(tmp_path / "in.jsonl"), "-o", str(out), "--overwrite") == 0
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in rows]
    assert not (tmp_path / "out.jsonl.part").exists()


def test_resume_completes_an_interrupted_finish(
    pipeline_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = rows_fixture()
    write_jsonl(tmp_path / "in.jsonl", rows)
    from pairscore.pipeline import parts

    finished: list[str] = []
    original = parts.LinePart.finish

    def die_after_first(self: Any) -> None:
        if finished:
            raise KeyboardInterrupt  # killed between two renames
        original(self)
        finished.append(self.final)

    monkeypatch.setattr(parts.LinePart, "finish", die_after_first)
    args = [
        "filter",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "kept.jsonl"),
        "--rejected",
        str(tmp_path / "rej.jsonl"),
    ]
    assert run(pipeline_server, *args, "--max", "joint=-2", "--resume") == 130
    monkeypatch.undo()
    assert len(finished) == 1
    assert run(pipeline_server, *args, "--max", "joint=-2", "--resume") == 0
    kept, rejected = read_jsonl(tmp_path / "kept.jsonl"), read_jsonl(tmp_path / "rej.jsonl")
    assert sorted(r["id"] for r in kept + rejected) == [r["id"] for r in rows]
    assert not list(tmp_path.glob("*.part"))
    assert [p.name for p in tmp_path.glob("*state*")] == ["kept.jsonl.pairscore-state.json"]  # complete


# --- report ------------------------------------------------------------------------------------


def test_report_draws_a_png_with_quantiles_and_a_threshold(
    pipeline_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    write_jsonl(tmp_path / "in.jsonl", rows_fixture())
    assert (
        run(pipeline_server, "score", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "scored.jsonl")) == 0
    )
    png = tmp_path / "report.png"
    assert (
        cli.main(
            [
                "report",
                str(tmp_path / "scored.jsonl"),
                "-o",
                str(png),
                "--metric",
                "conditional",
                "--threshold",
                "-2",
            ]
        )
        == 0
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (990, 550)
    assert "values of conditional_logprob" in capsys.readouterr().err
    # as the README promises: the image is not replaced without --overwrite (it was, silently)
    assert cli.main(["report", str(tmp_path / "scored.jsonl"), "-o", str(png)]) == 1
    assert f"{png} already exists; pass --overwrite to replace" in capsys.readouterr().err
    assert png.read_bytes() == data
    assert cli.main(["report", str(tmp_path / "scored.jsonl"), "-o", str(png), "--overwrite"]) == 0
    assert png.read_bytes() != data  # the default metric's histogram
    assert cli.main(["report", str(tmp_path / "in.jsonl"), "-o", str(png), "--overwrite"]) == 1
    assert "no column 'mean_conditional_logprob'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from pairscore import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"pairscore {__version__}\n"


def test_report_data_quantiles_and_kept_share() -> None:
    from pairscore.pipeline.columns import metric
    from pairscore.pipeline.report import ReportData

    data = ReportData(metric("perplexity"), [1.0, 2.0, 3.0, 4.0, 5.0], missing=1)
    assert data.quantile(0.5) == 3.0
    assert data.quantile(0.95) == pytest.approx(4.8)
    assert data.share_kept(2.0) == pytest.approx(0.4)  # lower perplexity is kept
