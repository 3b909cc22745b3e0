"""Reading and writing rows: JSON Lines, CSV/TSV and Parquet, chosen by extension.

A row is a ``dict`` of column name to value. Readers keep every column and
their order; writers append rows to a binary file (JSONL, CSV, TSV) whose
size after each flush is a safe point to truncate back to, or, for Parquet,
collect rows into chunk files (see :mod:`pairscore.pipeline.parts`).

Formats by extension: ``.jsonl``/``.ndjson``/``.json`` (one JSON object per
line), ``.csv``, ``.tsv``/``.tab``, ``.parquet``/``.pq``; ``-`` is JSONL on
stdin or stdout. Parquet needs pyarrow (``pip install 'pairscore[parquet]'``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

STDIO = "-"
FORMATS = ("jsonl", "csv", "tsv", "parquet")
_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

Row = dict[str, Any]

#: What to do with an input row that cannot be read (not JSON, too many CSV fields).
BAD_ROW_POLICIES = ("fail", "skip")


class BadRow(dict):
    """An input row that could not be read: no columns, ``line`` and ``reason`` say where and why.

    :meth:`RowReader.rows` yields one in place of the row when ``on_bad_row``
    is ``"skip"``; it counts as a row (for ``--resume`` and ``--shard``).
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__()
        self.line = line
        self.reason = reason


def raise_csv_field_limit() -> None:
    """Let csv read fields of any length (its default limit is 131,072 characters)."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long is smaller than sys.maxsize on some platforms
            limit //= 2


class FormatError(ValueError):
    """The input cannot be read as its format says, or rows cannot be written as asked."""


def detect_format(path: str, override: str | None = None) -> str:
    """The format of ``path``: ``override`` if given, else from the extension (``-``: jsonl)."""
    if override:
        if override not in FORMATS:
            raise FormatError(f"unknown format {override!r}; choose one of {', '.join(FORMATS)}")
        return override
    if path == STDIO:
        return "jsonl"
    suffix = Path(path).suffix.lower()
    try:
        return _BY_SUFFIX[suffix]
    except KeyError:
        raise FormatError(
            f"cannot tell the format of {path!r} from its extension; use one of "
            f"{', '.join(sorted(_BY_SUFFIX))} or say --input-format/--output-format"
        ) from None


def require_pyarrow() -> Any:
    """Import pyarrow.parquet, or explain which extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise FormatError("Parquet needs pyarrow: pip install 'pairscore[parquet]'") from exc
    return pq


# --- reading --------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """A raw binary stream that counts the bytes read through it (for progress)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class RowReader:
    """Rows of one input, lazily; ``fraction_done()`` tells progress when the size is known.

    ``total_rows`` is known up front for Parquet, ``total_bytes`` for
    regular files; both are ``None`` for stdin.
    """

    def __init__(self, path: str, fmt: str, *, batch_rows: int = 4096, on_bad_row: str = "fail") -> None:
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.path = path
        self.format = fmt
        self.on_bad_row = on_bad_row
        self.total_rows: int | None = None
        self.total_bytes: int | None = None
        self.rows_read = 0
        self._line_bytes = 0
        self._batch_rows = batch_rows
        self._counter: _CountingReader | None = None
        self._parquet: Any = None
        if fmt == "parquet":
            if path == STDIO:
                raise FormatError("Parquet cannot be read from stdin; give a file")
            pq = require_pyarrow()
            self._parquet = pq.ParquetFile(path)
            self.total_rows = self._parquet.metadata.num_rows
        else:
            raw = sys.stdin.buffer if path == STDIO else open(path, "rb")  # noqa: SIM115
            if path != STDIO:
                self.total_bytes = os.fstat(raw.fileno()).st_size
            self._counter = _CountingReader(raw)

    def position(self) -> int:
        """Where reading stands: rows read (Parquet) or bytes consumed (JSONL exactly; CSV/TSV
        including the decoder's read-ahead of a few KiB). Pair it with :meth:`fraction_at`."""
        if self._counter is None:
            return self.rows_read
        return self._line_bytes if self.format == "jsonl" else self._counter.count

    def fraction_at(self, position: int) -> float | None:
        """The share of the input before ``position`` (from :meth:`position`); ``None`` when unknown.

        Progress passes the position of the last row *written*, not of the
        last row read, so rows read ahead and still being scored do not count.
        """
        total = self.total_rows if self._counter is None else self.total_bytes
        if total is None:
            return None
        if total == 0:
            return 1.0
        return min(1.0, position / total)

    def fraction_done(self) -> float | None:
        """How much of the input was read, 0..1, or ``None`` when the size is unknown."""
        if self.total_rows:
            return min(1.0, self.rows_read / self.total_rows)
        if self.total_bytes and self._counter is not None:
            done = self._line_bytes if self.format == "jsonl" else self._counter.count  # CSV: read-ahead too
            return min(1.0, done / self.total_bytes)
        if self.total_rows == 0 or self.total_bytes == 0:
            return 1.0
        return None

    def rows(self, skip: int = 0) -> Iterator[Row]:
        """Yield rows after the first ``skip`` ones."""
        source = {"jsonl": self._jsonl, "csv": self._csv, "tsv": self._csv, "parquet": self._pq}
        for row in source[self.format](skip):
            self.rows_read += 1
            yield row

    def close(self) -> None:
        """Close the underlying file (stdin stays open)."""
        if self._counter is not None and self.path != STDIO:
            self._counter.close()

    def _jsonl(self, skip: int) -> Iterator[Row]:
        assert self._counter is not None
        stream = io.BufferedReader(self._counter, buffer_size=1 << 16)
        index = 0
        for number, line in enumerate(stream, start=1):
            self._line_bytes += len(line)
            if not line.strip():
                continue
            if index < skip:
                index += 1
                self.rows_read += 1
                continue
            index += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:  # its own "line 1 column 5" is within this line
                yield self._bad(number, f"line {number} is not JSON: {exc.msg} at column {exc.colno}")
                continue
            except UnicodeDecodeError as exc:
                yield self._bad(number, f"line {number} is not UTF-8: {exc.reason} at byte {exc.start + 1}")
                continue
            if not isinstance(row, dict):
                yield self._bad(
                    number, f"line {number} is not a JSON object (it holds a JSON {type(row).__name__})"
                )
                continue
            yield row

    def _bad(self, line: int, reason: str) -> BadRow:
        """A BadRow to yield (``on_bad_row="skip"``), or raise FormatError (``"fail"``)."""
        if self.on_bad_row == "fail":
            raise FormatError(
                f"{self.path}: {reason} (use --on-bad-row skip --errors FILE to send such rows "
                "to FILE and go on)"
            )
        return BadRow(line, f"{self.path}: {reason}")

    def _csv(self, skip: int) -> Iterator[Row]:
        assert self._counter is not None
        raise_csv_field_limit()
        text = io.TextIOWrapper(io.BufferedReader(self._counter), encoding="utf-8", newline="")
        delimiter = "\t" if self.format == "tsv" else ","
        reader = csv.DictReader(text, delimiter=delimiter)
        index = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                bad: BadRow | None = self._bad(reader.line_num, f"line {reader.line_num}: {exc}")
            else:
                bad = None
                if None in row:
                    bad = self._bad(
                        reader.line_num,
                        f"row {index + 1} (ending on line {reader.line_num}) has more fields than the header",
                    )
            index += 1
            if index <= skip:
                self.rows_read += 1
                continue
            if bad is not None:  # the header's columns, empty: a CSV errors file keeps one header
                bad.update(dict.fromkeys(reader.fieldnames or ()))
            yield row if bad is None else bad

    def _pq(self, skip: int) -> Iterator[Row]:
        for batch in self._parquet.iter_batches(batch_size=self._batch_rows):
            rows = batch.to_pylist()
            if skip >= len(rows):
                skip -= len(rows)
                self.rows_read += len(rows)
                continue
            if skip:
                self.rows_read += skip
                rows = rows[skip:]
                skip = 0
            yield from rows

    def parquet_schema(self) -> Any:
        """The Arrow schema of a Parquet input (``None`` for other formats)."""
        return self._parquet.schema_arrow if self._parquet is not None else None


def count_rows(path: str, fmt: str) -> int:
    """How many rows :meth:`RowReader.rows` yields for ``path`` (unreadable rows included).

    JSON Lines: the non-blank lines; CSV/TSV: the records after the header
    (a field may span lines); Parquet: from the file's metadata. It reads the
    whole file once (not possible for stdin).
    """
    if path == STDIO:
        raise FormatError("cannot count the rows of stdin; give a file")
    if fmt == "parquet":
        return int(require_pyarrow().ParquetFile(path).metadata.num_rows)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    raise_csv_field_limit()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        n = -1  # the header
        while True:
            try:
                next(reader)
            except StopIteration:
                return max(n, 0)
            except csv.Error:
                pass
            n += 1


# --- writing --------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _clean_float(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_jsonl(row: Row) -> bytes:
    """One JSON line (UTF-8, no ASCII escaping, NaN as null)."""
    clean = {k: _clean_float(v) for k, v in row.items()}
    return (json.dumps(clean, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    return value


class LineWriter:
    """Appends rows as JSONL or CSV/TSV to a binary stream; ``columns`` fixes the CSV header."""

    def __init__(self, stream: IO[bytes], fmt: str, columns: Sequence[str] | None = None) -> None:
        if fmt not in ("jsonl", "csv", "tsv"):
            raise FormatError(f"{fmt} is not a line format")
        self._stream = stream
        self.format = fmt
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self._known = set(self.columns or ())
        self._text = io.StringIO()
        delimiter = "\t" if fmt == "tsv" else ","
        self._csv = csv.writer(self._text, delimiter=delimiter, lineterminator="\n")

    def header(self, columns: Sequence[str]) -> None:
        """Fix the CSV/TSV columns and write the header line (a no-op for JSONL)."""
        self.columns = list(columns)
        self._known = set(self.columns)
        if self.format != "jsonl":
            self._write_csv(self.columns)

    def write(self, row: Row) -> None:
        """Append one row."""
        if self.format == "jsonl":
            self._stream.write(encode_jsonl(row))
            return
        if self.columns is None:
            self.header(list(row))
        assert self.columns is not None
        extra = [k for k in row if k not in self._known]
        if extra:
            raise FormatError(
                f"a row has columns {extra} that the CSV header (from the first row) lacks; "
                "write JSONL or Parquet when rows differ in their columns"
            )
        self._write_csv([_csv_cell(row.get(c)) for c in self.columns])

    def _write_csv(self, cells: Sequence[Any]) -> None:
        self._text.seek(0)
        self._text.truncate()
        self._csv.writerow(cells)
        self._stream.write(self._text.getvalue().encode("utf-8"))

    def flush(self) -> None:
        """Flush the stream."""
        self._stream.flush()
