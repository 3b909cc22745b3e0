"""Which format a file is in: JSON Lines, CSV/TSV or Parquet, chosen by extension.

A row is a ``dict`` of column name to value. Formats by extension:
``.jsonl``/``.ndjson``/``.json`` (one JSON object per line), ``.csv``,
``.tsv``/``.tab``, ``.parquet``/``.pq``, each optionally compressed (``.gz``,
``.zst``, ``.bz2``, ``.xz``: :mod:`pairscore.pipeline.compression`); ``-`` is
JSONL on stdin or stdout. An input may be a glob or a directory of such
files, local or at any fsspec URL, read as one input in sorted order.
Parquet needs pyarrow (``pip install 'pairscore[parquet]'``). Reading rows:
:mod:`pairscore.pipeline.row_reader`; writing them:
:mod:`pairscore.pipeline.line_writer` and :mod:`pairscore.pipeline.parts`.
"""

from __future__ import annotations

from typing import Any

from pairscore.pipeline.compression import COMPRESSION_SUFFIX, split_compression
from pairscore.pipeline.storage import STDIO, FormatError, SourceFile, expand_input

__all__ = ["STDIO", "FormatError"]

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
#: File name extension each format is written with (shards of a directory output).
SUFFIX_OF_FORMAT = {"jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}

Row = dict[str, Any]


def _format_by_name(path: str) -> str | None:
    base, _ = split_compression(path)
    name = base.rstrip("/").rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return _BY_SUFFIX.get(name[dot:].lower()) if dot > 0 else None


def detect_format(path: str, override: str | None = None) -> str:
    """The format of ``path``: ``override`` if given, else from the extension (``-``: jsonl).

    A compression extension is looked through: ``pairs.jsonl.gz`` is JSON Lines.
    """
    if override:
        if override not in FORMATS:
            raise FormatError(f"unknown format {override!r}; choose one of {', '.join(FORMATS)}")
        return override
    if path == STDIO:
        return "jsonl"
    found = _format_by_name(path)
    if found is None:
        raise FormatError(
            f"cannot tell the format of {path!r} from its extension; use one of "
            f"{', '.join(sorted(_BY_SUFFIX))} (optionally compressed: "
            f"{', '.join(sorted(COMPRESSION_SUFFIX.values()))}) or say --input-format/--output-format"
        )
    return found


def input_files(path: str, override: str | None = None) -> tuple[list[SourceFile], str]:
    """The files of input ``path`` (one, or a glob's or directory's, sorted) and their common format."""
    if path == STDIO:
        return [], detect_format(path, override)
    files = expand_input(path, is_data_name=lambda name: bool(override) or _format_by_name(name) is not None)
    if override:
        return files, detect_format(path, override)
    formats = {f.url: detect_format(f.url) for f in files}
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        raise FormatError(
            f"{path!r} holds files of different formats ({', '.join(kinds)}); read one format at a time "
            "(a glob such as 'dir/*.jsonl.gz')"
        )
    return files, kinds[0]


def require_pyarrow() -> Any:
    """Import pyarrow.parquet, or explain which extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise FormatError("Parquet needs pyarrow: pip install 'pairscore[parquet]'") from exc
    return pq
