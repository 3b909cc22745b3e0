"""How short a shared run of token ids is still worth a trie node (tries.MIN_SHARED_TOKENS).

Sharing a run of k tokens between n sequences saves (n - 1) x k token positions
but costs every sequence below the cut one more attention call (and a key/value
concatenation) per layer. This script scores, in one process and on one model,
groups of sequences whose prompts share exactly k leading token ids (then
distinct prompt tokens and a response), once with the run shared (min_shared_tokens
= k) and once without (the run computed per sequence), interleaved, and prints
the median time of each and their ratio for each k.

  python bench/prefix_threshold.py --model smollm2 --runs 2,4,8,16,32
  python bench/prefix_threshold.py --model tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402


def prepared_group(vocab: int, *, run: int, sequences: int, rest: int, response: int, seed: int, prefix: int):
    from pairscore_server.engine.prepared import PreparedPair

    rng = random.Random(seed)
    shared = [rng.randrange(1000, vocab) for _ in range(run - 1)]  # p + run - 1 ids = run tokens
    out = []
    for i in range(sequences):
        prompt = shared + [rng.randrange(1000, vocab) for _ in range(rest)]
        resp = [rng.randrange(1000, vocab) for _ in range(response)]
        ids = (prefix, *prompt, *resp)
        out.append(
            PreparedPair(
                id=str(i),
                input_ids=ids,
                prompt_tokens=len(prompt),
                response_tokens=len(resp),
                offsets=((0, 0),) * (len(ids) - 1),
                boundary_straddled=False,
                return_tokens=False,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", choices=bench_models.MODELS)
    parser.add_argument("--runs", default="2,4,8,16,32", help="shared run lengths k to measure")
    parser.add_argument("--sequences", type=int, default=16, help="sequences sharing each run")
    parser.add_argument("--groups", type=int, default=4, help="groups (distinct runs) per call")
    parser.add_argument("--rest", type=int, default=40, help="distinct prompt tokens after the run")
    parser.add_argument("--response", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packing", default="on", choices=["on", "off"])
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from pairscore_server.engine.engine import ModelDescription, ScoringEngine
    from pairscore_server.engine.loading import ModelSpec, engine_limits

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(bench_models.smollm2_dir())
    model = bench_models.build_model(args.model, len(tokenizer))
    limits = engine_limits(ModelSpec(packing=args.packing), torch.device("cpu"))
    engine = ScoringEngine(model, tokenizer, description=ModelDescription("bench", "bench"), limits=limits)
    engine.warmup()
    vocab = min(40000, len(tokenizer))
    print(
        f"model {args.model}, packing {args.packing}, {args.groups} groups x {args.sequences} sequences, "
        f"prompt = run + {args.rest}, response {args.response}, medians of {args.repeats}"
    )
    print(f"{'run k':>6} {'shared s':>9} {'unshared s':>11} {'unshared/shared':>16} {'positions saved':>16}")
    for k in [int(v) for v in args.runs.split(",")]:
        prepared = [
            p
            for g in range(args.groups)
            for p in prepared_group(
                vocab,
                run=k,
                sequences=args.sequences,
                rest=args.rest,
                response=args.response,
                seed=1000 * k + g,
                prefix=engine.prefix.token_id,
            )
        ]
        on = dataclasses.replace(limits, share_prefixes=True, min_shared_tokens=k)
        off = dataclasses.replace(limits, share_prefixes=False)
        times: dict[str, list[float]] = {"on": [], "off": []}
        saved = 0
        for _ in range(args.repeats):
            for name, lim in (("on", on), ("off", off)):
                engine.limits = lim
                start = time.perf_counter()
                stats = engine.score(prepared).stats
                times[name].append(time.perf_counter() - start)
                if name == "on":
                    saved = stats.reused_tokens
        t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"{k:6d} {t_on:9.3f} {t_off:11.3f} {t_off / t_on:16.3f} {saved:16d}", flush=True)


if __name__ == "__main__":
    main()
