"""Path mapping and save_sub_path (docs/design-decisions.md#content-path-is-authoritative)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbsync.source.paths import PathMapper, clean, content_parent, is_within

MULTI = ["Show/a.mkv", "Show/sub/b.srt"]


@pytest.mark.parametrize(
    ("content_path", "save_path", "names", "expected"),
    [
        # single file at the save path, and inside a category
        ("/dl/movie.mkv", "/dl", ["movie.mkv"], "/dl"),
        ("/dl/movies/movie.mkv", "/dl", ["movie.mkv"], "/dl/movies"),
        # single file renamed into a sub-directory: strip the whole name
        ("/dl/x/sub/movie.mkv", "/dl", ["sub/movie.mkv"], "/dl/x"),
        # multi-file with a root folder; trailing slash and dots are normalized
        ("/dl/Show", "/dl", MULTI, "/dl"),
        ("/dl/tv/Show/", "/dl", MULTI, "/dl/tv"),
        ("/dl/tv/./x/../Show", "/dl", MULTI, "/dl/tv"),
        # save_path drifted (Set Location): content_path wins
        ("/mnt/new/Show", "/dl/old", MULTI, "/mnt/new"),
        # a doubled layout after Set Location: only the last root component is stripped
        ("/dl/Show/Show", "/dl/Show", MULTI, "/dl/Show"),
        # "No subfolder" layout: content_path is the directory itself
        ("/dl/tv", "/dl", ["a.mkv", "b.mkv"], "/dl/tv"),
        ("/dl/tv", "/dl", ["a.mkv", "x/b.mkv"], "/dl/tv"),
        # content_path pointing at the first file of a multi-file torrent
        ("/dl/Show/a.mkv", "/dl", MULTI, "/dl"),
        # unusable content_path: fall back to the cleaned save_path
        ("", "/dl/movies/", ["movie.mkv"], "/dl/movies"),
        ("relative/path", "/dl", ["movie.mkv"], "/dl"),
        ("/dl/movie.mkv", "/dl", [], "/dl"),
    ],
)
def test_content_parent(content_path, save_path, names, expected):
    assert content_parent(content_path, save_path, names) == expected


def test_clean_and_is_within():
    assert clean("/a/b/../c/") == "/a/c"
    assert clean("") == ""
    assert is_within("/a/b", "/a")
    assert is_within("/a", "/a")
    assert not is_within("/ab", "/a")  # component-wise, not a string prefix
    assert is_within("/x", "/")
    assert not is_within("", "/a")


def test_mapper_default_and_categories():
    m = PathMapper(Path("/data"), "/downloads")
    assert m.to_local("/downloads") == Path("/data")
    assert m.to_local("/downloads/movies") == Path("/data/movies")
    assert m.to_local("/downloads/media/movies/") == Path("/data/media/movies")
    assert m.to_local("/elsewhere") == Path("/data")  # silent fallback, like the reference
    assert m.save_sub_path("/downloads") == ""
    assert m.save_sub_path("/downloads/movies") == "movies"
    assert m.save_sub_path("/downloads/media/movies") == "media/movies"
    assert m.save_sub_path("/downloadsX/movies") == ""
    assert m.save_sub_path("/other") == ""


def test_mapper_temp_inside_and_beside_save_path():
    inside = PathMapper.from_preferences(
        Path("/data"),
        {
            "save_path": "/downloads/",
            "temp_path_enabled": True,
            "temp_path": "/downloads/incomplete",
        },
    )
    assert inside.to_local("/downloads/incomplete") == Path("/data/incomplete")
    assert inside.to_local("/downloads/incomplete/tv") == Path("/data/incomplete/tv")
    # While in an in-save-path temp dir the sub-path is that dir (destination relocates later).
    assert inside.save_sub_path("/downloads/incomplete") == "incomplete"

    beside = PathMapper.from_preferences(
        Path("/srv/data"),
        {"save_path": "/downloads", "temp_path_enabled": True, "temp_path": "/temp"},
    )
    assert beside.to_local("/temp/tv") == Path("/srv/temp/tv")
    assert beside.save_sub_path("/temp/tv") == ""

    disabled = PathMapper.from_preferences(
        Path("/data"), {"save_path": "/downloads", "temp_path_enabled": False, "temp_path": "/t"}
    )
    assert disabled.qb_temp == ""
    assert disabled.to_local("/t/x") == Path("/data")
