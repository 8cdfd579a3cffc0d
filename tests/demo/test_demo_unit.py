"""Pure parts of ``qbsync demo``: options, the torrent it writes, how it reads progress and
how it compares the copy."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from qbsync.demo import run as demo
from qbsync.qbittorrent.instance import QBInstance, make_payload
from qbsync.torrent import create_metainfo, parse_metainfo
from tests.qbharness import make_torrent, torrent_files

KiB = 1024


def test_create_metainfo_matches_a_reference_implementation(tmp_path: Path) -> None:
    """The demo's own .torrent writer agrees with torf (a test-only dependency) on the
    info-hash, so qBittorrent sees exactly the torrent a standard tool would make."""
    files = {"a.bin": 100_000, "sub/c.bin": 70_000, "b.bin": 5, "sub/d/e.bin": 16 * KiB}
    payload = make_payload(tmp_path / "payload", files)
    ours = create_metainfo(payload, 16 * KiB)
    reference, info_hash = make_torrent(payload, 16 * KiB)
    assert parse_metainfo(ours).info_hash == info_hash
    assert torrent_files(ours) == torrent_files(reference)
    single = create_metainfo(payload / "a.bin", 32 * KiB)
    assert parse_metainfo(single).info_hash == make_torrent(payload / "a.bin", 32 * KiB)[1]


@pytest.mark.parametrize("piece", [0, 1000, 8 * KiB])
def test_create_metainfo_rejects_bad_piece_sizes(tmp_path: Path, piece: int) -> None:
    payload = make_payload(tmp_path / "p", {"a": 10})
    with pytest.raises(ValueError, match="power of two"):
        create_metainfo(payload, piece)


def test_options() -> None:
    o = demo.parse_options(["--size", "50M", "--files", "2", "--duration", "5", "--keep"])
    assert (o.size, o.files, o.duration, o.keep) == (50 * 1024 * 1024, 2, 5.0, True)
    assert demo.parse_options([]).size == 300 * 1024 * 1024
    for bad in (["--size", "lots"], ["--piece-size", "100K"], ["--files", "0"]):
        with pytest.raises(demo.DemoError):
            demo.parse_options(bad)


def test_destination_pieces_prefers_the_schema_fields() -> None:
    dest = {"torrents": [{"hash": "h", "pieces_streamed": 7, "pieces_verified": 5}]}
    src = {"torrents": [{"hash": "h", "pieces_verified": 6}], "tracked": []}
    assert demo.destination_pieces(dest, src, "h") == (7, 6)
    assert demo.destination_pieces({}, {}, "h") == (0, 0)
    # Older daemons: destination "written", source "tracked[].done".
    assert demo.destination_pieces(
        {"torrents": [{"hash": "h", "written": 3}]}, {"tracked": [{"hash": "h", "done": 2}]}, "h"
    ) == (3, 2)


def test_compare_trees_finds_missing_and_different_files(tmp_path: Path) -> None:
    files = {"a.bin": 1000, "x/b.bin": 2000, "c.bin": 10}
    original = make_payload(tmp_path / "o", files)
    copy = make_payload(tmp_path / "c", files)
    assert demo.compare_trees(original, copy) == (3, [])
    data = bytearray((copy / "x/b.bin").read_bytes())
    data[1999] ^= 1  # one bit, in the last byte
    (copy / "x/b.bin").write_bytes(bytes(data))
    (copy / "c.bin").unlink()
    assert demo.compare_trees(original, copy) == (3, ["c.bin", "x/b.bin"])


def test_plain_display_lines() -> None:
    out = io.StringIO()
    d = demo.PlainDisplay("t", out, every=2.0)
    snap = demo.Snapshot(0.0, 100, 10, 50, 2 * 1024 * 1024, 4, 3, "streaming")
    d.update(snap)
    d.update(demo.Snapshot(1.0, 100, 10, 60, 0, 5, 4, "streaming"))  # too soon: skipped
    d.update(demo.Snapshot(1.5, 100, 10, 100, 0, 10, 10, "verified"))  # the end: always shown
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "source  50.0%" in lines[0] and "2.0 MiB/s" in lines[0]
    assert "streamed 4/10 verified 3/10 pieces | lag 2 pieces | streaming" in lines[0]
    assert lines[1].endswith("| verified")


def test_missing_qbittorrent_is_a_clear_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(QBInstance, "binary", "qbittorrent-nox-not-installed-here")
    assert demo.main(["--size", "1M"]) == demo.EXIT_USAGE
    assert "apt-get install qbittorrent-nox" in capsys.readouterr().err
