"""Unit tests of the destination's state tree rules (src/qbsync/destination/statetree.py):
what is believed, what is ignored, and the group rule. The process-level behaviour (exit 2,
planted files with a real daemon) is in tests/integration/test_state_tree.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qbsync.destination import statetree

HASH = "ab" * 20


def _mdir(tmp_path: Path) -> Path:
    return tmp_path / "state" / HASH


def test_written_files_read_back_and_carry_a_tag(tmp_path: Path) -> None:
    mdir = _mdir(tmp_path)
    statetree.write(mdir, "meta.json", b"{}")
    assert statetree.read(mdir, "meta.json") == b"{}"
    raw = (mdir / "meta.json").read_bytes()
    assert raw.startswith(b"{}" + statetree.TAG_PREFIX) and len(raw) == 2 + 81
    assert (mdir / "meta.json").stat().st_mode & 0o777 == 0o600
    assert mdir.stat().st_mode & 0o777 == 0o700
    assert mdir.parent.stat().st_mode & 0o777 == 0o700
    key = mdir.parent / statetree.KEY_NAME
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


@pytest.mark.parametrize("how", ["untagged", "edited", "moved", "symlink"])
def test_a_file_the_daemon_did_not_write_is_ignored(tmp_path: Path, how: str) -> None:
    mdir = _mdir(tmp_path)
    statetree.write(mdir, "owned.json", b'{"files": []}')
    target = mdir / "owned.json"
    if how == "untagged":
        target.write_bytes(b'{"files": [[1, 2]]}')
    elif how == "edited":
        raw = target.read_bytes()
        target.write_bytes(raw.replace(b"[]", b"[1]"))
    elif how == "moved":  # a genuine file of another torrent's directory
        other = mdir.parent / ("cd" * 20)
        statetree.write(other, "owned.json", b'{"files": [[1, 2]]}')
        os.replace(other / "owned.json", target)
    else:
        outside = tmp_path / "outside.json"
        outside.write_bytes(target.read_bytes())
        target.unlink()
        target.symlink_to(outside)
    assert statetree.read(mdir, "owned.json") is None
    assert not statetree.exists(mdir, "owned.json")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_file_of_another_user_is_ignored_even_with_a_valid_tag(tmp_path: Path) -> None:
    mdir = _mdir(tmp_path)
    statetree.write(mdir, ".finalized", b"{}")
    os.chown(mdir / ".finalized", 12345, 12345)
    assert statetree.read(mdir, ".finalized") is None


def test_a_hash_symlink_is_never_followed(tmp_path: Path) -> None:
    mdir = _mdir(tmp_path)
    statetree.write(tmp_path / "state" / ("cd" * 20), "x", b"1")  # the root exists
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    mdir.symlink_to(outside, target_is_directory=True)
    with pytest.raises(statetree.StateTreeError):
        statetree.write(mdir, "meta.json", b"{}")
    with pytest.raises(statetree.StateTreeError):
        statetree.clear(mdir)
    statetree.remove(mdir)  # removes the link itself
    assert not os.path.lexists(mdir)
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]


def test_the_group_rule(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o700)
    assert statetree.problem(os.lstat(d)) is None
    d.chmod(0o777)
    assert "others" in (statetree.problem(os.lstat(d)) or "")
    d.chmod(0o2770)
    os.chown(d, os.geteuid(), os.getegid())
    assert statetree.problem(os.lstat(d)) is None  # the daemon's own group (fsGroup)
    if os.geteuid() == 0:
        os.chown(d, 0, 54321)
        assert "group 54321" in (statetree.problem(os.lstat(d)) or "")
        os.chown(d, 12345, os.getegid())
        assert "uid 12345" in (statetree.problem(os.lstat(d)) or "")
    link = tmp_path / "link"
    link.symlink_to(d)
    assert statetree.problem(os.lstat(link)) == "is a symlink"


def test_adoption_rewrites_an_earlier_versions_state_once(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / HASH).mkdir(parents=True, mode=0o755)
    root.chmod(0o755)
    (root / HASH / ".finalized").write_bytes(b'{"info_hash": "x"}')
    (root / HASH / ".finalized").chmod(0o644)
    (root / "not-a-dir").write_text("left alone")
    assert statetree.prepare_root(root) == 1
    assert statetree.read(root / HASH, ".finalized") == b'{"info_hash": "x"}'
    assert (root / HASH / ".finalized").stat().st_mode & 0o777 == 0o600
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / HASH).stat().st_mode & 0o777 == 0o700
    assert not (root / statetree.ADOPTING_NAME).exists()
    assert (root / "not-a-dir").read_text() == "left alone"
    # Once: a file planted afterwards, untagged, is not adopted by a later start.
    (root / HASH / "owned.json").write_bytes(b'{"files": [[1, 2]]}')
    assert statetree.prepare_root(root) == 0
    assert statetree.read(root / HASH, "owned.json") is None


def test_adoption_interrupted_resumes_with_the_same_key(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / HASH).mkdir(parents=True)
    (root / HASH / "meta.json").write_bytes(b"{}")
    (root / statetree.ADOPTING_NAME).write_bytes(b"k" * 32)  # a crash left it
    (root / statetree.ADOPTING_NAME).chmod(0o600)
    assert statetree.prepare_root(root) == 1
    assert (root / statetree.KEY_NAME).read_bytes() == b"k" * 32
    assert statetree.read(root / HASH, "meta.json") == b"{}"
