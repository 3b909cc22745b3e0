"""Outputs under construction, written so that a kill never leaves a corrupt file.

Every output is first written beside its final path and only renamed into
place when the run completes (``os.replace``, atomic on POSIX):

* JSONL/CSV/TSV: appended to ``FINAL.part``. :meth:`LinePart.checkpoint`
  flushes and fsyncs and returns the file's size; on resume the file is cut
  back to the size of the last checkpoint, which drops any row written after
  it (such rows are scored and written again), so no row is lost or doubled.
* Parquet: rows are collected in memory and each checkpoint writes them as
  one chunk file ``FINAL.parts/chunk-NNNNNN.parquet`` (written to a temporary
  name, then renamed). Resume deletes chunks past the last checkpoint; the
  end merges the chunks, in order, into ``FINAL``.
* ``-``: rows go straight to stdout; such a run cannot be resumed.

The checkpoint itself (:class:`StateFile`) is a small JSON file replaced
atomically after the parts are on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pairscore.pipeline.columns import ALL_COLUMN_TYPES, SCORE_COLUMN_TYPES
from pairscore.pipeline.formats import STDIO, FormatError, LineWriter, Row, require_pyarrow


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StateFile:
    """The resume checkpoint: one JSON document, replaced atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:  # cannot happen through save(); say so if it does
            raise FormatError(f"the resume state {self.path} is unreadable: {exc}") from exc

    def save(self, state: dict[str, Any]) -> None:
        """Replace the state."""
        atomic_write_bytes(self.path, json.dumps(state).encode("utf-8"))

    def remove(self) -> None:
        """Delete the state (the run is complete)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class LinePart:
    """A JSONL/CSV/TSV output being written to ``FINAL.part`` (or straight to stdout)."""

    def __init__(self, final: str, fmt: str) -> None:
        self.final = final
        self.format = fmt
        self.rows = 0
        self._stdout = final == STDIO
        self.path = None if self._stdout else Path(final + ".part")
        self._file: Any = None
        self._writer: LineWriter | None = None

    def open(self, state: dict[str, Any] | None) -> None:
        """Start afresh (``state=None``) or continue from a checkpoint's ``state``."""
        if self._stdout:
            self._file = sys.stdout.buffer
            self._writer = LineWriter(self._file, self.format)
            return
        assert self.path is not None
        if state is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/close()
            self._writer = LineWriter(self._file, self.format)
            return
        self._file = open(self.path, "r+b")  # noqa: SIM115
        self._file.truncate(state["bytes"])  # drop rows written after the checkpoint
        self._file.seek(state["bytes"])
        self._writer = LineWriter(self._file, self.format, state.get("columns"))
        self.rows = state["rows"]

    def write(self, row: Row) -> None:
        """Append one row."""
        assert self._writer is not None
        if self._writer.columns is None and self.format != "jsonl":
            self._writer.header(list(row))
        self._writer.write(row)
        self.rows += 1

    def checkpoint(self) -> dict[str, Any]:
        """Make everything written so far durable; returns what resuming needs."""
        assert self._writer is not None
        self._writer.flush()
        if self._stdout:
            return {"rows": self.rows}
        os.fsync(self._file.fileno())
        return {"bytes": self._file.tell(), "rows": self.rows, "columns": self._writer.columns}

    def finish(self) -> None:
        """Move the complete output into place."""
        self.checkpoint()
        if self._stdout:
            return
        self._file.close()
        assert self.path is not None
        os.replace(self.path, self.final)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        """Close without finishing (the part stays for a later resume)."""
        if self._file is not None and not self._stdout:
            self._file.close()

    def discard(self) -> None:
        """Remove whatever was written."""
        self.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class ParquetPart:
    """A Parquet output built from chunk files in ``FINAL.parts/``, merged at the end.

    ``input_schema`` (an Arrow schema, e.g. the input Parquet file's) fixes
    the input columns' types; score columns always get their own types.
    Without it the types are inferred from the first chunk.
    """

    def __init__(self, final: str, input_schema: Any = None) -> None:
        if final == STDIO:
            raise FormatError("Parquet cannot be written to stdout; give a file name")
        self.final = final
        self.path = Path(final + ".parts")
        self.rows = 0
        self._pq = require_pyarrow()
        self._input_schema = input_schema
        self._schema: Any = None
        self._buffer: list[Row] = []
        self._chunks = 0

    def _chunk(self, index: int) -> Path:
        return self.path / f"chunk-{index:06d}.parquet"

    def open(self, state: dict[str, Any] | None) -> None:
        """Start afresh or continue from a checkpoint's ``state``."""
        if state is None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            return
        self._chunks = state["chunks"]
        self.rows = state["rows"]
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.iterdir():  # chunks (or temporaries) written after the checkpoint
            if not leftover.name.endswith(".parquet") or int(leftover.stem.split("-")[1]) >= self._chunks:
                leftover.unlink()
        if self._chunks:
            self._schema = self._pq.read_schema(self._chunk(0))

    def write(self, row: Row) -> None:
        """Add one row (held in memory until the next checkpoint)."""
        self._buffer.append(row)
        self.rows += 1

    def buffered(self) -> int:
        """Rows not yet in a chunk file."""
        return len(self._buffer)

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

    def checkpoint(self) -> dict[str, Any]:
        """Write buffered rows as the next chunk; returns what resuming needs."""
        import pyarrow as pa

        if self._buffer:
            if self._schema is None:
                self._schema = self._make_schema(self._buffer)
            try:
                table = pa.Table.from_pylist(self._buffer, schema=self._schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise FormatError(
                    f"rows do not fit the Parquet schema taken from the first rows ({exc}); "
                    "write JSONL when a column's type varies"
                ) from exc
            tmp = self.path / f"chunk-{self._chunks:06d}.tmp"
            self._pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._chunk(self._chunks))
            _fsync_dir(self.path)
            self._chunks += 1
            self._buffer = []
        return {"chunks": self._chunks, "rows": self.rows}

    def finish(self) -> None:
        """Merge the chunks, in order, into the final file and remove the chunk directory."""
        self.checkpoint()
        tmp = Path(self.final + ".tmp")
        if self._chunks == 0:
            import pyarrow as pa

            schema = self._input_schema or pa.schema([])
            for name, alias in SCORE_COLUMN_TYPES.items():
                if name not in schema.names:
                    schema = schema.append(pa.field(name, pa.type_for_alias(alias)))
            self._pq.write_table(schema.empty_table(), tmp)
        else:
            with self._pq.ParquetWriter(tmp, self._schema) as writer:
                for index in range(self._chunks):
                    writer.write_table(self._pq.read_table(self._chunk(index)))
        os.replace(tmp, self.final)
        _fsync_dir(tmp.parent)
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """Nothing to close: chunk files are closed once written."""

    def discard(self) -> None:
        """Remove the chunk directory."""
        shutil.rmtree(self.path, ignore_errors=True)


def open_part(final: str, fmt: str, input_schema: Any = None) -> LinePart | ParquetPart:
    """The part writer for an output of format ``fmt``."""
    if fmt == "parquet":
        return ParquetPart(final, input_schema)
    return LinePart(final, fmt)
