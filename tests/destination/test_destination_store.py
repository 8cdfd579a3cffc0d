"""Destination store: persistence format, layout validation, create/recover, flush, scan,
hardlinks. Runs the real store on a temporary directory (no wire, no qBittorrent)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qbsync import paths
from qbsync.bitfield import Bitfield
from qbsync.destination import durable
from qbsync.destination import state as st
from qbsync.destination.hardlinks import HardlinkRegistry
from qbsync.destination.layout import build_files, pad_flags
from qbsync.destination.ownership import Ledger
from qbsync.destination.state import FileMeta, FileStatus, Phase
from qbsync.destination.store import Store, new_meta
from qbsync.destination.writer import acquire, close_all
from qbsync.torrent import bencode, parse_metainfo
from qbsync.wire import ErrorCode, WireError
from tests.diskedit import overwrite
from tests.qbharness import KiB, make_payload
from tests.wireclient import LocalTorrent

FILES = {"a.bin": 100_000, "b.bin": 50_000, "c/d.bin": 70_000}


def make_torrent(tmp_path: Path, files: dict[str, int] = FILES, seed: int = 0) -> LocalTorrent:
    return LocalTorrent.create(make_payload(tmp_path / "src" / "payload", files, seed), 16 * KiB)


def meta_for(
    t: LocalTorrent, *, selected: list[bool] | None = None, sub: str = ""
) -> st.TorrentMeta:
    sel = selected or [True] * len(t.files)
    files = [FileMeta(rel, size, s) for (rel, size), s in zip(t.files, sel, strict=True)]
    return new_meta(t.info_hash, "payload", sub, files)


def attached_store(data: Path, nursery: trio.Nursery, **kw: Any) -> Store:
    """A ``Store`` on ``data`` whose background work runs in ``nursery``."""
    store = Store(data, **kw)
    store.attach(nursery)
    return store


async def fresh_state(
    tmp_path: Path, nursery: trio.Nursery
) -> tuple[LocalTorrent, Path, Store, st.TorrentState]:
    """A store on ``tmp_path/data`` with a freshly initialized, fully selected torrent."""
    t = make_torrent(tmp_path)
    data = tmp_path / "data"
    store = attached_store(data, nursery)
    state = await store.create(meta_for(t), parse_metainfo(t.torrent), fresh=True)
    return t, data, store, state


async def write_all(
    store: Store, state: st.TorrentState, t: LocalTorrent, pieces: list[int]
) -> None:
    """Write pieces straight into the .partial files and set their bits (test shortcut)."""
    for i in pieces:
        data = t.piece(i)
        written = []
        for span in state.geometry.spans(i):
            f = state.files[span.file_index]
            if f.status is not FileStatus.STREAMING:
                continue
            written.append(f)
            fd = await acquire(store.root, state, f)
            assert fd is not None
            try:
                os.pwrite(
                    fd, data[span.piece_offset : span.piece_offset + span.length], span.file_offset
                )
            finally:
                f.release()
        state.mark_written(i, written, verified=True)


# --- persistence format ---------------------------------------------------------------------------


def test_pieces_roundtrip_and_corruption_gives_empty() -> None:
    w = Bitfield.from_indices(21, [0, 5, 20])
    u = Bitfield.from_indices(21, [5])
    raw = st.encode_pieces(w, u)
    assert st.decode_pieces(raw, 21) == (w, u)
    empty = (Bitfield(21), Bitfield(21))
    assert st.decode_pieces(raw, 22) == (Bitfield(22), Bitfield(22))  # another size
    assert st.decode_pieces(raw[:-1], 21) == empty  # truncated
    assert st.decode_pieces(b"", 21) == empty
    flipped = bytearray(raw)
    flipped[15] ^= 0x40
    assert st.decode_pieces(bytes(flipped), 21) == empty  # CRC catches a flipped bit
    assert st.decode_pieces(os.urandom(len(raw)), 21) == empty


def test_meta_roundtrip_and_newer_schema_refused() -> None:
    meta = new_meta("ab" * 20, "n", "sub", [FileMeta("n/a", 1, True, 3, 4)])
    assert st.load_meta(st.dump_json(meta)) == meta
    newer = st.dump_json(st.TorrentMeta(st.SCHEMA_VERSION + 1, "ab" * 20, "n", "", ()))
    with pytest.raises(ValueError):
        st.load_meta(newer)
    with pytest.raises(ValueError):
        st.load_meta(b"{not json")
    with pytest.raises(ValueError):
        st.load_meta(b'{"schema": 1}')


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    mdir = tmp_path / "state" / ("ab" * 20)
    durable.atomic_write(mdir, "x", b"one")
    durable.atomic_write(mdir, "x", b"two")
    assert st.read_optional(mdir / "x") == b"two"
    assert [p.name for p in mdir.iterdir()] == ["x"]
    assert (mdir / "x").stat().st_mode & 0o777 == 0o600  # may hold a tracker passkey
    assert mdir.stat().st_mode & 0o777 == 0o700


# --- layout ------------------------------------------------------------------------------------


def test_build_files_checks_request_against_metainfo(tmp_path: Path) -> None:
    t = make_torrent(tmp_path)
    mi = parse_metainfo(t.torrent)
    good = [FileMeta(rel, size) for rel, size in t.files]
    files = build_files(mi, good, "movies")
    assert [f.parts for f in files] == [("movies", *rel.split("/")) for rel, _ in t.files]
    with pytest.raises(WireError) as err:
        build_files(mi, good[:-1], "")
    assert err.value.code == ErrorCode.BAD_REQUEST
    bad_size = [*good[:-1], FileMeta(good[-1].path, good[-1].size + 1)]
    with pytest.raises(WireError) as err:
        build_files(mi, bad_size, "")
    assert err.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(WireError) as err:
        build_files(mi, [*good[:-1], FileMeta("../x", good[-1].size)], "")
    assert err.value.code == ErrorCode.UNSAFE_PATH
    with pytest.raises(WireError) as err:
        build_files(mi, good, "../up")
    assert err.value.code == ErrorCode.UNSAFE_PATH
    with pytest.raises(WireError) as err:
        build_files(mi, [FileMeta("same", s) for _, s in t.files], "")
    assert err.value.code == ErrorCode.UNSAFE_PATH


def test_padding_files_are_mapped_and_skipped() -> None:
    """A BEP 47 torrent: qBittorrent lists 2 files, the geometry has 3 (one padding file)."""
    piece = 16 * KiB
    a, b = b"A" * 10_000, b"B" * 5_000
    pad = piece - len(a)
    content = a + bytes(pad) + b
    hashes = b"".join(
        __import__("hashlib").sha1(content[i : i + piece]).digest()
        for i in range(0, len(content), piece)
    )
    info = {
        b"name": b"t",
        b"piece length": piece,
        b"pieces": hashes,
        b"files": [
            {b"length": len(a), b"path": [b"a"]},
            {b"length": pad, b"path": [b".pad", str(pad).encode()], b"attr": b"p"},
            {b"length": len(b), b"path": [b"b"]},
        ],
    }
    mi = parse_metainfo(bencode({b"info": info}))
    assert pad_flags(mi) == [False, True, False]
    files = build_files(mi, [FileMeta("t/a", len(a)), FileMeta("t/b", len(b))], "")
    assert [f.pad for f in files] == [False, True, False]
    assert [f.request_index for f in files] == [0, -1, 1]
    assert files[1].status is FileStatus.SKIPPED


# --- create / flush / recover -------------------------------------------------------------------


async def test_create_flush_recover_roundtrip(tmp_path: Path, nursery: trio.Nursery) -> None:
    t, data, store, state = await fresh_state(tmp_path, nursery)
    mdir = data / ".qbsync" / t.info_hash
    assert (mdir / st.META_NAME).is_file() and st.read_optional(mdir / st.TORRENT_NAME) == t.torrent
    assert state.needed().count() == t.num_pieces
    await write_all(store, state, t, [0, 1, 2, 9])
    assert state.version != state.flushed_version
    await store.flush(state)
    assert state.version == state.flushed_version
    assert not state.touched
    written, _ = st.decode_pieces(st.read_optional(mdir / st.PIECES_NAME) or b"", t.num_pieces)
    assert set(written.set_indices()) == {0, 1, 2, 9}
    await close_all(state)

    store2 = attached_store(data, nursery)
    assert await store2.recover() == 1
    again = store2.torrents[t.info_hash]
    assert set(again.written.set_indices()) == {0, 1, 2, 9}
    assert set(again.needed().set_indices()) == set(range(t.num_pieces)) - {0, 1, 2, 9}
    assert again.last_activity <= time.time()


async def test_recover_clears_bits_of_missing_or_short_files(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, data, store, state = await fresh_state(tmp_path, nursery)
    everything = list(range(t.num_pieces))
    await write_all(store, state, t, everything)
    await store.flush(state)
    await close_all(state)
    # b.bin.partial vanishes, c/d.bin.partial is cut short.
    (data / "payload" / "b.bin.partial").unlink()
    os.truncate(data / "payload" / "c" / "d.bin.partial", 10)

    store2 = attached_store(data, nursery)
    await store2.recover()
    again = store2.torrents[t.info_hash]
    needed = set(again.needed().set_indices())
    geo = again.geometry
    expect = set(geo.file_pieces(1)) | set(geo.file_pieces(2))
    assert needed == expect
    assert set(geo.file_pieces(0)) - expect <= set(again.written.set_indices())


async def test_unloadable_state_dirs_are_skipped(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "data"
    (data / ".qbsync" / ("ab" * 20)).mkdir(parents=True)
    (data / ".qbsync" / ("ab" * 20) / st.META_NAME).write_text("garbage")
    (data / ".qbsync" / "not-a-hash").mkdir()
    store = attached_store(data, nursery)
    assert await store.recover() == 0


async def test_zero_length_selected_file_created_at_init(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = make_torrent(tmp_path, {"a.bin": 40_000, "empty.bin": 0})
    store = attached_store(tmp_path / "data", nursery)
    state = await store.create(meta_for(t), parse_metainfo(t.torrent), fresh=True)
    empty = next(f for f in state.files if f.size == 0)
    assert empty.status is FileStatus.COMPLETE
    assert (tmp_path / "data" / "payload" / "empty.bin").stat().st_size == 0
    assert state.geometry.file_pieces(empty.index) == range(0)


async def test_dry_run_store_touches_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    t = make_torrent(tmp_path)
    store = attached_store(tmp_path / "data", nursery, dry_run=True)
    state = await store.create(meta_for(t), parse_metainfo(t.torrent), fresh=True)
    await store.flush(state)
    assert not (tmp_path / "data").exists()
    assert state.dry_seen is not None


# --- scan of data already on disk -------------------------------------------------------------


def _own(data: Path, info_hash: str, files: list[Path]) -> None:
    """Record ``files`` as created by qbsync for ``info_hash`` (as an earlier sync of it would
    have): the ownership rule then lets the destination demote, rewrite or delete them."""
    ledger = Ledger.load(data / ".qbsync" / info_hash)
    for p in files:
        s = os.stat(p)
        ledger.files.add((s.st_dev, s.st_ino))
    (data / ".qbsync" / info_hash).mkdir(parents=True, exist_ok=True)
    ledger.save(data / ".qbsync" / info_hash)


def _payload_on_disk(tmp_path: Path) -> tuple[LocalTorrent, Path]:
    """A torrent whose files already lie, complete, in the data directory (as after a
    re-download or a copy made by hand): the scan at init has something to prove."""
    t = make_torrent(tmp_path)
    data = tmp_path / "data"
    make_payload(data / "payload", FILES, 0)
    return t, data


async def _scanned(store: Store, t: LocalTorrent, **kw: object) -> st.TorrentState:
    state = await store.create(meta_for(t, **kw), parse_metainfo(t.torrent), fresh=True)  # type: ignore[arg-type]
    if state.scan_done is not None:
        await state.scan_done.wait()
    assert state.phase is Phase.ACTIVE
    return state


async def test_existing_good_files_are_proven_by_scan(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, data = _payload_on_disk(tmp_path)
    store = attached_store(data, nursery)
    state = await _scanned(store, t)
    assert state.needed().count() == 0
    assert all(f.status is FileStatus.COMPLETE for f in state.files)
    assert state.written.all()


async def test_existing_damaged_file_is_demoted_keeping_good_pieces(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, data = _payload_on_disk(tmp_path)
    overwrite(data / "payload" / "a.bin", 20_000, b"\0\1\2")
    _own(data, t.info_hash, [data / "payload" / "a.bin"])
    store = attached_store(data, nursery)
    state = await _scanned(store, t)
    assert set(state.needed().set_indices()) == {20_000 // (16 * KiB)}
    a = state.files[0]
    assert a.status is FileStatus.STREAMING
    assert (data / "payload" / "a.bin.partial").exists()
    assert not (data / "payload" / "a.bin").exists()


async def test_damaged_file_with_other_links_is_unlinked_not_written(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, data = _payload_on_disk(tmp_path)
    overwrite(data / "payload" / "b.bin", 0, b"xx")
    os.link(data / "payload" / "b.bin", tmp_path / "other-name")
    _own(data, t.info_hash, [data / "payload" / "b.bin"])
    store = attached_store(data, nursery)
    state = await _scanned(store, t)
    assert set(state.needed().set_indices()) == set(state.geometry.file_pieces(1))
    assert not (data / "payload" / "b.bin").exists()
    assert (tmp_path / "other-name").read_bytes()[:2] == b"xx"  # the other name untouched


async def test_hardlink_from_registered_file_then_verified(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = make_torrent(tmp_path)
    data = tmp_path / "data"
    make_payload(data / "old" / "payload", {"b.bin": FILES["b.bin"]}, 0)
    registry = HardlinkRegistry()
    registry.add(7, 99, ("old", "payload", "b.bin"), FILES["b.bin"])
    registry.add(7, 100, ("old", "payload", "gone.bin"), 5)
    store = attached_store(data, nursery, registry=registry)
    files = [
        FileMeta(rel, size, True, 7, 99 if rel.endswith("b.bin") else 0) for rel, size in t.files
    ]
    state = await store.create(
        new_meta(t.info_hash, "payload", "", files), parse_metainfo(t.torrent), fresh=True
    )
    if state.scan_done is not None:
        await state.scan_done.wait()
    b = state.files[1]
    assert b.status is FileStatus.COMPLETE
    assert (
        os.stat(data / "payload" / "b.bin").st_ino
        == os.stat(data / "old" / "payload" / "b.bin").st_ino
    )
    # Pieces entirely inside b.bin are not needed; shared boundary pieces still are.
    inner = [
        i
        for i in state.geometry.file_pieces(1)
        if [s.file_index for s in state.geometry.spans(i)] == [1]
    ]
    assert inner and not set(inner) & set(state.needed().set_indices())
    assert registry.lookup(7, 100, 5, data) is None
    assert len(registry) == 1  # the vanished entry was evicted


async def test_resume_after_selection_change_scans_partials(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, _, store, state = await fresh_state(tmp_path, nursery)
    half = list(range(0, t.num_pieces, 2))
    await write_all(store, state, t, half)
    await store.flush(state)
    await store.forget(state)
    await store.wipe_state_dir(t.info_hash, keep_ledger=True)
    # Fresh init (as after a resync): the .partial files are scanned, proven pieces kept.
    state2 = await _scanned(store, t)
    assert set(state2.written.set_indices()) == set(half)


async def test_found_data_counts_only_once_it_is_durable(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bit persisted means its bytes are durable — for bytes found on disk too: a file left
    by an abort or a resync may still sit unsynced in the page cache, so the scan syncs what it
    proves. Data that cannot be synced proves nothing."""
    t, data = _payload_on_disk(tmp_path)
    _own(data, t.info_hash, [data / "payload" / rel for rel in FILES])

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = attached_store(data, nursery)
    state = await _scanned(store, t)
    assert state.written.count() == 0
    assert state.needed().count() == t.num_pieces
    raw = st.read_optional(data / ".qbsync" / t.info_hash / st.PIECES_NAME) or b""
    assert st.decode_pieces(raw, t.num_pieces)[0].count() == 0


def test_registry_lookup_tolerates_a_concurrent_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups run in worker threads (init of two torrents at once): an entry evicted by
    another lookup meanwhile must not turn into a KeyError (an ``internal`` error on Init)."""
    registry = HardlinkRegistry()
    registry.add(1, 2, ("gone.bin",), 10)
    real = paths.regular_size

    def racing(root: Path, parts: tuple[str, ...]) -> int | None:
        registry._by_id.clear()  # the other thread evicted it first
        return real(root, parts)

    monkeypatch.setattr(paths, "regular_size", racing)
    assert registry.lookup(1, 2, 10, tmp_path) is None
    assert len(registry) == 0


async def test_bits_cleared_during_a_flush_are_not_persisted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A flush persists the bitmap it snapshotted before syncing; a piece un-set meanwhile (its
    file's sync failed while being closed, or its data proved bad) must not be persisted."""
    t, data, store, state = await fresh_state(tmp_path, nursery)
    a = state.files[0]
    a_pieces = list(state.geometry.file_pieces(a.index))
    await write_all(store, state, t, list(range(t.num_pieces)))
    done = trio.Event()

    async def flush() -> None:
        await store.flush(state)
        done.set()

    async with a.open_lock:  # as close_file holds it while syncing a.bin
        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        state.clear_pieces(a_pieces)  # what close_file does when the sync failed
    await done.wait()
    raw = st.read_optional(data / ".qbsync" / t.info_hash / st.PIECES_NAME) or b""
    persisted = set(st.decode_pieces(raw, t.num_pieces)[0].set_indices())
    assert persisted == set(range(t.num_pieces)) - set(a_pieces)
    await close_all(state)


async def test_flush_persists_only_bits_whose_data_was_synced(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush invariant: data files are fdatasync'ed *before* the bitmap naming their pieces
    is persisted, and a file whose sync fails loses its bits (memory and disk)."""
    t, data, store, state = await fresh_state(tmp_path, nursery)
    pieces_file = data / ".qbsync" / t.info_hash / st.PIECES_NAME
    b = state.files[1]
    real = os.fdatasync
    b_fd: list[int] = []

    def fdatasync(fd: int) -> None:
        assert not pieces_file.exists()  # data first, bitmap after
        if fd in b_fd:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await write_all(store, state, t, list(range(t.num_pieces)))
    assert b.fd is not None
    b_fd.append(b.fd)
    await store.flush(state)
    persisted = set(
        st.decode_pieces(st.read_optional(pieces_file) or b"", t.num_pieces)[0].set_indices()
    )
    b_pieces = set(state.geometry.file_pieces(b.index))
    assert persisted == set(range(t.num_pieces)) - b_pieces
    assert not b_pieces & set(state.written.set_indices())
    monkeypatch.undo()
    await close_all(state)


# --- names owned by finalized torrents -----------------------------------------------------------


async def _finalized_on_disk(
    store: Store, tmp_path: Path, data: Path, seed: int = 0
) -> tuple[LocalTorrent, dict[str, bytes]]:
    """Torrent ``seed`` fully present under ``data/payload`` and finalized by ``store`` (scan
    proves every file, then the marker is written and the state dropped, as the finalizer
    does). Returns the torrent and the bytes of its files."""
    t = make_torrent(tmp_path / f"t{seed}", seed=seed)
    make_payload(data / "payload", FILES, seed)
    _own(data, t.info_hash, [data / "payload" / rel for rel in FILES])
    state = await _scanned(store, t)
    assert all(f.status is FileStatus.COMPLETE for f in state.files)
    await store.write_marker(state)
    store.untrack(state)
    return t, {rel: (data / "payload" / rel).read_bytes() for rel in FILES}


def _untouched(data: Path, before: dict[str, bytes]) -> None:
    for rel, content in before.items():
        assert (data / "payload" / rel).read_bytes() == content, rel
        assert not (data / "payload" / (rel + ".partial")).exists(), rel


async def test_finalized_torrent_keeps_its_names_across_restarts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Another torrent laid out at a finalized torrent's names would scan those files, find
    its own pieces missing and rename them to .partial (then overwrite them): it is refused
    (unsafe-path, naming the owner) before anything is created — also after a restart, when
    ownership comes from the .finalized markers — until the owner's marker is gone."""
    data = tmp_path / "data"
    store = attached_store(data, nursery)
    a, before = await _finalized_on_disk(store, tmp_path, data)
    b = make_torrent(tmp_path / "b", seed=3)  # same names, other content
    for s in (store, Store(data)):
        s.attach(nursery)
        if s is not store:
            assert await s.recover() == 0
        with pytest.raises(WireError) as err:
            await s.create(meta_for(b), parse_metainfo(b.torrent), fresh=True)
        assert err.value.code == ErrorCode.UNSAFE_PATH
        assert a.info_hash in err.value.message
        assert b.info_hash not in s.torrents
        assert not (data / ".qbsync" / b.info_hash).exists()
        _untouched(data, before)
        # Elsewhere is fine.
        elsewhere = await s.create(meta_for(b, sub="other"), parse_metainfo(b.torrent), fresh=True)
        await s.forget(elsewhere)
        created = [(f.parts, 0) for f in elsewhere.files if f.selected and f.parts]
        await s.delete_data(created, info_hash=b.info_hash, ledger=elsewhere.ledger)  # abort
        await s.wipe_state_dir(b.info_hash)
    # A resync of the owner itself (same hash) is its own business; once its marker is gone
    # the names are free.
    await store.wipe_state_dir(a.info_hash)
    state = await store.create(meta_for(b), parse_metainfo(b.torrent), fresh=True)
    assert state.info_hash in store.torrents


async def test_delete_never_removes_a_finalized_torrents_files(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    data = tmp_path / "data"
    store = attached_store(data, nursery)
    a, before = await _finalized_on_disk(store, tmp_path, data)
    b = make_torrent(tmp_path / "b", seed=3)
    names = [(("payload", *rel.split("/")), 0) for rel in FILES]
    # Finalized: the saved ledger no longer owns them (they are the destination
    # qBittorrent's now); a ledger that still did (an older version's) is proof enough.
    assert not Ledger.load(data / ".qbsync" / a.info_hash).files
    created = _owning(data, [n for n, _ in names])
    assert await store.delete_data(names, info_hash=b.info_hash, ledger=created) == 0
    assert await store.delete_data(names, info_hash=b.info_hash, ledger=Ledger()) == 0
    _untouched(data, before)
    # The owner itself may delete them (and a fresh store knows the owner from the marker).
    fresh = Store(data)
    await fresh.recover()
    assert await fresh.delete_data(names, info_hash=b.info_hash, ledger=created) == 0
    assert await fresh.delete_data(names, info_hash=a.info_hash, ledger=Ledger()) == 0
    assert await fresh.delete_data(names, info_hash=a.info_hash, ledger=created) == len(FILES)


async def test_recovery_never_lets_an_unfinished_torrent_take_finalized_names(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """State left by an older version: an unfinished torrent laid out at the names a finalized
    torrent owns. Whatever the order of their directories, recovery refuses the unfinished one
    (it would scan and demote the finalized files) and leaves the files alone."""
    data = tmp_path / "data"
    one = make_torrent(tmp_path / "one", seed=0)
    two = make_torrent(tmp_path / "two", seed=3)
    # The unfinished one sorts first, so recovery sees it before the marker.
    unfinished, finished_seed = (one, 3) if one.info_hash < two.info_hash else (two, 0)
    s1 = attached_store(data, nursery)
    state = await s1.create(meta_for(unfinished), parse_metainfo(unfinished.torrent), fresh=True)
    await s1.forget(state)
    for p in (data / "payload").rglob("*.partial"):  # an older version created none yet
        p.unlink()
    s2 = attached_store(data, nursery)
    finished, before = await _finalized_on_disk(s2, tmp_path, data, seed=finished_seed)
    assert unfinished.info_hash < finished.info_hash
    s3 = attached_store(data, nursery)
    assert await s3.recover() == 0
    assert unfinished.info_hash not in s3.torrents
    await trio.testing.wait_all_tasks_blocked()
    _untouched(data, before)


async def test_finalized_names_are_released_once_their_files_are_gone(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The user removed finalized torrent A from qBittorrent and deleted its files: its
    names protect nothing any more, so B laid out at them (a re-release, or the same content
    under another hash) is accepted and written normally. None of A's files is left, so A's
    ownership is forgotten for good — its marker directory goes too, or a restart would
    give A the names back over B's files."""
    caplog.set_level("INFO", logger="qbsync.destination.store")
    data = tmp_path / "data"
    store = attached_store(data, nursery)
    a, _ = await _finalized_on_disk(store, tmp_path, data)
    shutil.rmtree(data / "payload")
    b = make_torrent(tmp_path / "b", seed=3)  # same names, other content
    state = await store.create(meta_for(b), parse_metainfo(b.torrent), fresh=True)
    assert state.phase is Phase.ACTIVE and state.needed().count() == b.num_pieces
    released = [r.getMessage() for r in caplog.records if "finalized_name_released" in r.message]
    assert {m.split("path=")[1] for m in released} == {f"payload/{rel}" for rel in FILES}
    assert all(f"hash={a.info_hash}" in m for m in released)
    assert not (data / ".qbsync" / a.info_hash).exists()
    assert store.foreign_owner(("payload", "a.bin"), b.info_hash) is None
    await write_all(store, state, b, list(range(b.num_pieces)))
    await store.flush(state)
    await close_all(state)
    for rel, _ in b.files:
        assert (data / (rel + ".partial")).read_bytes() == (b.base / rel).read_bytes(), rel
    # After a restart B is recovered (A does not come back as the owner of B's files).
    again = attached_store(data, nursery)
    assert await again.recover() == 1
    assert again.torrents[b.info_hash].needed().count() == 0


async def test_only_the_vanished_names_of_a_finalized_torrent_are_released(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One of A's files was deleted, the others are still seeded: the deleted name can be
    taken, the present ones (and one whose ``.partial`` twin is still there) stay A's —
    also after a restart, and deletes never remove them."""
    data = tmp_path / "data"
    store = attached_store(data, nursery)
    a, before = await _finalized_on_disk(store, tmp_path, data)
    (data / "payload" / "a.bin").unlink()
    (data / "payload" / "c" / "d.bin").rename(data / "payload" / "c" / "d.bin.partial")
    del before["a.bin"], before["c/d.bin"]
    takes_a = make_torrent(tmp_path / "b1", {"a.bin": 100_000}, seed=3)
    wants_b = make_torrent(tmp_path / "b2", {"b.bin": 50_000}, seed=4)
    wants_d = make_torrent(tmp_path / "b3", {"c/d.bin": 70_000}, seed=5)
    state = await store.create(meta_for(takes_a), parse_metainfo(takes_a.torrent), fresh=True)
    await write_all(store, state, takes_a, list(range(takes_a.num_pieces)))
    await store.flush(state)
    await close_all(state)
    assert (data / "payload" / "a.bin.partial").read_bytes() == (
        takes_a.base / "payload" / "a.bin"
    ).read_bytes()
    assert (data / ".qbsync" / a.info_hash / st.FINALIZED_NAME).is_file()
    restarted = attached_store(data, nursery)
    assert await restarted.recover() == 1
    assert takes_a.info_hash in restarted.torrents
    for s in (store, restarted):
        for t in (wants_b, wants_d):
            with pytest.raises(WireError) as err:
                await s.create(meta_for(t), parse_metainfo(t.torrent), fresh=True)
            assert err.value.code == ErrorCode.UNSAFE_PATH
            assert a.info_hash in err.value.message
            assert not (data / ".qbsync" / t.info_hash).exists()
        names = [(("payload", *rel.split("/")), 0) for rel in FILES]
        # Even with a ledger that owns those files (a's), another torrent's names are skipped.
        owns_all = _owning(data, [n for n, _ in names])
        assert owns_all.files
        assert await s.delete_data(names, info_hash=wants_b.info_hash, ledger=owns_all) == 0
        for rel, content in before.items():
            assert (data / "payload" / rel).read_bytes() == content, rel
        assert (data / "payload" / "c" / "d.bin.partial").is_file()
        assert (data / "payload" / "a.bin.partial").is_file()


def _owning(data: Path, names: list[tuple[str, ...]]) -> Ledger:
    """A ledger that records the files at ``names`` (as an older version's ledger of a
    finalized torrent did)."""
    ledger = Ledger()
    for parts in names:
        for p in (data.joinpath(*parts), data.joinpath(*parts[:-1], parts[-1] + ".partial")):
            if p.exists():
                st_ = p.stat()
                ledger.files.add((st_.st_dev, st_.st_ino))
    return ledger
