"""Where rows live: local paths or URLs of any fsspec filesystem, compressed or not, one file or many.

* **Filesystems.** A path with a scheme (``s3://``, ``gs://``, ``az://``,
  ``hf://datasets/...``, ``memory://``...) goes through fsspec; the package
  for the scheme comes with an extra (``pip install 'pairscore[s3]'``), and
  a missing one is named in the error. Credentials and endpoints are the
  filesystem's own (``AWS_*`` variables, ``FSSPEC_S3_ENDPOINT_URL``...).
  Plain paths (and ``file://``) are local files.
* **Compression** (:mod:`pairscore.pipeline.compression`) follows the last
  extension: ``.gz``, ``.zst``, ``.bz2``, ``.xz``.
* **Many files as one input.** A glob (``data/*.jsonl.gz``) or a directory
  (``s3://bucket/in/``) is read as one input: its data files in sorted order
  (names starting with ``_`` or ``.``, such as ``_SUCCESS``, are left out, as
  are files whose extension names no format unless the format is given).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

STDIO = "-"
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


def signature(path: str) -> list[Any] | None:
    """What identifies the file (or the ``_SUCCESS`` of a directory) at ``path`` as written: its size
    and version (mtime, ETag...); ``None`` when there is none. Equal signatures: the same bytes."""
    if path == STDIO:
        return None
    if is_directory_path(path):
        path = join(path, "_SUCCESS")  # a directory output is complete once this is written, last
    try:
        if not is_remote(path):
            st = os.stat(local_path(path))
            return [st.st_size, st.st_mtime_ns]
        fs, fs_path = filesystem(path)
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
        info = fs.info(fs_path)
    except FileNotFoundError:
        return None
    return [info.get("size"), _version(info)]


def check_writable(path: str) -> None:
    """Raise FormatError, naming ``path`` and the fix, when a local output's directory is missing
    or not writable (an object store has no directories to create)."""
    if path == STDIO or is_remote(path):
        return
    parent = os.path.dirname(local_path(path).rstrip("/")) or "."
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise FormatError(
            f"cannot write {path}: the directory {parent} {what}; create it first "
            f"(mkdir -p {parent}) or choose another output"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FormatError(
            f"cannot write {path}: no permission to create files in {parent}; choose another output"
        )


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
