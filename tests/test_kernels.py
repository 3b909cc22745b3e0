"""Fused norm and MLP modules (engine/kernels.py): swapped only where they compute
bitwise the same function, and the model's logits do not move."""

from __future__ import annotations

import copy

import pytest
import torch

from pairscore_server.engine.kernels import FusedRMSNorm, InPlaceGatedMLP, fuse_norms_and_mlps

from harness.models import build_llama_model


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_llama_norms_and_mlps_are_swapped_and_logits_stay_bitwise():
    # a model of its own: the session's llama_family model is fused by the engines built on it
    model = build_llama_model(64)
    fused = copy.deepcopy(model)
    layers = fused.config.num_hidden_layers
    # two norms per layer and the final one, one MLP per layer
    assert fuse_norms_and_mlps(fused) == 3 * layers + 1
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(FusedRMSNorm) == 2 * layers + 1
    assert kinds.count(InPlaceGatedMLP) == layers
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(model, ids), _logits(fused, ids))
    # with gradients recorded the MLP does not write in place (and still agrees)
    fused_mlp = next(m for m in fused.modules() if isinstance(m, InPlaceGatedMLP))
    x = torch.randn(3, 5, fused_mlp.gate_proj.in_features, requires_grad=True)
    fused_mlp(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norms_are_fused_and_logits_stay_bitwise(dtype: torch.dtype) -> None:
    # bfloat16 / float16 round the float32-normalised activations before the weight: the
    # fused form normalises with one kernel in float32 (on the half-precision input, no
    # float32 copy) and rounds at the same place
    model = build_llama_model(64).to(dtype)
    reference = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    assert fuse_norms_and_mlps(model) == 3 * layers + 1
    assert [type(m) for m in model.modules()].count(FusedRMSNorm) == 2 * layers + 1
    ids = torch.arange(1, 30)[None] % 64
    assert torch.equal(_logits(reference, ids), _logits(model, ids))
    norm = next(m for m in model.modules() if isinstance(m, FusedRMSNorm))
    x = (3 * torch.randn(4, 37, norm.weight.shape[0], generator=torch.Generator().manual_seed(2))).to(dtype)
    with torch.inference_mode():
        normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        assert torch.equal(norm(x), norm.weight * normalised.to(dtype))


def test_float64_keeps_the_original_norm_formula():
    # transformers' Llama computes the statistics in float32 even for a float64 model;
    # the swapped module does the same (so float64 logits do not move either)
    model = build_llama_model(64).to(torch.float64)
    reference = copy.deepcopy(model)
    fuse_norms_and_mlps(model)
    ids = torch.arange(1, 30)[None] % 64
    assert torch.equal(_logits(reference, ids), _logits(model, ids))


def test_a_module_computing_another_function_is_left_alone():
    class LlamaRMSNorm(torch.nn.Module):  # the name of a known class, another formula
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.variance_epsilon)

    model = torch.nn.Sequential(LlamaRMSNorm())
    assert fuse_norms_and_mlps(model) == 0
    assert type(model[0]) is LlamaRMSNorm
