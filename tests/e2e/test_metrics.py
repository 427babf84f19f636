"""Metrics, the pool view and the access log, scraped and read as Prometheus and a user would."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.pool import PoolConnector
from proxy.server import ProxyServer
from tests.support import (
    RawClient,
    admin_get,
    answering,
    config_dict,
    eventually,
    exchange,
    free_port,
    get,
    held_until,
    http_response,
    read_request,
    upstream,
)

OK = http_response(body=b"ok")


async def scrape(server: ProxyServer) -> dict[tuple, float]:
    """Every sample as {(name, (label, value)...): value}."""
    status, _, text = await admin_get(server, "/metrics")
    assert status == 200
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples[(name, *sorted(labels.items()))]


async def two_upstreams(backend, proxy, **top):
    origin = await backend(answering(OK))
    routes = [
        {"name": "a", "match": {"path_prefix": "/a/"}, "upstream": "a"},
        {"name": "down", "match": {"path_prefix": "/down/"}, "upstream": "down"},
    ]
    upstreams = {
        "a": upstream(origin.url, pool={"limit": 7, "limit_per_host": 3}),
        "down": upstream(f"http://127.0.0.1:{free_port()}"),
    }
    return origin, await proxy(config_dict(upstreams, routes, **top))


async def test_every_configured_series_exists_at_zero_from_startup(backend, proxy):
    _, server = await two_upstreams(backend, proxy)
    samples = await scrape(server)
    for route in ("a", "down"):
        assert (
            sample(samples, "proxy_request_duration_seconds_count", route=route, upstream=route)
            == 0
        )
    for name in ("a", "down"):
        for kind in ("connect", "timeout", "reset", "protocol", "client_abort"):
            assert sample(samples, "proxy_upstream_errors_total", upstream=name, kind=kind) == 0
        for state in ("active", "idle"):
            assert sample(samples, "proxy_upstream_connections", upstream=name, state=state) == 0
        assert sample(samples, "proxy_upstream_connections_created_total", upstream=name) == 0
        assert sample(samples, "proxy_upstream_pool_waiting", upstream=name) == 0
        assert sample(samples, "proxy_requests_in_flight", upstream=name) == 0
        assert sample(samples, "proxy_upstream_pool_wait_seconds_count", upstream=name) == 0
        assert sample(samples, "proxy_upstream_response_seconds_count", upstream=name) == 0
    assert sample(samples, "proxy_upstream_pool_limit", upstream="a") == 7
    assert sample(samples, "proxy_upstream_pool_limit_per_host", upstream="a") == 3
    assert sample(samples, "proxy_upstream_pool_limit", upstream="down") == 100
    assert sample(samples, "proxy_client_connections") == 0
    build = [k for k in samples if k[0] == "proxy_build_info"]
    assert len(build) == 1 and samples[build[0]] == 1
    assert {label for label, _ in build[0][1:]} == {"version", "python", "aiohttp"}


async def test_exact_counts_after_a_known_set_of_requests(backend, proxy):
    origin, server = await two_upstreams(backend, proxy)
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for i in range(5):
            assert (await client.request(get(f"/a/{i}"))).status == 200
        for _ in range(2):
            post = b"POST /a/p HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx"
            assert (await client.request(post)).status == 200
        webdav = b"PROPFIND /a/dav HTTP/1.1\r\nHost: h\r\n\r\n"
        assert (await client.request(webdav)).status == 200
        assert (await client.request(get("/nowhere"))).status == 404
        assert (await client.request(get("/down/x"))).status == 502
    finally:
        await client.close()
    samples = await scrape(server)

    def requests(route: str, upstream: str, method: str, code: str) -> float:
        return sample(
            samples,
            "proxy_requests_total",
            route=route,
            upstream=upstream,
            method=method,
            code=code,
        )

    assert requests("a", "a", "GET", "200") == 5
    assert requests("a", "a", "POST", "200") == 2
    assert requests("a", "a", "OTHER", "200") == 1  # unbounded method names are folded
    assert requests("", "", "GET", "404") == 1
    assert requests("down", "down", "GET", "502") == 1
    assert sample(samples, "proxy_request_duration_seconds_count", route="a", upstream="a") == 8
    assert sample(samples, "proxy_upstream_errors_total", upstream="down", kind="connect") == 1
    assert sample(samples, "proxy_upstream_errors_total", upstream="a", kind="connect") == 0
    # One keep-alive connection served all eight: reuse = requests - created = 7.
    assert origin.connections == 1
    assert sample(samples, "proxy_upstream_connections_created_total", upstream="a") == 1
    assert sample(samples, "proxy_upstream_connections", upstream="a", state="idle") == 1
    assert sample(samples, "proxy_upstream_connections", upstream="a", state="active") == 0
    assert sample(samples, "proxy_upstream_response_seconds_count", upstream="a") == 8
    assert sample(samples, "proxy_upstream_pool_wait_seconds_count", upstream="a") == 8
    assert sample(samples, "proxy_upstream_pool_wait_seconds_bucket", upstream="a", le="0.0") == 8


async def test_pool_gauges_show_active_waiting_and_idle_connections_live(backend, proxy):
    release = asyncio.Event()
    origin = await backend(held_until(release, OK))
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 2})}))
    port = server.proxy_address[1]
    tasks = [
        asyncio.create_task(exchange(port, get(f"/{i}", extra="Connection: close\r\n")))
        for i in range(5)
    ]
    await origin.received(2)

    async def three_waiting() -> bool:
        samples = await scrape(server)
        return sample(samples, "proxy_upstream_pool_waiting", upstream="app") == 3

    await eventually(three_waiting)
    samples = await scrape(server)
    assert sample(samples, "proxy_upstream_connections", upstream="app", state="active") == 2
    assert sample(samples, "proxy_upstream_pool_waiting", upstream="app") == 3
    assert sample(samples, "proxy_requests_in_flight", upstream="app") == 5
    assert sample(samples, "proxy_client_connections") == 5
    pools = json.loads((await admin_get(server, "/pools"))[2])["upstreams"]["app"]
    target = {
        "url": origin.url,
        "discovered_from": None,
        "weight": 1,
        "effective_weight": 1.0,
        "up": True,
        "healthy": True,
        "ejected_for": 0.0,
        "resting_for": 0.0,
    }
    assert pools["targets"] == [{**target, "in_flight": 5, "active": 2, "idle": 0}]
    assert (pools["waiting"], pools["in_flight"], pools["limit"]) == (3, 5, 2)

    release.set()
    assert all(answer.endswith(b"ok") for answer in await asyncio.gather(*tasks))
    samples = await scrape(server)
    assert sample(samples, "proxy_upstream_connections", upstream="app", state="active") == 0
    assert sample(samples, "proxy_upstream_connections", upstream="app", state="idle") == 2
    assert sample(samples, "proxy_upstream_pool_waiting", upstream="app") == 0
    assert sample(samples, "proxy_upstream_connections_created_total", upstream="app") == 2
    waits = sample(samples, "proxy_upstream_pool_wait_seconds_count", upstream="app")
    no_wait = sample(samples, "proxy_upstream_pool_wait_seconds_bucket", upstream="app", le="0.0")
    assert (waits, no_wait) == (5, 2)  # three requests waited for a slot
    pools = json.loads((await admin_get(server, "/pools"))[2])["upstreams"]["app"]
    assert pools["targets"] == [{**target, "in_flight": 0, "active": 0, "idle": 2}]
    assert (pools["connections_created"], pools["requests"], pools["reuse_ratio"]) == (2, 5, 0.6)


async def test_client_that_goes_away_first_is_counted_as_499_and_client_abort(backend, proxy):
    async def never(backend, reader, writer):
        backend.record(await read_request(reader))
        await reader.read()

    origin = await backend(never)
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    client.writer.write(get("/slow"))
    await origin.received(1)
    client.writer.transport.abort()

    async def counted() -> bool:
        samples = await scrape(server)
        labels = {"route": "/", "upstream": "app", "method": "GET", "code": "499"}
        return samples.get(("proxy_requests_total", *sorted(labels.items()))) == 1

    await eventually(counted)
    samples = await scrape(server)
    assert sample(samples, "proxy_upstream_errors_total", upstream="app", kind="client_abort") == 1
    assert sample(samples, "proxy_requests_in_flight", upstream="app") == 0


async def test_malformed_requests_are_counted(backend, proxy):
    _, server = await two_upstreams(backend, proxy)
    await exchange(server.proxy_address[1], b"NONSENSE\r\n\r\n")
    samples = await scrape(server)
    assert (
        sample(samples, "proxy_requests_total", route="", upstream="", method="OTHER", code="400")
        == 1
    )


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(backend, proxy):
    _, server = await two_upstreams(backend, proxy)
    accept = "application/openmetrics-text; version=1.0.0"
    status, content_type, text = await admin_get(server, "/metrics", Accept=accept)
    assert (status, content_type) == (200, "application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "proxy_upstream_connections_created_total" in text


async def test_the_aiohttp_internals_the_proxy_relies_on_are_there():
    """listener.py and pool.py override or read aiohttp internals: if a release moves one,
    the proxy refuses to start (a pool gauge stuck at 0 or a lost retry switch would be silent)."""
    from proxy.internals import check_aiohttp

    await check_aiohttp()
    connector = PoolConnector()
    session = aiohttp.ClientSession(connector=connector)
    try:
        # aiohttp's own silent retry, which Upstream switches off (retries are the proxy's)
        assert session._retry_connection is True
    finally:
        await session.close()


async def test_a_moved_aiohttp_internal_stops_start_up_naming_the_version():
    from proxy.internals import AiohttpMoved, check_aiohttp

    table = (("TCPConnector", aiohttp.TCPConnector, ("_create_connection", "_renamed_in_4")),)
    with pytest.raises(AiohttpMoved, match=rf"aiohttp {aiohttp.__version__} lacks "
                       r"TCPConnector\._renamed_in_4"):  # fmt: skip
        await check_aiohttp(table)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_access_log_has_one_line_per_request(backend, fmt):
    origin = await backend(answering(http_response(body=b"12345")))
    stream = io.StringIO()
    config = parse_config(
        config_dict(
            {"app": upstream(origin.url)},
            [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "app"}],
            access_log={"format": fmt},
        )
    )
    server = ProxyServer(config, shutdown_grace=1, access_log_stream=stream)
    await server.start()
    try:
        client = await RawClient.connect(server.proxy_address[1])
        try:
            await client.request(get("/one%2F?q=1"))
            await client.request(get("/two"))
        finally:
            await client.close()
    finally:
        await server.stop()  # flushes the log
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "text":
        assert '"GET /one%2F?q=1" 200 5 ' in lines[0]
        assert "route=r upstream=app" in lines[0] and "reused=false" in lines[0]
        assert "reused=true" in lines[1]
        return
    first, second = (json.loads(line) for line in lines)
    assert first["time"].endswith("Z")
    assert (first["client"], first["method"], first["target"]) == (
        "127.0.0.1",
        "GET",
        "/one%2F?q=1",
    )
    assert (first["status"], first["bytes"], first["route"], first["upstream"]) == (
        200,
        5,
        "r",
        "app",
    )
    assert first["upstream_target"] == origin.url
    assert first["duration"] >= first["upstream_duration"] > 0
    assert (first["reused"], second["reused"]) == (False, True)
    assert first["error"] is None


async def test_access_log_can_be_switched_off(backend):
    origin = await backend(answering(OK))
    stream = io.StringIO()
    config = parse_config(config_dict({"app": upstream(origin.url)}, access_log={"enabled": False}))
    server = ProxyServer(config, shutdown_grace=1, access_log_stream=stream)
    await server.start()
    try:
        await exchange(server.proxy_address[1], get(extra="Connection: close\r\n"))
    finally:
        await server.stop()
    assert stream.getvalue() == ""
    assert server.access_log is None
