"""The wire package depends on nothing in qbsync outside ``wire/``.

Parsed with :mod:`ast`, not imported, so the rule holds for every import statement, including
ones inside functions or behind ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qbsync.wire

WIRE = Path(qbsync.wire.__file__).parent


def _qbsync_imports(path: Path) -> list[str]:
    """Every module inside qbsync that ``path`` imports, as a dotted name."""
    package = "qbsync.wire"  # every file checked is a direct child of the package
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "qbsync"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "qbsync":
                found.append(target)
    return found


def test_wire_imports_nothing_from_the_rest_of_qbsync() -> None:
    files = sorted(WIRE.glob("*.py"))
    assert len(files) >= 10  # the package is really there
    offenders = {
        f"{path.name}: {target}"
        for path in files
        for target in _qbsync_imports(path)
        if not (target == "qbsync.wire" or target.startswith("qbsync.wire."))
    }
    assert offenders == set()


def test_the_rule_sees_relative_imports_that_leave_the_package(tmp_path: Path) -> None:
    # The checker itself must catch what the rule forbids, or the test above proves nothing.
    bad = tmp_path / "bad.py"
    bad.write_text("from .. import metrics\nfrom ..config import HostPort\nimport qbsync.log\n")
    assert _qbsync_imports(bad) == ["qbsync", "qbsync.config", "qbsync.log"]
    good = tmp_path / "good.py"
    good.write_text("from . import codec\nfrom .errors import WireError\n")
    assert _qbsync_imports(good) == ["qbsync.wire", "qbsync.wire.errors"]
