"""The package layout is the architecture: imports only go down the layers below, and no two
modules import each other, directly or in a circle.

``tests/wire/test_wire_imports.py`` holds the stricter rule for ``wire/`` (nothing of qbsync at
all);
this test holds the rule between every other part of ``src/qbsync``. The layers are also drawn
in ``docs/architecture.md``; a new module must be placed in one of them here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "qbsync"

# Bottom first. A unit may import its own unit and any unit of a lower layer, never a higher
# one, nor another unit of its own layer (same-layer units are siblings that must not know
# each other). ``qbsync`` is the package's ``__init__`` (only ``__version__``).
LAYERS: list[set[str]] = [
    {"qbsync", "wire", "bitfield", "paths", "torrent", "interrupt", "atomicfile"},
    {"log"},
    {"metrics"},
    {"ratelimit"},
    {"config"},
    {"http", "integrations", "identity"},
    {"qbittorrent"},
    {"source", "destination", "demo", "doctor"},
    {"cli"},
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qbsync"


def imported_modules(path: Path) -> set[str]:
    """Every ``qbsync`` module a file imports (at any depth of the file, function-local
    imports included: hiding an import in a function does not change the dependency)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qbsync")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qbsync":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (SRC / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    SRC / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(sub if is_module else target)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(m) for m in graph()}
    assert units - LAYER_OF.keys() == set(), "place the new package or module in LAYERS"


def test_imports_only_go_down() -> None:
    wrong = []
    for module, imports in graph().items():
        mine = unit_of(module)
        for target in imports:
            theirs = unit_of(target)
            if theirs == mine or theirs == "qbsync":
                continue
            if LAYER_OF[theirs] >= LAYER_OF[mine]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    g = graph()
    # package __init__ modules re-export their children by design; a cycle is between modules
    edges = {m: {t for t in ts if t in g and t != m} for m, ts in g.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PKG.glob("*/__init__.py")))
def test_every_package_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PKG / package / "__init__.py").read_text())) or ""
    assert "import" in doc.lower(), f"qbsync.{package}: the docstring names what it may import"


def test_architecture_page_names_only_modules_that_exist() -> None:
    """``docs/architecture.md`` cites modules as ``qbsync.x.y`` and paths as ``src/qbsync/...``;
    each must exist, so the page cannot drift from the code unnoticed."""
    import re

    text = (SRC.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in re.findall(r"src/qbsync/[\w/]*(?:\.py)?", text):
        if not (SRC.parent / path).exists():
            missing.append(path)
    for dotted in re.findall(r"\bqbsync(?:\.\w+)+", text):
        base = SRC / dotted.replace(".", "/")
        if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
            missing.append(dotted)
    assert missing == []
    for layer, units in enumerate(LAYERS):
        for unit in units - {"qbsync"}:
            assert re.search(rf"\| {layer} \| `src/qbsync/{unit}(\.py|/)`", text) or (
                f"`src/qbsync/{unit}.py`" in text
            ), f"{unit} is missing from the layer table"


def test_no_module_re_exports_another_modules_names() -> None:
    """Every caller imports a name from the module that owns it. ``from .x import y as y`` (the
    spelling that marks a re-export) is allowed only in a package's ``__init__``, whose job is
    to present the package (``qbsync.wire``'s public API)."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                for alias in node.names:
                    if alias.asname is not None and alias.asname == alias.name.split(".")[-1]:
                        found.append(f"{module_name(path)}: {alias.name} as {alias.asname}")
    assert found == []
