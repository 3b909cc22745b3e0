"""examples/ray_scoring.py on a local Ray instance: map_batches through the service and in-process.

Ray starts a local instance with two CPUs, no dashboard; its workers import
the example module through PYTHONPATH. :class:`ServiceScorer` actors call
the real server (fake engine) on 127.0.0.1; :class:`EngineScorer` actors
load a tiny GPT-2 saved to disk and score it on the CPU, as they would on a
GPU actor with ``num_gpus=1``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pairscore.types import Pair

from harness.fake_engine import FakeEngine
from harness.servers import ROOT, ServerThread

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own, on init

EXAMPLES = ROOT / "examples"
ROWS = [{"prompt": "Q" * (i % 5), "response": "y" * (1 + i % 6), "k": i} for i in range(40)]


@pytest.fixture(scope="module")
def ray_local(ray_session: Any) -> Iterator[Any]:
    """The examples' Ray script, on the session's local Ray instance."""
    sys.path.insert(0, str(EXAMPLES))
    import ray_scoring

    try:
        yield ray_scoring
    finally:
        sys.path.remove(str(EXAMPLES))


def test_service_scorer_adds_score_columns_through_the_service(ray_local: Any) -> None:
    st = ServerThread(FakeEngine(max_context=64)).start()
    try:
        ds = ray.data.from_items(ROWS)
        scored = ray_local.score_dataset(ds, target=st.target, actors=2, batch_size=8)
        rows = sorted(scored.take_all(), key=lambda r: r["k"])
    finally:
        st.stop()
    assert [r["k"] for r in rows] == list(range(40))
    for row, src in zip(rows, ROWS, strict=True):
        assert row["conditional_logprob"] == -0.25 * len(src["response"])
        assert row["prompt_logprob"] == -0.5 * len(src["prompt"])
        assert row["error"] is None


def test_engine_scorer_runs_the_engine_inside_the_actors(
    ray_local: Any, gpt2_family: Any, tiny_engine: Any, tmp_path: Path
) -> None:
    model, tokenizer = gpt2_family
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    ds = ray.data.from_items(ROWS[:12])
    scored = ray_local.score_dataset(
        ds, engine_model=str(tmp_path / "tiny"), use_engine=True, actors=1, batch_size=6, device="cpu"
    )
    rows = sorted(scored.take_all(), key=lambda r: r["k"])
    want = tiny_engine.score_pairs([Pair(r["prompt"], r["response"]) for r in ROWS[:12]])
    assert [r["k"] for r in rows] == list(range(12))
    for row, w in zip(rows, want, strict=True):
        assert row["response_tokens"] == w.response_tokens
        assert row["conditional_logprob"] == pytest.approx(w.conditional_logprob, abs=1e-4)
        assert row["joint_logprob"] == pytest.approx(w.joint_logprob, abs=1e-4)


def test_score_dataset_needs_a_target_or_the_engine(ray_local: Any) -> None:
    with pytest.raises(ValueError, match="target"):
        ray_local.score_dataset(ray.data.from_items(ROWS[:1]))


def test_missing_texts_are_invalid_rows_not_the_text_none(ray_local: Any) -> None:
    """None used to be sent as the text 'None' and scored (NaN as 'nan': see test_ray_module;
    a column mixing text and NaN is not valid Arrow, so Ray hands nulls as None)."""
    items = [
        {"prompt": "Q", "response": "ab", "k": 0},
        {"prompt": None, "response": "ab", "k": 1},
        {"prompt": "Q", "response": None, "k": 2},
    ]
    st = ServerThread(FakeEngine(max_context=64)).start()
    try:
        scored = ray_local.score_dataset(ray.data.from_items(items), target=st.target, actors=1, batch_size=8)
        rows = sorted(scored.take_all(), key=lambda r: r["k"])
    finally:
        st.stop()
    assert [r["error"] for r in rows] == [None, "invalid_row", "invalid_row"]
    assert rows[0]["conditional_logprob"] == -0.5
    assert rows[1]["conditional_logprob"] is None or math.isnan(rows[1]["conditional_logprob"])
