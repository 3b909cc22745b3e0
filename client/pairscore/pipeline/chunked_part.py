"""Outputs built from complete chunk files: Parquet, any output at a URL, a directory of shards.

Each checkpoint writes the rows since the last one as one complete chunk
file ``FINAL.parts/chunk-NNNNNN.EXT`` (local: a temporary name, fsync,
rename; remote: one upload of a finished local file, which an object store
makes visible whole or not at all). Resume deletes chunks past the last
checkpoint. The end either merges the chunks, in order, into
``FINAL.pairscore-tmp`` and renames that to ``FINAL`` (one file), or moves
them to ``OUT/part-NNNNN.EXT`` and then writes ``OUT/_SUCCESS`` (a
directory, complete once ``_SUCCESS`` is there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pairscore.pipeline.columns import ALL_COLUMN_TYPES, SCORE_COLUMN_TYPES
from pairscore.pipeline.compression import COMPRESSION_SUFFIX, CompressingWriter
from pairscore.pipeline.formats import SUFFIX_OF_FORMAT, Row, require_pyarrow
from pairscore.pipeline.line_writer import LineWriter
from pairscore.pipeline.state_file import atomic_write_bytes, fsync_dir
from pairscore.pipeline.storage import STDIO, FormatError, filesystem, is_remote, join, local_path

#: Marker a directory output gets last: the shards beside it are complete.
SUCCESS = "_SUCCESS"
#: Suffix of the staging directory of a ChunkedPart, beside its final name.
PARTS_SUFFIX = ".parts"
#: Suffix of the merged file before its rename to the final name.
TMP_SUFFIX = ".pairscore-tmp"


class ChunkedPart:
    """An output built from complete chunk files in ``FINAL.parts/``: Parquet, remote, or a directory.

    ``directory``: the output is a directory of shards, one per chunk
    (``part-NNNNN.EXT``, each with its own CSV header), then ``_SUCCESS``;
    otherwise the chunks are merged into one file. ``input_schema`` (an Arrow
    schema, e.g. the input Parquet file's) fixes the input columns' types;
    score columns always get their own types. Without it the types are
    inferred from the first chunk.
    """

    def __init__(
        self,
        final: str,
        fmt: str = "parquet",
        input_schema: Any = None,
        compression: str | None = None,
        directory: bool = False,
    ) -> None:
        if final == STDIO:
            raise FormatError(f"{fmt} cannot be written to stdout here; give a file name")
        if fmt == "parquet" and compression:
            raise FormatError(
                f"{final}: Parquet compresses its own pages; name the output without {COMPRESSION_SUFFIX[compression]}"
            )
        self.final = final
        self.format = fmt
        self.compression = compression
        self.directory = directory
        self.remote = is_remote(final)
        base = final.rstrip("/")
        self.staging = base + PARTS_SUFFIX
        self.suffix = SUFFIX_OF_FORMAT[fmt] + (COMPRESSION_SUFFIX[compression] if compression else "")
        self.fs, _ = filesystem(base)
        self.rows = 0
        self.columns: list[str] | None = None
        self._pq = require_pyarrow() if fmt == "parquet" else None
        self._input_schema = input_schema
        self._schema: Any = None
        self._buffer: list[Row] = []
        self._pending = 0  # rows in the unfinished line chunk
        self._local: str | None = None  # the unfinished chunk's local file
        self._file: Any = None
        self._sink: Any = None
        self._writer: LineWriter | None = None
        self._chunks = 0

    # --- names ----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The local staging directory (for messages and tests of local outputs)."""
        return Path(local_path(self.staging))

    def _fs_path(self, url: str) -> str:
        return local_path(url) if not self.remote else filesystem(url)[1]

    def chunk(self, index: int) -> str:
        """The URL (or local path) of chunk ``index``."""
        return join(self.staging, f"chunk-{index:06d}{self.suffix}")

    def shard(self, index: int) -> str:
        """The final name of shard ``index`` of a directory output."""
        return join(self.final, f"part-{index:05d}{self.suffix}")

    def _listing(self) -> list[str]:
        """Names in the staging directory."""
        if not self.remote:
            return sorted(os.listdir(self.path)) if self.path.is_dir() else []
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()
        try:
            return sorted(
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in self.fs.ls(self._fs_path(self.staging), detail=False)
            )
        except FileNotFoundError:
            return []

    def _chunk_indices(self) -> list[int]:
        out = []
        for name in self._listing():
            if name.startswith("chunk-") and name.endswith(self.suffix):
                with contextlib.suppress(ValueError):
                    out.append(int(name[len("chunk-") : -len(self.suffix)]))
        return sorted(out)

    def _rm(self, url: str) -> None:
        if not self.remote:
            p = Path(local_path(url))
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._fs_path(url), recursive=True)

    def _move(self, src: str, dst: str) -> None:
        if not self.remote:
            os.replace(local_path(src), local_path(dst))
            fsync_dir(Path(local_path(dst)).parent)
        else:
            self.fs.mv(self._fs_path(src), self._fs_path(dst))

    # --- writing --------------------------------------------------------------------------

    def open(self, state: dict[str, Any] | None) -> None:
        """Start afresh or continue from a checkpoint's ``state``."""
        if state is None:
            self._rm(self.staging)
            if not self.remote:
                self.path.mkdir(parents=True)
            return
        self._chunks = state["chunks"]
        self.rows = state["rows"]
        self.columns = state.get("columns")
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
        for name in self._listing():  # chunks (or temporaries) written after the checkpoint
            index = -1
            if name.startswith("chunk-") and name.endswith(self.suffix):
                with contextlib.suppress(ValueError):
                    index = int(name[len("chunk-") : -len(self.suffix)])
            if not 0 <= index < self._chunks:
                self._rm(join(self.staging, name))
        if self._chunks and self._pq is not None:
            with self._open_read(self.chunk(0)) as f:
                self._schema = self._pq.read_schema(f)

    def _open_read(self, url: str) -> Any:
        if not self.remote:
            return open(local_path(url), "rb")  # noqa: SIM115
        return self.fs.open(self._fs_path(url), "rb")

    def _new_local(self) -> str:
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
            return str(self.path / f"chunk-{self._chunks:06d}.tmp")
        fd, name = tempfile.mkstemp(prefix="pairscore-chunk-", suffix=self.suffix)
        os.close(fd)
        return name

    def write(self, row: Row) -> None:
        """Add one row (Parquet: held in memory; lines: in a local file) until the next checkpoint."""
        self.rows += 1
        if self._pq is not None:
            self._buffer.append(row)
            return
        if self._writer is None:
            self._local = self._new_local()
            self._file = open(self._local, "wb")  # noqa: SIM115 - closed at the checkpoint
            self._sink = CompressingWriter(self._file, self.compression) if self.compression else self._file
            self._writer = LineWriter(self._sink, self.format, self.columns)
            if self.format != "jsonl" and self.columns is not None and (self.directory or self._chunks == 0):
                self._writer.header(self.columns)  # every shard of a directory has its header
        if self._writer.columns is None and self.format != "jsonl":
            self._writer.header(list(row))
            self.columns = self._writer.columns
        self._writer.write(row)
        self._pending += 1

    def buffered(self) -> int:
        """Rows not yet in a chunk file."""
        return len(self._buffer) + self._pending

    def _make_schema(self, rows: list[Row]) -> Any:
        import pyarrow as pa

        inferred = pa.Table.from_pylist(rows).schema
        fields = []
        for name in inferred.names:
            if name in ALL_COLUMN_TYPES:
                fields.append(pa.field(name, pa.type_for_alias(ALL_COLUMN_TYPES[name])))
            elif self._input_schema is not None and name in self._input_schema.names:
                fields.append(self._input_schema.field(name))
            else:
                fields.append(inferred.field(name))
        return pa.schema(fields)

    def _write_parquet_chunk(self, local: str) -> None:
        import pyarrow as pa

        if self._schema is None:
            self._schema = self._make_schema(self._buffer)
        try:
            table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise FormatError(
                f"rows do not fit the Parquet schema taken from the first rows ({exc}); "
                "write JSONL when a column's type varies"
            ) from exc
        assert self._pq is not None
        self._pq.write_table(table, local)
        self._buffer = []

    def checkpoint(self) -> dict[str, Any]:
        """Write the rows since the last checkpoint as the next chunk; returns what resuming needs."""
        if self.buffered():
            if self._pq is not None:
                local = self._new_local()
                self._write_parquet_chunk(local)
            else:
                assert self._writer is not None and self._local is not None
                if isinstance(self._sink, CompressingWriter):
                    self._sink.end_member()
                self._file.flush()
                if not self.remote:
                    os.fsync(self._file.fileno())
                self._file.close()
                local, self._writer, self._pending = self._local, None, 0
            self._publish(local, self.chunk(self._chunks))
            self._chunks += 1
        return {"chunks": self._chunks, "rows": self.rows, "columns": self.columns}

    def _publish(self, local: str, url: str) -> None:
        """Make a finished local chunk file the chunk at ``url`` (whole or not at all)."""
        if not self.remote:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local, local_path(url))
            fsync_dir(self.path)
            return
        try:
            self.fs.put_file(local, self._fs_path(url))
        finally:
            os.remove(local)

    def finish(self) -> None:
        """Move the complete output into place: merge the chunks into one file, or shard a directory.

        A directory output replaces what the directory held (shards of an
        earlier run would otherwise mix with these).
        """
        self.checkpoint()
        if self.directory:
            self._rm(self.final)
        self._commit(list(range(self._chunks)), rows=self.rows)

    def complete(self) -> None:
        """Finish a run that was killed while finishing (idempotent): commit the chunks still staged."""
        indices = self._chunk_indices()
        if indices or self.directory:
            if self._pq is not None and indices:
                with self._open_read(self.chunk(indices[0])) as f:
                    self._schema = self._pq.read_schema(f)
            if indices or not self._exists(join(self.final, SUCCESS)):
                self._commit(indices)

    def _exists(self, url: str) -> bool:
        if not self.remote:
            return os.path.exists(local_path(url))
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()
        return bool(self.fs.exists(self._fs_path(url)))

    def _commit(self, indices: list[int], rows: int | None = None) -> None:
        if self.directory:
            self._commit_directory(indices, rows)
        else:
            self._commit_file(indices)
        self._rm(self.staging)

    def _empty_parquet(self, local: str) -> None:
        import pyarrow as pa

        assert self._pq is not None
        schema = self._schema or self._input_schema or pa.schema([])
        for name, alias in SCORE_COLUMN_TYPES.items():
            if name not in schema.names:
                schema = schema.append(pa.field(name, pa.type_for_alias(alias)))
        self._pq.write_table(schema.empty_table(), local)

    def _commit_file(self, indices: list[int]) -> None:
        tmp = self.final + TMP_SUFFIX
        target: Any = (
            open(local_path(tmp), "wb") if not self.remote else self.fs.open(self._fs_path(tmp), "wb")
        )  # noqa: SIM115
        with target as out:
            if self._pq is not None:
                if not indices:
                    local = self._new_local()
                    self._empty_parquet(local)
                    with open(local, "rb") as f:
                        shutil.copyfileobj(f, out)
                    os.remove(local)
                else:
                    with self._pq.ParquetWriter(out, self._schema) as writer:
                        for index in indices:
                            with self._open_read(self.chunk(index)) as f:
                                writer.write_table(self._pq.read_table(f))
            else:  # line chunks are complete files (members); bytes after bytes make the whole file
                for index in indices:
                    with self._open_read(self.chunk(index)) as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            if not self.remote:
                out.flush()
                os.fsync(out.fileno())
        self._move(tmp, self.final)

    def _commit_directory(self, indices: list[int], rows: int | None) -> None:
        if not self.remote:
            Path(local_path(self.final)).mkdir(parents=True, exist_ok=True)
        if self._pq is not None and not indices and not self._exists(self.shard(0)):
            local = self._new_local()  # an empty dataset still tells its schema
            self._empty_parquet(local)
            self._publish(local, self.shard(0))
        for index in indices:
            self._move(self.chunk(index), self.shard(index))
        if not self.remote:
            names = os.listdir(local_path(self.final))
        else:
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache()
            names = [
                p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._fs_path(self.final), detail=False)
            ]
        shards = sorted(n for n in names if n.startswith("part-") and n.endswith(self.suffix))
        record: dict[str, Any] = {"format": self.format, "compression": self.compression, "shards": shards}
        if rows is not None:  # known unless a killed finish is being completed
            record["rows"] = rows
        manifest = json.dumps(record)
        if not self.remote:
            atomic_write_bytes(Path(local_path(self.final)) / SUCCESS, manifest.encode())
        else:
            self.fs.pipe_file(self._fs_path(join(self.final, SUCCESS)), manifest.encode())

    def close(self) -> None:
        """Drop the unfinished chunk (its rows were not checkpointed; a resume writes them again)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._local is not None and self.remote:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._local)

    def discard(self) -> None:
        """Remove the staging directory and any merged file not yet renamed."""
        self.close()
        self._rm(self.staging)
        if not self.directory:
            self._rm(self.final + TMP_SUFFIX)
