"""The ``key=value`` quoting every qbsync log line uses.

It lives in the wire package because the wire may import nothing else from qbsync and logs in
the same format; :mod:`qbsync.log` re-exports it for the rest of the code.
"""

from __future__ import annotations


def kv(value: object) -> str:
    """Format one value for a ``key=value`` line (quoted when it has spaces or quotes)."""
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text
