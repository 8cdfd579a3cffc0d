"""Property tests for path safety: whatever a peer sends, an accepted path stays under the root.

Strategies mix hostile fragments (``..``, ``/``, ``\\``, ``C:``, NUL, long runs) with ordinary
characters, so both the refusal and the acceptance paths are exercised heavily.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from qbsync import paths
from qbsync.paths import UnsafePathError, check_layout, split_relative

FRAGMENTS = st.sampled_from(
    ["..", ".", "/", "\\", "C:", "\x00", "a", "b", ".qbsync", " ", "é", "...", "x.partial", "//"]
)
HOSTILE = st.lists(st.one_of(FRAGMENTS, st.text(min_size=0, max_size=6)), max_size=12).map("".join)
ROOT = "/srv/data"


@given(HOSTILE)
def test_accepted_paths_stay_under_root(text: str) -> None:
    try:
        parts = split_relative(text)
    except UnsafePathError:
        return
    joined = os.path.normpath(os.path.join(ROOT, *parts))
    assert paths.is_within(ROOT, joined)
    assert joined != ROOT
    # Lexical normalization changed nothing: no component was special.
    assert os.path.join(ROOT, *parts) == joined
    for part in parts:
        assert part not in ("", ".", "..")
        assert "/" not in part and "\\" not in part and "\x00" not in part
        assert len(part.encode()) <= paths.MAX_COMPONENT_BYTES


@given(HOSTILE)
def test_split_is_a_pure_function_of_its_input(text: str) -> None:
    try:
        first = split_relative(text)
    except UnsafePathError:
        try:
            split_relative(text)
        except UnsafePathError:
            return
        raise AssertionError("second call accepted what the first refused") from None
    assert split_relative(text) == first
    assert split_relative("/".join(first)) == first  # round trip


@given(st.lists(st.text(alphabet="ab./", min_size=1, max_size=6), min_size=1, max_size=6))
def test_check_layout_accepts_only_non_colliding_tables(raw: list[str]) -> None:
    try:
        files = [split_relative(p) for p in raw]
    except UnsafePathError:
        return
    try:
        check_layout((), files)
    except UnsafePathError:
        return
    finals = set(files)
    assert len(finals) == len(files)
    dirs = {f[:i] for f in files for i in range(1, len(f))}
    assert not finals & dirs
    partials = {paths.partial_parts(f) for f in files}
    assert not finals & partials
    assert all(f[0] != paths.STATE_DIR_NAME for f in files)


@given(st.lists(st.sampled_from(["a", "b", "..", "l", "x"]), min_size=1, max_size=5))
def test_filesystem_walk_never_leaves_root(components: list[str]) -> None:
    """With a symlink ``l`` inside the root pointing outside, no accepted name creates anything
    outside."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        outside = base / "outside"
        root.mkdir()
        outside.mkdir()
        (root / "l").symlink_to(outside, target_is_directory=True)
        text = "/".join(components)
        try:
            parts = split_relative(text)
        except UnsafePathError:
            return
        assume(parts)
        try:
            fd = paths.open_file(root, parts, os.O_WRONLY | os.O_CREAT, create_dirs=True)
        except (UnsafePathError, OSError):
            pass
        else:
            os.close(fd)
        assert list(outside.iterdir()) == []
        assert sorted(p.name for p in base.iterdir()) == ["outside", "root"]
