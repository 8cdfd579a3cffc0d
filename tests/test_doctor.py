"""``qbsync doctor``'s Web API verdict against the versions only a stand-in can answer as here:
what qbsync will use from a 5.x Web API, and a qBittorrent too old for it. (Every other check
runs against real qBittorrent and real daemons in tests/integration/test_doctor.py.)"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import attrs
import pytest

from qbsync import doctor
from qbsync.config import Config, resolve
from qbsync.identity import PEERS_FILE, PeerPolicy, PinStore
from qbsync.wire import ErrorCode, PeerKey, WireError, new_identity
from qbsync.wire.keys import raw_public
from qbsync.wire.messages import Role
from tests import fakeqb
from tests.fakeqb import serve_fake_qb


def _config(url: str, data: Path) -> Config:
    flags = {
        "data": str(data),
        "qb_url": url,
        "qb_username": "admin",
        "qb_password": "secret-password",
        "destination_addr": "127.0.0.1:9",
    }
    return resolve("source", flags, env={"HOME": str(data)})


@pytest.mark.parametrize(
    ("profile", "uses"),
    [
        ("4.6", "torrents/pause and /resume, add with paused, skip_checking"),
        ("5.0", "torrents/stop and /start, add with stopped, skip_checking"),
        ("5.3", "torrents/stop and /start, add with stopped, seedMode, API keys"),
    ],
)
def test_webapi_verdict_names_what_qbsync_uses(profile: str, uses: str, tmp_path: Path) -> None:
    with serve_fake_qb(profile, username="admin", password="secret-password") as fake:
        verdicts = doctor.check_qbittorrent(_config(fake.url, tmp_path))
    by = {v.check: v for v in verdicts}
    assert by["qbittorrent"].status == "PASS" and "login required" in by["qbittorrent"].text
    assert by["credentials"].status == "PASS"
    if profile != "4.6":  # the stand-in's bare 4.6 answer has no charset; requests guesses
        assert fakeqb.PROFILES[profile][0] in by["credentials"].text
    assert by["webapi"].status == "PASS", by["webapi"]
    assert by["webapi"].text == f"Web API {fakeqb.PROFILES[profile][1]}: qbsync uses {uses}"


def test_webapi_older_than_torrents_export_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fakeqb.PROFILES, "4.4", ("v4.4.5", "2.8.5"))
    with serve_fake_qb("4.4", username="admin", password="secret-password") as fake:
        verdicts = doctor.check_qbittorrent(_config(fake.url, tmp_path))
    webapi = next(v for v in verdicts if v.check == "webapi")
    assert webapi.status == "FAIL" and "no torrents/export" in webapi.text
    assert "fix: upgrade qBittorrent" in webapi.line()


def test_a_non_qbittorrent_answer_is_named(tmp_path: Path) -> None:
    with serve_fake_qb("5.0") as fake:
        verdicts = doctor.check_qbittorrent(_config(fake.url + "/not-the-webui", tmp_path))
    [v] = verdicts
    assert v.status == "FAIL" and "not a qBittorrent WebUI" in v.text


def test_run_prints_one_line_per_verdict_and_exit_status(tmp_path: Path) -> None:
    out = io.StringIO()
    code = doctor.run(_config("http://127.0.0.1:9", tmp_path), out)
    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[0] == "qbsync doctor source"
    assert lines[-1].startswith("FAILED: ")
    assert all(line[:5] in ("PASS ", "FAIL ", "WARN ", "SKIP ") for line in lines[1:-1])


def _peer() -> PeerKey:
    return PeerKey(Role.DESTINATION, raw_public(new_identity().public_key()), False)


def _judge(tmp_path: Path, **policy: Any) -> doctor._Judge:
    store = PinStore(tmp_path, read_only=True)
    return doctor._Judge(PeerPolicy(role="source", store=store, **policy), "SHA256:own")


def test_judge_decides_as_the_daemon_would_and_pins_nothing(tmp_path: Path) -> None:
    """The doctor's admission: the daemon's table (identity.pins), nothing written."""
    first = _judge(tmp_path)
    peer = _peer()
    first.admit(peer, "SHA256:own")
    assert first.peer == peer.fingerprint and "pins it on first use" in first.outcome
    assert not (tmp_path / PEERS_FILE).exists()  # read-only: not pinned by the doctor

    token = _judge(tmp_path, token=True)
    token.admit(_peer(), "SHA256:own")
    assert "(token)" in token.outcome and not (tmp_path / PEERS_FILE).exists()

    PinStore(tmp_path).pin(peer, "first-use")  # the daemon pinned this one
    pinned = (tmp_path / PEERS_FILE).read_bytes()
    again = _judge(tmp_path)
    again.admit(peer, "SHA256:own")
    assert again.outcome == "pinned by this source" and not again.refused

    other = _peer()
    refused = _judge(tmp_path)
    with pytest.raises(WireError) as caught:
        refused.admit(other, "SHA256:own")
    assert caught.value.code == ErrorCode.UNKNOWN_PEER and refused.refused
    assert other.fingerprint in caught.value.message
    assert f"qbsync peers source forget {peer.fingerprint}" in refused.outcome
    assert (tmp_path / PEERS_FILE).read_bytes() == pinned


def test_judge_peer_fingerprint_list_and_listening_source(tmp_path: Path) -> None:
    peer = _peer()
    listed = _judge(tmp_path, fingerprints=frozenset({peer.fingerprint}))
    listed.admit(peer, "SHA256:own")
    assert listed.outcome == "listed in --peer-fingerprint"
    with pytest.raises(WireError):
        listed.admit(_peer(), "SHA256:own")
    assert "--peer-fingerprint" in listed.outcome

    never = _judge(tmp_path, allow_first_use=False)  # a listening source, nothing pinned
    with pytest.raises(WireError) as caught:
        never.admit(peer, "SHA256:own")
    assert "never trusts on first use" in caught.value.message


def test_auth_and_handshake_without_a_key_create_nothing(tmp_path: Path) -> None:
    config = _config("http://127.0.0.1:9", tmp_path)
    state = tmp_path / "state"
    config = attrs.evolve(config, state_dir=state)
    [auth] = doctor.check_auth(config)
    assert "no identity key yet" in auth.text and "0 peer keys pinned" in auth.text
    assert doctor._own_identity(config) is None
    assert not state.exists()
