"""The host allocator setting (host_allocator.py): what ``retain`` changes, measured.

Each behaviour check runs in a fresh interpreter (the setting is process-wide
and cannot be undone): it allocates and frees a 40 MiB block ten times, on the
main thread and on a thread started afterwards (as the server's model thread
is), and counts the minor page faults. With the C library's defaults a block
that size is a fresh ``mmap`` each time (above glibc's 32 MiB adaptive
threshold), faulted in page by page; retained, it is the same heap memory again.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pairscore_server.engine import host_allocator
from pairscore_server.engine.spec import ModelSpec

CHURN = r"""
import resource, sys, threading
from pairscore_server.engine.host_allocator import apply_host_allocator
print(apply_host_allocator(sys.argv[1] == "retain"))
SIZE = 40 * 2**20

def faults_per_block(out):
    bytearray(SIZE)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = bytearray(SIZE)  # zero-filled: every page is touched
        del block
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)

on_main, on_thread = [], []
faults_per_block(on_main)
thread = threading.Thread(target=faults_per_block, args=(on_thread,))
thread.start()
thread.join()
print(on_main[0], on_thread[0])
"""

glibc_only = pytest.mark.skipif(host_allocator._glibc() is None, reason="needs glibc (Linux)")


def churn(choice: str) -> tuple[str, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, choice], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    main, thread = map(float, out[1].split())
    return out[0], main, thread


@glibc_only
def test_retain_reuses_freed_blocks_on_the_main_thread_and_on_later_threads() -> None:
    said, main, thread = churn("system")
    assert "the C library's defaults" in said
    pages = 40 * 2**20 / 4096
    # the defaults: every block faulted back in (10,240 pages of 4 KiB each)
    assert main > pages / 2 and thread > pages / 2, (main, thread)
    said, main, thread = churn("retain")
    assert "freed memory kept for reuse" in said and "--host-allocator system" in said
    # measured: 0 on both (a few pages of slack for the interpreter's own allocations)
    assert main < pages / 50 and thread < pages / 50, (main, thread)


def test_retain_applies_once_and_a_later_call_says_what_was_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_allocator, "_applied", None)
    monkeypatch.setattr(host_allocator, "_said", set())
    calls: list[tuple[int, int]] = []

    class FakeGlibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(host_allocator, "_glibc", lambda: FakeGlibc())
    first = host_allocator.apply_host_allocator(True) or ""
    assert calls == [(-3, 256 * 2**20), (-1, 512 * 2**20), (-8, 1)]
    assert "256 MiB" in first and "512 MiB" in first and "one arena" in first
    # said once: `pairscore serve` calls it in main() and again as the model loads
    assert host_allocator.apply_host_allocator(True) is None
    assert host_allocator.apply_host_allocator(False) is None  # cannot be undone
    assert host_allocator._applied == first
    assert len(calls) == 3


def test_system_changes_nothing_and_retain_without_glibc_says_it_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host_allocator, "_applied", None)
    monkeypatch.setattr(host_allocator, "_said", set())
    monkeypatch.setattr(host_allocator, "_glibc", lambda: pytest.fail("system must not touch the C library"))
    assert "defaults (--host-allocator system)" in (host_allocator.apply_host_allocator(False) or "")
    assert host_allocator.apply_host_allocator(False) is None  # said once
    monkeypatch.setattr(host_allocator, "_glibc", lambda: None)
    said = host_allocator.apply_host_allocator(True) or ""
    assert "not glibc" in said and "does nothing" in said
    assert host_allocator._applied is None  # nothing applied: a later call may still retain


def test_a_refused_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_allocator, "_applied", None)
    monkeypatch.setattr(host_allocator, "_said", set())

    class OldGlibc:
        def mallopt(self, param: int, value: int) -> int:
            return 0 if param == -8 else 1

    monkeypatch.setattr(host_allocator, "_glibc", lambda: OldGlibc())
    assert "glibc refused arena max" in (host_allocator.apply_host_allocator(True) or "")


def test_the_spec_validates_the_choice() -> None:
    assert ModelSpec().host_allocator == "retain"
    assert ModelSpec(host_allocator="system").host_allocator == "system"
    with pytest.raises(
        ValueError, match=r"host allocator must be one of \('retain', 'system'\), got 'jemalloc'"
    ):
        ModelSpec(host_allocator="jemalloc")
