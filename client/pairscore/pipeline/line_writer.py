"""Writing rows as JSON Lines or CSV/TSV to a binary stream (a part file, stdout, a compressor).

Parquet output and the files rows are written to are :mod:`pairscore.pipeline.parts`'.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import IO, Any

from pairscore.pipeline.formats import Row
from pairscore.pipeline.storage import FormatError


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
