"""The CLI's memory stays flat on a big compressed input (bench/io_memory.py, bounded for CI).

The bench script streams two highly compressible inputs (100 and 400 MiB as
JSON Lines, rows with a 16 KiB ``doc`` column the server never sees) into
``.zst``, ``.gz`` or Parquet (row groups of 4,000 rows, 64 MiB) files, serves
the fake engine in a child process and runs ``pairscore score INPUT -o -``
on each as a child, which reports its own peak resident set (VmHWM). Holding
the extra 300 MiB of rows, the decompressed file or a whole Parquet file
would add hundreds of MiB; what is in flight (8 batches of 64 rows of 16 KiB:
8 MiB) and one Parquet batch of 256 rows do not depend on the input's size.
Measured on the 2-core CI machine, from the small to the big input: +3.8 MiB
(zstd), +0.3 MiB (gzip), +4.1 MiB (Parquet); the bound, 16 MiB, leaves room
for allocator noise. The multi-GB figures are in docs/pipeline.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_GROWTH_MIB = 16


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the peak RSS (VmHWM)")
@pytest.mark.parametrize("compression", ["zstd", "gzip", "parquet"])
def test_peak_memory_does_not_grow_with_a_compressed_input(tmp_path: Path, compression: str) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    if compression == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "memory.json"
    command = [
        sys.executable, str(ROOT / "bench" / "io_memory.py"), "--mb", "400", "--baseline-mb", "100",
        "--doc-kb", "16", "--compression", compression, "--dir", str(tmp_path), "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    print(result.stdout)
    for name in ("small", "big"):
        rows = measured[f"{name}_input"]["rows"]
        assert f"pairscore score: {rows:,} rows" in "\n".join(measured[f"{name}_run"]["summary"])
    big, small = measured["big_input"]["uncompressed_bytes"], measured["small_input"]["uncompressed_bytes"]
    assert big >= 400 * 2**20 and big >= 3 * small
    assert measured["growth_mib"] < MAX_GROWTH_MIB, result.stdout
