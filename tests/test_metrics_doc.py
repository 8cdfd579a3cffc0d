"""METRICS.md documents exactly the metrics in the registry, with the right type and labels.

prometheus_client names a counter *family* without its ``_total`` suffix (the exposed sample
is ``<family>_total``); the document uses the exposed name, so counters get the suffix back.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
from prometheus_client.metrics import MetricWrapperBase

from qbsync import metrics

METRICS_MD = Path(__file__).resolve().parents[1] / "METRICS.md"
ROW = re.compile(
    r"^\|\s*`(?P<name>qbsync_\w+)`\s*\|\s*(?P<type>\w+)\s*\|(?P<labels>[^|]*)\|"
    r"\s*(?P<role>[\w ]+?)\s*\|\s*(?P<meaning>[^|]*?)\s*\|\s*$"
)


@attrs.frozen
class Doc:
    type: str
    labels: tuple[str, ...]
    role: str
    meaning: str


def documented() -> dict[str, Doc]:
    docs: dict[str, Doc] = {}
    for line in METRICS_MD.read_text().splitlines():
        m = ROW.match(line)
        if m is None:
            assert not line.startswith("| `qbsync_"), f"malformed METRICS.md row: {line}"
            continue
        name = m["name"]
        assert name not in docs, f"{name} documented twice"
        labels = tuple(re.findall(r"`(\w+)`", m["labels"]))
        docs[name] = Doc(m["type"], labels, m["role"], m["meaning"])
    return docs


def exposed_name(family: str, kind: str) -> str:
    return family + "_total" if kind == "counter" else family


def registered() -> dict[str, Doc]:
    """Every metric object in qbsync.metrics, by exposed name."""
    labels: dict[str, tuple[str, ...]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            kind = str(obj._type)
            labels[exposed_name(obj._name, kind)] = tuple(obj._labelnames)
    out: dict[str, Doc] = {}
    for family in metrics.REGISTRY.collect():
        name = exposed_name(family.name, family.type)
        out[name] = Doc(family.type, labels.get(name, ()), "", "")
    return out


def test_every_registered_metric_is_documented() -> None:
    missing = sorted(set(registered()) - set(documented()))
    assert not missing, f"metrics missing from METRICS.md: {missing}"


def test_every_documented_metric_exists() -> None:
    extra = sorted(set(documented()) - set(registered()))
    assert not extra, f"METRICS.md documents metrics that do not exist: {extra}"


def test_types_and_labels_match() -> None:
    docs, regs = documented(), registered()
    for name in sorted(set(docs) & set(regs)):
        assert docs[name].type == regs[name].type, name
        assert docs[name].labels == regs[name].labels, name


def test_rows_are_complete() -> None:
    for name, doc in documented().items():
        assert doc.role in ("both", "source", "destination"), name
        assert len(doc.meaning) > 10, name
        assert name.startswith("qbsync_")
        if doc.type == "counter":
            assert name.endswith("_total"), name


def test_metric_names_cover_the_registry() -> None:
    """``metrics.metric_names()`` (family names) and the exposed names agree."""
    families = set(metrics.metric_names())
    assert families
    for name, doc in registered().items():
        family = name.removesuffix("_total") if doc.type == "counter" else name
        assert family in families
    # The document is not empty by accident.
    assert len(documented()) == len(families)
