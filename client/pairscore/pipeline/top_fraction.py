"""The two local passes of ``--top-fraction`` over the scored intermediate file (see
:mod:`pairscore.pipeline.selection` for what they select)."""

from __future__ import annotations

import math
from collections.abc import Callable

from pairscore.pipeline.chunked_part import ChunkedPart
from pairscore.pipeline.columns import Metric, value_of
from pairscore.pipeline.job import Job
from pairscore.pipeline.parts import LinePart, open_part
from pairscore.pipeline.row_reader import RowReader
from pairscore.pipeline.selection import Cutoff, TopSelector, rank_key
from pairscore.pipeline.stats import RunStats
from pairscore.pipeline.storage import remove

#: A Parquet part writes a chunk at least this often (rows), whatever the clock says.
PARQUET_CHUNK_ROWS = 50_000


def write_top_fraction(
    job: Job, metric: Metric, stats: RunStats, finishing: Callable[[list[str]], None]
) -> None:
    """Read the scored intermediate file twice: the cut-off, then every row to kept, rejected or
    errors in input order; ``finishing(roles)`` saves the state before the outputs move into place."""
    assert job.top_fraction is not None
    scored, fmt = job.scored_path, job.out_format
    reader = RowReader(scored, fmt, compression=job.output_compression)
    among_passing = job.top_among == "passing"
    keys = [
        rank_key(value_of(r, metric.column), metric)
        if not r.get("error") and (not among_passing or job.thresholds.passes(r))
        else math.nan
        for r in reader.rows()
    ]
    reader.close()
    cutoff = Cutoff.find(keys, job.top_fraction)
    del keys
    selector = TopSelector(metric, cutoff)
    reader = RowReader(scored, fmt, compression=job.output_compression)
    parts: dict[str, LinePart | ChunkedPart] = {}
    for role, (path, out_fmt) in job.outputs().items():
        parts[role] = open_part(path, out_fmt, reader.parquet_schema(), job.compression_for(path))
        parts[role].open(None)
    stats.routed.clear()
    for row in reader.rows():
        failed = bool(row.get("error"))
        if failed:
            dest: str | None = "errors" if "errors" in parts else "rejected"
        else:
            if among_passing:  # only rows that pass take part in the ranking (and its ties)
                keep = job.thresholds.passes(row) and selector.keeps(row)
            else:
                keep = selector.keeps(row) and job.thresholds.passes(row)
            dest = "kept" if keep else ("rejected" if "rejected" in parts else None)
        if dest is not None:
            parts[dest].write(row)
            stats.routed[dest] += 1
        if any(isinstance(p, ChunkedPart) and p.buffered() >= PARQUET_CHUNK_ROWS for p in parts.values()):
            for p in parts.values():
                p.checkpoint()
    reader.close()
    finishing(list(parts))
    for part in parts.values():
        part.finish()
    remove(scored)
