"""Finding 3 of issue 15, with real destination processes: a state tree that cannot be planted.

A state directory that is a symlink, belongs to another user or can be written by strangers
stops the daemon at startup (exit 2, one error line) before anything is touched; a planted
``owned.json`` or ``<hash>`` symlink is ignored (nothing outside ``--data`` and no user file
is changed); an earlier version's state is adopted once without losing a finalized torrent;
``--state-dir`` moves the whole tree out of ``--data``; directories are 0700 and files 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qbsync.destination import statetree
from qbsync.wire import ErrorCode, SyncStatus, WireError
from tests.qbharness import KiB, make_payload
from tests.wireclient import Destination, LocalTorrent, start_destination

pytestmark = pytest.mark.integration

FILES = {"a.bin": 200_000, "b.bin": 70_000}


def _torrent(tmp_path: Path, seed: int = 0) -> LocalTorrent:
    return LocalTorrent.create(make_payload(tmp_path / "src" / "payload", FILES, seed), 64 * KiB)


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(directory)): (p.lstat().st_ino, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _refused(qbsync_factory, data: Path, extra: list[str] | None = None) -> str:
    """Start a destination that must refuse to start: exit 2 and one error line naming why."""
    dest = start_destination(qbsync_factory, data, extra=extra or [], wait=False)
    assert dest.proc.wait(timeout=30) == 2
    text = dest.proc.log_text()
    errors = [line for line in text.splitlines() if "level=error" in line]
    assert len(errors) == 1, text
    assert "event=state_dir_refused" in errors[0]
    assert "event=destination_ready" not in text
    return errors[0]


def test_a_symlinked_state_dir_is_refused_and_nothing_outside_is_touched(
    tmp_path: Path, qbsync_factory
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "outside"
    (outside / ("ab" * 20)).mkdir(parents=True)
    (outside / ("ab" * 20) / "keep.txt").write_text("not qbsync's")
    before = _snapshot(outside)
    (data / ".qbsync").symlink_to(outside, target_is_directory=True)
    line = _refused(qbsync_factory, data)
    assert "symlink" in line
    assert _snapshot(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["ab" * 20]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path, qbsync_factory) -> None:
    data = tmp_path / "data"
    state = data / ".qbsync"
    state.mkdir(parents=True)
    os.chown(state, 12345, 12345)
    line = _refused(qbsync_factory, data)
    assert "owned by uid 12345" in line
    assert os.listdir(state) == []


def test_group_rule_others_and_foreign_groups_refused_own_group_accepted(
    tmp_path: Path, qbsync_factory
) -> None:
    """o+w is always refused; g+w only when the group is one the daemon runs in (the
    Kubernetes fsGroup case: the kubelet gives the volume to the pod's own group)."""
    data = tmp_path / "data"
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    assert "writable by others" in _refused(qbsync_factory, data, ["--state-dir", str(state)])
    if os.geteuid() == 0:
        foreign_gid = 54321
        assert foreign_gid not in {os.getegid(), *os.getgroups()}
        os.chown(state, os.geteuid(), foreign_gid)
        state.chmod(0o2770)
        line = _refused(qbsync_factory, data, ["--state-dir", str(state)])
        assert f"group {foreign_gid}" in line
    os.chown(state, os.geteuid(), os.getegid())
    state.chmod(0o2770)  # what the kubelet makes of an fsGroup volume
    dest = start_destination(qbsync_factory, data, extra=["--state-dir", str(state)])
    assert dest.proc.stop() == 0
    assert state.stat().st_mode & 0o7777 == 0o2770  # left as the operator (kubelet) set it
    key = state / statetree.KEY_NAME
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o660)  # the kubelet's fsGroup pass at the next pod start
    dest = start_destination(qbsync_factory, data, extra=["--state-dir", str(state)])
    assert dest.proc.stop() == 0
    key.chmod(0o604)  # readable by others: the key would be no secret
    assert "state-key" in _refused(qbsync_factory, data, ["--state-dir", str(state)])


async def test_a_planted_ledger_is_ignored_and_the_user_file_untouched(
    tmp_path: Path, qbsync_factory
) -> None:
    """An ``owned.json`` written by someone else (here: with the right owner, so only its
    missing authentication tag gives it away) listing a user's file: the file stays foreign
    (refused with ``conflict``, never renamed to ``.partial``), and Abort deletes nothing."""
    t = _torrent(tmp_path)
    data = tmp_path / "data"
    user = data / "payload" / "a.bin"
    user.parent.mkdir(parents=True)
    user.write_bytes(b"\x01" * FILES["a.bin"])  # right size, not the torrent's bytes
    before = _snapshot(data / "payload")
    (data / ".qbsync").mkdir(mode=0o700)  # the daemon's tree, from an earlier run
    dest = start_destination(qbsync_factory, data)
    mdir = data / ".qbsync" / t.info_hash
    mdir.mkdir()
    st = user.stat()
    (mdir / "owned.json").write_text(
        json.dumps({"files": [[st.st_dev, st.st_ino]], "marked": [], "dirs": ["payload"]})
    )
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.init_ready(t)
        assert err.value.code == ErrorCode.CONFLICT and "payload/a.bin" in err.value.message
        await client.abort(t, delete_files=True)
    assert _snapshot(data / "payload") == before
    log = dest.proc.log_text()
    assert "event=state_file_ignored" in log and "file=owned.json" in log
    assert "event=existing_file_demoted" not in log


async def test_a_planted_hash_symlink_never_leads_outside(tmp_path: Path, qbsync_factory) -> None:
    """``<state>/<hash>`` planted as a symlink to a directory outside ``--data``: an
    ordinary InitTorrent used to empty that directory. Now the init fails (``io``) and the
    directory is untouched."""
    t = _torrent(tmp_path)
    data = tmp_path / "data"
    (data / ".qbsync").mkdir(parents=True, mode=0o700)  # the daemon's tree
    dest = start_destination(qbsync_factory, data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("someone's")
    (outside / "meta.json").write_text("{}")
    before = _snapshot(outside)
    (data / ".qbsync" / t.info_hash).symlink_to(outside, target_is_directory=True)
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.init_ready(t)
        assert err.value.code == ErrorCode.IO
        await client.abort(t, delete_files=True)
    assert _snapshot(outside) == before
    assert dest.proc.returncode is None  # still serving


async def test_an_earlier_versions_state_is_adopted_once_keeping_finalized_torrents(
    tmp_path: Path, qbsync_factory
) -> None:
    """State written before authentication tags (no ``.state-key``, no tags, 0755/0644):
    the first start adopts it (``event=state_adopted``), the finalized torrent is still
    finalized (Init answers COMPLETE, nothing is asked for), and modes become 0700/0600."""
    t = _torrent(tmp_path)
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
    assert dest.proc.stop() == 0
    state = data / ".qbsync"
    _make_legacy(state)
    dest = start_destination(qbsync_factory, data)
    assert f"event=state_adopted dir={t.info_hash}" in dest.proc.log_text()
    async with dest.client() as client:
        assert (await client.init(t)).status == SyncStatus.COMPLETE
    assert (state / statetree.KEY_NAME).stat().st_mode & 0o777 == 0o600
    assert (state / t.info_hash).stat().st_mode & 0o777 == 0o700
    for p in (state / t.info_hash).iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    assert dest.proc.stop() == 0
    # Once: a later start adopts nothing, and a file added untagged afterwards is ignored.
    dest = start_destination(qbsync_factory, data)
    assert "event=state_adopted" not in dest.proc.log_text()
    assert dest.proc.stop() == 0


def _make_legacy(state: Path) -> None:
    """Turn a state tree into what an earlier version left: no key, no tags, old modes."""
    (state / statetree.KEY_NAME).unlink()
    state.chmod(0o755)
    for mdir in state.iterdir():
        if not mdir.is_dir():
            continue  # the activity log (the status page's history) is not torrent state
        mdir.chmod(0o755)
        for p in mdir.iterdir():
            raw = p.read_bytes()
            cut = raw.rfind(statetree.TAG_PREFIX)
            assert cut > 0, p
            p.write_bytes(raw[:cut])
            p.chmod(0o644)


async def test_state_dir_outside_data(tmp_path: Path, qbsync_factory) -> None:
    """``--state-dir`` moves every state file out of ``--data``; dirs 0700, files 0600."""
    t = _torrent(tmp_path)
    data = tmp_path / "data"
    state = tmp_path / "var" / "qbsync"
    dest: Destination = start_destination(qbsync_factory, data, extra=["--state-dir", str(state)])
    async with dest.client() as client:
        ready = await client.init_ready(t)
        assert ready.status == SyncStatus.READY
        assert (state / t.info_hash / "torrent").stat().st_mode & 0o777 == 0o600
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
    assert not (data / ".qbsync").exists()
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / t.info_hash).stat().st_mode & 0o777 == 0o700
    for p in (state / t.info_hash).iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    assert dest.proc.stop() == 0
    dest = start_destination(qbsync_factory, data, extra=["--state-dir", str(state)])
    async with dest.client() as client:
        assert (await client.init(t)).status == SyncStatus.COMPLETE
