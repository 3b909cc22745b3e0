"""Compressed files: the four codecs, written one member per checkpoint, read with every member checked.

Compression follows the last extension: ``.gz`` (gzip), ``.zst`` (zstd,
needs zstandard: ``pairscore[zstd]``), ``.bz2``, ``.xz``. A compressed file
may hold several concatenated members (gzip members, zstd frames, bz2 and xz
streams), as the pipeline's own outputs do: one per checkpoint.

Reading never loses rows silently: a stream that does not start with its
codec's magic bytes (a plain-text file named ``.zst``), that is corrupt, or
that ends inside a member (a truncated file: zstandard's own stream reader
returns the bytes so far without a word) raises :class:`CorruptInputError`
with the compressed byte offset where it happened. Damage inside a member
is found by the codec's checksum (gzip, bz2 and xz always have one; zstd
frames when written with one, as zstd's command line and pairscore do).
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from typing import IO, Any

from pairscore.pipeline.storage import FormatError

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
#: The bytes every member of each codec starts with.
MAGIC = {
    "gzip": b"\x1f\x8b",
    "zstd": b"\x28\xb5\x2f\xfd",
    "bz2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
}
_CHUNK = 1 << 16


class CorruptInputError(FormatError):
    """A compressed input that cannot be read to its end: not of its codec, corrupt, or truncated.

    ``offset`` is the compressed byte where reading stopped; ``problem``
    says what was found there (the reader adds the file and the rows read).
    """

    def __init__(self, problem: str, offset: int, *, not_compressed: bool = False) -> None:
        super().__init__(problem)
        self.problem = problem
        self.offset = offset
        self.not_compressed = not_compressed


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


# --- writing ----------------------------------------------------------------------------------


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
        level = 3 if self._level is None else self._level  # a checksum, as zstd's CLI: damage is found
        return _zstandard().ZstdCompressor(level=level, write_checksum=True).compressobj()

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


# --- reading ----------------------------------------------------------------------------------


def _decompressor(compression: str) -> Any:
    """A fresh one-member decompressor with ``decompress``, ``eof`` and ``unused_data``."""
    if compression == "gzip":
        return zlib.decompressobj(31)
    if compression == "bz2":
        return bz2.BZ2Decompressor()
    if compression == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    return _zstandard().ZstdDecompressor().decompressobj()


def _preview(head: bytes) -> str:
    text = head[:16].decode("utf-8", errors="replace")
    return repr(text) if text.isprintable() else head[:8].hex(" ")


class _Members(io.RawIOBase):
    """The decompressed bytes of every member of ``raw``, one after the other, each checked.

    Every member must start with the codec's magic bytes and end with its
    end-of-member marker; bytes after the last complete member, a corrupt
    block or a stream that ends inside a member raise CorruptInputError.
    """

    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self._raw = raw
        self._compression = compression
        self._magic = MAGIC[compression]
        self._obj: Any = None  # the member being read, None between members
        self._consumed = 0  # compressed bytes handed to the decompressors
        self._head = b""  # the start of a member, until its magic bytes are checked
        self._out = b""
        self._pos = 0
        self._ended = False
        if compression == "zstd":
            _zstandard()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            if self._ended:
                return 0
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                self._end()
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _end(self) -> None:
        self._ended = True
        if self._head:  # a member's first bytes and nothing after them
            self._check_magic(self._head, final=True)
        if self._obj is not None:
            raise CorruptInputError(
                f"the {self._compression} stream ends at compressed byte {self._consumed:,}, inside a "
                "member (no end-of-member marker): the file is truncated",
                self._consumed,
            )

    def _check_magic(self, head: bytes, *, final: bool = False) -> bool:
        """Whether ``head`` (a member's first bytes) is long enough to check; raises if it is not the codec's."""
        if len(head) < len(self._magic) and not final:
            return False
        if not head.startswith(self._magic):
            first = self._consumed == 0
            what = "it does not" if first else f"the bytes after member end at byte {self._consumed:,} do not"
            raise CorruptInputError(
                f"not {self._compression} data: {what} start with {self._compression}'s magic bytes "
                f"(found {_preview(head)}) at compressed byte {self._consumed:,}",
                self._consumed,
                not_compressed=first,
            )
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._obj is None:
                head = self._head + data
                if self._compression == "gzip" and self._consumed and not head.strip(b"\0"):
                    self._consumed += len(head)  # zeros after the last member: padding, as gzip allows
                    self._head = b""
                    break
                if not self._check_magic(head):
                    self._head = head
                    break
                self._head, data = b"", head
                self._obj = _decompressor(self._compression)
            try:
                out.append(self._obj.decompress(data))
            except Exception as exc:  # zlib.error, OSError, LZMAError, ZstdError: a corrupt block
                raise CorruptInputError(
                    f"corrupt {self._compression} data in the compressed bytes after byte {self._consumed:,} "
                    f"({exc}): the file is damaged",
                    self._consumed,
                ) from None
            if self._obj.eof:
                rest = self._obj.unused_data
                self._consumed += len(data) - len(rest)
                self._obj, data = None, rest
            else:
                self._consumed += len(data)
                data = b""
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_decompressed(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    """A binary stream of the decompressed bytes of ``raw`` (every member, in order).

    Reading it raises :class:`CorruptInputError` at the first byte that is
    not a complete member of ``compression`` (see :class:`_Members`).
    """
    if compression is None:
        return raw
    if compression not in MAGIC:
        raise FormatError(f"unknown compression {compression!r}")
    return io.BufferedReader(_Members(raw, compression), buffer_size=_CHUNK)
