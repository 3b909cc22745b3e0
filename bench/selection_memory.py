"""Peak memory of scoring one long pair, plain and with the data-selection options on.

Each variant runs in its own child process, so its peak resident set (VmHWM)
is its own: the model is loaded, warmed up, then one long pair (``--tokens``
in all, split evenly between prompt and response) is scored. The table
shows the peak over the weights; docs/performance.md quotes it against the
"weights + 1 GiB" bound of issue 13.

Usage:
  python bench/selection_memory.py                  # embedded SmolLM2, 8000 tokens, CPU
  python bench/selection_memory.py --model tiny --tokens 900
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "plain": {},
    "top20": {"greedy": True, "top_k": 20},
    "all": {"unconditional": True, "greedy": True, "top_k": 20},
}


def child(model_name: str, tokens: int, variant: str) -> None:
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_models import build_model, smollm2_dir
    from transformers import AutoTokenizer

    from pairscore.types import Pair, ScoreOptions
    from pairscore_server.engine.engine import ModelDescription, ScoringEngine
    from pairscore_server.engine.loading import ModelSpec, engine_limits

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = build_model(model_name, len(tokenizer)).to(torch.float32)
    engine = ScoringEngine(
        model,
        tokenizer,
        description=ModelDescription("bench", "bench"),
        limits=engine_limits(ModelSpec(), torch.device("cpu")),
    )
    engine.warmup()
    words = "the quick brown fox jumps over the lazy dog while the capital of France is Paris".split()
    text = " ".join(words[i % len(words)] for i in range(tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    half = tokenizer.decode(ids[: tokens // 2]), tokenizer.decode(ids[tokens // 2 : tokens - 1])
    pair = Pair(half[0], " " + half[1].lstrip())
    started = time.perf_counter()
    [score] = engine.score_pairs([pair], ScoreOptions(**VARIANTS[variant]))
    seconds = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "variant": variant,
                "tokens": score.prompt_tokens + score.response_tokens + 1,
                "peak_rss": hwm,
                "weights": weights,
                "seconds": seconds,
                "chunk_rows": engine._logprobs.chunk_rows,
                "vocab": engine._logprobs.vocab_size,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=["tiny", "gpt2-small", "smollm2"])
    parser.add_argument(
        "--tokens", type=int, default=8000, help="tokens of the long pair (prompt + response)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_variant:
        child(args.model, args.tokens, args.run_variant)
        return
    print(f"model {args.model}, one pair of ~{args.tokens} tokens, CPU float32")
    print(f"{'variant':<8} {'tokens':>7} {'seconds':>8} {'peak RSS':>9} {'weights':>8} {'peak-weights':>12}")
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens)]
        proc = subprocess.run([*cmd, "--run-variant", variant], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant:<8} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(
            f"{variant:<8} {r['tokens']:7d} {r['seconds']:8.1f} {r['peak_rss'] / gib:8.2f}G "
            f"{r['weights'] / gib:7.2f}G {(r['peak_rss'] - r['weights']) / gib:11.2f}G"
        )


if __name__ == "__main__":
    main()
