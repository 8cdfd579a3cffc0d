"""The dashboard in a real browser: mid-sync, after a sync, after a hand-off, after restarts.

Real qbittorrent-nox instances, real ``qbsync source`` / ``qbsync destination`` processes, the
page loaded by headless Chromium (Debian's ``chromium``). Every wait is on something the test
can observe (a ``/status`` field, the page's DOM), never on time passing.

Screenshots go to a temporary directory; with ``QBSYNC_UPDATE_SCREENSHOTS=1`` they are written
to ``docs/`` (the README shows them), so a normal test run never changes the working tree.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.browser import browse, chromium_fixture  # noqa: F401  (fixture)
from tests.integration.source_rig import (
    Rig,
    http_status,
)
from tests.qbharness import KiB, wait_until
from tests.status_schema import assert_valid

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"


class Browser:
    def __init__(self, chromium: str, tmp: Path) -> None:
        self.chromium = chromium
        self.tmp = tmp
        self.runs = 0
        self.shots = DOCS if os.environ.get("QBSYNC_UPDATE_SCREENSHOTS") == "1" else tmp

    def _run(self, url: str, *extra: str) -> str:
        self.runs += 1
        return browse(self.chromium, url, self.tmp / f"chromium{self.runs}", *extra)

    def dom(self, port: int) -> str:
        """The page's DOM after Chromium loaded it."""
        return self._run(f"http://127.0.0.1:{port}/", "--dump-dom")

    def screenshot(
        self, port: int, name: str, width: int = 1000, height: int = 1100, *, docs: bool = True
    ) -> Path:
        """A PNG of the page (into docs/ when updating screenshots and ``docs``)."""
        shot = (self.shots if docs else self.tmp) / name
        self._run(
            f"http://127.0.0.1:{port}/", f"--window-size={width},{height}", f"--screenshot={shot}"
        )
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, shot
        return shot


def status_of(port: int) -> dict[str, Any]:
    """The daemon's /status document; {} while it does not answer (restarting)."""
    try:
        code, doc = http_status(port, "/status")
    except OSError:
        return {}
    return dict(doc) if code == 200 and isinstance(doc, dict) else {}


def status_when(port: int, pred: Callable[[dict[str, Any]], bool]) -> Callable[[], dict[str, Any]]:
    """A ``wait_until`` predicate: the document once ``pred`` holds for it, else {}."""

    def check() -> dict[str, Any]:
        doc = status_of(port)
        return doc if doc and pred(doc) else {}

    return check


def kinds(doc: dict[str, Any], info_hash: str) -> list[str]:
    """The activity kinds recorded for ``info_hash``, newest first."""
    return [e["kind"] for e in doc["activity"]["recent"] if e["hash"] == info_hash]


def since_complete(doc: dict[str, Any], info_hash: str, kind: str) -> float:
    """The ``since_complete_seconds`` of ``info_hash``'s newest ``kind`` event (must be known)."""
    event = next(
        e for e in doc["activity"]["recent"] if e["hash"] == info_hash and e["kind"] == kind
    )
    value = event["since_complete_seconds"]
    assert isinstance(value, (int, float)), event
    return float(value)


def chart_peak(dom: str) -> float:
    m = re.search(r'<svg id="chart"[^>]*data-peak="([0-9.]+)"', dom)
    assert m, "no throughput chart on the page"
    return float(m.group(1))


def qbsync_status(port: int) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "qbsync.cli", "status", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dashboard_mid_sync_after_sync_after_handoff_and_after_restarts(
    rig: Rig, chromium: str, tmp_path: Path
) -> None:
    browser = Browser(chromium, tmp_path)
    ih, name, size = rig.info_hash, rig.seeded.name, rig.seeded.total_size
    # --min-space 0: no hand-off yet (the torrent is a candidate once synced).
    source, health = rig.start_source("--min-space", "0", "--min-seeding-time", "0")
    rig.add_to_source(download_limit=256 * KiB)  # ~25 s: time to look at it mid-sync

    # -- mid-sync: named for what happens, on all three views ---------------------------------
    def mid_sync() -> dict[str, Any]:
        doc = status_of(health)
        for t in doc.get("torrents", []):
            if (
                t["hash"] == ih
                and t["state"] == "downloading + streaming"
                and 0 < t["pieces_verified"] < t["pieces_total"]
            ):
                return doc
        return {}

    doc = wait_until(mid_sync, 60, 0.1, "the source shows the torrent downloading + streaming")
    assert_valid(doc)
    [peer] = doc["peers"]
    assert peer["address"] == f"127.0.0.1:{rig.dest_port}" and peer["role"] == "destination"
    assert peer["auth"] == "key + token" and peer["connections"] >= 1
    assert str(peer["fingerprint"]).startswith("SHA256:")  # the destination's pinned key
    dom = browser.dom(health)
    assert '<span class="chip state">downloading + streaming</span>' in dom
    assert f'data-address="127.0.0.1:{rig.dest_port}"' in dom
    assert "<script" not in dom.lower()
    table = qbsync_status(health)
    assert any(
        line.startswith(name) and "downloading + streaming" in line for line in table.split("\n")
    )
    # The destination names its source instead of its listen port.
    dest = wait_until(lambda: status_of(rig.dest_health), 30, 0.1, "destination status")
    assert_valid(dest)
    assert [p["address"] for p in dest["peers"]] == ["127.0.0.1"]
    assert dest["daemon"]["peer"] == "127.0.0.1"
    dest_dom = browser.dom(rig.dest_health)
    assert 'data-address="127.0.0.1"' in dest_dom and "listening on" not in dest_dom
    mid_source = browser.screenshot(health, "dashboard-mid-sync.png")

    # -- after the sync: history, totals, chart, hand-off candidate ---------------------------
    rig.wait_synced()

    def synced_with_chart() -> dict[str, Any]:
        doc = status_of(health)
        if not doc or kinds(doc, ih) != ["synced"]:
            return {}
        if not any(c["hash"] == ih for c in doc["handoff_candidates"]):
            return {}  # the monitor has not seen the synced tag yet
        if not any(r > 0 for r in (doc["throughput"] or {}).get("bytes_per_second", [])):
            return {}
        return doc

    doc = wait_until(synced_with_chart, 60, 0.2, "synced in the activity log, chart drawn")
    assert_valid(doc)
    assert doc["torrents"] == []
    [event] = doc["activity"]["recent"]
    assert event["size"] == size and event["name"] == name
    assert event["duration_seconds"] is not None and event["duration_seconds"] >= 0
    assert event["since_complete_seconds"] is not None and event["since_complete_seconds"] >= 0
    totals = doc["activity"]["totals"]
    assert totals["all"] == {"bytes": size, "synced": 1, "handed_off": 0, "failed": 0}
    assert totals["today"] == totals["all"]
    assert doc["disk"]["free_bytes"] > 0 and doc["disk"]["min_space_bytes"] == 0
    dom = browser.dom(health)
    assert f'data-kind="synced" data-hash="{ih}"' in dom
    assert chart_peak(dom) > 0 and '<path class="bars"' in dom
    assert f'<li data-hash="{ih}">' in dom  # next hand-off candidate
    assert "synced · ready to seed" in qbsync_status(health)
    dest = wait_until(
        status_when(rig.dest_health, lambda d: kinds(d, ih) == ["synced"]),
        30,
        0.2,
        "the destination's activity log shows the sync",
    )
    assert_valid(dest)
    assert dest["activity"]["totals"]["all"]["synced"] == 1
    # The source sent how long ago the torrent completed there (a duration, not a clock).
    assert since_complete(dest, ih, "synced") >= 0
    dest_dom = browser.dom(rig.dest_health)
    assert chart_peak(dest_dom) > 0 and "complete on source → ready here in" in dest_dom
    browser.screenshot(health, "dashboard-after-sync.png", docs=False)
    browser.screenshot(rig.dest_health, "dashboard-destination.png")
    browser.screenshot(health, "dashboard-phone.png", width=390, height=1600)

    # -- restart the source under disk pressure: it hands off; the history survived ----------
    assert source.stop() == 0
    source, health = rig.start_source("--min-space", str(1 << 20), "--min-seeding-time", "0")
    doc = wait_until(
        status_when(health, lambda d: kinds(d, ih) == ["handed off", "synced"]),
        90,
        0.2,
        "the source's activity shows the hand-off above the sync from before the restart",
    )
    assert_valid(doc)
    handed = doc["activity"]["recent"][0]
    assert handed["size"] == size and handed["since_complete_seconds"] is not None
    assert doc["activity"]["totals"]["all"] == {
        "bytes": size,
        "synced": 1,
        "handed_off": 1,
        "failed": 0,
    }
    dom = browser.dom(health)
    assert f'data-kind="handed off" data-hash="{ih}"' in dom
    assert f'data-kind="synced" data-hash="{ih}"' in dom
    assert "below: handing off synced torrents" in dom
    assert chart_peak(dom) > 0  # the last hour's throughput was saved at the restart
    browser.screenshot(health, "dashboard-after-handoff.png")
    # The removal that follows the hand-off (cache pruned) is not a second hand-off.
    wait_until(lambda: "event=handoff_removed" in source.log_text(), 30, 0.2, "cache pruned")
    assert kinds(status_of(health), ih) == ["handed off", "synced"]
    dest = wait_until(
        status_when(rig.dest_health, lambda d: "handed off" in kinds(d, ih)),
        30,
        0.2,
        "the destination's activity shows the hand-off",
    )
    assert since_complete(dest, ih, "handed off") >= since_complete(dest, ih, "synced")
    assert "complete on source → seeding here in" in browser.dom(rig.dest_health)

    # -- restart the destination: its history is still there ---------------------------------
    assert rig.dest is not None
    assert rig.dest.stop() == 0
    rig.dest.start()
    dest = wait_until(lambda: status_of(rig.dest_health), 30, 0.2, "destination back")
    assert_valid(dest)
    assert kinds(dest, ih) == ["handed off", "synced"]
    assert dest["activity"]["totals"]["all"]["handed_off"] == 1
    dest_dom = browser.dom(rig.dest_health)
    assert f'data-kind="synced" data-hash="{ih}"' in dest_dom and chart_peak(dest_dom) > 0

    # The logs are private files in each daemon's state directory.
    for path in (rig.state_dir / "activity.json", rig.dst_data / ".qbsync" / "activity.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert mid_source.exists()
