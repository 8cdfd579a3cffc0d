"""``make image-test`` succeeds with a clear SKIPPED line where no Docker daemon can start
(the real build and smoke test are run by CI via ``.ci/run``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_image_test_skips_cleanly_when_dockerd_cannot_start(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("dockerd", "debootstrap"):  # present (no apt-get), but dockerd fails at once
        (fake / name).write_text('#!/bin/sh\necho "dockerd: operation not permitted" >&2\nexit 1\n')
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "image-test")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if "SKIPPED" in ln]
    if os.geteuid() == 0:
        assert line.startswith("image-test: SKIPPED: dockerd cannot start here"), line
        assert "operation not permitted" in line
    else:
        assert (
            line == "image-test: SKIPPED: needs root to run dockerd (run make image-test as root)"
        )
    assert not list(Path("/tmp").glob("qbsync-image-test.*/dockerd.pid"))
