"""pairscore.ray without a Ray cluster: the scorers' columns and null rule, the GPU defaults, and
that examples/ray_scoring.py is a thin wrapper of it; on a local Ray instance, that score_files
(--per-file) skips the finished shards on a rerun. (The example on Ray: test_examples_ray.)"""

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


def _write_shards(folder: Any, names: list[str], rows_each: int = 6) -> list[str]:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    folder.mkdir()
    paths = []
    for s, name in enumerate(names):
        rows = [
            {"prompt": "Q" * (i % 3), "response": "y" * (1 + i % 4), "k": s * 100 + i}
            for i in range(rows_each)
        ]
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def ray_local(ray_session: Any) -> Any:
    """The session's local Ray instance."""
    return ray_session


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
def test_score_files_rerun_skips_the_finished_shards(
    ray_local: Any, ray_server: ServerThread, tmp_path: Any
) -> None:
    """A failed shard fails the run; the rerun scores only the shards without output (pairscore.ray
    --per-file). Shard b's first read fails (a lost file system, say). An actor that raises inside
    Ray Data is not used to make it fail: after the other Ray tests of a session, Ray kept such a
    run waiting past the test's 600 s timeout (twice), while alone it failed in seconds."""
    pq = pytest.importorskip("pyarrow.parquet")
    inputs = _write_shards(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    options = {"target": ray_server.target, "actors": 1, "batch_size": 4}

    def read_failing_on_b(path: str) -> Any:
        if path.endswith("b.parquet"):
            raise OSError(f"cannot read {path}")
        return ray_local.data.read_parquet(path)

    with pytest.raises(OSError, match="b.parquet"):
        pairscore_ray.score_files(inputs, out, read=read_failing_on_b, **options)
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # no temporary directory left behind
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()}

    (out / (pairscore_ray.TEMP_PREFIX + "b-dead")).mkdir()  # a write killed before its rename
    done = pairscore_ray.score_files(inputs, out, **options)

    assert done.skipped == [str(out / "a")] and done.scored == [str(out / "b")]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()} == finished  # not rescored
    for shard in ("a", "b"):
        table = pq.read_table(out / shard).to_pylist()
        src = pq.read_table(tmp_path / "in" / f"{shard}.parquet").to_pylist()
        assert sorted(r["k"] for r in table) == sorted(r["k"] for r in src)
        for row in table:
            assert row["error"] is None and row["conditional_logprob"] == -0.25 * len(row["response"])


def test_score_files_refuses_inputs_whose_outputs_collide(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="same name"):
        pairscore_ray.score_files(["x/a.parquet", "y/a.parquet"], tmp_path, read=lambda f: None, target="t:1")


def test_parquet_files_of_a_directory_in_order(tmp_path: Any) -> None:
    paths = _write_shards(tmp_path / "in", ["b", "a"], rows_each=1)
    assert pairscore_ray.parquet_files(tmp_path / "in") == sorted(paths)
    assert pairscore_ray.parquet_files(paths[0]) == [paths[0]]
    assert pairscore_ray.shard_output("out", "in/part-3.parquet").as_posix() == "out/part-3"
