"""Layout (meta) and piece reads from disk: boundaries, .!qB, deselected spans, handles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from qbsync.source.meta import MetaError, SourceMeta, build_meta
from qbsync.source.paths import PathMapper
from qbsync.source.reader import FileMissing, HandleCache, PieceReader
from qbsync.torrent import bencode
from tests.qbharness import make_payload, make_torrent, torrent_files

PIECE = 16 * 1024
FILES = {"a.bin": 3 * PIECE + 100, "b.bin": 2 * PIECE - 300, "sub/c.bin": PIECE + 7}


@pytest.fixture
def layout(tmp_path: Path):
    """A multi-file torrent saved at tmp/save/payload, as qBittorrent would list it."""
    save = tmp_path / "save"
    payload = make_payload(save / "payload", FILES, seed=3)
    torrent, ih = make_torrent(payload, PIECE)
    _, files, hashes = torrent_files(torrent)
    qb_files = [
        {"index": i, "name": name, "size": size, "priority": 1}
        for i, (name, size) in enumerate(files)
    ]
    info = {"hash": ih, "name": "payload", "save_path": str(save), "content_path": str(payload)}
    mapper = PathMapper(save, str(save))
    return torrent, ih, qb_files, info, mapper, hashes, save


def _meta(layout: tuple[Any, ...], priorities: list[int] | None = None) -> SourceMeta:
    torrent, ih, qb_files, info, mapper, _, _ = layout
    if priorities is not None:
        qb_files = [dict(f, priority=p) for f, p in zip(qb_files, priorities, strict=True)]
    return build_meta(ih, info, qb_files, torrent, mapper)


def test_meta_geometry_location_and_fingerprint(layout):
    meta = _meta(layout)
    assert meta.num_pieces == 6
    assert meta.local_dir == layout[6] and meta.save_sub_path == ""
    assert meta.fingerprint == "0,1,2" and not meta.partial and not meta.mask
    init = meta.init_request()
    assert [f.path for f in init.files] == ["payload/a.bin", "payload/b.bin", "payload/sub/c.bin"]
    assert all(f.inode for f in init.files)  # stat'ed for hardlink detection
    assert init.num_pieces == 6 and init.piece_length == PIECE and init.save_sub_path == ""


def test_meta_mask_only_covers_pieces_without_selected_bytes(layout):
    # b.bin spans pieces 3..4 (3 is shared with a.bin, 4 with c.bin): nothing is masked.
    assert _meta(layout, [1, 0, 1]).mask == frozenset()
    # a.bin deselected: pieces 0..2 lie only in a.bin; piece 3 is a boundary piece.
    meta = _meta(layout, [0, 1, 1])
    assert meta.mask == frozenset({0, 1, 2})
    assert meta.fingerprint == "1,2" and meta.partial
    assert meta.selected_size == FILES["b.bin"] + FILES["sub/c.bin"]


def test_meta_rejects_wrong_hash_and_file_mismatch(layout):
    torrent, ih, qb_files, info, mapper, _, _ = layout
    with pytest.raises(MetaError):
        build_meta("0" * 40, info, qb_files, torrent, mapper)
    with pytest.raises(MetaError):
        build_meta(ih, info, qb_files[:2], torrent, mapper)
    with pytest.raises(MetaError):
        build_meta(ih, info, qb_files, b"not a torrent", mapper)


def test_meta_padding_files_are_zero_slots(tmp_path):
    info_dict = {
        "name": "p",
        "piece length": PIECE,
        "files": [
            {"length": 100, "path": ["a"]},
            {"length": PIECE - 100, "path": [".pad", "x"], "attr": "p"},
            {"length": 10, "path": ["b"]},
        ],
        "pieces": b"\0" * 40,
    }
    raw = bencode({"info": info_dict})
    ih = hashlib.sha1(bencode(info_dict)).hexdigest()
    qb_files = [
        {"index": 0, "name": "p/a", "size": 100, "priority": 1},
        {"index": 1, "name": "p/b", "size": 10, "priority": 1},
    ]
    meta = build_meta(
        ih,
        {"content_path": str(tmp_path / "p")},
        qb_files,
        raw,
        PathMapper(tmp_path, str(tmp_path)),
    )
    assert [s.name for s in meta.slots] == ["p/a", None, "p/b"]
    assert [f.path for f in meta.init_request().files] == ["p/a", "p/b"]


async def test_reads_every_piece_across_boundaries(layout):
    meta = _meta(layout)
    reader = PieceReader(max_handles=2)
    try:
        for i in range(meta.num_pieces):
            buf, view = await reader.read(meta, i)
            assert hashlib.sha1(view).digest() == layout[5][i], i
            reader.recycle(buf, view)
        assert len(reader.handles) <= 2  # the LRU bound holds
    finally:
        reader.close()


async def test_deselected_spans_are_zero_filled(layout):
    meta = _meta(layout, [1, 0, 1])
    save = layout[6]
    os.unlink(save / "payload" / "b.bin")  # qBittorrent never writes a deselected file
    reader = PieceReader()
    try:
        buf, view = await reader.read(meta, 3)  # a.bin tail + b.bin head
        a_tail = FILES["a.bin"] - 3 * PIECE
        expected = (save / "payload/a.bin").read_bytes()[3 * PIECE :] + bytes(PIECE - a_tail)
        assert bytes(view) == expected
        reader.recycle(buf, view)
    finally:
        reader.close()


async def test_incomplete_extension_and_missing_files(layout):
    meta = _meta(layout)
    save = layout[6]
    c = save / "payload" / "sub" / "c.bin"
    c.rename(c.with_name("c.bin.!qB"))
    reader = PieceReader()
    try:
        buf, view = await reader.read(meta, meta.num_pieces - 1)
        assert hashlib.sha1(view).digest() == layout[5][-1]
        reader.recycle(buf, view)
        reader.forget(meta.info_hash)
        assert len(reader.handles) == 0
        os.unlink(c.with_name("c.bin.!qB"))
        with pytest.raises(FileMissing):
            await reader.read(meta, meta.num_pieces - 1)
        # Moved elsewhere: relocating (content_path changed) makes the read work again.
        moved = save / "cat"
        moved.mkdir()
        (save / "payload").rename(moved / "payload")
        (moved / "payload" / "sub" / "c.bin").write_bytes(b"x" * FILES["sub/c.bin"])
        assert meta.locate(layout[4], {"content_path": str(moved / "payload"), "save_path": ""})
        assert meta.save_sub_path == "cat"
        buf, view = await reader.read(meta, 0)
        reader.recycle(buf, view)
    finally:
        reader.close()


def test_handle_cache_lru_defers_close_while_in_use(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x")
        paths.append(p)
    cache = HandleCache(max_handles=2)
    h0 = cache.acquire("h", paths[0])
    cache.unref(cache.acquire("h", paths[1]))
    cache.unref(cache.acquire("h", paths[2]))  # evicts f0, which is still in use
    assert len(cache) == 2
    assert os.pread(h0.fd, 1, 0) == b"x"  # not closed under the reader
    cache.unref(h0)
    with pytest.raises(OSError):
        os.fstat(h0.fd)  # closed on its last release
    cache.close_all()


def test_temp_path_reads_there_but_targets_the_final_location(layout, tmp_path):
    torrent, ih, qb_files, _, _, _, save = layout
    mapper = PathMapper(save, str(save), str(save / "incomplete"))
    info = {
        "content_path": str(save / "incomplete" / "payload"),
        "save_path": str(save / "movies"),
        "download_path": str(save / "incomplete"),
    }
    meta = build_meta(ih, info, qb_files, torrent, mapper)
    assert meta.local_dir == save / "incomplete"  # read where the files are now
    assert meta.save_sub_path == "movies"  # but place them where they will end up
    moved = {"content_path": str(save / "movies" / "payload"), "save_path": str(save / "movies")}
    assert meta.locate(mapper, moved)
    assert meta.local_dir == save / "movies" and meta.save_sub_path == "movies"


async def test_reads_ahead_once_per_window_crossed(layout, monkeypatch):
    """A cold source: each read that crosses a READ_AHEAD boundary asks the kernel for the next
    window (POSIX_FADV_WILLNEED); reads inside a window ask nothing (a warm cache pays little)."""
    import qbsync.source.reader as reader_mod

    if not hasattr(os, "POSIX_FADV_WILLNEED"):
        pytest.skip("no posix_fadvise on this platform")
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(reader_mod, "READ_AHEAD", 2 * PIECE)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    meta = _meta(layout)
    reader = PieceReader()
    for index in range(3):  # a.bin holds pieces 0-2 and 100 bytes of piece 3
        buf, view = await reader.read(meta, index)
        reader.recycle(buf, view)
    willneed = [(o, n) for o, n, a in calls if a == os.POSIX_FADV_WILLNEED]
    assert willneed == [(2 * PIECE, 2 * PIECE)]  # piece 1 ends on the window boundary
    assert [a for _, _, a in calls].count(os.POSIX_FADV_SEQUENTIAL) == 1  # on open
    reader.close()


def _count_threaded_reads(reader: PieceReader, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The list of piece indexes ``reader`` reads in a worker thread, from now on."""
    threaded: list[int] = []
    real = reader._read_sync

    def counting(meta: SourceMeta, index: int, view: memoryview) -> None:
        threaded.append(index)
        real(meta, index, view)

    monkeypatch.setattr(reader, "_read_sync", counting)
    return threaded


async def test_cached_pieces_are_read_without_a_worker_thread(layout, monkeypatch):
    """Files already open and bytes in the page cache (the payload was just written): pieces
    are read on the Trio thread with RWF_NOWAIT, no thread hand-off; the bytes are right."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT on this platform")
    meta = _meta(layout)
    reader = PieceReader()
    threaded = _count_threaded_reads(reader, monkeypatch)
    try:
        for _ in range(2):  # the first pass opens the files (in threads), the second does not
            for i in range(meta.num_pieces):
                buf, view = await reader.read(meta, i)
                assert hashlib.sha1(view).digest() == layout[5][i], i
                reader.recycle(buf, view)
        first = set(threaded)
        assert first and len(threaded) == len(first)  # nothing went to a thread twice
    finally:
        reader.close()


async def test_a_read_that_would_block_goes_to_a_worker_thread(layout, monkeypatch):
    """RWF_NOWAIT says "not in the page cache" (EAGAIN): the piece is read in a worker thread,
    whole and right."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT on this platform")
    real = os.preadv

    def cold(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError(11, "would block")
        return real(fd, buffers, offset, flags)

    meta = _meta(layout)
    reader = PieceReader()
    try:
        buf, view = await reader.read(meta, 0)  # opens a.bin
        reader.recycle(buf, view)
        monkeypatch.setattr(os, "preadv", cold)
        threaded = _count_threaded_reads(reader, monkeypatch)
        buf, view = await reader.read(meta, 1)
        assert hashlib.sha1(view).digest() == layout[5][1]
        assert threaded == [1]
        reader.recycle(buf, view)
    finally:
        reader.close()
