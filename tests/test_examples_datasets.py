"""The Hugging Face datasets hook: pairscore.hf and examples/datasets_scoring.py, against a real server."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pairscore.hf import ScoreColumns, add_scores

from harness.fake_engine import FakeEngine
from harness.servers import ROOT, ServerThread

datasets = pytest.importorskip("datasets")


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "datasets_scoring", ROOT / "examples" / "datasets_scoring.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def datasets_server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=48)).start()
    yield st
    st.stop()


ROWS = [
    {"instruction": "Q" * (i % 5), "output": "" if i % 10 == 0 else "x" * (i % 7 + 1), "k": i}
    for i in range(50)
] + [{"instruction": "P" * 60, "output": "too long", "k": 50}]


def test_add_scores_adds_the_score_columns_in_a_batched_map(datasets_server: ServerThread) -> None:
    ds = datasets.Dataset.from_list(ROWS)
    scored = add_scores(
        ds, datasets_server.target, prompt_field="instruction", response_field="output", batch_size=16,
        load_from_cache_file=False,
    )  # fmt: skip
    assert scored.num_rows == len(ROWS)
    assert scored.column_names == [
        "instruction", "output", "k", "joint_logprob", "prompt_logprob", "conditional_logprob",
        "prompt_tokens", "response_tokens", "mean_conditional_logprob", "perplexity", "error", "error_message",
    ]  # fmt: skip
    for row, src in zip(scored, ROWS, strict=True):
        assert row["k"] == src["k"]
        if src["k"] == 50:
            assert row["error"] == "context_length_exceeded" and row["conditional_logprob"] is None
            continue
        n = len(src["output"])
        assert row["conditional_logprob"] == -0.25 * n
        assert row["prompt_logprob"] == -0.5 * len(src["instruction"])
        assert row["mean_conditional_logprob"] == (-0.25 if n else None)
        assert row["perplexity"] == (pytest.approx(math.exp(0.25)) if n else None)


def test_score_columns_pickles_without_its_channel(datasets_server: ServerThread) -> None:
    scorer = ScoreColumns(datasets_server.target, timeout=10)
    assert scorer({"prompt": ["a"], "response": ["bc"]})["conditional_logprob"] == [-0.5]
    clone = pickle.loads(pickle.dumps(scorer))  # what num_proc and the datasets cache do
    assert clone({"prompt": ["a"], "response": ["b"]})["response_tokens"] == [1]
    scorer.close()
    clone.close()


def test_the_example_scores_filters_and_saves(datasets_server: ServerThread, tmp_path: Path) -> None:
    example = load_example()
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "kept"
    argv = [str(src), str(out), "--target", datasets_server.target, "--prompt-field", "instruction",
            "--response-field", "output", "--min-mean-logprob", "-0.25"]  # fmt: skip
    assert example.main(argv) == 0
    kept = datasets.load_from_disk(str(out))
    want = [r["k"] for r in ROWS if r["output"] and r["k"] != 50]  # empty and failed responses have no mean
    assert kept["k"] == want
    assert set(kept["mean_conditional_logprob"]) == {-0.25}


# --- issue 12: nulls and the cache fingerprint ----------------------------------------------------


def test_a_missing_prompt_or_response_is_an_invalid_row_not_an_aborted_map(
    datasets_server: ServerThread,
) -> None:
    """The docstring promises nulls for a failing pair; None used to raise TypeError and abort map."""
    rows = [
        {"prompt": "Q", "response": "ab"},
        {"prompt": None, "response": "ab"},
        {"prompt": "Q", "response": None},
        {"prompt": "QQ", "response": "c"},
    ]
    scored = add_scores(datasets.Dataset.from_list(rows), datasets_server.target, load_from_cache_file=False)
    assert scored["error"] == [None, "invalid_row", "invalid_row", None]
    assert scored["conditional_logprob"] == [-0.5, None, None, -0.25]
    assert "'prompt' is missing" in scored["error_message"][1]
    assert "'response' is missing" in scored["error_message"][2]
    scorer = ScoreColumns(datasets_server.target, timeout=10)
    nan = float("nan")
    table = scorer({"prompt": ["a", nan], "response": [nan, "b"]})  # what pandas gives for a gap
    assert table["error"] == ["invalid_row", "invalid_row"]
    assert "NaN" in table["error_message"][0]
    scorer.close()


class OtherRevision(FakeEngine):
    """The same fake model, reported as another revision (a redeployed server)."""

    @property
    def info(self) -> Any:
        return dataclasses.replace(super().info, revision="1")


def test_the_cache_fingerprint_follows_the_served_model(tmp_path: Path) -> None:
    """A second add_scores on a file-backed dataset after the model changed must score again."""
    datasets.Dataset.from_list(ROWS[:10]).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    first = FakeEngine(max_context=48)
    st = ServerThread(first).start()
    try:
        add_scores(ds, st.target, prompt_field="instruction", response_field="output")
        sent = len(first.batches)
        assert sent > 0
        add_scores(ds, st.target, prompt_field="instruction", response_field="output")
        assert len(first.batches) == sent  # same model: the cache answers
        st.stop()
        second = OtherRevision(max_context=48)
        st = ServerThread(second, port=st.port).start()
        again = add_scores(ds, st.target, prompt_field="instruction", response_field="output")
        assert second.batches, "a changed model must be asked, not answered from the cache"
        assert again["k"] == [r["k"] for r in ROWS[:10]]
    finally:
        st.stop()
