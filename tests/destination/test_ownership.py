"""Ownership: the destination only deletes, truncates, renames over or writes into files it
created itself (recorded by device and inode). A file someone else put at a torrent's name is
verified read-only: adopted when every piece it covers verifies (then it stays the user's and
survives abort, the orphan reaper, a resync and a later torrent), else the init is refused
with ``conflict`` naming the path, and the file is left exactly as it was."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from qbsync import paths
from qbsync.destination.ownership import ConflictError, Ledger
from qbsync.wire import Abort, ErrorCode, Finalize, SyncStatus, WireError
from tests.destination.test_destination_server import complete
from tests.destination.test_destination_writer import Dest, build, torrent, wait_for
from tests.wireclient import LocalTorrent, needed_indices

KiB = 1024
# a.bin covers pieces 0-1 exactly (16 KiB pieces): it can be verified on its own.
ALIGNED = {"a.bin": 32 * KiB, "b.bin": 40_000, "c.bin": 5_000}


def user_copy(d: Dest, t: LocalTorrent, rel: str, *, damage: bool = False) -> Path:
    """Put the user's own copy of ``rel`` (from the torrent's content) under --data."""
    src = t.base / "payload" / rel
    dst = d.root / "payload" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(src.read_bytes())
    if damage:
        data[100] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


async def init_until_settled(d: Dest, t: LocalTorrent, **kw: object) -> object:
    """Init until it is not VERIFYING; returns the result or the WireError."""
    try:
        return await d.init(t, **kw)
    except WireError as exc:
        return exc


async def test_users_identical_file_is_adopted_and_survives_abort_mid_sync(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The issue's case: a user's file identical to one of the torrent's was adopted by the
    scan and then deleted when the torrent was removed on the source mid-sync."""
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    mine = user_copy(d, t, "a.bin")
    unrelated = d.root / "payload" / "notes.txt"
    unrelated.write_text("mine too")
    before = mine.read_bytes()
    ready = await d.init(t)
    assert ready.status == SyncStatus.READY
    needed = needed_indices(ready, t.num_pieces)
    assert not {0, 1} & set(needed)  # proven from the user's file, not sent again
    assert await d.piece(t, needed[0]) == ErrorCode.OK  # mid-sync
    assert (d.root / "payload" / "b.bin.partial").exists()
    assert (await d.server.abort(Abort(t.info_hash, delete_files=True))).existed
    assert mine.read_bytes() == before  # the user's file: never deleted
    assert unrelated.read_text() == "mine too"
    assert not (d.root / "payload" / "b.bin.partial").exists()  # ours: deleted


async def test_users_file_that_does_not_verify_is_a_conflict_and_untouched(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix the damaged same-size file was renamed to .partial and written into."""
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    mine = user_copy(d, t, "a.bin", damage=True)
    before, ino = mine.read_bytes(), mine.stat().st_ino
    with caplog.at_level(logging.INFO):
        outcome = await init_until_settled(d, t)
    assert isinstance(outcome, WireError) and outcome.code == ErrorCode.CONFLICT
    assert "payload/a.bin" in outcome.message
    assert "event=ownership_conflict" in caplog.text and "path=payload/a.bin" in caplog.text
    assert mine.read_bytes() == before and mine.stat().st_ino == ino
    assert not (d.root / "payload" / "a.bin.partial").exists()
    assert t.info_hash not in d.store.torrents
    # Asked again: refused again, still untouched.
    assert isinstance(await init_until_settled(d, t), WireError)
    assert mine.read_bytes() == before


@pytest.mark.parametrize("where", ["a.bin", "a.bin.partial"])
async def test_users_file_of_another_size_or_a_partial_is_refused_before_anything_is_created(
    tmp_path: Path, nursery: trio.Nursery, where: str
) -> None:
    """A file of another size at a final name (the rename of our .partial used to replace
    it), or a .partial we did not create (it used to be written into)."""
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    mine = d.root / "payload" / where
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"user data")
    with pytest.raises(WireError) as err:
        await d.server.init(t.init_msg())
    assert err.value.code == ErrorCode.CONFLICT and f"payload/{where}" in err.value.message
    assert mine.read_bytes() == b"user data"
    assert not (d.root / ".qbsync" / t.info_hash).exists()
    assert sorted(p.name for p in (d.root / "payload").iterdir()) == [where]


async def test_adopted_file_survives_reaper_resync_and_a_later_torrent(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    mine = user_copy(d, t, "a.bin")
    before = mine.read_bytes()
    ready = await d.init(t)
    assert await d.piece(t, needed_indices(ready, t.num_pieces)[0]) == ErrorCode.OK
    # A resync (selection change): the user's file is re-verified, not touched.
    ready = await d.init(t, resync=True)
    assert mine.read_bytes() == before
    # The orphan reaper (idle far past its age) deletes only what qbsync created.
    d.store.torrents[t.info_hash].last_activity = 0.0
    assert await d.server.reap_orphans(max_age=1.0) == 1
    assert mine.read_bytes() == before
    assert not list((d.root / "payload").rglob("*.partial"))
    # A later, different torrent at the same names: the user's file does not verify for it.
    other = torrent(tmp_path / "other", ALIGNED, seed=5)
    outcome = await init_until_settled(d, other)
    assert isinstance(outcome, WireError) and outcome.code == ErrorCode.CONFLICT
    assert mine.read_bytes() == before


async def test_a_file_put_at_the_final_name_while_streaming_is_never_replaced(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The rename ``x.partial`` -> ``x`` used to replace whatever was at ``x``."""
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    ready = await d.init(t)
    mine = d.root / "payload" / "c.bin"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"arrived meanwhile")
    for i in needed_indices(ready, t.num_pieces):
        assert await d.piece(t, i) == ErrorCode.OK
    await wait_for(lambda: (d.root / "payload" / "a.bin").exists())
    with trio.fail_after(10):
        while True:
            try:
                result = await d.server.finalize(Finalize(t.info_hash))
            except WireError as exc:
                assert exc.code in (ErrorCode.IO, ErrorCode.CONFLICT)
                break
            assert result.status != SyncStatus.COMPLETE
            await trio.sleep(0.01)
    assert mine.read_bytes() == b"arrived meanwhile"
    assert (d.root / "payload" / "c.bin.partial").exists()  # ours, kept for a retry


async def test_only_created_files_are_deleted_even_with_a_stale_file_list(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A user's file that replaced one of ours (new inode, same name) is not ours any more."""
    t = torrent(tmp_path, ALIGNED)
    d = build(tmp_path, nursery)
    await complete(d, t)
    await wait_for(lambda: (d.root / "payload" / "b.bin").exists())
    replaced = d.root / "payload" / "b.bin"
    # Written elsewhere first, so it is a new inode while ours still exists (a reused inode
    # number is covered by test_a_reused_inode_number_is_not_proof_of_ownership).
    (tmp_path / "new").write_bytes(b"the user's now")
    os.replace(tmp_path / "new", replaced)
    assert (await d.server.abort(Abort(t.info_hash, delete_files=True))).existed
    assert replaced.read_bytes() == b"the user's now"
    assert not (d.root / "payload" / "a.bin").exists()  # ours: deleted


def test_rename_never_replaces_an_existing_name(tmp_path: Path) -> None:
    (tmp_path / "x.partial").write_bytes(b"ours")
    (tmp_path / "x").write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        paths.rename(tmp_path, ("x.partial",), ("x",))
    assert (tmp_path / "x").read_bytes() == b"theirs"
    paths.rename(tmp_path, ("x.partial",), ("y",))
    assert (tmp_path / "y").read_bytes() == b"ours"


def test_ledger_unlinks_only_recorded_inodes_and_fails_closed(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.create(tmp_path, ("d", "ours.bin"), 10)
    (tmp_path / "d" / "theirs.bin").write_bytes(b"x")
    assert ledger.dirs == {("d",)}
    assert not ledger.unlink(tmp_path, ("d", "theirs.bin"))
    assert (tmp_path / "d" / "theirs.bin").exists()
    ledger.save(tmp_path)
    assert Ledger.load(tmp_path).files == ledger.files
    assert ledger.unlink(tmp_path, ("d", "ours.bin"))
    (tmp_path / "owned.json").write_text("{not json")
    assert Ledger.load(tmp_path).files == set()  # unreadable: owns nothing
    with pytest.raises(FileExistsError):
        ledger.create(tmp_path, ("d", "theirs.bin"), 1)
    assert (tmp_path / "d" / "theirs.bin").read_bytes() == b"x"
    assert os.path.isdir(tmp_path / "d")


def test_new_directories_are_fsynced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synced file is only reachable after a crash if every directory above it is durable."""
    synced: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    Ledger().create(tmp_path, ("a", "b", "f.bin"), 3)
    for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        assert d.stat().st_ino in synced, d
    from qbsync.destination.durable import mkdir_durable

    synced.clear()
    mkdir_durable(tmp_path / "x" / "y")
    assert {tmp_path.stat().st_ino, (tmp_path / "x").stat().st_ino} <= set(synced)


async def test_ledger_is_saved_once_per_init_not_per_file(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every .partial is created and recorded at init, in one save: the piece writes never
    rewrite the ledger (it grows with the number of files)."""
    saves = 0
    real = Ledger.save

    def counting(self: Ledger, meta_dir: Path) -> None:
        nonlocal saves
        saves += 1
        real(self, meta_dir)

    monkeypatch.setattr(Ledger, "save", counting)
    t = torrent(tmp_path, {f"f{i}.bin": 5_000 + i for i in range(20)})
    d = build(tmp_path, nursery)
    ready = await d.init(t)
    assert saves == 1
    for i in needed_indices(ready, t.num_pieces):
        assert await d.piece(t, i) == ErrorCode.OK
    assert saves == 1


def test_a_reused_inode_number_is_not_proof_of_ownership(tmp_path: Path) -> None:
    """Inode numbers are reused after a delete: a user's new file at our old name may get the
    number we recorded. The mark qbsync puts on files it creates is part of the proof."""
    ledger = Ledger()
    ledger.create(tmp_path, ("ours.bin",), 4)
    assert ledger.owns(tmp_path, ("ours.bin",))
    assert ledger.marked == ledger.files  # this filesystem has user xattrs
    (tmp_path / "ours.bin").unlink()  # deleted by someone else...
    theirs = tmp_path / "ours.bin"
    theirs.write_bytes(b"the user's file")  # ...and a new file at the name
    st = theirs.stat()
    ledger.files.add((st.st_dev, st.st_ino))  # as if the inode number had been reused
    ledger.marked.add((st.st_dev, st.st_ino))
    assert not ledger.owns(tmp_path, ("ours.bin",))
    assert not ledger.unlink(tmp_path, ("ours.bin",))
    with pytest.raises(ConflictError):
        ledger.rename(tmp_path, ("ours.bin",), ("other.bin",))
    assert theirs.read_bytes() == b"the user's file"
    ledger.save(tmp_path)
    assert Ledger.load(tmp_path).marked == ledger.marked
