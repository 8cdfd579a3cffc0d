"""Headless Chromium (Debian's ``chromium``; ``make test`` installs it) for the status-page
tests: the ``chromium`` fixture and :func:`browse`, one fresh profile per page load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(name="chromium", scope="session")
def chromium_fixture() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed (Debian: apt-get install chromium; `make test` does)"
        )
    return path


def browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    """What Chromium prints for ``url`` (``--dump-dom``: its DOM after loading;
    ``--screenshot=...``: nothing), with a fresh profile."""
    profile.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
