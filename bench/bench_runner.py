"""Runs the methods of one workload (``bench/throughput.py``): each in its own child
process (``--run-method``), so that its peak memory is its own; all of them in one
child with ``--one-child`` (the GPU check's CPU rehearsal: one start-up per workload);
or in this process with ``--in-process``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench_measure import RESULT_MARK, measure

#: The script a child runs (``--run-method``).
THROUGHPUT = Path(__file__).with_name("throughput.py")


def run_methods(methods: list[str], args, shared, workload: str = "distinct") -> dict[str, dict]:
    """Each of ``methods`` on ``workload``, measured: {method: its measurement}. A method
    that fails or runs out of time is left out, with a line saying why."""
    out: dict[str, dict] = {}
    if args.in_process:
        for method in methods:
            print(f"  {workload}: {method} ...", flush=True)
            if (result := run_here(method, args, shared, workload)) is not None:
                out[method] = result
        return out
    groups = [methods] if args.one_child else [[method] for method in methods]
    for group in groups:
        for method in group:
            print(f"  {workload}: {method} ...", flush=True)
        out.update(run_child(group, args, shared, workload))
    return out


def child_command(methods: list[str], args, shared, workload: str) -> list[str]:
    """The command line of the child that measures ``methods`` (``--run-method a,b``)."""
    cmd = [
        sys.executable,
        str(THROUGHPUT),
        "--run-method",
        ",".join(methods),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--pairs",
        str(args.pairs),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--streams",
        str(args.streams),
        "--chunk",
        str(args.chunk),
        "--packing",
        args.packing,
        "--host-allocator",
        args.host_allocator,
        "--gemm-seconds",
        str(args.gemm_seconds),
    ]
    cmd += ["--shared", f"{shared[0]}x{shared[1]}" if shared else "off"]
    cmd += [
        "--run-workload",
        workload,
        "--fewshot",
        "x".join(map(str, args.fewshot)),
        "--chat",
        str(args.chat),
        "--chat-rows",
        str(args.chat_rows),
    ]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.vllm_python:
        cmd += ["--vllm-python", args.vllm_python]
    return cmd


def run_child(methods: list[str], args, shared, workload: str = "distinct") -> dict[str, dict]:
    """``methods`` in one child process, one after another, within ``--child-timeout``
    each (the child's limit is their sum). What the child measured before a failure or
    the limit is kept; each method it did not measure is printed as skipped, with why."""
    cmd = child_command(methods, args, shared, workload)
    limit = args.child_timeout * len(methods) if args.child_timeout else None
    # Its own process group, so that a method timed out goes with whatever it started
    # (the grpc method's server).
    child_proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    timed_out = False
    try:
        stdout, stderr = child_proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child_proc.pid, signal.SIGKILL)
        stdout, stderr = child_proc.communicate()  # what it wrote before the limit is kept
        timed_out = True
    finally:
        if child_proc.poll() is None:  # the parent itself was stopped (KeyboardInterrupt, SIGTERM)
            os.killpg(child_proc.pid, signal.SIGKILL)
    measured = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            measured[result["method"]] = result
    if timed_out:
        reason = f"timed out after {limit:g} s"
    else:
        reason = (stderr.strip().splitlines() or ["?"])[-1]
    missing = [method for method in methods if method not in measured]
    for k, method in enumerate(missing):
        why = reason if k == 0 else f"not run: {missing[0]} ended its child process first"
        print(f"  {method}: skipped ({why})", flush=True)
    return measured


def run_here(method: str, args, shared, workload: str) -> dict | None:
    """``--in-process``: the method in this process (a smoke run: no process start per
    method, but peak memory is the whole run's)."""
    here = argparse.Namespace(
        **{**vars(args), "run_method": method, "run_workload": workload, "shared": shared}
    )
    try:
        return measure(here)
    except (Exception, SystemExit) as exc:  # as a child's failure: skipped, with why
        print(f"  {method}: skipped ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r})")
        return None
