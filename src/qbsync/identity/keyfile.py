"""The daemon's long-term Ed25519 identity key.

Where it comes from, first match wins:

1. ``--identity`` / ``QBSYNC_<ROLE>_IDENTITY``: the key as text (for a Kubernetes Secret or a
   compose ``env_file``; prefer the environment variable, argv is visible in ``ps``);
2. ``--identity-file`` / ``QBSYNC_<ROLE>_IDENTITY_FILE``: a file holding it;
3. ``<identity_dir>/identity.key``: created on first start with mode 0600 (``O_EXCL``, so two
   processes starting at once cannot both create one), read on every later start.

The text form is either PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``, what qbsync writes and
``openssl genpkey -algorithm ed25519`` prints) or one line of base64 holding the raw 32-byte
private key. A key file readable by other users is refused: the key is the daemon's identity.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import Config, SourceConfig
from ..wire import fingerprint
from ..wire.keys import raw_public

KEY_FILE = "identity.key"
_DESTINATION_STATE = ".qbsync"


class IdentityError(Exception):
    """The key cannot be loaded or created; the message is one line for the user."""


def identity_dir(config: Config) -> Path:
    """Where ``config``'s daemon keeps its identity key and its pins (``peers.json``).

    The one function that knows it: the source keeps them in its ``--state-dir``, the
    destination in its state tree, ``<data>/.qbsync`` (a ``--state-dir`` of the destination,
    when it has one, takes its place: it is looked up here by name).
    """
    if isinstance(config, SourceConfig):
        return Path(config.state_dir)
    state_dir: Path | None = getattr(config, "state_dir", None)
    return Path(state_dir) if state_dir is not None else Path(config.data) / _DESTINATION_STATE


def parse_private_key(text: str) -> Ed25519PrivateKey:
    """A key from its text form (PKCS#8 PEM, or base64 of the raw 32 bytes)."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise IdentityError(f"not a readable unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError("the PEM key is not an Ed25519 key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError("neither PEM nor base64 of a 32-byte Ed25519 private key") from None
    if len(raw) != 32:
        raise IdentityError(f"a raw Ed25519 private key has 32 bytes, this one {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@attrs.frozen
class LoadedIdentity:
    key: Ed25519PrivateKey = attrs.field(repr=False)
    origin: str  # "created <path>", "file <path>", "environment"

    @property
    def fingerprint(self) -> str:
        return fingerprint(raw_public(self.key.public_key()))


def _read_key_file(path: Path, *, follow: bool = False) -> Ed25519PrivateKey:
    """Read a key file. The daemon's own ``identity.key`` is never read through a symlink
    (one planted there would swap the daemon's identity); an ``--identity-file`` the operator
    names may be one (Kubernetes mounts Secrets as symlinks)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise IdentityError(f"cannot open {str(path)!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and not _is_mounted_secret(path):
            raise IdentityError(
                f"{str(path)!r} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                f"chmod 600 it"
            )
        data = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    try:
        return parse_private_key(data.decode("ascii"))
    except UnicodeDecodeError:
        raise IdentityError(f"{str(path)!r} is not a text key") from None
    except IdentityError as exc:
        raise IdentityError(f"{str(path)!r}: {exc}") from None


def _is_mounted_secret(path: Path) -> bool:
    """Kubernetes mounts Secret files through a ``..data`` symlink farm with the mode of its
    ``defaultMode`` (0644 unless set): a file there is the operator's choice, accepted."""
    return (
        any(part == "..data" for part in path.resolve().parts) or (path.parent / "..data").exists()
    )


def load_identity(
    directory: Path, *, key_text: str = "", key_file: Path | None = None, create: bool = True
) -> LoadedIdentity:
    """Load (or, the first time, create) the identity key; see the module docstring.

    ``create=False`` (a dry run) makes a throwaway key in memory instead of writing one.
    """
    if key_text:
        try:
            return LoadedIdentity(parse_private_key(key_text), "environment")
        except IdentityError as exc:
            raise IdentityError(f"--identity: {exc}") from None
    if key_file is not None:
        return LoadedIdentity(_read_key_file(key_file, follow=True), f"file {key_file}")
    path = directory / KEY_FILE
    if path.exists() or path.is_symlink():
        return LoadedIdentity(_read_key_file(path), f"file {path}")
    key = Ed25519PrivateKey.generate()
    if not create:
        return LoadedIdentity(key, "memory (dry run: not saved)")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:  # another process created it just now: use theirs
        return LoadedIdentity(_read_key_file(path), f"file {path}")
    except OSError as exc:
        raise IdentityError(f"cannot create {str(path)!r}: {exc.strerror}") from None
    try:
        os.write(fd, private_key_pem(key))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # our own half-written file, created just above (O_EXCL)
        raise IdentityError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return LoadedIdentity(key, f"created {path}")
