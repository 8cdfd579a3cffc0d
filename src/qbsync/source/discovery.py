"""What the source remembers about torrents it does not track yet: when to probe each again,
and which ones wait for a tracked torrent that shares a hard-linked file with them.

One owner for these facts (docs/architecture.md, "Who assigns what"): before this class the
orchestrator kept three maps keyed by hash and changed them from five places, so a waiter
could be released without its probe back-off being cleared. Every transition is a method
here, with no qBittorrent, clock or registry of its own: the caller passes the time and the
hashes it tracks, and ``tests/source/test_discovery.py`` drives it as pure logic.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

FileIds = frozenset[tuple[int, int]]  # (device, inode) of files that have other links


class Discovery:
    """Probe back-off and the hard-link gate for the torrents discovery looks at.

    Hard links: a torrent sharing a file (same device and inode here) with a torrent that is
    being synced waits until that one is finalized, so the destination links the shared file
    from the finalized copy instead of receiving and storing it twice. Only torrents already
    tracked can block, and a waiting torrent is not tracked, so nothing waits on itself or in
    a circle; a blocker that fails or is removed is untracked too, which releases its waiters.
    """

    def __init__(self) -> None:
        self._retry_at: dict[str, float] = {}  # hash -> when discovery may probe it again
        # The gate's file identities, kept for tracked torrents and for those waiting alike.
        self._link_ids: dict[str, FileIds] = {}
        self._waiting: dict[str, str] = {}  # waiting hash -> the tracked hash it waits on

    # -- probe back-off ---------------------------------------------------------------------

    def due(self, h: str, now: float) -> bool:
        """May discovery probe ``h`` at ``now``? (never probed, or its back-off is over)"""
        return self._retry_at.get(h, 0.0) <= now

    def retry_at(self, h: str, when: float) -> None:
        """Probe ``h`` again no sooner than ``when`` (a refusal, a failure, a dry run)."""
        self._retry_at[h] = when

    def keep_listed(self, listed: Container[str]) -> None:
        """Forget the back-off of torrents qBittorrent no longer lists (maintenance)."""
        self._retry_at = {h: v for h, v in self._retry_at.items() if h in listed}

    # -- hard-link gate ---------------------------------------------------------------------

    def gate(self, h: str, ids: FileIds, active: Iterable[str]) -> str | None:
        """Record ``h``'s linked files; return the active tracked torrent (of ``active``)
        that shares one of them and must be finalized first, or None when ``h`` may start."""
        self._link_ids[h] = ids
        if not ids:
            return None
        for other in active:
            if other != h and self._link_ids.get(other, frozenset()) & ids:
                return other
        return None

    def wait(self, h: str, blocker: str) -> None:
        """``h`` waits for ``blocker``: no probe until :meth:`release` lets it go."""
        self._retry_at[h] = float("inf")
        self._waiting[h] = blocker

    def release(self, tracked: Container[str]) -> None:
        """Let every waiter whose blocker is no longer tracked be probed at once, and drop the
        file identities of torrents that are neither tracked nor waiting."""
        for h, blocker in list(self._waiting.items()):
            if blocker not in tracked:
                del self._waiting[h]
                self._retry_at.pop(h, None)
        for h in list(self._link_ids):
            if h not in tracked and h not in self._waiting:
                del self._link_ids[h]

    @property
    def anyone_waiting(self) -> bool:
        """A finalized torrent may unblock someone: worth waking discovery for."""
        return bool(self._waiting)

    def waiting_for(self) -> Mapping[str, str]:
        """Waiting hash -> its blocker (read-only view, for tests and the log)."""
        return dict(self._waiting)
