"""Validate, then act: a request that is refused changes nothing, and Resync / Abort /
StartTorrent act only on hashes qbsync has state or a ``.finalized`` marker for."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from qbsync.destination.state import FINALIZED_NAME
from qbsync.wire import Abort, ErrorCode, StartTorrent, SyncStatus, WireError
from tests.destination.test_destination_handoff import fake_qb, finalized
from tests.destination.test_destination_writer import build, torrent


async def test_bogus_resync_of_a_finalized_torrent_changes_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Before the fix ``InitTorrent(resync=True)`` wiped the marker and removed the torrent
    from the destination qBittorrent before the request was validated."""
    t, d, qb = await finalized(tmp_path, nursery)
    marker = d.root / ".qbsync" / t.info_hash / FINALIZED_NAME
    for bad in (
        t.init_msg(resync=True, torrent=b"d4:infoi1ee"),  # not a torrent
        t.init_msg(resync=True, names=["../escape", *[r for r, _ in t.files][1:]]),
    ):
        with pytest.raises(WireError) as err:
            await d.server.init(bad)
        assert err.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNSAFE_PATH)
        assert marker.is_file()
        assert qb.calls == []
    assert (await d.server.init(t.init_msg())).status == SyncStatus.COMPLETE


async def test_resync_of_a_torrent_qbsync_never_managed_leaves_qbittorrent_alone(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    # the user's own torrent in the destination qBittorrent
    qb = fake_qb(d, t.info_hash, state="downloading", progress=0.3)
    result = await d.init(t, resync=True)
    assert result.status == SyncStatus.READY
    assert ("delete", t.info_hash) not in qb.calls


async def test_abort_and_start_of_unknown_hashes_do_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    d = build(tmp_path, nursery)
    h = "ef" * 20
    qb = fake_qb(d, h)
    assert not (await d.server.abort(Abort(h, delete_files=True))).existed
    with pytest.raises(WireError) as err:
        await d.server.start(StartTorrent(h, tag="x"))
    assert err.value.code == ErrorCode.NOT_FOUND
    assert qb.calls == []
    assert not (d.root / ".qbsync" / h).exists()
