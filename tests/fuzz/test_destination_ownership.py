"""Property: whatever a source asks, in whatever order, the destination never changes or
removes a file it did not create, and never writes outside ``--data``.

Each example pre-seeds ``--data`` with "user files" at the torrents' names (identical copies,
damaged copies, other sizes, stray ``.partial`` files) and next to them, then runs a random
sequence of Init (plain or resync, two torrents sharing names, sometimes deselecting a file) /
Piece (good or corrupt) / Abort (with or without deleting) / Finalize / StartTorrent / orphan
reaper runs against an in-process destination. After every step every user file still has its
bytes and its inode, and nothing outside ``--data`` appeared or changed.

The second property (below) is about the destination's own finalized files: a peer with valid
credentials cannot remove or change the last copy, whatever it sends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import trio
from hypothesis import strategies as st

from qbsync.wire import Abort, Finalize, Piece, StartTorrent, WireError
from tests.destination.test_destination_handoff import FakeQB
from tests.destination.test_destination_writer import PEER, Dest, build
from tests.qbharness import KiB, make_payload
from tests.wireclient import LocalTorrent

FILES = {"a.bin": 32 * KiB, "b.bin": 20_000, "d/c.bin": 9_000}
_WORK = tempfile.TemporaryDirectory(prefix="qbsync-own-fuzz-")
TORRENTS = [
    LocalTorrent.create(make_payload(Path(_WORK.name) / f"t{i}" / "payload", FILES, i), 16 * KiB)
    for i in range(2)
]
RELS = sorted(FILES)

seed_kind = st.sampled_from(["absent", "copy", "damaged", "other-size", "partial"])
op = st.one_of(
    st.tuples(
        st.just("init"),
        st.integers(0, 1),
        st.booleans(),
        st.sampled_from(["", "sub"]),
        st.booleans(),
    ),
    st.tuples(st.just("piece"), st.integers(0, 1), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("abort"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("finalize"), st.integers(0, 1)),
    st.tuples(st.just("start"), st.integers(0, 1)),
    st.tuples(
        st.just("reap"),
    ),
)


def _seed(data: Path, kinds: list[str]) -> dict[Path, tuple[bytes, int]]:
    """Write the user's files; return path -> (bytes, inode)."""
    user: dict[Path, tuple[bytes, int]] = {}
    src = TORRENTS[0]
    for rel, kind in zip(RELS, kinds, strict=True):
        target = data / "payload" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        content = (src.base / "payload" / rel).read_bytes()
        if kind == "absent":
            continue
        if kind == "damaged":
            content = content[:50] + bytes([content[50] ^ 1]) + content[51:]
        elif kind == "other-size":
            content = content[:-7]
        elif kind == "partial":
            target = target.with_name(target.name + ".partial")
        target.write_bytes(content)
    notes = data / "payload" / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("the user's own notes")
    for p in data.rglob("*"):
        if p.is_file():
            user[p] = (p.read_bytes(), p.stat().st_ino)
    return user


def _outside(root: Path) -> dict[str, tuple[int, float]]:
    """Everything under the example's directory except ``data/``."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts and rel.parts[0] == "data":
            continue
        st_ = p.lstat()
        out[str(rel)] = (st_.st_size, st_.st_mtime)
    return out


def _unchanged(files: dict[Path, tuple[bytes, int]], whose: str, step: object) -> None:
    """Every one of ``files`` (path -> bytes, inode) is still there, same bytes, same inode."""
    for path, (content, ino) in files.items():
        assert path.is_file(), f"{whose} file {path} removed after {step}"
        assert path.read_bytes() == content, f"{whose} file {path} changed after {step}"
        assert path.stat().st_ino == ino, f"{whose} file {path} replaced after {step}"


def _built(root: Path, nursery: trio.Nursery) -> Dest:
    """A destination on ``root`` whose qBittorrent is a fake that knows every torrent here."""
    d = build(root, nursery)
    qb = FakeQB()
    for t in TORRENTS:
        qb.register(t.info_hash)
    d.server.qb = qb  # type: ignore[assignment]
    return d


async def _run(root: Path, kinds: list[str], ops: list[tuple[Any, ...]]) -> None:
    data = root / "data"
    user = _seed(data, kinds)
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("outside --data")
    before = _outside(root)
    async with trio.open_nursery() as nursery:
        d = _built(root, nursery)
        for step in ops:
            await _step(d, step)
            _unchanged(user, "user", step)
            assert _outside(root) == before, f"something outside --data changed after {step}"
        nursery.cancel_scope.cancel()


async def _step(d: Any, step: tuple[Any, ...]) -> None:
    kind = step[0]
    try:
        if kind == "init":
            _, k, resync, sub, deselect = step
            t = TORRENTS[k]
            selected = [True, not deselect, True]
            msg = t.init_msg(resync=resync, sub=sub, selected=selected)
            with trio.move_on_after(5):
                result = await d.server.init(msg)
                while result.status.value == "verifying":
                    await trio.sleep(0.005)
                    result = await d.server.init(msg)
        elif kind == "piece":
            _, k, i, corrupt = step
            t = TORRENTS[k]
            i %= t.num_pieces
            data = bytearray(t.piece(i))
            if corrupt:
                data[0] ^= 0xFF
            await d.server.handle_piece(
                PEER, Piece(t.info_hash, i, i * t.piece_length, bytes(data))
            )
        elif kind == "abort":
            _, k, delete = step
            await d.server.abort(Abort(TORRENTS[k].info_hash, delete_files=delete))
        elif kind == "finalize":
            with trio.move_on_after(5):
                await d.server.finalize(Finalize(TORRENTS[step[1]].info_hash))
        elif kind == "start":
            await d.server.start(StartTorrent(TORRENTS[step[1]].info_hash, tag="x"))
        elif kind == "reap":
            await d.server.reap_orphans(max_age=0.0)
    except WireError:
        pass  # refusals are fine; what matters is what happened to the files


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    kinds=st.lists(seed_kind, min_size=len(RELS), max_size=len(RELS)),
    ops=st.lists(op, min_size=1, max_size=12),
)
def test_user_files_survive_any_request_sequence(kinds: list[str], ops: list[Any]) -> None:
    with tempfile.TemporaryDirectory(dir=_WORK.name) as tmp:
        trio.run(_run, Path(tmp), kinds, ops)
    assert os.path.isdir(_WORK.name)


# --- a peer with valid credentials against finalized torrents ----------------------------------
#
# Issue 15, findings 1 and 2: once a torrent is finalized its files are the last copy (after a
# hand-off the source deleted its own). Both torrents are synced and finalized first (at
# different sub paths); then a peer that holds valid credentials sends any sequence of Init
# (plain or resync, another selection, renamed ``files`` paths, another sub path), pieces
# (good or corrupt), Abort (with or without deleting), Finalize, StartTorrent and reaper runs.
# After every step every finalized file still has its bytes and its inode.

SUBS = ["", "sub"]
hostile_op = st.one_of(
    st.tuples(
        st.just("init"),
        st.integers(0, 1),
        st.booleans(),  # resync
        st.sampled_from(SUBS),
        st.booleans(),  # deselect b.bin
        st.booleans(),  # rename the files
    ),
    st.tuples(st.just("piece"), st.integers(0, 1), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("abort"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("finalize"), st.integers(0, 1)),
    st.tuples(st.just("start"), st.integers(0, 1)),
    st.tuples(st.just("reap")),
)


async def _finalize_both(d: Any) -> dict[Path, tuple[bytes, int]]:
    """Sync both torrents completely; return every finalized file -> (bytes, inode)."""
    for t, sub in zip(TORRENTS, SUBS, strict=True):
        msg = t.init_msg(sub=sub)
        with trio.fail_after(10):
            result = await d.server.init(msg)
            while result.status.value == "verifying":
                await trio.sleep(0.005)
                result = await d.server.init(msg)
        for i in range(t.num_pieces):
            ack = await d.server.handle_piece(
                PEER, Piece(t.info_hash, i, i * t.piece_length, t.piece(i))
            )
            assert ack.ok, ack
        with trio.fail_after(10):
            while True:  # the server answers VERIFYING until its background job is done
                if (await d.server.finalize(Finalize(t.info_hash))).status.value == "complete":
                    break
                await trio.sleep(0.005)
    out: dict[Path, tuple[bytes, int]] = {}
    for p in d.root.rglob("*"):
        if p.is_file() and ".qbsync" not in p.parts:
            out[p] = (p.read_bytes(), p.stat().st_ino)
    assert len(out) == 2 * len(FILES)
    return out


async def _hostile_step(d: Any, step: tuple[Any, ...]) -> None:
    if step[0] != "init":
        await _step(d, step)
        return
    _, k, resync, sub, deselect, rename = step
    t = TORRENTS[k]
    names = [f"moved/{rel}" for rel, _ in t.files] if rename else None
    msg = t.init_msg(resync=resync, sub=sub, selected=[True, not deselect, True], names=names)
    try:
        with trio.move_on_after(5):
            result = await d.server.init(msg)
            while result.status.value == "verifying":
                await trio.sleep(0.005)
                result = await d.server.init(msg)
    except WireError:
        pass


async def _run_hostile(root: Path, ops: list[tuple[Any, ...]]) -> None:
    async with trio.open_nursery() as nursery:
        d = _built(root, nursery)
        finalized = await _finalize_both(d)
        for step in ops:
            await _hostile_step(d, step)
            _unchanged(finalized, "finalized", step)
        nursery.cancel_scope.cancel()


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(ops=st.lists(hostile_op, min_size=1, max_size=12))
def test_no_request_sequence_removes_or_changes_a_finalized_file(ops: list[Any]) -> None:
    with tempfile.TemporaryDirectory(dir=_WORK.name) as tmp:
        trio.run(_run_hostile, Path(tmp), ops)
