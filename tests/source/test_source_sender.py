"""Senders: every ack code maps to the right retry decision, each piece sent once otherwise."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from qbsync.bitfield import Bitfield
from qbsync.source.meta import SourceMeta
from qbsync.source.pool import ConnectionPool
from qbsync.source.reader import PieceReader
from qbsync.source.sender import MAX_PIECE_FAILURES, Senders, hash_mismatch_delay, initialize
from qbsync.source.state import Registry, Tracked
from qbsync.source.tracker import PieceTracker
from qbsync.wire.errors import ErrorCode
from qbsync.wire.messages import InitResult, InitTorrent, PieceAck, SyncStatus
from tests.qbharness import MiB
from tests.source_fakes import FakeConn, FakeConnector, saved_torrent

PIECE = 16 * 1024
FILES = {"a.bin": 3 * PIECE + 100, "b.bin": 2 * PIECE - 300}


@pytest.fixture
def torrent(tmp_path: Path):
    return saved_torrent(tmp_path / "save", "payload", FILES, PIECE, seed=5)


def ready_init(meta: SourceMeta) -> Callable[[object], InitResult]:
    def on_request(msg: object) -> InitResult:
        assert isinstance(msg, InitTorrent) and not msg.probe
        needed = Bitfield.full(meta.num_pieces)
        return InitResult(SyncStatus.READY, needed.to_bytes(), meta.num_pieces, 0)

    return on_request


async def run(meta, conn: FakeConn, *, piece_timeout=5.0, relocate=None, until=None, **kw):
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
        **kw,
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
    """Each re-read waits a growing pause first (the file on disk can lag what qBittorrent
    reports), so a transient mismatch is not given up within milliseconds."""
    meta, _ = torrent
    sent_at: list[float] = []

    def on_piece(h, i, data):
        if i != 1:
            return PieceAck(h, i)
        sent_at.append(trio.current_time())
        return PieceAck(h, i, ErrorCode.HASH_MISMATCH, "sha1")

    conn = FakeConn(on_request=ready_init(meta), on_piece=on_piece)
    t = await run(meta, conn)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert all(gap >= hash_mismatch_delay(0.01, n) for n, gap in enumerate(gaps, start=1))
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


@pytest.fixture
def lazy_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 10 ms of (real) idleness, so disk reads in worker
    threads finish before it moves on to the next sleep's deadline."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_rate_limit_paces_the_payload(tmp_path, lazy_clock):
    meta, _ = saved_torrent(tmp_path / "save", "big", {"x.bin": 3 * MiB}, 64 * 1024, seed=9)
    rate = 256 * 1024
    conn = FakeConn(on_request=ready_init(meta))
    start = trio.current_time()
    await run(meta, conn, piece_timeout=1000.0, rate_limit=rate)
    elapsed = trio.current_time() - start  # virtual seconds
    assert sum(len(d) for _, _, d in conn.pieces) == 3 * MiB
    # A 1 MiB burst, then --rate-limit bytes per second: (3 - 1) MiB at 256 KiB/s >= 8 s.
    assert elapsed >= (3 * MiB - MiB) / rate


async def test_no_init_after_the_torrent_was_untracked(torrent):
    """A sender waiting to initialize a torrent that gets untracked (exclusion, removal) meanwhile
    must not send its InitTorrent: it would follow the AbortTorrent and recreate the state."""
    meta, _ = torrent
    registry = Registry()
    t = registry.add(meta, PieceTracker(meta.num_pieces, meta.mask), since=0)
    release = trio.Event()
    sent: list[object] = []

    class BlockingPool:
        generation = 1

        async def request(self, msg: object, *, within: float) -> InitResult:
            sent.append(msg)
            await release.wait()
            return ready_init(meta)(msg)

    pool = cast(Any, BlockingPool())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(initialize, pool, registry, t)  # in flight, holds the init lock
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(initialize, pool, registry, t)  # a second sender, waiting for it
        await trio.testing.wait_all_tasks_blocked()
        registry.remove(t.info_hash)  # the orchestrator untracks it (and aborts)
        sent.append("abort")
        release.set()
    assert sent[-1] == "abort", sent
