"""Writes OUT/summary.md from what bench/gpu_check.sh left in OUT: a markdown page
to paste into the docs (steps and their times, the machine, the test results, the
benchmark tables).

  python bench/gpu_summary.py OUT [--require FILE[:WORKLOAD]=METHOD,METHOD ...]

--require: every workload in OUT/FILE (or the one named) must have each METHOD (the
check fails, exit status 1, if one was skipped or timed out, or the workload is
missing); the summary is written either way.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def steps_table(out: Path) -> list[str]:
    rows = ["| step | status | seconds | limit (s) |", "| --- | --- | ---: | ---: |"]
    path = out / "steps.tsv"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        name, rc, seconds, limit = line.split("\t")
        status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed ({rc})"
        rows.append(f"| {name} | {status} | {seconds} | {limit} |")
    total = sum(int(line.split("\t")[2]) for line in lines)
    rows.append(f"| total | | {total} | |")
    return rows


def env_lines(out: Path) -> list[str]:
    path = out / "env.txt"
    keep = re.compile(
        r"^(name, |NVIDIA|python |torch |transformers |tokenizers |accelerate |grpcio|protobuf |gguf |"
        r"lm-eval |prometheus-client |cuda available|pairscore server|lm-eval does not)"
    )
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line for line in lines if keep.match(line)]


def test_lines(out: Path) -> list[str]:
    path = out / "tests.log"
    text = path.read_text() if path.is_file() else ""
    result = [line for line in text.splitlines() if re.match(r"^=*\s*\d+ (passed|failed|error)", line)]
    figures = [line for line in text.splitlines() if line.startswith(("GPU-FIGURE", "worst |engine"))]
    bad = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    skipped = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    return [
        *(result[-1:] or ["(no pytest result line: see tests.log)"]),
        *bad,
        *skipped,
        *sorted(set(figures)),
    ]


def _fmt(value, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


def bench_tables(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    meta = data.pop("meta", {})
    out = [
        f"### {path.name}: {meta.get('model')} on {', '.join(meta.get('devices') or [meta.get('device', '?')])}"
        f" ({meta.get('dtype')})",
        "",
    ]
    for workload, summary in data.items():
        ref = next(
            (m for m in ("engine", "engine_padded", "engine_packed", "engine_bf16") if m in summary), None
        )
        out += [
            f"**{workload} prompts**",
            "",
            "| method | tokens/s | pairs/s | % ideal GEMM | MFU | peak RSS GiB | CUDA max alloc GiB |"
            f" max abs diff vs {ref or '-'} (joint / conditional, nats) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for method, s in summary.items():
            diff = s.get(f"max_diff_vs_{ref}")
            diff_text = f"{diff[0]:.2e} / {diff[1]:.2e}" if diff else ("reference" if method == ref else "")
            mfu = s.get("mfu")
            out.append(
                f"| {method} | {s['tokens_per_s']:.0f} | {s['pairs_per_s']:.2f} | "
                f"{100 * s['ideal_fraction']:.0f}% | {_fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | "
                f"{s['peak_rss_gib']:.2f} | {s['cuda_max_allocated_gib']:.2f} | {diff_text} |"
            )
        ratios = []
        tps = {m: s["tokens_per_s"] for m, s in summary.items()}
        for a, b in (("engine_packed", "engine_padded"), ("grpc", ref), (ref, "naive_one"), (ref, "lmeval")):
            if a in tps and b in tps and a != b:
                ratios.append(f"{a} / {b} = {tps[a] / tps[b]:.2f}")
        out += ["", "Ratios (tokens/s): " + ("; ".join(ratios) or "none"), ""]
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--require", action="append", default=[], metavar="FILE[:WORKLOAD]=METHODS")
    args = parser.parse_args(argv)
    out: Path = args.out
    lines = [
        "# pairscore GPU check",
        "",
        "Written by bench/gpu_check.sh (bench/gpu_summary.py). Models have random weights of the named "
        "shape (throughput and memory do not depend on the values); the tokenizer is SmolLM2's.",
        "",
        "## Steps",
        "",
        *steps_table(out),
        "",
        "## Machine",
        "",
        "```",
        *env_lines(out),
        "```",
        "",
        "## Tests (tests/test_cuda.py, tests/test_engine_math.py)",
        "",
        "```",
        *test_lines(out),
        "```",
        "",
        "## Benchmark (bench/throughput.py)",
        "",
    ]
    problems = []
    for name in ("bench-small.json", "bench-large.json"):
        path = out / name
        if path.is_file():
            lines += bench_tables(path)
        else:
            lines += [f"### {name}: missing (the step failed before its first workload; see bench.log)", ""]
    for req in args.require:
        target, methods = req.split("=", 1)
        name, _, only = target.partition(":")
        path = out / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.pop("meta", None)
        if not data:
            problems.append(f"{name}: no results")
            continue
        if only and only not in data:
            problems.append(f"{name}: no {only} workload (see bench.log)")
        for workload, summary in data.items():
            if only and workload != only:
                continue
            for method in filter(None, methods.split(",")):
                if method not in summary:
                    problems.append(f"{name}: {workload}: {method} did not run (see bench.log)")
    problems = list(dict.fromkeys(problems))  # one line per problem, in order
    if problems:
        lines += ["## Problems", "", *(f"- {p}" for p in problems), ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    for p in problems:
        print(f"gpu_summary: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
