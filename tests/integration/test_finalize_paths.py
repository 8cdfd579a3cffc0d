"""The three ways a torrent finalizes into a real destination qBittorrent.

* every file selected, no ``--recheck``: presence and size checked, added with skip-checking,
  complete in qBittorrent without a recheck;
* ``--recheck``: qBittorrent rechecks every byte (and so finds damage done on disk after the
  write);
* a partial selection: always rechecked.

Each ends byte-identical, tagged ``synced``, stopped and complete in qBittorrent, and seeds
after the hand-off (StartTorrent). Which path ran is read from the destination's log events.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import trio

from qbsync.wire import ErrorCode, SyncStatus, WireError
from tests.diskedit import flip_byte
from tests.integration.conftest import QbDestinationFactory, qb_info
from tests.qbharness import KiB, QBInstance, wait_until
from tests.wireclient import Destination, LocalTorrent, needed_indices

pytestmark = pytest.mark.integration

FILES = {"a.bin": 700_000, "sub/b.bin": 1_300_000, "empty.bin": 0, "z/last.bin": 333_333}


def _log(dest: Destination) -> str:
    return dest.proc.log_text()


def _identical(t: LocalTorrent, data: Path, skip: tuple[str, ...] = ()) -> None:
    for rel, _ in t.files:
        if rel in skip:
            continue
        assert filecmp.cmp(t.base / rel, data / rel, shallow=False), rel
    assert not list(data.rglob("*.partial"))


async def _seeding_ready(qb: QBInstance, t: LocalTorrent, dest: Destination) -> None:
    """Complete and stopped in qBittorrent, tagged synced, every piece present; seeds after
    the hand-off."""
    info = qb_info(qb, t.info_hash)
    assert info.progress == 1
    assert info.state in ("pausedUP", "stoppedUP"), info.state
    assert "synced" in {x.strip() for x in info.tags.split(",")}
    assert {int(s) for s in qb.api.torrents_piece_states(torrent_hash=t.info_hash)} == {2}
    async with dest.client() as client:
        assert (await client.start(t)).started
    await trio.to_thread.run_sync(lambda: qb.wait_seeding(t.info_hash, timeout=120))


async def test_full_selection_skips_the_recheck_and_is_seeding_ready(
    qb_destination: QbDestinationFactory,
) -> None:
    qb, t, data, dest = qb_destination(FILES, seed=11)
    async with dest.client() as client:
        result = await client.sync(t, order="shuffle")
        assert result.status == SyncStatus.COMPLETE
    _identical(t, data)
    log = _log(dest)
    assert f"event=qb_added hash={t.info_hash}" in log
    assert "skip_checking=true" in log
    assert f"event=qb_seeding_ready hash={t.info_hash}" in log
    assert "event=qb_verified" not in log  # no recheck was waited for
    await _seeding_ready(qb, t, dest)
    _identical(t, data)


async def test_full_selection_with_a_file_gone_is_re_requested_not_skipped(
    qb_destination: QbDestinationFactory,
) -> None:
    """The fast path checks every file's presence and size first: a finished file removed
    before the finalize is asked for again instead of being added as complete."""
    qb, t, data, dest = qb_destination({"a.bin": 400_000, "b.bin": 300_000})
    target = data / "payload" / "b.bin"
    async with dest.client() as client:
        ready = await client.init_ready(t)
        await client.send(t, needed_indices(ready, t.num_pieces))
        await trio.to_thread.run_sync(
            lambda: wait_until(target.exists, 120, 0.05, "b.bin renamed from .partial")
        )
        target.unlink()  # the test's own copy of data the source still has
        with pytest.raises(WireError) as err:
            await client.finalize(t)
        assert err.value.code == ErrorCode.INCOMPLETE
        assert "size check" in err.value.message
        again = await client.init_ready(t)
        first_b = 400_000 // (64 * KiB)
        assert needed_indices(again, t.num_pieces) == list(range(first_b, t.num_pieces))
        await client.send(t, needed_indices(again, t.num_pieces))
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    assert "event=finalize_files_changed" in _log(dest)
    _identical(t, data)
    await _seeding_ready(qb, t, dest)


async def test_recheck_flag_keeps_the_full_recheck(qb_destination: QbDestinationFactory) -> None:
    qb, t, data, dest = qb_destination(FILES, seed=12, extra=["--recheck"])
    async with dest.client() as client:
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
    _identical(t, data)
    log = _log(dest)
    assert "skip_checking=false" in log
    assert f"event=qb_verified hash={t.info_hash}" in log
    assert "event=qb_seeding_ready" not in log
    await _seeding_ready(qb, t, dest)


async def test_recheck_from_environment_finds_damage_done_after_the_write(
    qb_destination: QbDestinationFactory,
) -> None:
    """With QBSYNC_DESTINATION_RECHECK, qBittorrent's recheck is a second opinion: a byte
    damaged on disk after its piece was verified and written is found and re-requested."""
    qb, t, data, dest = qb_destination(
        {"a.bin": 400_000, "b.bin": 300_000}, env={"QBSYNC_DESTINATION_RECHECK": "1"}
    )
    target = data / "payload" / "a.bin"
    async with dest.client() as client:
        ready = await client.init_ready(t)
        await client.send(t, needed_indices(ready, t.num_pieces))
        await trio.to_thread.run_sync(lambda: wait_until(target.exists, 120, 0.05, "a.bin"))
        await trio.to_thread.run_sync(flip_byte, target, 2 * 64 * KiB + 5)
        with pytest.raises(WireError) as err:
            await client.finalize(t)
        assert err.value.code == ErrorCode.INCOMPLETE
        again = await client.init_ready(t)
        assert needed_indices(again, t.num_pieces) == [2]
        await client.send(t, [2])
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    _identical(t, data)
    await _seeding_ready(qb, t, dest)


async def test_partial_selection_is_rechecked_and_ends_complete_for_its_files(
    qb_destination: QbDestinationFactory,
) -> None:
    # Piece-aligned files so the deselected one shares no piece with a selected one.
    piece = 64 * KiB
    layout = {"a.bin": 4 * piece, "b.bin": 3 * piece, "c.bin": 2 * piece + 999}
    qb, t, data, dest = qb_destination(layout, seed=13, piece=piece)
    names = [rel for rel, _ in t.files]
    deselected = [names.index("payload/b.bin")]
    selected = [i not in deselected for i in range(len(names))]
    async with dest.client() as client:
        ready = await client.init_ready(t, selected=selected)
        needed = needed_indices(ready, t.num_pieces)
        acks = await client.send(t, needed, deselected=deselected)
        assert {a.code for a in acks.values()} == {ErrorCode.OK}
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    assert not (data / "payload" / "b.bin").exists()
    _identical(t, data, skip=("payload/b.bin",))
    log = _log(dest)
    assert "skip_checking=false" in log
    assert f"event=qb_verified hash={t.info_hash}" in log
    files = qb.api.torrents_files(torrent_hash=t.info_hash)
    assert [f.priority for f in files] == [1, 0, 1]
    states = qb.api.torrents_piece_states(torrent_hash=t.info_hash)
    for i in range(t.num_pieces):
        assert (int(states[i]) == 2) == (not set(t.piece_files(i)) & set(deselected)), i
    info = qb_info(qb, t.info_hash)
    assert "synced" in info.tags
    assert info.state in ("pausedUP", "stoppedUP"), info.state  # complete for its selection
    async with dest.client() as client:
        assert (await client.start(t)).started
    await trio.to_thread.run_sync(lambda: qb.wait_seeding(t.info_hash, timeout=120))
