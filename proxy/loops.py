"""`event_loop: asyncio | uvloop`: the event loop each process of the proxy runs on.

uvloop is an optional extra (`pip install 'proxy[uvloop]'`): choosing it when it is not
installed is a config error, at start-up and under --check, never a silent fall back to asyncio.
Loops are made with `asyncio.Runner(loop_factory=...)`, not the deprecated event loop policies.

One difference matters to the proxy. uvloop's `sock_accept` always waits for the listening
socket to be reported readable before it calls accept(), one connection per wait; asyncio's
calls accept() at once and waits only when nothing is there. The accept loop (accept.py) awaits
`sock_accept` once per connection, so on stock uvloop it took one connection per event-loop
turn: with 200 busy keep-alive clients a turn takes ~10 ms, and a burst of new connections sat
in the kernel's accept queue for up to 1.6 s while their clients, whose handshake the kernel
had completed, were already timing their first request (wrk -c 200: p99 1.02-1.10 s, max
1.96-1.99 s and wrk timeouts, where asyncio had p99 143-227 ms). `ProxyLoop` gives uvloop
asyncio's behaviour: accept at once, wait only on EAGAIN (then p99 196-343 ms; what is left is
the wait for a pool slot, see the README's "Event loop"). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from proxy.checks import ConfigError

T = TypeVar("T")

EVENT_LOOPS = ("asyncio", "uvloop")
UVLOOP_MISSING = "event_loop: uvloop is not installed; pip install 'proxy[uvloop]'"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

log = logging.getLogger("proxy")


@functools.cache
def _uvloop_factory() -> LoopFactory:
    try:
        import uvloop
    except ImportError:
        raise ConfigError(UVLOOP_MISSING) from None

    class ProxyLoop(uvloop.Loop):
        """uvloop, accepting as asyncio does (see the module's docstring)."""

        async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return await super().sock_accept(sock)  # nothing there: wait for readable
            conn.setblocking(False)
            return conn, address

    return ProxyLoop


def loop_factory(name: str) -> LoopFactory | None:
    """The factory for `event_loop: name` (None: asyncio's own); ConfigError when uvloop is
    chosen and cannot be imported."""
    if name not in EVENT_LOOPS:
        raise ConfigError(f"event_loop: must be one of {', '.join(EVENT_LOOPS)}, got {name!r}")
    return None if name == "asyncio" else _uvloop_factory()


def run(name: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main())` on the event loop `name`; the loop is checked before `main()` is
    called, so a missing uvloop leaves no coroutine un-awaited."""
    factory = loop_factory(name)
    with asyncio.Runner(loop_factory=factory) as runner:
        loop = runner.get_loop()
        log.info("event loop: %s (%s)", name, type(loop).__module__ + "." + type(loop).__name__)
        return runner.run(main())
