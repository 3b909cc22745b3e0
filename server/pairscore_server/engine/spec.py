"""What model to load and how: :class:`ModelSpec`, validated on construction.

Torch-free, so that the server's configuration can hold one (and the
server catch :class:`ModelLoadError`) without importing the engine;
:mod:`pairscore_server.engine.loading` turns a spec into an engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ``ModelSpec.dtype`` values: auto is bfloat16 on CUDA, float32 on CPU;
#: float64 gives reference-grade scores on CPU (docs/performance.md: its cost).
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
#: ``ModelSpec.packing`` values: auto picks by device (see ``loading.engine_limits``).
PACKING_CHOICES = ("auto", "on", "off")
#: ``ModelSpec.host_allocator`` values: retain freed host memory for reuse, or the
#: C library's defaults (see ``host_allocator.py``).
HOST_ALLOCATOR_CHOICES = ("retain", "system")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$|^cuda:\d+(,cuda:\d+)+$")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how; the server's configuration builds it from flags.

    ``model``: a local directory, a ``.gguf`` file, a Hub id, or None for the
    embedded default. ``device``: auto, cpu, cuda, cuda:N, or a list
    cuda:0,cuda:2 (one replica each). ``workers``: replicas (one per GPU).
    ``dtype``: one of :data:`DTYPES`. ``packing``: one of
    :data:`PACKING_CHOICES`. ``max_batch_tokens``: tokens per forward pass
    (None: by device). ``host_allocator``: one of :data:`HOST_ALLOCATOR_CHOICES`
    (a process-wide setting, applied when the model loads; host_allocator.py).
    A value out of range raises ValueError naming it.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    prefix_token: str | None = None
    cache_dir: str | None = None
    revision: str | None = None
    max_batch_tokens: int | None = None
    workers: int = 1
    packing: str = "auto"
    host_allocator: str = "retain"

    def __post_init__(self) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device must be auto, cpu, cuda, cuda:N or a list cuda:0,cuda:1, got {self.device!r}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.packing not in PACKING_CHOICES:
            raise ValueError(f"packing must be one of {PACKING_CHOICES}, got {self.packing!r}")
        if self.host_allocator not in HOST_ALLOCATOR_CHOICES:
            raise ValueError(
                f"host allocator must be one of {HOST_ALLOCATOR_CHOICES}, got {self.host_allocator!r}"
            )
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max batch tokens must be >= 1, got {self.max_batch_tokens}")
