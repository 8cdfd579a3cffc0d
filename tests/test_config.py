"""Configuration resolution: validation, precedence and the seed's conventional fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbsync.config import (
    DESTINATION_OPTIONS,
    SOURCE_OPTIONS,
    ConfigError,
    DestinationConfig,
    Role,
    SourceConfig,
    options_for,
    parse_host_port,
    redacted,
    resolve,
)
from qbsync.wire.address import HostPort

SRC_REQUIRED = {
    "data": "/downloads",
    "qb_url": "http://localhost:8080",
    "destination_addr": "192.168.1.100:50051",
}
DST_REQUIRED = {"data": "/downloads"}


def src(env: dict[str, str] | None = None, **flags: str) -> SourceConfig:
    config = resolve("source", {**SRC_REQUIRED, **flags}, env or {})
    assert isinstance(config, SourceConfig)
    return config


def dst(env: dict[str, str] | None = None, **flags: str) -> DestinationConfig:
    config = resolve("destination", {**DST_REQUIRED, **flags}, env or {})
    assert isinstance(config, DestinationConfig)
    return config


def error_of(role: Role, flags: dict[str, str], env: dict[str, str] | None = None) -> str:
    base = SRC_REQUIRED if role == "source" else DST_REQUIRED
    with pytest.raises(ConfigError) as exc:
        resolve(role, {**base, **flags}, env or {})
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- defaults ---------------------------------------------------------------------------------


def test_seed_commands_resolve_with_seed_defaults() -> None:
    s = src()
    assert s.data == Path("/downloads")
    assert s.qb_url == "http://localhost:8080"
    assert s.destination_addr == HostPort("192.168.1.100", 50051)
    assert (s.min_space, s.min_seeding_time, s.sleep, s.rate_limit) == (50, 3600, 30, 0)
    assert (s.piece_timeout, s.reconnect_max_delay, s.num_senders) == (60, 30, 4)
    assert (s.min_connections, s.max_connections) == (2, 8)
    assert (s.synced_tag, s.source_removed_tag, s.exclude_cleanup_tag) == (
        "synced",
        "source-removed",
        "",
    )
    assert (s.drain_annotation, s.drain_timeout) == ("qbsync/drain", 300)
    assert s.health_addr == HostPort("", 8080)
    assert (s.log_level, s.dry_run, s.auth_token) == ("info", False, "")
    assert s.min_space_bytes == 50 * 1024**3

    d = dst(listen=":50051", qb_url="http://localhost:8080")
    assert d.listen == HostPort("", 50051)
    assert d.save_path is None and d.qb_save_path == Path("/downloads")
    assert (d.poll_interval, d.poll_timeout, d.stream_workers, d.max_stream_buffer) == (
        2,
        300,
        8,
        512,
    )
    assert d.max_stream_buffer_bytes == 512 * 1024**2
    assert d.health_addr == HostPort("", 8080)
    assert (d.synced_tag, d.log_level, d.dry_run) == ("synced", "info", False)


def test_zero_means_the_go_default() -> None:
    s = src(piece_timeout="0", reconnect_max_delay="0", drain_timeout="0")
    assert (s.piece_timeout, s.reconnect_max_delay, s.drain_timeout) == (60, 30, 300)
    d = dst(poll_interval="0", stream_workers="0", max_stream_buffer="0")
    assert (d.poll_interval, d.stream_workers, d.max_stream_buffer) == (2, 8, 512)
    assert dst(poll_timeout="0").poll_timeout == 0  # 0 = scaled by size, not the default


def test_state_dir_default_follows_systemd_then_xdg_then_home() -> None:
    assert src({"STATE_DIRECTORY": "/var/lib/qbsync:/x"}).state_dir == Path("/var/lib/qbsync")
    assert src({"XDG_STATE_HOME": "/xdg"}).state_dir == Path("/xdg/qbsync")
    assert src({"HOME": "/home/u"}).state_dir == Path("/home/u/.local/state/qbsync")
    assert src(state_dir="/explicit").state_dir == Path("/explicit")


# -- validation: every bad value names its flag and environment variable ----------------------

BAD_VALUES: list[tuple[Role, str, str, str]] = [
    # (role, option, bad value, expected reason fragment)
    ("source", "sleep", "0", "greater than 0"),
    ("source", "sleep", "-5", "greater than 0"),
    ("source", "sleep", "soon", "not a number"),
    ("source", "sleep", "nan", "not a finite number"),
    ("source", "min_space", "-1", "must not be negative"),
    ("source", "min_seeding_time", "-10", "must not be negative"),
    ("source", "min_seeding_time", "1.5", "not a whole number"),
    ("source", "rate_limit", "-1", "must not be negative"),
    ("source", "piece_timeout", "-1", "must not be negative"),
    ("source", "reconnect_max_delay", "-0.5", "must not be negative"),
    ("source", "drain_timeout", "-300", "must not be negative"),
    ("source", "num_senders", "0", "greater than 0"),
    ("source", "min_connections", "0", "greater than 0"),
    ("source", "max_connections", "-8", "greater than 0"),
    ("source", "destination_addr", ":50051", "missing host"),
    ("source", "destination_addr", "192.168.1.100", "not host:port"),
    ("source", "destination_addr", "host:0", "port out of range"),
    ("source", "destination_addr", "host:99999", "port out of range"),
    ("source", "destination_addr", "host:http", "bad port"),
    ("source", "qb_url", "localhost:8080", "not an http(s) URL"),
    ("source", "qb_url", "ftp://localhost", "not an http(s) URL"),
    ("source", "qb_url", "http://", "not an http(s) URL"),
    ("source", "qb_url", "http://host:port", "bad port"),
    ("source", "log_level", "verbose", "unknown log level"),
    ("source", "dry_run", "maybe", "not a boolean"),
    ("source", "synced_tag", "a,b", "comma"),
    ("source", "health_addr", "8080", "not host:port"),
    ("source", "health_addr", ":70000", "port out of range"),
    ("destination", "listen", "50051", "not host:port"),
    ("destination", "listen", "::1:50051", "not host:port"),
    ("destination", "listen", "[::1]50051", "not host:port"),
    ("destination", "listen", "0.0.0.0:x", "bad port"),
    ("destination", "qb_url", "qbittorrent", "not an http(s) URL"),
    ("destination", "poll_interval", "-1", "must not be negative"),
    ("destination", "poll_timeout", "-1", "must not be negative"),
    ("destination", "stream_workers", "-2", "must not be negative"),
    ("destination", "max_stream_buffer", "-512", "must not be negative"),
    ("destination", "max_stream_buffer", "1.5", "not a whole number"),
    ("destination", "log_level", "trace", "unknown log level"),
    ("destination", "dry_run", "2", "not a boolean"),
    ("destination", "synced_tag", "x,", "comma"),
]


@pytest.mark.parametrize(("role", "name", "value", "reason"), BAD_VALUES)
@pytest.mark.parametrize("via", ["flag", "env"])
def test_bad_value_names_flag_and_env(
    role: Role, name: str, value: str, reason: str, via: str
) -> None:
    opt = next(o for o in options_for(role) if o.name == name)
    if via == "flag":
        message = error_of(role, {name: value})
    else:
        base = dict(SRC_REQUIRED if role == "source" else DST_REQUIRED)
        base.pop(name, None)
        with pytest.raises(ConfigError) as exc:
            resolve(role, base, {opt.env(role): value})
        message = str(exc.value)
    assert opt.flag in message and opt.env(role) in message, message
    assert reason in message, message


@pytest.mark.parametrize("role", ["source", "destination"])
def test_required_options(role: Role) -> None:
    required = [o for o in options_for(role) if o.required]
    assert {o.name for o in required} == ({"data", "qb_url"} if role == "source" else {"data"})
    base = SRC_REQUIRED if role == "source" else DST_REQUIRED
    for opt in required:
        flags = {k: v for k, v in base.items() if k != opt.name}
        with pytest.raises(ConfigError, match="is required") as exc:
            resolve(role, flags, {})
        assert opt.flag in str(exc.value) and opt.env(role) in str(exc.value)
        # An empty environment variable is no better than a missing one.
        with pytest.raises(ConfigError, match="is required"):
            resolve(role, flags, {opt.env(role): "  "})


def test_destination_addr_required_unless_listen() -> None:
    """Required as before (the same message first), now with --listen as the alternative."""
    flags = {k: v for k, v in SRC_REQUIRED.items() if k != "destination_addr"}
    for env in ({}, {"QBSYNC_SOURCE_DESTINATION_ADDR": "  "}):
        with pytest.raises(ConfigError) as exc:
            resolve("source", flags, env)
        message = str(exc.value)
        assert message.startswith("--destination-addr / QBSYNC_SOURCE_DESTINATION_ADDR is required")
        assert "--listen" in message


def test_min_connections_above_max() -> None:
    message = error_of("source", {"min_connections": "9", "max_connections": "8"})
    for part in ("--min-connections", "--max-connections", "QBSYNC_SOURCE_MIN_CONNECTIONS"):
        assert part in message
    assert src(min_connections="8", max_connections="8").min_connections == 8


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  s3cret-token-01234\n")
    assert src(auth_token_file=str(token)).auth_token == "s3cret-token-01234"
    # The file wins over --auth-token.
    assert src(auth_token="other", auth_token_file=str(token)).auth_token == "s3cret-token-01234"
    assert (
        dst({"QBSYNC_DESTINATION_AUTH_TOKEN_FILE": str(token)}).auth_token == "s3cret-token-01234"
    )

    cases = {
        "missing": (tmp_path / "nope", "cannot read"),
        "directory": (tmp_path, "cannot read"),
    }
    empty = tmp_path / "empty"
    empty.write_text(" \n\n")
    cases["empty"] = (empty, "is empty")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases["binary"] = (binary, "not UTF-8")
    for role in ("source", "destination"):
        for path, reason in cases.values():
            message = error_of(role, {"auth_token_file": str(path)})
            env = f"QBSYNC_{role.upper()}_AUTH_TOKEN_FILE"
            assert "--auth-token-file" in message and env in message, message
            assert reason in message, message


def test_tls_flags(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    message = error_of("destination", {"tls_cert": str(cert)})
    assert "--tls-cert" in message and "--tls-key" in message
    assert "QBSYNC_DESTINATION_TLS_CERT" in message
    message = error_of("destination", {"tls_key": str(key)})
    assert "--tls-key" in message
    d = dst(tls_cert=str(cert), tls_key=str(key))
    assert (d.tls_cert, d.tls_key) == (cert, key)
    message = error_of("destination", {"tls_cert": str(tmp_path / "x"), "tls_key": str(key)})
    assert "--tls-cert / QBSYNC_DESTINATION_TLS_CERT" in message and "cannot read" in message
    message = error_of("source", {"tls_ca": str(tmp_path / "ca.pem")})
    assert "--tls-ca / QBSYNC_SOURCE_TLS_CA" in message
    assert src(tls_ca=str(cert)).tls_ca == cert


# -- precedence ------------------------------------------------------------------------------


def test_flag_beats_env_beats_default() -> None:
    assert src().sleep == 30
    assert src({"QBSYNC_SOURCE_SLEEP": "5"}).sleep == 5
    assert src({"QBSYNC_SOURCE_SLEEP": "5"}, sleep="7").sleep == 7
    # The other role's variables are ignored.
    assert src({"QBSYNC_DESTINATION_SLEEP": "5"}).sleep == 30
    assert dst({"QBSYNC_SOURCE_SYNCED_TAG": "x"}).synced_tag == "synced"
    # An explicitly empty value is a value (it disables the tag), not "unset".
    assert src({"QBSYNC_SOURCE_SYNCED_TAG": ""}).synced_tag == ""
    assert src({"QBSYNC_SOURCE_SYNCED_TAG": "env"}, synced_tag="").synced_tag == ""
    # Required values can come from the environment alone.
    config = resolve(
        "source",
        {},
        {
            "QBSYNC_SOURCE_DATA": "/d",
            "QBSYNC_SOURCE_QB_URL": "https://qb.example:8443/",
            "QBSYNC_SOURCE_DESTINATION_ADDR": "[fd00::1]:50051",
            "QBSYNC_SOURCE_DRY_RUN": "TRUE",
            "QBSYNC_SOURCE_LOG_LEVEL": "WARNING",
        },
    )
    assert isinstance(config, SourceConfig)
    assert config.qb_url == "https://qb.example:8443"
    assert config.destination_addr == HostPort("fd00::1", 50051)
    assert str(config.destination_addr) == "[fd00::1]:50051"
    assert config.dry_run is True and config.log_level == "warn"


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("1", True), ("yes", True), ("On", True), ("false", False), ("0", False)],
)
def test_bools(raw: str, value: bool) -> None:
    assert src(dry_run=raw).dry_run is value


# -- conventional fallbacks ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["source", "destination"])
def test_health_port_fallbacks(role: Role) -> None:
    def health(env: dict[str, str], **flags: str) -> HostPort | None:
        base = SRC_REQUIRED if role == "source" else DST_REQUIRED
        return resolve(role, {**base, **flags}, env).health_addr

    prefix = f"QBSYNC_{role.upper()}_"
    assert health({}) == HostPort("", 8080)
    assert health({"HTTP_PORT": "9090"}) == HostPort("", 9090)  # bare port -> ":port"
    assert health({"HEALTH_PORT": "9191"}) == HostPort("", 9191)
    assert health({"HTTP_PORT": "9090", "HEALTH_PORT": "9191"}) == HostPort("", 9090)
    assert health({"HTTP_PORT": "", "HEALTH_PORT": "9191"}) == HostPort("", 9191)
    assert health({"HTTP_PORT": "127.0.0.1:9090"}) == HostPort("127.0.0.1", 9090)
    # An explicit non-default flag or variable wins over the fallback ...
    assert health({"HTTP_PORT": "9090"}, health_addr=":7070") == HostPort("", 7070)
    assert health({"HTTP_PORT": "9090", prefix + "HEALTH_ADDR": ":7070"}) == HostPort("", 7070)
    # ... but an explicit value equal to the default is still overridden, like the Go reference.
    assert health({"HTTP_PORT": "9090"}, health_addr=":8080") == HostPort("", 9090)
    # Empty disables the endpoint, and the fallback does not re-enable it.
    assert health({}, health_addr="") is None
    assert health({"HTTP_PORT": "9090"}, health_addr="") is None
    # A bad fallback names the variable it came from.
    with pytest.raises(ConfigError) as exc:
        health({"HEALTH_PORT": "http"})
    assert "HEALTH_PORT" in str(exc.value) and "--health-addr" in str(exc.value)


def test_listen_port_fallbacks() -> None:
    assert dst().listen == HostPort("", 50051)
    assert dst({"GRPC_PORT": "6000"}).listen == HostPort("", 6000)
    assert dst({"PORT": "7000"}).listen == HostPort("", 7000)
    assert dst({"GRPC_PORT": "6000", "PORT": "7000"}).listen == HostPort("", 6000)
    assert dst({"PORT": "0.0.0.0:7000"}).listen == HostPort("0.0.0.0", 7000)
    assert dst({"GRPC_PORT": "6000"}, listen="127.0.0.1:5000").listen == HostPort("127.0.0.1", 5000)
    assert dst({"GRPC_PORT": "6000"}, listen=":50051").listen == HostPort("", 6000)
    assert dst({"QBSYNC_DESTINATION_LISTEN": ":5555", "PORT": "7000"}).listen == HostPort("", 5555)
    # The listen fallbacks never touch the health address and vice versa.
    d = dst({"PORT": "7000", "HTTP_PORT": "9090"})
    assert (d.listen, d.health_addr) == (HostPort("", 7000), HostPort("", 9090))
    # The source has no listen address; GRPC_PORT/PORT mean nothing to it.
    assert src({"GRPC_PORT": "6000", "PORT": "7000"}).health_addr == HostPort("", 8080)
    with pytest.raises(ConfigError, match="GRPC_PORT"):
        dst({"GRPC_PORT": "99999"})


# -- host:port parsing and redaction ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (":50051", HostPort("", 50051)),
        ("0.0.0.0:1", HostPort("0.0.0.0", 1)),
        ("localhost:65535", HostPort("localhost", 65535)),
        ("[::]:8080", HostPort("::", 8080)),
        (" host:80 ", HostPort("host", 80)),
    ],
)
def test_parse_host_port(raw: str, expected: HostPort) -> None:
    assert parse_host_port(raw) == expected


def test_hostport_str() -> None:
    assert str(HostPort("", 8080)) == ":8080"
    assert str(HostPort("::1", 1)) == "[::1]:1"
    assert str(HostPort("10.0.0.1", 50051)) == "10.0.0.1:50051"


def test_redacted_hides_secrets(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("file-token-0123456789")
    s = src(
        qb_password="hunter2",
        auth_token="tok-0123456789abcdef",
        qb_username="admin",
        qb_api_key="k3y",
    )
    out = redacted(s)
    assert out["qb_password"] == "***" and out["auth_token"] == "***"
    assert out["qb_api_key"] == "***" and "k3y" not in repr(s)
    arr = dst(arr_url="http://sonarr:8989", arr_api_key="arr-secret")
    assert redacted(arr)["arr_api_key"] == "***" and "arr-secret" not in repr(arr)
    assert redacted(arr)["arr_url"] == "http://sonarr:8989"
    assert out["qb_username"] == "admin" and out["role"] == "source"
    assert "hunter2" not in repr(s) and "tok'" not in repr(s)
    assert redacted(src())["qb_password"] == ""
    assert redacted(dst(auth_token_file=str(token)))["auth_token"] == "***"
    # Every option appears, with JSON-friendly values.
    for role, opts, config in (
        ("source", SOURCE_OPTIONS, s),
        ("destination", DESTINATION_OPTIONS, dst()),
    ):
        data = redacted(config)
        assert set(data) == {o.name for o in opts} | {"role"}, role
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in data.values())


def test_every_option_has_unique_flag_and_env() -> None:
    for role in ("source", "destination"):
        opts = options_for(role)
        assert len({o.flag for o in opts}) == len(opts)
        for opt in opts:
            assert opt.env(role) == "QBSYNC_" + role.upper() + "_" + opt.name.upper()
            assert opt.flag == "--" + opt.name.replace("_", "-")
            # Every default parses and passes its own check.
            if opt.default:
                value = opt.parse(opt.default)
                assert opt.check is None or opt.check(value) is None, opt.name


@pytest.mark.parametrize("role", ["source", "destination"])
def test_guessable_tokens_are_refused_like_short_ones(role: Role) -> None:
    for token, why in (
        ("bbbbbbbbbbbbbbbbbbbb", "one character repeated"),
        ("qbsyncqbsyncqbsync", "6-character pattern"),
        ("abcdefghijklmnopqr", "sequential"),
    ):
        message = error_of(role, {"auth_token": token})
        assert why in message and "--auth-token" in message and "openssl rand" in message


def test_handoff_tag_defaults_empty_and_reads_its_env_var() -> None:
    assert src().handoff_tag == ""
    assert src({"QBSYNC_SOURCE_HANDOFF_TAG": "move-now"}).handoff_tag == "move-now"


@pytest.mark.parametrize(
    ("other", "value"),
    [
        ("synced_tag", "synced"),
        ("sync_failed_tag", "sync-failed"),
        ("exclude_sync_tag", "x"),
        ("exclude_cleanup_tag", "x"),
    ],
)
def test_handoff_tag_must_differ_from_the_other_tags(other: str, value: str) -> None:
    """Sharing ``synced`` would hand off every torrent qbsync syncs."""
    message = error_of("source", {"handoff_tag": value, other: value})
    assert "--handoff-tag" in message and "--" + other.replace("_", "-") in message


# -- reverse dialing (source --listen, destination --connect) ---------------------------------

TOKEN = "7f3c9a12e4b85d60c1f2"  # not guessable: see config.token_weakness


def test_source_listen_instead_of_destination_addr() -> None:
    flags = {k: v for k, v in SRC_REQUIRED.items() if k != "destination_addr"}
    config = resolve("source", {**flags, "listen": ":50052", "auth_token": TOKEN}, {})
    assert isinstance(config, SourceConfig)
    assert config.listen == HostPort("", 50052) and config.destination_addr is None
    env = {"QBSYNC_SOURCE_LISTEN": "0.0.0.0:6000", "QBSYNC_SOURCE_AUTH_TOKEN": TOKEN}
    config = resolve("source", flags, env)
    assert isinstance(config, SourceConfig) and config.listen == HostPort("0.0.0.0", 6000)
    # GRPC_PORT/PORT never become the source's listen port.
    assert src({"GRPC_PORT": "6000", "PORT": "7000"}).listen is None


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"listen": ":1", "auth_token": TOKEN}, "not both"),  # with --destination-addr
        ({"listen": ":1", "destination_addr": ""}, "--listen needs --auth-token"),
        (
            {
                "listen": ":1",
                "destination_addr": "",
                "auth_token": TOKEN,
                "tls_ca": "/etc/hostname",
            },
            "--tls-ca is for",
        ),
        ({"tls_cert": "/etc/hostname", "tls_key": "/etc/hostname"}, "are for a listening source"),
    ],
)
def test_source_reach_impossible_combinations(flags: dict[str, str], needle: str) -> None:
    message = error_of("source", flags)
    assert needle in message, message


def test_source_listen_without_destination_addr_still_checks_token() -> None:
    base = {k: v for k, v in SRC_REQUIRED.items() if k != "destination_addr"}
    with pytest.raises(ConfigError, match="--listen needs --auth-token"):
        resolve("source", {**base, "listen": ":1"}, {})


def test_destination_connect_opens_no_port_unless_listen_is_explicit() -> None:
    d = dst(connect="seedbox.example:50052")
    assert d.listen is None
    assert d.connect_addrs == [HostPort("seedbox.example", 50052)]
    # GRPC_PORT/PORT keep meaning the listen port, but open none next to --connect.
    assert dst({"GRPC_PORT": "6000"}, connect="a:1").listen is None
    assert dst(connect="a:1", listen=":50051").listen == HostPort("", 50051)
    assert dst({"QBSYNC_DESTINATION_LISTEN": ":7"}, connect="a:1").listen == HostPort("", 7)
    both = dst({"QBSYNC_DESTINATION_CONNECT": "a:1, b:2"})
    assert both.connect_addrs == [HostPort("a", 1), HostPort("b", 2)]
    assert both.listen is None
    assert dst().listen == HostPort("", 50051) and dst().connect == ""


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"connect": "a:1,a:1"}, "given twice"),
        ({"connect": ":1"}, "--connect"),
        ({"tls_ca": "/etc/hostname"}, "--tls-ca is for dialing sources"),
        (
            {"connect": "a:1", "tls_cert": "/etc/hostname", "tls_key": "/etc/hostname"},
            "there is none",
        ),
    ],
)
def test_destination_reach_impossible_combinations(flags: dict[str, str], needle: str) -> None:
    message = error_of("destination", flags)
    assert needle in message, message
