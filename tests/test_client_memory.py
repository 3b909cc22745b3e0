"""score_iter keeps memory flat: 100k rows of JSONL stream through with a bounded RSS.

The server (the real one, on the fake engine) runs in a child process so
that this process's resident set is the client's alone. The rows are read
lazily from a 100k-line JSONL file, scored through score_iter and dropped
after a check. We compare the resident set after the first 10k results
(connections, buffers and allocator arenas are warm by then) with the peak
over the remaining 90k. Holding the inputs would cost about 0.45 kB a row
(a Pair dataclass and its three strings), holding the results about 0.5 kB
(a PairScore dataclass and its floats): 40 MB or more over 90k rows. The
bound, 16 MB, leaves room for allocator noise while catching anything that
grows with the input (measured growth: well under 1 MB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairscore.client import ScoringClient
from pairscore.pipeline.row_reader import RowReader
from pairscore.types import Pair, PairScore

from harness.servers import server_process, stop_process

ROWS = 100_000
WARM = 10_000
MAX_GROWTH_MB = 16


def rss_mb() -> float:
    """This process's resident set size (VmRSS), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def big_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(ROWS):
            response = (f"answer {i} " * 8)[:40]
            f.write(json.dumps({"id": str(i), "prompt": f"question {i % 97}", "response": response}) + "\n")
    return path


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc to read the resident set size"
)
def test_100k_rows_stream_through_score_iter_with_flat_memory(big_jsonl: Path) -> None:
    proc, target = server_process(max_context=256)
    try:
        reader = RowReader(str(big_jsonl), "jsonl")

        def pairs() -> Iterator[Pair]:
            for row in reader.rows():
                yield Pair(row["prompt"], row["response"], id=row["id"])

        warm_rss = peak_rss = 0.0
        count = 0
        with ScoringClient(target, timeout=60) as client:
            for count, result in enumerate(client.score_iter(pairs(), batch_size=64, streams=2), start=1):
                assert isinstance(result, PairScore) and result.id == str(count - 1)
                assert result.response_tokens == 40
                if count == WARM:
                    warm_rss = peak_rss = rss_mb()
                elif count % 5_000 == 0:
                    peak_rss = max(peak_rss, rss_mb())
        reader.close()
    finally:
        stop_process(proc)
    assert count == ROWS
    growth = peak_rss - warm_rss
    print(f"RSS after {WARM:,} results: {warm_rss:.1f} MB; peak after {ROWS:,}: {peak_rss:.1f} MB")
    assert growth < MAX_GROWTH_MB, f"resident set grew by {growth:.1f} MB over {ROWS - WARM:,} rows"
