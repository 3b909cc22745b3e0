"""Where rows live: local paths or URLs of any fsspec filesystem, compressed or not, one file or many.

* **Filesystems.** A path with a scheme (``s3://``, ``gs://``, ``az://``,
  ``hf://datasets/...``, ``memory://``...) goes through fsspec; the package
  for the scheme comes with an extra (``pip install 'pairscore[s3]'``), and
  a missing one is named in the error. Credentials and endpoints are the
  filesystem's own (``AWS_*`` variables, ``FSSPEC_S3_ENDPOINT_URL``...).
  Plain paths (and ``file://``) are local files.
* **Compression** follows the last extension: ``.gz`` (gzip), ``.zst``
  (zstd, needs zstandard: ``pairscore[zstd]``), ``.bz2``, ``.xz``. A
  compressed file may hold several concatenated members (frames, streams),
  as the pipeline's own outputs do: one per checkpoint.
* **Many files as one input.** A glob (``data/*.jsonl.gz``) or a directory
  (``s3://bucket/in/``) is read as one input: its data files in sorted order
  (names starting with ``_`` or ``.``, such as ``_SUCCESS``, are left out, as
  are files whose extension names no format unless the format is given).
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

STDIO = "-"
#: Compression names accepted by --compression / --output-compression ("none": not compressed).
COMPRESSIONS = ("gzip", "zstd", "bz2", "xz", "none")
_COMPRESSION_BY_SUFFIX = {
    ".gz": "gzip",
    ".gzip": "gzip",
    ".zst": "zstd",
    ".zstd": "zstd",
    ".bz2": "bz2",
    ".xz": "xz",
}
#: The extension each compression gets in a file name.
COMPRESSION_SUFFIX = {"gzip": ".gz", "zstd": ".zst", "bz2": ".bz2", "xz": ".xz"}
#: URL scheme -> the pairscore extra that installs its fsspec filesystem.
EXTRA_OF_SCHEME = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
    "hf": "hf",
}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)(::|://)")
_GLOB = re.compile(r"[*?\[]")


class FormatError(ValueError):
    """The input cannot be read as its format says, or rows cannot be written as asked."""


def scheme_of(path: str) -> str | None:
    """``s3://b/k`` -> ``s3``; ``None`` for a plain path or ``-``."""
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL of a filesystem other than the local one."""
    scheme = scheme_of(path)
    return scheme is not None and scheme not in ("file", "local")


def local_path(path: str) -> str:
    """The OS path of a local ``path`` (``file:///x`` -> ``/x``)."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return path


def filesystem(path: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for ``path``; names the extra a missing package needs."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:  # fsspec is a base dependency; an incomplete install says so
        raise FormatError("reading URLs needs fsspec: pip install fsspec") from exc
    try:
        return url_to_fs(path)
    except ImportError as exc:
        scheme = scheme_of(path) or ""
        extra = EXTRA_OF_SCHEME.get(scheme)
        how = (
            f"pip install 'pairscore[{extra}]'" if extra else f"install the fsspec filesystem for {scheme}://"
        )
        raise FormatError(
            f"{path}: {scheme}:// needs a package that is not installed ({exc}); {how}"
        ) from exc
    except ValueError as exc:  # fsspec: unknown protocol
        raise FormatError(f"{path}: {exc}") from exc


def join(base: str, name: str) -> str:
    """``s3://b/dir`` + ``x`` -> ``s3://b/dir/x`` (string paths, any scheme)."""
    return base.rstrip("/") + "/" + name


def is_directory_path(path: str) -> bool:
    """Whether ``path`` names a directory of shards as an output: it ends with ``/`` or is a local dir."""
    if path == STDIO:
        return False
    return path.endswith("/") or (not is_remote(path) and os.path.isdir(local_path(path)))


# --- compression ----------------------------------------------------------------------------


def split_compression(path: str) -> tuple[str, str | None]:
    """``a.jsonl.gz`` -> ``("a.jsonl", "gzip")``; ``a.jsonl`` -> ``("a.jsonl", None)``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    dot = name.rfind(".")
    if dot > 0:
        found = _COMPRESSION_BY_SUFFIX.get(name[dot:].lower())
        if found is not None:
            return path[: len(path) - (len(name) - dot)], found
    return path, None


def compression_of(path: str, override: str | None = None) -> str | None:
    """The compression of ``path``: ``override`` if given (``none``: not compressed), else by extension."""
    if override is not None:
        if override not in COMPRESSIONS:
            raise FormatError(f"unknown compression {override!r}; choose one of {', '.join(COMPRESSIONS)}")
        return None if override == "none" else override
    return split_compression(path)[1]


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise FormatError("zstd (.zst) files need zstandard: pip install 'pairscore[zstd]'") from exc
    return zstandard


class Compressor:
    """Compresses a stream as a series of independent members (gzip members, zstd frames...).

    :meth:`end_member` closes the current member and returns its last bytes;
    the file is then valid up to there, which is what lets a checkpoint cut
    a compressed output back to its size on resume.
    """

    def __init__(self, name: str, level: int | None = None) -> None:
        if name not in COMPRESSION_SUFFIX:
            raise FormatError(f"unknown compression {name!r}")
        self.name = name
        self._level = level
        self._obj: Any = None
        if name == "zstd":
            _zstandard()

    def _new(self) -> Any:
        if self.name == "gzip":  # wbits 31: a gzip header (mtime 0, so output is reproducible)
            return zlib.compressobj(6 if self._level is None else self._level, zlib.DEFLATED, 31)
        if self.name == "bz2":
            return bz2.BZ2Compressor(9 if self._level is None else self._level)
        if self.name == "xz":
            return lzma.LZMACompressor(lzma.FORMAT_XZ, preset=self._level)
        return _zstandard().ZstdCompressor(level=3 if self._level is None else self._level).compressobj()

    def compress(self, data: bytes) -> bytes:
        """Bytes to append for ``data`` (maybe none yet: the compressor buffers)."""
        if self._obj is None:
            self._obj = self._new()
        return bytes(self._obj.compress(data))

    def end_member(self) -> bytes:
        """Close the current member (if any data went in); returns the bytes that finish it."""
        if self._obj is None:
            return b""
        tail = bytes(self._obj.flush())
        self._obj = None
        return tail


class CompressingWriter:
    """A binary stream that compresses into ``raw``; ``end_member`` makes ``raw`` a complete file."""

    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self.raw = raw
        self._comp = Compressor(compression)

    def write(self, data: bytes) -> int:
        self.raw.write(self._comp.compress(data))
        return len(data)

    def end_member(self) -> None:
        self.raw.write(self._comp.end_member())

    def flush(self) -> None:
        self.raw.flush()


def open_decompressed(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    """A binary stream of the decompressed bytes of ``raw`` (every member, in order)."""
    import gzip

    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "bz2":
        return bz2.BZ2File(raw, "rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, "rb")
    if compression == "zstd":
        reader = _zstandard().ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        import io

        return io.BufferedReader(reader, buffer_size=1 << 16)
    raise FormatError(f"unknown compression {compression!r}")


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One file of an input: its URL (or local path), filesystem, size and what identifies its version."""

    url: str
    fs: Any
    fs_path: str
    size: int | None
    version: str

    def open(self) -> IO[bytes]:
        """The raw (still compressed) bytes."""
        if not is_remote(self.url):
            return open(local_path(self.url), "rb")  # noqa: SIM115 - the caller closes it
        return self.fs.open(self.fs_path, "rb")


def _version(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: its mtime, ETag or generation, as the filesystem tells."""
    for key in (
        "mtime_ns",
        "ETag",
        "etag",
        "LastModified",
        "last_modified",
        "mtime",
        "updated",
        "generation",
        "created",  # fsspec's memory filesystem
        "blob_id",  # the Hugging Face Hub
    ):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def _url(fs: Any, fs_path: str, original: str) -> str:
    if not is_remote(original):
        return fs_path
    return str(fs.unstrip_protocol(fs_path))


def _source(fs: Any, fs_path: str, original: str) -> SourceFile:
    if not is_remote(original):
        st = os.stat(fs_path)
        return SourceFile(fs_path, fs, fs_path, st.st_size, f"mtime_ns={st.st_mtime_ns}")
    info = fs.info(fs_path)
    size = info.get("size")
    return SourceFile(_url(fs, fs_path, original), fs, fs_path, size, _version(info))


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def expand_input(path: str, *, is_data_name: Any) -> list[SourceFile]:
    """The files of input ``path``, in reading order.

    A glob or a directory gives its files sorted by name; ``is_data_name``
    (a name -> bool) picks the data files of a directory. Raises FormatError
    when nothing matches.
    """
    if path == STDIO:
        return []
    fs, fs_path = filesystem(path)
    if is_remote(path):
        with contextlib.suppress(Exception):
            fs.invalidate_cache()  # a listing cached earlier in this process may be stale
    if _GLOB.search(fs_path) and not fs.exists(fs_path):  # a name with [ or * that exists is a name
        found = sorted(p for p in fs.glob(fs_path) if not fs.isdir(p))
        if not found:
            raise FormatError(f"no file matches {path!r}")
        return [_source(fs, p, path) for p in found]
    if path.endswith("/") or fs.isdir(fs_path):
        if not fs.exists(fs_path):
            raise FormatError(f"{path}: no such directory")
        root = fs_path.rstrip("/")
        found = []
        for p in sorted(fs.find(root)):
            relative = p[len(root) :].lstrip("/")
            if not _hidden(relative) and is_data_name(relative):
                found.append(p)
        if not found:
            raise FormatError(
                f"the directory {path!r} holds no data files (names ending in a format's extension, "
                "optionally compressed; names starting with _ or . are left out); say --input-format "
                "to read every file"
            )
        return [_source(fs, p, path) for p in found]
    if not is_remote(path):
        return [_source(fs, local_path(path), path)]  # named as given, in messages too
    return [_source(fs, fs_path, path)]


def exists(path: str) -> bool:
    """Whether a file (or a non-empty directory) is at ``path``: an output there would replace it."""
    if path == STDIO:
        return False
    if not is_remote(path):
        p = local_path(path)
        return bool(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p)  # an empty directory is free
    fs, fs_path = filesystem(path)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(fs_path)
    return bool(fs.exists(fs_path))


def remove(path: str) -> None:
    """Delete a file or a directory tree at ``path`` if there is one."""
    if not is_remote(path):
        import shutil

        p = local_path(path)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        return
    fs, fs_path = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(fs_path):
            fs.rm(fs_path, recursive=True)


def same_place(paths: Iterable[str]) -> list[str]:
    """Canonical names (real paths for local files, URLs as given) to compare outputs and inputs."""
    return [
        os.path.realpath(local_path(p)) if not is_remote(p) else p.rstrip("/") for p in paths if p != STDIO
    ]
