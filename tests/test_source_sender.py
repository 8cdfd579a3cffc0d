"""Senders: every ack code maps to the right retry decision, each piece sent once otherwise."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from qbsync.bitfield import Bitfield
from qbsync.source.meta import TorrentMeta, build_meta
from qbsync.source.paths import PathMapper
from qbsync.source.pool import ConnectionPool
from qbsync.source.reader import PieceReader
from qbsync.source.sender import MAX_PIECE_FAILURES, Senders
from qbsync.source.state import Registry, Tracked
from qbsync.source.tracker import PieceTracker
from qbsync.wire.errors import ErrorCode
from qbsync.wire.messages import InitResult, InitTorrent, PieceAck, SyncStatus
from tests.qbharness import make_payload, make_torrent, torrent_files
from tests.source_fakes import FakeConn, FakeConnector

PIECE = 16 * 1024
FILES = {"a.bin": 3 * PIECE + 100, "b.bin": 2 * PIECE - 300}


@pytest.fixture
def torrent(tmp_path: Path):
    save = tmp_path / "save"
    payload = make_payload(save / "payload", FILES, seed=5)
    data, ih = make_torrent(payload, PIECE)
    _, files, hashes = torrent_files(data)
    qb_files = [{"index": i, "name": n, "size": s, "priority": 1} for i, (n, s) in enumerate(files)]
    info = {"hash": ih, "name": "payload", "save_path": str(save), "content_path": str(payload)}
    meta = build_meta(ih, info, qb_files, data, PathMapper(save, str(save)))
    return meta, hashes


def ready_init(meta: TorrentMeta) -> Callable[[object], InitResult]:
    def on_request(msg: object) -> InitResult:
        assert isinstance(msg, InitTorrent) and not msg.probe
        needed = Bitfield.full(meta.num_pieces)
        return InitResult(SyncStatus.READY, needed.to_bytes(), meta.num_pieces, 0)

    return on_request


async def run(meta, conn: FakeConn, *, piece_timeout=5.0, relocate=None, until=None):
    registry = Registry()
    t: Tracked = registry.add(meta, PieceTracker(meta.num_pieces, meta.mask), since=0)
    pool = ConnectionPool(FakeConnector(lambda n: conn), address="d:1")
    senders = Senders(
        registry,
        pool,
        PieceReader(),
        num_senders=3,
        piece_timeout=piece_timeout,
        relocate=relocate,
        retry_base=0.01,
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await nursery.start(senders.run)
            registry.enqueue(t, t.tracker.mark_ready([2] * meta.num_pieces, trio.current_time()))
            while not (until(t) if until else t.tracker.complete):
                await registry.changed.wait()
                registry.changed = trio.Event()
            nursery.cancel_scope.cancel()
    return t


async def test_all_ok_each_piece_once_with_correct_bytes(torrent):
    meta, hashes = torrent
    conn = FakeConn(on_request=ready_init(meta))
    t = await run(meta, conn)
    sent = Counter(i for _, i, _ in conn.pieces)
    assert sent == Counter(range(meta.num_pieces))
    for _, i, data in conn.pieces:
        assert hashlib.sha1(data).digest() == hashes[i]
    assert sum(isinstance(r, InitTorrent) for r in conn.requests) == 1
    assert t.tracker.done.all() and not t.tracker.forced


async def test_hash_mismatch_resends_then_gives_up(torrent):
    meta, _ = torrent

    def on_piece(h, i, data):
        return PieceAck(h, i, ErrorCode.HASH_MISMATCH, "sha1") if i == 1 else PieceAck(h, i)

    conn = FakeConn(on_request=ready_init(meta), on_piece=on_piece)
    t = await run(meta, conn)
    sent = Counter(i for _, i, _ in conn.pieces)
    assert sent[1] == MAX_PIECE_FAILURES  # re-read and resent, then given up
    assert all(sent[i] == 1 for i in range(meta.num_pieces) if i != 1)
    assert t.tracker.forced == {1}  # finalize will run and surface "incomplete"


async def test_not_initialized_reinits_then_resends(torrent):
    meta, _ = torrent
    seen: set[int] = set()

    def on_piece(h, i, data):
        if i == 2 and i not in seen:
            seen.add(i)
            return PieceAck(h, i, ErrorCode.NOT_INITIALIZED)
        return PieceAck(h, i)

    conn = FakeConn(on_request=ready_init(meta), on_piece=on_piece)
    await run(meta, conn)
    assert sum(isinstance(r, InitTorrent) for r in conn.requests) == 2
    assert Counter(i for _, i, _ in conn.pieces)[2] == 2


async def test_retryable_codes_retry_later_and_timeouts_resend(torrent):
    meta, _ = torrent
    calls: Counter[int] = Counter()

    def on_piece(h, i, data):
        calls[i] += 1
        if i == 0 and calls[i] <= 2:
            return PieceAck(h, i, ErrorCode.IO, "disk full")
        if i == 3 and calls[i] == 1:
            return 30.0  # no ack for 30 s: the per-piece deadline fires first
        return PieceAck(h, i)

    conn = FakeConn(on_request=ready_init(meta), on_piece=on_piece)
    t = await run(meta, conn, piece_timeout=0.3)
    assert calls[0] == 3 and calls[3] == 2
    assert not t.tracker.forced  # retryable failures never give up


async def test_destination_has_some_pieces_already(torrent):
    meta, _ = torrent

    def on_request(msg):
        needed = Bitfield.from_indices(meta.num_pieces, [0, 4])
        return InitResult(SyncStatus.READY, needed.to_bytes(), 2, meta.num_pieces - 2)

    conn = FakeConn(on_request=on_request)
    await run(meta, conn)
    assert sorted(i for _, i, _ in conn.pieces) == [0, 4]


async def test_missing_file_relocates_and_retries(torrent, tmp_path):
    meta, hashes = torrent
    real = meta.local_dir
    meta.local_dir = tmp_path / "gone"  # qBittorrent moved the files meanwhile
    relocations = []

    async def relocate(t):
        relocations.append(t.info_hash)
        t.meta.local_dir = real
        return True

    conn = FakeConn(on_request=ready_init(meta))
    await run(meta, conn, relocate=relocate)
    assert relocations
    for _, i, data in conn.pieces:
        assert hashlib.sha1(data).digest() == hashes[i]
