"""Out-of-memory handling shared by the batcher and model loading.

Nothing here imports torch: torch is only consulted if something already
imported it, so the batcher stays importable (and testable) without it.
"""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory" (accelerator or host).

    True for ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError``,
    :class:`MemoryError`, and any RuntimeError whose message says "out of
    memory" (what other torch backends raise).
    """
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None:
        oom_types = tuple(
            t
            for t in (
                getattr(torch, "OutOfMemoryError", None),
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
            )
            if isinstance(t, type)
        )
        if oom_types and isinstance(exc, oom_types):
            return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory() -> None:
    """After an OOM: collect the failed pass's garbage and return cached accelerator memory."""
    gc.collect()
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # never let cleanup turn an OOM into a different failure
        log.debug("emptying the CUDA cache failed", exc_info=True)
