"""The cryptography of the handshake and of every frame after it (all from ``cryptography``).

Nothing here is hand-written crypto: Ed25519 signatures, X25519, HKDF-SHA256, HMAC-SHA256 and
ChaCha20-Poly1305 (RFC 8439) come from the ``cryptography`` package and ``hmac``/``hashlib``.
This module only fixes *which bytes* go into them, in one place, so the spec
(``docs/wire-protocol.md``, "Handshake" and "Frame tags") and the code cannot drift apart:

* :func:`transcript_hash` -- both ``Hello`` bodies, source first;
* :func:`signed_bytes` / :func:`token_mac` -- what each side signs with its identity key and,
  when a token is configured, MACs with the token;
* :func:`derive_frame_keys` -- the two per-direction frame keys from the ephemeral X25519
  exchange;
* :class:`FrameMac` -- the 16-byte tag of every frame after the sender's ``Auth``: the
  ChaCha20-Poly1305 tag of an empty plaintext whose associated data is the frame header and
  body, with a per-direction frame counter as the nonce.

Admission (which peer keys are accepted) is *not* decided here: the wire asks an injected
:class:`Admission` (``qbsync.identity`` implements pinning), so the protocol library stays
free of files and policy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from typing import Final, Protocol

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.poly1305 import Poly1305

from . import messages as m

PUBLIC_KEY_SIZE: Final = 32  # Ed25519 and X25519 raw public keys
SIGNATURE_SIZE: Final = 64
TOKEN_MAC_SIZE: Final = 32
TAG_SIZE: Final = 16

TRANSCRIPT_LABEL: Final = b"qbsync-handshake-v2\0"
SIGN_LABEL: Final = b"qbsync-sign-v2\0"
TOKEN_LABEL: Final = b"qbsync-token-v2\0"
KEYS_INFO: Final = b"qbsync-frame-keys-v2"

# Frames whose header + body are at most this long are tagged with one AEAD call over a joined
# copy; longer ones (pieces, big InitTorrents) are fed to Poly1305 part by part, never copied.
_JOIN_MAX: Final = 64 * 1024
_ZERO16: Final = bytes(16)


def raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """``SHA256:`` + unpadded base64 of SHA-256(raw 32-byte Ed25519 public key), the form
    OpenSSH prints. What users compare, pin and pass to ``--peer-fingerprint``."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


_FINGERPRINT_RE: Final = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def parse_fingerprint(raw: str) -> str:
    """A ``SHA256:...`` fingerprint as :func:`fingerprint` prints it (``ValueError`` if not)."""
    value = raw.strip()
    if not _FINGERPRINT_RE.fullmatch(value):
        raise ValueError(
            f"not a key fingerprint: {raw!r} (expected SHA256: and 43 base64 characters, as "
            "printed by 'qbsync peers ... list' and in the peer's event=identity log line)"
        )
    return value


def transcript_hash(source_hello: bytes, destination_hello: bytes) -> bytes:
    """SHA-256 over both ``Hello`` bodies exactly as sent, source first (independent of who
    dialed). Both carry the nonces and the identity and ephemeral keys, so every proof and
    both frame keys are bound to this one connection."""
    return hashlib.sha256(
        TRANSCRIPT_LABEL + struct.pack(">I", len(source_hello)) + source_hello + destination_hello
    ).digest()


def _proof_input(label: bytes, sender: m.Role, version: int, transcript: bytes) -> bytes:
    return label + sender.value.encode("ascii") + b"\0" + struct.pack(">H", version) + transcript


def signed_bytes(sender: m.Role, version: int, transcript: bytes) -> bytes:
    """What ``sender`` signs with its identity key. The role stops a reflected signature, the
    transcript (fresh nonces and ephemeral keys) a replayed one."""
    return _proof_input(SIGN_LABEL, sender, version, transcript)


def sign(identity: Ed25519PrivateKey, sender: m.Role, version: int, transcript: bytes) -> bytes:
    return identity.sign(signed_bytes(sender, version, transcript))


def verify_signature(
    public_key: bytes, signature: bytes, sender: m.Role, version: int, transcript: bytes
) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, signed_bytes(sender, version, transcript)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def token_mac(token: bytes, sender: m.Role, version: int, transcript: bytes) -> bytes:
    """The sender's proof of the shared token (HMAC-SHA256; the token never crosses the wire)."""
    return hmac.new(
        token, _proof_input(TOKEN_LABEL, sender, version, transcript), "sha256"
    ).digest()


def derive_frame_keys(
    own_ephemeral: X25519PrivateKey, peer_ephemeral: bytes, transcript: bytes
) -> tuple[bytes, bytes]:
    """``(source->destination key, destination->source key)``: HKDF-SHA256 over the X25519
    shared secret, salted with the transcript hash. Raises ``ValueError`` for a peer key that
    yields no shared secret (a low-order point)."""
    shared = own_ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_ephemeral))
    okm = HKDF(algorithm=SHA256(), length=64, salt=transcript, info=KEYS_INFO).derive(shared)
    return okm[:32], okm[32:]


def frame_nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce of the ``counter``-th tagged frame of one direction."""
    return b"\0\0\0\0" + struct.pack(">Q", counter)


class FrameMac:
    """Tags for one direction of a connection: ``tag(counter, parts)`` is exactly
    ``ChaCha20Poly1305(key).encrypt(frame_nonce(counter), b"", b"".join(parts))``.

    For long frames the same tag is computed part by part (:meth:`begin`), so a 16 MiB piece
    is never joined into a copy and can be fed as it is written or received: ChaCha20-Poly1305
    of an empty plaintext is, by RFC 8439 section 2.8, Poly1305 keyed with the first 32 bytes
    of the ChaCha20 block for (key, block counter 0, nonce) over ``aad || zero pad to 16 ||
    le64(len(aad)) || le64(0)``. Both paths use the library's primitives;
    ``tests/identity/test_pairing.py`` checks them against each other.
    """

    __slots__ = ("_aead", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._aead = ChaCha20Poly1305(key)

    def begin(self, counter: int) -> IncrementalTag:
        """An incremental tag for frame ``counter``: feed the parts, then :meth:`finalize`."""
        nonce = frame_nonce(counter)
        block = Cipher(algorithms.ChaCha20(self._key, b"\0\0\0\0" + nonce), mode=None)
        return IncrementalTag(block.encryptor().update(bytes(32)))

    def tag(self, counter: int, parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
        total = sum(len(p) for p in parts)
        if total <= _JOIN_MAX:
            return self._aead.encrypt(frame_nonce(counter), b"", b"".join(parts))
        inc = self.begin(counter)
        for part in parts:
            inc.update(part)
        return inc.finalize()

    def check(
        self, counter: int, parts: Sequence[bytes | bytearray | memoryview], tag: bytes
    ) -> bool:
        return hmac.compare_digest(self.tag(counter, parts), tag)


class IncrementalTag:
    """One frame's tag, fed in order (see :class:`FrameMac`)."""

    __slots__ = ("_poly", "_total")

    def __init__(self, one_time_key: bytes) -> None:
        self._poly = Poly1305(one_time_key)
        self._total = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._poly.update(data)
        self._total += len(data) if not isinstance(data, memoryview) else data.nbytes

    def finalize(self) -> bytes:
        total = self._total
        if total % 16:
            self._poly.update(_ZERO16[: 16 - total % 16])
        self._poly.update(struct.pack("<QQ", total, 0))
        return self._poly.finalize()

    def verify(self, tag: bytes) -> bool:
        return hmac.compare_digest(self.finalize(), tag)


@attrs.frozen
class PeerKey:
    """The peer a handshake has proven: its role, Ed25519 public key and whether it also
    proved the shared token. Handed to :class:`Admission` before the connection opens."""

    role: m.Role
    public_key: bytes
    token_proven: bool
    address: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


class Admission(Protocol):
    """Decides whether a proven peer key may open a connection (pins, ``--peer-fingerprint``,
    trust on first use). Called once per handshake, synchronously (so check-and-pin is atomic
    in one Trio process); raise :class:`~qbsync.wire.errors.WireError` to refuse (its code and
    message go to the peer and the log)."""

    def admit(self, peer: PeerKey, own_fingerprint: str) -> None: ...


class AdmitAny:
    """Admits every key that proved itself (and the token, when one is configured). For tests
    and library use only: the daemons always pass :class:`qbsync.identity.PeerPolicy`."""

    def admit(self, peer: PeerKey, own_fingerprint: str) -> None:
        return None


ADMIT_ANY: Final = AdmitAny()


def new_identity() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()
