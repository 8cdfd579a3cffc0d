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
own) and removes at once. It logs in to qBittorrent once (a wrong password counts towards
qBittorrent's ban threshold, like one daemon start would).

Exit status: 0 when no check fails (warnings and skipped checks allowed), 1 when one fails;
usage and configuration errors are the CLI's (2).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import signal
import socket
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
from .log import redact_url
from .qbittorrent.api import QB, QBError, WebApi, parse_version
from .wire import WireError, client_ssl_context, open_connection
from .wire.address import HostPort
from .wire.errors import ErrorCode

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


async def _handshake(addr: HostPort, config: Config) -> int:
    ssl_context = None
    tls_ca = getattr(config, "tls_ca", None)
    if tls_ca is not None:
        ssl_context = client_ssl_context(tls_ca)
    async with open_connection(
        addr,
        token=config.auth_token or None,
        ssl_context=ssl_context,
        connect_timeout=CONNECT_TIMEOUT,
    ) as conn:
        return conn.version


def _peer_verdicts(addr: HostPort, config: Config, name: str) -> list[Verdict]:
    """Connect and handshake as the source does: reachability and the handshake, apart."""
    token_where = f"{_flag_env(config, 'auth_token')} (or {_flag_env(config, 'auth_token_file')})"
    try:
        version = trio.run(_handshake, addr, config)
    except OSError as exc:
        # trio's "all attempts to connect failed" carries the real reasons as its cause.
        cause: BaseException = exc
        if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
            cause = exc.__cause__.exceptions[-1]
        reason = getattr(cause, "strerror", None) or str(cause)
        return [
            Verdict(
                name,
                "FAIL",
                f"cannot connect to {addr}: {reason}",
                "start the destination, or correct --destination-addr; a firewall or NAT "
                "between the hosts must let the port through",
            )
        ]
    except WireError as exc:
        if exc.code == ErrorCode.TIMEOUT:
            return [
                Verdict(
                    name,
                    "FAIL",
                    f"{addr}: no qbsync handshake within {CONNECT_TIMEOUT:g} s",
                    "check that the address is the destination's --listen, not another service",
                )
            ]
        reached = Verdict(name, "PASS", f"{addr} accepts connections")
        if exc.code == ErrorCode.AUTH_FAILED:
            return [
                reached,
                Verdict(
                    "handshake",
                    "FAIL",
                    f"refused ({exc.code}): {exc.message}",
                    f"give both daemons the same token: {token_where}",
                ),
            ]
        return [
            reached,
            Verdict(
                "handshake",
                "FAIL",
                f"refused ({exc.code}): {exc.message}",
                "run the same qbsync version on both sides",
            ),
        ]
    auth = "authenticated with the token" if config.auth_token else "without a token"
    return [
        Verdict(name, "PASS", f"{addr} accepts connections"),
        Verdict("handshake", "PASS", f"accepted, protocol version {version}, {auth}"),
    ]


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
        return _peer_verdicts(config.destination_addr, config, "destination")
    verdicts = check_listen(config) if config.listen is not None else []
    return verdicts + [_dial_verdict(addr) for addr in config.connect_addrs]


def _dial_verdict(addr: HostPort) -> Verdict:
    """A destination's ``--connect`` target: can this machine open a TCP connection to it?
    (The handshake is the source's to answer; the daemon's log says whether it accepted.)"""
    try:
        with socket.create_connection((addr.host, addr.port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        return Verdict(
            "source",
            "FAIL",
            f"cannot connect to {addr}: {exc.strerror or exc}",
            "start the source with --listen on that address, and let its port through the "
            "seedbox's firewall (--connect / QBSYNC_DESTINATION_CONNECT)",
        )
    return Verdict("source", "PASS", f"{addr} accepts connections (--connect)")


def check_listen(config: DestinationConfig) -> list[Verdict]:
    """Whether the daemon could bind ``--listen``; when a qbsync destination already listens
    there, whether it accepts this configuration's handshake instead."""
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
        dial = HostPort("127.0.0.1" if host in ("0.0.0.0", "::") else host, addr.port)
        running = _peer_verdicts(dial, config, "listen")
        if running[-1].status == "PASS":
            return [
                Verdict("listen", "PASS", f"{addr} is in use by a running qbsync destination"),
                running[-1],
            ]
        return [
            Verdict(
                "listen",
                "FAIL",
                f"{addr} is in use by another program ({running[-1].text})",
                "stop it, or choose another --listen / QBSYNC_DESTINATION_LISTEN port",
            )
        ]
    return [Verdict("listen", "PASS", f"{addr} is free to bind")]


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


def check_auth(config: Config) -> list[Verdict]:
    if isinstance(config, SourceConfig):
        tls = (
            f"TLS, the destination's certificate verified against {config.tls_ca}"
            if config.tls_ca is not None
            else "no TLS (the data crosses the network in clear)"
        )
        if config.auth_token:
            return [
                Verdict(
                    "auth",
                    "PASS",
                    f"token: only a destination that proves the same token is used; {tls}",
                )
            ]
        return [
            Verdict(
                "auth",
                "WARN",
                f"no token: any program answering at {config.destination_addr} is sent your "
                f"data; {tls}",
                "set the same --auth-token-file on both daemons (openssl rand -hex 32)",
            )
        ]
    tls = "TLS" if config.tls_cert is not None else "no TLS"
    if config.auth_token:
        return [
            Verdict(
                "auth",
                "PASS",
                f"token: only sources that prove the same token may write to --data; {tls}",
            )
        ]
    if config.listen is None:
        return [Verdict("auth", "PASS", f"no wire port: this destination only dials; {tls}")]
    if _loopback(config.listen.host):
        return [Verdict("auth", "PASS", f"no token, but listening on loopback only; {tls}")]
    return [
        Verdict(
            "auth",
            "WARN",
            f"no token and listening on {config.listen}: anyone who reaches that port may "
            f"write to --data; {tls}",
            "set the same --auth-token-file on both daemons (openssl rand -hex 32)",
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
