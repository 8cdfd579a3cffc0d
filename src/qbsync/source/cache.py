"""The completion cache: torrents known to be finalized on the destination.

Persisted as one JSON object ``{info_hash: fingerprint}`` in ``--state-dir`` (not in
``--data``, which may be mounted read-only; see
docs/design-decisions.md#completion-cache-in-state-dir). The fingerprint is the comma-joined
indices of the selected files ("" = unknown: filled in at the next check instead of forcing a
resync, docs/design-decisions.md#unknown-fingerprint-is-filled-in).
The file format is in docs/state-format.md.

Writes are atomic (temp file, fsync, rename, fsync directory), so a crash leaves the old or
the new file, never a torn one. Saving runs in a thread; callers await it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import trio

from .. import metrics

log = logging.getLogger("qbsync.source.cache")

FILE_NAME = "completed_on_dest.json"


def fingerprint(files: list[dict[str, object]]) -> str:
    """Selected file indices (priority > 0), ascending, comma-joined."""
    return ",".join(
        str(int(str(f["index"])))
        for f in sorted(files, key=lambda f: int(str(f["index"])))
        if int(str(f.get("priority", 1))) > 0
    )


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class CompletionCache:
    def __init__(self, state_dir: Path, *, read_only: bool = False) -> None:
        self.path = state_dir / FILE_NAME
        self.read_only = read_only  # dry run: never write anything
        self._entries: dict[str, str] = {}
        self._lock = trio.Lock()

    def load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._entries = {}
            return
        except OSError as exc:
            log.warning("event=completion_cache_unreadable path=%s error=%s", self.path, exc)
            self._entries = {}
            return
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self._entries = {str(k): str(v) for k, v in data.items()}
        except ValueError as exc:
            log.warning("event=completion_cache_corrupt path=%s error=%s", self.path, exc)
            self._entries = {}
        metrics.completed_on_dest_cache_size.set(len(self._entries))
        log.info("event=completion_cache_loaded path=%s entries=%d", self.path, len(self._entries))

    def __contains__(self, info_hash: object) -> bool:
        return info_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def get(self, info_hash: str) -> str | None:
        return self._entries.get(info_hash)

    async def put(self, info_hash: str, fp: str) -> None:
        self._entries[info_hash] = fp
        await self.save()

    async def remove(self, info_hash: str) -> None:
        if self._entries.pop(info_hash, None) is not None:
            await self.save()

    async def save(self) -> None:
        metrics.completed_on_dest_cache_size.set(len(self._entries))
        if self.read_only:
            return
        data = json.dumps(self._entries, sort_keys=True, indent=0).encode()
        async with self._lock:
            try:
                await trio.to_thread.run_sync(atomic_write, self.path, data)
            except OSError as exc:
                # The in-memory cache stays right; the next save retries the write.
                log.error(
                    "event=completion_cache_save_failed path=%s code=io error=%s",
                    self.path,
                    exc,
                )
