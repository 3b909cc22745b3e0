"""Candidates benchmark: one prompt with N responses (ScoreCandidates) against N separate pairs.

A fixed, seeded workload: ``--sets`` prompts of exactly ``--prompt-tokens`` tokens
(default 200), each with N responses of 10-40 tokens, for each N of ``--n``
(default 4 and 16). Each method scores the same sets; methods alternate within
each repeat and the median of ``--repeats`` is reported, so every ratio compares
runs made under the same load (the machine is shared and noisy).

In-process (the engine, no gRPC):
  engine_candidates  each set in one engine call: the prompt is computed once
                     (the engine's shared-prompt path), what ScoreCandidates does
  engine_separate    each pair in its own engine call: the prompt computed N times

Over gRPC (a real server in this process on 127.0.0.1, the real client):
  grpc_candidates    ScoreCandidates, one request per set: the prompt sent once
  grpc_pairs         Score with the set's N pairs in one request: the prompt sent N
                     times, the batcher finds the sharing
  grpc_separate      N Score requests of one pair each, one after the other

Printed per N: each method's median seconds per set, the ratio to its
candidates method, the forward tokens computed per set (engine accounting), the
request bytes on the wire, and the largest score difference between candidates
and separate pairs (nats).

Usage:
  python bench/candidates.py --model smollm2 --repeats 5      # the README figures
  python bench/candidates.py --model tiny --tokenizer DIR --sets 2 --repeats 1  # CI smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINE_METHODS = ("engine_candidates", "engine_separate")
GRPC_METHODS = ("grpc_candidates", "grpc_pairs", "grpc_separate")
BASE = {m: "engine_candidates" for m in ENGINE_METHODS} | {m: "grpc_candidates" for m in GRPC_METHODS}


def make_sets(tokenizer, *, sets: int, n: int, prompt_tokens: int, seed: int):
    """Seeded (prompt, [responses]) with prompts of exactly ``prompt_tokens`` tokens."""
    rng = random.Random(seed * 1000 + n)
    vocab = len(tokenizer)
    low, high = min(1000, vocab // 4), min(40000, vocab - 1)

    def text(count: int) -> str:
        return " ".join(tokenizer.decode([rng.randrange(low, high) for _ in range(count)]).split())

    out = []
    for _ in range(sets):
        ids = tokenizer(text(prompt_tokens * 2), add_special_tokens=False)["input_ids"][:prompt_tokens]
        prompt = tokenizer.decode(ids)
        while len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > prompt_tokens:
            ids = ids[:-1]
            prompt = tokenizer.decode(ids)
        out.append((prompt, [" " + text(rng.randint(10, 40)) for _ in range(n)]))
    return out


class Server:
    """The real pairscore server on its own event loop in a thread, serving ``engine``."""

    def __init__(self, engine) -> None:
        from pairscore_server.config import ServerConfig
        from pairscore_server.lifecycle import RunningServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ServerConfig(
            host="127.0.0.1", port=0, metrics_port=None, max_wait_ms=1.0, log_level="WARNING"
        )

        async def make():
            return RunningServer(config, engine=engine)

        self.server = self.call(make())
        self.call(self.server.start())
        self.call(self.server.wait_ready())
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def stop(self) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run_method(method: str, engine, client, sets):
    """Score ``sets`` with ``method``; (seconds, forward tokens, request bytes, results)."""
    from pairscore import Candidate, CandidateSet, Pair, ScoreOptions
    from pairscore.convert import candidates_request_to_pb, request_to_pb

    options = ScoreOptions()
    results: list[list[tuple[float, float]]] = []
    tokens = wire = 0
    start = time.perf_counter()
    for prompt, responses in sets:
        pairs = [Pair(prompt, r) for r in responses]
        if method == "engine_candidates":
            scored = engine.score(engine.prepare(pairs, options))
            tokens += scored.stats.real_tokens
            out = scored.scores
        elif method == "engine_separate":
            out = []
            for pair in pairs:
                scored = engine.score(engine.prepare([pair], options))
                tokens += scored.stats.real_tokens
                out += scored.scores
        elif method == "grpc_candidates":
            candidate_set = CandidateSet(prompt=prompt, candidates=tuple(Candidate(r) for r in responses))
            wire += candidates_request_to_pb([candidate_set], options).ByteSize()
            out = client.score_responses(prompt, responses)
        elif method == "grpc_pairs":
            wire += request_to_pb(pairs, options).ByteSize()
            out = client.score(pairs)
        elif method == "grpc_separate":
            out = []
            for pair in pairs:
                wire += request_to_pb([pair], options).ByteSize()
                out += client.score([pair])
        else:
            raise SystemExit(f"unknown method {method}")
        results.append([(s.joint_logprob, s.conditional_logprob) for s in out])
    return time.perf_counter() - start, tokens, wire, results


def max_diff(a, b) -> float:
    return max(
        abs(x - y)
        for sa, sb in zip(a, b, strict=True)
        for pa, pb in zip(sa, sb, strict=True)
        for x, y in zip(pa, pb, strict=True)
    )


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the embedded model) or a throughput.py preset (tiny, ...)",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the embedded SmolLM2's)")
    parser.add_argument("--n", default="4,16", help="responses per prompt, comma-separated (default: 4,16)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--sets", type=int, default=4, help="prompts per measurement (default: 4)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per method; medians reported"
    )
    parser.add_argument("--methods", default=",".join((*ENGINE_METHODS, *GRPC_METHODS)))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    import torch
    from bench_models import build_model, smollm2_dir
    from transformers import AutoTokenizer

    from pairscore import ScoringClient
    from pairscore_server.engine.engine import ModelDescription, ScoringEngine
    from pairscore_server.engine.loading import ModelSpec, engine_limits, resolve_device

    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in BASE]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]}; choose from {', '.join(BASE)}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_dir())
    model = build_model(args.model, len(tokenizer))
    device = resolve_device("cpu")
    engine = ScoringEngine(
        model,
        tokenizer,
        description=ModelDescription("bench", "bench"),
        limits=engine_limits(ModelSpec(), device),
    )
    engine.warmup()
    server = Server(engine) if any(m in GRPC_METHODS for m in methods) else None
    client = ScoringClient(server.target, timeout=600) if server else None
    summary: dict[str, object] = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "sets": args.sets,
        "repeats": args.repeats,
        "threads": args.threads,
        "load_average_before": load_average(),
        "results": {},
    }
    try:
        for n in [int(x) for x in args.n.split(",")]:
            sets = make_sets(tokenizer, sets=args.sets, n=n, prompt_tokens=args.prompt_tokens, seed=args.seed)
            for method in methods:  # warm-up, not timed (first-call costs)
                run_method(method, engine, client, sets[:1])
            runs: dict[str, list] = {m: [] for m in methods}
            for _ in range(args.repeats):
                for method in methods:
                    runs[method].append(run_method(method, engine, client, sets))
            print(
                f"== {args.prompt_tokens}-token prompt, N = {n} responses, {args.sets} sets, load {load_average()} =="
            )
            rows = {}
            for method in methods:
                seconds = statistics.median(r[0] for r in runs[method]) / args.sets
                tokens, wire = runs[method][0][1] / args.sets, runs[method][0][2] / args.sets
                rows[method] = {
                    "seconds_per_set": seconds,
                    "forward_tokens_per_set": tokens,
                    "request_bytes_per_set": wire,
                }
            for method in methods:
                row = rows[method]
                base = rows.get(BASE[method])
                ratio = row["seconds_per_set"] / base["seconds_per_set"] if base else float("nan")
                row["time_vs_candidates"] = ratio
                detail = (
                    f"{row['forward_tokens_per_set']:.0f} forward tokens"
                    if method in ENGINE_METHODS
                    else f"{row['request_bytes_per_set']:.0f} request bytes"
                )
                print(
                    f"  {method:18s} {row['seconds_per_set'] * 1000:9.1f} ms/set  x{ratio:5.2f} of {BASE[method]:17s} {detail}"
                )
            for a, b in (
                ("engine_candidates", "engine_separate"),
                ("grpc_candidates", "grpc_separate"),
                ("grpc_candidates", "grpc_pairs"),
            ):
                if a in runs and b in runs:
                    diff = max_diff(runs[a][0][3], runs[b][0][3])
                    rows[b]["max_diff_nats"] = diff
                    print(f"  max |{b} - {a}|: {diff:.2e} nats")
            summary["results"][str(n)] = rows  # type: ignore[index]
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
    summary["load_average_after"] = load_average()
    print(
        f"load average (1, 5, 15 min): before {summary['load_average_before']}, after {summary['load_average_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
