"""README.md stays true: its flag tables match config.py's Option tables, its commands are
accepted by the real CLI, and the files and endpoints it points to exist."""

from __future__ import annotations

import os
import re
import secrets
import shlex
from pathlib import Path

import pytest

from qbsync import cli
from qbsync.config import Role, options_for
from qbsync.http.server import ROUTES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TABLE_ROW = re.compile(r"^\|\s*`(--[\w-]+)`\s*\|\s*`(QBSYNC_\w+)`\s*\|\s*(.*?)\s*\|(.*)\|\s*$")


def section(heading: str, text: str = README) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n") + len(heading) + 1
    rest = text[start:]
    pattern = re.compile(rf"^#{{1,{len(level)}}} ", re.M)
    m = pattern.search(rest)
    return rest[: m.start()] if m else rest


def table(role: Role) -> dict[str, tuple[str, str]]:
    """``flag -> (env var, default cell)`` of the README table for ``role``."""
    env_section = section("## Environment variables")
    heading = "### Source server" if role == "source" else "### Destination server"
    rows: dict[str, tuple[str, str]] = {}
    for line in section(heading, env_section).splitlines():
        m = TABLE_ROW.match(line)
        if m:
            assert m[1] not in rows, f"{m[1]} listed twice"
            rows[m[1]] = (m[2], m[3])
    return rows


@pytest.mark.parametrize("role", ["source", "destination"])
def test_every_option_is_in_the_table(role: Role) -> None:
    rows = table(role)
    for opt in options_for(role):
        assert opt.flag in rows, f"{opt.flag} missing from the README {role} table"
        env, default = rows[opt.flag]
        assert env == opt.env(role), opt.flag
        if opt.required:
            assert default == "(required)", opt.flag
        elif opt.default:
            assert default == f"`{opt.default}`", (opt.flag, default)
        else:
            # Empty default: "(empty)" or a parenthesised explanation, never a literal value.
            assert default.startswith("(") and default.endswith(")"), (opt.flag, default)


@pytest.mark.parametrize("role", ["source", "destination"])
def test_table_has_no_unknown_flags(role: Role) -> None:
    known = {opt.flag for opt in options_for(role)}
    assert set(table(role)) <= known, set(table(role)) - known


def test_conventional_variables_documented() -> None:
    text = section("### Conventional variables")
    for name in ("HTTP_PORT", "HEALTH_PORT", "GRPC_PORT", "PORT"):
        assert f"`{name}`" in text


def test_health_endpoints_documented() -> None:
    text = section("## Health and metrics")
    for route in ROUTES:
        assert f"`{route}`" in text, route


def commands(role: Role) -> list[list[str]]:
    """Every ``qbsync <role>`` command line in the README's bash blocks, as argv lists."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            m = re.search(rf"(?:^|\s|/)qbsync {role}(\s.*)?$", line)
            if m:
                args = shlex.split(m[1] or "")
                found.append([role, *args])
    return found


@pytest.mark.parametrize("role", ["source", "destination"])
def test_readme_commands_are_valid(
    role: Role, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("QBSYNC_") or name in ("HTTP_PORT", "HEALTH_PORT", "GRPC_PORT", "PORT"):
            monkeypatch.delenv(name)
    argvs = commands(role)
    assert len(argvs) >= 2, argvs  # the seed command and the by-hand one
    for argv in argvs:
        argv = [a.replace("$TOKEN", secrets.token_hex(32)) for a in argv]
        assert cli.main([*argv, "--print-config"]) == 0, argv
        capsys.readouterr()


def test_seed_quick_start_commands_verbatim() -> None:
    assert (
        "qbsync source \\\n  --data /downloads \\\n  --qb-url http://localhost:8080 \\\n"
        "  --destination-addr 192.168.1.100:50051\n" in README
    )
    assert (
        "qbsync destination \\\n  --data /downloads \\\n  --qb-url http://localhost:8080 \\\n"
        "  --listen :50051\n" in README
    )


def test_linked_files_exist() -> None:
    for link in re.findall(r"\]\(((?:deploy|METRICS|src)[^)#]*)\)", README):
        assert (ROOT / link).exists(), link
    for name in ("Dockerfile", "METRICS.md", "deploy/docker-compose.yml"):
        assert (ROOT / name).exists(), name


def test_how_it_works_section_exists() -> None:
    assert "## How it works" in README
    assert "make test" in section("## Development")


def test_every_test_the_readme_cites_exists() -> None:
    """The Security section's threat model cites a test for each line (``tests/x.py::name``,
    then ``::other`` for more in the same file): each must exist, or the table is a claim."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    missing, current, seen = [], "", 0
    for m in re.finditer(r"`(tests/[\w/.]+\.py)(?:::(\w+))?`|`::(\w+)`", text):
        current = m.group(1) or current
        name = m.group(2) if m.group(1) else m.group(3)
        seen += 1
        path = root / current
        if not path.is_file():
            missing.append(current)
        elif name and not re.search(rf"^(async )?def {name}\(", path.read_text(), re.M):
            missing.append(f"{current}::{name}")
    assert seen >= 40 and missing == []
