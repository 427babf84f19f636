"""Client connections stay open for `listen.keepalive_timeout`; pipelined requests are answered
in order."""

from __future__ import annotations

import asyncio

from tests.support import (
    RawClient,
    RawRequest,
    answering,
    config_dict,
    get,
    http_response,
    read_response,
    upstream,
)


def echo_target(request: RawRequest) -> bytes:
    return http_response(body=request.target.encode())


async def test_pipelined_requests_are_answered_in_order(backend, proxy):
    origin = await backend(answering(echo_target))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(get("/one") + get("/two") + get("/three"))
        bodies = [(await asyncio.wait_for(read_response(client.reader), 5)).body for _ in range(3)]
    finally:
        await client.close()
    assert bodies == [b"/one", b"/two", b"/three"]


async def test_idle_client_connection_is_closed_after_keepalive_timeout(backend, proxy):
    origin = await backend(answering(echo_target))
    server = await proxy(
        config_dict({"app": upstream(origin.url)}, listen={"keepalive_timeout": 0.3})
    )
    client = await RawClient.connect(server.proxy_address[1])
    try:
        assert (await client.request(get("/a"))).body == b"/a"
        await asyncio.sleep(0.1)
        assert (await client.request(get("/b"))).body == b"/b"  # still open
        assert await asyncio.wait_for(client.reader.read(), 3) == b""  # then closed by the proxy
    finally:
        await client.close()
