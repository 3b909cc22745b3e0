"""Runs one method on one workload in its own child process (``bench/throughput.py
--run-method``), so that its peak memory is its own, or in this process with
``--in-process``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench_measure import measure

#: The script a child runs (``--run-method``).
THROUGHPUT = Path(__file__).with_name("throughput.py")


def run_child(method: str, args, shared, workload: str = "distinct") -> dict | None:
    if args.in_process:
        return run_here(method, args, shared, workload)
    cmd = [
        sys.executable,
        str(THROUGHPUT),
        "--run-method",
        method,
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
    if args.vllm_python:
        cmd += ["--vllm-python", args.vllm_python]
    # Its own process group, so that a method timed out goes with whatever it started
    # (the grpc method's server).
    child_proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child_proc.communicate(timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child_proc.pid, signal.SIGKILL)
        child_proc.communicate()
        print(f"  {method}: skipped (timed out after {args.child_timeout:g} s)", flush=True)
        return None
    finally:
        if child_proc.poll() is None:  # the parent itself was stopped (KeyboardInterrupt, SIGTERM)
            os.killpg(child_proc.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(cmd, child_proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {method}: skipped ({reason})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
