"""The destination's piece writer, in process: hash check, positional writes across files,
boundary pieces, I/O errors, idempotence, early per-file finalize, dry run."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from qbsync.destination.finalizer import Finalizer, FinalizerSettings
from qbsync.destination.server import DestinationServer
from qbsync.destination.state import FileStatus, TorrentState
from qbsync.destination.store import Store
from qbsync.destination.writer import Writer, acquire
from qbsync.wire import ErrorCode, Finalize, FinalizeResult, InitResult, Peer, Piece, SyncStatus
from tests.qbharness import KiB, make_payload
from tests.wireclient import LocalTorrent, needed_indices

PEER = Peer("test", 1)
FILES = {"a.bin": 70_000, "b.bin": 3_000, "empty.bin": 0, "c.bin": 1_000, "d/e.bin": 60_000}


@attrs.define
class Dest:
    root: Path
    store: Store
    writer: Writer
    finalizer: Finalizer
    server: DestinationServer

    async def init(self, t: LocalTorrent, **kw: object) -> InitResult:
        result = await self.server.init(t.init_msg(**kw))  # type: ignore[arg-type]
        while result.status == SyncStatus.VERIFYING:
            await trio.sleep(0.01)
            result = await self.server.init(t.init_msg(**kw))  # type: ignore[arg-type]
        return result

    async def finalize(self, t: LocalTorrent, **kw: Any) -> FinalizeResult:
        """Finalize ``t``, asking again while the answer is VERIFYING (as a source does)."""
        msg = Finalize(t.info_hash, **kw)
        with trio.fail_after(30):
            result = await self.server.finalize(msg)
            while result.status == SyncStatus.VERIFYING:
                await trio.sleep(0.02)
                result = await self.server.finalize(msg)
        return result

    def state(self, t: LocalTorrent) -> TorrentState:
        return self.store.torrents[t.info_hash]

    async def piece(
        self, t: LocalTorrent, i: int, data: bytes | None = None, **kw: object
    ) -> ErrorCode:
        payload = t.piece(i, **kw) if data is None else data  # type: ignore[arg-type]
        ack = await self.server.handle_piece(
            PEER, Piece(t.info_hash, i, i * t.piece_length, payload)
        )
        return ack.code


def build(
    tmp_path: Path, nursery: trio.Nursery, *, dry_run: bool = False, workers: int = 4
) -> Dest:
    root = tmp_path / "data"
    store = Store(root, dry_run=dry_run)
    store.attach(nursery)
    finalizer = Finalizer(store, None, FinalizerSettings(qb_save_path=root, poll_interval=0.05))
    writer = Writer(store.root, workers=workers, on_file_complete=finalizer.file_complete)
    store.on_file_complete = finalizer.file_complete
    server = DestinationServer(store, writer, finalizer, qb=None)
    return Dest(root, store, writer, finalizer, server)


def torrent(tmp_path: Path, files: dict[str, int] = FILES, seed: int = 0) -> LocalTorrent:
    # 16 KiB pieces: piece 4 spans a.bin's tail, all of b.bin, empty.bin and c.bin, and e.bin.
    return LocalTorrent.create(make_payload(tmp_path / "src" / "payload", files, seed), 16 * KiB)


async def initialized(tmp_path: Path, nursery: trio.Nursery) -> tuple[LocalTorrent, Dest]:
    """A destination with :func:`torrent` initialized (everything selected)."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await d.init(t)
    return t, d


async def wait_for(pred: Callable[[], object], limit: float = 5.0) -> None:
    """Poll a condition that background tasks make true (early finalize renames)."""
    with trio.fail_after(limit):
        while not pred():  # noqa: ASYNC110  # the condition is a file on disk, no event to wait on
            await trio.sleep(0.005)


async def test_pieces_across_file_boundaries_land_byte_exact(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    ready = await d.init(t)
    order = needed_indices(ready, t.num_pieces)[::-1]
    for i in order:
        assert await d.piece(t, i) == ErrorCode.OK
    state = d.state(t)
    assert state.written.all()
    await wait_for(lambda: all(f.status is FileStatus.COMPLETE for f in state.files))
    for rel, _ in t.files:
        assert (d.root / rel).read_bytes() == (t.base / rel).read_bytes(), rel
    assert not list(d.root.rglob("*.partial"))


async def test_hash_mismatch_writes_nothing_and_counts_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, d = await initialized(tmp_path, nursery)
    bad = bytearray(t.piece(0))
    bad[-1] ^= 0xFF
    assert await d.piece(t, 0, bytes(bad)) == ErrorCode.HASH_MISMATCH
    state = d.state(t)
    assert not state.written[0]
    partial = d.root / "payload" / "a.bin.partial"
    assert not partial.exists() or partial.read_bytes() == bytes(partial.stat().st_size)
    assert await d.piece(t, 0) == ErrorCode.OK
    assert state.written[0]


async def test_resend_of_written_piece_is_ok_and_not_rewritten(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, d = await initialized(tmp_path, nursery)
    assert await d.piece(t, 1) == ErrorCode.OK
    version = d.state(t).version
    # A resend (even with wrong bytes) of a written piece is acked without a write.
    assert await d.piece(t, 1, bytes(16 * KiB)) == ErrorCode.OK
    assert d.state(t).version == version


async def test_concurrent_duplicates_of_one_piece(tmp_path: Path, nursery: trio.Nursery) -> None:
    t, d = await initialized(tmp_path, nursery)
    codes: list[ErrorCode] = []

    async def send() -> None:
        codes.append(await d.piece(t, 2))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(send)
    assert codes == [ErrorCode.OK] * 5
    assert d.state(t).written.count() == 1


async def test_boundary_piece_with_deselected_file(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    names = [rel for rel, _ in t.files]
    b = names.index("payload/b.bin")
    selected = [i != b for i in range(len(names))]
    ready = await d.init(t, selected=selected)
    state = d.state(t)
    boundary = [i for i in range(t.num_pieces) if b in t.piece_files(i)]
    assert boundary and set(boundary) <= set(needed_indices(ready, t.num_pieces))
    for i in needed_indices(ready, t.num_pieces):
        assert await d.piece(t, i, deselected=[b]) == ErrorCode.OK
    assert set(state.unverified.set_indices()) == set(boundary)
    assert not (d.root / "payload" / "b.bin").exists()
    assert not (d.root / "payload" / "b.bin.partial").exists()
    await wait_for(lambda: state.files[0].status is FileStatus.COMPLETE)
    for i, (rel, _) in enumerate(t.files):
        if i != b:
            await wait_for(functools.partial(Path.exists, d.root / rel))
            assert (d.root / rel).read_bytes() == (t.base / rel).read_bytes()
    # A boundary piece whose deselected bytes the source did have matches and is proven.
    d2 = build(tmp_path / "second", nursery)
    await d2.init(t, selected=selected)
    assert await d2.piece(t, boundary[0]) == ErrorCode.OK
    assert not d2.state(t).unverified[boundary[0]]


async def test_disk_error_is_an_io_ack_and_recoverable(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    t, d = await initialized(tmp_path, nursery)
    real = os.pwrite
    full = True

    def pwrite(fd: int, data: object, offset: int) -> int:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    assert await d.piece(t, 3) == ErrorCode.IO
    assert not d.state(t).written[3]
    full = False
    assert await d.piece(t, 3) == ErrorCode.OK
    assert d.state(t).written[3]


async def test_unknown_torrent_and_finalizing_codes(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    assert await d.piece(t, 0) == ErrorCode.NOT_INITIALIZED
    ready = await d.init(t)
    for i in needed_indices(ready, t.num_pieces):
        assert await d.piece(t, i) == ErrorCode.OK
    state = d.state(t)
    state.clear_pieces([0])  # pretend piece 0 is still missing while finalizing
    state.begin_finalize(None)
    assert await d.piece(t, 0) == ErrorCode.FINALIZING
    assert await d.piece(t, 1) == ErrorCode.OK  # already written: still ok


async def test_dry_run_checks_but_writes_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery, dry_run=True)
    ready = await d.init(t)
    assert ready.pieces_needed_count == t.num_pieces
    bad = bytearray(t.piece(0))
    bad[0] ^= 1
    assert await d.piece(t, 0, bytes(bad)) == ErrorCode.HASH_MISMATCH
    for i in range(t.num_pieces):
        assert await d.piece(t, i) == ErrorCode.OK
    assert (await d.init(t)).pieces_needed_count == t.num_pieces
    assert not d.root.exists()


async def test_late_writer_never_recreates_files_after_abort(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A piece that passed its checks before an abort must not re-create the deleted file."""
    t, d = await initialized(tmp_path, nursery)
    state = d.state(t)
    assert await d.piece(t, 0) == ErrorCode.OK
    from qbsync.wire import Abort

    assert (await d.server.abort(Abort(t.info_hash, delete_files=True))).existed
    assert not (d.root / "payload").exists()
    # The writer still holds the old state object (as an in-flight handler would).
    outcome = await d.writer.write(state, 1, memoryview(t.piece(1)))
    assert outcome.code == ErrorCode.NOT_INITIALIZED
    f = state.files[0]
    assert await acquire(d.store.root, state, f) is None
    assert not (d.root / "payload").exists()
