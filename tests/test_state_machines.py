"""The two torrent state machines (destination ``TorrentState``/``DataFile``, source
``Tracked``): every legal transition works, an illegal one raises ``IllegalTransition`` and
changes nothing, and no module outside the two state modules assigns the fields they own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from qbsync.destination import state as dst
from qbsync.destination.state import FileStatus, Phase
from tests.test_destination_store import fresh_state

SRC = Path(__file__).resolve().parent.parent / "src" / "qbsync"


# --- destination: phase -------------------------------------------------------------------------


def _phase_path(state: dst.TorrentState, target: Phase) -> None:
    """Drive a fresh (ACTIVE) state to ``target`` through the public transition methods."""
    if target is Phase.SCANNING:
        state.begin_scan()
    elif target is Phase.FINALIZING:
        state.begin_finalize(None)
    elif target is Phase.CLOSED:
        state.close()


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


LEGAL_PHASES = [(a, b) for a, targets in dst.PHASE_TRANSITIONS.items() for b in targets]


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


LEGAL_FILES = [(a, b) for a, targets in dst.FILE_TRANSITIONS.items() for b in targets]
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
