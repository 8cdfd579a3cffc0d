"""Every setting of both daemons, in one place.

Each option is declared once, in ``SOURCE_OPTIONS`` or ``DESTINATION_OPTIONS``. That single
declaration drives the argparse flag, its ``--help`` line, the environment variable, the
default, the parser and the validation, so the README tables, ``--help`` and the code cannot
drift apart.

Resolution order is flag > environment variable > default. After that, the conventional
fallbacks of the seed document apply (``HTTP_PORT``/``HEALTH_PORT`` for the health address,
``GRPC_PORT``/``PORT`` for the destination's listen address) *only while the resolved value
still equals the built-in default*, exactly like the Go reference does.

A bad value raises :class:`ConfigError` with one line naming the flag and its environment
variable; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from .source.ratelimit import RateSchedule

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


@attrs.frozen
class HostPort:
    """A parsed ``host:port``. An empty host means "all interfaces" when listening."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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


def _rate_non_negative(v: int | RateSchedule) -> str | None:
    return _non_negative(v) if isinstance(v, int) else None


def _parse_notify_url(raw: str) -> str:
    _parse_url(raw)  # same validation; the path is kept exactly as given
    return raw.strip()


# ---------------------------------------------------------------------------------------------
# Option declarations.


@attrs.frozen
class Option:
    """One setting: flag, environment variable, default and parser, declared once."""

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


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _tag_ok(v: str) -> str | None:
    return "must not contain a comma" if "," in v else None


_COMMON_QB = (
    Option("qb_username", "qBittorrent WebUI username", ""),
    Option("qb_password", "qBittorrent WebUI password", "", secret=True),
)
_COMMON_TAIL = (
    Option(
        "health_addr",
        "Health/metrics HTTP endpoint (empty disables it)",
        ":8080",
        _parse_optional_listen,
        metavar="ADDR",
    ),
    Option(
        "log_level",
        "Log level: debug, info, warn, error",
        "info",
        _parse_log_level,
        metavar="LEVEL",
    ),
    Option("dry_run", "Run without making changes anywhere", "false", _parse_bool, is_flag=True),
    Option(
        "auth_token",
        "Shared secret authenticating source and destination (never sent on the wire)",
        "",
        secret=True,
        metavar="TOKEN",
    ),
    Option(
        "auth_token_file",
        "File holding the shared secret (overrides --auth-token)",
        "",
        _parse_optional_path,
        metavar="PATH",
    ),
    Option(
        "notify_url",
        "URL to POST a JSON event to when a torrent is synced, fails or is handed off "
        "(empty disables it)",
        "",
        _parse_notify_url,
        secret=True,  # webhook URLs often carry their token in the path or query
        metavar="URL",
    ),
)

SOURCE_OPTIONS: tuple[Option, ...] = (
    Option("data", "Data directory path", "", _parse_path, required=True, metavar="PATH"),
    Option("qb_url", "qBittorrent WebUI URL", "", _parse_url, required=True, metavar="URL"),
    *_COMMON_QB,
    Option(
        "destination_addr",
        "Destination server address (host:port)",
        "",
        _parse_dial,
        required=True,
        metavar="HOST:PORT",
    ),
    Option(
        "min_space", "Min free space (GB) before syncing", "50", _parse_float, check=_non_negative
    ),
    Option(
        "min_seeding_time",
        "Min seeding time (seconds)",
        "3600",
        _parse_int,
        check=_non_negative,
    ),
    Option("sleep", "Sleep interval between checks (seconds)", "30", _parse_float, check=_positive),
    Option(
        "rate_limit",
        "Max bytes/sec: a number, a size like 50M, or a timetable like "
        '"08:00,10M 23:00,off" (0 or off = unlimited)',
        "0",
        _parse_rate_limit,
        check=_rate_non_negative,
        metavar="RATE",
    ),
    Option(
        "piece_timeout",
        "Timeout for stale in-flight pieces (seconds)",
        "60",
        _parse_float,
        check=_non_negative,
        zero_means="60",
    ),
    Option(
        "reconnect_max_delay",
        "Max reconnect backoff delay (seconds)",
        "30",
        _parse_float,
        check=_non_negative,
        zero_means="30",
    ),
    Option("num_senders", "Concurrent sender workers", "4", _parse_int, check=_positive),
    Option(
        "min_connections",
        "Minimum TCP connections to destination server",
        "2",
        _parse_int,
        check=_positive,
    ),
    Option(
        "max_connections",
        "Maximum TCP connections to destination server",
        "8",
        _parse_int,
        check=_positive,
    ),
    Option("synced_tag", "Tag for synced torrents (empty to disable)", "synced", check=_tag_ok),
    Option(
        "source_removed_tag",
        "Tag on destination when source removed (empty to disable)",
        "source-removed",
        check=_tag_ok,
    ),
    Option(
        "exclude_cleanup_tag",
        "Tag that prevents cleanup from source (empty to disable)",
        "",
        check=_tag_ok,
    ),
    Option(
        "sync_failed_tag",
        "Tag applied after repeated sync failures; remove it to retry (empty to disable)",
        "sync-failed",
        check=_tag_ok,
    ),
    Option(
        "exclude_sync_tag",
        "Torrents with this tag are never synced; adding it aborts a sync (empty to disable)",
        "",
        check=_tag_ok,
    ),
    Option(
        "drain_annotation",
        "Pod annotation key to gate shutdown drain (empty to drain unconditionally)",
        "qbsync/drain",
    ),
    Option(
        "drain_timeout",
        "Shutdown drain timeout (seconds)",
        "300",
        _parse_float,
        check=_non_negative,
        zero_means="300",
    ),
    Option(
        "state_dir",
        "Directory for the source's own state (default: $STATE_DIRECTORY, else "
        "~/.local/state/qbsync; works with a read-only --data)",
        "",
        _parse_optional_path,
        metavar="PATH",
    ),
    Option(
        "tls_ca",
        "CA bundle to verify the destination's TLS certificate (enables TLS)",
        "",
        _parse_optional_path,
        metavar="PATH",
    ),
    *_COMMON_TAIL,
)

DESTINATION_OPTIONS: tuple[Option, ...] = (
    Option("data", "Data directory path", "", _parse_path, required=True, metavar="PATH"),
    Option(
        "listen", "Listen address for sources (host:port)", ":50051", _parse_listen, metavar="ADDR"
    ),
    Option(
        "save_path",
        "Save path as qBittorrent sees it (defaults to --data)",
        "",
        _parse_optional_path,
        metavar="PATH",
    ),
    Option(
        "qb_url", "qBittorrent WebUI URL (empty: verify files only)", "", _parse_url, metavar="URL"
    ),
    *_COMMON_QB,
    Option(
        "poll_interval",
        "Verification poll interval (seconds)",
        "2",
        _parse_float,
        check=_non_negative,
        zero_means="2",
    ),
    Option(
        "poll_timeout",
        "Verification timeout (seconds; 0 = scaled by size)",
        "300",
        _parse_float,
        check=_non_negative,
    ),
    Option(
        "stream_workers",
        "Concurrent piece writers (0 = auto: 8)",
        "0",
        _parse_int,
        check=_non_negative,
        zero_means="8",
    ),
    Option(
        "max_stream_buffer",
        "Global memory budget for buffered pieces (MB)",
        "512",
        _parse_int,
        check=_non_negative,
        zero_means="512",
    ),
    Option("synced_tag", "Tag for synced torrents (empty to disable)", "synced", check=_tag_ok),
    Option(
        "tls_cert",
        "TLS certificate (PEM) to serve sources over TLS",
        "",
        _parse_optional_path,
        metavar="PATH",
    ),
    Option(
        "tls_key", "TLS private key (PEM) for --tls-cert", "", _parse_optional_path, metavar="PATH"
    ),
    *_COMMON_TAIL,
)


def options_for(role: Role) -> tuple[Option, ...]:
    return SOURCE_OPTIONS if role == "source" else DESTINATION_OPTIONS


# ---------------------------------------------------------------------------------------------
# Resolved, typed configurations.


@attrs.frozen(kw_only=True)
class SourceConfig:
    data: Path
    qb_url: str
    qb_username: str
    qb_password: str = attrs.field(repr=False)
    destination_addr: HostPort
    min_space: float  # GiB
    min_seeding_time: int  # seconds
    sleep: float
    rate_limit: int | RateSchedule  # bytes/s (0 = unlimited) or a timetable
    piece_timeout: float
    reconnect_max_delay: float
    num_senders: int
    min_connections: int
    max_connections: int
    synced_tag: str
    source_removed_tag: str
    exclude_cleanup_tag: str
    sync_failed_tag: str
    exclude_sync_tag: str
    drain_annotation: str
    drain_timeout: float
    state_dir: Path
    tls_ca: Path | None
    health_addr: HostPort | None
    log_level: str
    dry_run: bool
    auth_token: str = attrs.field(repr=False)
    auth_token_file: Path | None
    notify_url: str = attrs.field(default="", repr=False)

    role: Role = "source"

    @property
    def min_space_bytes(self) -> int:
        return int(self.min_space * GiB)


@attrs.frozen(kw_only=True)
class DestinationConfig:
    data: Path
    listen: HostPort
    save_path: Path | None
    qb_url: str
    qb_username: str
    qb_password: str = attrs.field(repr=False)
    poll_interval: float
    poll_timeout: float
    stream_workers: int
    max_stream_buffer: int  # MiB
    synced_tag: str
    tls_cert: Path | None
    tls_key: Path | None
    health_addr: HostPort | None
    log_level: str
    dry_run: bool
    auth_token: str = attrs.field(repr=False)
    auth_token_file: Path | None
    notify_url: str = attrs.field(default="", repr=False)

    role: Role = "destination"

    @property
    def max_stream_buffer_bytes(self) -> int:
        return self.max_stream_buffer * MiB

    @property
    def qb_save_path(self) -> Path:
        """The data directory as the destination qBittorrent sees it."""
        return self.save_path if self.save_path is not None else self.data


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

    if role == "source":
        if values["min_connections"] > values["max_connections"]:
            raise ConfigError(
                f"--min-connections ({values['min_connections']}) must not exceed "
                f"--max-connections ({values['max_connections']}) "
                f"(QBSYNC_SOURCE_MIN_CONNECTIONS / QBSYNC_SOURCE_MAX_CONNECTIONS)"
            )
        if values["state_dir"] is None:
            values["state_dir"] = _default_state_dir(env)
        _check_readable(values["tls_ca"], "--tls-ca / QBSYNC_SOURCE_TLS_CA")
        return SourceConfig(**values)

    cert, key = values["tls_cert"], values["tls_key"]
    if (cert is None) != (key is None):
        raise ConfigError(
            "--tls-cert and --tls-key go together "
            "(QBSYNC_DESTINATION_TLS_CERT / QBSYNC_DESTINATION_TLS_KEY)"
        )
    _check_readable(cert, "--tls-cert / QBSYNC_DESTINATION_TLS_CERT")
    _check_readable(key, "--tls-key / QBSYNC_DESTINATION_TLS_KEY")
    return DestinationConfig(**values)


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
        elif value is None:
            out[opt.name] = None
        elif isinstance(value, (Path, HostPort, RateSchedule)):
            out[opt.name] = str(value)
        else:
            out[opt.name] = value
    return out
