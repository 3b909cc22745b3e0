"""Outputs under construction, written so that a kill never leaves a half-written file under its name.

Every output is first written beside its final name and only moved into
place when the run completes:

* A local JSONL/CSV/TSV file: appended to ``FINAL.part``.
  :meth:`LinePart.checkpoint` flushes and fsyncs and returns the file's
  size; on resume the file is cut back to the size of the last checkpoint,
  which drops any row written after it (such rows are scored and written
  again), so no row is lost or doubled. A compressed one (``.gz``, ``.zst``,
  ``.bz2``, ``.xz``) ends a compressed member at every checkpoint, so the
  size of the last checkpoint is also where a complete member ends;
  decompressors read the members one after the other as one stream.
* Everything else (Parquet, any output at a URL such as ``s3://``, a
  directory of shards ``OUT/``): :class:`ChunkedPart`. Each checkpoint
  writes the rows since the last one as one complete chunk file
  ``FINAL.parts/chunk-NNNNNN.EXT`` (local: a temporary name, fsync, rename;
  remote: one upload of a finished local file, which an object store makes
  visible whole or not at all). Resume deletes chunks past the last
  checkpoint. The end either merges the chunks, in order, into
  ``FINAL.pairscore-tmp`` and renames that to ``FINAL`` (one file), or moves
  them to ``OUT/part-NNNNN.EXT`` and then writes ``OUT/_SUCCESS`` (a
  directory, complete once ``_SUCCESS`` is there).
* ``-``: rows go straight to stdout; such a run cannot be resumed.

:class:`ChunkedPart` lives in :mod:`pairscore.pipeline.chunked_part`; the
checkpoint document in :mod:`pairscore.pipeline.state_file`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import IO, Any

from pairscore.pipeline.chunked_part import ChunkedPart
from pairscore.pipeline.compression import CompressingWriter
from pairscore.pipeline.formats import Row
from pairscore.pipeline.line_writer import LineWriter
from pairscore.pipeline.state_file import fsync_dir
from pairscore.pipeline.storage import STDIO, is_directory_path, is_remote, local_path

__all__ = ["ChunkedPart", "LinePart", "ParquetPart", "open_part"]


class LinePart:
    """A local JSONL/CSV/TSV output being written to ``FINAL.part`` (or straight to stdout),
    compressed when ``compression`` is set (one member per checkpoint)."""

    def __init__(self, final: str, fmt: str, compression: str | None = None) -> None:
        self.final = final
        self.format = fmt
        self.compression = compression
        self.rows = 0
        self._stdout = final == STDIO
        self.path = None if self._stdout else Path(local_path(final) + ".part")
        self._file: Any = None
        self._sink: Any = None
        self._writer: LineWriter | None = None

    def _start(self, file: IO[bytes], columns: list[str] | None) -> None:
        self._file = file
        self._sink = CompressingWriter(file, self.compression) if self.compression else file
        self._writer = LineWriter(self._sink, self.format, columns)

    def open(self, state: dict[str, Any] | None) -> None:
        """Start afresh (``state=None``) or continue from a checkpoint's ``state``."""
        if self._stdout:
            self._start(sys.stdout.buffer, None)
            return
        assert self.path is not None
        if state is None:
            self._start(open(self.path, "wb"), None)  # noqa: SIM115 - closed in finish()/close()
            return
        file = open(self.path, "r+b")  # noqa: SIM115
        file.truncate(state["bytes"])  # drop rows written after the checkpoint
        file.seek(state["bytes"])
        self._start(file, state.get("columns"))
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
        if isinstance(self._sink, CompressingWriter):
            self._sink.end_member()  # the file is complete up to here
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
        os.replace(self.path, local_path(self.final))
        fsync_dir(self.path.parent)

    def complete(self) -> None:
        """Finish a run that was killed while finishing: move the part into place if it is still there."""
        if self.path is not None and self.path.exists():
            os.replace(self.path, local_path(self.final))

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


#: The Parquet output of earlier versions: a ChunkedPart merged into one file.
ParquetPart = ChunkedPart


def open_part(
    final: str, fmt: str, input_schema: Any = None, compression: str | None = None
) -> LinePart | ChunkedPart:
    """The part writer for an output of format ``fmt`` at ``final`` (a path, a URL, or a directory ``OUT/``)."""
    directory = is_directory_path(final)
    if fmt == "parquet" or directory or is_remote(final):
        return ChunkedPart(final, fmt, input_schema, compression, directory)
    return LinePart(final, fmt, compression)
