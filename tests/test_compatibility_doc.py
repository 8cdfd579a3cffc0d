"""The README's Compatibility table stays true: every test file it cites exists and holds tests,
and every counterpart the issue promised a row for has one."""

from __future__ import annotations

import re

from tests.test_readme import README, ROOT, section

COMPAT = section("## Compatibility", README)


def test_cited_test_files_exist_and_hold_tests() -> None:
    cited = sorted(set(re.findall(r"`(tests/[\w/]+\.py)`", COMPAT)))
    assert len(cited) >= 5, cited
    for rel in cited:
        path = ROOT / rel
        assert path.is_file(), rel
        assert re.search(r"^(async )?def test_", path.read_text(), re.M), rel


def test_every_counterpart_has_a_row() -> None:
    rows = [line for line in COMPAT.splitlines() if line.startswith("| ") and "---" not in line]
    firsts = " ".join(r.split("|")[1] for r in rows)
    for needle in ("qBittorrent 4.5", "qBittorrent 5.0", "qBittorrent 5.2", "qBittorrent 5.3",
                   "Kubernetes", "Sonarr", "Radarr", "systemd"):  # fmt: skip
        assert needle in firsts, needle
