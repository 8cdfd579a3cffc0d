"""Who a daemon is and which peers it trusts: its Ed25519 identity key and its pins.

* :mod:`.keyfile` -- the daemon's private key: created on first start (0600) in the state
  directory, or given as a file or environment variable (a Kubernetes Secret);
  :func:`identity_dir` is the one place that says where each role keeps key and pins;
* :mod:`.pins` -- :class:`PinStore` (the pinned peer keys, a 0600 JSON file re-read on every
  handshake, so ``qbsync peers forget`` works on a running daemon) and :class:`PeerPolicy`,
  the :class:`qbsync.wire.Admission` the daemons hand to the wire: ``--peer-fingerprint``,
  token-gated first admission, or trust on first use;
* :mod:`.command` -- ``qbsync peers``.

Imports ``wire`` (for the fingerprint and the admission protocol), ``log`` and ``config``;
the daemons and the CLI import it.
"""

from .keyfile import IdentityError, LoadedIdentity, identity_dir, load_identity, parse_private_key
from .pins import PEERS_FILE, PeerPolicy, PinStore, parse_fingerprint

__all__ = [
    "PEERS_FILE",
    "IdentityError",
    "LoadedIdentity",
    "PeerPolicy",
    "PinStore",
    "identity_dir",
    "load_identity",
    "parse_fingerprint",
    "parse_private_key",
]
