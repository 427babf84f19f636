"""GET /pools/advice and proxy_upstream_pool_advice from real pools: a backend that closes idle
connections, one that announces its idle timeout, a pool too small for its load, and a
backend_budget that two workers exceed."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import yaml

from proxy.config import parse_config
from proxy.server import ProxyServer
from tests.e2e.test_operations import Running, named, routes
from tests.support import (
    admin_get,
    answering,
    closes_idle_after,
    config_dict,
    eventually,
    http_response,
    metric_value,
    upstream,
)

OK = http_response(body=b"ok")


async def advice(server: ProxyServer, query: str = "") -> dict:
    status, _, body = await admin_get(server, f"/pools/advice{query}")
    assert status == 200, body
    return json.loads(body)


async def fetch_all(port: int, count: int) -> list[int]:
    """`count` requests at once, each on its own client connection."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(f"http://127.0.0.1:{port}/r{i}") as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(i) for i in range(count)))


async def test_keepalive_advice_names_the_idle_age_after_which_the_backend_closes(backend, proxy):
    origin = await backend(closes_idle_after(1.5, OK))
    server = await proxy(config_dict({"app": upstream(origin.url)}))  # keepalive_timeout 30
    pool = server.current().upstreams["app"].connector
    for closed in (1, 2):  # each request's connection sits idle until the backend closes it
        assert await fetch_all(server.proxy_address[1], 1) == [200]
        await eventually(lambda n=closed: pool.closes["remote"] == n, within=4)
    app = (await advice(server))["upstreams"]["app"]
    seen = app["window"]["low_idle_close"]
    assert 1.3 < seen < 2.5 and app["window"]["remote_idle_closes"] == 2
    keepalive = app["advice"]["keepalive_timeout"]
    assert keepalive["action"] == "lower"
    assert 0 < keepalive["value"] <= seen - 0.5
    assert keepalive["reason"].startswith(
        f"keepalive_timeout 30 > {round(seen, 2):g} s after which the upstream was seen "
        "closing idle connections (2 in the last"
    )
    assert keepalive["reason"].endswith(f": use {keepalive['value']:g}")


async def test_keepalive_advice_follows_the_announced_timeout_and_the_gauge_says_it(backend, proxy):
    origin = await backend(answering(http_response(headers=[("Keep-Alive", "timeout=2")])))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    assert await fetch_all(server.proxy_address[1], 1) == [200]
    app = (await advice(server))["upstreams"]["app"]
    assert app["window"]["announced_timeout"] == 2
    assert app["advice"]["keepalive_timeout"] == {
        "action": "lower", "value": 1.0,
        "reason": "keepalive_timeout 30 > the Keep-Alive: timeout=2 the upstream announced: "
                  "use 1",
    }  # fmt: skip
    _, _, exposition = await admin_get(server, "/metrics")
    assert metric_value(
        exposition, "proxy_upstream_pool_advice", upstream="app", setting="keepalive_timeout"
    ) == 1  # fmt: skip


async def test_a_pool_too_small_for_its_load_is_advised_a_higher_limit(backend, proxy):
    origin = await backend(answering(OK, delay=0.1))
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 2})}))
    assert await fetch_all(server.proxy_address[1], 20) == [200] * 20
    app = (await advice(server))["upstreams"]["app"]
    window = app["window"]
    assert window["peak_active"] == 2 and window["acquired"] == 20
    assert window["waits"] >= 10 and window["peak_waiting"] >= 10
    assert 0.3 < window["wait_max"] < 2
    limit = app["advice"]["limit"]
    assert limit["action"] == "raise"
    demand = 2 + window["peak_waiting"]
    assert limit["value"] == -(-demand * 5 // 4)  # peak demand + 25%, rounded up
    assert limit["reason"].startswith(
        f"{window['waits']} waits for a slot (longest {round(window['wait_max'], 2):g} s"
    )
    assert f"with all 2 in use and up to {window['peak_waiting']} waiting" in limit["reason"]
    assert app["advice"]["max_pending"]["action"] == "keep"  # waits stayed within 1 s of 5 s
    assert "budget" not in app
    # The gauge carries the same recommendation.
    _, _, exposition = await admin_get(server, "/metrics")
    assert (
        metric_value(exposition, "proxy_upstream_pool_advice", upstream="app", setting="limit")
        == limit["value"]
    )
    # A shorter window, and one the proxy refuses.
    assert (await advice(server, "?window=30"))["window"] == 30
    status, _, body = await admin_get(server, "/pools/advice?window=601")
    assert (status, body) == (400, "window: must be whole seconds from 1 to 600, got '601'\n")


async def test_the_window_survives_a_reload_that_keeps_the_upstream(backend, tmp_path: Path):
    origin = await backend(answering(http_response(headers=[("Keep-Alive", "timeout=2")])))
    path = tmp_path / "proxy.yaml"
    config = config_dict({"app": upstream(origin.url)})
    path.write_text(yaml.safe_dump(config))
    server = ProxyServer(parse_config(config), config_path=path, shutdown_grace=1.0)
    await server.start()
    try:
        assert await fetch_all(server.proxy_address[1], 1) == [200]
        config["request_id"] = {"header": "X-Trace-Id"}  # a change that keeps the upstream
        path.write_text(yaml.safe_dump(config))
        assert (await server.reload())[0]
        kept = (await advice(server))["upstreams"]["app"]
        assert kept["window"]["announced_timeout"] == 2
        assert kept["advice"]["keepalive_timeout"]["value"] == 1
        # Applying the advice replaces the upstream: its advice starts from its own traffic.
        config["upstreams"]["app"]["pool"] = {"keepalive_timeout": 1}
        path.write_text(yaml.safe_dump(config))
        assert (await server.reload())[0]
        fresh = (await advice(server))["upstreams"]["app"]
        assert fresh["window"]["announced_timeout"] is None
        assert fresh["advice"]["keepalive_timeout"]["action"] == "keep"
    finally:
        await server.stop()


async def test_two_workers_over_the_backend_budget_are_told_so(backend, tmp_path):
    a = await backend(answering(named("a")))
    settings = upstream(a.url, pool={"limit": 2, "backend_budget": 3})
    proxy = Running(tmp_path, {"a": settings}, routes(("a", "/")), workers=2)
    try:
        await asyncio.to_thread(proxy.process.wait_ready)
        for _ in range(6):  # one at a time: no wait for a slot, the budget alone speaks
            assert await fetch_all(proxy.port, 1) == [200]
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.admin_url("/pools/advice")) as response:
                assert response.status == 200
                answer = await response.json()
            async with session.get(proxy.admin_url("/pools/advice?window=0")) as refused:
                assert refused.status == 400
            gauge = await proxy.metric(
                session, "proxy_upstream_pool_advice", upstream="a", setting="limit"
            )
        workers = answer["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        assert all(w["upstreams"] is not None for w in workers)
        peaks = [w["upstreams"]["a"]["window"]["peak_active"] for w in workers]
        a_advice = answer["upstreams"]["a"]
        checked = a_advice["budget"]
        assert (checked["per_replica"], checked["replicas"], checked["exceeded"]) == (4, 0, True)
        assert checked["peak_in_use"] == sum(peaks)  # the backend sees both workers' connections
        assert checked["reason"].startswith(
            "workers 2 x limit 2 = 4 > backend_budget 3: one replica alone may exceed it; "
            "use limit 1"
        )
        limit = a_advice["advice"]["limit"]
        assert (limit["action"], limit["value"]) == ("lower", 1)
        assert limit["reason"].startswith("workers 2 x limit 2 = 4 > backend_budget 3: use 1")
        assert gauge == 1
    finally:
        if proxy.process.proc.poll() is None:
            proxy.process.signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr
