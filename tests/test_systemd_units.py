"""Both systemd units pass ``systemd-analyze verify`` (Debian's ``systemd`` package; ``make
test`` installs it next to qbittorrent-nox).

``verify`` also checks that ``ExecStart=`` is an executable, and the units' path
(``/opt/qbsync/bin/qbsync``) is not one a test may create. So each unit is copied into a temp
directory with only that path rewritten to a stub executable there (the test asserts nothing
else differs), and verified with the host's own units (``network-online.target``,
``multi-user.target``) -- a ``--root`` would need a copy of those. ``verify`` prints unknown
or malformed settings as warnings and still exits 0, so any output at all fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("qbsync-source.service", "qbsync-destination.service")
EXEC_PATH = "/opt/qbsync/bin/qbsync"


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing: `make test` installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def _copy_with_stub(tmp_path: Path, unit: str, *, stub: bool = True) -> Path:
    exe = tmp_path / "bin" / "qbsync"
    if stub:
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    tmp_path.mkdir(parents=True, exist_ok=True)
    original = (DEPLOY / unit).read_text()
    assert original.count(f"ExecStart={EXEC_PATH} ") == 1, unit
    copy = tmp_path / unit
    copy.write_text(original.replace(f"ExecStart={EXEC_PATH} ", f"ExecStart={exe} "))
    changed = [
        (a, b)
        for a, b in zip(original.splitlines(), copy.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert len(changed) == 1 and changed[0][0].startswith("ExecStart="), changed
    return copy


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_both_units_verify_cleanly(tmp_path: Path) -> None:
    units = [_copy_with_stub(tmp_path, unit) for unit in UNITS]
    result = _verify(*units)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_verify_catches_a_missing_executable_and_a_bad_setting(tmp_path: Path) -> None:
    """The check can fail: without the stub, and with a misspelt Type=."""
    missing = _copy_with_stub(tmp_path / "missing", UNITS[0], stub=False)
    result = _verify(missing)
    assert result.returncode != 0 and "is not executable" in result.stderr
    bad = _copy_with_stub(tmp_path / "bad", UNITS[1])
    bad.write_text(bad.read_text().replace("Type=notify\n", "Type=notifyy\n"))
    result = _verify(bad)
    assert "Failed to parse service type" in result.stderr
