"""The status page, ``/status`` and ``qbsync status`` against real daemons mid-sync.

The page is loaded in headless Chromium (Debian's ``chromium``; ``make test`` installs it) the
way a browser would, with networking features that could reach beyond loopback turned off.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def qbsync_status(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "qbsync.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _mid_sync(rig: Rig, health: int) -> dict[str, Any]:
    """Wait until the source reports the torrent partly verified; return that document."""
    ih = rig.info_hash

    def partly() -> dict[str, Any]:
        code, doc = http_status(health, "/status")
        for t in doc.get("torrents", []) if code == 200 else []:
            if t["hash"] == ih and 0 < t["pieces_verified"] < t["pieces_total"]:
                return dict(doc)
        return {}

    return wait_until(partly, 60, 0.1, "source status shows the torrent mid-sync")


def test_status_page_json_and_table_against_running_daemons(
    rig: Rig, chromium: str, tmp_path: Path
) -> None:
    source, health = rig.start_source()
    rig.add_to_source(download_limit=256 * KiB)  # ~25 s: time to look at it mid-sync
    doc = _mid_sync(rig, health)
    assert_valid(doc)
    t = next(t for t in doc["torrents"] if t["hash"] == rig.info_hash)
    assert t["name"] == rig.seeded.name and t["size"] == rig.seeded.total_size
    assert t["pieces_total"] == rig.seeded.num_pieces
    assert t["pieces_streamed"] >= t["pieces_verified"]
    assert doc["daemon"]["connections"] >= 1 and doc["daemon"]["peer"].endswith(f":{rig.dest_port}")
    code, dest_doc = http_status(rig.dest_health, "/status")
    assert code == 200
    assert_valid(dest_doc)
    assert dest_doc["role"] == "destination" and dest_doc["daemon"]["connections"] >= 1

    # The page, as Chromium renders it (source side, mid-sync).
    dom = browse(chromium, f"http://127.0.0.1:{health}/", tmp_path / "chromium1", "--dump-dom")
    assert "<h1>qbsync source</h1>" in dom
    assert f'data-hash="{rig.info_hash}"' in dom
    assert f"<h2>{rig.seeded.name}</h2>" in dom
    assert f"/{rig.seeded.num_pieces} (" in dom  # "verified N/M (x%)"
    assert "<progress" in dom and 'id="d-connections"' in dom
    # A phone-sized screenshot renders (read-only page, no external assets to wait for).
    shot = Path(os.environ.get("QBSYNC_TEST_SCREENSHOT", tmp_path / "phone.png"))
    browse(
        chromium,
        f"http://127.0.0.1:{rig.dest_health}/",
        tmp_path / "chromium2",
        "--window-size=390,844",
        f"--screenshot={shot}",
    )
    assert shot.stat().st_size > 1000

    # `qbsync status`: the table and the raw JSON.
    table = qbsync_status("--url", f"http://127.0.0.1:{health}")
    assert table.splitlines()[0].startswith("role: source")
    assert any(line.startswith(rig.seeded.name) for line in table.splitlines()[2:]), table
    # --watch refreshes until Ctrl-C, which ends it cleanly.
    watch = subprocess.Popen(
        [
            *(sys.executable, "-m", "qbsync.cli", "status"),
            *("--url", f"http://127.0.0.1:{health}", "--watch", "--interval", "0.2"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    tables = 0
    while tables < 2:
        line = watch.stdout.readline()
        assert line, "qbsync status --watch ended early"
        tables += line.startswith("role: source")
    watch.send_signal(signal.SIGINT)
    assert watch.wait(120) == 0
    watch.stdout.close()
    raw = json.loads(qbsync_status("--url", f"http://127.0.0.1:{rig.dest_health}/", "--json"))
    assert_valid(raw)
    assert raw["role"] == "destination"

    # When the torrent is synced it leaves the list, and the page says nothing is in progress.
    rig.wait_synced()
    rig.assert_identical()
    dom = browse(chromium, f"http://127.0.0.1:{health}/", tmp_path / "chromium3", "--dump-dom")
    assert "No torrent is being synced right now." in dom
    assert "code=internal" not in source.log_text()
