"""lm-evaluation-harness through pairscore vs lm-eval's own hf backend, on the same model.

Runs the local few-shot multiple-choice task of tests/harness/lmeval.py (and
its rolling-perplexity task) with lm-eval twice per repeat, alternating the
order: once with ``--model hf`` on the model directory, once with ``--model
pairscore`` against ``pairscore serve`` on the same directory in a child
process. Both LMs are built before the clock starts: the times cover
tokenization, scoring and lm-eval's own work, not loading. Prints accuracy,
the largest per-request difference (nats), is_greedy mismatches and the
median times and their ratio, with the load average (the machine is shared)::

    python bench/lmeval_speed.py                       # the embedded SmolLM2, 40 docs, 5-shot
    python bench/lmeval_speed.py --docs 12 --repeats 1 --json out.json
    python bench/lmeval_speed.py --sentences           # several-token choices
    python bench/lmeval_speed.py --model /models/my-model --hf-batch-size 32

For SmolLM2-Instruct, lm-eval's hf backend conditions an empty context on
the tokenizer's BOS ``<|im_start|>``; pairscore's prefix token is
``<|endoftext|>``, so the script passes ``prefix_token=<|im_start|>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the task lives in the tests' harness

from harness.lmeval import MC_TASK, ROLLING_TASK, run_lmeval, write_tasks  # noqa: E402


def smollm2_dir() -> str:
    """The dequantised embedded SmolLM2 (made once)."""
    from pairscore_server.engine import loading

    cache = Path(os.environ.get("PAIRSCORE_CACHE_DIR") or loading.default_cache_dir())
    return str(loading._dequantised_copy(loading.embedded_gguf_path(), cache))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``pairscore serve`` on ``model_dir`` (CPU, float32) in a child process; waits until it serves."""
    from pairscore import ScoringClient

    port = free_port()
    cmd = [sys.executable, "-m", "pairscore_server", "serve", "--model", model_dir, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--metrics-port", "off", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with ScoringClient(target, timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return proc, target
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + log.read_text())
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a model directory")
    parser.add_argument("--docs", type=int, default=40, help="test documents (4 requests each)")
    parser.add_argument("--fewshot", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; medians reported")
    parser.add_argument(
        "--sentences", action="store_true", help="choices are short sentences (several tokens), not one word"
    )
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--prefix-token", default=None, help="default: <|im_start|> for smollm2")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from pairscore.lmeval import PairscoreLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model_dir = smollm2_dir() if args.model == "smollm2" else args.model
    prefix = args.prefix_token or ("<|im_start|>" if args.model == "smollm2" else None)
    tasks = [MC_TASK, ROLLING_TASK]
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = write_tasks(
            Path(tmp) / "tasks", n_test=args.docs, num_fewshot=args.fewshot, sentences=args.sentences
        )
        proc, target = start_server(model_dir, Path(tmp) / "server.log")
        try:
            ps_lm = PairscoreLM(target, prefix_token=prefix)
            hf_lm = HFLM(
                pretrained=model_dir,
                device="cpu",
                dtype="float32",
                batch_size=args.hf_batch_size,
                max_length=ps_lm.max_length,
            )
            for lm in (hf_lm, ps_lm):  # warm-up, untimed: first-call costs are not the method's
                run_lmeval(lm, None, task_dir, [MC_TASK], limit=2)
            runs: dict[str, list] = {"hf": [], "pairscore": []}
            for repeat in range(args.repeats):
                order = [("hf", hf_lm), ("pairscore", ps_lm)]
                for name, lm in order if repeat % 2 == 0 else order[::-1]:
                    runs[name].append(run_lmeval(lm, None, task_dir, tasks))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    hf, ps = runs["hf"][-1], runs["pairscore"][-1]
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ps.requests, hf.requests, strict=True)]
    greedy = sum(a.is_greedy != b.is_greedy for a, b in zip(ps.requests, hf.requests, strict=True))
    hf_s = statistics.median(r.seconds for r in runs["hf"])
    ps_s = statistics.median(r.seconds for r in runs["pairscore"])
    figures = {
        "model": args.model,
        "docs": args.docs,
        "fewshot": args.fewshot,
        "sentences": args.sentences,
        "requests": len(ps.requests),
        "accuracy_hf": hf.accuracy(),
        "accuracy_pairscore": ps.accuracy(),
        "max_abs_diff_nats": max(diffs),
        "is_greedy_mismatches": greedy,
        "hf_seconds": hf_s,
        "pairscore_seconds": ps_s,
        "speedup": hf_s / ps_s,
        "hf_batch_size": args.hf_batch_size,
        "repeats": args.repeats,
        "loadavg": os.getloadavg(),
    }
    print(f"{figures['requests']} requests ({args.docs} docs x 4 choices, {args.fewshot}-shot, + rolling)")
    print(f"accuracy      hf {hf.accuracy():.4f}   pairscore {ps.accuracy():.4f}")
    print(f"largest |diff| {max(diffs):.2e} nats; is_greedy mismatches {greedy}")
    print(
        f"time (median of {args.repeats})  hf {hf_s:.2f} s   pairscore {ps_s:.2f} s   hf/pairscore {hf_s / ps_s:.2f}x"
    )
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
