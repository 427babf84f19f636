"""Each upstream has its own pool: connections are reused, and `limit` / `limit_per_host` hold
under any concurrency."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support import RawClient, answering, config_dict, exchange, get, http_response, upstream

OK = http_response(body=b"ok")


async def fetch_all(port: int, count: int, concurrency: int) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with limit, session.get(f"http://127.0.0.1:{port}/r{i}") as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(i) for i in range(count)))


async def test_sequential_requests_reuse_one_backend_connection(backend, proxy):
    origin = await backend(answering(OK))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for i in range(200):
            assert (await client.request(get(f"/{i}"))).status == 200
    finally:
        await client.close()
    assert len(origin.requests) == 200
    assert origin.connections == 1


async def test_pool_limit_is_never_exceeded(backend, proxy):
    origin = await backend(answering(OK, delay=0.02))
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 3})}))
    statuses = await fetch_all(server.proxy_address[1], count=60, concurrency=30)
    assert statuses == [200] * 60
    assert origin.max_open == 3


async def test_limit_per_host_holds_for_each_target(backend, proxy):
    first = await backend(answering(OK, delay=0.02))
    second = await backend(answering(OK, delay=0.02))
    settings = {"pool": {"limit": 0, "limit_per_host": 2}}
    server = await proxy(config_dict({"app": upstream(first.url, second.url, **settings)}))
    statuses = await fetch_all(server.proxy_address[1], count=60, concurrency=30)
    assert statuses == [200] * 60
    assert (first.max_open, second.max_open) == (2, 2)
    assert len(first.requests) == len(second.requests) == 30  # round robin


async def test_keepalive_timeout_zero_closes_each_upstream_connection(backend, proxy):
    origin = await backend(answering(OK))
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"keepalive_timeout": 0})}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for _ in range(5):
            assert (await client.request(get())).status == 200
    finally:
        await client.close()
    assert origin.connections == 5
    assert [r.header("Connection") for r in origin.requests] == ["close"] * 5


async def test_idle_pooled_connection_is_dropped_after_keepalive_timeout(backend, proxy):
    origin = await backend(answering(OK))
    server = await proxy(
        config_dict({"app": upstream(origin.url, pool={"keepalive_timeout": 0.5})})
    )
    port = server.proxy_address[1]
    await exchange(port, get(extra="Connection: close\r\n"))
    await asyncio.sleep(0.1)
    await exchange(port, get(extra="Connection: close\r\n"))  # within the timeout: reused
    assert origin.connections == 1
    await asyncio.sleep(1.5)
    await exchange(port, get(extra="Connection: close\r\n"))
    assert origin.connections == 2


async def test_each_upstream_has_its_own_session_with_no_total_timeout(backend, proxy):
    first = await backend(answering(OK))
    second = await backend(answering(OK))
    routes = [
        {"match": {"path_prefix": "/a/"}, "upstream": "a"},
        {"match": {"path_prefix": "/b/"}, "upstream": "b"},
    ]
    server = await proxy(config_dict({"a": upstream(first.url), "b": upstream(second.url)}, routes))
    upstreams = server.current().upstreams
    sessions = {name: u.session for name, u in upstreams.items()}
    assert sessions["a"] is not sessions["b"]
    assert sessions["a"].connector is not sessions["b"].connector
    # aiohttp's default total=300 s would cut every long stream at five minutes.
    assert sessions["a"].timeout.total is None
    for path in ("/a/1", "/b/1", "/a/2", "/b/2"):
        await exchange(server.proxy_address[1], get(path, extra="Connection: close\r\n"))
    assert {name: u.session for name, u in server.current().upstreams.items()} == sessions
    assert (first.connections, second.connections) == (1, 1)
