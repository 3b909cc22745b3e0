"""``pairscore score``/``filter`` on awkward inputs and outputs (issue 12, item 3), and ``--shard``.

Against the real server with the fake engine (prompt token -0.5, response
token -0.25, one token per character), like test_cli_pipeline.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore import cli
from pairscore.pipeline import runner as runner_module
from pairscore.pipeline.job import Job
from pairscore.pipeline.runner import Runner
from pairscore.types import Pair, PairScore

from harness.fake_engine import FakeEngine, expected_score
from harness.servers import ServerThread


@pytest.fixture(scope="module")
def inputs_server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=64)).start()
    yield st
    st.stop()


def run(inputs_server: ServerThread, *args: str) -> int:
    return cli.main([*args, "--target", inputs_server.target, "--progress", "none", "--timeout", "30"])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


ROWS = [{"id": i, "prompt": "Q" * (i % 4), "response": "r" * (1 + i % 5)} for i in range(23)]


# --- item 3: inputs ------------------------------------------------------------------------------


def test_a_csv_field_over_csvs_default_limit_is_read(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """csv's field limit is 131,072 characters; a longer field used to end in a raw traceback."""
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    doc = "d" * 200_000
    with src.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response", "doc"])
        writer.writerow(["Q", "ab", doc])
        writer.writerow(["QQ", "c", "short"])
    assert run(inputs_server, "score", str(src), "-o", str(out)) == 0, capsys.readouterr().err
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["doc"] for r in rows] == [doc, "short"]
    assert [float(r["conditional_logprob"]) for r in rows] == [-0.5, -0.25]


def test_a_malformed_jsonl_line_is_reported_with_its_one_line_number(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n{"prompt": oops}\n')
    assert run(inputs_server, "score", str(src), "-o", str(tmp_path / "out.jsonl")) == 1
    err = capsys.readouterr().err
    assert "line 4 is not JSON" in err and "column" in err, err
    assert "line 1" not in err, err  # json's own position within the line used to contradict it
    assert "--on-bad-row skip" in err


def test_on_bad_row_skip_sends_unreadable_lines_to_errors_with_their_line_number(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    lines = [json.dumps(r) for r in ROWS[:6]]
    lines[2] = '{"prompt": "x", "response": '  # line 3: cut short
    lines.insert(5, "[1, 2]")  # line 6: JSON, but not an object
    src.write_text("\n".join(lines) + "\n")
    code = run(
        inputs_server, "score", str(src), "-o", str(out), "--errors", str(errors), "--on-bad-row", "skip"
    )
    assert code == 0, capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 3, 4, 5]
    bad = read_jsonl(errors)
    assert [r["error"] for r in bad] == ["invalid_row", "invalid_row"]
    assert "line 3 is not JSON" in bad[0]["error_message"]
    assert "line 6 is not a JSON object" in bad[1]["error_message"]


def test_on_bad_row_skip_needs_errors_and_is_in_the_help(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    with pytest.raises(SystemExit) as info:
        run(
            inputs_server,
            "score",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--on-bad-row",
            "skip",
        )
    assert info.value.code == 2 and "needs --errors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--on-bad-row {fail,skip}" in help_text and "line number" in help_text
    assert "--overwrite" in help_text and "--shard I/N" in help_text


# --- item 3: outputs -----------------------------------------------------------------------------


def test_an_existing_output_is_not_overwritten_without_overwrite(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, ROWS)
    out.write_text("precious\n")
    assert run(inputs_server, "score", str(src), "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert out.read_text() == "precious\n"
    assert run(inputs_server, "score", str(src), "-o", str(out), "--overwrite") == 0
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in ROWS]


def test_filter_refuses_to_overwrite_its_rejected_file_too(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    (tmp_path / "rej.jsonl").write_text("keep me\n")
    args = ["filter", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "kept.jsonl")]
    assert run(inputs_server, *args, "--rejected", str(tmp_path / "rej.jsonl"), "--min", "mean=-1") == 1
    assert "rej.jsonl already exists" in capsys.readouterr().err
    assert not (tmp_path / "kept.jsonl").exists()


def test_a_failed_run_without_resume_leaves_no_part_files(
    inputs_server: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, ROWS)
    calls = [0]

    def interrupt_later(self: Any) -> bool:
        calls[0] += 1
        if calls[0] == 10:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(runner_module.Runner, "_checkpoint_due", interrupt_later)
    assert run(inputs_server, "score", str(src), "-o", str(out)) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    calls[0] = 0
    assert run(inputs_server, "score", str(src), "-o", str(out), "--resume") == 130  # kept for --resume
    assert (tmp_path / "out.jsonl.part").exists() and (tmp_path / "out.jsonl.pairscore-state.json").exists()
    capsys.readouterr()


def test_input_equal_to_output_gets_a_clear_error_not_the_top_level_usage(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    with pytest.raises(SystemExit) as info:
        run(inputs_server, "score", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "in.jsonl"))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "pairscore score: error:" in err and "same file" in err and "in.jsonl" in err
    assert "usage: pairscore [-h]" not in err and "COMMAND" not in err


def test_report_without_matplotlib_names_itself_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scored = tmp_path / "scored.jsonl"
    write_jsonl(scored, [{"mean_conditional_logprob": -1.0, "error": None}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(["report", str(scored), "-o", str(tmp_path / "r.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("pairscore report") == 1 and "matplotlib" in err and "pairscore[plot]" in err, err


# --- item 3: progress counts rows written, not rows read ahead ---------------------------------------


class ReadAheadClient:
    """Reads every pair before answering the first, as score_iter may with a large in-flight window."""

    def model_info(self) -> Any:
        return FakeEngine().info

    def score_iter(self, pairs: Iterator[Pair], **kwargs: Any) -> Iterator[PairScore]:
        return iter([expected_score(p) for p in list(pairs)])


def test_progress_percentage_counts_rows_written_not_rows_read_ahead(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "Q", "response": "r" * 10} for _ in range(20)]
    write_jsonl(src, rows)
    stderr = io.StringIO()
    job = Job(
        command="score", input=str(src), output=str(tmp_path / "out.jsonl"), progress="log", log_every=0
    )
    Runner(job, ReadAheadClient(), stderr=stderr).run()
    percents = [float(line.split()[2].rstrip("%")) for line in stderr.getvalue().splitlines()]
    assert len(percents) == 20
    assert percents[0] == pytest.approx(5.0) and percents[9] == pytest.approx(50.0), percents
    assert percents[-1] == 100.0


# --- item 6: --shard I/N ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 30])
def test_shard_outputs_concatenate_to_the_single_process_output(
    inputs_server: ServerThread, tmp_path: Path, count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, ROWS)
    assert run(inputs_server, "score", str(src), "-o", str(tmp_path / "all.jsonl")) == 0
    parts = []
    for i in range(1, count + 1):
        out = tmp_path / f"shard{i}.jsonl"
        assert run(inputs_server, "score", str(src), "-o", str(out), "--shard", f"{i}/{count}") == 0
        parts.append(out.read_bytes())
    assert b"".join(parts) == (tmp_path / "all.jsonl").read_bytes()
    sizes = [len(p.splitlines()) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # contiguous slices of (almost) equal size
    capsys.readouterr()


def test_filter_shards_of_a_csv_concatenate_without_their_headers(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "prompt", "response"])
        writer.writeheader()
        for row in ROWS:
            writer.writerow({**row, "response": row["response"] + "\nline two" * (row["id"] % 2)})
    common = ["--min", "conditional=-1", "--rejected"]
    assert (
        run(
            inputs_server, "filter", str(src), "-o", str(tmp_path / "k.csv"), *common, str(tmp_path / "r.csv")
        )
        == 0
    )
    kept, rejected = [], []
    for i in (1, 2):
        k, r = tmp_path / f"k{i}.csv", tmp_path / f"r{i}.csv"
        assert run(inputs_server, "filter", str(src), "-o", str(k), *common, str(r), "--shard", f"{i}/2") == 0
        kept.append(k.read_text(encoding="utf-8"))
        rejected.append(r.read_text(encoding="utf-8"))

    def cat(texts: list[str]) -> str:
        header = texts[0].split("\n", 1)[0] + "\n"
        return header + "".join(t[len(header) :] for t in texts if t)

    assert cat(kept) == (tmp_path / "k.csv").read_text(encoding="utf-8")
    assert cat(rejected) == (tmp_path / "r.csv").read_text(encoding="utf-8")
    capsys.readouterr()


def test_shard_refuses_top_fraction_stdin_and_nonsense(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    cases = [
        (["filter", str(tmp_path / "in.jsonl"), "--top-fraction", "0.5", "--shard", "1/2"], "--top-fraction"),
        (["score", "-", "--shard", "1/2"], "stdin"),
        (["score", str(tmp_path / "in.jsonl"), "--shard", "3/2"], "1 <= I <= N"),
        (["score", str(tmp_path / "in.jsonl"), "--shard", "half"], "I/N"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            run(inputs_server, *args, "-o", str(tmp_path / "o.jsonl"))
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_shard_resumes_within_its_own_rows(
    inputs_server: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "s2.jsonl"
    write_jsonl(src, ROWS)
    calls = [0]

    def interrupt_once(self: Any) -> bool:
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(runner_module.Runner, "_checkpoint_due", interrupt_once)
    assert run(inputs_server, "score", str(src), "-o", str(out), "--shard", "2/3", "--resume") == 130
    monkeypatch.undo()
    assert run(inputs_server, "score", str(src), "-o", str(out), "--shard", "2/3", "--resume") == 0
    assert [r["id"] for r in read_jsonl(out)] == list(range(7, 15))
    capsys.readouterr()


def test_a_csv_row_with_too_many_fields_goes_to_errors_with_its_line(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out, errors = tmp_path / "in.csv", tmp_path / "out.csv", tmp_path / "errors.csv"
    src.write_text('prompt,response\nQ,ab\n"multi\nline",x,extra\nQQ,c\n', encoding="utf-8")
    assert run(inputs_server, "score", str(src), "-o", str(out)) == 1
    assert "ending on line 4" in capsys.readouterr().err
    code = run(
        inputs_server, "score", str(src), "-o", str(out), "--errors", str(errors), "--on-bad-row", "skip"
    )
    assert code == 0, capsys.readouterr().err
    with out.open(newline="") as f:
        assert [r["prompt"] for r in csv.DictReader(f)] == ["Q", "QQ"]
    with errors.open(newline="") as f:
        [bad] = list(csv.DictReader(f))
    assert bad["error"] == "invalid_row" and "ending on line 4" in bad["error_message"]
    assert bad["prompt"] == "" and "prompt" in bad  # the input's columns, empty


def test_parquet_shards_concatenate_to_the_single_process_output(
    inputs_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src, row_group_size=5)
    assert run(inputs_server, "score", str(src), "-o", str(tmp_path / "all.parquet")) == 0
    shards = []
    for i in (1, 2, 3):
        out = tmp_path / f"s{i}.parquet"
        assert run(inputs_server, "score", str(src), "-o", str(out), "--shard", f"{i}/3") == 0
        shards.extend(pq.read_table(out).to_pylist())
    assert shards == pq.read_table(tmp_path / "all.parquet").to_pylist()
    capsys.readouterr()
