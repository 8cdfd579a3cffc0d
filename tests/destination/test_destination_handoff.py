"""StartTorrent (the hand-off) checks, in process: the destination answers ``started=True``
only for a torrent it verified itself (``.finalized`` marker), whose files are all on disk at
their sizes, that qBittorrent reports whole, and that qBittorrent is then seen seeding.

The qBittorrent here is a recording fake (these are the pure decision rules); the same paths
run against a real qbittorrent-nox in tests/integration/test_source_handoff.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from qbsync.destination import server as server_module
from qbsync.wire import ErrorCode, Finalize, StartTorrent, SyncStatus, WireError
from tests.destination.test_destination_server import complete
from tests.destination.test_destination_writer import Dest, build, torrent
from tests.wireclient import LocalTorrent


class FakeQB:
    """Lists torrents with a state and progress; ``start`` moves them to ``after_start``."""

    def __init__(self, state: str = "stoppedUP", progress: float = 1.0) -> None:
        self.info: dict[str, dict[str, Any]] = {}
        self.state, self.progress = state, progress
        self.after_start = "stalledUP"
        self.calls: list[tuple[str, str]] = []

    def register(self, h: str) -> None:
        self.info[h] = {"hash": h, "state": self.state, "progress": self.progress}

    async def torrent(self, h: str) -> dict[str, Any] | None:
        return self.info.get(h)

    async def start(self, h: str) -> None:
        self.calls.append(("start", h))
        self.info[h]["state"] = self.after_start

    async def stop(self, h: str) -> None:
        self.calls.append(("stop", h))
        self.info[h]["state"] = "stoppedUP"

    async def add_tags(self, h: str, tags: list[str]) -> None:
        self.calls.append(("tag:" + ",".join(tags), h))

    async def delete(self, h: str, *, delete_files: bool) -> None:
        assert not delete_files  # qbsync never asks qBittorrent to delete data
        self.calls.append(("delete", h))
        self.info.pop(h, None)


def fake_qb(d: Dest, *hashes: str, state: str = "stoppedUP", progress: float = 1.0) -> FakeQB:
    """Give ``d``'s server a recording fake qBittorrent that lists ``hashes``."""
    qb = FakeQB(state, progress)
    for h in hashes:
        qb.register(h)
    d.server.qb = qb  # type: ignore[assignment]
    return qb


async def finalized(tmp_path: Path, nursery: trio.Nursery) -> tuple[LocalTorrent, Dest, FakeQB]:
    """A torrent synced and finalized by an in-process destination, listed by its fake qB."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    await complete(d, t)
    assert (await d.server.finalize(Finalize(t.info_hash))).status == SyncStatus.COMPLETE
    return t, d, fake_qb(d, t.info_hash)


async def refused(d: Any, h: str) -> WireError:
    with pytest.raises(WireError) as err:
        await d.server.start(StartTorrent(h, tag="source-removed"))
    return err.value


async def test_start_only_for_a_verified_complete_copy(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t, d, qb = await finalized(tmp_path, nursery)
    assert (await d.server.start(StartTorrent(t.info_hash, tag="source-removed"))).started
    assert qb.calls == [("start", t.info_hash), ("tag:source-removed", t.info_hash)]


async def test_start_refused_when_files_are_gone_although_qbittorrent_says_complete(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """qBittorrent shows a stopped torrent at progress 1.0 after its files were deleted: the
    destination looks at the files itself. Before the fix it started it (``started=True``)."""
    t, d, qb = await finalized(tmp_path, nursery)
    victim = next(p for p in (d.root / "payload").rglob("*") if p.stat().st_size)
    victim.unlink()
    err = await refused(d, t.info_hash)
    assert err.code == ErrorCode.NOT_FOUND and victim.name in err.message
    assert qb.calls == []  # nothing started
    # A truncated file is just as bad.
    victim.write_bytes(b"x")
    assert (await refused(d, t.info_hash)).code == ErrorCode.NOT_FOUND


async def test_start_refused_when_a_file_was_replaced_by_another_of_the_same_size(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Issue 15, finding 2: qBittorrent moved a user's file over the verified copy (same
    name, same size, other bytes). The marker recorded the verified file's own inode, so the
    hand-off is refused: ``started=True`` only for the bytes qbsync verified."""
    t, d, qb = await finalized(tmp_path, nursery)
    victim = next(p for p in (d.root / "payload").rglob("*") if p.stat().st_size)
    users = victim.with_name("users-file")
    users.write_bytes(b"u" * victim.stat().st_size)
    users.replace(victim)
    err = await refused(d, t.info_hash)
    assert err.code == ErrorCode.NOT_FOUND and "replaced" in err.message
    assert qb.calls == []


async def test_start_refused_for_a_torrent_qbsync_never_verified(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Any torrent the destination qBittorrent lists used to be started and tagged."""
    d = build(tmp_path, nursery)
    foreign = "cd" * 20
    qb = fake_qb(d, foreign)
    assert (await refused(d, foreign)).code == ErrorCode.NOT_FOUND
    assert qb.calls == []


async def test_start_refused_unless_qbittorrent_reports_whole_then_seeding(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "START_CONFIRM_TIMEOUT", 0.3)  # keep the test short
    t, d, qb = await finalized(tmp_path, nursery)
    h = t.info_hash
    qb.info[h]["progress"] = 0.5
    assert (await refused(d, h)).code == ErrorCode.VERIFY_FAILED
    qb.info[h]["progress"] = 1.0
    qb.info[h]["state"] = "missingFiles"
    assert (await refused(d, h)).code == ErrorCode.NOT_FOUND
    assert qb.calls == []
    # Started, but qBittorrent finds the files missing: stopped again and refused.
    qb.info[h]["state"] = "stoppedUP"
    qb.after_start = "missingFiles"
    assert (await refused(d, h)).code == ErrorCode.NOT_FOUND
    assert qb.calls == [("start", h), ("stop", h)]
    # Started, never seeding: refused after the confirmation window, stopped again.
    qb.calls.clear()
    qb.after_start = "checkingUP"
    assert (await refused(d, h)).code == ErrorCode.VERIFY_FAILED
    assert qb.calls == [("start", h), ("stop", h)]


async def test_dry_run_start_answers_not_started(tmp_path: Path, nursery: trio.Nursery) -> None:
    t, d, qb = await finalized(tmp_path, nursery)
    d.server.dry_run = True
    assert not (await d.server.start(StartTorrent(t.info_hash))).started
    assert qb.calls == []


async def test_a_handed_off_torrent_is_never_resynced(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Issue 15: after ``started=True`` the source may delete its copy, so the torrent and its
    files belong to the destination qBittorrent alone. A resync (which would remove qbsync's
    entry and stop the last copy seeding) is refused with ``conflict``; nothing is removed."""
    t, d, qb = await finalized(tmp_path, nursery)
    assert (await d.server.start(StartTorrent(t.info_hash))).started
    before = list(qb.calls)
    on_disk = {rel: (d.root / rel).read_bytes() for rel, _ in t.files}
    with pytest.raises(WireError) as err:
        await d.server.init(t.init_msg(resync=True))
    assert err.value.code == ErrorCode.CONFLICT
    assert qb.calls == before and t.info_hash in qb.info  # the entry is still there
    assert {rel: (d.root / rel).read_bytes() for rel, _ in t.files} == on_disk
    # Asked again (the source's cache pruning), the hand-off is still answered the same.
    assert (await d.server.start(StartTorrent(t.info_hash))).started
