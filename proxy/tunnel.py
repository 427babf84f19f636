"""Tunnels: an HTTP/1.1 Upgrade (WebSocket or any other protocol) passed through as bytes.

Which requests ask for one, the headers that carry the upgrade both ways, and, once the
upstream answered 101, the relay: bytes copied both ways as they come, never parsed or
re-framed, with backpressure (a side that does not read pauses the other), half-close (one
side's EOF is a write EOF on the other) and an idle timeout. Knows nothing of routes or YAML.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, MultiMapping

from proxy.exchange import Exchange
from proxy.listener import ForwardedResponse

# Bytes buffered per direction before the sending side's socket is paused (aiohttp's
# StreamReader pauses at twice this, resumes below it).
_BUFFER = 64 * 1024


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


class _Sink:
    """Where a protocol feeds an upgraded connection's bytes (the place aiohttp's own
    WebSocketReader takes): a StreamReader, which pauses the socket when it holds too much."""

    def __init__(self, reader: aiohttp.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


def _end_writing(transport: asyncio.BaseTransport | None) -> None:
    """The other side's EOF: half-close this one, or, where TLS cannot (no write EOF in
    TLS 1.2/1.3 over asyncio), close it once what is buffered has been written."""
    if transport is None or transport.is_closing():
        return
    with contextlib.suppress(OSError):  # a peer already gone: nothing left to tell it
        if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()


async def relay(
    request: web.BaseRequest,
    response: ForwardedResponse,
    upstream_response: aiohttp.ClientResponse,
    exchange: Exchange,
    idle_timeout: float,
    on_bytes: Callable[[str, int], None],
) -> None:
    """Send the 101 and copy bytes both ways until both sides have closed (or one failed, or
    nothing moved for `idle_timeout` seconds, 0 = never). Bytes that came with the upstream's
    101 head go first; so do bytes the client sent after its request and before the 101."""
    loop = asyncio.get_running_loop()
    connection = upstream_response.connection
    assert connection is not None and connection.protocol is not None  # _forwardable checked
    upstream_protocol: ResponseHandler = connection.protocol
    client_protocol = request.protocol
    from_client = aiohttp.StreamReader(client_protocol, _BUFFER, loop=loop)
    from_upstream = aiohttp.StreamReader(upstream_protocol, _BUFFER, loop=loop)
    to_upstream = StreamWriter(upstream_protocol, loop)

    await response.prepare(request)
    response.flush_headers(request)
    # timeouts.read must not cut a quiet tunnel: idle_timeout is the tunnel's own (aiohttp's
    # ws_connect does the same).
    upstream_protocol.read_timeout = None
    client_protocol.set_parser(_Sink(from_client))  # type: ignore[arg-type]
    upstream_protocol.set_parser(_Sink(from_upstream), from_upstream)

    timer = asyncio.timeout(loop.time() + idle_timeout if idle_timeout else None)

    async def pump(source: aiohttp.StreamReader, write: Callable[[bytes], Awaitable[None]],
                   direction: str, other: asyncio.BaseTransport | None) -> None:  # fmt: skip
        while chunk := await source.readany():
            if idle_timeout:
                timer.reschedule(loop.time() + idle_timeout)
            await write(chunk)
            on_bytes(direction, len(chunk))
            if direction == "upstream":
                exchange.bytes_received += len(chunk)
            else:
                exchange.bytes_sent += len(chunk)
        _end_writing(other)  # the source's EOF ends the other direction (half-close)

    tasks = [
        asyncio.ensure_future(
            pump(from_client, to_upstream.write, "upstream", upstream_protocol.transport)
        ),
        asyncio.ensure_future(pump(from_upstream, response.write, "downstream", request.transport)),
    ]
    try:
        async with timer:
            await asyncio.gather(*tasks)  # the first failure (a side gone) ends the tunnel
    except (TimeoutError, OSError, aiohttp.ClientError, RuntimeError):
        pass  # idle for too long, or one side went away: both are closed below
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        response.force_close()
        upstream_response.close()
