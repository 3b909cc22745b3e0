"""Reading rows: one input (a file, stdin, or a glob's or directory's files) as a stream of rows.

Readers keep every column and their order. JSON Lines and CSV/TSV are read
line by line through the file's decompressor; Parquet is streamed in small
batches within its row groups (never a whole file or row group). A row that
cannot be read is a :class:`BadRow` or an error (``--on-bad-row``); a file
that is truncated or damaged always stops the read with where and what to
do (:data:`DAMAGED_FIX`), never ends it early as if it were shorter.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from pairscore.pipeline.compression import (
    COMPRESSION_SUFFIX,
    CorruptInputError,
    compression_of,
    open_decompressed,
)
from pairscore.pipeline.formats import Row, input_files, require_pyarrow
from pairscore.pipeline.storage import STDIO, FormatError, SourceFile

#: What to do with an input row that cannot be read (not JSON, too many CSV fields).
BAD_ROW_POLICIES = ("fail", "skip")
#: What to do about an input file that is truncated or damaged.
DAMAGED_FIX = "Re-create or re-download the file and run again (no row was written under the output's name)"


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


class _RecordLines:
    """The lines of a text stream for csv, remembering those of the record being read: the last
    record of a file cut short has no newline at its end (and a field too few, or a quote open)."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text
        self.record: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for line in self._text:
            self.record.append(line)
            yield line

    def cut_short(self) -> bool:
        """Whether the record (or header) just read ends the file without a newline."""
        return bool(self.record) and not self.record[-1].endswith(("\n", "\r"))

    def open_quote(self) -> bool:
        return "".join(self.record).count('"') % 2 == 1


class RowReader:
    """Rows of one input, lazily; ``fraction_at()`` tells progress where a row lies when the size is known.

    The input is one file, stdin, or the files of a glob or directory read
    one after the other (``files``, from :func:`input_files`, else expanded
    here). ``compression`` overrides the one each file's extension gives
    (``"none"``: not compressed). ``total_rows`` is known up front for
    Parquet, ``total_bytes`` (of the stored, compressed bytes) for files
    whose size the filesystem tells; both are ``None`` for stdin.
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        batch_rows: int = 256,
        on_bad_row: str = "fail",
        compression: str | None = None,
        files: list[SourceFile] | None = None,
    ) -> None:
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.path = path
        self.format = fmt
        self.on_bad_row = on_bad_row
        self.total_rows: int | None = None
        self.total_bytes: int | None = None
        self.rows_read = 0
        self._batch_rows = batch_rows
        self._compression = compression
        self._stdin = path == STDIO
        self.files = [] if self._stdin else (files if files is not None else input_files(path, fmt)[0])
        self._done_bytes = 0  # stored bytes of the files read to the end
        self._line_bytes = 0  # JSONL: (decompressed) bytes of the lines read in the current file
        self._counter: _CountingReader | None = None
        self._current_compressed = False
        self._plain: _CountingReader | None = None  # a compressed file's decompressed bytes so far
        self._name = path
        self._file_start = 0  # rows_read when the current file was opened
        self._open: list[Any] = []
        self._parquet: list[Any] = []
        if fmt == "parquet":
            if self._stdin:
                raise FormatError("Parquet cannot be read from stdin; give a file")
            pq = require_pyarrow()
            for f in self.files:
                if self._compression_of(f.url):
                    raise FormatError(
                        f"{f.url}: a compressed Parquet file; Parquet compresses its own pages, "
                        "so store it uncompressed (pyarrow writes snappy pages by default)"
                    )
                handle = f.open()
                self._open.append(handle)
                try:
                    self._parquet.append(pq.ParquetFile(handle))
                except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                    raise FormatError(
                        f"{f.url}: not a readable Parquet file ({exc}); a Parquet file ends with its "
                        f"footer, so a truncated one is refused here, before any row. {DAMAGED_FIX}"
                    ) from None
            self.total_rows = sum(p.metadata.num_rows for p in self._parquet)
        elif not self._stdin:
            sizes = [f.size for f in self.files]
            self.total_bytes = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    def _compression_of(self, url: str) -> str | None:
        return compression_of(url, self._compression)

    def position(self) -> int:
        """Where reading stands: rows read (Parquet) or stored bytes consumed (uncompressed JSONL
        exactly; CSV/TSV and compressed files including the read-ahead of a few KiB). Pair it with
        :meth:`fraction_at`."""
        if self.format == "parquet":
            return self.rows_read
        if self._counter is None:
            return self._done_bytes
        inside = self._counter.count
        if self.format == "jsonl" and not self._current_compressed:
            inside = self._line_bytes
        elif self.format == "jsonl" and self._plain is not None and self._plain.count:
            # The stored bytes of the lines read: their decompressed bytes at the ratio so far, so
            # that the decompressor's read-ahead (a whole small file at once) does not count as done.
            inside = min(inside, round(self._line_bytes * self._counter.count / self._plain.count))
        return self._done_bytes + inside

    def fraction_at(self, position: int) -> float | None:
        """The share of the input before ``position`` (from :meth:`position`); ``None`` when unknown.

        Progress passes the position of the last row *written*, not of the
        last row read, so rows read ahead and still being scored do not count.
        """
        total = self.total_rows if self.format == "parquet" else self.total_bytes
        if total is None:
            return None
        if total == 0:
            return 1.0
        return min(1.0, position / total)

    def fraction_done(self) -> float | None:
        """How much of the input was read, 0..1, or ``None`` when the size is unknown."""
        return self.fraction_at(self.position())

    def rows(self, skip: int = 0) -> Iterator[Row]:
        """Yield rows after the first ``skip`` ones."""
        if self.format == "parquet":
            yield from self._pq(skip)
            return
        source = {"jsonl": self._jsonl, "csv": self._csv, "tsv": self._csv}[self.format]
        if self._stdin:
            streams: Iterator[tuple[str, IO[bytes], str | None]] = iter(
                [(STDIO, sys.stdin.buffer, self._compression_of(STDIO))]
            )
        else:
            streams = ((f.url, f.open(), self._compression_of(f.url)) for f in self.files)
        for name, raw, compression in streams:
            self._name = self.path if len(self.files) <= 1 else name
            self._file_start = self.rows_read
            self._counter = _CountingReader(raw)
            self._current_compressed = compression is not None
            self._line_bytes = 0
            stream = open_decompressed(io.BufferedReader(self._counter, buffer_size=1 << 16), compression)
            self._plain = None
            if compression is not None:
                self._plain = _CountingReader(stream)
                stream = io.BufferedReader(self._plain, buffer_size=1 << 16)
            try:
                for row in source(stream, skip):
                    if skip:
                        skip -= 1
                        self.rows_read += 1
                        continue
                    self.rows_read += 1
                    yield row
            except CorruptInputError as exc:
                if exc.not_compressed:
                    fix = (
                        f"If it is not compressed, name it without {COMPRESSION_SUFFIX[compression or 'gzip']} "
                        "or pass --compression none; else re-create or re-download it"
                    )
                    raise self._damaged(exc.problem, fix) from None
                raise self._damaged(exc.problem) from None
            finally:
                if not self._stdin:
                    stream.close()
                    self._counter.close()
            if not self._stdin:
                self._done_bytes += self._counter.count
            self._counter = None

    def close(self) -> None:
        """Close the underlying files (stdin stays open)."""
        if self._counter is not None and not self._stdin:
            self._counter.close()
        for handle in self._open:
            handle.close()
        self._open = []

    def _jsonl(self, stream: IO[bytes], skip: int) -> Iterator[Row]:
        """Rows of one JSONL stream; the first ``skip`` are yielded as empty dicts, unparsed."""
        index = 0
        for number, line in enumerate(stream, start=1):
            self._line_bytes += len(line)
            if not line.strip():
                continue
            if index < skip:
                index += 1
                yield {}
                continue
            index += 1
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if not line.endswith(b"\n"):  # the last line, cut short: a truncated file, not a bad row
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "a character cut in two"
                    raise self._damaged(
                        f"the file ends inside line {number} (from byte {self._line_bytes - len(line):,}, "
                        f"no newline at its end, not complete JSON: {why}): it is truncated"
                    ) from None
                if isinstance(exc, UnicodeDecodeError):
                    reason = f"line {number} is not UTF-8: {exc.reason} at byte {exc.start + 1}"
                else:  # its own "line 1 column 5" is within this line
                    reason = f"line {number} is not JSON: {exc.msg} at column {exc.colno}"
                yield self._bad(number, reason)
                continue
            if not isinstance(row, dict):
                yield self._bad(
                    number, f"line {number} is not a JSON object (it holds a JSON {type(row).__name__})"
                )
                continue
            yield row

    def _damaged(self, problem: str, fix: str = DAMAGED_FIX) -> FormatError:
        """The error that stops a run on a truncated or corrupt file: where, and what to do."""
        rows = self.rows_read - self._file_start
        return FormatError(f"{self._name}: {problem}; {rows:,} rows of it were read before. {fix}")

    def _bad(self, line: int, reason: str) -> BadRow:
        """A BadRow to yield (``on_bad_row="skip"``), or raise FormatError (``"fail"``)."""
        if self.on_bad_row == "fail":
            raise FormatError(
                f"{self._name}: {reason} (use --on-bad-row skip --errors FILE to send such rows "
                "to FILE and go on)"
            )
        return BadRow(line, f"{self._name}: {reason}")

    def _csv(self, stream: IO[bytes], skip: int) -> Iterator[Row]:
        raise_csv_field_limit()
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        lines = _RecordLines(text)
        delimiter = "\t" if self.format == "tsv" else ","
        reader = csv.DictReader(lines, delimiter=delimiter)
        index = 0
        while True:
            lines.record = []
            try:
                row = next(reader)
            except StopIteration:
                if index == 0 and lines.cut_short():
                    raise self._damaged("the file ends inside its header line: it is truncated") from None
                text.detach()
                return
            except csv.Error as exc:
                bad: BadRow | None = self._bad(reader.line_num, f"line {reader.line_num}: {exc}")
            except UnicodeDecodeError as exc:
                raise self._damaged(f"line {reader.line_num + 1} is not UTF-8 ({exc.reason})") from None
            else:
                bad = None
                if lines.cut_short() and (None in row.values() or lines.open_quote()):
                    raise self._damaged(
                        f"the file ends inside row {index + 1} (line {reader.line_num}: no newline at its "
                        f"end, {'a quoted field not closed' if lines.open_quote() else 'fewer fields than the header'}"
                        "): it is truncated"
                    ) from None
                if None in row:
                    bad = self._bad(
                        reader.line_num,
                        f"row {index + 1} (ending on line {reader.line_num}) has more fields than the header",
                    )
            index += 1
            if index <= skip:
                yield {}
                continue
            if bad is not None:  # the header's columns, empty: a CSV errors file keeps one header
                bad.update(dict.fromkeys(reader.fieldnames or ()))
            yield row if bad is None else bad

    def _pq(self, skip: int) -> Iterator[Row]:
        """Streamed in batches of ``batch_rows`` rows, never a whole file or row group at once
        (measured: a 64 MiB row group read whole peaked at 400 MiB, streamed at 116 MiB); row groups
        wholly before ``skip`` are passed over by their metadata, unread."""
        for number, parquet in enumerate(self._parquet):
            self._name = self.path if len(self.files) <= 1 else self.files[number].url
            meta = parquet.metadata
            first = 0
            while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
                n = meta.row_group(first).num_rows
                skip -= n
                self.rows_read += n
                first += 1
            if first == meta.num_row_groups:
                continue
            groups = list(range(first, meta.num_row_groups))
            self._file_start = self.rows_read - sum(meta.row_group(g).num_rows for g in range(first))
            batches = parquet.iter_batches(batch_size=self._batch_rows, row_groups=groups, use_threads=False)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (OSError, ValueError) as exc:  # a damaged page: ArrowInvalid, OSError
                    raise self._damaged(f"a damaged Parquet page ({exc})") from None
                rows = batch.to_pylist()
                if skip >= len(rows):
                    skip -= len(rows)
                    self.rows_read += len(rows)
                    continue
                if skip:
                    self.rows_read += skip
                    rows = rows[skip:]
                    skip = 0
                for row in rows:
                    self.rows_read += 1
                    yield row

    def parquet_schema(self) -> Any:
        """The Arrow schema of a Parquet input (its first file's; ``None`` for other formats)."""
        return self._parquet[0].schema_arrow if self._parquet else None


def count_rows(
    path: str, fmt: str, *, compression: str | None = None, files: list[SourceFile] | None = None
) -> int:
    """How many rows :meth:`RowReader.rows` yields for ``path`` (unreadable rows included).

    JSON Lines: the non-blank lines; CSV/TSV: the records after the header
    (a field may span lines); Parquet: from the files' metadata. It reads the
    whole input once (not possible for stdin).
    """
    if path == STDIO:
        raise FormatError("cannot count the rows of stdin; give a file")
    reader = RowReader(path, fmt, on_bad_row="skip", compression=compression, files=files)
    try:
        if fmt == "parquet":
            return int(reader.total_rows or 0)
        total = 0
        for f in reader.files:
            with f.open() as raw:
                stream = open_decompressed(raw, reader._compression_of(f.url))
                try:
                    if fmt == "jsonl":
                        total += sum(1 for line in stream if line.strip())
                    else:
                        total += _count_csv(stream, fmt)
                except CorruptInputError as exc:
                    raise FormatError(
                        f"{f.url}: {exc.problem} (counting its rows for --shard). {DAMAGED_FIX}"
                    ) from None
        return total
    finally:
        reader.close()


def _count_csv(stream: IO[bytes], fmt: str) -> int:
    raise_csv_field_limit()
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
    n = -1  # the header
    while True:
        try:
            next(reader)
        except StopIteration:
            return max(n, 0)
        except csv.Error:
            pass
        n += 1
