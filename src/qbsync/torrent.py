"""Torrent metainfo: bencode, the info-hash, the file table and piece <-> file geometry.

Both daemons need the same answers to "which bytes of which files make up piece *i*", so that
arithmetic lives here, once, with no I/O. The parser is strict: metainfo arrives from the
network and from qBittorrent, and a malformed or hostile document must raise
:class:`MetainfoError`, never an arbitrary exception.

Path *safety* (whether a file name may be written under ``--data``) is a separate question,
answered by :mod:`qbsync.paths`; this module only reports names as the torrent spells them.
"""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

MAX_METAINFO_BYTES = 64 * 1024 * 1024  # a 64 MiB .torrent is already absurd
MAX_PIECE_LENGTH = 256 * 1024 * 1024  # libtorrent's own ceiling is 128 MiB; allow headroom
MAX_DEPTH = 64
# Bencoded values in one .torrent. Each costs a Python object (an empty dict is 64 bytes), so a
# small crafted file of empty containers would otherwise cost hundreds of MiB. A real torrent
# needs about 6 per file (entry dict, length, path list and its components) plus a handful:
# 1,000,000 admits ~150,000 files — more than any torrent qBittorrent handles comfortably —
# and bounds the decoded size to ~70 MiB.
MAX_ITEMS = 1_000_000


# Canonical bencode numbers: ASCII digits only, no "+", spaces, "-0" or leading zeros (int()
# alone would accept b" 1", b"+1" and b"1_0").
_INT_RE = re.compile(rb"0|-?[1-9][0-9]*")
_LEN_RE = re.compile(rb"0|[1-9][0-9]*")


class MetainfoError(ValueError):
    """The bytes are not a usable torrent."""


# --- bencode --------------------------------------------------------------------------------


def bdecode(data: bytes) -> Any:
    """Decode one bencoded value that spans all of ``data``.

    Dictionary keys and strings stay ``bytes``. Raises :class:`MetainfoError` on anything
    malformed, including trailing bytes, leading zeros and unsorted or duplicate keys are
    tolerated (real-world torrents have them) but non-bytes keys are not.
    """
    value, _ = _bdecode_spans(data)
    return value


def _bdecode_spans(data: bytes) -> tuple[Any, tuple[int, int] | None]:
    """Decode ``data`` once; also where the top-level ``info`` value starts and ends (the
    info-hash is computed over exactly those bytes)."""
    if len(data) > MAX_METAINFO_BYTES:
        raise MetainfoError(f"metainfo too large ({len(data)} bytes)")
    budget = [MAX_ITEMS]
    buf = memoryview(data)
    info_span: tuple[int, int] | None = None
    if data.startswith(b"d"):
        pos = 1
        top: dict[bytes, Any] = {}
        while pos < len(buf) and buf[pos] != ord("e"):
            key, pos = _decode(buf, pos, 1, budget)
            if not isinstance(key, bytes):
                raise MetainfoError("dictionary key is not a string")
            start = pos
            top[key], pos = _decode(buf, pos, 1, budget)
            if key == b"info" and info_span is None:
                info_span = (start, pos)
        if pos >= len(buf):
            raise MetainfoError("unterminated dictionary")
        value: Any = top
        end = pos + 1
    else:
        value, end = _decode(buf, 0, 0, budget)
    if end != len(data):
        raise MetainfoError(f"trailing data after bencoded value at byte {end}")
    return value, info_span


def bdecode_prefix(data: bytes) -> tuple[Any, int]:
    """Decode one bencoded value at the start of ``data``; return it and where it ended."""
    return _decode(memoryview(data), 0, 0, [MAX_ITEMS])


def _decode(buf: memoryview, pos: int, depth: int, budget: list[int]) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise MetainfoError("bencode nested too deeply")
    if pos >= len(buf):
        raise MetainfoError("unexpected end of bencoded data")
    budget[0] -= 1
    if budget[0] < 0:
        raise MetainfoError(f"more than {MAX_ITEMS} bencoded values")
    c = buf[pos]
    if c == ord("i"):
        end = _find(buf, ord("e"), pos + 1)
        text = bytes(buf[pos + 1 : end])
        if not _INT_RE.fullmatch(text):
            raise MetainfoError(f"bad integer {text!r}")
        return int(text), end + 1
    if c == ord("l"):
        pos += 1
        items = []
        while pos < len(buf) and buf[pos] != ord("e"):
            item, pos = _decode(buf, pos, depth + 1, budget)
            items.append(item)
        if pos >= len(buf):
            raise MetainfoError("unterminated list")
        return items, pos + 1
    if c == ord("d"):
        pos += 1
        out: dict[bytes, Any] = {}
        while pos < len(buf) and buf[pos] != ord("e"):
            key, pos = _decode(buf, pos, depth + 1, budget)
            if not isinstance(key, bytes):
                raise MetainfoError("dictionary key is not a string")
            out[key], pos = _decode(buf, pos, depth + 1, budget)
        if pos >= len(buf):
            raise MetainfoError("unterminated dictionary")
        return out, pos + 1
    if ord("0") <= c <= ord("9"):
        colon = _find(buf, ord(":"), pos)
        digits = bytes(buf[pos:colon])
        if not _LEN_RE.fullmatch(digits):
            raise MetainfoError(f"bad string length {digits!r}")
        length = int(digits)
        start = colon + 1
        if start + length > len(buf):
            raise MetainfoError("string runs past the end of the data")
        return bytes(buf[start : start + length]), start + length
    raise MetainfoError(f"unexpected byte {chr(c)!r} at {pos}")


def _find(buf: memoryview, byte: int, start: int) -> int:
    for i in range(start, min(len(buf), start + 32)):
        if buf[i] == byte:
            return i
    raise MetainfoError("malformed bencoded number or length")


def bencode(value: Any) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (bytes, bytearray)):
        out.append(b"%d:" % len(value))
        out.append(bytes(value))
    elif isinstance(value, str):
        _encode(value.encode(), out)
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        out.append(b"d")
        for key in sorted(k.encode() if isinstance(k, str) else k for k in value):
            _encode(key, out)
            item = value[key] if key in value else value[key.decode()]
            _encode(item, out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(value).__name__}")


# --- metainfo -------------------------------------------------------------------------------


@attrs.frozen
class TorrentFile:
    """A file of the torrent: ``path`` is "/"-joined and includes the root folder (as
    qBittorrent names files), ``offset`` is where it starts in the concatenated content."""

    index: int
    path: str
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@attrs.frozen
class Span:
    """The part of one file that belongs to a piece."""

    file_index: int
    file_offset: int  # where in the file the span starts
    piece_offset: int  # where in the piece the span starts
    length: int


@attrs.frozen
class Geometry:
    """Piece/file arithmetic for a torrent; pure and shared by reader and writer."""

    piece_length: int
    total_size: int
    files: tuple[TorrentFile, ...]

    @classmethod
    def from_sizes(cls, piece_length: int, files: Sequence[tuple[str, int]]) -> Geometry:
        out, offset = [], 0
        for i, (path, size) in enumerate(files):
            if size < 0:
                raise MetainfoError(f"negative file size for {path!r}")
            out.append(TorrentFile(i, path, size, offset))
            offset += size
        if piece_length <= 0 or piece_length > MAX_PIECE_LENGTH:
            raise MetainfoError(f"bad piece length {piece_length}")
        return cls(piece_length, offset, tuple(out))

    @property
    def num_pieces(self) -> int:
        return -(-self.total_size // self.piece_length) if self.total_size else 0

    def piece_offset(self, index: int) -> int:
        return index * self.piece_length

    def piece_size(self, index: int) -> int:
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.num_pieces - 1}")
        return min(self.piece_length, self.total_size - index * self.piece_length)

    def spans(self, index: int) -> Iterator[Span]:
        """The file spans that make up piece ``index``, in order (zero-length files skipped)."""
        start = self.piece_offset(index)
        end = start + self.piece_size(index)
        # Files are sorted by offset: bisect for the first file that ends after ``start``.
        lo, hi = 0, len(self.files)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.files[mid].end <= start:
                lo = mid + 1
            else:
                hi = mid
        for f in self.files[lo:]:
            if f.offset >= end:
                break
            s, e = max(start, f.offset), min(end, f.end)
            if s < e:
                yield Span(f.index, s - f.offset, s - start, e - s)

    def file_pieces(self, file_index: int) -> range:
        """Pieces that touch file ``file_index`` (empty for a zero-length file)."""
        f = self.files[file_index]
        if f.size == 0:
            return range(0)
        return range(f.offset // self.piece_length, (f.end - 1) // self.piece_length + 1)


class PieceHashes(Sequence[bytes]):
    """The v1 SHA-1 piece digests as ONE ``bytes`` object, each digest sliced on demand.

    A tuple of 20-byte ``bytes`` costs 53 bytes per piece (object header + digest + tuple
    slot): a 26 MiB ``.torrent`` of 1.4 million pieces held 75 MiB that way, one buffer holds
    28 MiB (issue 15, finding 4)."""

    __slots__ = ("_buf",)
    SIZE: typing.ClassVar[int] = 20

    def __init__(self, buf: bytes = b"") -> None:
        if len(buf) % self.SIZE:
            raise ValueError("piece hashes must be a multiple of 20 bytes")
        self._buf = bytes(buf)

    def __len__(self) -> int:
        return len(self._buf) // self.SIZE

    @typing.overload
    def __getitem__(self, index: int) -> bytes: ...
    @typing.overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"piece {index} out of range 0..{n - 1}")
        start = index * self.SIZE
        return self._buf[start : start + self.SIZE]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PieceHashes):
            return self._buf == other._buf
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._buf)

    def __repr__(self) -> str:
        return f"PieceHashes({len(self)} pieces)"

    @property
    def nbytes(self) -> int:
        """Bytes held (for the destination's metadata budget)."""
        return len(self._buf)


@attrs.frozen
class Metainfo:
    """A parsed ``.torrent``. ``piece_hashes`` holds v1 SHA-1 digests (empty for v2-only)."""

    info_hash: str  # hex; SHA-1 of the info dict for v1/hybrid, truncated SHA-256 never used
    info_hash_v2: str  # hex SHA-256 of the info dict when meta version 2 (else "")
    name: str
    geometry: Geometry
    piece_hashes: PieceHashes
    private: bool
    raw: bytes = attrs.field(repr=False)
    # Per geometry file: a BEP 47 padding file (``attr`` contains ``p``, or the path starts
    # with ``.pad``). Decided here so the .torrent is never decoded a second time.
    pads: tuple[bool, ...] = ()

    @property
    def has_v1(self) -> bool:
        return bool(self.piece_hashes)

    def matches(self, info_hash: str) -> bool:
        """True when ``info_hash`` (as qBittorrent reports it) names this torrent."""
        h = info_hash.lower()
        return h == self.info_hash or (bool(self.info_hash_v2) and h == self.info_hash_v2)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, bytes):
        raise MetainfoError(f"{what} is not a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("utf-8", errors="replace")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MetainfoError(f"{what} is not an integer")
    return value


def parse_metainfo(data: bytes) -> Metainfo:
    """Parse a ``.torrent`` (decoded exactly once; CPU-heavy for big ones: call it in a worker
    thread from the event loop). Raises :class:`MetainfoError` on anything unusable."""
    top, span = _bdecode_spans(data)
    if not isinstance(top, dict) or not isinstance(top.get(b"info"), dict) or span is None:
        raise MetainfoError("metainfo has no info dictionary")
    info: dict[bytes, Any] = top[b"info"]
    raw_info = data[span[0] : span[1]]
    v1_hash = hashlib.sha1(raw_info).hexdigest()
    meta_version = info.get(b"meta version", 1)
    v2_hash = hashlib.sha256(raw_info).hexdigest() if meta_version == 2 else ""

    name = _text(info.get(b"name", b""), "name")
    piece_length = _int(info.get(b"piece length"), "piece length")

    pieces_raw = info.get(b"pieces", b"")
    if not isinstance(pieces_raw, bytes) or len(pieces_raw) % 20:
        raise MetainfoError("pieces is not a multiple of 20 bytes")
    hashes = PieceHashes(pieces_raw)

    files: list[tuple[str, int]] = []
    pads: list[bool] = []
    if b"files" in info:
        entries = info[b"files"]
        if not isinstance(entries, list) or not entries:
            raise MetainfoError("files is not a non-empty list")
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise MetainfoError(f"file {n} is not a dictionary")
            parts = entry.get(b"path.utf-8", entry.get(b"path"))
            if not isinstance(parts, list) or not parts:
                raise MetainfoError(f"file {n} has no path")
            path = "/".join([name, *(_text(p, f"file {n} path") for p in parts)])
            size = _int(entry.get(b"length"), f"file {n} length")
            attr = entry.get(b"attr", b"")
            if not isinstance(attr, bytes):
                raise MetainfoError(f"file {n} attr is not a string")
            # BEP 47 padding file: counts in the geometry, qBittorrent hides it.
            pads.append(b"p" in attr or parts[0] == b".pad")
            files.append((path, size))
    elif b"length" in info:
        files.append((name, _int(info[b"length"], "length")))
    elif b"file tree" in info:
        files.extend(_v2_files(info[b"file tree"], name))
    else:
        raise MetainfoError("info has neither length nor files")

    geometry = Geometry.from_sizes(piece_length, files)
    if hashes and len(hashes) != geometry.num_pieces:
        raise MetainfoError(f"{len(hashes)} piece hashes for {geometry.num_pieces} pieces")
    if not hashes and not v2_hash:
        raise MetainfoError("torrent has no piece hashes")
    private = top[b"info"].get(b"private", 0) == 1
    return Metainfo(
        info_hash=v1_hash if hashes else v2_hash[:40],
        info_hash_v2=v2_hash,
        name=name,
        geometry=geometry,
        piece_hashes=hashes,
        private=private,
        raw=data,
        pads=tuple(pads) if pads else (False,) * len(files),
    )


def _v2_files(tree: Any, root: str) -> Iterator[tuple[str, int]]:
    """Files of a v2-only ``file tree`` in its (sorted) order."""
    if not isinstance(tree, dict):
        raise MetainfoError("file tree is not a dictionary")
    for key in sorted(tree):
        node = tree[key]
        name = _text(key, "file tree name")
        if not isinstance(node, dict):
            raise MetainfoError("file tree node is not a dictionary")
        if b"" in node and isinstance(node[b""], dict):
            yield f"{root}/{name}", _int(node[b""].get(b"length", 0), "file tree length")
        else:
            yield from _v2_files(node, f"{root}/{name}")


# --- writing --------------------------------------------------------------------------------


def create_metainfo(root: Path, piece_length: int, *, name: str | None = None) -> bytes:
    """A trackerless, non-private v1 ``.torrent`` for the file or directory ``root``.

    ``qbsync demo`` uses it to make its sample torrent without a third-party torrent library:
    files are listed in sorted path order, pieces run across file boundaries (BEP 3), and the
    document holds no announce URL, so nothing is ever announced. ``private`` is left out
    entirely (``private=0`` would be a different info-hash for the same data).
    """
    if piece_length <= 0 or piece_length & (piece_length - 1) or piece_length < 16 * 1024:
        raise ValueError("piece length must be a power of two of at least 16 KiB")
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        if not paths:
            raise ValueError(f"{root} holds no files")
        rel = [p.relative_to(root).parts for p in paths]
    else:
        paths, rel = [root], []
    hashes: list[bytes] = []
    buf = bytearray()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(piece_length - len(buf)):
                buf += chunk
                if len(buf) == piece_length:
                    hashes.append(hashlib.sha1(buf).digest())
                    buf.clear()
    if buf:
        hashes.append(hashlib.sha1(buf).digest())
    info: dict[str, Any] = {
        "name": name or root.name,
        "piece length": piece_length,
        "pieces": b"".join(hashes),
    }
    if rel:
        info["files"] = [
            {"length": p.stat().st_size, "path": list(parts)}
            for p, parts in zip(paths, rel, strict=True)
        ]
    else:
        info["length"] = root.stat().st_size
    return bencode({"info": info})
