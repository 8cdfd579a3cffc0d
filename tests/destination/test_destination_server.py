"""The destination's request handling in process: validation with typed errors, the
init/finalize/abort lifecycle, orphan reclamation, implicit resync on a selection change."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from qbsync import metrics
from qbsync.destination.state import FINALIZED_NAME, FileMeta, FileStatus, Phase, dump_json
from qbsync.destination.store import new_meta
from qbsync.torrent import bencode
from qbsync.wire import (
    Abort,
    ErrorCode,
    FileEntry,
    Finalize,
    InitTorrent,
    Piece,
    StartTorrent,
    SyncStatus,
    WireError,
)
from tests.destination.test_destination_writer import PEER, Dest, build, torrent, wait_for
from tests.diskedit import flip_byte
from tests.wireclient import LocalTorrent, needed_indices


def rejected(code: ErrorCode) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "qbsync_rejected_requests_total", {"code": code.value}
    )
    return value or 0.0


async def complete(d: Dest, t: LocalTorrent, **kw: object) -> None:
    ready = await d.init(t, **kw)
    for i in needed_indices(ready, t.num_pieces):
        assert await d.piece(t, i) == ErrorCode.OK


async def test_bad_hashes_are_bad_requests(tmp_path: Path, nursery: trio.Nursery) -> None:
    d = build(tmp_path, nursery)
    before = rejected(ErrorCode.BAD_REQUEST)
    for h in ("", "xyz", "a" * 39, "g" * 40, "a" * 41, "../" + "a" * 37):
        with pytest.raises(WireError) as err:
            await d.server.init(InitTorrent(info_hash=h))
        assert err.value.code == ErrorCode.BAD_REQUEST
        ack = await d.server.handle_piece(PEER, Piece(h, 0, 0, b"x"))
        assert ack.code == ErrorCode.BAD_REQUEST
    assert rejected(ErrorCode.BAD_REQUEST) == before + 12
    # Upper-case hex is the same torrent (normalized), and a probe creates nothing.
    result = await d.server.init(InitTorrent(info_hash="AB" * 20, probe=True))
    assert result.status == SyncStatus.READY and result.pieces_needed_count == -1
    assert not d.root.exists()


async def test_init_validation(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    msg = t.init_msg()

    async def refused(m: InitTorrent) -> ErrorCode:
        with pytest.raises(WireError) as err:
            await d.server.init(m)
        return err.value.code

    def with_(**kw: object) -> InitTorrent:
        fields = {
            "info_hash": msg.info_hash,
            "torrent_file": msg.torrent_file,
            "files": msg.files,
            "piece_length": msg.piece_length,
            "total_size": msg.total_size,
            "num_pieces": msg.num_pieces,
        }
        fields.update(kw)
        return InitTorrent(**fields)  # type: ignore[arg-type]

    assert await refused(with_(torrent_file=b"")) == ErrorCode.BAD_REQUEST
    assert await refused(with_(torrent_file=b"not bencode")) == ErrorCode.BAD_REQUEST
    assert await refused(with_(info_hash="ab" * 20)) == ErrorCode.BAD_REQUEST
    assert await refused(with_(total_size=msg.total_size + 1)) == ErrorCode.BAD_REQUEST
    assert await refused(with_(num_pieces=msg.num_pieces + 1)) == ErrorCode.BAD_REQUEST
    assert await refused(with_(files=msg.files[:-1])) == ErrorCode.BAD_REQUEST
    assert (
        await refused(with_(files=(*msg.files[:-1], FileEntry("x", -1)))) == ErrorCode.BAD_REQUEST
    )
    unsafe = (FileEntry("/abs", msg.files[0].size), *msg.files[1:])
    assert await refused(with_(files=unsafe)) == ErrorCode.UNSAFE_PATH
    assert await refused(with_(**{"save_sub_path": "../x"})) == ErrorCode.UNSAFE_PATH
    assert not d.root.exists()  # nothing was created by any refusal
    assert (await d.init(t)).status == SyncStatus.READY


async def test_v2_only_torrent_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    info = {
        b"name": b"v2",
        b"piece length": 16384,
        b"meta version": 2,
        b"file tree": {b"f": {b"": {b"length": 10, b"pieces root": bytes(32)}}},
    }
    raw = bencode({b"info": info})
    h = hashlib.sha256(bencode(info)).hexdigest()
    d = build(tmp_path, nursery)
    with pytest.raises(WireError) as err:
        await d.server.init(
            InitTorrent(info_hash=h, torrent_file=raw, files=(FileEntry("v2/f", 10),))
        )
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert "v2-only" in err.value.message


async def test_piece_geometry_validation(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await d.init(t)
    L, n = t.piece_length, t.num_pieces
    cases = [
        Piece(t.info_hash, n, n * L, t.piece(n - 1)),  # index out of range
        Piece(t.info_hash, -1, 0, t.piece(0)),
        Piece(t.info_hash, 1, 0, t.piece(1)),  # wrong offset
        Piece(t.info_hash, 0, 0, t.piece(0)[:-1]),  # wrong length
        Piece(t.info_hash, n - 1, (n - 1) * L, t.piece(n - 1) + b"x"),
    ]
    before = rejected(ErrorCode.BAD_REQUEST)
    for piece in cases:
        ack = await d.server.handle_piece(PEER, piece)
        assert ack.code == ErrorCode.BAD_REQUEST, piece
    assert rejected(ErrorCode.BAD_REQUEST) == before + len(cases)
    assert d.state(t).written.count() == 0


async def test_finalize_lifecycle_without_qbittorrent(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    with pytest.raises(WireError) as err:
        await d.server.finalize(Finalize(t.info_hash))
    assert err.value.code == ErrorCode.NOT_FOUND
    ready = await d.init(t)
    needed = needed_indices(ready, t.num_pieces)
    for i in needed[1:]:
        assert await d.piece(t, i) == ErrorCode.OK
    with pytest.raises(WireError) as err:
        await d.server.finalize(Finalize(t.info_hash))
    assert err.value.code == ErrorCode.INCOMPLETE
    assert await d.piece(t, needed[0]) == ErrorCode.OK
    result = await d.server.finalize(Finalize(t.info_hash))
    assert result.status == SyncStatus.COMPLETE
    assert (d.root / ".qbsync" / t.info_hash / FINALIZED_NAME).is_file()
    assert t.info_hash not in d.store.torrents
    # After success: COMPLETE from the marker, pieces are not-initialized, abort keeps data.
    assert (await d.server.finalize(Finalize(t.info_hash))).status == SyncStatus.COMPLETE
    assert (await d.init(t)).status == SyncStatus.COMPLETE
    assert await d.piece(t, 0) == ErrorCode.NOT_INITIALIZED
    assert not (await d.server.abort(Abort(t.info_hash))).existed
    for rel, _ in t.files:
        assert (d.root / rel).read_bytes() == (t.base / rel).read_bytes()


async def test_read_back_catches_damage_and_asks_again(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await complete(d, t)
    state = d.state(t)
    # Damage a.bin on disk after it was written (page cache is dropped before the read-back).
    await wait_for(lambda: state.files[0].status is FileStatus.COMPLETE)
    await trio.to_thread.run_sync(flip_byte, d.root / "payload" / "a.bin", 5, 1)
    with pytest.raises(WireError) as err:
        await d.server.finalize(Finalize(t.info_hash))
    assert err.value.code == ErrorCode.INCOMPLETE
    ready = await d.init(t)
    assert needed_indices(ready, t.num_pieces) == [0]
    assert (d.root / "payload" / "a.bin.partial").exists()
    assert await d.piece(t, 0) == ErrorCode.OK
    assert (await d.server.finalize(Finalize(t.info_hash))).status == SyncStatus.COMPLETE


async def test_abort_with_and_without_deleting(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await d.init(t)
    for i in (0, 1, 2):
        assert await d.piece(t, i) == ErrorCode.OK
    assert (await d.server.abort(Abort(t.info_hash, delete_files=False))).existed
    assert (d.root / "payload" / "a.bin.partial").exists()
    # Only the record of which files qbsync created stays (the kept files are still ours).
    assert [p.name for p in (d.root / ".qbsync" / t.info_hash).iterdir()] == ["owned.json"]
    # Re-init finds the kept .partial and proves what is in it.
    ready = await d.init(t)
    assert not {0, 1, 2} & set(needed_indices(ready, t.num_pieces))
    assert (await d.server.abort(Abort(t.info_hash, delete_files=True))).existed
    assert not (d.root / "payload").exists()
    assert not (await d.server.abort(Abort(t.info_hash))).existed


async def test_selection_change_without_resync_flag_rebuilds(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await d.init(t)
    names = [rel for rel, _ in t.files]
    sel = [n != "payload/d/e.bin" for n in names]
    ready = await d.init(t, selected=sel)
    e = names.index("payload/d/e.bin")
    only_e = [i for i in range(t.num_pieces) if t.piece_files(i) == [e]]
    assert only_e and not set(only_e) & set(needed_indices(ready, t.num_pieces))
    assert [f.selected for f in d.state(t).meta.files] == sel


async def test_orphans_reclaimed_only_when_idle(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    other = torrent(tmp_path / "other", seed=3)
    d = build(tmp_path, nursery)
    await d.init(t)
    assert await d.piece(t, 0) == ErrorCode.OK
    await d.init(other, sub="other")
    assert await d.piece(other, 0) == ErrorCode.OK
    assert await d.server.reap_orphans(max_age=3600) == 0
    d.state(t).last_activity = time.time() - 7200
    assert await d.server.reap_orphans(max_age=3600) == 1
    assert t.info_hash not in d.store.torrents
    assert not (d.root / ".qbsync" / t.info_hash).exists()
    assert not (d.root / "payload" / "a.bin.partial").exists()
    assert other.info_hash in d.store.torrents
    assert (d.root / "other" / "payload" / "a.bin.partial").exists()
    # An untracked leftover directory with old files is reclaimed too.
    leftover = d.root / ".qbsync" / ("cd" * 20)
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    old = time.time() - 7200
    os.utime(leftover / "meta.json", (old, old))
    os.utime(leftover, (old, old))
    assert await d.server.reap_orphans(max_age=3600) == 1
    assert not leftover.exists()


async def test_start_needs_qbittorrent(tmp_path: Path, nursery: trio.Nursery) -> None:
    d = build(tmp_path, nursery)
    with pytest.raises(WireError) as err:
        await d.server.start(StartTorrent("ab" * 20))
    assert err.value.code == ErrorCode.QB_ERROR


async def test_status_page(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await d.init(t)
    status = d.server.status()
    assert status["torrents"][0]["hash"] == t.info_hash
    assert status["torrents"][0]["phase"] == Phase.ACTIVE.value


async def test_complete_in_qbittorrent_without_marker_records_the_marker(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash between qBittorrent's verify and the marker: the next Init sees the torrent
    complete in qBittorrent, writes the marker and drops the stale state."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await complete(d, t)
    # qbsync's record that it added the torrent (written before its add_torrent call).
    d.store.record_qb_added(d.store.torrents[t.info_hash])

    async def complete_in_qb(info_hash: str) -> SyncStatus:
        return SyncStatus.COMPLETE

    monkeypatch.setattr(d.finalizer, "qb_status", complete_in_qb)
    assert (await d.server.init(t.init_msg())).status == SyncStatus.COMPLETE
    assert t.info_hash not in d.store.torrents
    assert (d.root / ".qbsync" / t.info_hash / FINALIZED_NAME).is_file()


async def test_a_users_complete_qbittorrent_entry_never_becomes_a_marker(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, but qbsync never added the entry (no record): it is the user's own torrent,
    so no ``.finalized`` marker is written for it (a marker would let StartTorrent answer
    ``started=True`` for bytes qbsync never verified)."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await complete(d, t)

    async def complete_in_qb(info_hash: str) -> SyncStatus:
        return SyncStatus.COMPLETE

    monkeypatch.setattr(d.finalizer, "qb_status", complete_in_qb)
    assert (await d.server.init(t.init_msg())).status == SyncStatus.COMPLETE
    assert not (d.root / ".qbsync" / t.info_hash / FINALIZED_NAME).exists()


async def test_two_tracked_torrents_never_share_a_file_path(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two different torrents laid out at the same names (e.g. two source save paths outside
    qBittorrent's default both map to sub path "") would write into each other's files: the
    second is refused until the first is gone, and nothing of it is created."""
    t = torrent(tmp_path)
    other = torrent(tmp_path / "other", seed=3)  # same names, other content
    d = build(tmp_path, nursery)
    await d.init(t)
    assert await d.piece(t, 0) == ErrorCode.OK
    before = rejected(ErrorCode.UNSAFE_PATH)
    with pytest.raises(WireError) as err:
        await d.server.init(other.init_msg())
    assert err.value.code == ErrorCode.UNSAFE_PATH
    assert t.info_hash in err.value.message
    assert rejected(ErrorCode.UNSAFE_PATH) == before + 1
    assert other.info_hash not in d.store.torrents
    assert not (d.root / ".qbsync" / other.info_hash).exists()
    # Elsewhere it is fine; and once the first torrent is gone the names are free again.
    assert (await d.init(other, sub="elsewhere")).status == SyncStatus.READY
    assert (await d.server.abort(Abort(other.info_hash, delete_files=True))).existed
    assert (await d.server.abort(Abort(t.info_hash, delete_files=True))).existed
    assert (await d.init(other)).status == SyncStatus.READY


async def test_finalized_files_are_never_taken_over_or_deleted_by_another_torrent(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A finalized torrent's files are seeded by qBittorrent: a different torrent at the same
    names is refused (unsafe-path, naming the owner) with nothing created, and neither its
    abort nor the orphan reaper deleting leftovers that list those names removes them."""
    t = torrent(tmp_path)
    other = torrent(tmp_path / "other", seed=3)  # same names, other content
    d = build(tmp_path, nursery)
    await complete(d, t)
    assert (await d.server.finalize(Finalize(t.info_hash))).status == SyncStatus.COMPLETE
    files = {p: p.read_bytes() for p in (d.root / "payload").rglob("*") if p.is_file()}
    assert len(files) == len(t.files)
    before = rejected(ErrorCode.UNSAFE_PATH)
    with pytest.raises(WireError) as err:
        await d.server.init(other.init_msg())
    assert err.value.code == ErrorCode.UNSAFE_PATH
    assert t.info_hash in err.value.message and "finalized" in err.value.message
    assert rejected(ErrorCode.UNSAFE_PATH) == before + 1
    assert other.info_hash not in d.store.torrents
    assert not (d.root / ".qbsync" / other.info_hash).exists()
    assert not (await d.server.abort(Abort(other.info_hash, delete_files=True))).existed
    # A leftover state directory of the other torrent (an older version let it in) is
    # reclaimed without deleting the finalized files.
    leftover = d.root / ".qbsync" / other.info_hash
    leftover.mkdir()
    listed = [FileMeta(f.path, f.size, f.selected) for f in other.init_msg().files]
    (leftover / "meta.json").write_bytes(
        dump_json(new_meta(other.info_hash, "payload", "", listed))
    )
    old = time.time() - 7200
    os.utime(leftover / "meta.json", (old, old))
    os.utime(leftover, (old, old))
    assert await d.server.reap_orphans(max_age=3600) == 1
    assert not leftover.exists()
    for p, content in files.items():
        assert p.read_bytes() == content, p
    assert sorted((d.root / "payload").rglob("*.partial")) == []


async def test_one_handler_per_request_row_of_the_message_table(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Requests are dispatched by the message table, not an isinstance chain: every request
    row has exactly one handler, and a request is answered by the handler for its class."""
    from qbsync.wire.messages import REQUEST_TYPES

    d = build(tmp_path, nursery)
    assert set(d.server.handlers) == set(REQUEST_TYPES)
    result = await d.server.handle_request(PEER, InitTorrent(info_hash="AB" * 20, probe=True))
    assert result == await d.server.init(InitTorrent(info_hash="AB" * 20, probe=True))
    with pytest.raises(WireError) as err:
        await d.server.handle_request(PEER, Finalize(info_hash="zz"))
    assert err.value.code == ErrorCode.BAD_REQUEST
