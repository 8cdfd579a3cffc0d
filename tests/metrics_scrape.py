"""Read a running daemon's ``/metrics`` over HTTP: the integration tests and the benchmarks
both ask "how much of metric X is there now", and this is the one parser that answers.

A name may be given with or without its ``qbsync_`` prefix.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator, Mapping

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def full_name(name: str) -> str:
    return name if name.startswith("qbsync_") else f"qbsync_{name}"


def scrape(port: int, name: str = "") -> str:
    """A daemon's /metrics; only the family ``name`` (``?name[]=``, cheap for the daemon:
    the benchmarks poll every 20 ms) when given."""
    query = f"?name[]={name}" if name else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics{query}", timeout=5) as resp:
        return str(resp.read().decode())


def samples(port: int, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of ``name`` on the daemon's /metrics."""
    full = full_name(name)
    for line in scrape(port, full).splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == full:
            yield dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m.group(3))


def metric(port: int, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` (matching ``labels``) on a daemon's /metrics."""
    return sum(
        value
        for got, value in samples(port, name)
        if not labels or all(got.get(k) == v for k, v in labels.items())
    )
