"""Secrets: a token that is too short, a placeholder from the examples or trivially guessable
(one character or a short pattern repeated, few distinct characters, a sequential run) is
refused at start
(exit 2, one line naming both flags and the environment variables); no token keeps working
with a loud warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qbsync import cli
from qbsync.config import DestinationConfig, resolve
from qbsync.destination.runner import _warn_unauthenticated, is_loopback
from qbsync.log import redact_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("role", ["source", "destination"])
@pytest.mark.parametrize(
    "token",
    [
        "x",
        "fifteen-bytes!!",
        "change-me",
        "CHANGE-ME ",
        # long enough, trivially guessable (issue 15, finding 7)
        "aaaaaaaaaaaaaaaa",
        "a" * 64,
        "abcabcabcabcabcabc",
        "passwordpassword",
        "aaaa1111bbbb2222",
        "0123456789abcdef",
        "abcdefghijklmnopqrstuvwxyz",
        "9876543210zyxwvu",
    ],
)
def test_weak_tokens_exit_2_with_one_line(
    role: str, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix a 1-byte token and the examples' ``change-me`` were accepted."""
    args = [role, "--data", str(tmp_path), "--auth-token", token, "--print-config"]
    if role == "source":
        args += ["--destination-addr", "127.0.0.1:1", "--qb-url", "http://127.0.0.1:1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    env = f"QBSYNC_{role.upper()}_AUTH_TOKEN"
    for part in ("--auth-token", "--auth-token-file", env, env + "_FILE", "openssl rand"):
        assert part in err


def test_token_file_is_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "token"
    f.write_text("short\n")
    assert cli.main(["destination", "--data", str(tmp_path), "--auth-token-file", str(f)]) == 2
    assert "shorter than 16 bytes" in capsys.readouterr().err


def test_strong_token_and_no_token_are_accepted(tmp_path: Path) -> None:
    strong = "k3Jd9-qX2m0Zt7Lb"  # 16 bytes, no pattern
    ok = resolve("destination", {"data": str(tmp_path), "auth_token": strong}, env={})
    assert isinstance(ok, DestinationConfig) and ok.auth_token == strong
    none = resolve("destination", {"data": str(tmp_path)}, env={})
    assert isinstance(none, DestinationConfig) and none.auth_token == ""


def test_no_token_on_an_exposed_listener_warns_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = resolve("destination", {"data": str(tmp_path), "listen": ":50051"}, env={})
    assert isinstance(config, DestinationConfig)
    with caplog.at_level(logging.WARNING):
        _warn_unauthenticated(config)
    assert "event=auth_disabled" in caplog.text and "exposed=true" in caplog.text
    assert "openssl rand -hex 32" in caplog.text
    assert not is_loopback("") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")


@pytest.mark.parametrize(
    "example",
    ["source.env.example", "destination.env.example", "kubernetes/secret.example.yaml"],
)
def test_examples_say_how_to_generate_a_token(example: str) -> None:
    text = (DEPLOY / example).read_text()
    if "change-me" in text:
        assert "openssl rand -hex 32" in text and "refuses to start" in text


def test_qb_url_credentials_never_reach_the_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://admin:hunter2@127.0.0.1:8080"
    assert redact_url(url) == "http://admin:***@127.0.0.1:8080"
    assert redact_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    args = ["destination", "--data", str(tmp_path), "--qb-url", url, "--print-config"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "admin:***@127.0.0.1" in out


def test_one_redaction_for_every_logged_url() -> None:
    assert (
        redact_url("http://u:p@Host:8080/x?apikey=k&flag")
        == "http://u:***@Host:8080/x?apikey=***&flag"
    )
    assert redact_url("http://u@h/") == "http://u@h/"
    assert redact_url("https://h/path#frag") == "https://h/path"
    assert redact_url("https://u:p@h.example:8443/secret/x?t=1", keep_path=False) == (
        "https://h.example:8443"
    )
    assert redact_url("http://[::1:bad") == "***"


def test_token_weakness_names_each_guessable_form() -> None:
    from qbsync.config import token_weakness

    assert "one character" in (token_weakness("z" * 40) or "")
    assert "3-character pattern" in (token_weakness("xyzxyzxyzxyzxyzxyz") or "")
    assert "distinct" in (token_weakness("ab12ab21ba12ba21") or "")
    assert "sequential" in (token_weakness("1234567890123456") or "")
    # what the docs and tests use, and random tokens, pass
    import secrets

    for token in ("tok-0123456789abcdef", "test-token-0123456789", "s3cret-token-01234"):
        assert token_weakness(token) is None, token
    assert not [t for t in (secrets.token_hex(8) for _ in range(2000)) if token_weakness(t)]
    assert token_weakness(secrets.token_urlsafe(32)) is None


def test_a_guessable_token_file_is_refused_from_the_environment_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "token"
    f.write_text("aaaaaaaaaaaaaaaaaaaaaaaa\n")
    monkeypatch.setenv("QBSYNC_DESTINATION_AUTH_TOKEN_FILE", str(f))
    assert cli.main(["destination", "--data", str(tmp_path), "--print-config"]) == 2
    assert "one character repeated" in capsys.readouterr().err
