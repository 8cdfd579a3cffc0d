"""Pinned peer keys and the admission policy built on them.

Admission of a peer key that has proven itself in the handshake (``PeerPolicy.admit``):

==========================  ==============================================  ===================
mode                        admitted                                        pinned
==========================  ==============================================  ===================
``--peer-fingerprint``      only the listed keys, nothing else, ever         nothing (the list)
``--auth-token``            pinned keys; an unpinned key that proves the     every admitted key
                            token (token-gated first admission)
neither (trust on first     the first key, while nothing is pinned; then     the first key
use)                        only the pinned key
==========================  ==============================================  ===================

A listening source never trusts on first use (``allow_first_use=False``): without a token or
``--peer-fingerprint`` it admits only keys already pinned.

Pins live in ``peers.json`` (0600) next to the identity key. The file is re-read whenever it
changes (one ``stat`` per handshake), so ``qbsync peers forget`` works on a running daemon
from its next handshake on; open connections of a forgotten peer are not cut. Every
read-modify-write of the file (the daemon pinning, the command forgetting) holds an exclusive
``flock`` on ``peers.lock``, and the file is replaced atomically.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from .. import atomicfile
from ..log import kv
from ..wire import ErrorCode, PeerKey, WireError
from ..wire.keys import parse_fingerprint

log = logging.getLogger("qbsync.identity")

PEERS_FILE = "peers.json"
LOCK_FILE = "peers.lock"


@attrs.frozen
class Pin:
    fingerprint: str
    public_key: str  # base64 of the raw 32-byte Ed25519 key
    role: str  # the peer's role
    how: str  # "first-use" or "token"
    pinned_at: str
    address: str = ""


class PinStore:
    """``<directory>/peers.json``: the pinned keys of one daemon. ``read_only`` keeps new
    pins in memory (a dry run writes nothing)."""

    def __init__(self, directory: Path, *, read_only: bool = False) -> None:
        self.directory = directory
        self.path = directory / PEERS_FILE
        self.read_only = read_only
        self._stamp: tuple[int, int, int] | None = None
        self._pins: dict[str, Pin] = {}
        # Seen since this process started: a pin file that then disappears was removed
        # behind the daemon's back (``qbsync peers forget`` rewrites it, never removes it).
        self._seen = False
        self._missing_logged = False

    # -- reading -----------------------------------------------------------------------------

    def pins(self) -> dict[str, Pin]:
        """The current pins by fingerprint (re-read if the file changed since last time)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            if self._seen and not self.read_only:
                # Treating it as "nothing pinned" would re-open trust on first use to whoever
                # connects next (an account that can rename the state directory could arrange
                # that): admit no new key until the daemon restarts.
                if not self._missing_logged:
                    self._missing_logged = True
                    log.error(
                        "event=peers_file_missing path=%s hint=%s",
                        kv(str(self.path)),
                        kv(
                            "the pin file disappeared while the daemon ran: no new key is "
                            "admitted until it is restored or the daemon restarts"
                        ),
                    )
                return {"!unreadable": Pin("!unreadable", "", "", "", "")}
            if not self.read_only:
                self._pins, self._stamp = {}, None
            return dict(self._pins)
        self._seen = True
        self._missing_logged = False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._pins = self._read()
            self._stamp = stamp
        return dict(self._pins)

    def _read(self) -> dict[str, Pin]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                raw = b""
                while chunk := os.read(fd, 1 << 16):
                    raw += chunk
            finally:
                os.close(fd)
            doc = json.loads(raw)
            return {
                p["fingerprint"]: Pin(**{f.name: p.get(f.name, "") for f in attrs.fields(Pin)})
                for p in doc.get("peers", [])
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # A damaged pin file must not turn into "nothing pinned" (that would re-open
            # trust on first use to anyone): refuse every unlisted key until it is fixed.
            log.error(
                "event=peers_file_unreadable path=%s error=%s hint=%s",
                kv(str(self.path)),
                kv(str(exc)),
                kv("fix or delete it (then the next peer is trusted on first use)"),
            )
            return {"!unreadable": Pin("!unreadable", "", "", "", "")}

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            self.directory / LOCK_FILE,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, pins: dict[str, Pin]) -> None:
        doc: dict[str, Any] = {
            "version": 1,
            "peers": [attrs.asdict(p) for p in pins.values() if not p.fingerprint.startswith("!")],
        }
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        atomicfile.replace_in(self.directory, PEERS_FILE, data)  # replaces only our pin file
        self._seen = True

    def pin(self, peer: PeerKey, how: str) -> None:
        pin = Pin(
            peer.fingerprint,
            base64.b64encode(peer.public_key).decode("ascii"),
            peer.role.value,
            how,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            peer.address,
        )
        if self.read_only:
            self._pins[pin.fingerprint] = pin
            return
        with self._locked():
            self._stamp = None
            pins = self.pins()
            pins[pin.fingerprint] = pin
            self._write(pins)
            self._stamp = None

    def forget(self, fingerprint: str | None) -> list[str]:
        """Remove one pin (``None``: all of them); the fingerprints removed."""
        with self._locked():
            self._stamp = None
            pins = self.pins()
            gone = [fp for fp in pins if fingerprint is None or fp == fingerprint]
            for fp in gone:
                del pins[fp]
            if gone:
                self._write(pins)
            self._stamp = None
        return [fp for fp in gone if not fp.startswith("!")]


@attrs.frozen
class Decision:
    """:meth:`PeerPolicy.decide`'s answer. ``action``: ``listed`` (in --peer-fingerprint),
    ``pinned`` (pinned before), ``pin-token`` / ``pin-first-use`` (admitted and pinned now),
    or ``refuse`` with ``why``; ``old`` is the pinned key a re-pair would forget."""

    action: str
    why: str = ""
    old: str = ""


@attrs.define
class PeerPolicy:
    """The :class:`qbsync.wire.Admission` of a daemon (see the module docstring's table).

    ``command`` is the ``qbsync peers ... forget {} ...`` line for this daemon (with its
    state flags; ``{}`` takes the fingerprint); it goes into the log line that says how to
    re-pair. ``allow_first_use=False`` for a listening source.
    """

    role: str  # this daemon's role
    store: PinStore
    fingerprints: frozenset[str] = frozenset()
    token: bool = False
    allow_first_use: bool = True
    command: str = "qbsync peers source forget {}"

    @property
    def mode(self) -> str:
        if self.fingerprints:
            return "peer-fingerprint"
        if self.token:
            return "token"
        return "first-use" if self.allow_first_use else "pinned-only"

    def decide(self, fingerprint: str, them: str) -> Decision:
        """What this policy does with a peer (role ``them``) proving ``fingerprint``: the one
        place the admission rules live (the daemon acts on it in :meth:`admit`; ``qbsync
        doctor`` only reports it). Reads the pins; changes nothing."""
        if self.fingerprints:
            if fingerprint in self.fingerprints:
                return Decision("listed")
            return Decision(
                "refuse",
                f"the {them}'s key {fingerprint} is not one of this {self.role}'s "
                f"--peer-fingerprint ({', '.join(sorted(self.fingerprints))})",
            )
        pins = self.store.pins()
        if fingerprint in pins:
            return Decision("pinned")
        if self.token:  # the endpoint has checked the token proof before asking
            return Decision("pin-token")
        if self.allow_first_use and not pins:
            return Decision("pin-first-use")
        pinned = sorted(p for p in pins if not p.startswith("!"))
        old = pinned[0] if len(pinned) == 1 else "--all"
        if "!unreadable" in pins:
            return Decision(
                "refuse", f"this {self.role}'s pin file {self.store.path} is unreadable"
            )
        if pinned:
            return Decision(
                "refuse",
                f"this {self.role} is paired with the {them} key {', '.join(pinned)}, and the "
                f"{them} presented {fingerprint}",
                old,
            )
        return Decision(
            "refuse",
            f"this {self.role} listens and never trusts on first use: admit the {them} "
            "with --peer-fingerprint or --auth-token",
        )

    def admit(self, peer: PeerKey, own_fingerprint: str) -> None:
        fp = peer.fingerprint
        them = peer.role.value
        decision = self.decide(fp, them)
        if decision.action == "refuse":
            self._refuse(peer, own_fingerprint, decision.why, decision.old)
        elif decision.action == "pin-token":
            self.store.pin(peer, "token")
            log.warning(
                "event=peer_pinned how=token role=%s peer=%s peer_fingerprint=%s "
                "own_fingerprint=%s",
                self.role,
                kv(peer.address),
                fp,
                own_fingerprint,
            )
        elif decision.action == "pin-first-use":
            self.store.pin(peer, "first-use")
            log.warning(
                "event=peer_first_use role=%s peer=%s peer_fingerprint=%s own_fingerprint=%s "
                "note=%s",
                self.role,
                kv(peer.address),
                fp,
                own_fingerprint,
                kv(
                    f"trust on first use: this {self.role} is now paired with this {them} "
                    f"and refuses every other {them} key; compare both fingerprints with the "
                    f"{them}'s event=identity log line. Pin explicitly with "
                    "--peer-fingerprint, or set --auth-token on both sides"
                ),
            )

    def _refuse(self, peer: PeerKey, own_fingerprint: str, why: str, old: str) -> None:
        them = peer.role.value
        repair = self.command.format(old) if old else ""
        log.error(
            "event=peer_refused code=unknown-peer role=%s peer=%s peer_fingerprint=%s "
            "own_fingerprint=%s reason=%s repair=%s",
            self.role,
            kv(peer.address),
            peer.fingerprint,
            own_fingerprint,
            kv(why),
            kv(
                f"if the {them} was re-created (new key), re-pair with: {repair}"
                if repair
                else "add the key to --peer-fingerprint if it is the right peer"
            ),
        )
        hint = (
            f"; if this {them} was re-created, run 'qbsync peers {self.role} forget {old}' "
            f"on the {self.role}"
            if old
            else ""
        )
        raise WireError(ErrorCode.UNKNOWN_PEER, f"{why}{hint}")


__all__ = ["PEERS_FILE", "Decision", "PeerPolicy", "Pin", "PinStore", "parse_fingerprint"]
