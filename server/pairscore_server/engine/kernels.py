"""Swapping slow-but-equivalent modules of a model for fused kernels.

RMSNorm (Llama-family) becomes ``torch.nn.functional.rms_norm`` in float32 and
the gated MLP multiplies in place (:func:`fuse_norms_and_mlps`), each kept only
where a probe shows bitwise the same output.

GPT-2-family models compute the tanh approximation of GELU in Python
(``NewGELUActivation``: pow, mul, add, tanh as separate kernels, each a pass
over the activations). ``torch.nn.functional.gelu(approximate="tanh")``
computes the same function in one fused kernel, 4-10x faster on CPU and
equal to within float32 rounding (measured max difference 2.4e-7 on
activations of order 1). Only modules that compute the same mathematical
function are swapped.
"""

from __future__ import annotations

import torch


def _fused_gelu_tanh() -> torch.nn.Module | None:
    try:
        from transformers.activations import GELUTanh
    except ImportError:  # older transformers: PytorchGELUTanh is the same thing
        try:
            from transformers.activations import PytorchGELUTanh as GELUTanh
        except ImportError:
            return None
    return GELUTanh()


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace tanh-approximation GELU modules by the fused kernel, and RMSNorms and
    gated MLPs by their fused forms (:func:`fuse_norms_and_mlps`); return how many."""
    swapped = fuse_norms_and_mlps(model)
    try:
        from transformers.activations import FastGELUActivation, NewGELUActivation
    except ImportError:
        return swapped
    slow = (NewGELUActivation, FastGELUActivation)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, slow):
                fused = _fused_gelu_tanh()
                if fused is None:
                    return swapped
                setattr(parent, name, fused)
                swapped += 1
    return swapped


#: Fewest rows a CPU float32 GEMM is given. Measured with torch 2.13's MKL
#: (AVX-512) on SmolLM2's shapes (576 x 576, 576 x 1536, 1536 x 576,
#: 576 x 49152): a row's result is bitwise the same for any 12 or more rows
#: (checked up to 2100), but 1-3, 5-7 and 9-11 rows take other kernels
#: (GEMV-like paths) whose sums are rounded differently, by up to ~150
#: float32 ulps on a log-prob. Padding every smaller input with zero rows up
#: to this many keeps a token's numbers independent of how many tokens share
#: its forward pass.
MIN_GEMM_ROWS = 16


class RowStableLinear(torch.nn.Linear):
    """``nn.Linear`` whose CPU float inputs of fewer than :data:`MIN_GEMM_ROWS`
    rows are zero-padded to that many, so every row goes through the same
    GEMM kernel whatever the number of rows. The same function, the same
    parameters (the class is swapped in place, weights are not copied)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        features = input.shape[-1]
        rows = input.numel() // features if features else 0
        if rows >= MIN_GEMM_ROWS or rows == 0 or input.device.type != "cpu":
            return torch.nn.functional.linear(input, self.weight, self.bias)
        flat = input.reshape(rows, features)
        padded = torch.cat([flat, flat.new_zeros(MIN_GEMM_ROWS - rows, features)])
        out = torch.nn.functional.linear(padded, self.weight, self.bias)[:rows]
        return out.reshape(*input.shape[:-1], out.shape[-1])


def stabilize_gemm_rows(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`RowStableLinear`; return how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowStableLinear
            swapped += 1
    return swapped


#: RMSNorm classes whose forward is exactly ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)``
#: (checked on a probe before a swap is kept).
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "OlmoRMSNorm")
#: Gated MLPs computing ``down(act(gate(x)) * up(x))``.
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class FusedRMSNorm(torch.nn.Module):
    """An RMSNorm (see :data:`_RMS_NORMS`) whose float32 inputs go through
    ``torch.nn.functional.rms_norm``: one kernel instead of pow, mean, add, rsqrt and
    two multiplies, each a pass over the activations. The same function, bit for bit
    (checked on a probe by :func:`fuse_norms_and_mlps`): float32 inputs in one call;
    bfloat16 and float16 ones normalised in float32 by the same kernel and rounded to
    their dtype before the weight, as the original; float64 keeps the original formula
    (it computes the statistics in float32)."""

    weight: torch.nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.nn.functional.rms_norm(
                hidden_states, self.weight.shape, self.weight, self.variance_epsilon
            )
        input_dtype = hidden_states.dtype
        if input_dtype in (torch.bfloat16, torch.float16):
            # the kernel computes the statistics and the product in float32 as the
            # original does and rounds to the input dtype, before the weight as the
            # original: no float32 copy of the input in and out (bitwise the same; one
            # bf16 norm of 2048 x 576 3.2 -> 2.1-3.0 ms, no change measurable on the
            # engine's bf16 throughput, 5 alternating rounds)
            normed = torch.nn.functional.rms_norm(
                hidden_states, self.weight.shape, None, self.variance_epsilon
            )
            return self.weight * normed
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class InPlaceGatedMLP(torch.nn.Module):
    """A gated MLP (see :data:`_GATED_MLPS`) that multiplies the activated gate by the
    up projection in place when no gradient is recorded: one [tokens x intermediate]
    buffer fewer written and read per layer. The same operations in the same order."""

    gate_proj: torch.nn.Module
    up_proj: torch.nn.Module
    down_proj: torch.nn.Module
    act_fn: torch.nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate = self.act_fn(self.gate_proj(x))
        return self.down_proj(gate.mul_(self.up_proj(x)))


def _same_on_probe(module: torch.nn.Module, new_class: type, width: int) -> bool:
    """Whether ``module`` computes bitwise the same output as a ``new_class`` on a
    random probe input (switching its class in place; switched back if not)."""
    param = next(module.parameters())
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 24, width, generator=generator).to(param.device, param.dtype)
    old_class = module.__class__
    with torch.inference_mode():
        before = module(probe)
        module.__class__ = new_class
        after = module(probe)
    if torch.equal(before, after):
        return True
    module.__class__ = old_class
    return False


def fuse_norms_and_mlps(model: torch.nn.Module) -> int:
    """Swap known RMSNorm and gated-MLP modules for :class:`FusedRMSNorm` and
    :class:`InPlaceGatedMLP`, each kept only where a probe gives bitwise the same
    output; return how many were swapped. Parameters are not copied (the class of
    each module is switched in place, as :func:`stabilize_gemm_rows` does)."""
    swapped = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name in _RMS_NORMS and hasattr(module, "variance_epsilon"):
            weight: torch.Tensor = module.weight  # type: ignore[assignment]
            width = int(weight.shape[0])
            swapped += _same_on_probe(module, FusedRMSNorm, width)
        elif name in _GATED_MLPS and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            gate: torch.nn.Linear = module.gate_proj  # type: ignore[assignment]
            width = gate.in_features
            swapped += _same_on_probe(module, InPlaceGatedMLP, width)
    return swapped
