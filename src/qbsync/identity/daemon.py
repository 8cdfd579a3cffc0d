"""What a daemon calls at start: its key, its pins and its admission policy, in one step."""

from __future__ import annotations

import logging

from ..config import Config
from ..log import kv
from .command import repair_command
from .keyfile import LoadedIdentity, identity_dir, load_identity
from .pins import PeerPolicy, PinStore

log = logging.getLogger("qbsync.identity")


def explicit_trust_missing(config: Config) -> str | None:
    """Why ``config`` cannot listen for its peer (``None`` if it can): a listening source
    never trusts on first use, so it needs ``--auth-token`` or ``--peer-fingerprint``. For
    the reverse-dialing configuration check (one line for a ConfigError, exit 2)."""
    if config.auth_token or config.peer_fingerprint:
        return None
    return (
        f"a listening {config.role} never trusts on first use: set --peer-fingerprint "
        f"(the peer's event=identity fingerprint) or --auth-token"
    )


def setup(config: Config, *, listening: bool | None = None) -> tuple[LoadedIdentity, PeerPolicy]:
    """Load (or create) ``config``'s identity key and build its :class:`PeerPolicy`.

    ``listening`` says whether this daemon accepts connections (default: the destination
    does, the source dials). A listening *source* never trusts on first use (issue 16's
    ``source --listen``): pass ``listening=True`` and it admits only ``--peer-fingerprint``
    keys, token holders, or keys pinned before. Raises
    :class:`~qbsync.identity.keyfile.IdentityError` (one line for the user).
    """
    directory = identity_dir(config)
    identity = load_identity(
        directory,
        key_text=config.identity,
        key_file=config.identity_file,
        create=not config.dry_run,
    )
    if listening is None:
        listening = config.role == "destination"
    policy = PeerPolicy(
        role=config.role,
        store=PinStore(directory, read_only=config.dry_run),
        fingerprints=frozenset(config.peer_fingerprint),
        token=bool(config.auth_token),
        allow_first_use=not (listening and config.role == "source"),
        command=repair_command(config.role, directory),
    )
    pinned = sorted(p for p in policy.store.pins() if not p.startswith("!"))
    log.info(
        "event=identity role=%s fingerprint=%s key=%s admission=%s pinned=%s",
        config.role,
        identity.fingerprint,
        kv(identity.origin),
        policy.mode,
        kv(",".join(pinned) or "none"),
    )
    return identity, policy
