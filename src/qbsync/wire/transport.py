"""Byte transport for one wire connection: plain TCP with zero-copy fast paths, or TLS.

Who opens the TCP connection is independent of the protocol roles: :func:`dial` (TCP connect,
then TLS as the client, verifying the listener's certificate) and :func:`accept_tls` (TLS as
the server on an accepted socket) are the only places that know the direction. Either side's
protocol endpoint -- the source as the client that sends requests, the destination as the
server that answers them -- then runs over the stream they return. So the side that listens is
always the TLS server (``--tls-cert``/``--tls-key``) and the side that dials always verifies it
(``--tls-ca``), whatever its role.

Piece bodies are the bulk of the traffic, so this is where copies and scheduler round trips
are avoided: on plain TCP a piece is received with ``readv`` straight into its final buffer
and sent as header + payload with one ``writev``; over TLS (which copies anyway) the ordinary
``trio.abc.Stream`` calls are used.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from contextlib import suppress

import trio

from .address import HostPort
from .errors import ConnectionClosed, ErrorCode, WireError

# Unsent bytes the kernel may queue before the socket stops being writable. Trio sets 16 KiB
# (good for latency); bulk piece streams want much more (field notes B.4: 4 MiB lifted trio
# loopback throughput from ~2.5 to ~3.2 GB/s).
BULK_NOTSENT_LOWAT = 4 * 1024 * 1024
READ_CHUNK = 256 * 1024  # largest read into the scratch buffer
MIN_READ = 16 * 1024  # smallest read (header-sized reads would cost a syscall per frame)
TLS_READ_CHUNK = 64 * 1024  # SSLStream allocates max_bytes per read; records are 16 KiB
BULK_YIELD_BYTES = 8 * 1024 * 1024  # a piece body read yields to other tasks at least this often

TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    if isinstance(stream, trio.SocketStream):
        return stream
    if isinstance(stream, trio.SSLStream):
        inner = stream.transport_stream
        return inner if isinstance(inner, trio.SocketStream) else None
    return None


def tune_socket(stream: trio.SocketStream) -> None:
    """Bulk-transfer socket options (see :data:`BULK_NOTSENT_LOWAT`). Socket buffer sizes are
    left to Linux autotuning on purpose: setting ``SO_SNDBUF``/``SO_RCVBUF`` disables it and is
    capped by ``net.core.[rw]mem_max`` (often ~200 KiB), which would *lower* throughput."""
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, BULK_NOTSENT_LOWAT)


async def dial(
    addr: HostPort, *, ssl_context: ssl.SSLContext | None, server_hostname: str | None = None
) -> trio.abc.Stream:
    """The dialing side: TCP connect (``OSError`` when it fails), then TLS as the client.
    A failed TLS handshake is ``auth-failed`` (a wrong CA or host name, or no TLS there)."""
    tcp = await trio.open_tcp_stream(addr.host, addr.port)
    tune_socket(tcp)
    if ssl_context is None:
        return tcp
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or addr.host)
    try:
        await tls.do_handshake()
    except TRANSPORT_ERRORS as exc:
        await trio.aclose_forcefully(tcp)
        raise WireError(
            ErrorCode.AUTH_FAILED, f"TLS handshake with {addr} failed: {describe(exc)}"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


async def accept_tls(
    stream: trio.SocketStream, ssl_context: ssl.SSLContext | None
) -> trio.abc.Stream:
    """The listening side: TLS as the server on an accepted socket (the stream as it is
    without ``ssl_context``). A failed TLS handshake is ``auth-failed``."""
    tune_socket(stream)
    if ssl_context is None:
        return stream
    tls = trio.SSLStream(stream, ssl_context, server_side=True)
    try:
        await tls.do_handshake()
    except TRANSPORT_ERRORS as exc:
        raise WireError(ErrorCode.AUTH_FAILED, f"TLS: {describe(exc)}") from None
    return tls


class Transport:
    """Stream plus a zero-copy ``recv_into`` when the stream is a plain TCP socket."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.sock_stream = socket_stream(stream)
        self._raw = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The readv/writev fast paths need a POSIX socket fd (Linux, BSD, macOS).
        self._vectored = self._raw is not None and hasattr(os, "readv")

    async def recv_into(self, view: memoryview) -> int:
        if self._raw is not None:
            return await self._raw.recv_into(view)
        data = await self.stream.receive_some(min(len(view), TLS_READ_CHUNK))
        n = len(data)
        view[:n] = data
        return n

    async def recv_body(
        self,
        view: memoryview,
        progress: Callable[[int], None],
        trailer: memoryview | None = None,
    ) -> None:
        """Fill ``view`` and then ``trailer`` (a piece body and the tag after it) from the
        stream, reporting each chunk's size in order.

        On plain TCP this reads with ``readv`` on the non-blocking socket, both buffers in one
        call (the 16-byte tag costs no syscall of its own), and only goes through the
        scheduler when the socket is empty (or every :data:`BULK_YIELD_BYTES`, so a huge piece
        cannot starve other tasks): Trio's ``recv_into`` yields after *every* successful call,
        which on a multi-MiB piece costs more than the copies themselves.
        """
        segments = [view] if trailer is None else [view, trailer]
        total = sum(len(seg) for seg in segments)
        got = 0
        if self._raw is None or not self._vectored:
            for seg in segments:
                done = 0
                while done < len(seg):
                    n = await self.recv_into(seg[done:])
                    if n == 0:
                        raise ConnectionClosed(
                            "peer closed the connection in the middle of a piece"
                        )
                    done += n
                    progress(n)
            return
        unyielded = 0
        while got < total:
            fd = self._raw.fileno()  # re-read after every await: -1 once closed
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            iov = _remaining(segments, got)
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                unyielded = 0
                await trio.lowlevel.wait_readable(self._raw)
                continue
            if n == 0:
                raise ConnectionClosed("peer closed the connection in the middle of a piece")
            got += n
            progress(n)
            unyielded += n
            if unyielded >= BULK_YIELD_BYTES and got < total:
                unyielded = 0
                await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def send_header_and_payload(
        self, header: bytes, payload: memoryview, trailer: bytes = b""
    ) -> None:
        """Write ``header``, ``payload`` and ``trailer`` without concatenating them.

        On plain TCP: ``writev`` (scatter/gather) on the non-blocking socket, so the 64-byte
        header and the 16-byte tag cost neither a syscall nor a TCP segment of their own, and
        the scheduler is only entered when the socket buffer is full (or every
        :data:`BULK_YIELD_BYTES`); see :meth:`recv_body`. Over TLS, ``send_all`` calls (TLS
        copies anyway).
        """
        if self._raw is None or not self._vectored:
            for part in (header, payload, trailer):
                if len(part):
                    await self.stream.send_all(part)
            return
        segments = [memoryview(header), payload, memoryview(trailer)]
        total = sum(len(seg) for seg in segments)
        done = 0
        unyielded = 0
        while done < total:
            fd = self._raw.fileno()  # re-read after every await: -1 once closed
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            try:
                sent = os.writev(fd, _remaining(segments, done))
            except BlockingIOError:
                unyielded = 0
                await trio.lowlevel.wait_writable(self._raw)
                continue
            done += sent
            unyielded += sent
            if unyielded >= BULK_YIELD_BYTES and done < total:
                unyielded = 0
                await trio.lowlevel.checkpoint()
        # A schedule point, but not a cancellation point: the frame is complete, and a cancel
        # arriving now must not be mistaken for one that interrupted the write.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close_now(self) -> None:
        """Synchronously close the socket: wakes every task blocked on it."""
        if self.sock_stream is not None:
            self.sock_stream.socket.close()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _remaining(segments: list[memoryview], done: int) -> list[memoryview]:
    """The non-empty rest of ``segments`` after their first ``done`` bytes (an iovec)."""
    out: list[memoryview] = []
    for seg in segments:
        if done >= len(seg):
            done -= len(seg)
            continue
        out.append(seg[done:] if done else seg)
        done = 0
    return out


def peer_address(stream: trio.abc.Stream) -> str:
    sock = socket_stream(stream)
    if sock is None:
        return "unknown"
    try:
        addr = sock.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr)


def describe(exc: BaseException) -> str:
    """One line for a transport exception, with its cause (``OSError`` text is often terse)."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text = f"{text} ({cause})"
    return text
