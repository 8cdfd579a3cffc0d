"""Finding 2 of issue 15, with real processes and a real destination qBittorrent: a peer that
holds valid credentials cannot make qBittorrent move, replace or pull in a user's file, cannot
take a user's own qBittorrent entry, and cannot delete a finalized torrent's files.

Each case ends with every user file unchanged (same bytes, same inode), the user's entry in
qBittorrent unchanged, and no hand-off answered ``started=True``.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import trio

from qbsync.wire import ErrorCode, SyncStatus, WireError
from tests.qbharness import KiB, QBInstance, make_payload
from tests.wireclient import Destination, LocalTorrent, needed_indices, start_destination

pytestmark = pytest.mark.integration

PIECE = 64 * KiB


def _fingerprint(path: Path) -> tuple[int, int, bytes]:
    st = path.lstat()
    return st.st_dev, st.st_ino, path.read_bytes()


async def _push(dest: Destination, t: LocalTorrent, names: list[str]) -> None:
    """Init with ``names`` as the ``files`` paths and send every needed piece."""
    async with dest.client() as client:
        ready = await client.init_ready(t, names=names)
        acks = await client.send(t, needed_indices(ready, t.num_pieces))
        assert all(a.ok for a in acks.values()), acks


async def _finalize_is_refused(dest: Destination, t: LocalTorrent) -> WireError:
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.finalize(t)
    return err.value


async def _no_handoff(dest: Destination, t: LocalTorrent) -> None:
    """StartTorrent is refused (an error) or answered ``started=False``: never ``True``."""
    async with dest.client() as client:
        try:
            result = await client.start(t)
        except WireError:
            return
        assert not result.started


async def _refused_leaving_alone(
    qb: QBInstance,
    dest: Destination,
    t: LocalTorrent,
    names: list[str],
    named: str,
    user_file: Path,
    before: tuple[int, int, bytes],
) -> None:
    """Pushed with ``names`` as its ``files`` paths, ``t``'s finalize is refused as a conflict
    naming ``named``; ``user_file`` keeps its fingerprint ``before`` (also after a hand-off
    attempt), qBittorrent never gets the torrent, and no hand-off is answered ``True``."""
    await _push(dest, t, names)
    err = await _finalize_is_refused(dest, t)
    assert err.code == ErrorCode.CONFLICT and named in err.message
    assert _fingerprint(user_file) == before
    assert qb.info(t.info_hash) is None
    await _no_handoff(dest, t)
    assert _fingerprint(user_file) == before


async def test_a_user_file_at_the_metainfo_path_is_never_moved(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    """The metainfo names ``payload/victim.bin``, the ``files`` list ``moved/victim.bin``:
    qBittorrent would move the user's file at the metainfo path over the verified copy."""
    qb = qb_factory("dst")
    t = LocalTorrent.create(
        make_payload(tmp_path / "src" / "payload", {"a.bin": 200_000, "victim.bin": 150_000}, 1),
        PIECE,
    )
    data = tmp_path / "data"
    victim = data / "payload" / "victim.bin"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"the user's own file" * 100)
    before = _fingerprint(victim)
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args())
    await _refused_leaving_alone(
        qb, dest, t, ["payload/a.bin", "moved/victim.bin"], "payload/victim.bin", victim, before
    )
    assert "event=qb_file_renamed" not in dest.proc.log_text()  # nothing added: nothing moved


async def test_a_user_file_at_the_files_path_is_never_replaced(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    """The user's ``known/x.bin`` holds exactly the torrent's bytes, and the ``files`` list
    names it while the metainfo says ``payload/x.bin``: the file is adopted (read only), but
    qBittorrent would be asked to rename onto it, so the finalize is refused."""
    qb = qb_factory("dst")
    payload = make_payload(tmp_path / "src" / "payload", {"x.bin": 4 * PIECE, "y.bin": 70_000}, 2)
    t = LocalTorrent.create(payload, PIECE)
    data = tmp_path / "data"
    known = data / "known" / "x.bin"
    known.parent.mkdir(parents=True)
    known.write_bytes((payload / "x.bin").read_bytes())
    before = _fingerprint(known)
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args())
    await _refused_leaving_alone(
        qb, dest, t, ["known/x.bin", "payload/y.bin"], "known/x.bin", known, before
    )


async def test_a_user_symlink_to_a_directory_outside_data_is_never_followed(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    """The metainfo names ``payload/escape/pulled.bin`` where ``payload/escape`` is a user's
    symlink to a directory outside ``--data``: qBittorrent would pull that file in."""
    qb = qb_factory("dst")
    payload = make_payload(
        tmp_path / "src" / "payload", {"a.bin": 100_000, "escape/pulled.bin": 90_000}, 3
    )
    t = LocalTorrent.create(payload, PIECE)
    data = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    pulled = outside / "pulled.bin"
    pulled.write_bytes(b"outside --data" * 1000)
    before = _fingerprint(pulled)
    (data / "payload").mkdir(parents=True)
    (data / "payload" / "escape").symlink_to(outside, target_is_directory=True)
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args())
    await _refused_leaving_alone(
        qb, dest, t, ["spx/a.bin", "spx/escape/pulled.bin"], "payload/escape", pulled, before
    )
    assert sorted(p.name for p in outside.iterdir()) == ["pulled.bin"]
    assert (data / "payload" / "escape").is_symlink()


async def test_a_users_own_qbittorrent_entry_survives_init_resync_and_finalize(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    """The user added the torrent to the destination qBittorrent (it is downloading, from
    nobody). An InitTorrent, an ``InitTorrent(resync=True)`` and a Finalize leave that entry
    alone: qbsync did not add it, so it is never removed, stopped, rechecked or renamed."""
    qb = qb_factory("dst")
    t = LocalTorrent.create(
        make_payload(tmp_path / "src" / "payload", {"a.bin": 200_000, "b.bin": 100_000}, 4),
        PIECE,
    )
    data = tmp_path / "data"
    users = tmp_path / "users-downloads"
    assert (
        qb.api.torrents_add(
            torrent_files={"t.torrent": t.torrent}, save_path=str(users), tags=["mine"]
        )
        == "Ok."
    )
    await trio.to_thread.run_sync(lambda: _wait_listed(qb, t.info_hash))
    before = qb.info(t.info_hash)
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args())
    async with dest.client() as client:
        first = await client.init_ready(t)
        assert first.status == SyncStatus.READY
        again = await client.init_ready(t, resync=True)
        assert again.status == SyncStatus.READY
        await client.send(t, needed_indices(again, t.num_pieces))
        with pytest.raises(WireError) as err:
            await client.finalize(t)
        assert err.value.code == ErrorCode.CONFLICT
    after = qb.info(t.info_hash)
    assert after is not None, "the user's qBittorrent entry was removed"
    assert after.save_path.rstrip("/") == before.save_path.rstrip("/") == str(users)
    assert "mine" in after.tags and "synced" not in after.tags
    log = dest.proc.log_text()
    assert "event=qb_deleted_for_resync" not in log
    assert "event=qb_entry_kept" in log
    await _no_handoff(dest, t)
    assert qb.info(t.info_hash) is not None


async def test_a_finalized_torrent_survives_resync_and_abort(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    """Finding 1/2: after a finalize no request deletes, truncates or renames the files:
    ``InitTorrent(resync=True)`` then ``Abort(delete_files=True)`` leave them byte-for-byte
    and inode-for-inode in place; a damaged finalized file makes a resync answer ``conflict``
    (it is never renamed to ``.partial`` and rewritten). After a hand-off, a resync is refused
    outright: the torrent belongs to the destination qBittorrent (its entry stays)."""
    qb = qb_factory("dst")
    t = LocalTorrent.create(
        make_payload(tmp_path / "src" / "payload", {"a.bin": 300_000, "b.bin": 100_000}, 5),
        PIECE,
    )
    handed = LocalTorrent.create(
        make_payload(tmp_path / "src" / "handed", {"c.bin": 200_000}, 6), PIECE
    )
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args())
    async with dest.client() as client:
        assert (await client.sync(handed)).status == SyncStatus.COMPLETE
        assert (await client.start(handed)).started
        handed_files = {data / rel: _fingerprint(data / rel) for rel, _ in handed.files}
        with pytest.raises(WireError) as refused:
            await client.init_ready(handed, resync=True)
        assert refused.value.code == ErrorCode.CONFLICT
        assert not (await client.abort(handed, delete_files=True)).existed
    assert {p: _fingerprint(p) for p in handed_files} == handed_files
    assert qb.info(handed.info_hash) is not None  # still the destination qBittorrent's
    async with dest.client() as client:
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
    files = [data / rel for rel, _ in t.files]
    before = {p: _fingerprint(p) for p in files}
    async with dest.client() as client:
        assert not (await client.abort(t)).existed  # finalized: forgotten, nothing deleted
        resync = await client.init_ready(t, resync=True)
        assert resync.status == SyncStatus.READY and needed_indices(resync, t.num_pieces) == []
        await client.abort(t, delete_files=True)
    assert {p: _fingerprint(p) for p in files} == before
    # Damage a finalized file (as a disk error or a user would): a resync must not repair it
    # in place — that would rename the only copy to .partial first.
    async with dest.client() as client:
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
        _damage(files[0], 70_000)
        damaged = _fingerprint(files[0])
        with pytest.raises(WireError) as err:
            await client.init_ready(t, resync=True)
        assert err.value.code == ErrorCode.CONFLICT
        await client.abort(t, delete_files=True)
    assert _fingerprint(files[0]) == damaged
    assert _fingerprint(files[1]) == before[files[1]]
    assert not list(data.rglob("*.partial"))
    assert all(p.is_file() for p in files)
    assert filecmp.cmp(t.base / t.files[1][0], files[1], shallow=False)


def _wait_listed(qb, info_hash: str) -> None:
    from tests.qbharness import wait_until

    wait_until(lambda: qb.info(info_hash), 10, 0.05, "qBittorrent lists the user's torrent")


def _damage(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 8)
