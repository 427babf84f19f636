"""An upstream's connection pool: aiohttp's TCPConnector, told what a proxy needs it to do.

Owns what happens to each upstream connection from its open to its close: which idle one is
reused, which is refused (stray bytes, past the upstream's announced idle timeout), and the
counts the pool metrics read. The only module that touches aiohttp's private connector state;
internals.py checks every private name it uses at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

log = logging.getLogger("proxy")

# Why an upstream connection was closed instead of being reused.
DISCARD_REASONS = ("unsolicited_data",)
_STRAY_LOG_EVERY = 60.0  # s between two log lines about stray bytes from one upstream


class Acquisition:
    """What the connector saw while getting one attempt its connection. Set per attempt in a
    ContextVar, because it happens deep inside aiohttp's connector, in the request's own task."""

    __slots__ = ("fresh_only", "protocol", "queued", "reused", "waited")

    def __init__(self, fresh_only: bool = False) -> None:
        self.fresh_only = fresh_only  # never an idle pooled connection (a retry after a stale one)
        self.waited = 0.0  # seconds spent waiting for a pool slot
        self.queued = False  # still waiting for a slot when the attempt ended
        self.reused: bool | None = None  # whether the connection had served a request before
        self.protocol: ResponseHandler | None = None


ACQUISITION: ContextVar[Acquisition] = ContextVar("acquisition")


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, deaf while it sits idle in the pool.

    aiohttp keeps parsing bytes that arrive on an idle pooled connection and hands them to the
    next request as its response (AIOHTTP-NOTES §1.13): a backend that writes a second response
    would answer another client's request, and every request after it on that connection would
    get the answer meant for the one before. No byte may arrive while no request is out, so a
    connection that receives one is closed unread, as nginx does.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_stray: Callable[[ResponseHandler], None]
    ) -> None:
        super().__init__(loop)
        self.idle = False  # in the pool, with no request out
        self._on_stray = on_stray

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            self.idle = False
            self.close()  # the connector's _get skips a closed connection
            self._on_stray(self)
            return
        super().data_received(data)


def take_upgraded(
    response: aiohttp.ClientResponse, protocol: asyncio.BaseProtocol
) -> tuple[asyncio.Transport, bytes]:
    """Take the connection a 101 came on away from aiohttp and give it to `protocol` (tunnel.py):
    out of its connector's count, never pooled, read, timed or closed by aiohttp again. Returns
    the transport and the bytes that came after the 101 head. Uses `Connection._protocol`,
    `._key`, `._connector`, `BaseConnector._release_acquired`, `ResponseHandler._tail` and
    `._drop_timeout` (internals.py checks them)."""
    connection = response.connection
    assert connection is not None and connection.protocol is not None  # forwardable checked
    handler = connection.protocol
    transport = handler.transport
    assert transport is not None
    connection._connector._release_acquired(connection._key, handler)
    connection._protocol = None  # the response's release() leaves the connection alone
    handler._drop_timeout()  # timeouts.read: a quiet tunnel is not a slow response
    handler.transport = None
    tail, handler._tail = handler._tail, b""
    transport.set_protocol(protocol)
    return transport, tail


def _holds_stray_bytes(protocol: ResponseHandler) -> bool:
    """Whether bytes beyond the last response were parsed or buffered (aiohttp 3.14.5's
    `DataQueue._buffer` holds parsed responses nobody read, `_tail` unparsed bytes)."""
    return bool(protocol._buffer or protocol._tail)


class PoolFull(aiohttp.ClientConnectionError):
    """`max_pending` requests already wait for a slot: this one is refused at once."""


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that also counts what the pool metrics need.

    Overrides three private coroutines (`_wait_for_available_connection`, `_get`,
    `_create_connection`), the private `_release` and `_factory`, and the public `connect`, and
    reads two private attributes (`_acquired`, `_conns`) of aiohttp's BaseConnector, checked
    against aiohttp 3.14.5 (pinned ~=3.14.0); `check_aiohttp()` fails at start-up if they move.
    """

    def __init__(self, *, name: str = "", max_pending: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name  # the upstream's, for log lines
        self.max_pending = max_pending  # 0 = unbounded
        self.created = 0  # TCP connections opened since start
        self.waiting = 0  # requests waiting for a free slot now
        self.retired = 0  # idle connections closed before the upstream's announced timeout
        self.discarded = dict.fromkeys(DISCARD_REASONS, 0)  # closed, never reused, by reason
        self._stray_logged = -_STRAY_LOG_EVERY
        self._factory = functools.partial(  # type: ignore[assignment]
            GuardedResponseHandler, loop=self._loop, on_stray=self._discard_stray
        )
        self._retire_at: weakref.WeakKeyDictionary[ResponseHandler, float] = (
            weakref.WeakKeyDictionary()
        )
        self._target_of: weakref.WeakKeyDictionary[ResponseHandler, tuple[str, int | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._unused: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        if self.max_pending and self.waiting >= self.max_pending:
            raise PoolFull(f"{self.waiting} requests already wait for a connection")
        acquisition = ACQUISITION.get(None) or Acquisition()
        self.waiting += 1
        acquisition.queued = True
        started = time.monotonic()
        try:
            await super()._wait_for_available_connection(key, traces)
            acquisition.queued = False  # stays True if the connect timeout ends the wait
        finally:
            self.waiting -= 1
            acquisition.waited += time.monotonic() - started

    async def _get(self, key: Any, traces: Any) -> Any:
        # Skip idle connections past the idle timeout their upstream announced (Keep-Alive:
        # timeout=N): reusing one races the upstream closing it, the stale keep-alive 502.
        acquisition = ACQUISITION.get(None)
        if acquisition is not None and acquisition.fresh_only:
            return None  # its siblings are likely stale too: open a new connection
        while (connection := await super()._get(key, traces)) is not None:
            protocol = connection.protocol
            if protocol is None:  # pragma: no cover - aiohttp hands out live connections
                return connection
            if isinstance(protocol, GuardedResponseHandler):
                protocol.idle = False
            if _holds_stray_bytes(protocol):
                self._discard_stray(protocol)  # the second line of defence, see _release
                connection.close()
                continue
            deadline = self._retire_at.get(protocol)
            if deadline is None or time.monotonic() < deadline:
                return connection
            self.retired += 1
            connection.close()
        return None

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        # Bytes that came in after the response (with it, or while the client was still being
        # written to) make aiohttp close the connection; they are counted here. Bytes that come
        # later, once it is idle, are refused by GuardedResponseHandler.
        if _holds_stray_bytes(protocol) and protocol.is_connected():
            self._discard_stray(protocol)
            should_close = True
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, GuardedResponseHandler) and protocol.is_connected():
            protocol.idle = True

    def _discard_stray(self, protocol: ResponseHandler) -> None:
        self.discarded["unsolicited_data"] += 1
        now = time.monotonic()
        if now - self._stray_logged < _STRAY_LOG_EVERY:
            return  # counted; one line a minute is enough to say it goes on
        self._stray_logged = now
        host, port = self._target_of.get(protocol, ("?", None))
        log.warning(
            "upstream %s: target %s:%s sent bytes that answer no request; closed that "
            "connection (a buggy backend, or a request smuggled in a body; %d so far, see "
            "proxy_upstream_connections_discarded_total)",
            self.name, host, port, self.discarded["unsolicited_data"],
        )  # fmt: skip

    def retire_after(self, protocol: ResponseHandler, seconds: float) -> None:
        """Do not reuse `protocol` once about `seconds` have passed from now (its response's
        headers): a little before the upstream's idle timer, which starts later, runs out."""
        margin = min(1.0, seconds / 2)  # leave time for the request to reach the upstream
        self._retire_at[protocol] = time.monotonic() + seconds - margin

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        self.created += 1
        key = req.connection_key
        self._target_of[protocol] = (key.host, key.port)
        self._unused.add(protocol)
        return protocol

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        fresh = protocol is not None and protocol in self._unused
        if protocol is not None and fresh:
            self._unused.discard(protocol)
        acquisition = ACQUISITION.get(None)
        if acquisition is not None:
            acquisition.reused = not fresh
            acquisition.protocol = protocol
        return connection

    def target_stats(self) -> dict[tuple[str, int | None], tuple[int, int]]:
        """(host, port) -> (active, idle) connections: the one reader of aiohttp's private
        pool state (`_acquired`, `_conns`), read at scrape time, never per request."""
        stats: dict[tuple[str, int | None], list[int]] = {}
        for protocol in getattr(self, "_acquired", ()):
            if not isinstance(protocol, ResponseHandler):
                continue  # aiohttp's placeholder for a connection still being made
            target = self._target_of.get(protocol)
            if target is not None:
                stats.setdefault(target, [0, 0])[0] += 1
        for key, idle in getattr(self, "_conns", {}).items():
            alive = sum(1 for protocol, _ in idle if protocol.is_connected())
            stats.setdefault((key.host, key.port), [0, 0])[1] += alive
        return {target: (active, idle) for target, (active, idle) in stats.items()}
