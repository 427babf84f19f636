"""Tunnels: an HTTP/1.1 Upgrade (WebSocket or any other protocol) passed through as bytes.

Which requests ask for one, the headers that carry the upgrade both ways, and, once the
upstream answered 101, the relay: bytes copied both ways as they come, never parsed or
re-framed, with backpressure (a side that does not read pauses the other), half-close (one
side's EOF is a write EOF on the other) and an idle timeout. Knows nothing of routes or YAML.

After the 101 both connections leave aiohttp: each transport gets an `_End` as its protocol,
which writes what it receives straight to the other transport. No task, reader or parser
stays behind, so an idle tunnel costs two transports and three small objects (bench/ws.py:
RSS per idle tunnel), and a relayed chunk costs one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from proxy.deadlines import ClientServer, DeadlineHandler
from proxy.exchange import Exchange
from proxy.listener import ForwardedResponse

log = logging.getLogger("proxy")


def upgrade_asked(request: web.BaseRequest) -> str | None:
    """The `Upgrade` value of a request that asks for one, else None (RFC 9110 §7.8): HTTP/1.1,
    "upgrade" among the Connection tokens, and no body. `h2c` is never an upgrade here: the
    proxy speaks HTTP/1.1 to upstreams (nginx drops it too)."""
    if request.version != aiohttp.HttpVersion11 or request.body_exists:
        return None
    upgrade = request.headers.get("Upgrade")
    if not upgrade:
        return None
    tokens = {
        t.strip().lower()
        for value in request.headers.getall("Connection", ())
        for t in value.split(",")
    }
    if "upgrade" not in tokens:
        return None
    offered = [p.strip() for p in upgrade.split(",") if p.strip().lower() != "h2c"]
    return ", ".join(offered) or None


def with_upgrade(headers: CIMultiDict[str], upgrade: str) -> CIMultiDict[str]:
    """End-to-end headers (headers.py has removed every hop-by-hop one) plus the two that
    carry an upgrade across this hop."""
    headers["Connection"] = "upgrade"
    headers["Upgrade"] = upgrade
    return headers


def switching_headers(
    upstream: MultiMapping[str], end_to_end: CIMultiDict[str]
) -> CIMultiDict[str]:
    """The 101's headers for the client: the upstream's end-to-end ones and its `Upgrade`."""
    for value in upstream.getall("Upgrade", ()):
        end_to_end.add("Upgrade", value)
    end_to_end["Connection"] = "upgrade"
    return end_to_end


class Owner(Protocol):
    """What a tunnel tells its upstream (upstream.py): bytes moved, it closed."""

    def count_tunnel_bytes(self, direction: str, count: int) -> None: ...
    def tunnel_closed(self, tunnel: Tunnel) -> None: ...


TakeUpstream = Callable[
    [aiohttp.ClientResponse, asyncio.BaseProtocol], tuple[asyncio.Transport, bytes]
]


async def open_tunnel(
    request: web.BaseRequest,
    response: ForwardedResponse,
    upstream_response: aiohttp.ClientResponse,
    take_upstream: TakeUpstream,
    exchange: Exchange,
    owner: Owner,
    idle_timeout: float,
    observe: Callable[[Exchange], None],
) -> Tunnel | None:
    """Send the 101 and hand both connections to a tunnel, which relays from then on without
    this coroutine, and observes `exchange` once both sides have closed (or one failed, or
    nothing moved for `idle_timeout` seconds, 0 = never). Bytes that came with the upstream's
    101 head go first; so do bytes the client sent after its request and before the 101.
    None if either side was gone by then: both are closed, and nothing is relayed."""
    handler = request.protocol
    assert isinstance(handler, DeadlineHandler)  # listener.py makes every client connection
    response.flush_headers(request)
    await response.write_eof()  # the 101 is written: aiohttp has nothing left to send
    connection = upstream_response.connection
    if not (
        _open(handler.transport)
        and connection is not None
        and connection.protocol is not None
        and _open(connection.protocol.transport)
    ):
        response.force_close()  # aiohttp closes the client's connection after this response
        upstream_response.close()
        return None
    # Both are open, and nothing runs between the two hand-offs: neither can fail alone.
    tunnel = Tunnel(exchange, owner, observe, idle_timeout, handler.server)
    client, client_tail = handler.hand_off(tunnel.client)
    upstream, upstream_tail = take_upstream(upstream_response, tunnel.upstream)
    tunnel.start(client, client_tail, upstream, upstream_tail)
    return tunnel


def _open(transport: asyncio.BaseTransport | None) -> bool:
    return transport is not None and not transport.is_closing()


class _End(asyncio.Protocol):
    """One side of a tunnel: what this transport receives is written to the other side's."""

    __slots__ = ("client", "closed", "other", "read_eof", "tls", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, client: bool) -> None:
        self.tunnel = tunnel
        self.client = client  # the client's side (what arrives goes to the upstream)
        self.transport: asyncio.Transport | None = None
        self.other: _End = self
        self.read_eof = False  # this side has sent all it will send
        self.closed = False  # this side's connection is gone
        self.tls = False  # TLS cannot half-close (no write EOF in TLS 1.2/1.3 over asyncio)

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("sslcontext") is not None
        transport.resume_reading()  # aiohttp pauses it while bytes wait for a 101

    def data_received(self, data: bytes) -> None:
        other = self.other.transport
        if other is None or other.is_closing():
            return  # the other side is gone: nowhere to put it, and this side closes too
        other.write(data)
        self.tunnel.moved(self.client, len(data))

    def eof_received(self) -> bool:
        self.read_eof = True
        if self.other.read_eof:
            # Both sides have said all they will: each closes once what it still has to
            # write is written (this one as asyncio closes it, on False).
            if self.other.transport is not None:
                self.other.transport.close()
            return False
        self.other.end_writing()
        return not self.tls  # stay open for what the other side still sends

    def end_writing(self) -> None:
        """The other side's EOF: half-close this one, or, where TLS cannot, close it once
        what is buffered has been written."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(OSError):  # a peer already gone: nothing left to tell it
            if self.tls or not transport.can_write_eof():
                transport.close()
            else:
                transport.write_eof()

    def pause_writing(self) -> None:  # this side reads too slowly: stop reading the other
        if self.other.transport is not None:
            self.other.transport.pause_reading()
        if self.client:
            self.tunnel.client_stalled(True)

    def resume_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.resume_reading()
        if self.client:
            self.tunnel.client_stalled(False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.tunnel.lost(self, exc)


class Tunnel:
    """Two connections relayed to each other; closed when both are, or one fails, or it has
    been idle for `idle_timeout` s, or the client has accepted nothing for
    listen.timeouts.send s (as for any response)."""

    __slots__ = (
        "_last",
        "_loop",
        "_stalled_since",
        "_timer",
        "client",
        "exchange",
        "idle_timeout",
        "observe",
        "owner",
        "server",
        "upstream",
    )

    def __init__(
        self,
        exchange: Exchange,
        owner: Owner,
        observe: Callable[[Exchange], None],
        idle_timeout: float,
        server: ClientServer,
    ) -> None:
        self.client = _End(self, client=True)
        self.upstream = _End(self, client=False)
        self.client.other, self.upstream.other = self.upstream, self.client
        self.exchange = exchange
        self.owner = owner
        self.observe = observe
        self.idle_timeout = idle_timeout
        self.server = server  # the client connection's (its count, its send deadline)
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()  # when a byte last moved
        self._stalled_since: float | None = None  # the client stopped accepting bytes then
        self._timer: asyncio.TimerHandle | None = None

    def start(
        self,
        client: asyncio.Transport,
        client_tail: bytes,
        upstream: asyncio.Transport,
        upstream_tail: bytes,
    ) -> None:
        self.client.attach(client)
        self.upstream.attach(upstream)
        if client_tail:
            self.client.data_received(client_tail)
        if upstream_tail:
            self.upstream.data_received(upstream_tail)
        self._arm()

    def moved(self, from_client: bool, count: int) -> None:
        self._last = self._loop.time()
        if from_client:
            self.exchange.bytes_received += count
            self.owner.count_tunnel_bytes("upstream", count)
        else:
            self.exchange.bytes_sent += count
            self.owner.count_tunnel_bytes("downstream", count)

    def client_stalled(self, stalled: bool) -> None:
        if not stalled:
            self._stalled_since = None
            return
        now = self._stalled_since = self._loop.time()
        if self._timer is None or self._timer.when() > now + self.server.deadlines.send:
            self._arm()

    def close(self, abort: bool = False) -> None:
        """Close both sides: gracefully (what is buffered is written first), or at once when
        asked or when bytes wait that nothing has taken for so long (the idle timeout)."""
        for end in (self.client, self.upstream):
            transport = end.transport
            if transport is not None and not end.closed:
                if abort or transport.get_write_buffer_size():
                    transport.abort()  # a buffer nobody reads would keep it open for ever
                else:
                    transport.close()

    def lost(self, end: _End, exc: BaseException | None) -> None:
        if end is self.client:
            self.server.handed_off_closed()
        other = end.other
        if not other.closed:
            # One side gone: the other closes too, after what it still has to write, or at
            # once if the side went away broken (what it sent may be cut short).
            if other.transport is not None:
                if exc is None:
                    other.transport.close()
                else:
                    other.transport.abort()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        exchange = self.exchange
        exchange.duration = time.perf_counter() - exchange.started
        self.owner.tunnel_closed(self)
        self.observe(exchange)  # the access log line and the metrics of the whole tunnel

    # -- the one timer: idle and send deadlines --

    def _arm(self) -> None:
        due = self._last + self.idle_timeout if self.idle_timeout else None
        if self._stalled_since is not None:
            stall_due = self._stalled_since + self.server.deadlines.send
            due = stall_due if due is None else min(due, stall_due)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if due is None else self._loop.call_at(due, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        stalled = self._stalled_since
        if stalled is not None and now - stalled >= self.server.deadlines.send:
            self.server.client_timeouts["send"] += 1
            log.info("client %s: send timeout (tunnel)", self.exchange.client)
            self.close(abort=True)  # the client reads nothing, so say nothing
        elif self.idle_timeout and now - self._last >= self.idle_timeout:
            self.close()
        else:
            self._arm()
