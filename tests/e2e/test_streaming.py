"""Bodies stream both ways: each chunk is passed on as it arrives, and a slow reader on either
side slows the sender instead of filling the proxy's memory."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support import (
    RawClient,
    answering,
    config_dict,
    get,
    http_response,
    read_head,
    read_request,
    upstream,
)

BLOCK = b"x" * 65536


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_server_sent_events_reach_the_client_one_by_one(backend, proxy):
    # The backend sends its second event only after the client has seen the first: a proxy
    # that buffered the response would deadlock here and time out.
    first_seen = asyncio.Event()

    async def events(backend, reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(chunk(b"data: first\n\n"))
        await writer.drain()
        await first_seen.wait()
        writer.write(chunk(b"data: second\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    origin = await backend(events)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(get("/events"))
        head = await asyncio.wait_for(read_head(client.reader), 5)
        assert b"text/event-stream" in head
        first = await asyncio.wait_for(client.reader.readuntil(b"data: first\n\n\r\n"), 5)
        assert first.endswith(b"data: first\n\n\r\n")
        first_seen.set()
        rest = await asyncio.wait_for(client.reader.readuntil(b"0\r\n\r\n"), 5)
        assert b"data: second\n\n" in rest
    finally:
        await client.close()


async def test_request_body_reaches_the_backend_while_the_client_still_sends(backend, proxy):
    first_part_arrived = asyncio.Event()

    async def receiver(backend, reader, writer):
        head = await read_head(reader)
        assert head is not None and b"chunked" in head.lower()
        await reader.readuntil(b"part-one")
        first_part_arrived.set()
        await reader.readuntil(b"0\r\n\r\n")
        writer.write(http_response(body=b"got it"))
        await writer.drain()
        await reader.read()

    origin = await backend(receiver)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(
            b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n8\r\npart-one\r\n"
        )
        await asyncio.wait_for(first_part_arrived.wait(), 5)
        answer = await client.request(b"8\r\npart-two\r\n0\r\n\r\n")
        assert (answer.status, answer.body) == (200, b"got it")
    finally:
        await client.close()


async def plateau(counter, *, settle: float = 0.3, limit: float = 10.0) -> int:
    """The value `counter()` stops growing at (sampled every `settle` seconds)."""
    previous = -1
    deadline = asyncio.get_running_loop().time() + limit
    while (current := counter()) != previous and asyncio.get_running_loop().time() < deadline:
        previous = current
        await asyncio.sleep(settle)
    return current


MAX_BUFFERED = 32 * 1024 * 1024  # kernel socket buffers on loopback are a few MiB each


async def test_slow_client_slows_the_upstream_instead_of_filling_memory(backend, proxy):
    sent = 0

    async def firehose(backend, reader, writer):
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
        while sent < 1024**3:
            writer.write(BLOCK)
            await writer.drain()
            sent += len(BLOCK)

    origin = await backend(firehose)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(get("/big"))
        await client.writer.drain()
        stalled_at = await plateau(lambda: sent)  # the client reads nothing meanwhile
        assert 0 < stalled_at < MAX_BUFFERED
        # Reading resumes the flow.
        await client.reader.readexactly(stalled_at)
        assert await plateau(lambda: sent) > stalled_at
    finally:
        await client.close()


async def test_slow_upstream_reader_slows_the_client_upload(backend, proxy):
    backend_reading = asyncio.Event()

    async def sluggish(backend, reader, writer):
        await read_head(reader)
        await backend_reading.wait()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass

    origin = await backend(sluggish)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    uploaded = 0

    async def upload() -> None:
        nonlocal uploaded
        client.writer.write(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1073741824\r\n\r\n")
        while uploaded < 1024**3:
            client.writer.write(BLOCK)
            await client.writer.drain()
            uploaded += len(BLOCK)

    task = asyncio.create_task(upload())
    try:
        stalled_at = await plateau(lambda: uploaded)
        assert 0 < stalled_at < MAX_BUFFERED
        backend_reading.set()
        assert await plateau(lambda: uploaded) > stalled_at
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
        await client.close()


async def test_large_response_arrives_intact(backend, proxy):
    body = bytes(range(256)) * 40000  # ~10 MB, every byte value
    origin = await backend(answering(http_response(body=body)))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        answer = await client.request(get("/blob"))
    finally:
        await client.close()
    assert answer.body == body


async def test_response_headers_reach_the_client_before_the_body_starts(backend, proxy):
    # The proxy sends headers together with the first body bytes when both are at hand; when
    # the body is not there yet, the headers must still go out at once.
    headers_seen = asyncio.Event()

    async def headers_first(backend, reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await headers_seen.wait()
        writer.write(chunk(b"late body") + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    origin = await backend(headers_first)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(get("/slow-body"))
        head = await asyncio.wait_for(read_head(client.reader), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        headers_seen.set()
        rest = await asyncio.wait_for(client.reader.readuntil(b"0\r\n\r\n"), 5)
        assert b"late body" in rest
    finally:
        await client.close()
