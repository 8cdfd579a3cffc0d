"""Path safety: lexical validation, layout collisions, and the no-symlink filesystem walk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qbsync import paths
from qbsync.paths import UnsafePathError, check_layout, split_relative


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        ".",
        "../x",
        "a/../../x",
        "a/./b",
        "/etc/passwd",
        "//server/share",
        "a\\b",
        "..\\..\\x",
        "C:/Windows",
        "c:relative",
        "a//b",
        "a/",
        "a/b/",
        "nul\x00byte",
        "x" * 256,
        "a/" + "y" * 256,
        "/".join(["d"] * 2100),
        "bad\udcffsurrogate",
    ],
)
def test_split_relative_refuses(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        split_relative(bad)


@pytest.mark.parametrize(
    ("good", "parts"),
    [
        ("a", ("a",)),
        ("foo... bar", ("foo... bar",)),
        (".hidden/file", (".hidden", "file")),
        ("dir/..file", ("dir", "..file")),
        ("a b/c:d.mkv", ("a b", "c:d.mkv")),
        ("x" * 255, ("x" * 255,)),
        ("ünïcødé/ファイル.bin", ("ünïcødé", "ファイル.bin")),
        ("...", ("...",)),
    ],
)
def test_split_relative_accepts_unusual_but_plain_names(good: str, parts: tuple[str, ...]) -> None:
    assert split_relative(good) == parts


def test_empty_sub_path_allowed_only_when_asked() -> None:
    assert split_relative("", allow_empty=True) == ()
    with pytest.raises(UnsafePathError):
        split_relative("")


def test_component_byte_limit_counts_utf8_bytes() -> None:
    split_relative("é" * 127)  # 254 bytes
    with pytest.raises(UnsafePathError):
        split_relative("é" * 128)  # 256 bytes


@pytest.mark.parametrize(
    "files",
    [
        [("a",), ("a",)],  # duplicate
        [("d",), ("d", "x")],  # a file that is also a directory
        [("d", "x"), ("d",)],
        [("a",), ("a.partial",)],  # x and x.partial collide
        [("a",), ("a.partial", "x")],  # x.partial would be another file's directory
        [("a.partial", "x"), ("a",)],
        [(".qbsync", "h", "meta.json")],  # reaches into the state dir
    ],
)
def test_check_layout_refuses_collisions(files: list[tuple[str, ...]]) -> None:
    with pytest.raises(UnsafePathError):
        check_layout((), files)


def test_check_layout_sub_path_counts() -> None:
    check_layout(("movies",), [(".qbsync", "x")])  # under a sub path it is just a name
    with pytest.raises(UnsafePathError):
        check_layout((".qbsync",), [("x",)])
    check_layout(("m",), [("a",), ("b", "c"), ("b", "d")])


def test_check_layout_partial_name_length() -> None:
    with pytest.raises(UnsafePathError):
        check_layout((), [("x" * 250,)])  # "x"*250 + ".partial" > 255


def test_is_within() -> None:
    assert paths.is_within("/data", "/data")
    assert paths.is_within("/data", "/data/a/b")
    assert not paths.is_within("/data", "/database")
    assert not paths.is_within("/data", "/data/../etc")


def test_open_file_creates_parents_without_following_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fd = paths.open_file(root, ("a", "b", "c.bin"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
    os.close(fd)
    assert (root / "a" / "b" / "c.bin").is_file()

    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        paths.open_file(root, ("link", "x.bin"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
    with pytest.raises(UnsafePathError):
        paths.open_file(root, ("link", "sub", "x.bin"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
    assert list(outside.iterdir()) == []

    (root / "filelink").symlink_to(outside / "target.bin")
    with pytest.raises(UnsafePathError):
        paths.open_file(root, ("filelink",), os.O_WRONLY | os.O_CREAT)
    assert not (outside / "target.bin").exists()


def test_precheck_no_symlinks(tmp_path: Path) -> None:
    root = tmp_path
    (root / "d").mkdir()
    (root / "d" / "l").symlink_to("/")
    paths.precheck_no_symlinks(root, [("x", "y"), ("d", "z")])
    with pytest.raises(UnsafePathError):
        paths.precheck_no_symlinks(root, [("d", "l", "etc", "passwd")])
    (root / "f").write_text("")
    with pytest.raises(UnsafePathError):
        paths.precheck_no_symlinks(root, [("f", "inside-a-file")])


def test_rename_unlink_and_remove_empty_dirs(tmp_path: Path) -> None:
    root = tmp_path
    fd = paths.open_file(root, ("s", "t", "x.partial"), os.O_WRONLY | os.O_CREAT, create_dirs=True)
    os.close(fd)
    paths.rename(root, ("s", "t", "x.partial"), ("s", "t", "x"))
    assert paths.regular_size(root, ("s", "t", "x")) == 0
    assert paths.unlink(root, ("s", "t", "x"))
    assert not paths.unlink(root, ("s", "t", "x"))
    paths.remove_empty_dirs(root, ("s", "t", "x"), keep=1)
    assert (root / "s").is_dir()
    assert not (root / "s" / "t").exists()
    with pytest.raises(ValueError):
        paths.rename(root, ("a", "x"), ("b", "x"))


def test_lstat_missing_and_regular_size(tmp_path: Path) -> None:
    assert paths.lstat(tmp_path, ("nope", "x")) is None
    (tmp_path / "f").write_bytes(b"123")
    assert paths.regular_size(tmp_path, ("f",)) == 3
    assert paths.regular_size(tmp_path, ("f", "under-a-file")) is None
    (tmp_path / "d").mkdir()
    assert paths.regular_size(tmp_path, ("d",)) is None
