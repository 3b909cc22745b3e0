"""GPU tier: the engine on CUDA, run when a GPU is present (skipped on CPU-only machines).

The CPU suite already covers every code path these use (chunked head, shared
prompts, OOM splitting by injection, replicas); these tests check what only a
GPU shows: bf16 weights with float32 log-softmax against the fp32 reference,
a real CUDA out-of-memory error being recognised, packed rows and padded
batches on CUDA, and replicas on two GPUs.
Run them with `bench/gpu_check.sh` on a GPU machine.
"""

from __future__ import annotations

import copy

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
    scored = replicated.score([p for p in replicated.prepare(pairs, ScoreOptions()) if isinstance(p, PreparedPair)])
    got = iter(scored.scores)
    for b in want:
        if isinstance(b, PairScore):
            assert next(got).joint_logprob == pytest.approx(b.joint_logprob, rel=1e-5, abs=1e-4)
    assert all(s > 0 for s in scored.replica_seconds)
