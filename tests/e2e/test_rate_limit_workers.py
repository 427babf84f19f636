"""`workers: 2` with a rate_limit: each worker enforces its share (burst / 2 here), and the
supervisor's proxy_rate_limited_total is the sum of the workers' 429s."""

from __future__ import annotations

import aiohttp

from tests.e2e.test_operations import get_body, named, routes
from tests.e2e.test_workers import started, stopped
from tests.support import answering, upstream


async def test_two_workers_let_through_at_most_the_configured_burst_and_count_every_429(
    backend, tmp_path
):
    origin = await backend(answering(named("a")))
    table = routes(("a", "/"))
    table[0]["rate_limit"] = {"requests_per_second": 0.01, "burst": 4, "key": "route"}
    proxy = await started(tmp_path, {"a": upstream(origin.url)}, table)
    try:
        statuses = []
        for _ in range(12):  # each on a new connection: SO_REUSEPORT spreads them
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                statuses.append((await get_body(fresh, proxy.url("/")))[0])
        passed = statuses.count(200)
        # Each worker's bucket holds 2 (burst 4 / 2 workers): 4 at most, whichever got which.
        assert 2 <= passed <= 4 and statuses.count(429) == 12 - passed
        assert len(origin.requests) == passed
        async with aiohttp.ClientSession() as session:
            limited = await proxy.metric(session, "proxy_rate_limited_total", route="a")
        assert limited == 12 - passed
    finally:
        await stopped(proxy)
