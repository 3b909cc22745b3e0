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
