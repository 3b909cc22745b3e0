"""Where the pipeline tests keep their data: compressed files, shard directories, an S3 server.

* :func:`compress` / :func:`decompress` - the four compressions, with the
  standard library and zstandard only (not the code under test).
* :func:`output_rows_bytes` - what an output holds, as bytes of JSON Lines
  (a file, a directory of shards, compressed or not, local or remote), so a
  run can be compared byte for byte with the uncompressed local run.
* :class:`S3Server` - moto's standalone S3 server on 127.0.0.1 (a real HTTP
  S3 API, no network beyond loopback) with the environment that points
  s3fs/botocore at it.
* :func:`kill_when` - run a CLI command as a child and SIGKILL it once its
  resume state says enough rows are done.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

COMPRESSIONS = {"gzip": ".gz", "zstd": ".zst", "bz2": ".bz2", "xz": ".xz"}


def compress(data: bytes, compression: str) -> bytes:
    """``data`` compressed as one member (with a checksum: zstd's CLI writes one too)."""
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    import zstandard

    return bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))  # as zstd's CLI


def decompress(data: bytes, compression: str | None) -> bytes:
    """All members of ``data``, decompressed one after the other."""
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "bz2":
        return bz2.decompress(data)
    if compression == "xz":
        return lzma.decompress(data)
    import io

    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return bytes(reader.read())


def compression_of_name(name: str) -> str | None:
    for compression, suffix in COMPRESSIONS.items():
        if name.endswith(suffix):
            return compression
    return None


def _canonical_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def file_rows_bytes(name: str, data: bytes) -> bytes:
    """The rows of one output file, as JSON Lines bytes (Parquet rows re-encoded as JSON)."""
    if ".parquet" in name:
        import io

        import pyarrow.parquet as pq

        return _canonical_jsonl(pq.read_table(io.BytesIO(data)).to_pylist())
    return decompress(data, compression_of_name(name))


def local_output_bytes(path: Path) -> bytes:
    """The rows of a local output: one file, or a directory's ``part-*`` shards in order."""
    if path.is_dir():
        assert (path / "_SUCCESS").exists(), f"{path} has no _SUCCESS: not complete"
        shards = sorted(p for p in path.iterdir() if p.name.startswith("part-"))
        return b"".join(file_rows_bytes(p.name, p.read_bytes()) for p in shards)
    return file_rows_bytes(path.name, path.read_bytes())


def remote_output_bytes(fs: Any, path: str) -> bytes:
    """The rows of an output on an fsspec filesystem (a file, or a directory with _SUCCESS)."""
    fs.invalidate_cache()
    if fs.isdir(path):
        assert fs.exists(path.rstrip("/") + "/_SUCCESS"), f"{path} has no _SUCCESS"
        shards = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
        return b"".join(file_rows_bytes(p, fs.cat_file(p)) for p in shards)
    return file_rows_bytes(path, fs.cat_file(path))


class S3Server:
    """moto's S3 server on 127.0.0.1 for one test session; ``env`` points AWS clients at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem on this server (no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=self.endpoint, skip_instance_cache=True
        )

    def stop(self) -> None:
        self._server.stop()


def state_rows(read_state: Callable[[], bytes | None]) -> int:
    """Rows done according to a resume state document (0 while there is none)."""
    try:
        data = read_state()
        return int(json.loads(data)["stats"]["rows"]) if data else 0
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_when(
    command: list[str], env: dict[str, str], done: Callable[[], int], at_least: int, *, timeout: float = 60
) -> int:
    """Run ``command``; SIGKILL it once ``done()`` (rows in its checkpoint) reaches ``at_least``.

    Returns ``done()`` after the kill. Fails if the run ends by itself first.
    """
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while done() < at_least:
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()!r}")
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            assert proc.stderr is not None
            proc.stderr.close()
    return done()


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
