"""Peer identities and pairing over real sockets (``wire.serve`` / ``wire.open_connection``
with ``qbsync.identity``'s key files, pin store and policy), plus the pieces they are made of.

Each case of issue 15's "first contact" list has its test here: trust on first use, two
sources racing to pair, a source whose first destination is an impostor on a
``--peer-fingerprint`` setup, a key change of a pinned peer and ``qbsync peers forget`` on a
running destination, token-gated first admission, an old-handshake peer, and a listening
source that never trusts on first use.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from qbsync.identity import PeerPolicy, PinStore, load_identity, parse_private_key
from qbsync.identity import command as peers_command
from qbsync.identity.keyfile import private_key_pem
from qbsync.wire import (
    ByteBudget,
    ErrorCode,
    HostPort,
    InitResult,
    InitTorrent,
    SyncStatus,
    WireError,
    codec,
    fingerprint,
    keys,
    open_connection,
)
from qbsync.wire import messages as m
from qbsync.wire.frames import MAGIC, ControlFrame, FrameDecoder, encode_control
from qbsync.wire.keys import FrameMac, raw_public
from qbsync.wire.protocol import Endpoint, HandshakeComplete, State
from qbsync.wire.server import Peer
from tests.fuzz.wire_helpers import Receiver
from tests.wireserver import raw_peer, serving

LOCAL = "127.0.0.1"
H1 = "a" * 40
TOKEN = "pairing-token-0123456789"


def fp(key: Ed25519PrivateKey) -> str:
    return fingerprint(raw_public(key.public_key()))


class Handler:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def handle_request(self, peer: Peer, request: Any) -> Any:
        self.requests.append(request)
        return InitResult(SyncStatus.READY, b"\xff", 8, 0)

    async def handle_piece(self, peer: Peer, piece: Any) -> Any:  # pragma: no cover
        raise AssertionError("no pieces in these tests")


def policy(
    directory: Path,
    role: str,
    *,
    token: bool = False,
    fingerprints: frozenset[str] = frozenset(),
    allow_first_use: bool = True,
) -> PeerPolicy:
    return PeerPolicy(
        role=role,
        store=PinStore(directory),
        fingerprints=fingerprints,
        token=token,
        allow_first_use=allow_first_use,
        command=peers_command.repair_command(role, directory),  # type: ignore[arg-type]
    )


@asynccontextmanager
async def destination(
    directory: Path,
    *,
    token: str | None = None,
    fingerprints: frozenset[str] = frozenset(),
    key: Ed25519PrivateKey | None = None,
) -> AsyncIterator[tuple[int, Handler, Ed25519PrivateKey]]:
    handler = Handler()
    key = key or Ed25519PrivateKey.generate()
    admission = policy(directory, "destination", token=token is not None, fingerprints=fingerprints)
    async with serving(
        handler,
        token=token,
        identity=key,
        admission=admission,
        ssl_context=None,
        budget=ByteBudget(16 << 20),
    ) as port:
        yield port, handler, key


def source(
    port: int,
    key: Ed25519PrivateKey,
    directory: Path,
    *,
    token: str | None = None,
    fingerprints: frozenset[str] = frozenset(),
) -> Any:
    return open_connection(
        HostPort(LOCAL, port),
        token=token,
        identity=key,
        admission=policy(directory, "source", token=token is not None, fingerprints=fingerprints),
    )


async def init(port: int, key: Ed25519PrivateKey, directory: Path, **kw: Any) -> InitResult:
    async with source(port, key, directory, **kw) as conn:
        result: InitResult = await conn.request(InitTorrent(H1, name="x"), timeout=10)
        return result


# --- trust on first use -------------------------------------------------------------------


async def test_first_use_pins_both_sides_and_refuses_every_other_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    state = tmp_path / "data" / ".qbsync"  # the destination's default place for key and pins
    with trio.fail_after(20):
        async with destination(state) as (port, handler, dkey):
            assert (await init(port, first, tmp_path / "src")).status == SyncStatus.READY
            assert "event=peer_first_use role=destination" in caplog.text
            assert f"peer_fingerprint={fp(first)} own_fingerprint={fp(dkey)}" in caplog.text
            assert f"peer_fingerprint={fp(dkey)} own_fingerprint={fp(first)}" in caplog.text
            # the same source again: admitted without a new pin
            assert (await init(port, first, tmp_path / "src")).status == SyncStatus.READY
            # another key: refused at the handshake, before any request
            with pytest.raises(WireError) as err:
                await init(port, stranger, tmp_path / "stranger")
            assert err.value.code == ErrorCode.UNKNOWN_PEER
            assert fp(first) in err.value.message and fp(stranger) in err.value.message
            assert len(handler.requests) == 2
    assert list(PinStore(state).pins()) == [fp(first)]
    assert list(PinStore(tmp_path / "src").pins()) == [fp(dkey)]
    refused = [r.getMessage() for r in caplog.records if "event=peer_refused" in r.getMessage()]
    assert len(refused) == 1
    assert "code=unknown-peer" in refused[0]
    assert f"peer_fingerprint={fp(stranger)}" in refused[0] and fp(first) in refused[0]
    assert f"qbsync peers destination forget {fp(first)} --data {tmp_path / 'data'}" in refused[0]


async def test_two_sources_racing_to_pair_only_one_wins(tmp_path: Path) -> None:
    keys_ = [Ed25519PrivateKey.generate() for _ in range(6)]
    outcomes: dict[str, object] = {}
    with trio.fail_after(30):
        async with destination(tmp_path / "dst") as (port, _, _):

            async def attempt(i: int, key: Ed25519PrivateKey) -> None:
                try:
                    outcomes[fp(key)] = (await init(port, key, tmp_path / f"s{i}")).status
                except WireError as exc:
                    outcomes[fp(key)] = exc.code

            async with trio.open_nursery() as nursery:
                for i, key in enumerate(keys_):
                    nursery.start_soon(attempt, i, key)
    winners = [k for k, v in outcomes.items() if v == SyncStatus.READY]
    assert len(winners) == 1
    assert sorted(map(str, outcomes.values())).count(ErrorCode.UNKNOWN_PEER.value) == 5
    assert list(PinStore(tmp_path / "dst").pins()) == winners


async def test_source_refuses_an_impostor_destination_on_a_fingerprint_setup(
    tmp_path: Path,
) -> None:
    """The source knows its destination's fingerprint: the first destination it reaches is an
    impostor (another key) and gets nothing; the real one is admitted."""
    real, impostor, me = (Ed25519PrivateKey.generate() for _ in range(3))
    pinned = frozenset({fp(real)})
    with trio.fail_after(20):
        async with destination(tmp_path / "fake", key=impostor) as (port, handler, _):
            with pytest.raises(WireError) as err:
                await init(port, me, tmp_path / "src", fingerprints=pinned)
            assert err.value.code == ErrorCode.UNKNOWN_PEER
            assert "is not one of this source's --peer-fingerprint" in err.value.message
            assert handler.requests == []  # the source sent nothing
        async with destination(tmp_path / "real", key=real) as (port, handler, _):
            assert (await init(port, me, tmp_path / "src", fingerprints=pinned)).status
            assert len(handler.requests) == 1
    assert PinStore(tmp_path / "src").pins() == {}  # the list is the pin


async def test_destination_fingerprint_list_admits_only_listed_sources(tmp_path: Path) -> None:
    allowed, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with trio.fail_after(20):
        async with destination(tmp_path / "dst", fingerprints=frozenset({fp(allowed)})) as (
            port,
            _,
            _,
        ):
            with pytest.raises(WireError) as err:
                await init(port, other, tmp_path / "o")  # first contact: still refused
            assert err.value.code == ErrorCode.UNKNOWN_PEER
            assert (await init(port, allowed, tmp_path / "a")).status == SyncStatus.READY


async def test_key_change_is_refused_until_forgotten_on_the_running_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = tmp_path / "data"
    state = data / ".qbsync"
    with trio.fail_after(20):
        async with destination(state) as (port, _, _):
            await init(port, old, tmp_path / "src")
            with pytest.raises(WireError) as err:
                await init(port, new, tmp_path / "src2")  # the "re-created" source
            assert err.value.code == ErrorCode.UNKNOWN_PEER
            assert fp(old) in err.value.message and fp(new) in err.value.message
            assert f"qbsync peers destination forget {fp(old)}" in err.value.message
            # the operator re-pairs while the destination keeps running
            env = {"QBSYNC_DESTINATION_DATA": str(data)}
            assert peers_command.main(["destination", "forget", fp(old)], env) == 0
            assert f"forgot {fp(old)}" in capsys.readouterr().out
            assert (await init(port, new, tmp_path / "src2")).status == SyncStatus.READY
            with pytest.raises(WireError):
                await init(port, old, tmp_path / "src")  # now the old key is the stranger
    assert list(PinStore(state).pins()) == [fp(new)]


async def test_token_gates_first_admission_and_pins_each_key(tmp_path: Path) -> None:
    a, b, c = (Ed25519PrivateKey.generate() for _ in range(3))
    with trio.fail_after(20):
        async with destination(tmp_path / "dst", token=TOKEN) as (port, _, _):
            assert await init(port, a, tmp_path / "a", token=TOKEN)
            assert await init(port, b, tmp_path / "b", token=TOKEN)  # shared token, new key
            with pytest.raises(WireError) as err:
                await init(port, c, tmp_path / "c", token="another-token-0123456789")
            assert err.value.code == ErrorCode.AUTH_FAILED
            with pytest.raises(WireError) as err:
                await init(port, c, tmp_path / "c")  # no token at all
            assert err.value.code == ErrorCode.AUTH_FAILED
    assert set(PinStore(tmp_path / "dst").pins()) == {fp(a), fp(b)}
    assert {p.how for p in PinStore(tmp_path / "dst").pins().values()} == {"token"}


async def test_old_handshake_peer_is_refused_with_upgrade_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A protocol-1 source (its Hello carries no keys) gets ``upgrade-required``, and the
    destination's log says to upgrade it."""
    old_hello = m.Hello(m.Role.SOURCE, 1, 1, os.urandom(32), "qbsync/0.9", False)
    with trio.fail_after(20):
        async with destination(tmp_path / "dst") as (port, handler, _):
            stream = await trio.open_tcp_stream(LOCAL, port)
            await stream.send_all(MAGIC + encode_control(old_hello))
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            decoder = FrameDecoder(dict.fromkeys(codec.MESSAGE_TYPES, 1 << 16))
            decoder.receive_data(bytes(received))
            decoder.receive_data(b"")
            replies = []
            while isinstance(event := decoder.next_event(), ControlFrame):
                replies.append(event.message)
            assert isinstance(replies[0], m.Hello) and replies[0].min_version == 2
            assert isinstance(replies[-1], m.Error)
            assert replies[-1].code == ErrorCode.UPGRADE_REQUIRED
            assert "upgrade it" in replies[-1].message
            assert handler.requests == []
    assert "code=upgrade-required" in caplog.text and "upgrade it" in caplog.text


async def test_source_refuses_an_old_destination(tmp_path: Path) -> None:
    async def old_destination(stream: trio.SocketStream) -> None:
        hello = m.Hello(m.Role.DESTINATION, 1, 1, os.urandom(32), "qbsync/0.9", False)
        await stream.send_all(MAGIC + encode_control(hello))
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with raw_peer(old_destination) as port:
            with pytest.raises(WireError) as err:
                await init(port, Ed25519PrivateKey.generate(), tmp_path / "src")
            assert err.value.code == ErrorCode.UPGRADE_REQUIRED
            assert "the destination speaks the old unauthenticated handshake" in err.value.message


# --- sans-IO: who proves first, reverse dialing, listening sources -------------------------


def run_pair(client: Endpoint, server: Endpoint) -> tuple[list[Any], list[Any]]:
    rx_c, rx_s = Receiver(client), Receiver(server)
    events_c: list[Any] = []
    events_s: list[Any] = []
    to_s, to_c = client.data_to_send(), server.data_to_send()
    while to_s or to_c:
        if to_s:
            events_s += rx_s.feed(to_s)
        if to_c:
            events_c += rx_c.feed(to_c)
        to_s, to_c = client.data_to_send(), server.data_to_send()
    return events_c, events_s


@pytest.mark.parametrize("token", [None, "tok"])
def test_the_dialer_proves_first_whatever_its_role(token: str | None) -> None:
    """Reverse dialing (the destination dials a listening source): same handshake, the
    destination proves first, the source still sends the requests."""
    src = Endpoint(m.Role.SOURCE, token=token, initiator=False)
    dst = Endpoint(m.Role.DESTINATION, token=token, initiator=True)
    # the listener's first flight is its Hello only; nothing proves it before the dialer did
    src_first = src.data_to_send()
    src.receive_data(dst.data_to_send())
    assert src.next_event() is not None
    assert src.data_to_send() == b""  # still nothing: the dialer has not proven itself
    dst.receive_data(src_first)
    assert dst.next_event() is not None
    dialer_auth = dst.data_to_send()
    assert codec.decode_message(codec.AUTH, dialer_auth[16:]).signature  # type: ignore[union-attr]
    src.receive_data(dialer_auth)
    src.next_event()
    dst.receive_data(src.data_to_send())  # the source's Auth
    done = dst.next_event()
    assert isinstance(done, HandshakeComplete) and done.peer_fingerprint == src.fingerprint
    src.receive_data(dst.data_to_send())  # AuthOk
    done = src.next_event()
    assert isinstance(done, HandshakeComplete) and done.peer_fingerprint == dst.fingerprint
    _, frame = src.send_request(m.Abort(H1))
    dst.receive_data(frame)
    assert dst.next_event().message == m.Abort(H1)  # type: ignore[union-attr]


def test_a_listening_source_never_trusts_on_first_use(tmp_path: Path) -> None:
    listening = policy(tmp_path, "source", allow_first_use=False)
    src = Endpoint(m.Role.SOURCE, token=None, initiator=False, admission=listening)
    dst = Endpoint(m.Role.DESTINATION, token=None, initiator=True)
    with pytest.raises(WireError) as err:
        run_pair(src, dst)
    assert err.value.code == ErrorCode.UNKNOWN_PEER
    assert "never trusts on first use" in err.value.message
    assert src.state == State.CLOSED and PinStore(tmp_path).pins() == {}


def test_a_swapped_identity_key_fails_the_signature() -> None:
    """A man in the middle who swaps the source's identity key in its Hello cannot sign for
    it: the destination refuses before admission."""
    src, dst = Endpoint(m.Role.SOURCE, token=None), Endpoint(m.Role.DESTINATION, token=None)
    flight = src.data_to_send()
    hello = codec.decode_message(codec.HELLO, flight[len(MAGIC) + 16 :])
    assert isinstance(hello, m.Hello)
    forged = m.Hello(
        hello.role,
        hello.min_version,
        hello.max_version,
        hello.nonce,
        hello.software,
        hello.auth_required,
        raw_public(Ed25519PrivateKey.generate().public_key()),
        hello.ephemeral,
    )
    dst.receive_data(MAGIC + encode_control(forged))
    dst.next_event()
    src.receive_data(dst.data_to_send())
    src.next_event()
    dst.receive_data(src.data_to_send())
    with pytest.raises(WireError) as err:
        dst.next_event()
    assert err.value.code == ErrorCode.AUTH_FAILED


@given(st.integers(min_value=0, max_value=200_000), st.integers(0, 2**64 - 2), st.data())
def test_frame_tags_equal_the_aead_tag(length: int, counter: int, data: Any) -> None:
    """The zero-copy path (Poly1305 over the parts) equals ChaCha20-Poly1305 of an empty
    plaintext with header + body as associated data, the spec's definition."""
    key = data.draw(st.binary(min_size=32, max_size=32))
    body = os.urandom(length)
    cut = data.draw(st.integers(0, length))
    parts = (b"h" * 16, body[:cut], memoryview(body)[cut:])
    expected = ChaCha20Poly1305(key).encrypt(keys.frame_nonce(counter), b"", b"h" * 16 + body)
    assert FrameMac(key).tag(counter, parts) == expected
    assert FrameMac(key).check(counter, parts, expected)
    inc = FrameMac(key).begin(counter)  # fed in pieces, as the shell feeds a piece
    for part in parts:
        inc.update(part)
    assert inc.finalize() == expected
    assert not FrameMac(key).check(counter + 1, parts, expected)


# --- key files and the peers command ------------------------------------------------------


def test_identity_key_is_created_0600_and_reused(tmp_path: Path) -> None:
    first = load_identity(tmp_path / "state")
    path = tmp_path / "state" / "identity.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.origin == f"created {path}"
    again = load_identity(tmp_path / "state")
    assert again.fingerprint == first.fingerprint
    path.chmod(0o644)
    with pytest.raises(Exception, match="readable by other users"):
        load_identity(tmp_path / "state")


def test_identity_from_text_and_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = private_key_pem(key).decode()
    raw = key.private_bytes_raw()
    import base64

    assert fp(parse_private_key(pem)) == fp(key)
    assert fp(parse_private_key(base64.b64encode(raw).decode())) == fp(key)
    assert load_identity(tmp_path, key_text=pem).fingerprint == fp(key)
    keyfile = tmp_path / "secret.key"
    keyfile.write_text(pem)
    keyfile.chmod(0o600)
    assert load_identity(tmp_path / "unused", key_file=keyfile).fingerprint == fp(key)
    assert not (tmp_path / "unused").exists()  # nothing created when the key is given
    with pytest.raises(Exception, match="32 bytes"):
        parse_private_key(base64.b64encode(b"short").decode())


def test_a_planted_key_symlink_is_refused_but_a_named_secret_may_be_one(tmp_path: Path) -> None:
    """The daemon's own identity.key is never read through a symlink (a planted one would swap
    its identity); an --identity-file may be one (Kubernetes mounts Secrets that way)."""
    key = Ed25519PrivateKey.generate()
    secret = tmp_path / "secret.pem"
    secret.write_bytes(private_key_pem(key))
    secret.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    (state / "identity.key").symlink_to(secret)
    with pytest.raises(Exception, match="cannot open"):
        load_identity(state)
    link = tmp_path / "mounted-key"
    link.symlink_to(secret)
    assert load_identity(tmp_path / "other", key_file=link).fingerprint == fp(key)


def test_dry_run_writes_no_key(tmp_path: Path) -> None:
    loaded = load_identity(tmp_path / "state", create=False)
    assert "dry run" in loaded.origin and not (tmp_path / "state").exists()


def test_peers_command_lists_and_forgets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    me = load_identity(state)
    store = PinStore(state)
    keys_ = [Ed25519PrivateKey.generate() for _ in range(2)]
    for k in keys_:
        store.pin(keys.PeerKey(m.Role.DESTINATION, raw_public(k.public_key()), True), "token")
    assert stat.S_IMODE((state / "peers.json").stat().st_mode) == 0o600
    env = {"QBSYNC_SOURCE_STATE_DIR": str(state)}
    assert peers_command.main(["source", "list"], env) == 0
    out = capsys.readouterr().out
    assert f"this source: {me.fingerprint}" in out
    assert all(fp(k) in out for k in keys_)
    assert peers_command.main(["source", "forget", "SHA256:nope"], env) == 2
    assert peers_command.main(["source", "forget"], env) == 2  # neither FINGERPRINT nor --all
    assert peers_command.main(["source", "forget", fp(keys_[0]), "--state-dir", str(state)]) == 0
    assert list(PinStore(state).pins()) == [fp(keys_[1])]
    assert peers_command.main(["source", "forget", "--all"], env) == 0
    assert PinStore(state).pins() == {}
    capsys.readouterr()
    assert peers_command.main(["source", "forget", fp(keys_[0])], env) == 1  # not pinned


def test_an_unreadable_pin_file_refuses_instead_of_trusting(tmp_path: Path) -> None:
    """A damaged peers.json must not reopen trust on first use to anyone."""
    (tmp_path / "peers.json").write_text("{not json")
    admission = policy(tmp_path, "destination")
    stranger = keys.PeerKey(
        m.Role.SOURCE, raw_public(Ed25519PrivateKey.generate().public_key()), False
    )
    with pytest.raises(WireError) as err:
        admission.admit(stranger, "SHA256:me")
    assert err.value.code == ErrorCode.UNKNOWN_PEER
    assert "unreadable" in err.value.message


def test_a_pin_file_removed_while_running_refuses_instead_of_trusting(tmp_path: Path) -> None:
    """Issue 15: an account that can rename the state directory must not re-open trust on
    first use on a running daemon by making peers.json disappear."""
    admission = policy(tmp_path, "destination")

    def key() -> keys.PeerKey:
        return keys.PeerKey(
            m.Role.SOURCE, raw_public(Ed25519PrivateKey.generate().public_key()), False
        )

    admission.admit(key(), "SHA256:me")  # first use: pinned, peers.json written
    assert (tmp_path / "peers.json").exists()
    (tmp_path / "peers.json").unlink()
    with pytest.raises(WireError) as err:
        admission.admit(key(), "SHA256:me")
    assert err.value.code == ErrorCode.UNKNOWN_PEER
    assert not (tmp_path / "peers.json").exists()  # nothing was pinned instead


def test_explicit_trust_check_for_a_listening_source(tmp_path: Path) -> None:
    from qbsync.config import resolve
    from qbsync.identity.daemon import explicit_trust_missing

    base = {
        "data": str(tmp_path),
        "qb_url": "http://127.0.0.1:1",
        "destination_addr": "127.0.0.1:2",
        "state_dir": str(tmp_path / "s"),
    }
    bare = resolve("source", base, env={})
    assert "never trusts on first use" in (explicit_trust_missing(bare) or "")
    pinned = resolve("source", {**base, "peer_fingerprint": "SHA256:" + "A" * 43}, env={})
    assert explicit_trust_missing(pinned) is None
    with_token = resolve("source", {**base, "auth_token": TOKEN}, env={})
    assert explicit_trust_missing(with_token) is None


async def test_reverse_dial_over_real_sockets(tmp_path: Path) -> None:
    """The destination dials a listening source (``serve_dialed`` / ``accept_connection``):
    it proves itself first, the listening source admits only its listed
    key, and the source still sends the requests."""
    from qbsync.wire.client import accept_connection
    from qbsync.wire.server import serve_dialed

    src_key, dst_key, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    results: list[object] = []
    listening = policy(
        tmp_path / "src", "source", fingerprints=frozenset({fp(dst_key)}), allow_first_use=False
    )

    async def source_side(stream: trio.SocketStream) -> None:
        try:
            async with accept_connection(
                stream,
                token=None,
                identity=src_key,
                admission=listening,
            ) as conn:
                answer: InitResult = await conn.request(InitTorrent(H1, name="x"), timeout=10)
                results.append(answer)
        except WireError as exc:
            results.append(exc.code)

    async def dial(key: Ed25519PrivateKey, handler: Handler) -> None:
        stream = await trio.open_tcp_stream(LOCAL, port)
        await serve_dialed(
            stream,
            handler,
            token=None,
            budget=ByteBudget(16 << 20),
            identity=key,
            admission=policy(tmp_path / f"dst-{fp(key)[7:12]}", "destination"),
        )

    with trio.fail_after(20):
        async with raw_peer(source_side) as port:
            refused = Handler()
            await dial(stranger, refused)  # not the listed destination: refused
            real = Handler()
            await dial(dst_key, real)
    assert results[0] == ErrorCode.UNKNOWN_PEER and refused.requests == []
    assert isinstance(results[1], InitResult) and len(real.requests) == 1
