"""`workers: 2`: worker processes on one port, restarted when they die, with metrics merged."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp

from tests.e2e.test_operations import Running, get_body, named, routes
from tests.support import answering, eventually, upstream


async def pools(session: aiohttp.ClientSession, proxy: Running) -> list[dict]:
    async with session.get(f"http://127.0.0.1:{proxy.admin}/pools") as response:
        return (await response.json())["workers"]


async def spread(session: aiohttp.ClientSession, proxy: Running, count: int) -> None:
    """`count` requests, each on a new connection (SO_REUSEPORT spreads connections)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as fresh:
        answers = await asyncio.gather(*(get_body(fresh, proxy.url("/")) for _ in range(count)))
    assert answers == [(200, b"a")] * count


async def started(tmp_path, upstreams, table, **top) -> Running:
    proxy = Running(tmp_path, upstreams, table, workers=2, **top)
    await asyncio.to_thread(proxy.process.wait_ready)
    return proxy


async def test_two_workers_share_the_port_and_metrics_are_merged(backend, tmp_path):
    a = await backend(answering(named("a")))
    proxy = await started(tmp_path, {"a": upstream(a.url, pool={"limit": 9})}, routes(("a", "/")))
    try:
        async with aiohttp.ClientSession() as session:
            await spread(session, proxy, 40)
            workers = await pools(session, proxy)
            served = [w["upstreams"]["a"]["requests"] for w in workers]
            assert len(workers) == 2 and sum(served) == 40 and all(served)  # both served
            assert len({w["pid"] for w in workers}) == 2
            assert await proxy.metric(session, "proxy_requests_total", route="a", code="200") == 40
            # A configured limit is each worker's, not summed; open connections are summed.
            assert await proxy.metric(session, "proxy_upstream_pool_limit", upstream="a") == 9
            idle = await proxy.metric(
                session, "proxy_upstream_connections", upstream="a", state="idle"
            )
            assert idle == sum(w["upstreams"]["a"]["idle"] for w in workers)
            assert await proxy.metric(session, "proxy_workers") == 2
            assert await proxy.metric(session, "proxy_build_info") == 1
    finally:
        proxy.process.signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr


async def test_a_killed_worker_is_replaced(backend, tmp_path):
    a = await backend(answering(named("a")))
    proxy = await started(tmp_path, {"a": upstream(a.url)}, routes(("a", "/")))
    try:
        async with aiohttp.ClientSession() as session:
            before = await pools(session, proxy)
            os.kill(before[0]["pid"], signal.SIGKILL)

            async def replaced() -> bool:
                now = await pools(session, proxy)
                return now[0]["pid"] != before[0]["pid"] and now[0]["upstreams"] is not None

            await eventually(replaced, within=15)
            assert await proxy.metric(session, "proxy_worker_restarts_total") == 1
            await spread(session, proxy, 20)
            async with session.get(f"http://127.0.0.1:{proxy.admin}/readyz") as ready:
                assert ready.status == 200
    finally:
        proxy.process.signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr
    assert "exited with -9; starting it again" in stderr


async def test_sighup_reaches_every_worker(backend, tmp_path):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    proxy = await started(
        tmp_path, {"a": upstream(a.url), "b": upstream(b.url)}, routes(("a", "/"))
    )
    try:
        proxy.write(
            {"a": upstream(a.url), "b": upstream(b.url)},
            [{"name": "a", "match": {"path_prefix": "/"}, "upstream": "b"}],
            workers=2,
        )
        proxy.process.signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as session:

            async def both_reloaded() -> bool:
                workers = await pools(session, proxy)
                return (
                    all(w["upstreams"] is not None for w in workers)
                    and await proxy.metric(session, "proxy_config_reloads_total", result="success")
                    == 1
                )

            await eventually(both_reloaded, within=10)
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                answers = await asyncio.gather(
                    *(get_body(fresh, proxy.url("/")) for _ in range(20))
                )
            assert answers == [(200, b"b")] * 20
    finally:
        proxy.process.signal(signal.SIGTERM)
        returncode, _ = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0


def test_merge_sums_counters_and_aggregates_each_gauge_by_its_meaning():
    from proxy.workers import merge

    worker = (
        "# TYPE proxy_requests counter\n"
        'proxy_requests_total{{code="200"}} {n}\n'
        "# TYPE proxy_upstream_connections gauge\n"
        'proxy_upstream_connections{{upstream="a",state="idle"}} {n}\n'
        "# TYPE proxy_upstream_pool_limit gauge\n"
        'proxy_upstream_pool_limit{{upstream="a"}} 9\n'
        "# TYPE proxy_upstream_target_up gauge\n"
        'proxy_upstream_target_up{{upstream="a",target="t"}} {up}\n'
        "# TYPE proxy_config_reloads counter\n"
        'proxy_config_reloads_total{{result="success"}} 1\n'
    )
    merged = merge([worker.format(n=3, up=1), worker.format(n=4, up=0)])
    values = {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in merged
        for s in family.samples
    }
    assert values[("proxy_requests_total", '{"code": "200"}')] == 7
    assert values[("proxy_upstream_connections", '{"state": "idle", "upstream": "a"}')] == 7
    assert values[("proxy_upstream_pool_limit", '{"upstream": "a"}')] == 9
    assert values[("proxy_upstream_target_up", '{"target": "t", "upstream": "a"}')] == 0
    assert values[("proxy_config_reloads_total", '{"result": "success"}')] == 1
