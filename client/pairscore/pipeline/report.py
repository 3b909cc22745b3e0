"""``pairscore report``: a histogram of one score column, as a PNG (or SVG/PDF).

It reads a scored file (any format the pipeline writes), draws the
histogram of the chosen metric, marks the 5 %, 50 % and 95 % quantiles, and
an optional threshold line with the share of rows on the kept side. Needs
matplotlib (``pip install 'pairscore[plot]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pairscore.pipeline.columns import Metric, metric, value_of
from pairscore.pipeline.formats import FormatError, input_files
from pairscore.pipeline.row_reader import RowReader
from pairscore.pipeline.stats import quantile

REPORT_QUANTILES = (0.05, 0.5, 0.95)


@dataclass(frozen=True)
class ReportData:
    """The values of one metric in a scored file, and how many rows had none."""

    metric: Metric
    values: list[float]
    missing: int

    def quantile(self, q: float) -> float:
        """The q-quantile (linear interpolation); NaN when there are no values."""
        return quantile(self.values, q)

    def share_kept(self, threshold: float) -> float:
        """The fraction of values on the better side of ``threshold`` (inclusive)."""
        if not self.values:
            return math.nan
        if self.metric.higher_is_better:
            kept = sum(1 for v in self.values if v >= threshold)
        else:
            kept = sum(1 for v in self.values if v <= threshold)
        return kept / len(self.values)


def read_metric(path: str, metric_name: str, fmt: str | None = None) -> ReportData:
    """Collect the finite values of ``metric_name`` from a scored file."""
    m = metric(metric_name)
    files, found = input_files(path, fmt)  # a file, a glob, a directory of shards, a URL
    reader = RowReader(path, found, files=files)
    values: list[float] = []
    missing = 0
    try:
        for row in reader.rows():
            if m.column not in row:
                raise FormatError(
                    f"{path} has no column {m.column!r}; is it the output of `pairscore score`?"
                )
            v = value_of(row, m.column)
            if math.isfinite(v):
                values.append(v)
            else:
                missing += 1
    finally:
        reader.close()
    return ReportData(m, values, missing)


def draw_report(
    data: ReportData,
    output: str,
    *,
    threshold: float | None = None,
    bins: int = 60,
    title: str | None = None,
) -> None:
    """Write the histogram figure to ``output`` (format from its extension)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FormatError("matplotlib is not installed: pip install 'pairscore[plot]'") from exc
    if not data.values:
        raise FormatError(f"no row has a value for {data.metric.column}; nothing to draw")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    ax.hist(data.values, bins=bins, color="#4C72B0", alpha=0.85)
    for q, style in zip(REPORT_QUANTILES, (":", "--", ":"), strict=True):
        value = data.quantile(q)
        ax.axvline(
            value, color="#333333", linestyle=style, linewidth=1.2, label=f"p{round(q * 100)} = {value:.3g}"
        )
    if threshold is not None:
        share = data.share_kept(threshold)
        side = ">=" if data.metric.higher_is_better else "<="
        ax.axvline(
            threshold,
            color="#C44E52",
            linewidth=2,
            label=f"threshold: {share:.1%} of rows {side} {threshold:g}",
        )
    ax.set_xlabel(f"{data.metric.column} ({data.metric.description})")
    ax.set_ylabel("rows")
    note = f"{len(data.values):,} rows" + (f", {data.missing:,} without a value" if data.missing else "")
    ax.set_title(title or f"{data.metric.column}: {note}")
    ax.legend(loc="upper left" if data.metric.higher_is_better else "upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
