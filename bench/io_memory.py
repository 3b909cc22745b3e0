"""Peak memory of ``pairscore score`` reading a big compressed input: it must not grow with the input.

It writes a highly compressible JSON Lines input (rows with a large ``doc``
column the server never sees, plus a short prompt and response), streamed
through the compressor so that the generator never holds it, starts the fake
engine server in a child process, and runs the real CLI on it as another
child (``score BIG -o -``, stdout to /dev/null), twice: on the big input and
on one ``--baseline-mb`` large. The peak resident set of each CLI process
(its VmHWM, read by the process itself as it exits) is printed; flat memory means the two peaks
are close, whatever the size of the big input::

    .venv/bin/python bench/io_memory.py --mb 4096 --compression zstd     # the figure in docs/pipeline.md
    .venv/bin/python bench/io_memory.py --mb 300 --json out.json         # what tests/test_pipeline_memory.py runs
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "client"), str(ROOT / "server")]


def _open_compressed(path: Path, compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "wb", compresslevel=1)
    import zstandard

    return zstandard.ZstdCompressor(level=1).stream_writer(open(path, "wb"))  # type: ignore[return-value]  # noqa: SIM115


def write_parquet(path: Path, megabytes: float, doc_kb: int, group_rows: int) -> dict[str, Any]:
    """The same rows as :func:`write_input` as Parquet (zstd pages), ``group_rows`` rows per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    block = ("All work and no play makes Jack a dull boy. " * (doc_kb * 1024 // 44 + 1))[: doc_kb * 1024]
    schema = pa.schema(
        [("id", pa.int64()), ("prompt", pa.string()), ("response", pa.string()), ("doc", pa.string())]
    )
    target = int(megabytes * 1024 * 1024)
    written = rows = 0
    started = time.monotonic()
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        while written < target:
            ids = range(rows, rows + group_rows)
            batch = [{"id": i, "prompt": f"q{i % 97}", "response": "r" * (i % 13), "doc": block} for i in ids]
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            written += sum(len(json.dumps(r)) + 1 for r in batch)
            rows += group_rows
    return {
        "rows": rows,
        "uncompressed_bytes": written,
        "compressed_bytes": path.stat().st_size,
        "generate_s": round(time.monotonic() - started, 1),
    }


def write_input(path: Path, megabytes: float, compression: str, doc_kb: int) -> dict[str, Any]:
    """Rows until ``megabytes`` of uncompressed JSON Lines are written; returns rows and sizes."""
    block = ("All work and no play makes Jack a dull boy. " * (doc_kb * 1024 // 44 + 1))[: doc_kb * 1024]
    target = int(megabytes * 1024 * 1024)
    written = rows = 0
    started = time.monotonic()
    with _open_compressed(path, compression) as out:
        while written < target:
            line = (
                json.dumps(
                    {"id": rows, "prompt": f"q{rows % 97}", "response": "r" * (rows % 13), "doc": block}
                ).encode()
                + b"\n"
            )
            out.write(line)
            written += len(line)
            rows += 1
    return {
        "rows": rows,
        "uncompressed_bytes": written,
        "compressed_bytes": path.stat().st_size,
        "generate_s": round(time.monotonic() - started, 1),
    }


#: Runs the CLI and writes its own peak resident set (VmHWM, KiB) to the file argv[1] on exit.
#: Not wait4's ru_maxrss: Linux carries that over from the parent across fork and exec, so it
#: would report this script's memory (hundreds of MiB after writing Parquet) instead of the CLI's.
_LAUNCHER = """
import atexit, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(sys.argv[1], "w").write(line.split()[1])
atexit.register(report)
from pairscore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(target: str, path: Path) -> dict[str, Any]:
    """``pairscore score PATH -o -`` in a child; its peak RSS (MiB), wall time and exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), env.get("PYTHONPATH", "")])
    peak = path.with_name(path.name + ".peak")
    command = [
        sys.executable, "-c", _LAUNCHER, str(peak), "score", str(path), "-o", "-", "--target", target,
        "--progress", "log", "--log-every", "15", "--batch-size", "64",
    ]  # fmt: skip
    started = time.monotonic()
    with open(os.devnull, "wb") as devnull:
        result = subprocess.run(command, env=env, stdout=devnull, stderr=subprocess.PIPE)
    stderr = result.stderr.decode()
    if result.returncode != 0:
        raise RuntimeError(f"pairscore score failed ({result.returncode}): {stderr}")
    return {
        "peak_rss_mib": round(int(peak.read_text()) / 1024, 1),
        "seconds": round(time.monotonic() - started, 1),
        "summary": stderr.strip().splitlines()[-4:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4096, help="uncompressed size of the big input (MiB)")
    parser.add_argument("--baseline-mb", type=float, default=32, help="uncompressed size of the small input")
    parser.add_argument(
        "--compression",
        choices=("gzip", "zstd", "parquet"),
        default="zstd",
        help="the input: .jsonl.gz, .jsonl.zst, or .parquet (zstd pages, --group-rows rows per row group)",
    )
    parser.add_argument("--group-rows", type=int, default=4000, help="Parquet rows per row group (4000)")
    parser.add_argument("--doc-kb", type=int, default=64, help="size of each row's doc column (KiB)")
    parser.add_argument("--dir", type=Path, help="where to write the inputs (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from harness.servers import server_process, stop_process

    suffix = {"gzip": ".jsonl.gz", "zstd": ".jsonl.zst", "parquet": ".parquet"}[args.compression]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        small, big = Path(tmp) / f"small{suffix}", Path(tmp) / f"big{suffix}"
        results: dict[str, Any] = {"compression": args.compression, "doc_kb": args.doc_kb}
        for name, path, mb in (("small", small, args.baseline_mb), ("big", big, args.mb)):
            if args.compression == "parquet":
                results[f"{name}_input"] = write_parquet(path, mb, args.doc_kb, args.group_rows)
            else:
                results[f"{name}_input"] = write_input(path, mb, args.compression, args.doc_kb)
        proc, target = server_process(max_context=256)
        try:
            results["small_run"] = run_cli(target, small)
            results["big_run"] = run_cli(target, big)
        finally:
            stop_process(proc)
    growth = results["big_run"]["peak_rss_mib"] - results["small_run"]["peak_rss_mib"]
    results["growth_mib"] = round(growth, 1)
    for name in ("small", "big"):
        i, r = results[f"{name}_input"], results[f"{name}_run"]
        print(
            f"{name}: {i['rows']:,} rows, {i['uncompressed_bytes'] / 2**20:,.0f} MiB uncompressed, "
            f"{i['compressed_bytes'] / 2**20:,.1f} MiB {args.compression}; "
            f"CLI peak RSS {r['peak_rss_mib']:.1f} MiB in {r['seconds']:.0f}s"
        )
    print(f"peak RSS growth from the small to the big input: {growth:+.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
