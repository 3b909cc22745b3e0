"""pairscore.ray without a Ray cluster: the scorers' columns and null rule, the GPU defaults, and
that examples/ray_scoring.py is a thin wrapper of it. (Ray itself: test_examples_ray.)"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from typing import Any

import pytest

from pairscore import ray as pairscore_ray
from pairscore.pipeline.columns import SCORE_COLUMNS

from harness.fake_engine import FakeEngine
from harness.servers import ROOT, ServerThread

np = pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def ray_server() -> Iterator[ServerThread]:
    st = ServerThread(FakeEngine(max_context=64)).start()
    yield st
    st.stop()


def test_service_scorer_adds_the_columns_and_marks_missing_texts_invalid(ray_server: ServerThread) -> None:
    """A Ray batch (numpy arrays) with None and NaN: invalid_row, never the texts 'None'/'nan'."""
    scorer = pairscore_ray.ServiceScorer(ray_server.target, timeout=10)
    batch = {
        "prompt": np.array(["Q", None, "QQ", "Q"], dtype=object),
        "response": np.array(["ab", "c", math.nan, "d"], dtype=object),
        "k": np.arange(4),
    }
    out = scorer(batch)
    scorer.client.close()
    assert list(out["k"]) == [0, 1, 2, 3]
    assert set(SCORE_COLUMNS) <= set(out)
    assert out["error"] == [None, "invalid_row", "invalid_row", None]
    assert out["conditional_logprob"] == [-0.5, None, None, -0.25]
    assert out["prompt_logprob"] == [-0.5, None, None, -0.5]
    assert out["error_message"][1] == "field 'prompt' is missing"
    assert out["error_message"][2] == "field 'response' is missing (NaN)"


class RecordingDataset:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def map_batches(self, fn: Any, **kwargs: Any) -> RecordingDataset:
        self.calls.append((fn, kwargs))
        return self


@pytest.mark.parametrize(
    ("kwargs", "fn", "gpus", "device"),
    [
        ({"target": "t:1"}, pairscore_ray.ServiceScorer, 0, None),
        ({"use_engine": True}, pairscore_ray.EngineScorer, 1, "cuda"),
        ({"use_engine": True, "device": "cpu"}, pairscore_ray.EngineScorer, 0, "cpu"),
        ({"use_engine": True, "gpus_per_actor": 0.5}, pairscore_ray.EngineScorer, 0.5, "cuda"),
    ],
)
def test_gpu_defaults_service_actors_need_none_engine_actors_one(
    kwargs: dict[str, Any], fn: Any, gpus: float, device: str | None
) -> None:
    ds = RecordingDataset()
    pairscore_ray.score_dataset(ds, actors=3, **kwargs)
    [(called, options)] = ds.calls
    assert called is fn and options["num_gpus"] == gpus and options["concurrency"] == 3
    if device is not None:
        assert options["fn_constructor_kwargs"]["device"] == device


def test_score_dataset_needs_a_target_or_the_engine() -> None:
    with pytest.raises(ValueError, match="target"):
        pairscore_ray.score_dataset(RecordingDataset())


def test_the_example_is_a_thin_wrapper_of_the_module() -> None:
    spec = importlib.util.spec_from_file_location("ray_scoring_example", ROOT / "examples" / "ray_scoring.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("ServiceScorer", "EngineScorer", "score_dataset", "main"):
        assert getattr(module, name) is getattr(pairscore_ray, name)
    with pytest.raises(SystemExit):
        module.main(["in.parquet", "out/"])  # neither --target nor --engine
