"""The destination process under bad input and bad luck: corrupt pieces, crashes, hostile
paths, a full disk, a wrong token, dry run. A test client plays the source."""

from __future__ import annotations

import contextlib
import filecmp
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from qbsync.torrent import bencode
from qbsync.wire import ErrorCode, FileEntry, InitTorrent, SyncStatus, WireError
from tests.diskedit import overwrite
from tests.integration.conftest import QbsyncFactory
from tests.qbharness import KiB, make_payload, wait_until
from tests.wireclient import Destination, LocalTorrent, needed_indices, start_destination

pytestmark = pytest.mark.integration

FILES = {"a.bin": 500_000, "b/b.bin": 800_000, "c.bin": 123_457}


def _payload(tmp_path: Path, files: dict[str, int] = FILES, seed: int = 0) -> LocalTorrent:
    return LocalTorrent.create(make_payload(tmp_path / "src" / "payload", files, seed), 64 * KiB)


def _identical(t: LocalTorrent, data: Path) -> None:
    for rel, _ in t.files:
        assert filecmp.cmp(t.base / rel, data / rel, shallow=False), rel


def _exists(path: Path) -> bool:
    return path.exists()


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# The destination's own identity key and pins (README, "Pairing and peer keys"): there from
# its first start, neither torrent data nor torrent state.
IDENTITY_FILES = {".qbsync/identity.key", ".qbsync/peers.json", ".qbsync/peers.lock"}


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` except the destination's identity files."""
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*")} - IDENTITY_FILES


async def test_corrupt_piece_refused_then_accepted_when_resent(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        ready = await client.init_ready(t)
        good = t.piece(3)
        bad = bytearray(good)
        bad[100] ^= 0x01
        ack = await client.send_piece(t, 3, bytes(bad))
        assert ack.code == ErrorCode.HASH_MISMATCH
        # Nothing counted: piece 3 is still needed.
        assert 3 in needed_indices(await client.init(t), t.num_pieces)
        ack = await client.send_piece(t, 3, good)
        assert ack.ok
        assert 3 not in needed_indices(await client.init(t), t.num_pieces)
        rest = [i for i in needed_indices(ready, t.num_pieces) if i != 3]
        acks = await client.send(t, rest, order="desc")
        assert all(a.ok for a in acks.values())
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    _identical(t, data)
    assert "code=hash-mismatch" in dest.proc.log_text()


async def test_kill9_mid_stream_resumes_without_resending_written_pieces(
    tmp_path, qbsync_factory
) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    names = [rel for rel, _ in t.files]
    a_index = names.index("payload/a.bin")
    a_pieces = [i for i in range(t.num_pieces) if t.piece_files(i) == [a_index]]
    async with dest.client() as client:
        ready = await client.init_ready(t)
        assert ready.pieces_needed_count == t.num_pieces
        # Every piece touching a.bin: the file completes, is synced and renamed, and the bitmap
        # is persisted with it. Then a few pieces of b.bin, which may or may not be flushed.
        first = sorted({i for i in range(t.num_pieces) if a_index in t.piece_files(i)})
        acks = await client.send(t, first)
        assert all(a.ok for a in acks.values())
        await trio.to_thread.run_sync(
            lambda: wait_until((data / "payload" / "a.bin").exists, 120, 0.05, "a.bin final")
        )
        extra = [first[-1] + 1, first[-1] + 2]
        acks = await client.send(t, extra)
        assert all(a.ok for a in acks.values())
    sent = set(first) | set(extra)
    dest.proc.kill()

    dest2 = start_destination(qbsync_factory, data, port=dest.port)
    assert "event=recovered" in dest2.proc.log_text()
    async with dest2.client() as client:
        resumed = await client.init_ready(t)
        needed = set(needed_indices(resumed, t.num_pieces))
        never_sent = set(range(t.num_pieces)) - sent
        assert never_sent <= needed  # a piece never written is never reported as written
        assert not needed & set(a_pieces)  # the completed file's pieces are not re-sent
        assert resumed.pieces_needed_count < ready.pieces_needed_count
        acks = await client.send(t, sorted(needed), order="shuffle")
        assert all(a.ok for a in acks.values())
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    _identical(t, data)


async def test_graceful_restart_keeps_every_acked_piece(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    sent = [0, 5, 9, 13, 17]
    async with dest.client() as client:
        await client.init_ready(t)
        assert all(a.ok for a in (await client.send(t, sent)).values())
    assert dest.proc.stop() == 0  # SIGTERM: flushes everything before exiting
    dest2 = start_destination(qbsync_factory, data, port=dest.port)
    async with dest2.client() as client:
        resumed = await client.init_ready(t)
        assert set(needed_indices(resumed, t.num_pieces)) == set(range(t.num_pieces)) - set(sent)


def _hostile_init(t: LocalTorrent, bad_path: str, index: int = 1) -> InitTorrent:
    msg = t.init_msg()
    files = list(msg.files)
    files[index] = FileEntry(path=bad_path, size=files[index].size)
    return InitTorrent(
        info_hash=msg.info_hash,
        name=msg.name,
        torrent_file=msg.torrent_file,
        files=tuple(files),
        piece_length=msg.piece_length,
        total_size=msg.total_size,
        num_pieces=msg.num_pieces,
    )


@pytest.mark.parametrize(
    "bad_path",
    [
        "../../escaped.bin",
        "payload/../../escaped.bin",
        "/tmp/escaped-abs.bin",
        "payload\\..\\escaped.bin",
        "C:/escaped.bin",
        "payload/x\x00.bin",
        ".qbsync/0000000000000000000000000000000000000000/meta.json",
        "payload//double.bin",
    ],
)
async def test_hostile_names_refused_nothing_written(tmp_path, qbsync_factory, bad_path) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "deep" / "data"
    data.mkdir(parents=True)

    def outside() -> set[str]:
        return {p for p in _tree(tmp_path) if not p.startswith("deep/data") and "qbsync-" not in p}

    outside_before = outside()
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.conn.request(_hostile_init(t, bad_path), timeout=10)
        assert err.value.code == ErrorCode.UNSAFE_PATH, err.value
        # The torrent was not created: pieces are refused, and the connection still works.
        ack = await client.send_piece(t, 0)
        assert ack.code == ErrorCode.NOT_INITIALIZED
        ok = await client.init_ready(t)
        assert ok.status == SyncStatus.READY
    assert not _exists(Path("/tmp/escaped-abs.bin"))
    assert outside() == outside_before
    # Only the legitimate retry left traces (its state directory and the empty .partial files
    # it created for its own names), no data file of the bad try.
    legit = {rel + ".partial" for rel, _ in t.files}
    legit |= {
        "/".join(rel.split("/")[:i]) for rel, _ in t.files for i in range(1, rel.count("/") + 1)
    }
    assert {p for p in _tree(data) if not p.startswith(".qbsync")} <= legit
    assert "code=unsafe-path" in dest.proc.log_text()


async def test_hostile_names_inside_the_torrent_file_are_never_used(
    tmp_path, qbsync_factory
) -> None:
    """A .torrent whose own names climb out: the destination lays files out by the request's
    names (validated), so the metainfo names cannot place anything; and a request that repeats
    them is refused."""
    info = {
        b"name": b"..",
        b"piece length": 16 * KiB,
        b"files": [{b"length": 10, b"path": [b"..", b"..", b"escaped"]}],
        b"pieces": bytes(20),
    }
    raw = bencode({b"info": info})
    import hashlib

    h = hashlib.sha1(bencode(info)).hexdigest()
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        msg = InitTorrent(
            info_hash=h,
            torrent_file=raw,
            files=(FileEntry(path="../../../escaped", size=10),),
            piece_length=16 * KiB,
            total_size=10,
            num_pieces=1,
        )
        with pytest.raises(WireError) as err:
            await client.conn.request(msg, timeout=120)
        assert err.value.code == ErrorCode.UNSAFE_PATH
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path.parent / "escaped").exists()


async def test_symlink_escape_refused(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    data.mkdir()
    (data / "payload").symlink_to(outside, target_is_directory=True)
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.init(t)
        assert err.value.code == ErrorCode.UNSAFE_PATH
    assert list(outside.iterdir()) == []


async def test_wrong_token_refused_and_no_change(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    for token in ("wrong-token", None):
        with pytest.raises(WireError) as err:
            async with dest.client(token=token or "") as client:
                await client.init(t)
        assert err.value.code == ErrorCode.AUTH_FAILED
    assert _tree(data) <= {".qbsync"}  # (holding only the destination's own key)
    assert "code=auth-failed" in dest.proc.log_text()
    # The right token still works afterwards.
    async with dest.client() as client:
        assert (await client.init_ready(t)).status == SyncStatus.READY


async def test_invalid_requests_get_typed_errors(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    other = LocalTorrent.create(
        make_payload(tmp_path / "src2" / "other", {"x.bin": 100_000}, seed=9), 64 * KiB
    )
    dest = start_destination(qbsync_factory, tmp_path / "data")
    async with dest.client() as client:
        # .torrent of another torrent.
        with pytest.raises(WireError) as err:
            await client.init(t, torrent=other.torrent)
        assert err.value.code == ErrorCode.BAD_REQUEST
        # Request geometry that disagrees with the .torrent.
        msg = t.init_msg()
        with pytest.raises(WireError) as err:
            await client.conn.request(
                InitTorrent(
                    info_hash=msg.info_hash,
                    torrent_file=msg.torrent_file,
                    files=(*msg.files[:-1], FileEntry(msg.files[-1].path, msg.files[-1].size + 1)),
                ),
                timeout=120,
            )
        assert err.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(WireError) as err:
            await client.conn.request(
                InitTorrent(
                    info_hash=msg.info_hash,
                    torrent_file=msg.torrent_file,
                    files=msg.files,
                    piece_length=msg.piece_length * 2,
                ),
                timeout=120,
            )
        assert err.value.code == ErrorCode.BAD_REQUEST
        ready = await client.init_ready(t)
        assert ready.status == SyncStatus.READY
        # Pieces: out of range, wrong offset, wrong length.
        data = t.piece(0)
        n = t.num_pieces
        ack = await client.conn.send_piece(t.info_hash, n, n * t.piece_length, t.piece(n - 1))
        assert ack.code == ErrorCode.BAD_REQUEST
        ack = await client.conn.send_piece(t.info_hash, 0, 1, data)
        assert ack.code == ErrorCode.BAD_REQUEST
        ack = await client.conn.send_piece(t.info_hash, 0, 0, data[:-1])
        assert ack.code == ErrorCode.BAD_REQUEST
        # Finalize of an unknown torrent, and too early.
        with pytest.raises(WireError) as err:
            await client.finalize(other)
        assert err.value.code == ErrorCode.NOT_FOUND
        with pytest.raises(WireError) as err:
            await client.finalize(t)
        assert err.value.code == ErrorCode.INCOMPLETE
        # Still fine afterwards.
        assert (await client.send_piece(t, 0)).ok
    status, body = dest.http("/metrics")
    assert status == 200
    assert b'qbsync_rejected_requests_total{code="bad-request"}' in body


async def test_abort_deletes_only_this_torrents_files(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "data"
    (data / "payload").mkdir(parents=True)
    (data / "payload" / "keep-me.txt").write_text("not ours")
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        ready = await client.init_ready(t)
        await client.send(t, needed_indices(ready, t.num_pieces)[:8])
        result = await client.abort(t, delete_files=True)
        assert result.existed
        assert (await client.send_piece(t, 9)).code == ErrorCode.NOT_INITIALIZED
    assert _tree(data) == {"payload", "payload/keep-me.txt", ".qbsync", ".qbsync/.state-key"}


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_gives_io_acks_then_completes_when_space_returns(
    tmp_path, qbsync_factory
) -> None:
    t = _payload(tmp_path, {"big.bin": 1_400_000, "small.bin": 200_000})
    data = tmp_path / "data"
    with _tmpfs(data, "1m"):
        dest = start_destination(qbsync_factory, data)
        async with dest.client() as client:
            ready = await client.init_ready(t)
            acks = await client.send(t, needed_indices(ready, t.num_pieces), concurrency=2)
            codes = {a.code for a in acks.values()}
            assert ErrorCode.IO in codes, codes
            assert codes <= {ErrorCode.OK, ErrorCode.IO}
            failed = sorted(i for i, a in acks.items() if a.code == ErrorCode.IO)
            needed = needed_indices(await client.init(t), t.num_pieces)
            assert set(failed) <= set(needed)  # an io ack never counts as written
            # Space returns.
            await trio.to_thread.run_sync(_remount, data, "8m")
            acks = await client.send(t, needed)
            assert all(a.ok for a in acks.values())
            assert (await client.finalize(t)).status == SyncStatus.COMPLETE
        _identical(t, data)
        dest.proc.stop()
    assert "code=io" in dest.proc.log_text()


async def test_dry_run_changes_nothing(tmp_path, qb_factory, qbsync_factory) -> None:
    qb = qb_factory("dst")
    t = _payload(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    dest = start_destination(qbsync_factory, data, qb_args=qb.qbsync_args(), extra=["--dry-run"])
    async with dest.client() as client:
        ready = await client.init_ready(t)
        assert ready.status == SyncStatus.READY
        assert ready.pieces_needed_count == t.num_pieces
        bad = bytearray(t.piece(1))
        bad[0] ^= 1
        assert (await client.send_piece(t, 1, bytes(bad))).code == ErrorCode.HASH_MISMATCH
        acks = await client.send(t, range(t.num_pieces), order="shuffle")
        assert all(a.ok for a in acks.values())
        # Nothing recorded: an Init still wants every piece.
        assert (await client.init(t)).pieces_needed_count == t.num_pieces
        result = await client.finalize(t)
        assert result.status == SyncStatus.COMPLETE
        assert "dry run" in result.message
        assert (await client.abort(t)).existed is False  # finalized in dry run: nothing tracked
    assert _tree(data) == set()
    assert qb.api.torrents_info() == []
    assert "event=dry_run_finalize" in dest.proc.log_text()


async def test_dry_run_does_not_create_the_data_directory(tmp_path, qbsync_factory) -> None:
    t = _payload(tmp_path)
    data = tmp_path / "new" / "data"
    dest = start_destination(qbsync_factory, data, extra=["--dry-run"])
    async with dest.client() as client:
        assert (await client.sync(t)).status == SyncStatus.COMPLETE
    assert dest.proc.stop() == 0
    assert not (tmp_path / "new").exists()


async def test_resync_after_selection_change_reuses_data_on_disk(tmp_path, qbsync_factory) -> None:
    """Files already here are verified (not trusted) and not streamed again; newly selected
    files are. A finalized file that was damaged since is never repaired in place (that
    would rename the last copy to ``.partial`` first): the resync answers ``conflict`` and
    leaves it; once it is whole again the resync goes ahead."""
    t = _payload(tmp_path)
    data = tmp_path / "data"
    names = [rel for rel, _ in t.files]
    b = names.index("payload/b/b.bin")
    first = [i != b for i in range(len(names))]
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        ready = await client.init_ready(t, selected=first)
        await client.send(t, needed_indices(ready, t.num_pieces), deselected=[b])
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
        # Corrupt a file that stays selected: the scan must catch it, and refuse.
        a = data / "payload" / "a.bin"
        overwrite(a, 70_000, b"\xff" * 10)
        damaged = a.read_bytes()
        with pytest.raises(WireError) as err:
            await client.init_ready(t, resync=True)
        assert err.value.code == ErrorCode.CONFLICT and "payload/a.bin" in err.value.message
        assert a.read_bytes() == damaged and not list(data.rglob("*.partial"))
        shutil.copyfile(t.base / "payload" / "a.bin", a)  # the user repairs it
        again = await client.init_ready(t, resync=True)
        needed = set(needed_indices(again, t.num_pieces))
        b_pieces = {i for i in range(t.num_pieces) if b in t.piece_files(i)}
        assert b_pieces <= needed
        assert len(needed) < t.num_pieces - 2
        acks = await client.send(t, sorted(needed))
        assert all(a.ok for a in acks.values())
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
    _identical(t, data)


async def test_existing_files_are_verified_not_trusted(tmp_path, qbsync_factory) -> None:
    """Files the user already has at the torrent's names are only read: a damaged one is a
    ``conflict`` (left exactly as it was; it used to be renamed to .partial and written
    into); once the user repairs it, every file is proven from disk and adopted, nothing is
    streamed, and the files stay the user's."""
    t = _payload(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(t.base / "payload", data / "payload")
    damaged = data / "payload" / "c.bin"
    overwrite(damaged, 0, b"garbage!")  # first piece of c.bin is wrong
    before = damaged.read_bytes()
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        with pytest.raises(WireError) as err:
            await client.init_ready(t)
        assert err.value.code == ErrorCode.CONFLICT and "payload/c.bin" in err.value.message
        assert damaged.read_bytes() == before
        assert not (data / "payload" / "c.bin.partial").exists()
        assert "event=ownership_conflict" in dest.proc.log_text()
        shutil.copyfile(t.base / "payload" / "c.bin", damaged)
        ready = await client.init_ready(t)
        assert needed_indices(ready, t.num_pieces) == []
        assert (await client.finalize(t)).status == SyncStatus.COMPLETE
        assert "event=user_file_adopted" in dest.proc.log_text()
    _identical(t, data)


async def test_hardlinked_source_files_are_linked_not_streamed(tmp_path, qbsync_factory) -> None:
    """Two torrents sharing one source file (same device/inode): the second links the first's
    verified copy instead of receiving it again."""
    shared = make_payload(tmp_path / "src" / "one", {"shared.bin": 600_000, "x.bin": 70_000}, 5)
    t1 = LocalTorrent.create(shared, 64 * KiB)
    two = tmp_path / "src" / "two"
    two.mkdir(parents=True)
    (two / "shared.bin").hardlink_to(shared / "shared.bin")
    (two / "y.bin").write_bytes(b"y" * 50_000)
    t2 = LocalTorrent.create(two, 64 * KiB)
    st = (shared / "shared.bin").stat()

    def ids(t: LocalTorrent) -> list[tuple[int, int]]:
        return [
            (st.st_dev, st.st_ino) if rel.endswith("shared.bin") else (0, 0) for rel, _ in t.files
        ]

    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        ready = await client.init_ready(t1, ids=ids(t1))
        await client.send(t1, needed_indices(ready, t1.num_pieces))
        assert (await client.finalize(t1)).status == SyncStatus.COMPLETE
        ready2 = await client.init_ready(t2, ids=ids(t2))
        names = [rel for rel, _ in t2.files]
        s = names.index("two/shared.bin")
        inner = [i for i in range(t2.num_pieces) if t2.piece_files(i) == [s]]
        assert inner
        assert not set(inner) & set(needed_indices(ready2, t2.num_pieces))
        await client.send(t2, needed_indices(ready2, t2.num_pieces))
        assert (await client.finalize(t2)).status == SyncStatus.COMPLETE
    _identical(t1, data)
    _identical(t2, data)
    assert (data / "one" / "shared.bin").stat().st_ino == (
        data / "two" / "shared.bin"
    ).stat().st_ino
    assert "event=hardlinked" in dest.proc.log_text()


async def _a_finalized_and_b_at_its_names(
    tmp_path: Path, qbsync_factory: QbsyncFactory
) -> tuple[LocalTorrent, LocalTorrent, Path, Destination]:
    """Torrent A synced, finalized and byte-identical on a destination; torrent B with the
    same file names and sizes but other bytes, not sent yet."""
    a = _payload(tmp_path / "a")
    b = _payload(tmp_path / "b", seed=5)  # same names and sizes, other bytes
    data = tmp_path / "data"
    dest = start_destination(qbsync_factory, data)
    async with dest.client() as client:
        assert (await client.sync(a)).status == SyncStatus.COMPLETE
    _identical(a, data)
    return a, b, data, dest


async def test_finalized_files_never_taken_over_by_another_torrent(
    tmp_path, qbsync_factory
) -> None:
    """Torrent B laid out at the names of finalized torrent A (seeded from those files) but
    with other content: B is refused with unsafe-path naming A, nothing of B is created, and
    A's files stay byte-identical — also after a destination restart, when ownership comes
    from A's persisted .finalized marker."""
    a, b, data, dest = await _a_finalized_and_b_at_its_names(tmp_path, qbsync_factory)
    before = {rel: (data / rel).stat() for rel, _ in a.files}

    async def refused(d) -> None:
        async with d.client() as client:
            with pytest.raises(WireError) as err:
                await client.init(b)
            assert err.value.code == ErrorCode.UNSAFE_PATH
            assert a.info_hash in err.value.message
            assert not (await client.abort(b, delete_files=True)).existed
            # A is still known as complete; the connection still works.
            assert (await client.init(a)).status == SyncStatus.COMPLETE
        await trio.sleep(0.5)  # would-be background scans of B get time to do damage
        _identical(a, data)
        for rel, _ in a.files:
            st = (data / rel).stat()
            assert (st.st_ino, st.st_mtime_ns) == (before[rel].st_ino, before[rel].st_mtime_ns)
        assert not (data / ".qbsync" / b.info_hash).exists()
        assert not any(p.name.endswith(".partial") for p in data.rglob("*"))

    await refused(dest)
    dest.proc.stop()
    dest2 = start_destination(qbsync_factory, data, port=dest.port)
    await refused(dest2)
    assert "code=unsafe-path" in dest2.proc.log_text()


async def test_finalized_names_free_again_once_their_files_are_deleted(
    tmp_path, qbsync_factory
) -> None:
    """The user removed finalized torrent A and deleted its files: B at the same names (other
    content, e.g. a re-release) is accepted, completes and is byte-identical to its source —
    and after a restart B is still known as complete, A does not come back as the owner."""
    a, b, data, dest = await _a_finalized_and_b_at_its_names(tmp_path, qbsync_factory)
    async with dest.client() as client:
        shutil.rmtree(data / "payload")
        ready = await client.init_ready(b)
        assert ready.pieces_needed_count == b.num_pieces
        acks = await client.send(b, needed_indices(ready, b.num_pieces), order="shuffle")
        assert all(ack.ok for ack in acks.values())
        assert (await client.finalize(b)).status == SyncStatus.COMPLETE
    _identical(b, data)
    log_text = dest.proc.log_text()
    assert f"event=finalized_name_released hash={a.info_hash}" in log_text
    dest.proc.stop()
    dest2 = start_destination(qbsync_factory, data, port=dest.port)
    async with dest2.client() as client:
        assert (await client.init(b)).status == SyncStatus.COMPLETE
        # A again (same hash) now collides with B's seeded files: refused, B untouched.
        with pytest.raises(WireError) as err:
            await client.init(a)
        assert err.value.code == ErrorCode.UNSAFE_PATH
        assert b.info_hash in err.value.message
    _identical(b, data)
