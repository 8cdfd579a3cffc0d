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
    apt = tmp_path / "apt"  # a mirror of its own: the test does not depend on this machine's
    apt.mkdir()
    (apt / "sources.list").write_text("deb http://mirror.test/debian bookworm main\n")
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "APT_ETC": str(apt),
    }
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


# ---------------------------------------------------------------------------------------------
# .ci/debian-mirror: the mirror comes from the machine's apt sources, never from the repository.

MIRROR_SCRIPT = ROOT / ".ci" / "debian-mirror"


def _mirror(tmp_path: Path, files: dict[str, str], codename: str = "bookworm") -> tuple[int, str]:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for rel, text in files.items():
        (etc / rel).write_text(text)
    os_release = tmp_path / "os-release"
    os_release.write_text(f'NAME="Debian GNU/Linux"\nVERSION_CODENAME={codename}\n')
    env = {**os.environ, "APT_ETC": str(etc), "OS_RELEASE": str(os_release)}
    result = subprocess.run(
        [str(MIRROR_SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    return result.returncode, (result.stdout if result.returncode == 0 else result.stderr).strip()


def test_mirror_from_deb822_sources_skips_security_and_disabled_and_vendor(
    tmp_path: Path,
) -> None:
    sources = (
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: stable\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.mirror.test/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.mirror.test/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.mirror.test/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.test/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert _mirror(tmp_path, {"sources.list.d/debian.sources": sources}) == (
        0,
        "http://mirror.test/debian",
    )


def test_mirror_from_one_line_sources_with_options(tmp_path: Path) -> None:
    files = {
        "sources.list": "# deb http://commented.test/debian bookworm main\n"
        "deb http://security.test/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://local.test:3142/debian bookworm main\n",
        "sources.list.d/vendor.list": "deb https://vendor.example/apt cloud-sdk main\n",
        "sources.list.d/ignored.list.disabled": "deb http://disabled.test/debian bookworm main\n",
    }
    assert _mirror(tmp_path, files) == (0, "http://local.test:3142/debian")


def test_mirror_without_a_known_release_takes_a_debian_archive_path(tmp_path: Path) -> None:
    files = {"sources.list": "deb https://vendor.example/apt stable main\n"
             "deb http://m.test/debian sid main\n"}  # fmt: skip
    assert _mirror(tmp_path, files, codename="")[1] == "http://m.test/debian"


def test_no_debian_mirror_configured_is_an_error_not_a_guess(tmp_path: Path) -> None:
    code, err = _mirror(
        tmp_path, {"sources.list.d/vendor.list": "deb https://vendor.example/apt stable main\n"}
    )
    assert code == 1 and "no Debian archive" in err


def test_no_mirror_host_is_written_in_the_ci_scripts() -> None:
    for name in ("image-test", "test-qb5", "debian-mirror", "run"):
        text = (ROOT / ".ci" / name).read_text()
        assert "debian.org" not in text, name
        assert "$(.ci/debian-mirror)" in text or name in ("debian-mirror", "run"), name


def test_image_test_skips_when_apt_names_no_debian_mirror(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    (apt / "sources.list").write_text("deb https://vendor.example/apt stable main\n")
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "image-test")],
        capture_output=True,
        text=True,
        env={**os.environ, "APT_ETC": str(apt), "TMPDIR": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if "SKIPPED" in ln]
    if os.geteuid() == 0:
        assert line == "image-test: SKIPPED: no Debian mirror in this machine's apt sources"
    else:
        assert "needs root" in line
