"""Logging: one line per event on stderr, ``key=value`` pairs.

Call sites log ``event=<name> key=value ...`` messages; this module adds the time, level and
role so every line greps the same way. Values containing spaces or quotes are quoted with
:func:`kv`. Secrets never reach a log line: configs redact them (``config.redacted``) and the
auth token is never formatted anywhere.
"""

from __future__ import annotations

import logging
import sys
import time
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .wire.logfmt import kv

__all__ = ["kv", "paths_kv", "redact_url", "setup"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def paths_kv(value: tuple[str, ...] | str) -> str:
    """:func:`kv` of a path given as components (joined with ``/``) or as text."""
    return kv("/".join(value) if isinstance(value, tuple) else value)


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """The one form in which any URL is logged or shown (``--qb-url``, ``--arr-url``,
    ``--notify-url``, ``--print-config``): a password in the user-info part becomes ``***``,
    every query value becomes ``***`` (``?apikey=...``), the fragment is dropped. With
    ``keep_path=False`` only the scheme, host and port remain: a webhook URL's path is often its
    secret. Unparseable input is ``***`` as a whole."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "***"
    if not keep_path:
        return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{port}" if port else "")
    netloc = parts.netloc
    if parts.password is not None or parts.username is not None:
        host = netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        netloc = (f"{user}:***" if parts.password is not None else user) + "@" + host
    query = "&".join(
        f"{key}=***" if value else key
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class _Formatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        level = "warn" if record.levelno == logging.WARNING else record.levelname.lower()
        line = (
            f"time={ts}.{ms:03d}Z level={level} task={self.role} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", "\\n")
            line += f" traceback={kv(exc)}"
        return line


def setup(level: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Third-party libraries stay quiet: their failures reach us as exceptions, which our own
    # code logs once with a stable code (urllib3 would otherwise warn on every retry).
    for noisy in ("urllib3", "qbittorrentapi", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.ERROR if level != "debug" else logging.DEBUG)
