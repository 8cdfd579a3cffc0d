"""Every setting of both daemons, in one place.

Each option is declared once, as an attribute of ``SourceConfig`` or ``DestinationConfig``
(options both roles share are declared once and used by both). That single declaration drives
the argparse flag, its ``--help`` line, the environment variable, the default, the parser and
the validation, so the README tables, ``--help`` and the code cannot drift apart.

Resolution order is flag > environment variable > default. After that, the conventional
fallbacks of the seed document apply (``HTTP_PORT``/``HEALTH_PORT`` for the health address,
``GRPC_PORT``/``PORT`` for the destination's listen address) *only while the resolved value
still equals the built-in default*, exactly like the Go reference does.

A bad value raises :class:`ConfigError` with one line naming the flag and its environment
variable; the CLI prints it and exits with status 2.
"""

# The config classes declare options as ``name: type = option(...)``: a call in a class body
# is the point of the design here, not a shared mutable default.
# ruff: noqa: RUF009

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from .log import redact_url
from .paths import STATE_DIR_NAME
from .ratelimit import RateSchedule
from .wire.address import HostPort
from .wire.keys import parse_fingerprint

GiB = 1024**3
MiB = 1024**2

Role = Literal["source", "destination"]


class ConfigError(ValueError):
    """A configuration value is missing or invalid. The message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw string and returns the typed value or raises ValueError with
# a short reason; the caller adds the flag and environment variable names.


def _parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on", "t", "y"):
        return True
    if v in ("0", "false", "no", "off", "f", "n", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r} (use true or false)")


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ValueError(f"not a whole number: {raw!r}") from None


def _parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"not a number: {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {raw!r}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(raw: str) -> int:
    """A byte count: ``1048576``, ``512K``, ``50M``, ``1.5G`` (binary units, like rclone:
    ``K`` = KiB; a trailing ``B``/``iB`` is accepted, so ``50MiB`` works too), ``off`` = 0."""
    text = raw.strip().lower()
    if text == "off":
        return 0
    for tail in ("ib", "b"):
        if len(text) > len(tail) and text.endswith(tail) and text[-len(tail) - 1].isalpha():
            text = text[: -len(tail)]
            break
    unit = text[-1:] if text[-1:].isalpha() else ""
    number = text[: len(text) - len(unit)]
    if unit not in _SIZE_UNITS or not number or not all(c.isdigit() or c == "." for c in number):
        raise ValueError(f"not a size: {raw!r} (examples: 1048576, 512K, 50M, 1.5G, off)")
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise ValueError(f"not a size: {raw!r} (examples: 1048576, 512K, 50M, 1.5G, off)") from None
    return int(value)


def _parse_str(raw: str) -> str:
    return raw.strip()


LOG_LEVELS = ("debug", "info", "warn", "error")


def _parse_log_level(raw: str) -> str:
    v = raw.strip().lower()
    if v == "warning":
        v = "warn"
    if v not in LOG_LEVELS:
        raise ValueError(f"unknown log level {raw!r} (use debug, info, warn or error)")
    return v


def parse_host_port(raw: str, *, need_host: bool = False) -> HostPort:
    """Parse ``host:port``, ``:port`` or ``[v6]:port``.

    A bare number is *not* accepted here; the conventional fallbacks turn ``9090`` into
    ``:9090`` before parsing, as the seed document says.
    """
    v = raw.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or not v[end + 1 :].startswith(":"):
            raise ValueError(f"not host:port: {raw!r}")
        host, port_s = v[1:end], v[end + 2 :]
    else:
        host, sep, port_s = v.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"not host:port: {raw!r} (for example 127.0.0.1:50051 or :50051)")
    if need_host and not host:
        raise ValueError(f"missing host in {raw!r} (for example 192.168.1.100:50051)")
    if any(c.isspace() for c in host):
        raise ValueError(f"bad host in {raw!r}")
    try:
        port = int(port_s, 10)
    except ValueError:
        raise ValueError(f"bad port in {raw!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {raw!r} (1-65535)")
    return HostPort(host, port)


def _parse_listen(raw: str) -> HostPort:
    return parse_host_port(raw)


def _parse_dial(raw: str) -> HostPort:
    return parse_host_port(raw, need_host=True)


def _parse_optional_listen(raw: str) -> HostPort | None:
    return parse_host_port(raw) if raw.strip() else None


def _parse_optional_dial(raw: str) -> HostPort | None:
    return parse_host_port(raw, need_host=True) if raw.strip() else None


def _parse_dial_list(raw: str) -> str:
    """``--connect``: host:port items, comma-separated or the flag repeated, no duplicates."""
    seen: list[str] = []
    for item in split_list(raw):
        text = str(parse_host_port(item, need_host=True))
        if text in seen:
            raise ValueError(f"{text} is given twice")
        seen.append(text)
    return ",".join(seen)


def _parse_path(raw: str) -> Path:
    return Path(raw.strip()).expanduser()


def _parse_optional_path(raw: str) -> Path | None:
    return Path(raw.strip()).expanduser() if raw.strip() else None


def _parse_url(raw: str) -> str:
    v = raw.strip()
    if not v:
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in v):
        raise ValueError(f"not an http(s) URL: {raw!r} (for example http://localhost:8080)")
    try:
        parts.port  # noqa: B018  # validates the port
    except ValueError:
        raise ValueError(f"bad port in URL {raw!r}") from None
    return v.rstrip("/")


# ---------------------------------------------------------------------------------------------
# Option declarations.
#
# The configuration classes below *are* the declarations: each attribute is one option, and
# ``option(...)`` attaches its help line, default and parser to it. ``SOURCE_OPTIONS`` and
# ``DESTINATION_OPTIONS`` are read off the classes, in declaration order (that order is the
# ``--help`` order). An option both roles share with the same meaning is declared once as a
# function below and used in both classes. To add an option: add one attribute to the class.


@attrs.frozen
class Option:
    """One setting: flag, environment variable, default and parser."""

    name: str  # attribute name on the config class, e.g. "min_space"
    help: str
    default: str  # default as the user would type it ("" = empty/unset)
    parse: Callable[[str], Any] = _parse_str
    required: bool = False
    secret: bool = False
    is_flag: bool = False  # boolean switch: "--dry-run" alone means true
    check: Callable[[Any], str | None] | None = None  # returns a reason when the value is bad
    zero_means: str | None = None  # the Go reference treats 0 as "use this default"
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def env(self, role: Role) -> str:
        return f"QBSYNC_{role.upper()}_{self.name.upper()}"


_OPTION_KEY = "qbsync.option"


def option(
    help: str,
    default: str,
    parse: Callable[[str], Any] = _parse_str,
    *,
    required: bool = False,
    secret: bool = False,
    is_flag: bool = False,
    check: Callable[[Any], str | None] | None = None,
    zero_means: str | None = None,
    metavar: str | None = None,
) -> Any:
    """Declare the config attribute it is assigned to as an option (the name comes from it)."""
    spec = Option("", help, default, parse, required, secret, is_flag, check, zero_means, metavar)
    return attrs.field(repr=not secret, metadata={_OPTION_KEY: spec})


def _options_of(cls: type) -> tuple[Option, ...]:
    return tuple(
        attrs.evolve(f.metadata[_OPTION_KEY], name=f.name)
        for f in attrs.fields(cls)
        if _OPTION_KEY in f.metadata
    )


def _parse_rate_limit(raw: str) -> int | RateSchedule:
    """``--rate-limit``: ``1048576``, ``50M``, ``off`` or a timetable ``"08:00,10M 23:00,off"``."""
    text = raw.strip()
    try:
        return int(text, 10)  # plain numbers as before (a negative one fails the check)
    except ValueError:
        pass
    if "," in text or ":" in text:
        return RateSchedule.parse(text, parse_size)
    return parse_size(text)


def _parse_notify_url(raw: str) -> str:
    _parse_url(raw)  # same validation; the path is kept exactly as given
    return raw.strip()


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _rate_non_negative(v: int | RateSchedule) -> str | None:
    return _non_negative(v) if isinstance(v, int) else None


SOURCE_NAME_MAX = 64


def _parse_source_name(raw: str) -> str:
    """``--source-name``: letters, digits, ``.``, ``_``, ``-`` (it becomes a metric label and a
    log field on the destination), at most :data:`SOURCE_NAME_MAX` characters."""
    text = raw.strip()
    if len(text) > SOURCE_NAME_MAX:
        raise ValueError(f"at most {SOURCE_NAME_MAX} characters")
    if any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in text):
        raise ValueError("only letters, digits, '.', '_' and '-'")
    return text


def default_source_name() -> str:
    """The host name, cut to what ``--source-name`` accepts (a container's is its id)."""
    name = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in socket.gethostname()
    )
    return name[:SOURCE_NAME_MAX] or "source"


def _tag_ok(v: str) -> str | None:
    return "must not contain a comma" if "," in v else None


# Options both roles share, declared once each.


def _data() -> Any:
    return option("Data directory path", "", _parse_path, required=True, metavar="PATH")


def _qb_username() -> Any:
    return option("qBittorrent WebUI username", "")


def _qb_password() -> Any:
    return option("qBittorrent WebUI password", "", secret=True)


def _qb_api_key() -> Any:
    return option(
        "qBittorrent 5.2+ WebUI API key (sent as a Bearer token instead of logging in)",
        "",
        secret=True,
    )


def split_list(value: str) -> list[str]:
    """A comma-separated option value as its items (blanks dropped)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_url_list(raw: str) -> str:
    return ",".join(_parse_url(u) for u in split_list(raw))


def _parse_str_list(raw: str) -> str:
    return ",".join(split_list(raw))


# Sonarr/Radarr (qbsync.integrations.arr): comma-separated lists, the n-th key belongs to the
# n-th URL. The flags may also be repeated (``--arr-url A --arr-url B``): the CLI joins them
# with commas.
REPEATABLE = frozenset({"arr_url", "arr_api_key", "connect", "peer_fingerprint"})


def _arr_url() -> Any:
    return option(
        "Sonarr/Radarr base URLs, comma-separated or the flag repeated (source: skip downloads "
        "they marked failed or ignored; destination: ask them to import finished torrents)",
        "",
        _parse_url_list,
        metavar="URL[,URL...]",
    )


def _arr_api_key() -> Any:
    return option(
        "API keys for --arr-url in the same order, comma-separated or the flag repeated",
        "",
        _parse_str_list,
        secret=True,
        metavar="KEY[,KEY...]",
    )


def _notify_url() -> Any:
    return option(
        "URL to POST a JSON event to when a torrent is synced, fails or is handed off "
        "(empty disables it)",
        "",
        _parse_notify_url,
        secret=True,  # webhook URLs often carry their token in the path or query
        metavar="URL",
    )


def _synced_tag() -> Any:
    return option("Tag for synced torrents (empty to disable)", "synced", check=_tag_ok)


def _health_addr() -> Any:
    return option(
        "Health/metrics HTTP endpoint (empty disables it)",
        ":8080",
        _parse_optional_listen,
        metavar="ADDR",
    )


def _log_level() -> Any:
    return option("Log level: debug, info, warn, error", "info", _parse_log_level, metavar="LEVEL")


def _dry_run() -> Any:
    return option("Run without making changes anywhere", "false", _parse_bool, is_flag=True)


def _auth_token() -> Any:
    return option(
        "Shared secret authenticating source and destination (never sent on the wire)",
        "",
        secret=True,
        metavar="TOKEN",
    )


def _auth_token_file() -> Any:
    return option(
        "File holding the shared secret (overrides --auth-token)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )


def _parse_fingerprints(raw: str) -> tuple[str, ...]:
    return tuple(parse_fingerprint(v) for v in split_list(raw))


def _peer_fingerprint() -> Any:
    return option(
        "Admit only the peer whose key has this fingerprint (SHA256:..., repeatable or "
        "comma-separated; printed in the peer's event=identity log line): no trust on first use",
        "",
        _parse_fingerprints,
        metavar="FINGERPRINT",
    )


def _identity() -> Any:
    return option(
        "This daemon's Ed25519 private key as text (PEM or base64 of 32 bytes; use the "
        "environment variable, e.g. from a Kubernetes Secret; overrides --identity-file)",
        "",
        secret=True,
        metavar="KEY",
    )


def _identity_file() -> Any:
    return option(
        "File holding this daemon's private key (default: identity.key in its state "
        "directory, created on first start with mode 0600)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )


# ---------------------------------------------------------------------------------------------
# Resolved, typed configurations.


@attrs.frozen(kw_only=True)
class SourceConfig:
    data: Path = _data()
    qb_url: str = option("qBittorrent WebUI URL", "", _parse_url, required=True, metavar="URL")
    qb_username: str = _qb_username()
    qb_password: str = _qb_password()
    qb_api_key: str = _qb_api_key()
    # Required unless --listen (resolve() checks that exactly one of the two is given).
    destination_addr: HostPort | None = option(
        "Destination server address (host:port) (required) unless --listen is given",
        "",
        _parse_optional_dial,
        metavar="HOST:PORT",
    )
    min_space: float = option(  # GiB
        "Min free space (GB) before syncing", "50", _parse_float, check=_non_negative
    )
    min_seeding_time: int = option(
        "Min seeding time (seconds)", "3600", _parse_int, check=_non_negative
    )
    sleep: float = option(
        "Sleep interval between checks (seconds)", "30", _parse_float, check=_positive
    )
    rate_limit: int | RateSchedule = option(  # bytes/s (0 = unlimited) or a timetable
        "Max bytes/sec: a number, a size like 50M, or a timetable like "
        '"08:00,10M 23:00,off" (0 or off = unlimited)',
        "0",
        _parse_rate_limit,
        check=_rate_non_negative,
        metavar="RATE",
    )
    piece_timeout: float = option(
        "Timeout for stale in-flight pieces (seconds)",
        "60",
        _parse_float,
        check=_non_negative,
        zero_means="60",
    )
    reconnect_max_delay: float = option(
        "Max reconnect backoff delay (seconds)",
        "30",
        _parse_float,
        check=_non_negative,
        zero_means="30",
    )
    num_senders: int = option("Concurrent sender workers", "4", _parse_int, check=_positive)
    min_connections: int = option(
        "Minimum TCP connections to destination server", "2", _parse_int, check=_positive
    )
    max_connections: int = option(
        "Maximum TCP connections to destination server", "8", _parse_int, check=_positive
    )
    synced_tag: str = _synced_tag()
    source_removed_tag: str = option(
        "Tag on destination when source removed (empty to disable)",
        "source-removed",
        check=_tag_ok,
    )
    exclude_cleanup_tag: str = option(
        "Tag that prevents cleanup from source (empty to disable)", "", check=_tag_ok
    )
    sync_failed_tag: str = option(
        "Tag applied after repeated sync failures; remove it to retry (empty to disable)",
        "sync-failed",
        check=_tag_ok,
    )
    exclude_sync_tag: str = option(
        "Torrents with this tag are never synced; adding it aborts a sync (empty to disable)",
        "",
        check=_tag_ok,
    )
    drain_annotation: str = option(
        "Pod annotation key to gate shutdown drain (empty to drain unconditionally)",
        "qbsync/drain",
    )
    drain_timeout: float = option(
        "Shutdown drain timeout (seconds)",
        "300",
        _parse_float,
        check=_non_negative,
        zero_means="300",
    )
    # Parsed as optional; resolve() fills in the default location, so it is never None here.
    state_dir: Path = option(
        "Directory for the source's own state (default: $STATE_DIRECTORY, else "
        "~/.local/state/qbsync; works with a read-only --data)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    tls_ca: Path | None = option(
        "CA bundle to verify the destination's TLS certificate (enables TLS)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    arr_url: str = _arr_url()  # comma-separated; see split_list
    arr_api_key: str = _arr_api_key()
    health_addr: HostPort | None = _health_addr()
    log_level: str = _log_level()
    dry_run: bool = _dry_run()
    auth_token: str = _auth_token()
    auth_token_file: Path | None = _auth_token_file()
    notify_url: str = _notify_url()
    handoff_tag: str = option(
        "Tag that moves a torrent now: synced first, handed off once verified and seeding on "
        "the destination, whatever --min-space/--min-seeding-time say (empty to disable)",
        "",
        check=_tag_ok,
    )
    source_name: str = option(
        "This source's name on the destination (per-source status and metrics; one source at "
        "a time syncs an info-hash); give each source its own (empty: the host name)",
        "",
        _parse_source_name,
        metavar="NAME",
    )
    # Reverse dialing (the destination connects to the source): see resolve() for the rules.
    listen: HostPort | None = option(
        "Accept the destination's connections on this address instead of dialing it "
        "(host:port; the destination runs --connect; needs --auth-token or --peer-fingerprint)",
        "",
        _parse_optional_listen,
        metavar="ADDR",
    )
    tls_cert: Path | None = option(
        "TLS certificate (PEM) to serve the destination over TLS on --listen",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    tls_key: Path | None = option(
        "TLS private key (PEM) for --tls-cert", "", _parse_optional_path, metavar="PATH"
    )
    peer_fingerprint: tuple[str, ...] = _peer_fingerprint()
    identity: str = _identity()
    identity_file: Path | None = _identity_file()

    role: Role = "source"

    @property
    def min_space_bytes(self) -> int:
        return int(self.min_space * GiB)


@attrs.frozen(kw_only=True)
class DestinationConfig:
    data: Path = _data()
    # None only with --connect and no explicitly set listen address (see resolve()).
    listen: HostPort | None = option(
        "Listen address for sources (host:port)", ":50051", _parse_listen, metavar="ADDR"
    )
    save_path: Path | None = option(
        "Save path as qBittorrent sees it (defaults to --data)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    qb_url: str = option(
        "qBittorrent WebUI URL (empty: verify files only)", "", _parse_url, metavar="URL"
    )
    qb_username: str = _qb_username()
    qb_password: str = _qb_password()
    qb_api_key: str = _qb_api_key()
    poll_interval: float = option(
        "Verification poll interval (seconds)",
        "2",
        _parse_float,
        check=_non_negative,
        zero_means="2",
    )
    poll_timeout: float = option(
        "Verification timeout (seconds; 0 = scaled by size)",
        "300",
        _parse_float,
        check=_non_negative,
    )
    recheck: bool = option(
        "Have qBittorrent recheck every byte even when all files are selected",
        "false",
        _parse_bool,
        is_flag=True,
    )
    stream_workers: int = option(
        "Concurrent piece writers (0 = auto: 8)",
        "0",
        _parse_int,
        check=_non_negative,
        zero_means="8",
    )
    max_stream_buffer: int = option(  # MiB
        "Global memory budget for buffered pieces (MB)",
        "512",
        _parse_int,
        check=_non_negative,
        zero_means="512",
    )
    synced_tag: str = _synced_tag()
    tls_cert: Path | None = option(
        "TLS certificate (PEM) to serve sources over TLS", "", _parse_optional_path, metavar="PATH"
    )
    tls_key: Path | None = option(
        "TLS private key (PEM) for --tls-cert", "", _parse_optional_path, metavar="PATH"
    )
    arr_url: str = _arr_url()  # comma-separated; see split_list
    arr_api_key: str = _arr_api_key()
    health_addr: HostPort | None = _health_addr()
    log_level: str = _log_level()
    dry_run: bool = _dry_run()
    auth_token: str = _auth_token()
    auth_token_file: Path | None = _auth_token_file()
    notify_url: str = _notify_url()
    max_metadata: int = option(  # MiB
        "Memory budget for the metadata of torrents being synced (MB; .torrent, piece hashes,"
        " file lists)",
        "256",
        _parse_int,
        check=_non_negative,
        zero_means="256",
    )
    # Parsed as optional; resolve() fills in <data>/.qbsync, so it is never None here.
    state_dir: Path = option(
        "Directory for the destination's own state (default: <data>/.qbsync; put it outside "
        "--data when others can write --data)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    connect: str = option(  # comma-separated; see connect_addrs
        "Sources to dial (host:port of a source's --listen), comma-separated or the flag "
        "repeated; without an explicit --listen the destination then opens no wire port",
        "",
        _parse_dial_list,
        metavar="HOST:PORT",
    )
    tls_ca: Path | None = option(
        "CA bundle to verify the sources' TLS certificates when dialing them (--connect)",
        "",
        _parse_optional_path,
        metavar="PATH",
    )
    reconnect_max_delay: float = option(
        "Max reconnect backoff delay when dialing sources (seconds)",
        "30",
        _parse_float,
        check=_non_negative,
        zero_means="30",
    )
    peer_fingerprint: tuple[str, ...] = _peer_fingerprint()
    identity: str = _identity()
    identity_file: Path | None = _identity_file()

    role: Role = "destination"

    @property
    def connect_addrs(self) -> list[HostPort]:
        return [parse_host_port(a, need_host=True) for a in split_list(self.connect)]

    @property
    def max_stream_buffer_bytes(self) -> int:
        return self.max_stream_buffer * MiB

    @property
    def max_metadata_bytes(self) -> int:
        return self.max_metadata * MiB

    @property
    def qb_save_path(self) -> Path:
        """The data directory as the destination qBittorrent sees it."""
        return self.save_path if self.save_path is not None else self.data


SOURCE_OPTIONS: tuple[Option, ...] = _options_of(SourceConfig)
DESTINATION_OPTIONS: tuple[Option, ...] = _options_of(DestinationConfig)


def options_for(role: Role) -> tuple[Option, ...]:
    return SOURCE_OPTIONS if role == "source" else DESTINATION_OPTIONS


Config = SourceConfig | DestinationConfig

# Conventional fallbacks: (option name, env vars in order). Applied only while the resolved
# value still equals the option's default.
_FALLBACKS: dict[Role, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "source": (("health_addr", ("HTTP_PORT", "HEALTH_PORT")),),
    "destination": (
        ("health_addr", ("HTTP_PORT", "HEALTH_PORT")),
        ("listen", ("GRPC_PORT", "PORT")),
    ),
}


def _default_state_dir(env: Mapping[str, str]) -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY; containers usually set HOME or XDG vars.
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "qbsync"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "qbsync"


default_state_dir = _default_state_dir  # public: `qbsync peers` finds the same directory


def resolve(
    role: Role, flags: Mapping[str, str | None], env: Mapping[str, str] | None = None
) -> Config:
    """Build the typed configuration for ``role``.

    ``flags`` maps option names to the raw string given on the command line, or ``None`` when
    the flag was not given. ``env`` defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    raw: dict[str, str] = {}
    for opt in options_for(role):
        given = flags.get(opt.name)
        if given is not None:
            raw[opt.name] = given
        elif opt.env(role) in env:
            raw[opt.name] = env[opt.env(role)]
        else:
            raw[opt.name] = opt.default

    from_fallback: dict[str, str] = {}  # option name -> conventional variable that set it
    for name, env_names in _FALLBACKS[role]:
        opt = _option(role, name)
        if raw[name] == opt.default:
            for env_name in env_names:
                value = env.get(env_name, "").strip()
                if value:
                    raw[name] = value if ":" in value else f":{value}"
                    from_fallback[name] = env_name
                    break

    values: dict[str, Any] = {}
    for opt in options_for(role):
        text = raw[opt.name]
        where = f"{opt.flag} / {opt.env(role)}"
        if opt.name in from_fallback:
            where += f" (from {from_fallback[opt.name]})"
        if opt.required and not text.strip():
            raise ConfigError(f"{where} is required")
        try:
            value = opt.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if opt.check is not None:
            reason = opt.check(value)
            if reason:
                raise ConfigError(f"{where}: {reason} (got {text.strip()!r})")
        if opt.zero_means is not None and value == 0:
            value = opt.parse(opt.zero_means)
        values[opt.name] = value

    if values.get("auth_token_file") is not None:
        path: Path = values["auth_token_file"]
        where = f"--auth-token-file / {_option(role, 'auth_token_file').env(role)}"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {str(path)!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {str(path)!r} is not UTF-8 text") from None
        if not token:
            raise ConfigError(f"{where}: {str(path)!r} is empty")
        values["auth_token"] = token

    _check_token(role, values.get("auth_token") or "")
    _check_readable(
        values["identity_file"],
        f"--identity-file / {_option(role, 'identity_file').env(role)}",
    )

    arr_urls, arr_keys = split_list(values["arr_url"]), split_list(values["arr_api_key"])
    if len(arr_urls) != len(arr_keys):
        raise ConfigError(
            f"--arr-url has {len(arr_urls)} URL(s) but --arr-api-key has "
            f"{len(arr_keys)} key(s): give one key per URL, in the same order "
            f"({_option(role, 'arr_url').env(role)} / {_option(role, 'arr_api_key').env(role)})"
        )

    if role == "source":
        if values["min_connections"] > values["max_connections"]:
            raise ConfigError(
                f"--min-connections ({values['min_connections']}) must not exceed "
                f"--max-connections ({values['max_connections']}) "
                f"(QBSYNC_SOURCE_MIN_CONNECTIONS / QBSYNC_SOURCE_MAX_CONNECTIONS)"
            )
        _check_handoff_tag(values)
        _check_source_reach(values)
        if not values["source_name"]:
            values["source_name"] = default_source_name()
        if values["state_dir"] is None:
            values["state_dir"] = _default_state_dir(env)
        _check_readable(values["tls_ca"], "--tls-ca / QBSYNC_SOURCE_TLS_CA")
        _check_tls_pair(role, values)
        return SourceConfig(**values)

    _check_tls_pair(role, values)
    if values["connect"]:
        listen_explicit = flags.get("listen") is not None or "QBSYNC_DESTINATION_LISTEN" in env
        if not listen_explicit:
            # Dialing only: no wire port at all (GRPC_PORT/PORT do not open one either).
            values["listen"] = None
        if values["tls_cert"] is not None and values["listen"] is None:
            raise ConfigError(
                "--tls-cert/--tls-key serve TLS on the listen port, and with --connect and no "
                "--listen there is none: the side that dials verifies the other with --tls-ca "
                "(QBSYNC_DESTINATION_TLS_CERT / QBSYNC_DESTINATION_TLS_CA)"
            )
    elif values["tls_ca"] is not None:
        raise ConfigError(
            "--tls-ca is for dialing sources (--connect); a listening destination serves TLS "
            "with --tls-cert/--tls-key (QBSYNC_DESTINATION_TLS_CA / QBSYNC_DESTINATION_CONNECT)"
        )
    _check_readable(values["tls_ca"], "--tls-ca / QBSYNC_DESTINATION_TLS_CA")
    if values["state_dir"] is None:
        values["state_dir"] = destination_state_dir(values["data"])
    return DestinationConfig(**values)


def _check_tls_pair(role: Role, values: Mapping[str, Any]) -> None:
    cert, key = values["tls_cert"], values["tls_key"]
    prefix = f"QBSYNC_{role.upper()}_"
    if (cert is None) != (key is None):
        raise ConfigError(
            f"--tls-cert and --tls-key go together ({prefix}TLS_CERT / {prefix}TLS_KEY)"
        )
    _check_readable(cert, f"--tls-cert / {prefix}TLS_CERT")
    _check_readable(key, f"--tls-key / {prefix}TLS_KEY")


def _check_source_reach(values: Mapping[str, Any]) -> None:
    """Exactly one of ``--destination-addr`` (the source dials) and ``--listen`` (the
    destination dials in with ``--connect``). The side that listens is the TLS server
    (``--tls-cert``/``--tls-key``), the side that dials verifies it (``--tls-ca``). A listening
    source is reachable by anyone who finds the port, so it admits only a peer proving the
    token: it refuses to start without one."""
    dial, listen = values["destination_addr"], values["listen"]
    if dial is not None and listen is not None:
        raise ConfigError(
            "give one of --destination-addr (this source dials the destination) or --listen "
            "(the destination dials in with --connect), not both "
            "(QBSYNC_SOURCE_DESTINATION_ADDR / QBSYNC_SOURCE_LISTEN)"
        )
    if dial is None and listen is None:
        raise ConfigError(
            "--destination-addr / QBSYNC_SOURCE_DESTINATION_ADDR is required "
            "(or --listen / QBSYNC_SOURCE_LISTEN when the destination dials in with --connect)"
        )
    if listen is not None:
        if not values.get("auth_token") and not values.get("peer_fingerprint"):
            raise ConfigError(
                "--listen needs --auth-token/--auth-token-file or --peer-fingerprint: a listening "
                "source is reachable by anyone, so it never trusts a key on first use "
                "(QBSYNC_SOURCE_LISTEN / QBSYNC_SOURCE_AUTH_TOKEN / "
                "QBSYNC_SOURCE_PEER_FINGERPRINT; generate a token with: openssl rand -hex 32)"
            )
        if values["tls_ca"] is not None:
            raise ConfigError(
                "--tls-ca is for the side that dials; a listening source serves TLS with "
                "--tls-cert/--tls-key (QBSYNC_SOURCE_TLS_CA / QBSYNC_SOURCE_LISTEN)"
            )
    elif values["tls_cert"] is not None or values["tls_key"] is not None:
        raise ConfigError(
            "--tls-cert/--tls-key are for a listening source (--listen); a source that dials "
            "verifies the destination with --tls-ca (QBSYNC_SOURCE_TLS_CERT / "
            "QBSYNC_SOURCE_DESTINATION_ADDR)"
        )


def destination_state_dir(data: Path) -> Path:
    """The destination's default state directory: ``<data>/.qbsync``. ``config.state_dir``
    is always the resolved one (for both roles): every record a daemon keeps (torrent state,
    and its identity key and pins) goes under it."""
    return data / STATE_DIR_NAME


MIN_TOKEN_BYTES = 16
# Placeholders people copy from examples; a token anyone can guess authenticates nobody.
PLACEHOLDER_TOKENS = frozenset(
    {
        "change-me",
        "changeme",
        "change_me",
        "replace-me",
        "secret",
        "token",
        "your-token",
        "password",
        "example",
        "<token>",
        "xxx",
    }
)


MIN_TOKEN_DISTINCT = 5  # 16 random hex digits show 10 distinct on average, 4 or fewer ~1 in 10^6
SEQUENTIAL_SHARE = 0.8  # of neighbouring characters one code point apart: "0123456789abcdef"


def token_weakness(token: str) -> str | None:
    """Why ``token`` is trivially guessable, or ``None``. Length is checked separately; these
    are the forms a guesser tries first whatever their length: one character repeated
    (``aaaaaaaaaaaaaaaa``), a short pattern repeated (``abcabcabcabcabca``,
    ``passwordpassword``), very few distinct characters (``aaaa1111bbbb2222``) and runs of
    sequential characters (``0123456789abcdef``, ``abcdefghijklmnop``, ``9876543210...``)."""
    chars = token
    distinct = len(set(chars))
    if distinct == 1:
        return "the token is one character repeated"
    period = _smallest_period(chars)
    if period <= len(chars) // 2:
        return f"the token repeats a {period}-character pattern"
    if distinct < MIN_TOKEN_DISTINCT:
        return f"the token has only {distinct} distinct characters"
    pairs = list(itertools.pairwise(chars))
    wraps = {("9", "0"), ("0", "9"), ("z", "a"), ("a", "z"), ("Z", "A"), ("A", "Z")}
    sequential = sum(1 for a, b in pairs if abs(ord(b) - ord(a)) == 1 or (a, b) in wraps)
    if pairs and sequential >= SEQUENTIAL_SHARE * len(pairs):
        return "the token is mostly a run of sequential characters"
    return None


def _smallest_period(text: str) -> int:
    """The smallest ``p`` with ``text[i] == text[i - p]`` for every ``i >= p``: the length minus
    the longest proper border (KMP prefix function, linear even for a huge token file)."""
    border = [0] * len(text)
    k = 0
    for i in range(1, len(text)):
        while k and text[i] != text[k]:
            k = border[k - 1]
        if text[i] == text[k]:
            k += 1
        border[i] = k
    return len(text) - (border[-1] if text else 0)


def _check_token(role: Role, token: str) -> None:
    """Refuse a token that is too short to resist guessing, a known placeholder, or one of
    the trivially guessable forms of :func:`token_weakness`. No token at all stays allowed (the
    seed document's setups run without one); the runners warn loudly about it."""
    if not token:
        return
    weakness = token_weakness(token)
    if token.strip().lower() in PLACEHOLDER_TOKENS:
        problem = f"{token.strip()!r} is a placeholder from the examples"
    elif len(token.encode("utf-8")) < MIN_TOKEN_BYTES:
        problem = f"the token is shorter than {MIN_TOKEN_BYTES} bytes"
    elif weakness is not None:
        problem = weakness
    else:
        return
    raise ConfigError(
        f"--auth-token / --auth-token-file ({_option(role, 'auth_token').env(role)} / "
        f"{_option(role, 'auth_token_file').env(role)}): {problem}; "
        "generate one with: openssl rand -hex 32"
    )


def _check_handoff_tag(values: Mapping[str, Any]) -> None:
    """``--handoff-tag`` deletes the source copy of every torrent carrying it: sharing a name
    with a tag qbsync itself sets (``--synced-tag``, ``--sync-failed-tag``) would hand off
    everything it syncs, and sharing one with ``--exclude-sync-tag`` or
    ``--exclude-cleanup-tag`` asks for two contradicting things at once."""
    tag = values.get("handoff_tag") or ""
    if not tag:
        return
    for other in ("synced_tag", "sync_failed_tag", "exclude_sync_tag", "exclude_cleanup_tag"):
        if values.get(other) == tag:
            flag = "--" + other.replace("_", "-")
            raise ConfigError(
                f"--handoff-tag ({tag!r}) must differ from {flag} "
                f"(QBSYNC_SOURCE_HANDOFF_TAG / QBSYNC_SOURCE_{other.upper()})"
            )


def _check_readable(path: Path | None, where: str) -> None:
    if path is not None and not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: cannot read {str(path)!r}")


def _option(role: Role, name: str) -> Option:
    for opt in options_for(role):
        if opt.name == name:
            return opt
    raise KeyError(name)


def redacted(config: Config) -> dict[str, Any]:
    """The configuration as JSON-ready data, secrets replaced by ``"***"`` when set."""
    out: dict[str, Any] = {"role": config.role}
    for opt in options_for(config.role):
        value = getattr(config, opt.name)
        if opt.secret:
            out[opt.name] = "***" if value else ""
        elif opt.name == "qb_url":
            out[opt.name] = redact_url(value)
        elif value is None:
            out[opt.name] = None
        elif isinstance(value, (Path, HostPort, RateSchedule)):
            out[opt.name] = str(value)
        elif isinstance(value, tuple):  # a repeatable option: as the user would type it
            out[opt.name] = ",".join(map(str, value))
        else:
            out[opt.name] = value
    return out
