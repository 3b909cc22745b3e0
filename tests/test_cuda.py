"""GPU tier: the engine on CUDA, run when a GPU is present (skipped on CPU-only machines).

The CPU suite already covers every code path these use (chunked head, shared
prompts, OOM splitting by injection, replicas); these tests check what only a
GPU shows: bf16 weights with float32 log-softmax against the fp32 reference,
a real CUDA out-of-memory error being recognised, packed rows and padded
batches on CUDA, and replicas on two GPUs; and, on the model shapes the GPU
benchmark uses (random weights: the lent machine has no SmolLM2), CUDA scores
against the CPU float32 engine and a float64 reference on the same model.
Run them with `bench/gpu_check.sh` on a GPU machine (docs/gpu-check.md); it sets
PAIRSCORE_GPU_TOKENIZER to the carried SmolLM2 tokenizer, without which the
shape tests use the tiny SentencePiece tokenizer.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from pairscore.types import PairScore, ScoreOptions
from pairscore_server.engine import PreparedPair

from harness.models import make_engine
from harness.scoring import mixed_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_on_cuda_stays_close_to_fp32_on_cpu(gpt2_family):
    model, tokenizer = gpt2_family
    cpu = make_engine(model, tokenizer)
    gpu = make_engine(copy.deepcopy(model).to("cuda", torch.bfloat16), tokenizer)
    pairs = mixed_pairs(32, seed=21)
    for a, b in zip(cpu.score_pairs(pairs), gpu.score_pairs(pairs), strict=True):
        assert isinstance(b, PairScore)
        tokens = max(1, a.prompt_tokens + a.response_tokens)
        # bf16 weights: ~3 significant digits per token on these peaked random models.
        assert abs(a.joint_logprob - b.joint_logprob) <= 0.05 * tokens
        assert b.conditional_logprob <= 0


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_fp32_on_cuda_matches_cpu(gpt2_family, packing):
    model, tokenizer = gpt2_family
    cpu = make_engine(model, tokenizer)
    gpu = make_engine(copy.deepcopy(model).to("cuda"), tokenizer, packing=packing)
    assert gpu.packing == packing
    torch.backends.cuda.matmul.allow_tf32 = False
    pairs = mixed_pairs(16, seed=22)
    for a, b in zip(cpu.score_pairs(pairs), gpu.score_pairs(pairs), strict=True):
        assert b.joint_logprob == pytest.approx(a.joint_logprob, rel=1e-5, abs=1e-4)


def test_real_cuda_oom_is_recognised():
    from pairscore_server.engine.memory import is_out_of_memory

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(Exception) as info:
        torch.empty(int(free * 4), dtype=torch.uint8, device="cuda")
    assert is_out_of_memory(info.value)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_replicas_on_two_gpus(gpt2_family):
    from pairscore_server.engine.replicas import ReplicatedEngine

    model, tokenizer = gpt2_family
    engines = [make_engine(copy.deepcopy(model).to(f"cuda:{i}"), tokenizer) for i in range(2)]
    replicated = ReplicatedEngine(engines)
    pairs = mixed_pairs(32, seed=23)
    want = make_engine(model, tokenizer).score_pairs(pairs)
    scored = replicated.score(
        [p for p in replicated.prepare(pairs, ScoreOptions()) if isinstance(p, PreparedPair)]
    )
    got = iter(scored.scores)
    for b in want:
        if isinstance(b, PairScore):
            assert next(got).joint_logprob == pytest.approx(b.joint_logprob, rel=1e-5, abs=1e-4)
    assert all(s > 0 for s in scored.replica_seconds)


# --- the benchmark's model shapes (bench/throughput.py presets), random weights ----------


def _throughput():
    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("pairscore_bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shape_tokenizer(sp_tokenizer):
    from transformers import AutoTokenizer

    path = os.environ.get("PAIRSCORE_GPU_TOKENIZER")
    if path and Path(path, "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    return sp_tokenizer


@pytest.fixture(scope="module")
def smollm2_shaped(shape_tokenizer):
    """SmolLM2-135M's shape (the smollm2-random preset) with seeded random weights, on the CPU.

    An init range of 0.1 rather than 0.02 makes predictions peaked (|log-prob| per token
    up to ~15 nats), so a misaligned or wrongly reduced score shows.
    """
    model = _throughput().build_random_llama("smollm2-random", len(shape_tokenizer), initializer_range=0.1)
    return model, shape_tokenizer


def prepared_ids(engine, pair, options: ScoreOptions) -> tuple[tuple[int, ...], int]:
    [prep] = engine.prepare([pair], options)
    return prep.input_ids, prep.prompt_tokens


def reference_token_logprobs(model64, ids: tuple[int, ...]) -> list[float]:
    """log P(t_j | t_<j) for j = 1..L-1, in float64, one sequence, the model's own logits."""
    with torch.no_grad():
        logits = model64(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


@pytest.fixture(scope="module")
def smollm2_references(smollm2_shaped):
    """Pairs, the CPU float32 engine's scores and float64 (prompt, conditional, tokens) per pair."""
    model, tokenizer = smollm2_shaped
    cpu = make_engine(model, tokenizer)
    model64 = copy.deepcopy(model).double()
    pairs = mixed_pairs(16, seed=24)
    ref = []
    for pair in pairs:
        ids, m = prepared_ids(cpu, pair, ScoreOptions())
        logps = reference_token_logprobs(model64, ids)
        ref.append((math.fsum(logps[:m]), math.fsum(logps[m:]), len(logps)))
    return pairs, cpu.score_pairs(pairs), ref


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_smollm2_shape_fp32_on_cuda_matches_cpu_and_float64(smollm2_shaped, smollm2_references, packing):
    model, tokenizer = smollm2_shaped
    pairs, cpu_scores, ref = smollm2_references
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = make_engine(copy.deepcopy(model).to("cuda"), tokenizer, packing=packing)
    assert gpu.packing == packing
    worst_cpu = worst_ref = 0.0
    for a, b, (prompt64, cond64, n) in zip(cpu_scores, gpu.score_pairs(pairs), ref, strict=True):
        assert isinstance(b, PairScore), b
        worst_cpu = max(
            worst_cpu,
            abs(a.joint_logprob - b.joint_logprob),
            abs(a.conditional_logprob - b.conditional_logprob),
        )
        worst_ref = max(worst_ref, abs(b.prompt_logprob - prompt64), abs(b.conditional_logprob - cond64))
        # float32 through 30 layers, measured with the CPU in the GPU's place: <= 2.4e-4 nats
        # on sums of up to ~420 nats (< 1e-5 per token); the bound is 1e-4 per token.
        tol = 1e-4 * max(1, n)
        assert b.prompt_logprob == pytest.approx(prompt64, abs=tol)
        assert b.conditional_logprob == pytest.approx(cond64, abs=tol)
        assert b.joint_logprob == pytest.approx(a.joint_logprob, abs=tol)
    print(
        f"GPU-FIGURE smollm2-random fp32 cuda {'packed' if packing else 'padded'}: "
        f"max |cuda - cpu fp32| = {worst_cpu:.2e}, max |cuda - float64| = {worst_ref:.2e} nats"
    )


# bf16 weights through the layers of a peaked random model, measured with the CPU's bf16
# in the GPU's place: up to 0.9% of a sum off float64 on the SmolLM2 shape (0.16 nats per
# token at ~14 nats per token), 1.8% off fp32 and 0.4% between layouts on the 1B shape.
# A misaligned or misreduced score is off by far more on these models.
BF16_REL = 0.05


def test_smollm2_shape_bf16_on_cuda_stays_close_to_float64(smollm2_shaped, smollm2_references):
    model, tokenizer = smollm2_shaped
    pairs, _, ref = smollm2_references
    gpu = make_engine(copy.deepcopy(model).to("cuda", torch.bfloat16), tokenizer)
    worst = 0.0
    for b, (prompt64, cond64, _) in zip(gpu.score_pairs(pairs), ref, strict=True):
        assert isinstance(b, PairScore), b
        want = prompt64 + cond64
        worst = max(worst, abs(b.joint_logprob - want) / max(1e-9, abs(want)))
        assert b.joint_logprob == pytest.approx(want, rel=BF16_REL, abs=1e-3)
        assert b.conditional_logprob <= 0
    print(f"GPU-FIGURE smollm2-random bf16 cuda: max |cuda bf16 - float64| / |float64| = {worst:.2e}")


def test_llama_1b_shape_on_cuda_layouts_agree_and_bf16_tracks_fp32(shape_tokenizer):
    """The benchmark's 1B shape, built on the GPU: packed and padded bf16 agree, and stay near fp32."""
    build = _throughput().build_random_llama
    torch.cuda.reset_peak_memory_stats()
    model = build("llama-1b-random", len(shape_tokenizer), device="cuda", initializer_range=0.1)
    pairs = mixed_pairs(16, seed=26)
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = make_engine(model, shape_tokenizer).score_pairs(pairs)
    model = model.to(torch.bfloat16)
    packed = make_engine(model, shape_tokenizer, packing=True).score_pairs(pairs)
    padded = make_engine(model, shape_tokenizer, packing=False).score_pairs(pairs)
    worst_layout = worst_fp32 = 0.0
    for a, b, c in zip(packed, padded, fp32, strict=True):
        scale = max(1e-9, abs(c.joint_logprob))
        worst_layout = max(worst_layout, abs(a.joint_logprob - b.joint_logprob) / scale)
        worst_fp32 = max(worst_fp32, abs(a.joint_logprob - c.joint_logprob) / scale)
        assert a.joint_logprob == pytest.approx(b.joint_logprob, rel=BF16_REL, abs=1e-3)
        assert a.joint_logprob == pytest.approx(c.joint_logprob, rel=BF16_REL, abs=1e-3)
    print(
        f"GPU-FIGURE llama-1b-random bf16 cuda: max |packed - padded| / |fp32| = {worst_layout:.2e}, "
        f"max |bf16 - fp32| / |fp32| = {worst_fp32:.2e}; "
        f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
