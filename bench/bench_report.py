"""The benchmark's table: per-method medians, ratios against the baselines of the
same run, and the largest score difference between methods."""

from __future__ import annotations

import statistics

from bench_methods import ENGINE_METHODS, PEER_METHODS, SELECTION_METHODS


def max_diff(a, b, index) -> float:
    diffs = [
        abs(x[index] - y[index])
        for x, y in zip(a, b, strict=True)
        if x[index] == x[index] and y[index] == y[index]
    ]
    return max(diffs) if diffs else float("nan")


def report(label: str, runs: dict[str, list[dict]], peak_tflops: float = 0.0) -> dict:
    print(f"\n== {label} ==")
    summary = {}
    for method, reps in runs.items():
        med = statistics.median(r["tokens_per_s"] for r in reps)
        best = max(reps, key=lambda r: r["tokens_per_s"])
        startups = [r["startup_seconds"] for r in reps if r.get("startup_seconds") is not None]
        summary[method] = {
            "startup_seconds": statistics.median(startups) if startups else None,
            "tokens_per_s": med,
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in reps),
            "ideal_fraction": statistics.median(r["tokens_per_s"] / r["ideal_tokens_per_s"] for r in reps),
            "peak_rss_gib": max(r["peak_rss"] for r in reps) / 2**30,
            "cuda_max_allocated_gib": max(r["cuda_max_allocated"] for r in reps) / 2**30,
            "over_weights_gib": (max(r["peak_rss"] for r in reps) - best["weights_bytes"]) / 2**30,
            "results": best["results"],
            "expected_uncond_ratio": reps[0]["tokens"]
            / (reps[0]["tokens"] + reps[0]["unconditional_extra_tokens"]),
        }
    print(
        f"{'method':<12} {'tokens/s':>9} {'pairs/s':>8} {'% ideal':>8} {'peak RSS':>9} {'RSS-weights':>11}"
        f" {'CUDA max alloc':>14}"
    )
    for method, s in summary.items():
        print(
            f"{method:<12} {s['tokens_per_s']:9.0f} {s['pairs_per_s']:8.2f} {100 * s['ideal_fraction']:7.0f}% "
            f"{s['peak_rss_gib']:8.2f}G {s['over_weights_gib']:10.2f}G {s['cuda_max_allocated_gib']:13.2f}G"
        )
    base = [m for m in ("naive_one", "naive_two", "lmeval", *PEER_METHODS) if m in summary]
    for mine in (*ENGINE_METHODS, "grpc"):
        if mine in summary and base:
            ratios = ", ".join(
                f"{summary[mine]['tokens_per_s'] / summary[b]['tokens_per_s']:.2f}x {b}" for b in base
            )
            print(f"{mine}: {ratios}")
    for method, s in summary.items():
        if s["startup_seconds"] is not None:
            print(
                f"{method}: start-up {s['startup_seconds']:.0f} s (compilation and a warm-up request, not timed)"
            )
    if peak_tflops:
        for method, reps in runs.items():
            mfu = summary[method]["tokens_per_s"] * reps[0]["flops_per_token"] / (peak_tflops * 1e12)
            summary[method]["mfu"] = mfu
            print(f"{method}: model FLOP utilisation {100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s")
    if "engine_padded" in summary and "engine" in summary:
        print(
            f"engine / engine_padded: "
            f"{summary['engine']['tokens_per_s'] / summary['engine_padded']['tokens_per_s']:.2f}"
        )
    for method in SELECTION_METHODS:
        if method in summary and "engine" in summary:
            ratio = summary[method]["tokens_per_s"] / summary["engine"]["tokens_per_s"]
            expected = (
                f", expected {summary[method]['expected_uncond_ratio']:.2f}"
                if method == "engine_uncond"
                else ""
            )
            print(f"{method} / engine: {ratio:.2f} (same pairs; 1/ratio = relative cost{expected})")
    if "engine_prompts" in summary and "engine" in summary:
        print(
            f"engine / engine_prompts: "
            f"{summary['engine']['tokens_per_s'] / summary['engine_prompts']['tokens_per_s']:.2f}"
            " (prefix trie against whole prompts shared only)"
        )
    if "engine_packed" in summary and "engine_padded" in summary:
        print(
            f"engine_packed / engine_padded: "
            f"{summary['engine_packed']['tokens_per_s'] / summary['engine_padded']['tokens_per_s']:.2f}"
        )
    # The in-process engine that the server's default layout matches is the reference:
    # "engine" where it ran, else the first engine layout that did.
    ref_method = next((m for m in ENGINE_METHODS if m in summary), None)
    if "grpc" in summary and ref_method:
        print(
            f"grpc / {ref_method} in-process: "
            f"{summary['grpc']['tokens_per_s'] / summary[ref_method]['tokens_per_s']:.2f}"
        )
    if ref_method:
        ref = summary[ref_method]["results"]
        for method, s in summary.items():
            if method != ref_method:
                s[f"max_diff_vs_{ref_method}"] = [
                    max_diff(s["results"], ref, 0),
                    max_diff(s["results"], ref, 1),
                ]
                print(
                    f"max |{method} - {ref_method}|: joint {max_diff(s['results'], ref, 0):.2e}, "
                    f"conditional {max_diff(s['results'], ref, 1):.2e} nats"
                )
    return summary
