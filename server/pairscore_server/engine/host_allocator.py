"""Keeping freed host memory for reuse: glibc's allocator set up for a scoring loop.

A forward pass on CPU allocates and frees the same large activation buffers
dozens of times (a [6144 x 1536] bfloat16 MLP intermediate is 18 MiB, a
[128 x 49152] float32 log-prob chunk 24 MiB). By default glibc's malloc serves
blocks above its mmap threshold (adaptive, at most 32 MiB) with fresh ``mmap``
calls, gives the free top of its heaps back to the system, and gives each thread
an arena of at most 64 MiB heaps: so each pass faults its buffers back in page by
page, zero-filled by the kernel. Measured on SmolLM2 chat rows (128 rows, 2 cores):
0.2-1.8 million minor page faults per pass in bfloat16, none once retained, and
a median of 10 % more tokens per second (docs/performance.md, "Host memory"). vLLM's CPU
backend preloads tcmalloc for the same reason.

:func:`apply_host_allocator` (``ModelSpec.host_allocator`` ``retain``, the default) sets, with ``mallopt``:

* ``M_MMAP_THRESHOLD`` = :data:`MMAP_THRESHOLD`: blocks below it come from the heap
  and are reused after ``free``;
* ``M_TRIM_THRESHOLD`` = :data:`TRIM_THRESHOLD`: free memory at the top of the heap
  goes back to the system only beyond that much;
* ``M_ARENA_MAX`` = 1: threads that first allocate afterwards use the main heap,
  which has no 64 MiB limit (the server's model thread starts after it).

The cost: after a peak the process keeps up to :data:`TRIM_THRESHOLD` of freed
memory mapped, on top of what glibc always keeps between live blocks.
``system`` leaves the allocator as it is. Without glibc (musl, macOS) ``retain``
does nothing and says so. It changes the whole process, once: a later call
does not undo it.
"""

from __future__ import annotations

import ctypes
import sys

#: Blocks smaller than this come from the heap (reused), larger ones from mmap.
MMAP_THRESHOLD = 256 * 2**20
#: Free memory at the heap's top is returned to the system beyond this much.
TRIM_THRESHOLD = 512 * 2**20

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_applied: str | None = None
_said: set[str] = set()


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (has ``gnu_get_libc_version`` and ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its C library among them
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def apply_host_allocator(retain: bool) -> str | None:
    """Keep freed memory for reuse (``retain``, see the module docstring) or leave the
    allocator alone; return what was done, as a sentence for the log, or None when an
    earlier call already said the same (``pairscore serve`` sets it up before its threads
    start and again as the model loads). Retaining is applied once per process; it
    cannot be undone by a later call."""
    said = _decide(retain)
    if said in _said:
        return None
    _said.add(said)
    return said


def _decide(retain: bool) -> str:
    global _applied
    if _applied is not None:
        return _applied
    if not retain:
        return "host allocator: the C library's defaults (--host-allocator system)"
    libc = _glibc()
    if libc is None:
        return (
            "host allocator: the C library's defaults (not glibc: --host-allocator retain does nothing here)"
        )
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "mmap threshold"),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "trim threshold"),
        (_M_ARENA_MAX, 1, "arena max"),
    )
    refused = [name for param, value, name in settings if libc.mallopt(param, value) != 1]
    if refused:
        _applied = f"host allocator: glibc refused {', '.join(refused)}; freed memory may be returned early"
        return _applied
    _applied = (
        f"host allocator: freed memory kept for reuse (glibc: blocks up to {MMAP_THRESHOLD >> 20} MiB "
        f"from the heap, up to {TRIM_THRESHOLD >> 20} MiB of free memory kept, one arena; "
        "--host-allocator system to turn off)"
    )
    return _applied
