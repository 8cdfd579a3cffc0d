"""The two torrent state machines (destination ``TorrentState``/``DataFile``, source
``Tracked``): every legal transition works, an illegal one raises ``IllegalTransition`` and
changes nothing, and no module outside the two state modules assigns the fields they own."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from qbsync.bitfield import Bitfield
from qbsync.destination import state as dst
from qbsync.destination.state import FileStatus, Phase
from qbsync.source import state as src
from qbsync.source.state import SourcePhase
from qbsync.source.tracker import PieceTracker
from tests.destination.test_destination_store import fresh_state

SRC = Path(__file__).resolve().parent.parent / "src" / "qbsync"


def _order(member: Phase | FileStatus | SourcePhase) -> str:
    """Sets have no stable order across processes; pytest-xdist workers must collect alike."""
    return str(member.value)


# --- destination: phase -------------------------------------------------------------------------


def _phase_path(state: dst.TorrentState, target: Phase) -> None:
    """Drive a fresh (ACTIVE) state to ``target`` through the public transition methods."""
    if target is not Phase.ACTIVE:
        _apply(state, target)


def _apply(state: dst.TorrentState, target: Phase) -> None:
    """The transition method whose job is to reach ``target`` from the current phase."""
    if target is Phase.SCANNING:
        state.begin_scan()
    elif target is Phase.FINALIZING:
        state.begin_finalize(None)
    elif target is Phase.CLOSED:
        state.close()
    elif state.phase is Phase.SCANNING:
        state.end_scan()
    else:
        state.finalize_failed(None)


LEGAL_PHASES = [
    (a, b) for a, targets in dst.PHASE_TRANSITIONS.items() for b in sorted(targets, key=_order)
]


@pytest.mark.parametrize(("start", "target"), LEGAL_PHASES, ids=lambda p: p.value)
async def test_each_legal_phase_transition(
    tmp_path: Path, nursery: trio.Nursery, start: Phase, target: Phase
) -> None:
    _, _, _, state = await fresh_state(tmp_path, nursery)
    _phase_path(state, start)
    assert state.phase is start
    _apply(state, target)
    assert state.phase is target


@pytest.mark.parametrize(
    ("start", "call"),
    [
        (Phase.SCANNING, "begin_scan"),
        (Phase.SCANNING, "begin_finalize"),
        (Phase.FINALIZING, "begin_finalize"),
        (Phase.FINALIZING, "begin_scan"),
        (Phase.CLOSED, "begin_scan"),
        (Phase.CLOSED, "begin_finalize"),
    ],
)
async def test_illegal_phase_transition_raises(
    tmp_path: Path, nursery: trio.Nursery, start: Phase, call: str
) -> None:
    _, _, _, state = await fresh_state(tmp_path, nursery)
    _phase_path(state, start)
    with pytest.raises(dst.IllegalTransition, match=r"phase .* is not allowed"):
        if call == "begin_scan":
            state.begin_scan()
        else:
            state.begin_finalize(None)
    assert state.phase is start


async def test_conditional_phase_calls_leave_other_phases_alone(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """end_scan / finalize_failed / close are "if in that phase" calls: a torrent closed while
    its scan ran stays closed, and closing twice is no transition at all."""
    _, _, _, state = await fresh_state(tmp_path, nursery)
    state.close()
    state.end_scan()
    state.finalize_failed(None)
    state.close()
    assert state.phase is Phase.CLOSED


# --- destination: file status and piece record --------------------------------------------------


def _file(status: FileStatus) -> dst.DataFile:
    return dst.DataFile(0, 0, ("a.bin",), 10, 0, True, False, status=status)


LEGAL_FILES = [
    (a, b) for a, targets in dst.FILE_TRANSITIONS.items() for b in sorted(targets, key=_order)
]
ILLEGAL_FILES = [
    (a, b)
    for a in FileStatus
    for b in FileStatus
    if a is not b and b not in dst.FILE_TRANSITIONS[a]
]


@pytest.mark.parametrize(("start", "target"), LEGAL_FILES, ids=lambda s: s.value)
def test_each_legal_file_transition(start: FileStatus, target: FileStatus) -> None:
    f = _file(start)
    f.become(target)
    assert f.status is target


@pytest.mark.parametrize(("start", "target"), ILLEGAL_FILES, ids=lambda s: s.value)
def test_illegal_file_transition_raises(start: FileStatus, target: FileStatus) -> None:
    f = _file(start)
    with pytest.raises(dst.IllegalTransition, match=r"a\.bin: file status"):
        f.become(target)
    assert f.status is start


def test_file_fields_are_read_only() -> None:
    f = _file(FileStatus.STREAMING)
    with pytest.raises(AttributeError):
        f.status = FileStatus.COMPLETE  # type: ignore[misc]
    with pytest.raises(AttributeError):
        f.remaining = 3  # type: ignore[misc]


async def test_piece_record_moves_together(tmp_path: Path, nursery: trio.Nursery) -> None:
    """mark_written / clear_pieces / mark_proven keep the record's invariants: ``unverified``
    within ``written``, ``version`` bumped on every change, ``remaining`` counting down."""
    _, _, _, state = await fresh_state(tmp_path, nursery)
    first = state.piece_files(0)[0]
    before, left = state.version, first.remaining

    def record() -> tuple[bool, bool, int]:
        return state.written[0], state.unverified[0], state.version - before

    done = state.mark_written(0, [first], verified=False)
    assert record() == (True, True, 1)
    assert first.remaining == left - 1 and done == []
    assert state.clear_pieces([0]) == 1
    assert record() == (False, False, 2)
    state.mark_proven({0})
    assert record() == (True, False, 3)
    state.recount_remaining()
    assert first.remaining == left - 1
    dirty = state.dirty
    state.mark_flushed(state.version)
    assert (dirty, state.dirty) == (True, False)


# --- who assigns what (docs/architecture.md, "Who assigns what") --------------------------------

# An assignment (``=``, ``+=``, ``-=``, item assignment) to a field a state module owns.
DESTINATION_OWNED = re.compile(
    r"\.(_?phase|_?status|_?version|_?flushed_version|_?remaining)\s*(=|\+=|-=)(?!=)"
    r"|\.(written|unverified)(\[[^\]]*\])?\s*(=|\|=|&=)(?!=)"
)


def _assignments(pattern: re.Pattern[str], owner: Path, scope: list[Path]) -> list[str]:
    hits = []
    for folder in scope:
        for path in sorted(folder.rglob("*.py")):
            if path == owner:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code):
                    hits.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    return hits


def test_grep_no_destination_state_assignment_outside_state_module() -> None:
    scope = [SRC / "destination", SRC / "http", SRC / "demo"]
    assert _assignments(DESTINATION_OWNED, SRC / "destination" / "state.py", scope) == []


def test_grep_pattern_finds_what_it_forbids() -> None:
    """The grep above would catch the assignments it exists to forbid."""
    for line in (
        "state.phase = Phase.CLOSED",
        "f.status = FileStatus.COMPLETE",
        "state.written[index] = True",
        "state.unverified[i] = False",
        "state.version += 1",
        "f.remaining -= 1",
        "state.written, state.unverified = decode(raw)",
    ):
        assert DESTINATION_OWNED.search(line), line
    assert not DESTINATION_OWNED.search("if state.phase == Phase.CLOSED:")


# --- source: the tracked torrent's phase --------------------------------------------------------


def _tracked(*, complete: bool = False) -> src.Tracked:
    """A tracked torrent of two pieces (``complete``: the destination has both)."""
    meta = SimpleNamespace(info_hash="ab" * 20, name="t", num_pieces=2)
    tracker = PieceTracker(2)
    if complete:
        tracker.apply_needed(Bitfield(2))  # nothing needed: every piece acknowledged
    return src.Tracked("ab" * 20, cast(Any, meta), tracker, since=0.0, seq=0)


def _source_path(t: src.Tracked, target: SourcePhase) -> None:
    if target is SourcePhase.STREAMING:
        t.initialized(1)
    elif target is SourcePhase.FINALIZING:
        t.initialized(1)
        t.begin_finalize(5.0)
    elif target is SourcePhase.UNTRACKED:
        t.untrack()


def _source_apply(t: src.Tracked, target: SourcePhase) -> None:
    if target is SourcePhase.STREAMING:
        t.initialized(2)
    elif target is SourcePhase.FINALIZING:
        t.begin_finalize(6.0)
    elif target is SourcePhase.INITIALIZING:
        t.uninitialized()
    else:
        t.untrack()


LEGAL_SOURCE = [
    (a, b) for a, targets in src.SOURCE_TRANSITIONS.items() for b in sorted(targets, key=_order)
]


@pytest.mark.parametrize(("start", "target"), LEGAL_SOURCE, ids=lambda p: p.value)
def test_each_legal_source_transition(start: SourcePhase, target: SourcePhase) -> None:
    t = _tracked()
    _source_path(t, start)
    assert t.phase is start
    _source_apply(t, target)
    assert t.phase is target
    assert t.active is (target is not SourcePhase.UNTRACKED)


def test_source_transition_bookkeeping() -> None:
    """initialized/uninitialized carry the connection generation; begin_finalize keeps the
    first start time; a re-init that finds every piece acknowledged stays FINALIZING."""
    t = _tracked(complete=True)
    t.initialized(3)
    assert (t.phase, t.init_generation, t.resync_pending) == (SourcePhase.STREAMING, 3, False)
    t.begin_finalize(5.0)
    t.begin_finalize(9.0)
    assert (t.phase, t.finalize_started) == (SourcePhase.FINALIZING, 5.0)
    t.initialized(4)
    assert t.phase is SourcePhase.FINALIZING
    assert t.finalize_verifying(10.0) == 1 and t.finalize_failed("io", "boom") == 1
    assert t.finalize_polls == 0 and t.status_label() == "retrying"
    t.uninitialized()
    assert (t.phase, t.init_generation) == (SourcePhase.INITIALIZING, -1)


@pytest.mark.parametrize("start", [SourcePhase.INITIALIZING, SourcePhase.UNTRACKED])
def test_illegal_source_transition_raises(start: SourcePhase) -> None:
    """Finalizing a torrent the destination never initialized, or one no longer tracked."""
    t = _tracked()
    _source_path(t, start)
    with pytest.raises(src.IllegalTransition, match=r"phase .* -> finalizing is not allowed"):
        t.begin_finalize(1.0)
    assert t.phase is start and t.finalize_started == 0.0


def test_source_fields_are_read_only() -> None:
    t = _tracked()
    for name in ("phase", "active", "init_generation", "finalize_failures", "last_error"):
        with pytest.raises(AttributeError):
            setattr(t, name, None)


@pytest.mark.parametrize(
    ("start", "label"),
    [
        (SourcePhase.INITIALIZING, "waiting"),
        (SourcePhase.FINALIZING, "finalizing"),
        (SourcePhase.UNTRACKED, "untracked"),
    ],
)
def test_status_label_reads_the_phase(start: SourcePhase, label: str) -> None:
    t = _tracked()
    _source_path(t, start)
    assert t.status_label() == label


# ``self.x = ...`` is another class's own field (a connection's ``active`` counter): the
# fields owned here are only ever reached through a variable holding the record.
SOURCE_OWNED = re.compile(
    r"(?<!\bself)\.(_?phase|_?active|_?init_generation|_?resync_pending|_?first_poll_done"
    r"|_?finalize_failures|_?finalize_polls|_?next_finalize_at|_?finalize_started"
    r"|_?read_failures|_?removed_from_source|_?last_info|_?urgent|_?owned_elsewhere)"
    r"\s*(=|\+=|-=)(?!=)"
)
# The completion cache and --synced-tag change only in source/synced.py.
SYNCED_OWNED = re.compile(r"cache\.(put|remove)\(|remove_tags\(|_tag\([^)]*synced_tag")


def test_grep_no_source_state_assignment_outside_state_module() -> None:
    scope = [SRC / "source", SRC / "http", SRC / "demo", SRC / "integrations"]
    assert _assignments(SOURCE_OWNED, SRC / "source" / "state.py", scope) == []


# Probe back-off and hard-link waiters of torrents not yet tracked change only in
# source/discovery.py (the orchestrator once kept them as three maps of its own).
DISCOVERY_OWNED = re.compile(r"\b_?(probe_retry_at|retry_at|link_ids|link_waiting|waiting)\[")


def test_grep_discovery_state_only_in_discovery_module() -> None:
    owner = SRC / "source" / "discovery.py"
    assert _assignments(DISCOVERY_OWNED, owner, [SRC / "source"]) == []
    for line in (
        "self._probe_retry_at[h] = now",
        "self._link_waiting[h] = b",
        "del self._link_ids[h]",
    ):
        assert DISCOVERY_OWNED.search(line), line


def test_grep_synced_changes_only_in_synced_module() -> None:
    assert _assignments(SYNCED_OWNED, SRC / "source" / "synced.py", [SRC / "source"]) == []
    for line in ("await self.cache.put(h, fp)", "await self.qb.remove_tags(h, [tag])"):
        assert SYNCED_OWNED.search(line), line
    assert SOURCE_OWNED.search("t.init_generation = -1")
    assert SOURCE_OWNED.search("t.finalize_failures += 1")
    assert not SOURCE_OWNED.search("self.active += 1")


# --- docs/architecture.md shows the same tables -------------------------------------------------


def _doc_table(heading: str) -> set[tuple[str, str]]:
    text = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    body = text.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", body, re.M))


@pytest.mark.parametrize(
    ("heading", "table"),
    [
        ("### Destination torrent (`qbsync.destination.state`, `PHASE_TRANSITIONS`)", "phase"),
        ("### Destination file (`qbsync.destination.state`, `FILE_TRANSITIONS`)", "file"),
        ("### Source torrent (`qbsync.source.state`, `SOURCE_TRANSITIONS`)", "source"),
    ],
)
def test_architecture_page_tables_match_the_code(heading: str, table: str) -> None:
    code: dict[Any, frozenset[Any]] = {
        "phase": dst.PHASE_TRANSITIONS,
        "file": dst.FILE_TRANSITIONS,
        "source": src.SOURCE_TRANSITIONS,
    }[table]  # type: ignore[assignment]
    expected = {(a.value, b.value) for a, targets in code.items() for b in targets}
    assert _doc_table(heading) == expected
