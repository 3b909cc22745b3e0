"""Swapping slow-but-equivalent modules of a model for fused kernels.

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
    """Replace tanh-approximation GELU modules by the fused kernel; return how many."""
    try:
        from transformers.activations import FastGELUActivation, NewGELUActivation
    except ImportError:
        return 0
    slow = (NewGELUActivation, FastGELUActivation)
    swapped = 0
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
