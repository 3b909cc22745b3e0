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
    Each step yields at most ``_CHUNK`` decompressed bytes (zstd: one block,
    at most 128 KiB), so a highly compressed file stays bounded in memory.
    """

    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self._raw = raw
        self._compression = compression
        self._magic = MAGIC[compression]
        self._obj: Any = None  # the member being read, None between members
        self._in = b""  # compressed bytes read but not yet given to a decompressor
        self._consumed = 0  # compressed bytes given to the decompressors
        self._raw_done = False
        self._zstd_unit = "header"  # zstd: the part of the frame read next (see _zstd_step)
        self._zstd_checksum = False
        self._out = b""
        self._pos = 0
        if compression == "zstd":
            _zstandard()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            out = self._step()
            if out is None:
                return 0
            self._out, self._pos = out, 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _fill(self, at_least: int = 1) -> bool:
        """Read compressed bytes until ``self._in`` holds ``at_least``; False at the end of ``raw``."""
        while len(self._in) < at_least and not self._raw_done:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                self._raw_done = True
            self._in += chunk
        return len(self._in) >= at_least

    def _step(self) -> bytes | None:
        """The next decompressed bytes (maybe empty), or None at the end of the last member."""
        if self._obj is None:  # between members: the end, padding, or the next member's magic
            self._fill(len(self._magic))
            if self._compression == "gzip" and self._consumed and not self._in.strip(b"\0"):
                self._consumed += len(self._in)  # zeros after the last member: padding, as gzip allows
                self._in = b""
            if not self._in:
                return None
            self._check_magic(self._in)
            self._obj = _decompressor(self._compression)
            self._zstd_unit = "header"
        if self._compression == "zstd":
            return self._zstd_step()
        if not self._in and not self._fill():  # no input left: what the decompressor still holds
            out = self._decompress()
            if not out and self._obj is not None:
                raise CorruptInputError(
                    f"the {self._compression} stream ends at compressed byte {self._consumed:,}, inside a "
                    "member (no end-of-member marker): the file is truncated",
                    self._consumed,
                )
            return out
        return self._decompress()

    def _decompress(self) -> bytes:
        """Give the decompressor what it may take of ``self._in`` (counted as consumed); leave the
        rest, and at the end of a member the bytes after it, in ``self._in``."""
        obj, before = self._obj, len(self._in)
        try:
            if self._compression == "gzip":
                out = obj.decompress(self._in, _CHUNK)
                self._in = obj.unused_data if obj.eof else obj.unconsumed_tail
            elif self._compression in ("bz2", "xz"):
                fed = obj.needs_input  # else it still holds output: ask for that first
                out = obj.decompress(self._in if fed else b"", _CHUNK)
                kept = b"" if fed else self._in
                self._in = obj.unused_data + kept if obj.eof else kept
            else:
                raise AssertionError(self._compression)
        except Exception as exc:  # zlib.error, OSError, LZMAError, ZstdError: a corrupt block
            raise CorruptInputError(
                f"corrupt {self._compression} data in the compressed bytes after byte {self._consumed:,} "
                f"({exc}): the file is damaged",
                self._consumed,
            ) from None
        self._consumed += before - len(self._in)
        if obj.eof:
            self._obj = None
        return bytes(out)

    def _need(self, n: int) -> None:
        """Have ``n`` compressed bytes in ``self._in``, or raise: the file ends inside a member."""
        if not self._fill(n):
            end = self._consumed + len(self._in)
            raise CorruptInputError(
                f"the {self._compression} stream ends at compressed byte {end:,}, inside a member "
                "(no end-of-member marker): the file is truncated",
                end,
            )

    def _zstd_step(self) -> bytes:
        """Give zstd one unit of its frame: the frame header, one block (at most 128 KiB once
        decompressed: zstd's decompressor has no output limit of its own) or the checksum. The
        frame's structure, walked here, also tells where it must end (zstd's stream reader returns
        a truncated frame's bytes without a word)."""
        if self._zstd_unit == "header":
            self._need(5)
            fhd = self._in[4]
            single = fhd >> 5 & 1
            unit = 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
            self._zstd_checksum = bool(fhd >> 2 & 1)
            self._zstd_unit = "block"
        elif self._zstd_unit == "block":
            self._need(3)
            header = int.from_bytes(self._in[:3], "little")
            kind, size = header >> 1 & 3, header >> 3
            if kind == 3:
                raise CorruptInputError(
                    f"corrupt zstd data at compressed byte {self._consumed:,} (a reserved block type): "
                    "the file is damaged",
                    self._consumed,
                )
            unit = 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
            if header & 1:  # the last block
                self._zstd_unit = "checksum" if self._zstd_checksum else "end"
        else:
            unit, self._zstd_unit = 4, "end"
        self._need(unit)
        feed, self._in = self._in[:unit], self._in[unit:]
        try:
            out = self._obj.decompress(feed)
            if self._zstd_unit == "end" and not self._obj.eof:
                raise ValueError("the frame did not end where its last block says")
        except Exception as exc:  # ZstdError: a corrupt block or checksum
            raise CorruptInputError(
                f"corrupt zstd data in the compressed bytes after byte {self._consumed:,} ({exc}): "
                "the file is damaged",
                self._consumed,
            ) from None
        self._consumed += unit
        if self._zstd_unit == "end":
            self._obj = None
        return bytes(out)

    def _check_magic(self, head: bytes) -> None:
        """Raise unless ``head`` (a member's first bytes) starts with the codec's magic bytes."""
        if not head.startswith(self._magic):
            first = self._consumed == 0
            what = "it does not" if first else f"the bytes after member end at byte {self._consumed:,} do not"
            raise CorruptInputError(
                f"not {self._compression} data: {what} start with {self._compression}'s magic bytes "
                f"(found {_preview(head)}) at compressed byte {self._consumed:,}",
                self._consumed,
                not_compressed=first,
            )

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
