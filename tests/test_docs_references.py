"""Every reason the code gives lives in the repository.

Comments and docstrings cite ``docs/<file>.md#<anchor>``; each such reference must name an
existing file and a heading in it. References to documents outside the repository (the old
"D3", "B2", "spec §14" style) are refused: whoever reads the code cannot follow them.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
# The old style: a defect or section id of a document that is not in the repository.
FOREIGN = re.compile(
    r"\((?:fix(?:es|ing)? )?[DB]\d{1,2}\b|§\s?\d|\bspec §|source\.md|destination\.md"
)


def _sources() -> list[Path]:
    return [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]


def _anchors(doc: Path) -> set[str]:
    """GitHub-style anchors of the markdown headings in ``doc``."""
    out = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_docs_reference_resolves() -> None:
    seen = 0
    broken = []
    for path in _sources():
        if path.name == Path(__file__).name:
            continue
        for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
            name, anchor = match.groups()
            seen += 1
            doc = DOCS / name
            if not doc.is_file():
                broken.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no such file)")
            elif anchor and anchor not in _anchors(doc):
                broken.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no such heading)")
    assert seen >= 10  # the code does cite the docs
    assert broken == []


def test_no_references_to_documents_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _sources()
        if path.name != Path(__file__).name
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FOREIGN.search(line)
    ]
    assert offenders == []


def test_the_checks_catch_what_they_should() -> None:
    assert FOREIGN.search("never a reason to resync (D4)")
    assert FOREIGN.search("the completeness check (B2: counts covered bits)")
    assert FOREIGN.search("see spec §14.18")
    assert not FOREIGN.search("D4 = 'x'  # a variable")
    assert _anchors(DOCS / "design-decisions.md") >= {"reconnect-backoff-resets", "source"}
