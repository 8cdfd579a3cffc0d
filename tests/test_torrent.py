"""Metainfo parsing and piece geometry, checked against torf-generated torrents."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torf

from qbsync.torrent import (
    Geometry,
    MetainfoError,
    bdecode,
    bencode,
    parse_metainfo,
)


def _make(tmp_path: Path, sizes: dict[str, int], piece: int = 16384) -> tuple[torf.Torrent, Path]:
    root = tmp_path / "payload"
    for rel, size in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    t = torf.Torrent(path=root, private=None, piece_size=piece, created_by=None)
    t.generate()
    return t, root


def test_multi_file_geometry_matches_torf(tmp_path: Path) -> None:
    sizes = {"a.bin": 40000, "sub/b.bin": 1, "sub/c.bin": 70001, "d.bin": 16384}
    t, root = _make(tmp_path, sizes)
    meta = parse_metainfo(t.dump())
    assert meta.info_hash == t.infohash
    assert meta.matches(t.infohash.upper())
    assert meta.name == "payload"
    g = meta.geometry
    assert g.total_size == sum(sizes.values())
    assert g.num_pieces == len(meta.piece_hashes)
    # Reassemble every piece from its spans and compare with the torrent's SHA-1.
    files = [root / Path(f.path).relative_to("payload") for f in g.files]
    for i in range(g.num_pieces):
        buf = bytearray(g.piece_size(i))
        for s in g.spans(i):
            with open(files[s.file_index], "rb") as fh:
                fh.seek(s.file_offset)
                buf[s.piece_offset : s.piece_offset + s.length] = fh.read(s.length)
        assert hashlib.sha1(buf).digest() == meta.piece_hashes[i], i


def test_single_file(tmp_path: Path) -> None:
    f = tmp_path / "movie.mkv"
    f.write_bytes(os.urandom(50000))
    t = torf.Torrent(path=f, private=None, piece_size=16384, created_by=None)
    t.generate()
    meta = parse_metainfo(t.dump())
    assert [x.path for x in meta.geometry.files] == ["movie.mkv"]
    assert meta.geometry.piece_size(meta.geometry.num_pieces - 1) == 50000 - 3 * 16384


def test_file_pieces_and_zero_length() -> None:
    g = Geometry.from_sizes(10, [("r/a", 25), ("r/empty", 0), ("r/b", 5), ("r/c", 10)])
    assert g.num_pieces == 4
    assert g.file_pieces(0) == range(0, 3)
    assert g.file_pieces(1) == range(0)
    assert g.file_pieces(2) == range(2, 3)
    assert g.file_pieces(3) == range(3, 4)
    assert [(s.file_index, s.length) for s in g.spans(2)] == [(0, 5), (2, 5)]
    with pytest.raises(IndexError):
        g.piece_size(4)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"i1",
        b"i01e",
        b"i-0e",
        b"5:abc",
        b"d1:ai1e",
        b"l",
        b"di1ei2ee",
        b"x",
        b"i1ei2e",
        b"01:a",
        b"1\x00:a",
        b"1 :a",
        b"i 1e",
        b"i+1e",
        b"i1_0e",
        b"1_0:aaaaaaaaaa",
    ],
)
def test_bdecode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(MetainfoError):
        bdecode(data)


def test_bencode_round_trip() -> None:
    value = {b"a": [1, -2, b"x", {b"k": b""}], b"b": 0}
    assert bdecode(bencode(value)) == value


@pytest.mark.parametrize(
    "info",
    [
        {b"name": b"x", b"piece length": 0, b"pieces": b"", b"length": 1},
        {b"name": b"x", b"piece length": 16, b"pieces": b"\0" * 19, b"length": 1},
        {b"name": b"x", b"piece length": 16, b"pieces": b"\0" * 40, b"length": 1},
        {b"name": b"x", b"piece length": 16, b"pieces": b"\0" * 20},
        {b"name": b"x", b"piece length": 16, b"pieces": b"\0" * 20, b"files": []},
        {b"name": b"x", b"piece length": 16, b"pieces": b"\0" * 20, b"length": -1},
    ],
)
def test_parse_metainfo_rejects_bad_info(info: dict[bytes, object]) -> None:
    with pytest.raises(MetainfoError):
        parse_metainfo(bencode({b"info": info}))


def test_info_hash_is_over_raw_info_bytes() -> None:
    # Unsorted keys inside info: the hash must be over the bytes as sent, not a re-encoding.
    raw_info = b"d6:lengthi3e4:name1:x12:piece lengthi16e6:pieces20:" + b"\1" * 20 + b"e"
    swapped = b"d4:name1:x6:lengthi3e12:piece lengthi16e6:pieces20:" + b"\1" * 20 + b"e"
    for info in (raw_info, swapped):
        meta = parse_metainfo(b"d4:info" + info + b"e")
        assert meta.info_hash == hashlib.sha1(info).hexdigest()


def test_piece_hashes_are_one_buffer_sliced_on_demand() -> None:
    from qbsync.torrent import PieceHashes

    raw = bytes(range(60))
    hashes = PieceHashes(raw)
    assert len(hashes) == 3 and hashes.nbytes == 60
    assert hashes[0] == raw[:20] and hashes[2] == raw[40:] and hashes[-1] == raw[40:]
    assert list(hashes) == [raw[:20], raw[20:40], raw[40:]]
    assert hashes[1:] == [raw[20:40], raw[40:]]
    assert hashes == PieceHashes(raw) and not PieceHashes(b"")
    with pytest.raises(IndexError):
        hashes[3]
    with pytest.raises(ValueError):
        PieceHashes(b"x" * 21)
