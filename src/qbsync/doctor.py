"""``qbsync doctor source|destination [the daemon's flags]``: why a first run fails, one line each.

A wrong ``--qb-url``, wrong credentials, an unwritable ``--data``, a destination the source
cannot reach, a token mismatch: each of these shows up in the daemons' logs as one line among
many. The doctor takes exactly the daemon's flags and environment (the CLI resolves them with
:func:`qbsync.config.resolve`, so what it checks is what the daemon would run with), runs every
check and prints one verdict per check with the fix:

    PASS qbittorrent   reachable at http://127.0.0.1:8080 (login required)
    FAIL credentials   login failed ... -- fix: check --qb-username/--qb-password ...

It changes nothing: no keys, pins, state directories or files are created, except one temporary
file in ``--data`` to prove it is writable, which it created itself (``O_EXCL``, a name of its
own) and removes at once. Its handshakes use the daemon's own identity key and pins,
read-only; without a key file (before the daemon's first start) it does not handshake at all,
since the wire would present a throwaway key that a peer trusting on first use would pin. With
the daemon's key the handshake is what the daemon's first connection would be (such a peer
pins that same key). The ``listen`` check reads a running destination's ``Hello`` and never
authenticates to it. It logs in to qBittorrent once (a wrong password counts towards
qBittorrent's ban threshold, like one daemon start would).

Exit status: 0 when no check fails (warnings and skipped checks allowed), 1 when one fails;
usage and configuration errors are the CLI's (2).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

import attrs
import trio

from . import paths
from .config import Config, DestinationConfig, SourceConfig
from .identity import (
    PEERS_FILE,
    IdentityError,
    LoadedIdentity,
    PeerPolicy,
    PinStore,
    identity_dir,
    load_identity,
)
from .identity import daemon as identity_daemon
from .identity.keyfile import KEY_FILE
from .log import redact_url
from .qbittorrent.api import QB, QBError, WebApi, parse_version
from .wire import (
    ByteBudget,
    PeerKey,
    Request,
    Response,
    WireError,
    WireHooks,
    client_ssl_context,
    fingerprint,
    open_connection,
    serve_dialed,
)
from .wire.address import HostPort
from .wire.codec import HELLO as HELLO_TYPE
from .wire.errors import ErrorCode
from .wire.frames import NEED_DATA, ControlFrame, FrameDecoder
from .wire.messages import HANDSHAKE_MAX_FRAME, Hello, Piece, PieceAck, Role
from .wire.server import Peer
from .wire.transport import dial

GiB = 1024**3
# torrents/export (the .torrent of a synced torrent) appeared in Web API 2.8.14; qbsync needs it.
MIN_WEBAPI = (2, 8, 14)
CONNECT_TIMEOUT = 10.0
XATTR_PROBE = "user.qbsync.doctor"

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]


@attrs.frozen
class Verdict:
    check: str
    status: Status
    text: str
    fix: str = ""

    def line(self) -> str:
        tail = f" -- fix: {self.fix}" if self.fix and self.status in ("FAIL", "WARN") else ""
        return f"{self.status} {self.check:<13} {self.text}{tail}"


def _flag_env(config: Config, name: str) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag} / QBSYNC_{config.role.upper()}_{name.upper()}"


# ---------------------------------------------------------------------------------------------
# qBittorrent.


def check_qbittorrent(config: Config) -> list[Verdict]:
    """Reachable (one unauthenticated GET), then credentials and Web API version (a login)."""
    if not config.qb_url:
        return [Verdict("qbittorrent", "SKIP", "no --qb-url: this destination only verifies files")]
    url = redact_url(config.qb_url)
    where = _flag_env(config, "qb_url")
    try:
        with urllib.request.urlopen(
            f"{config.qb_url}/api/v2/app/version", timeout=CONNECT_TIMEOUT
        ) as resp:
            resp.read()
            answer = "no login needed from here"
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return [
                Verdict(
                    "qbittorrent",
                    "FAIL",
                    f"{url} answers HTTP {exc.code} to /api/v2/app/version: not a qBittorrent "
                    "WebUI",
                    f"point {where} at the qBittorrent WebUI (Options > WebUI)",
                )
            ]
        answer = "login required"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [
            Verdict(
                "qbittorrent",
                "FAIL",
                f"cannot reach {url}: {reason}",
                f"start qBittorrent with its WebUI enabled, or correct {where}",
            )
        ]
    out = [Verdict("qbittorrent", "PASS", f"reachable at {url} ({answer})")]

    qb = QB(
        config.qb_url,
        config.qb_username,
        config.qb_password,
        mode=config.role,
        max_threads=1,
        api_key=config.qb_api_key,
    )

    async def ask() -> tuple[str, str]:
        return await qb.version(), await qb.web_api_version()

    try:
        version, webapi_text = trio.run(ask)
    except QBError as exc:
        return [*out, _credentials_failed(config, str(exc))]
    who = (
        "API key"
        if config.qb_api_key
        else f"user {config.qb_username!r}"
        if config.qb_username
        else "no credentials"
    )
    out.append(Verdict("credentials", "PASS", f"accepted ({who}); qBittorrent {version}"))
    api = WebApi(parse_version(webapi_text))
    uses = (
        f"torrents/{api.stop_method} and /{api.start_method}, add with {api.stopped_param}, "
        f"{api.skip_checking_param}" + (", API keys" if api.api_keys else "")
    )
    if api.version < MIN_WEBAPI:
        out.append(
            Verdict(
                "webapi",
                "FAIL",
                f"Web API {api.text} is older than {'.'.join(map(str, MIN_WEBAPI))}: no "
                "torrents/export",
                "upgrade qBittorrent to 4.5 or later",
            )
        )
    else:
        out.append(Verdict("webapi", "PASS", f"Web API {api.text}: qbsync uses {uses}"))
    return out


def _credentials_failed(config: Config, message: str) -> Verdict:
    if "login failed" in message or "401" in message or "403" in message:
        return Verdict(
            "credentials",
            "FAIL",
            message,
            f"check {_flag_env(config, 'qb_username')} and {_flag_env(config, 'qb_password')} "
            f"(or {_flag_env(config, 'qb_api_key')}) against qBittorrent's WebUI settings",
        )
    return Verdict(
        "credentials",
        "FAIL",
        message,
        f"check that {_flag_env(config, 'qb_url')} is qBittorrent's WebUI",
    )


# ---------------------------------------------------------------------------------------------
# The data directory and the state directory.


def _fstype(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount point that prefixes it)."""
    best, kind = "", "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def check_data(config: Config) -> list[Verdict]:
    data = config.data
    where = _flag_env(config, "data")
    if not data.is_dir():
        what = "is not a directory" if data.exists() else "does not exist"
        return [
            Verdict("data", "FAIL", f"{data} {what}", f"create it (mkdir -p {data}) or fix {where}")
        ]
    out: list[Verdict] = []
    # Writable: a temporary file this check creates (O_EXCL, its own name) and removes itself.
    try:
        fd, probe = tempfile.mkstemp(prefix=".qbsync-doctor-", dir=data)
    except OSError as exc:
        out.append(
            Verdict(
                "data",
                "FAIL",
                f"{data} is not writable: {exc.strerror}",
                f"chown it to the user the daemon runs as (uid {os.geteuid()}) or fix {where}",
            )
        )
        xattrs = "untested (not writable)"
    else:
        try:
            try:
                os.setxattr(fd, XATTR_PROBE, b"1")
                xattrs = "supported" if os.getxattr(fd, XATTR_PROBE) == b"1" else "unreliable"
            except OSError as exc:
                xattrs = f"not supported ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
        finally:
            os.close(fd)
            os.unlink(probe)  # the file mkstemp created above for this check: nothing else
        out.append(Verdict("data", "PASS", f"{data} exists and is writable"))
    kind = _fstype(data)
    out.append(Verdict("filesystem", "PASS", f"{data} is on {kind}; user xattrs {xattrs}"))
    if xattrs.startswith("not supported") and isinstance(config, DestinationConfig):
        out[-1] = Verdict(
            "filesystem",
            "WARN",
            f"{data} is on {kind}; user xattrs {xattrs}",
            "files qbsync creates are then recognised by owned.json alone (still safe); "
            "mount with user_xattr for the second proof",
        )
    usage = shutil.disk_usage(data)
    free = f"{usage.free / GiB:.1f} GiB free of {usage.total / GiB:.1f} GiB"
    if isinstance(config, SourceConfig):
        if usage.free < config.min_space * GiB:
            out.append(
                Verdict(
                    "free space",
                    "WARN",
                    f"{free}, below --min-space {config.min_space:g} GiB",
                    "synced torrents will be handed off to the destination until it is above",
                )
            )
        else:
            out.append(
                Verdict("free space", "PASS", f"{free} (--min-space {config.min_space:g} GiB)")
            )
    elif usage.free == 0:
        out.append(Verdict("free space", "FAIL", free, f"free space on {data}"))
    else:
        out.append(Verdict("free space", "PASS", free))
    return out


def check_state_dir(config: Config) -> list[Verdict]:
    state = (
        config.state_dir if isinstance(config, SourceConfig) else config.data / paths.STATE_DIR_NAME
    )
    uid = os.geteuid()
    if not state.exists():
        parent = next((p for p in state.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return [Verdict("state dir", "PASS", f"{state} will be created by the daemon")]
        return [
            Verdict(
                "state dir",
                "FAIL",
                f"{state} does not exist and {parent} is not writable",
                f"create {state} owned by uid {uid}, mode 700",
            )
        ]
    st = state.stat()
    mode = stat.S_IMODE(st.st_mode)
    text = f"{state} owner uid {st.st_uid}, mode {mode:03o}"
    if not stat.S_ISDIR(st.st_mode):
        return [Verdict("state dir", "FAIL", f"{state} is not a directory", f"move {state} away")]
    if st.st_uid != uid:
        return [
            Verdict(
                "state dir",
                "FAIL",
                f"{text}: not owned by this user (uid {uid})",
                f"chown -R {uid} {state}, or run the doctor as the daemon's user",
            )
        ]
    if mode & 0o022:
        return [
            Verdict(
                "state dir",
                "FAIL",
                f"{text}: writable by others, who could rewrite what qbsync trusts",
                f"chmod go-w {state}",
            )
        ]
    if not os.access(state, os.W_OK | os.X_OK):
        return [Verdict("state dir", "FAIL", f"{text}: not writable", f"chmod u+rwx {state}")]
    return [Verdict("state dir", "PASS", text)]


# ---------------------------------------------------------------------------------------------
# The peer, the listen port, the clock and the authentication mode.
#
# The handshake checks use the daemon's own identity key and its pins, read-only
# (``identity.daemon.setup`` with ``dry_run``: no key file created, pins kept in memory), so
# the verdict is the one the daemon would get. Without a key file they do not handshake at
# all: the wire would present a throwaway key, and a destination that trusts on first use
# would pin *that* as its source and lock the real one out.


def _has_key(config: Config) -> bool:
    """Whether the daemon has an identity key now (``--identity``, ``--identity-file`` or the
    key file it created on its first start)."""
    if config.identity or config.identity_file is not None:
        return True
    path = identity_dir(config) / KEY_FILE
    return path.exists() or path.is_symlink()


def _own_identity(config: Config) -> tuple[LoadedIdentity, PeerPolicy] | None:
    """The daemon's key and admission policy, read-only; ``None`` when it has no key yet.
    Raises :class:`IdentityError`. The setup's ``event=identity`` log line is not shown: the
    doctor prints its own lines."""
    if not _has_key(config):
        return None
    quiet = logging.getLogger("qbsync.identity")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        identity, policy = identity_daemon.setup(
            attrs.evolve(config, dry_run=True),
            # As the daemons call it: a listening source never trusts on first use.
            listening=(config.listen is not None) if isinstance(config, SourceConfig) else None,
        )
    finally:
        quiet.setLevel(level)
    assert policy.store.read_only  # the doctor never writes a pin
    return identity, policy


class _Judge:
    """The doctor's :class:`~qbsync.wire.Admission`: the same decision as the daemon's
    :class:`PeerPolicy` (its table in ``identity.pins``), but it pins nothing and logs
    nothing; it records what the daemon would have done with the peer's key."""

    def __init__(self, policy: PeerPolicy, own: str) -> None:
        self.policy = policy
        self.own = own  # this daemon's fingerprint
        self.peer = ""
        self.outcome = ""
        self.refused = False

    def admit(self, peer: PeerKey, own_fingerprint: str) -> None:
        fp, them, me = peer.fingerprint, peer.role.value, self.policy.role
        self.peer = fp
        decision = self.policy.decide(fp, them)  # the daemon's own rules; pins nothing
        if decision.action == "refuse":
            self._refuse(decision.why, decision.old)
        self.outcome = {
            "listed": "listed in --peer-fingerprint",
            "pinned": f"pinned by this {me}",
            "pin-token": f"not pinned yet: the {me} pins it on its first connection (token)",
            "pin-first-use": f"not pinned yet: the {me} pins it on first use",
        }[decision.action]

    def _refuse(self, why: str, old: str) -> None:
        self.refused = True
        fix = (
            f"if the {'destination' if self.policy.role == 'source' else 'source'} was "
            f"re-created, re-pair: {self.policy.command.format(old)}"
            if old
            else "add the key to --peer-fingerprint, or set the same --auth-token on both"
        )
        self.outcome = fix
        raise WireError(ErrorCode.UNKNOWN_PEER, why)


async def _handshake(
    addr: HostPort, config: Config, identity: LoadedIdentity, judge: _Judge
) -> tuple[int, str]:
    ssl_context = None
    tls_ca = getattr(config, "tls_ca", None)
    if tls_ca is not None:
        ssl_context = client_ssl_context(tls_ca)
    async with open_connection(
        addr,
        token=config.auth_token or None,
        identity=identity.key,
        admission=judge,
        ssl_context=ssl_context,
        connect_timeout=CONNECT_TIMEOUT,
    ) as conn:
        return conn.version, conn.peer_fingerprint


def _connect_reason(exc: OSError) -> str:
    # trio's "all attempts to connect failed" carries the real reasons as its cause.
    cause: BaseException = exc
    if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        cause = exc.__cause__.exceptions[-1]
    return getattr(cause, "strerror", None) or str(cause)


def _tcp(addr: HostPort) -> str:
    """``""`` when a TCP connection to ``addr`` opens (closed at once, nothing sent), else
    why not."""
    try:
        with socket.create_connection((addr.host, addr.port), timeout=CONNECT_TIMEOUT):
            return ""
    except OSError as exc:
        return exc.strerror or str(exc)


def _no_key_verdict(config: Config) -> Verdict:
    where = identity_dir(config) / KEY_FILE
    return Verdict(
        "handshake",
        "SKIP",
        f"no identity key yet ({where}): the daemon creates it on first start; a handshake "
        "now would present a throwaway key (which a peer trusting on first use would pin)",
    )


def _identity_failed(config: Config, exc: IdentityError) -> Verdict:
    return Verdict(
        "handshake",
        "FAIL",
        f"this {config.role}'s identity key is unusable: {exc}",
        f"fix {_flag_env(config, 'identity')} / {_flag_env(config, 'identity_file')}, or the "
        f"key file in {identity_dir(config)}",
    )


def _handshake_failed(config: Config, exc: WireError, judge: _Judge) -> Verdict:
    token_where = f"{_flag_env(config, 'auth_token')} (or {_flag_env(config, 'auth_token_file')})"
    them = "destination" if config.role == "source" else "source"
    refused = f"refused ({exc.code}): {exc.message}"
    if exc.code == ErrorCode.UNKNOWN_PEER:
        if judge.refused:  # this side's own pins or --peer-fingerprint refuse the peer
            return Verdict(
                "handshake",
                "FAIL",
                f"this {config.role} refuses the {them}'s key ({exc.code}): {exc.message}",
                judge.outcome,
            )
        return Verdict(
            "handshake",
            "FAIL",
            f"the {them} refuses this {config.role}'s key {judge.own} ({exc.code}): {exc.message}",
            f"if this {config.role} was re-created (new key), re-pair on the {them}: "
            f"qbsync peers {them} forget <old fingerprint>, or give the {them} "
            f"--peer-fingerprint {judge.own} (or the same --auth-token on both)",
        )
    fixes = {
        ErrorCode.AUTH_FAILED: f"give both daemons the same token: {token_where}; with TLS, "
        "check the certificate against --tls-ca",
        ErrorCode.UPGRADE_REQUIRED: f"the {them} runs a qbsync older than protocol 2 "
        "(no identity keys): upgrade it to this version",
        ErrorCode.UNSUPPORTED_VERSION: "run the same qbsync version on both sides",
        ErrorCode.BAD_TAG: "a frame was altered on the path (a proxy or middlebox rewrites the "
        "stream): connect directly, or use TLS",
        ErrorCode.TIMEOUT: f"check that the address is the {them}'s port, not another service",
    }
    return Verdict(
        "handshake",
        "FAIL",
        refused,
        fixes.get(exc.code, "run the same qbsync version on both sides"),
    )


def _handshake_verdicts(
    addr: HostPort,
    config: Config,
    *,
    peer_side: str,
    reached_text: str,
    unreachable_fix: str,
    handshake: Callable[[LoadedIdentity, _Judge], str],
) -> list[Verdict]:
    """TCP reachability of ``addr`` (the ``peer_side`` verdict), then ``handshake`` with this
    daemon's own key and pins (read-only), apart; the steps both directions share.
    ``handshake`` returns the passing verdict's text, or raises ``OSError`` when the TCP
    connection fails the second time and :class:`WireError` when the handshake fails."""
    why = _tcp(addr)
    if why:
        return [Verdict(peer_side, "FAIL", f"cannot connect to {addr}: {why}", unreachable_fix)]
    reached = Verdict(peer_side, "PASS", reached_text)
    try:
        own = _own_identity(config)
    except IdentityError as exc:
        return [reached, _identity_failed(config, exc)]
    if own is None:
        return [reached, _no_key_verdict(config)]
    identity, policy = own
    judge = _Judge(policy, identity.fingerprint)
    try:
        passed = handshake(identity, judge)
    except OSError as exc:
        return [
            reached,
            Verdict(
                "handshake",
                "FAIL",
                f"connecting to {addr} again failed: {_connect_reason(exc)}",
                f"check that the {peer_side} is not restarting",
            ),
        ]
    except WireError as exc:
        return [reached, _handshake_failed(config, exc, judge)]
    return [reached, Verdict("handshake", "PASS", passed)]


def _auth_words(config: Config) -> str:
    return "authenticated with the token" if config.auth_token else "without a token"


def _peer_verdicts(addr: HostPort, config: SourceConfig) -> list[Verdict]:
    """The source's destination: TCP reachability, then the handshake with the source's own
    key and pins (read-only), apart."""

    def handshake(identity: LoadedIdentity, judge: _Judge) -> str:
        version, peer = trio.run(_handshake, addr, config, identity, judge)
        return (
            f"accepted, protocol version {version}, {_auth_words(config)}, as "
            f"{identity.fingerprint}; the destination's key {peer} is {judge.outcome}"
        )

    return _handshake_verdicts(
        addr,
        config,
        peer_side="destination",
        reached_text=f"{addr} accepts connections",
        unreachable_fix="start the destination, or correct --destination-addr; a firewall or "
        "NAT between the hosts must let the port through",
        handshake=handshake,
    )


def check_peer(config: Config) -> list[Verdict]:
    if isinstance(config, SourceConfig):
        if config.destination_addr is None:
            # Reverse mode: the destination dials this source's --listen.
            return [
                Verdict(
                    "destination",
                    "SKIP",
                    f"this source listens on {config.listen}; the destination dials in with "
                    "--connect: run `qbsync doctor destination` on that machine to check it",
                )
            ]
        return _peer_verdicts(config.destination_addr, config)
    verdicts = check_listen(config) if config.listen is not None else []
    for addr in config.connect_addrs:
        verdicts += _dial_verdicts(addr, config)
    return verdicts


class _HandshakeOutcome(WireHooks, logging.Handler):
    """What :func:`serve_dialed` reports: it logs a failed handshake and returns, so the code
    comes from its hooks and the reason from its ``event=wire_handshake_failed`` log line
    (this handler stands in for the log while the doctor's handshake runs)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.failed: ErrorCode | None = None
        self.reason = ""

    def handshake_failed(self, code: ErrorCode) -> None:
        self.failed = code

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "event=wire_handshake_failed" in text and " reason=" in text:
            self.reason = text.split(" reason=", 1)[1].strip('"')


class _NoService:
    """The doctor's :class:`~qbsync.wire.ServerHandler`: it closes the connection as soon as
    the handshake is done, so nothing reaches this; refuse if it does."""

    async def handle_request(self, peer: Peer, request: Request) -> Response:
        raise WireError(ErrorCode.SHUTTING_DOWN, "qbsync doctor checks the handshake only")

    async def handle_piece(self, peer: Peer, piece: Piece) -> PieceAck:
        raise WireError(ErrorCode.SHUTTING_DOWN, "qbsync doctor checks the handshake only")


async def _dial_handshake(
    addr: HostPort,
    config: DestinationConfig,
    identity: LoadedIdentity,
    judge: _Judge,
    outcome: _HandshakeOutcome,
) -> None:
    """One handshake as the dialing destination (``serve_dialed``, as the daemon's dialer),
    closed as soon as it is authenticated; a failure is left in ``outcome``. Raises
    ``OSError`` when the TCP connection fails and :class:`WireError` for TLS and timeouts."""
    ssl_context = client_ssl_context(config.tls_ca) if config.tls_ca is not None else None
    with trio.move_on_after(CONNECT_TIMEOUT) as cs:
        stream = await dial(addr, ssl_context=ssl_context)
    if cs.cancelled_caught:
        raise WireError(ErrorCode.TIMEOUT, f"connecting to {addr} timed out")
    async with trio.open_nursery() as nursery:

        def opened(peer: Peer, is_open: bool) -> None:
            if is_open:
                nursery.cancel_scope.cancel()  # authenticated: that is all the doctor wanted

        nursery.start_soon(
            functools.partial(
                serve_dialed,
                stream,
                _NoService(),
                token=config.auth_token or None,
                budget=ByteBudget(1 << 20),
                identity=identity.key,
                admission=judge,
                handshake_timeout=CONNECT_TIMEOUT,
                close_grace=0.0,
                hooks=outcome,
                on_peer=opened,
            )
        )


def _dial_verdicts(addr: HostPort, config: DestinationConfig) -> list[Verdict]:
    """A destination's ``--connect`` target: TCP reachability, then the handshake as the
    dialing side with the destination's own key and pins (read-only)."""

    def handshake(identity: LoadedIdentity, judge: _Judge) -> str:
        wire_log = logging.getLogger("qbsync.wire")
        outcome = _HandshakeOutcome()
        propagate = wire_log.propagate
        wire_log.addHandler(outcome)
        wire_log.propagate = False  # its log lines: the verdict says what they say
        try:
            trio.run(_dial_handshake, addr, config, identity, judge, outcome)
        finally:
            wire_log.removeHandler(outcome)
            wire_log.propagate = propagate
        if outcome.failed is not None:
            raise WireError(outcome.failed, outcome.reason or "the source ended the handshake")
        return (
            f"accepted by {addr}, {_auth_words(config)}, as {identity.fingerprint}; the "
            f"source's key {judge.peer} is {judge.outcome}"
        )

    return _handshake_verdicts(
        addr,
        config,
        peer_side="source",
        reached_text=f"{addr} accepts connections (--connect)",
        unreachable_fix="start the source with --listen on that address, and let its port "
        "through the seedbox's firewall (--connect / QBSYNC_DESTINATION_CONNECT)",
        handshake=handshake,
    )


def check_listen(config: DestinationConfig) -> list[Verdict]:
    """Whether the daemon could bind ``--listen``; when something already listens there,
    whether it is a qbsync destination: it reads the magic and ``Hello`` the peer sends at
    once and closes, never authenticating (a handshake with this destination's own key would
    be pinned by the running one as a source, in trust-on-first-use mode)."""
    addr = config.listen
    assert addr is not None  # check_peer calls this only for a destination that listens
    host = addr.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
            s.bind((host, addr.port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return [
                Verdict(
                    "listen",
                    "FAIL",
                    f"cannot bind {addr}: {exc.strerror}",
                    "use an address of this host and a port above 1023 (or grant "
                    "CAP_NET_BIND_SERVICE) in --listen / QBSYNC_DESTINATION_LISTEN",
                )
            ]
        dial_to = HostPort("127.0.0.1" if host in ("0.0.0.0", "::") else host, addr.port)
        hello, why = _peek_hello(dial_to, tls=config.tls_cert is not None)
        if hello is not None and hello.role == Role.DESTINATION:
            key = fingerprint(hello.identity) if hello.identity else "no identity key"
            return [
                Verdict(
                    "listen",
                    "PASS",
                    f"{addr} is in use by a running qbsync destination ({hello.software}, "
                    f"protocol {hello.min_version}..{hello.max_version}, key {key}); the "
                    "doctor did not authenticate to it",
                )
            ]
        what = f"a qbsync {hello.role.value}" if hello is not None else f"another program ({why})"
        return [
            Verdict(
                "listen",
                "FAIL",
                f"{addr} is in use by {what}",
                "stop it, or choose another --listen / QBSYNC_DESTINATION_LISTEN port",
            )
        ]
    return [Verdict("listen", "PASS", f"{addr} is free to bind")]


def _peek_hello(addr: HostPort, *, tls: bool) -> tuple[Hello | None, str]:
    """The ``Hello`` a qbsync daemon at ``addr`` sends first (magic + Hello frame, read with
    the wire's decoder), or ``None`` and why not. Sends nothing; closes at once. With TLS
    the certificate is not verified: nothing secret is sent, and only the peer's public Hello
    is read (whose key the verdict shows)."""
    decoder = FrameDecoder({HELLO_TYPE: HANDSHAKE_MAX_FRAME})
    try:
        with socket.create_connection((addr.host, addr.port), timeout=CONNECT_TIMEOUT) as raw:
            sock: socket.socket = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # see the docstring: nothing is sent
                sock = context.wrap_socket(raw)
            while True:
                event = decoder.next_event()
                if isinstance(event, ControlFrame) and isinstance(event.message, Hello):
                    return event.message, ""
                if event is not NEED_DATA:
                    return None, "no qbsync Hello"
                chunk = sock.recv(HANDSHAKE_MAX_FRAME)
                decoder.receive_data(chunk)
                if not chunk:
                    return None, "it closed without a qbsync Hello"
    except TimeoutError:
        return None, f"no qbsync Hello within {CONNECT_TIMEOUT:g} s"
    except (OSError, WireError) as exc:
        return None, f"not qbsync: {exc}"


def check_clock(config: Config) -> list[Verdict]:
    return [
        Verdict(
            "clock",
            "SKIP",
            "the wire handshake carries no time, and qbsync does not depend on the two clocks "
            "agreeing",
        )
    ]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _identity_summary(config: Config) -> str:
    """This daemon's fingerprint (if it has a key) and how many keys it has pinned, read
    without creating or changing anything."""
    directory = identity_dir(config)
    if not _has_key(config):
        own = f"no identity key yet (created in {directory} on first start)"
    else:
        try:
            loaded = load_identity(
                directory, key_text=config.identity, key_file=config.identity_file, create=False
            )
            own = f"this {config.role} is {loaded.fingerprint}"
        except IdentityError as exc:
            own = f"identity key unusable: {exc}"
    pins = PinStore(directory, read_only=True).pins()
    if "!unreadable" in pins:
        pinned = f"the pin file {directory / PEERS_FILE} is unreadable (every new key refused)"
    else:
        pinned = f"{len(pins)} peer key{'' if len(pins) == 1 else 's'} pinned"
    return f"{own}; {pinned}"


def _admits(config: Config, *, listening: bool) -> tuple[Status, str]:
    """The admission mode in force (``PeerPolicy.mode``'s table) and what it admits."""
    them = "destination" if config.role == "source" else "source"
    if config.peer_fingerprint:
        keys = ", ".join(config.peer_fingerprint)
        return (
            "PASS",
            f"--peer-fingerprint: only the {them} key(s) {keys}",
        )
    if config.auth_token:
        return "PASS", (
            f"token: pinned {them} keys, and a new {them} key only when it proves the token "
            "(then pinned)"
        )
    if listening and config.role == "source":
        return "PASS", (
            "no token or --peer-fingerprint: this listening source never trusts on first use, "
            f"it admits only {them} keys pinned before"
        )
    return "WARN", (
        f"trust on first use: the first {them} key is pinned and only it admitted after; "
        f"compare its fingerprint with the {them}'s event=identity log line"
    )


def check_auth(config: Config) -> list[Verdict]:
    summary = _identity_summary(config)
    fix = (
        "set the same --auth-token-file on both daemons (openssl rand -hex 32), or "
        "--peer-fingerprint"
    )
    if isinstance(config, SourceConfig):
        listening = config.listen is not None
        tls = (
            f"TLS, the destination's certificate verified against {config.tls_ca}"
            if config.tls_ca is not None
            else "no TLS (the data crosses the network in clear)"
        )
        status, admits = _admits(config, listening=listening)
        where = (
            f"the destination dials this source's --listen {config.listen}"
            if listening
            else f"dials {config.destination_addr}"
        )
        text = f"{admits}; {where}; {summary}; {tls}"
        if status == "WARN":
            return [Verdict("auth", "WARN", text, fix)]
        return [Verdict("auth", "PASS", text)]
    tls = "TLS" if config.tls_cert is not None or config.tls_ca is not None else "no TLS"
    status, admits = _admits(config, listening=config.listen is not None)
    if config.listen is None:
        where = "no wire port: this destination only dials (--connect)"
    else:
        where = f"listening on {config.listen}"
    text = f"{admits}; {where}; {summary}; {tls}"
    if status == "PASS":
        return [Verdict("auth", "PASS", text)]
    if config.listen is None or _loopback(config.listen.host):
        return [Verdict("auth", "PASS", text + " (loopback only)" * (config.listen is not None))]
    return [
        Verdict(
            "auth",
            "WARN",
            f"{text}; anyone who reaches that port before your source does is paired instead of it",
            fix,
        )
    ]


CHECKS: tuple[Callable[[Config], list[Verdict]], ...] = (
    check_qbittorrent,
    check_data,
    check_state_dir,
    check_peer,
    check_clock,
    check_auth,
)


def run(config: Config, out: IO[str] | None = None) -> int:
    """Run every check, print one line per verdict and return 0 (none failed) or 1."""
    out = out or sys.stdout
    # Ctrl-C must end it even when inherited ignored (qbsync.interrupt); trio turns the default
    # handler into KeyboardInterrupt inside its runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    verdicts: list[Verdict] = []
    out.write(f"qbsync doctor {config.role}\n")
    for check in CHECKS:
        found = check(config)
        for v in found:
            out.write(v.line() + "\n")
        out.flush()
        verdicts += found
    failed = [v for v in verdicts if v.status == "FAIL"]
    warned = [v for v in verdicts if v.status == "WARN"]
    summary = f"{len(failed)} failed, {len(warned)} warnings, {len(verdicts)} checks"
    out.write(("FAILED: " if failed else "OK: ") + summary + "\n")
    with contextlib.suppress(OSError):
        out.flush()
    return 1 if failed else 0
