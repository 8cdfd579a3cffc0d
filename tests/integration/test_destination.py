"""The destination end to end with a real destination qBittorrent.

A test client (tests/wireclient.py) plays the source: it reads pieces from a generated payload
and speaks the wire protocol to a real ``qbsync destination`` process, which writes the data
and finalizes it into a real ``qbittorrent-nox``.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import trio

from qbsync.wire import ErrorCode, SyncStatus, WireError
from tests.diskedit import flip_byte
from tests.integration.conftest import QbDestinationFactory, qb_info
from tests.qbharness import KiB, wait_until
from tests.wireclient import LocalTorrent, needed_indices, start_destination

pytestmark = pytest.mark.integration

FILES = {
    "a.bin": 700_000,
    "sub/b.bin": 1_300_000,
    "empty.bin": 0,
    "d.bin": 90_001,
    "z/last.bin": 333_333,
}


def _same(t: LocalTorrent, data: Path, rel: str) -> bool:
    return filecmp.cmp(t.base / rel, data / rel, shallow=False)


async def test_multifile_out_of_order_ends_verified_tagged_identical(
    qb_destination: QbDestinationFactory,
) -> None:
    qb, t, data, dest = qb_destination(FILES, seed=1)

    async with dest.client() as client:
        ready = await client.init_ready(t, sub="movies")
        assert ready.status == SyncStatus.READY
        assert ready.pieces_needed_count == t.num_pieces
        acks = await client.send(t, needed_indices(ready, t.num_pieces), order="shuffle")
        assert {a.code for a in acks.values()} == {ErrorCode.OK}
        again = await client.init(t, sub="movies")
        assert again.pieces_needed_count == 0
        result = await client.finalize(t, category="films", tags=["from-src", "hd"])
        assert result.status == SyncStatus.COMPLETE
        # Polling again after success stays COMPLETE; so does Init.
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
        assert (await client.init(t, sub="movies")).status == SyncStatus.COMPLETE

    root = data / "movies"
    for rel, _ in t.files:
        assert (root / rel).is_file(), rel
        assert _same(t, root, rel), rel
    assert not list(root.rglob("*.partial"))
    marker = data / ".qbsync" / t.info_hash / ".finalized"
    assert marker.is_file()
    assert sorted(p.name for p in marker.parent.iterdir()) == [".finalized", "owned.json"]

    info = qb_info(qb, t.info_hash)
    assert info.progress == 1
    assert info.state in ("pausedUP", "stoppedUP"), info.state  # stays stopped until hand-off
    assert {"synced", "from-src", "hd"} <= {x.strip() for x in info.tags.split(",")}
    assert info.category == "films"
    assert Path(info.save_path) == root
    assert {int(s) for s in qb.api.torrents_piece_states(torrent_hash=t.info_hash)} == {2}

    # Hand-off: StartTorrent starts seeding on the destination and applies the tag.
    async with dest.client() as client:
        started = await client.start(t, tag="source-removed")
        assert started.started
    await trio.to_thread.run_sync(lambda: qb.wait_seeding(t.info_hash, timeout=120))
    info = qb_info(qb, t.info_hash)
    assert "source-removed" in info.tags


async def test_partial_selection_selected_files_verified_priorities_persist(
    qb_destination: QbDestinationFactory,
) -> None:
    qb, t, data, dest = qb_destination(FILES, seed=2)
    names = [rel for rel, _ in t.files]
    # d.bin starts and ends inside pieces: two boundary pieces it shares with its neighbours.
    deselected = [names.index("payload/d.bin")]
    selected = [i not in deselected for i in range(len(names))]

    async with dest.client() as client:
        ready = await client.init_ready(t, selected=selected)
        needed = needed_indices(ready, t.num_pieces)
        d_only = [i for i in range(t.num_pieces) if set(t.piece_files(i)) <= set(deselected)]
        assert d_only == [] or not set(d_only) & set(needed)
        acks = await client.send(t, needed, order="shuffle", deselected=deselected)
        assert {a.code for a in acks.values()} == {ErrorCode.OK}
        result = await client.finalize(t)
        assert result.status == SyncStatus.COMPLETE
        assert "boundary" in result.message

    for i, (rel, _) in enumerate(t.files):
        if i in deselected:
            assert not (data / rel).exists()
            assert not (data / (rel + ".partial")).exists()
        else:
            assert _same(t, data, rel), rel
    files = qb.api.torrents_files(torrent_hash=t.info_hash)
    assert [f.priority for f in files] == [0 if i in deselected else 1 for i in range(len(files))]
    states = qb.api.torrents_piece_states(torrent_hash=t.info_hash)
    for i in range(t.num_pieces):
        if not set(t.piece_files(i)) & set(deselected):
            assert int(states[i]) == 2, i
    info = qb_info(qb, t.info_hash)
    assert "synced" in info.tags
    assert info.state in ("pausedDL", "stoppedDL", "pausedUP", "stoppedUP"), info.state


async def test_corrupt_data_on_disk_found_by_recheck_is_re_requested(
    qb_destination: QbDestinationFactory,
) -> None:
    """With ``--recheck``, qBittorrent's recheck is the final judge: a piece damaged on disk
    after it was written is cleared and asked for again (``incomplete``), then the torrent
    finalizes. The source's copy of qbsync's own tags (a re-syncing source torrent still
    carries ``synced``) is never copied: ``synced`` shows only once the recheck passed,
    ``source-removed`` only on a hand-off. Before the fix both were copied at the add, before
    any check."""
    qb, t, data, dest = qb_destination({"a.bin": 400_000, "b.bin": 300_000}, extra=["--recheck"])
    async with dest.client() as client:
        ready = await client.init_ready(t)
        await client.send(t, needed_indices(ready, t.num_pieces))
        # a.bin is complete and renamed by now; damage one byte of its piece 2.
        target = data / "payload" / "a.bin"
        await trio.to_thread.run_sync(lambda: _wait_file(target))
        await trio.to_thread.run_sync(flip_byte, target, 2 * 64 * KiB + 5)
        own = ["synced", "source-removed", "mine"]
        with pytest.raises(WireError) as err:
            await client.finalize(t, tags=own)
        assert err.value.code == ErrorCode.INCOMPLETE
        tags = {x.strip() for x in qb_info(qb, t.info_hash).tags.split(",") if x.strip()}
        assert tags == {"mine"}  # the recheck failed: not synced
        again = await client.init_ready(t)
        assert needed_indices(again, t.num_pieces) == [2]
        await client.send(t, [2])
        assert (await client.finalize(t, tags=own)).status == SyncStatus.COMPLETE
    assert _same(t, data, "payload/a.bin")
    assert qb_info(qb, t.info_hash).progress == 1
    tags = {x.strip() for x in qb_info(qb, t.info_hash).tags.split(",") if x.strip()}
    assert tags == {"mine", "synced"}


def _wait_file(path: Path) -> None:
    from tests.qbharness import wait_until

    wait_until(path.exists, 120, 0.05, f"{path} renamed from .partial")


async def test_readiness_follows_qbittorrent_but_liveness_does_not(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    qb = qb_factory("dst")
    dest = start_destination(qbsync_factory, tmp_path / "data", qb_args=qb.qbsync_args())
    assert dest.http("/readyz")[0] == 200
    assert dest.http("/livez")[0] == 200
    qb.stop()

    def not_ready() -> bool:
        return dest.http("/readyz")[0] == 503

    await trio.to_thread.run_sync(lambda: wait_until(not_ready, 120, 0.2, "readyz 503"))
    assert dest.http("/livez")[0] == 200
    assert dest.http("/healthz")[0] == 200
    status, body = dest.http("/status")
    assert status == 200 and b'"role": "destination"' in body
    qb.start()
    await trio.to_thread.run_sync(
        lambda: wait_until(lambda: dest.http("/readyz")[0] == 200, 120, 0.2, "readyz 200")
    )


async def test_source_names_differing_from_the_torrent_are_renamed_in_qbittorrent(
    qb_destination: QbDestinationFactory,
) -> None:
    """A source that added the torrent without its root folder ("NoSubfolder") or renamed a
    file sends qBittorrent's names; the destination lays the files out that way and renames
    them in its qBittorrent so the recheck finds them."""
    qb, t, data, dest = qb_destination({"a.bin": 300_000, "s/b.bin": 200_000})
    names = [rel.split("/", 1)[1] for rel, _ in t.files]  # no root folder
    names[1] = "s/renamed.bin"
    async with dest.client() as client:
        ready = await client.init_ready(t, names=names, sub="tv")
        await client.send(t, needed_indices(ready, t.num_pieces))
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    for (rel, _), name in zip(t.files, names, strict=True):
        assert filecmp.cmp(t.base / rel, data / "tv" / name, shallow=False)
    files = qb.api.torrents_files(torrent_hash=t.info_hash)
    assert sorted(f.name for f in files) == sorted(names)
    assert qb_info(qb, t.info_hash).progress == 1
