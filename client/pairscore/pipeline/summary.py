"""The end-of-run summary: counts, where rows went, and score quantiles."""

from __future__ import annotations

import math

from pairscore.pipeline.progress import human_duration
from pairscore.pipeline.runner import Outcome
from pairscore.pipeline.stats import SUMMARY_QUANTILES

_LABELS = {"output": "written", "kept": "kept", "rejected": "rejected", "errors": "failed rows"}


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value + 0.0:.4g}"  # + 0.0: no "-0"


def summary_lines(command: str, outcome: Outcome, metric: str) -> list[str]:
    """Human-readable lines describing a finished run.

    Rows are input rows. When they are not one pair each (``--responses-field``:
    one pair per candidate response, one output row per pair), the counts after
    the first line are of pairs, and say so.
    """
    stats = outcome.stats
    failed = stats.failed
    pairs = stats.scored + failed  # one outcome per pair, or per input row that could not be read
    per_pair = pairs != stats.rows
    unit = "pairs" if per_pair else "rows"
    rate = (stats.rows - outcome.resumed_from) / outcome.seconds if outcome.seconds > 0 else 0.0
    lines = [
        f"pairscore {command}: {stats.rows:,} rows"
        + (f" ({pairs:,} pairs: one per candidate response)" if per_pair else "")
        + f" in {human_duration(outcome.seconds)}"
        + (f" ({rate:,.0f} rows/s)" if rate else "")
        + (f", resumed after row {outcome.resumed_from:,}" if outcome.resumed_from else "")
    ]
    by_code = ", ".join(f"{code} {n:,}" for code, n in sorted(stats.errors.items()))
    lines.append(
        f"  {'pairs ' if per_pair else ''}scored {stats.scored:,}, failed {failed:,}"
        + (f" ({by_code})" if failed else "")
    )
    if command == "filter":
        scored = max(stats.scored, 1)
        kept = stats.routed.get("kept", 0)
        lines.append(f"  kept {kept:,} ({kept / scored:.1%} of scored), dropped {stats.scored - kept:,}")
    for role, (path, _fmt_name) in outcome.outputs.items():
        n = stats.routed.get(role, 0)
        if role == "errors" and n == 0:
            continue
        lines.append(f"  {_LABELS.get(role, role)}: {n:,} {unit} -> {path}")
    sample = stats.metric
    if sample.seen:
        qs = "  ".join(f"p{round(q * 100)} {_fmt(sample.quantile(q))}" for q in SUMMARY_QUANTILES)
        how = f"all {unit}" if sample.exact else f"a uniform sample of {len(sample.values):,} {unit}"
        lines.append(f"  {metric}: min {_fmt(sample.min)}  {qs}  max {_fmt(sample.max)}  ({how})")
    return lines
