"""Sans-IO protocol endpoint: handshake, peer authentication, frame tags, request ids, credit.

:class:`Endpoint` is the whole protocol state machine of one side of one connection, with no
I/O and no clock (h11's ``Connection`` is the model): the Trio shell (:mod:`.shell`, with
:mod:`.client` and :mod:`.server`) feeds it bytes, asks it for events, and writes whatever
:meth:`Endpoint.data_to_send` returns plus the frames the ``send_*`` methods return.
Everything that decides *whether* a frame is legal lives here, so the hypothesis state-machine
tests can drive two endpoints through every interleaving without sockets.

Handshake (protocol 2; the exact bytes are in docs/wire-protocol.md, "Handshake")::

    dialer (usually the source)                   listener (usually the destination)
    MAGIC + Hello(role, versions, N, K, E)  --->
                                            <---  MAGIC + Hello(role, versions, N, K, E)
    Auth(sig, token MAC)                    --->  checks it, asks Admission, then:
                                            <---  Auth(sig, token MAC) [+ AuthOk if destination]
    [AuthOk, if the dialer is the destination] --->

* Each Hello carries a fresh nonce ``N``, the sender's long-term Ed25519 identity key ``K``
  and a fresh X25519 key ``E``. Each side signs the transcript (both Hello bodies, source
  first) with its identity key, and, when both have a token, MACs it with the token
  (:mod:`.keys`). The dialer proves first (``initiator``, independent of the role, so a
  destination dialing a listening source runs the same code): a listener reveals nothing to a
  peer that has not proven itself. No secret crosses the wire.
* A proven key is then admitted or refused by the injected :class:`~.keys.Admission` (pins,
  ``--peer-fingerprint``, trust on first use: ``qbsync.identity``) before anything else
  happens; refused keys get ``unknown-peer``.
* From its own ``Auth`` on, each side follows every frame with a 16-byte tag: the
  ChaCha20-Poly1305 tag over header and body, with per-direction keys derived from the X25519
  exchange and a per-direction frame counter as nonce (:class:`~.keys.FrameMac`). So an
  attacker on the path cannot inject, drop, reorder or alter a frame after an honest
  handshake (a tag that does not verify closes the connection with ``bad-tag``).
* Version 1 peers (no keys, no tags) are refused with ``upgrade-required``.
* Tokens are all-or-nothing: if exactly one side has one, *both* sides fail with
  ``auth-failed`` and a message naming the side that lacks it.
* Until the handshake completes only the one handshake frame the current state expects (and
  Error), of at most :data:`HANDSHAKE_MAX_FRAME` bytes, is accepted; anything else is refused
  at its header.
* :class:`State` is the endpoint's one state; :meth:`Endpoint._enter` is the only place it
  changes, and it sets the frame types and sizes the decoder accepts in the new state, derived
  from :data:`~qbsync.wire.messages.MESSAGE_TABLE`.

After the handshake the source sends requests (InitTorrent, Finalize, Abort, StartTorrent) and
pieces with strictly increasing, non-zero request ids; the destination answers each exactly once
(its result type, a ``PieceAck``, or an ``Error`` with the same id). Connection-level frames
(CreditGrant, Ping, Pong, and a fatal ``Error``) carry id 0.

Credit (flow control): the destination announces a window ``W`` (``AuthOk.initial_credit``).
The source may send a piece of ``n`` bytes only when ``n <= available credit``; every piece
consumes its size; the destination returns credit with ``CreditGrant`` once it no longer holds
the bytes. Exception, so that a piece larger than the window can never deadlock: a piece may
also be sent when *all* credit is available (nothing in flight). Both sides run the same
arithmetic, so the destination detects a violation exactly (``credit-exceeded``). In-flight
piece bytes are thus bounded by ``max(W, largest piece)`` per connection.
"""

from __future__ import annotations

import enum
import hmac
import secrets
from typing import Any, Final, NoReturn

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import codec
from . import keys as k
from . import messages as m
from .errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from .frames import (
    END_OF_STREAM,
    MAGIC,
    NEED_DATA,
    PIECE_HEADER_SIZE,
    ControlFrame,
    FrameDecoder,
    PieceStart,
    Sentinel,
    UndecodedControl,
    encode_piece_header,
    frame_header,
)
from .messages import HANDSHAKE_MAX_FRAME, MAX_CONTROL_FRAME, REQUEST_TYPES, Request, Response

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "MAX_CONTROL_FRAME",
    "REQUEST_TYPES",
    "Endpoint",
    "ProtocolEvent",
    "Request",
    "Response",
    "State",
]

DEFAULT_MAX_PIECE: Final = 256 * 1024 * 1024  # largest piece size libtorrent creates
DEFAULT_WINDOW: Final = 64 * 1024 * 1024
MAX_CREDIT: Final = 2**62
NONCE_SIZE: Final = 32
MAX_ERROR_MESSAGE: Final = 1000


class State(enum.Enum):
    """Where an endpoint is. Changed only by :meth:`Endpoint._enter`."""

    HELLO = "hello"  # waiting for the peer's Hello
    AUTH = "auth"  # waiting for the peer's Auth (its signature, and token MAC if any)
    AUTH_OK = "authok"  # source: waiting for the destination's AuthOk
    OPEN = "open"  # authenticated: requests, pieces, credit, pings
    CLOSED = "closed"

    @property
    def handshaking(self) -> bool:
        return self in (State.HELLO, State.AUTH, State.AUTH_OK)


# The one handshake message each handshake state accepts (Error is accepted in every state).
_EXPECTED: Final = {State.HELLO: m.Hello, State.AUTH: m.Auth, State.AUTH_OK: m.AuthOk}


# --- events (in addition to frames.PieceStart, NEED_DATA and END_OF_STREAM) -------------------


@attrs.frozen
class HandshakeComplete:
    version: int
    max_frame: int  # largest piece frame body the destination accepts
    window: int  # the destination's credit window
    peer_software: str
    peer_fingerprint: str = ""  # the admitted peer's identity key (``keys.fingerprint``)
    peer_instance: str = ""  # the peer's Hello.instance


@attrs.frozen
class RequestReceived:
    """Destination side: a request to answer with :meth:`Endpoint.send_response`."""

    request_id: int
    message: Request


@attrs.frozen
class ResponseReceived:
    """Source side: the answer to an earlier request or piece (an ``Error`` means it failed)."""

    request_id: int
    message: Response


@attrs.frozen
class CreditReceived:
    nbytes: int
    available: int


@attrs.frozen
class PingReceived:
    """Answer with :meth:`Endpoint.send_pong` (the shell may skip it while another write is in
    progress: any bytes prove liveness)."""

    payload: int


@attrs.frozen
class PongReceived:
    payload: int


@attrs.frozen
class PeerClosed:
    """The peer sent a connection-level ``Error`` and is closing."""

    code: ErrorCode
    message: str


ProtocolEvent = (
    HandshakeComplete
    | RequestReceived
    | ResponseReceived
    | CreditReceived
    | PingReceived
    | PongReceived
    | PeerClosed
    | PieceStart
    | UndecodedControl  # a large body: decode it off the loop, then Endpoint.deliver
    | Sentinel  # NEED_DATA / END_OF_STREAM
)


@attrs.frozen
class _Outstanding:
    """A request or piece awaiting its one answer (kept by both sides)."""

    kind: type  # the request type
    info_hash: str = ""
    index: int = 0
    length: int = 0

    def refuses(self, msg: Response) -> str | None:
        """Why ``msg`` cannot be the answer to this request (``None`` if it can). The same
        rule polices the peer's answers and our own."""
        if not isinstance(msg, (m.RESPONSE_TYPE[self.kind], m.Error)):
            return f"{type(msg).__name__} answers a {self.kind.__name__}"
        if isinstance(msg, m.PieceAck) and (msg.info_hash, msg.index) != (
            self.info_hash,
            self.index,
        ):
            return "PieceAck for the wrong piece"
        return None


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_MESSAGE else text[: MAX_ERROR_MESSAGE - 3] + "..."


class Endpoint:
    """One side of a connection. ``role`` SOURCE is the protocol client (it sends requests and
    pieces), DESTINATION the server, whichever of them dialed.

    Args:
        token: the shared secret, or ``None``/``""`` for none (see the module docstring).
        identity: this side's long-term Ed25519 key (a fresh one by default: tests).
        admission: decides which proven peer keys are accepted (:data:`keys.ADMIT_ANY` by
            default: tests and library use; the daemons pass ``qbsync.identity.PeerPolicy``).
        initiator: whether this side dialed (it then proves itself first); defaults to
            ``role == SOURCE``, the usual direction.
        peer_address: for admission logs only.
        nonce: this side's 32-byte handshake nonce (random by default; tests pin it).
        max_piece: destination only: the largest piece payload accepted.
        window: destination only: the credit window announced to the source.
    """

    def __init__(
        self,
        role: m.Role,
        *,
        token: str | None,
        identity: Ed25519PrivateKey | None = None,
        admission: k.Admission = k.ADMIT_ANY,
        initiator: bool | None = None,
        peer_address: str = "",
        nonce: bytes | None = None,
        max_piece: int = DEFAULT_MAX_PIECE,
        window: int = DEFAULT_WINDOW,
        min_version: int = m.MIN_PROTOCOL_VERSION,
        max_version: int = m.PROTOCOL_VERSION,
        instance: str = "",
    ) -> None:
        if nonce is None:
            nonce = secrets.token_bytes(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        if not 0 < window <= MAX_CREDIT or not 0 < max_piece <= 2**32 - 1 - PIECE_HEADER_SIZE:
            raise ValueError("window and max_piece must be positive")
        self.role = role
        self.is_client = role == m.Role.SOURCE
        self.initiator = self.is_client if initiator is None else initiator
        self._token = token.encode("utf-8") if token else None
        self._identity = identity if identity is not None else k.new_identity()
        self._identity_raw = k.raw_public(self._identity.public_key())
        self.fingerprint = k.fingerprint(self._identity_raw)
        self._ephemeral = X25519PrivateKey.generate()
        self._admission = admission
        self.peer_address = peer_address
        self.peer_key: k.PeerKey | None = None  # set once the peer is admitted
        self._nonce = nonce
        self._min_version = min_version
        self._max_version = max_version
        self.state = State.HELLO
        self.version = 0
        self.peer_software = ""
        self.peer_instance = ""
        self._out = bytearray()
        self._outstanding: dict[int, _Outstanding] = {}
        self._last_request_id = 0
        # credit: both sides track the same numbers (see module docstring)
        self.window = window if not self.is_client else 0
        self.available = self.window
        self.max_frame = max_piece + PIECE_HEADER_SIZE if not self.is_client else 0
        self.inflight_bytes = 0  # source: piece bytes sent and not yet answered
        # Frame tags (keys.FrameMac): set up from the ephemeral exchange when the peer's Hello
        # arrives, switched on per direction at the Auth frames.
        self._transcript = b""
        self._send_mac: k.FrameMac | None = None
        self._recv_mac: k.FrameMac | None = None
        self._sending_tagged = False
        self._send_counter = 0
        self._recv_counter = 0
        hello = m.Hello(
            role=role,
            min_version=min_version,
            max_version=max_version,
            nonce=nonce,
            auth_required=self._token is not None,
            identity=self._identity_raw,
            ephemeral=k.raw_public(self._ephemeral.public_key()),
            instance=instance,
        )
        self._my_hello = codec.encode_message(hello)[1]
        self._peer_hello = b""
        self._peer_nonce = b""
        self._peer_identity = b""
        self._decoder = FrameDecoder(self._limits(State.HELLO))
        self._out += MAGIC + self._frame(hello)

    # -- helpers ---------------------------------------------------------------------------

    def _enter(self, state: State) -> None:
        """The one place the state changes; the decoder's accepted frames follow it."""
        self.state = state
        if state != State.CLOSED:
            self._decoder.set_limits(self._limits(state))

    def _limits(self, state: State) -> dict[int, int]:
        """Frame types (and their largest bodies) this side accepts in ``state``, from the
        message table: in a handshake state its one expected message; once open, what the peer
        may send outside the handshake (Piece: the negotiated ``max_frame``)."""
        peer = m.Role.DESTINATION if self.is_client else m.Role.SOURCE
        limits: dict[int, int] = {}
        for spec in m.MESSAGE_TABLE:
            if spec.sender not in (None, peer):
                continue
            if state.handshaking:
                accepted = spec.cls is _EXPECTED[state] or spec.cls is m.Error
            else:
                accepted = not spec.handshake
            if accepted:
                limits[spec.code] = self.max_frame if spec.cls is m.Piece else spec.max_body
        return limits

    def _frame(self, msg: m.ControlMessage, request_id: int = 0) -> bytes:
        """A complete control frame for ``msg``: tagged once this side has sent its Auth."""
        type_code, body = codec.encode_message(msg)
        header = frame_header(type_code, request_id, len(body))
        if not self._sending_tagged:
            return header + body
        assert self._send_mac is not None
        tag = self._send_mac.tag(self._send_counter, (header, body))
        self._send_counter += 1
        return header + body + tag

    def _check_tag(self, header: bytes, body: bytes | bytearray, tag: bytes) -> None:
        """The decoder's check of the next received control frame's tag, before the body is
        decoded (raises ``bad-tag``)."""
        assert self._recv_mac is not None
        counter = self._recv_counter
        self._recv_counter += 1
        if not self._recv_mac.check(counter, (header, body), tag):
            raise WireError(
                ErrorCode.BAD_TAG,
                f"frame {counter} from the {self.peer_name} failed its tag check "
                "(altered or injected on the path)",
            )

    @property
    def peer_name(self) -> str:
        return "destination" if self.is_client else "source"

    @property
    def _me(self) -> str:
        return "source" if self.is_client else "destination"

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means end of stream."""
        if self.state == State.CLOSED and data:
            return  # we already gave up on this connection; ignore trailing bytes
        self._decoder.receive_data(data)

    @property
    def decoder(self) -> FrameDecoder:
        """The frame decoder, for piece bodies (``readinto_body``/``body_received``)."""
        return self._decoder

    def data_to_send(self) -> bytes:
        """Bytes this endpoint wants written on its own: the handshake flights and, after a
        violation by the peer, the fatal ``Error`` frame. Nothing else, so that after the
        handshake the shell's receive loop never has to wait for the send side."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ProtocolEvent:
        """The next event. On a protocol violation by the peer raises :class:`WireError` after
        queueing an ``Error`` frame for the peer (send :meth:`data_to_send`, then close)."""
        if self.state == State.CLOSED:
            return END_OF_STREAM
        try:
            while True:
                event = self._decoder.next_event()
                if event is NEED_DATA:
                    return NEED_DATA
                if event is END_OF_STREAM:
                    self._close()
                    return END_OF_STREAM
                if isinstance(event, PieceStart):
                    return self._on_piece_start(event)
                if isinstance(event, UndecodedControl):
                    return event  # the shell decodes it off the loop, then calls deliver()
                assert isinstance(event, ControlFrame)
                result = self._on_control(event)
                if result is not None:
                    return result
        except LocalProtocolError:
            raise
        except ConnectionClosed:
            self._close()
            raise
        except WireError as exc:
            self._fail(exc)
            raise

    def deliver(self, decoded: ControlFrame | WireError) -> ProtocolEvent | None:
        """The outcome of decoding an :class:`UndecodedControl` (the frame, or the
        :class:`WireError` its decoding raised), processed as :meth:`next_event` would have.
        ``None`` when the frame yields no event (call :meth:`next_event` next)."""
        if self.state == State.CLOSED:
            return None
        try:
            if isinstance(decoded, WireError):
                raise decoded
            return self._on_control(decoded)
        except LocalProtocolError:
            raise
        except WireError as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Mark the endpoint closed (the shell closed the stream); nothing more is sent."""
        self._close()

    def _close(self) -> None:
        self._enter(State.CLOSED)

    def _fail(self, exc: WireError) -> None:
        """Queue the Error frame telling the peer why we close."""
        if self.state != State.CLOSED:
            self._out += self._frame(m.Error(exc.code, _truncate(exc.message)))
        self._close()

    def _on_control(self, frame: ControlFrame) -> ProtocolEvent | None:
        msg = frame.message
        rid = frame.request_id
        if isinstance(msg, m.Error):
            if rid == 0:
                self._close()
                return PeerClosed(msg.code, msg.message)
            if not self.is_client or self.state != State.OPEN:
                raise WireError(ErrorCode.PROTOCOL, "Error frame with a request id")
            return self._on_response(rid, msg)
        if self.state.handshaking:
            if rid != 0:
                raise WireError(ErrorCode.PROTOCOL, "handshake frame with a request id")
            return self._on_handshake(msg, frame.raw)
        if isinstance(msg, m.Ping | m.Pong | m.CreditGrant):
            if rid != 0:
                raise WireError(ErrorCode.PROTOCOL, f"{type(msg).__name__} with a request id")
            if isinstance(msg, m.Ping):
                return PingReceived(msg.payload)
            if isinstance(msg, m.Pong):
                return PongReceived(msg.payload)
            return self._on_credit(msg)
        if isinstance(msg, REQUEST_TYPES):
            self._check_new_request_id(rid)
            self._outstanding[rid] = _Outstanding(type(msg))
            return RequestReceived(rid, msg)
        assert self.is_client
        return self._on_response(rid, msg)  # type: ignore[arg-type]

    # -- handshake -------------------------------------------------------------------------

    def _on_handshake(self, msg: m.ControlMessage, raw: bytes) -> ProtocolEvent | None:
        if isinstance(msg, m.Hello) and self.state == State.HELLO:
            return self._on_hello(msg, raw)
        if isinstance(msg, m.Auth) and self.state == State.AUTH:
            return self._on_auth(msg)
        if isinstance(msg, m.AuthOk) and self.state == State.AUTH_OK:
            assert self.is_client
            if msg.version != self.version:
                raise WireError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"destination chose version {msg.version}, expected {self.version}",
                )
            if not PIECE_HEADER_SIZE < msg.max_frame <= 2**32 - 1:
                raise WireError(ErrorCode.PROTOCOL, f"invalid max_frame {msg.max_frame}")
            if not 0 < msg.initial_credit <= MAX_CREDIT:
                raise WireError(ErrorCode.PROTOCOL, f"invalid credit {msg.initial_credit}")
            self.window = self.available = msg.initial_credit
            self.max_frame = msg.max_frame
            return self._open()
        raise WireError(
            ErrorCode.PROTOCOL,
            f"unexpected {type(msg).__name__} during the handshake (state {self.state.value})",
        )

    def _on_hello(self, hello: m.Hello, raw: bytes) -> ProtocolEvent | None:
        expected_role = m.Role.DESTINATION if self.is_client else m.Role.SOURCE
        if hello.role != expected_role:
            raise WireError(
                ErrorCode.PROTOCOL,
                f"peer says it is a {hello.role.value}, expected a {expected_role.value}",
            )
        if len(hello.nonce) != NONCE_SIZE:
            raise WireError(ErrorCode.PROTOCOL, "Hello nonce must be 32 bytes")
        if not 1 <= hello.min_version <= hello.max_version:
            raise WireError(
                ErrorCode.PROTOCOL,
                f"invalid version range {hello.min_version}..{hello.max_version}",
            )
        if hello.max_version < 2:
            raise WireError(
                ErrorCode.UPGRADE_REQUIRED,
                f"the {self.peer_name} speaks the old unauthenticated handshake (protocol "
                f"{hello.max_version}, software {hello.software[:100]!r}): upgrade it to a "
                f"qbsync with protocol {self._max_version} (see the README, Upgrading)",
            )
        version = min(self._max_version, hello.max_version)
        if version < max(self._min_version, hello.min_version):
            raise WireError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"the {self.peer_name} speaks protocol versions {hello.min_version}.."
                f"{hello.max_version}, this side {self._min_version}..{self._max_version}: "
                "upgrade the older side",
            )
        if len(hello.identity) != k.PUBLIC_KEY_SIZE or len(hello.ephemeral) != k.PUBLIC_KEY_SIZE:
            raise WireError(
                ErrorCode.PROTOCOL, "Hello identity and ephemeral keys must be 32 bytes"
            )
        self.version = version
        self.peer_software = hello.software[:100]
        self.peer_instance = hello.instance[:100]
        self._peer_hello = raw
        self._peer_nonce = hello.nonce
        self._peer_identity = hello.identity
        if self._token is not None and not hello.auth_required:
            raise WireError(
                ErrorCode.AUTH_FAILED,
                f"this {self._me} has an auth token but the {self.peer_name} has none "
                "configured: set the same --auth-token on both sides",
            )
        if self._token is None and hello.auth_required:
            raise WireError(
                ErrorCode.AUTH_FAILED,
                f"the {self.peer_name} requires an auth token but this {self._me} has none "
                "configured: set the same --auth-token on both sides",
            )
        source_hello, dest_hello = (
            (self._my_hello, raw) if self.is_client else (raw, self._my_hello)
        )
        self._transcript = k.transcript_hash(source_hello, dest_hello)
        try:
            to_dest, to_source = k.derive_frame_keys(
                self._ephemeral, hello.ephemeral, self._transcript
            )
        except ValueError:
            raise WireError(ErrorCode.PROTOCOL, "unusable ephemeral key in Hello") from None
        send, recv = (to_dest, to_source) if self.is_client else (to_source, to_dest)
        self._send_mac, self._recv_mac = k.FrameMac(send), k.FrameMac(recv)
        self._enter(State.AUTH)
        if self.initiator:
            self._send_auth()
        return None

    def _send_auth(self) -> None:
        """Queue our Auth; every frame after it carries a tag."""
        mine = self.role
        mac = b""
        if self._token is not None:
            mac = k.token_mac(self._token, mine, self.version, self._transcript)
        signature = k.sign(self._identity, mine, self.version, self._transcript)
        self._out += self._frame(m.Auth(mac=mac, signature=signature))
        self._sending_tagged = True

    def _on_auth(self, auth: m.Auth) -> ProtocolEvent | None:
        peer_role = m.Role.DESTINATION if self.is_client else m.Role.SOURCE
        if len(auth.signature) != k.SIGNATURE_SIZE or len(auth.mac) not in (0, k.TOKEN_MAC_SIZE):
            raise WireError(ErrorCode.PROTOCOL, "malformed Auth")
        if not k.verify_signature(
            self._peer_identity, auth.signature, peer_role, self.version, self._transcript
        ):
            raise WireError(
                ErrorCode.AUTH_FAILED,
                f"the {self.peer_name}'s signature does not verify with the key it presented",
            )
        if self._token is not None:
            expected = k.token_mac(self._token, peer_role, self.version, self._transcript)
            if not hmac.compare_digest(auth.mac, expected):
                raise WireError(
                    ErrorCode.AUTH_FAILED,
                    f"auth token mismatch: the {self.peer_name}'s proof does not match this "
                    f"{self._me}'s token",
                )
        peer = k.PeerKey(peer_role, self._peer_identity, self._token is not None, self.peer_address)
        self._admission.admit(peer, self.fingerprint)  # raises WireError to refuse
        self.peer_key = peer
        self._decoder.tag_size = k.TAG_SIZE  # every later frame of the peer is tagged
        self._decoder.check_tag = self._check_tag
        if not self.initiator:
            self._send_auth()
        if self.is_client:
            self._enter(State.AUTH_OK)
            return None
        self._out += self._frame(
            m.AuthOk(version=self.version, max_frame=self.max_frame, initial_credit=self.window)
        )
        return self._open()

    def _open(self) -> HandshakeComplete:
        self._enter(State.OPEN)
        return HandshakeComplete(
            self.version,
            self.max_frame,
            self.window,
            self.peer_software,
            self.peer_key.fingerprint if self.peer_key is not None else "",
            self.peer_instance,
        )

    # -- requests and responses --------------------------------------------------------------

    def _check_new_request_id(self, rid: int) -> None:
        if rid <= self._last_request_id:
            raise WireError(
                ErrorCode.PROTOCOL,
                f"request id {rid} not above the previous {self._last_request_id}",
            )
        self._last_request_id = rid

    def _on_piece_start(self, start: PieceStart) -> PieceStart:
        self._check_new_request_id(start.request_id)
        if start.length == 0:
            raise WireError(ErrorCode.PROTOCOL, "empty piece")
        if start.length > self.available and self.available != self.window:
            raise WireError(
                ErrorCode.CREDIT_EXCEEDED,
                f"piece of {start.length} bytes with only {self.available} bytes of credit",
            )
        self.available -= start.length
        self._outstanding[start.request_id] = _Outstanding(
            m.Piece, start.info_hash, start.index, start.length
        )
        if self._recv_mac is not None and start.header:  # counted now, in stream order
            start = attrs.evolve(start, counter=self._recv_counter)
            self._recv_counter += 1
        return start

    def piece_mac(self, start: PieceStart) -> k.IncrementalTag:
        """Destination: the tag of a piece being received, already fed its headers: feed it
        the payload as it arrives, then :meth:`check_piece_tag` with the 16 bytes that follow
        the payload. Raises ``bad-tag`` for a piece on an untagged connection."""
        if self._recv_mac is None or not start.header:
            self._fail_with(WireError(ErrorCode.BAD_TAG, "piece without a tag"))
        assert self._recv_mac is not None
        mac = self._recv_mac.begin(start.counter)
        mac.update(start.header)
        return mac

    def check_piece_tag(self, start: PieceStart, mac: k.IncrementalTag, tag: bytes) -> None:
        """Destination: verify a piece's tag once its whole payload has been fed to ``mac``,
        before anything uses the piece. Raises ``WireError(bad-tag)`` after queueing the Error
        frame for the peer (send :meth:`data_to_send`, then close), like :meth:`next_event`."""
        if not mac.verify(tag):
            self._fail_with(
                WireError(
                    ErrorCode.BAD_TAG,
                    f"piece {start.index} (frame {start.counter}) from the {self.peer_name} "
                    "failed its tag check (altered or injected on the path)",
                )
            )

    def check_piece(
        self, start: PieceStart, payload: bytes | bytearray | memoryview, tag: bytes
    ) -> None:
        """:meth:`piece_mac` and :meth:`check_piece_tag` in one call (a payload in one buffer)."""
        mac = self.piece_mac(start)
        mac.update(payload)
        self.check_piece_tag(start, mac, tag)

    def _fail_with(self, exc: WireError) -> NoReturn:
        self._fail(exc)
        raise exc

    def _on_response(self, rid: int, msg: Response) -> ResponseReceived:
        pending = self._outstanding.get(rid)
        if pending is None:
            raise WireError(ErrorCode.PROTOCOL, f"response to unknown request id {rid}")
        if (why := pending.refuses(msg)) is not None:
            raise WireError(ErrorCode.PROTOCOL, f"{why} (id {rid})")
        del self._outstanding[rid]
        self.inflight_bytes -= pending.length
        return ResponseReceived(rid, msg)

    def _on_credit(self, grant: m.CreditGrant) -> CreditReceived:
        if not self.is_client:
            raise WireError(ErrorCode.PROTOCOL, "CreditGrant from a source")
        if grant.nbytes <= 0 or self.available + grant.nbytes > self.window:
            raise WireError(
                ErrorCode.PROTOCOL,
                f"CreditGrant of {grant.nbytes} bytes would exceed the window {self.window}",
            )
        self.available += grant.nbytes
        return CreditReceived(grant.nbytes, self.available)

    # -- output: source --------------------------------------------------------------------

    def _require_open(self) -> None:
        if self.state != State.OPEN:
            raise LocalProtocolError(ErrorCode.PROTOCOL, f"connection is {self.state.value}")

    def _new_request_id(self) -> int:
        self._last_request_id += 1
        return self._last_request_id

    def send_request(self, msg: m.RequestMessage[Any]) -> tuple[int, bytes]:
        """Source: ``(request id, frame)`` for a request."""
        self._require_open()
        if not self.is_client or not isinstance(msg, REQUEST_TYPES):
            raise LocalProtocolError(ErrorCode.PROTOCOL, f"cannot send {type(msg).__name__}")
        rid = self._new_request_id()
        self._outstanding[rid] = _Outstanding(type(msg))
        return rid, self._frame(msg, rid)

    def piece_fits(self, length: int) -> bool:
        """Source: whether a piece of ``length`` bytes may be sent now (credit rule)."""
        return length <= self.available or self.available == self.window

    def send_piece(
        self, info_hash: str, index: int, offset: int, length: int
    ) -> tuple[int, bytes, k.IncrementalTag]:
        """Source: consume credit and return ``(request id, head, tag)``. The caller writes
        ``head`` (frame and piece header, 64 bytes), then the ``length`` payload bytes while
        feeding each to ``tag`` (the payload is read once, as it is written, never copied),
        then ``tag.finalize()`` (16 bytes)."""
        self._require_open()
        if not self.is_client:
            raise LocalProtocolError(ErrorCode.PROTOCOL, "only a source sends pieces")
        if not 0 < length <= self.max_frame - PIECE_HEADER_SIZE:
            raise LocalProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"piece of {length} bytes: the destination accepts 1.."
                f"{self.max_frame - PIECE_HEADER_SIZE}",
            )
        if not self.piece_fits(length):
            raise LocalProtocolError(
                ErrorCode.CREDIT_EXCEEDED,
                f"piece of {length} bytes with {self.available} bytes of credit",
            )
        rid = self._last_request_id + 1
        head = encode_piece_header(rid, info_hash, index, offset, length)
        assert self._send_mac is not None and self._sending_tagged
        tag = self._send_mac.begin(self._send_counter)
        tag.update(head)
        self._send_counter += 1
        self._last_request_id = rid
        self.available -= length
        self.inflight_bytes += length
        self._outstanding[rid] = _Outstanding(m.Piece, info_hash, index, length)
        return rid, head, tag

    def piece_frame(
        self, info_hash: str, index: int, offset: int, payload: bytes | bytearray | memoryview
    ) -> tuple[int, bytes]:
        """Source: :meth:`send_piece` for a payload in one buffer: ``(request id, the whole
        frame)`` (a copy of the payload: for tests and small pieces)."""
        rid, head, tag = self.send_piece(info_hash, index, offset, len(payload))
        tag.update(payload)
        return rid, head + bytes(payload) + tag.finalize()

    # -- output: destination ---------------------------------------------------------------

    def refuses(self, request_id: int, msg: Response) -> str | None:
        """Why ``msg`` cannot answer request ``request_id`` (``None`` if it can). The shell
        asks this before sending a handler's result; the same rule polices the peer's answers."""
        pending = self._outstanding.get(request_id)
        if pending is None:
            return f"no request {request_id} to answer"
        return pending.refuses(msg)

    def send_response(self, request_id: int, msg: Response) -> bytes:
        """Destination: the one answer to request ``request_id``."""
        self._require_open()
        pending = self._outstanding.get(request_id)
        if self.is_client or pending is None:
            raise LocalProtocolError(ErrorCode.PROTOCOL, f"no request {request_id} to answer")
        if (why := pending.refuses(msg)) is not None:
            raise LocalProtocolError(ErrorCode.PROTOCOL, why)
        if isinstance(msg, m.Error):
            msg = m.Error(msg.code, _truncate(msg.message))
        del self._outstanding[request_id]
        return self._frame(msg, request_id)

    def grant_credit(self, nbytes: int) -> bytes:
        """Destination: give ``nbytes`` of piece credit back to the source."""
        self._require_open()
        if self.is_client or nbytes <= 0 or self.available + nbytes > self.window:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL, f"cannot grant {nbytes} bytes (available {self.available})"
            )
        self.available += nbytes
        return self._frame(m.CreditGrant(nbytes))

    @property
    def outstanding(self) -> int:
        """Requests and pieces received (destination) or sent (source) and not yet answered."""
        return len(self._outstanding)

    # -- output: both ----------------------------------------------------------------------

    def send_ping(self, payload: int = 0) -> bytes:
        self._require_open()
        return self._frame(m.Ping(payload))

    def send_pong(self, payload: int = 0) -> bytes:
        self._require_open()
        return self._frame(m.Pong(payload))

    def send_error(self, code: ErrorCode, message: str = "") -> bytes:
        """A connection-level Error frame; the endpoint is closed afterwards. Returns ``b""``
        if already closed (nothing more may be sent)."""
        if self.state == State.CLOSED:
            return b""
        self._close()
        return self._frame(m.Error(code, _truncate(message)))
