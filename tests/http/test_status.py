"""The /status model, its HTML page and the ``qbsync status`` table (pure logic)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from qbsync.http import status
from qbsync.http.status import DaemonStatus, ErrorInfo, StatusBuilder, TorrentStatus
from tests.status_schema import assert_valid, errors, published_schema

DAEMON = DaemonStatus(
    connections=2, queue=3, budget_used_bytes=1024, budget_limit_bytes=4096, peer="127.0.0.1:1"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def torrent(verified: int, **kw: Any) -> TorrentStatus:
    base: dict[str, Any] = {
        "hash": "ab" * 20,
        "name": "Some.Show <S01>",
        "size": 100 * 1024,
        "pieces_total": 100,
        "pieces_streamed": verified + 2,
        "pieces_verified": verified,
        "state": "streaming",
    }
    base.update(kw)
    return TorrentStatus(**base)


def test_document_matches_the_published_schema_and_keeps_legacy_keys() -> None:
    clock = Clock()
    b = StatusBuilder("source", clock=clock, wall=lambda: 1.5e9)
    err = ErrorInfo("io", "disk gone", 1.5e9)
    doc = b.document(
        DaemonStatus(1, 0, 0, 10, "x:1", last_error=err),
        [torrent(10, last_error=err)],
        legacy={"tracked": [], "role": "ignored"},
    )
    assert_valid(doc)
    assert doc["tracked"] == [] and doc["role"] == "source" and doc["schema"] == 2
    assert doc["daemon"]["last_error"] == {"code": "io", "message": "disk gone", "time": 1.5e9}
    assert doc["torrents"][0]["last_error"]["code"] == "io"
    json.dumps(doc)  # serialisable


def test_schema_validator_rejects_wrong_documents() -> None:
    schema = published_schema()
    doc = StatusBuilder("destination").document(DAEMON, [torrent(1)])
    assert errors(doc, schema, schema) == []
    bad = json.loads(json.dumps(doc))
    del bad["torrents"][0]["pieces_verified"]
    bad["daemon"]["connections"] = "2"
    bad["role"] = "sideways"
    problems = errors(bad, schema, schema)
    assert len(problems) == 3, problems


def test_rate_and_eta_from_successive_requests_with_an_injected_clock() -> None:
    clock = Clock()
    b = StatusBuilder("destination", clock=clock)
    first = b.document(DAEMON, [torrent(0)])["torrents"][0]
    assert first["rate_bytes_per_second"] is None and first["eta_seconds"] is None
    clock.now += 10
    t = b.document(DAEMON, [torrent(50)])["torrents"][0]
    # 50 pieces of 1 KiB in 10 s: 5 KiB/s; 50 KiB left: 10 s.
    assert t["rate_bytes_per_second"] == pytest.approx(5 * 1024)
    assert t["eta_seconds"] == pytest.approx(10.0)
    clock.now += 10
    done = b.document(DAEMON, [torrent(100)])["torrents"][0]
    assert done["eta_seconds"] == 0.0
    # Progress going backwards (a resync) restarts the measurement instead of a negative rate.
    clock.now += 1
    back = b.document(DAEMON, [torrent(10)])["torrents"][0]
    assert back["rate_bytes_per_second"] is None
    # Old samples fall out of the window: a stall shows up as rate 0, ETA unknown.
    clock.now += 100
    b.document(DAEMON, [torrent(10)])
    clock.now += 40
    stalled = b.document(DAEMON, [torrent(10)])["torrents"][0]
    assert stalled["rate_bytes_per_second"] == 0.0 and stalled["eta_seconds"] is None


def test_uptime_and_forgotten_torrents() -> None:
    clock = Clock()
    b = StatusBuilder("source", clock=clock)
    b.document(DAEMON, [torrent(1)])
    clock.now += 7
    doc = b.document(DAEMON, [])
    assert doc["daemon"]["uptime_seconds"] == 7.0
    assert doc["torrents"] == [] and not b._rates


def test_html_escapes_names_has_no_script_or_external_asset_and_refreshes() -> None:
    doc = StatusBuilder("source").document(
        DAEMON, [torrent(40, last_error=ErrorInfo("hash-mismatch", "<b>bad</b>", 1.0))]
    )
    page = status.render_html(doc)
    assert "Some.Show &lt;S01&gt;" in page and "<S01>" not in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page
    assert "<script" not in page.lower()
    assert (
        "http://" not in page
        and "https://" not in page
        and "//" not in page.replace("<!doctype", "").replace("</", "")
    )
    assert 'http-equiv="refresh"' in page and 'name="viewport"' in page
    assert 'value="40"' in page and "verified 40/100 (40.0%)" in page
    assert "Starting" in status.render_html(None)


def test_table_plain_output() -> None:
    doc = StatusBuilder("destination").document(DAEMON, [torrent(25)])
    out = io.StringIO()
    status.render_table(doc, out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("role: destination")
    assert "connections: 2" in lines[0] and "queue: 3" in lines[0]
    assert lines[1].split()[:3] == ["NAME", "STATE", "VERIFIED"]
    assert "Some.Show <S01>" in lines[2] and "25/100" in lines[2] and "25.0%" in lines[2]


def test_table_says_when_nothing_is_synced() -> None:
    out = io.StringIO()
    status.render_table(StatusBuilder("source").document(DAEMON, []), out)
    assert "(no torrent is being synced)" in out.getvalue()


def test_cli_reports_an_unreachable_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    from qbsync.qbittorrent.instance import free_port

    code = status.main(["--url", f"http://127.0.0.1:{free_port()}"])
    assert code == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("n", "text"), [(None, "-"), (0, "0 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")]
)
def test_human_bytes(n: float | None, text: str) -> None:
    assert status.human_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(None, "-"), (5, "5s"), (65, "1m05s"), (3700, "1h01m")])
def test_human_seconds(s: float | None, text: str) -> None:
    assert status.human_seconds(s) == text


async def test_http_root_serves_the_page_with_a_strict_content_security_policy(
    nursery: trio.Nursery,
) -> None:
    from tests.http.test_httpserver import request, start

    port, health = await start(nursery)
    empty = await request(port, "/")
    assert empty.status == 200 and b"Starting; no status yet." in empty.body
    b = StatusBuilder("destination")
    health.set_status_provider(lambda: b.document(DAEMON, [torrent(3)]))
    page = await request(port, "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["cache-control"] == "no-store"
    assert b"<h1>qbsync destination</h1>" in page.body and b"verified 3/100" in page.body
    head = await request(port, "/", "HEAD")
    assert head.status == 200 and head.body == b""
    assert (await request(port, "/?x=1")).status == 200  # a query string is ignored
    assert (await request(port, "/", "POST", [("Content-Length", "0")])).status == 405


async def test_destination_torrent_status_after_a_hash_mismatch(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A real destination store and writer: /status counts streamed and verified pieces and
    shows the last error with its code after a corrupt piece arrives."""
    from qbsync.wire.errors import ErrorCode
    from tests.destination.test_destination_writer import initialized

    t, d = await initialized(tmp_path, nursery)
    [before] = status.destination_torrents(d.store)
    assert (before.pieces_streamed, before.pieces_verified, before.last_error) == (0, 0, None)
    assert before.pieces_total == t.num_pieces and before.state == "streaming"
    assert await d.piece(t, 1) == ErrorCode.OK
    bad = bytearray(t.piece(0))
    bad[0] ^= 1
    assert await d.piece(t, 0, bytes(bad)) == ErrorCode.HASH_MISMATCH
    [after] = status.destination_torrents(d.store)
    assert after.pieces_streamed == 1 and after.pieces_verified <= 1
    assert after.last_error is not None and after.last_error.code == "hash-mismatch"
    doc = StatusBuilder("destination").document(
        status.destination_daemon(_Budget(), [1]),
        [after],
    )
    assert_valid(doc)
    assert doc["torrents"][0]["last_error"]["message"] == "SHA-1 of piece 0 does not match"


class _Budget:
    used = 0
    limit = 1


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False], ids=["rich", "plain"])
def test_table_prints_names_as_data_never_as_markup_or_terminal_codes(
    tty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, finding 7: ``[link=https://x]Ubuntu[/link]`` became a clickable link."""
    monkeypatch.setenv("COLUMNS", "400")
    name = "[link=https://x]Ubuntu[/link] \x1b]8;;https://y\x1b\\z"  # and a raw OSC 8
    err = ErrorInfo("io", "[bold red]fake[/] \u202egnp.exe", 1.0)
    doc = StatusBuilder("destination").document(DAEMON, [torrent(1, name=name, last_error=err)])
    out = _Tty() if tty else io.StringIO()
    status.render_table(doc, out)
    text = out.getvalue()
    assert "[link=https://x]Ubuntu[/link]" in text
    assert "[bold red]fake[/]" in text
    assert "\x1b]8" not in text  # no OSC 8 hyperlink, from the markup or from the name
    assert "\u202e" not in text and "\\u202e" in text
    assert "\\x1b]8;;https://y" in text
