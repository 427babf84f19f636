"""Upstream failures get 502/504 before the response headers, and an aborted client connection
after them, never a response that looks complete but is not. Nothing leaks."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tests.support import (
    RawClient,
    answering,
    config_dict,
    exchange,
    free_port,
    get,
    http_response,
    read_request,
    upstream,
)


async def status_through(proxy, target: str, **settings) -> tuple[int, bytes]:
    server = await proxy(config_dict({"app": upstream(target, **settings)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        answer = await client.request(get())
    finally:
        await client.close()
    return answer.status, answer.body


async def test_refused_connection_is_502(proxy):
    status, body = await status_through(proxy, f"http://127.0.0.1:{free_port()}")
    assert status == 502
    assert b"could not connect" in body


async def test_tcp_connect_timeout_is_504(proxy):
    # A listener that never accepts, with its one-slot backlog already full: SYNs go unanswered.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(blackhole.getsockname())
                fillers.append(filler)
            target = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
            status, _ = await status_through(proxy, target, timeouts={"connect": 0.3})
        finally:
            for filler in fillers:
                filler.close()
    assert status == 504


async def test_read_timeout_before_headers_is_504(backend, proxy):
    async def silent(backend, reader, writer):
        await read_request(reader)
        await asyncio.sleep(30)

    origin = await backend(silent)
    status, _ = await status_through(proxy, origin.url, timeouts={"read": 0.3})
    assert status == 504


async def test_pool_wait_longer_than_connect_timeout_is_503_with_retry_after(backend, proxy):
    origin = await backend(answering(http_response(body=b"slow"), delay=1.0))
    server = await proxy(
        config_dict({"app": upstream(origin.url, pool={"limit": 1}, timeouts={"connect": 0.3})})
    )
    port = server.proxy_address[1]
    slow = asyncio.create_task(exchange(port, get(extra="Connection: close\r\n")))
    await origin.received(1)
    waited = await exchange(port, get(extra="Connection: close\r\n"))
    # Overload, not a dead upstream: 503 and when to come back (a TCP connect timeout is 504).
    assert waited.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1\r\n" in waited
    assert (await slow).endswith(b"slow")


async def test_upstream_reset_before_headers_is_502(backend, proxy):
    async def hang_up(backend, reader, writer):
        await read_request(reader)
        writer.transport.abort()

    origin = await backend(hang_up)
    status, _ = await status_through(proxy, origin.url)
    assert status == 502


async def test_malformed_upstream_response_is_502(backend, proxy):
    origin = await backend(answering(b"NOT HTTP AT ALL\r\n\r\n"))
    status, body = await status_through(proxy, origin.url)
    assert status == 502
    assert b"malformed" in body


async def test_upstream_header_with_control_character_is_502(backend, proxy):
    origin = await backend(
        answering(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n")
    )
    status, _ = await status_through(proxy, origin.url)
    assert status == 502


async def dies_after(head: bytes, *sent: bytes, stall: bool = False):
    async def handler(backend, reader, writer):
        await read_request(reader)
        writer.write(head)
        for part in sent:
            writer.write(part)
        await writer.drain()
        if stall:
            await asyncio.sleep(30)
        writer.transport.abort()

    return handler


async def test_chunked_body_cut_by_upstream_aborts_the_client_without_final_chunk(backend, proxy):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    origin = await backend(await dies_after(head, b"5\r\nhello\r\n"))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    received = await exchange(server.proxy_address[1], get())
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert b"hello" in received
    assert not received.endswith(b"0\r\n\r\n")  # the client can tell the body is incomplete


async def test_content_length_body_cut_by_upstream_closes_the_client_connection(backend, proxy):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    origin = await backend(await dies_after(head, b"0123456789"))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    # exchange() reads until the proxy closes: a connection left open would time out here.
    received = await exchange(server.proxy_address[1], get(), within=5)
    _, _, body = received.partition(b"\r\n\r\n")
    assert body == b"0123456789"


async def test_read_timeout_mid_body_aborts_the_client(backend, proxy):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    origin = await backend(await dies_after(head, b"3\r\nabc\r\n", stall=True))
    server = await proxy(config_dict({"app": upstream(origin.url, timeouts={"read": 0.3})}))
    received = await exchange(server.proxy_address[1], get(), within=5)
    assert b"abc" in received
    assert not received.endswith(b"0\r\n\r\n")


async def test_client_disconnect_cancels_the_upstream_request_and_frees_the_slot(backend, proxy):
    upstream_gone = asyncio.Event()

    async def slow_then_ok(backend, reader, writer):
        request = await read_request(reader)
        backend.record(request)
        if len(backend.requests) == 1:
            # The proxy must close this connection when its client goes away.
            await reader.read()
            upstream_gone.set()
            return
        writer.write(http_response(body=b"second"))
        await writer.drain()
        await reader.read()

    origin = await backend(slow_then_ok)
    server = await proxy(
        config_dict(
            {"app": upstream(origin.url, pool={"limit": 1}, timeouts={"connect": 2, "read": 30})}
        )
    )
    port = server.proxy_address[1]
    client = await RawClient.connect(port)
    client.writer.write(get("/first"))
    await origin.received(1)
    client.writer.transport.abort()
    await asyncio.wait_for(upstream_gone.wait(), 5)
    # limit is 1: this only succeeds if the first request gave its slot back.
    second = await exchange(port, get("/second", extra="Connection: close\r\n"))
    assert second.endswith(b"second")
