"""Run a real :func:`qbsync.wire.serve` on 127.0.0.1 for the body of a ``with`` block.

The wire tests and the pairing tests both need a listening destination around a handler of
their own; this is the one place that starts it on a free port and stops it after.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from qbsync.wire import HostPort, ServerHandler, serve

LOCAL = "127.0.0.1"


@asynccontextmanager
async def serving(handler: ServerHandler, **serve_kwargs: Any) -> AsyncIterator[int]:
    """Serve ``handler`` on a free port of 127.0.0.1 (``serve_kwargs``: token, identity,
    admission, budget, ...); yields the port, cancels the server when the block ends."""
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(
            functools.partial(serve, HostPort(LOCAL, 0), handler, **serve_kwargs)
        )
        yield ports[0]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_peer(
    serve_stream: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A peer that is not qbsync (an old version, a liar, a silent one): ``serve_stream`` gets
    every TCP connection to a free port of 127.0.0.1; yields the port, stops at the end."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        nursery.start_soon(trio.serve_listeners, serve_stream, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
