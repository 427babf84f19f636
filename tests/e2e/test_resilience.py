"""Balancing, health, retries and bounded queues, against fault-injecting raw backends."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random

import aiohttp
import pytest

from tests.support import (
    RawClient,
    admin_get,
    answering,
    closes_idle_after,
    closes_on_reuse,
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
POST = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\ndata"


def named(name: str) -> bytes:
    return http_response(body=name.encode())


async def pools(server) -> dict:
    return json.loads((await admin_get(server, "/pools"))[2])["upstreams"]


async def fetch(port: int, count: int, *, concurrency: int = 1, path: str = "/") -> list[tuple]:
    """(status, body) of `count` GETs, each on a connection of its own."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple:
            async with limit, session.get(f"http://127.0.0.1:{port}{path}") as response:
                return response.status, await response.read()

        return await asyncio.gather(*(one() for _ in range(count)))


# --- the stale keep-alive race ---


@pytest.mark.parametrize("fault", ["closes_idle_after_0.2s", "closes_on_reuse"])
async def test_stale_keepalive_never_reaches_a_client(backend, proxy, fault):
    origin = await backend(
        closes_idle_after(0.2, OK) if fault != "closes_on_reuse" else closes_on_reuse(OK)
    )
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    port = server.proxy_address[1]
    client = await RawClient.connect(port)
    statuses = []
    try:
        for _ in range(15):  # sequential, reusing the pooled connection at the worst moment
            statuses.append((await client.request(get())).status)
            await asyncio.sleep(random.uniform(0.18, 0.22) if fault != "closes_on_reuse" else 0)
    finally:
        await client.close()
    for _ in range(3):  # concurrent: several idle connections go stale at once
        statuses += [status for status, _ in await fetch(port, 10, concurrency=10)]
        await asyncio.sleep(0.21)
    assert statuses == [200] * 45
    stale = (await pools(server))["app"]["stale_connections"]
    if fault == "closes_on_reuse":
        assert stale > 0  # detected and recovered from


async def test_get_after_five_idle_connections_went_stale_together_succeeds(backend, proxy):
    # bench/stale.py's "GET after 5 concurrent", which failed 99/100 before the fix (ef3180c):
    # the retry of a GET that met a stale connection took the next idle one, stale like the
    # first. Closing on reuse is the race at its worst moment, every time: an idle timer
    # (closes_idle_after) is seen by the proxy before the next GET and never reproduces it.
    origin = await backend(closes_on_reuse(OK))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    port = server.proxy_address[1]
    rounds = 50
    five_failed = after_five_failed = 0
    for _ in range(rounds):
        five = await fetch(port, 5, concurrency=5)  # leaves five idle connections, all stale
        five_failed += sum(status != 200 for status, _ in five)
        after_five_failed += (await fetch(port, 1))[0][0] != 200
    assert (after_five_failed, five_failed) == (0, 0), (
        f"GET after five stale connections: {after_five_failed}/{rounds} failed; "
        f"the five themselves: {five_failed}/{5 * rounds}"
    )
    assert origin.max_open >= 5
    # Each GET after five met a stale connection and recovered: the race was run every round.
    assert (await pools(server))["app"]["stale_connections"] >= rounds


async def test_post_on_a_stale_connection_gets_502_and_is_never_replayed(backend, proxy):
    origin = await backend(closes_on_reuse(OK))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        assert (await client.request(get())).status == 200  # leaves an idle connection
        answer = await client.request(POST)
    finally:
        await client.close()
    assert answer.status == 502
    assert [r.method for r in origin.requests] == ["GET"]
    assert (await pools(server))["app"]["retries"] == {}


async def test_connection_announced_idle_timeout_is_retired_before_it_expires(backend, proxy):
    response = http_response(headers=[("Keep-Alive", "timeout=1")], body=b"ok")
    origin = await backend(answering(response))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    port = server.proxy_address[1]
    await exchange(port, get(extra="Connection: close\r\n"))
    await exchange(port, get(extra="Connection: close\r\n"))  # within 0.5 s: reused
    assert origin.connections == 1
    await asyncio.sleep(0.7)  # past timeout - margin (1 - 0.5 s), before the upstream's 1 s
    await exchange(port, get(extra="Connection: close\r\n"))
    assert origin.connections == 2
    state = (await pools(server))["app"]
    assert (state["retired_connections"], state["stale_connections"]) == (1, 0)


# --- retries ---


async def test_refused_target_is_retried_on_another_for_any_method(backend, proxy):
    good = await backend(answering(named("good")))
    refusing = f"http://127.0.0.1:{free_port()}"
    server = await proxy(config_dict({"app": upstream(refusing, good.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        answers = [await client.request(POST) for _ in range(6)]
    finally:
        await client.close()
    assert [(a.status, a.body) for a in answers] == [(200, b"good")] * 6
    assert (await pools(server))["app"]["retries"]["connect"] == 3  # round robin: every other


async def test_attempts_1_never_retries(backend, proxy):
    good = await backend(answering(named("good")))
    refusing = f"http://127.0.0.1:{free_port()}"
    server = await proxy(
        config_dict({"app": upstream(refusing, good.url, retries={"attempts": 1})})
    )
    statuses = [status for status, _ in await fetch(server.proxy_address[1], 4)]
    assert sorted(statuses) == [200, 200, 502, 502]


async def test_reset_before_response_retries_get_but_not_post(backend, proxy):
    async def resets(backend, reader, writer):
        backend.record(await read_request(reader))
        writer.transport.abort()

    broken = await backend(resets)
    good = await backend(answering(named("good")))
    server = await proxy(config_dict({"app": upstream(broken.url, good.url)}))
    port = server.proxy_address[1]
    gets = [await exchange(port, get(extra="Connection: close\r\n")) for _ in range(4)]
    posts = [
        await exchange(port, POST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        for _ in range(4)
    ]
    assert all(g.startswith(b"HTTP/1.1 200") for g in gets)
    assert sorted(p[:12] for p in posts) == [
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 502",
        b"HTTP/1.1 502",
    ]
    assert [r.method for r in broken.requests].count("POST") == 2  # each sent once, no replay


async def test_slow_upstream_times_out_with_504_and_no_retry(backend, proxy):
    async def slow(backend, reader, writer):
        backend.record(await read_request(reader))
        await asyncio.sleep(10)

    first = await backend(slow)
    second = await backend(slow)
    server = await proxy(
        config_dict({"app": upstream(first.url, second.url, timeouts={"read": 0.3})})
    )
    statuses = [status for status, _ in await fetch(server.proxy_address[1], 2)]
    assert statuses == [504, 504]
    assert len(first.requests) + len(second.requests) == 2  # one attempt each


# --- balancing ---


@pytest.mark.parametrize("balance", ["round_robin", "least_requests", "random"])
async def test_weights_are_observed(backend, proxy, balance):
    light = await backend(answering(named("light")))
    heavy = await backend(answering(named("heavy")))
    targets = [light.url, {"url": heavy.url, "weight": 3}]
    server = await proxy(config_dict({"app": {"targets": targets, "balance": balance}}))
    bodies = collections.Counter(
        body for _, body in await fetch(server.proxy_address[1], 400, concurrency=4)
    )
    if balance == "round_robin":
        assert bodies == {b"light": 100, b"heavy": 300}  # smooth WRR is exact
    else:
        assert 0.67 <= bodies[b"heavy"] / 400 <= 0.83  # 0.75 expected; about 3.5 sigma


async def test_least_requests_prefers_the_target_with_fewer_in_flight(backend, proxy):
    release = asyncio.Event()
    slow = await backend(held_until(release, OK))
    fast = await backend(answering(named("fast")))
    server = await proxy(
        config_dict({"app": {"targets": [slow.url, fast.url], "balance": "least_requests"}})
    )
    port = server.proxy_address[1]
    pending = [
        asyncio.create_task(exchange(port, get(extra="Connection: close\r\n"))) for _ in range(3)
    ]
    await slow.received(1)
    results = await fetch(port, 20)  # while `slow` holds a request, `fast` gets the rest
    release.set()
    await asyncio.gather(*pending)
    assert [body for _, body in results].count(b"fast") >= 19


# --- health ---


async def test_active_health_check_takes_a_target_out_and_back(backend, proxy):
    sick = {"now": False}

    def respond(request):
        if request.target == "/healthz":
            return http_response(500 if sick["now"] else 200, "X", body=b"")
        return named("flaky")

    flaky = await backend(answering(respond))
    steady = await backend(answering(named("steady")))
    check = {
        "path": "/healthz",
        "interval": 0.05,
        "timeout": 0.5,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    server = await proxy(config_dict({"app": upstream(flaky.url, steady.url, health_check=check)}))
    port = server.proxy_address[1]

    async def flaky_is(up: bool) -> bool:
        return (await pools(server))["app"]["targets"][0]["up"] is up

    sick["now"] = True
    await eventually(lambda: flaky_is(False))
    assert {body for _, body in await fetch(port, 6)} == {b"steady"}
    samples = (await admin_get(server, "/metrics"))[2]
    assert f'proxy_upstream_target_up{{target="{flaky.url}",upstream="app"}} 0.0' in samples
    sick["now"] = False
    await eventually(lambda: flaky_is(True))
    assert {body for _, body in await fetch(port, 6)} == {b"flaky", b"steady"}
    # Checks use connections of their own, never the request pool's.
    assert (await pools(server))["app"]["connections_created"] == 2


async def test_passive_ejection_after_consecutive_failures(backend, proxy):
    failing = await backend(answering(http_response(502, "Bad Gateway", body=b"no")))
    steady = await backend(answering(named("steady")))
    server = await proxy(
        config_dict(
            {
                "app": upstream(
                    failing.url,
                    steady.url,
                    outlier={"consecutive_failures": 3, "ejection_time": 30},
                )
            }
        )
    )
    results = await fetch(server.proxy_address[1], 12)
    # Round robin sends failing every other request until its third 502 ejects it.
    assert [status for status, _ in results].count(502) == 3
    state = (await pools(server))["app"]["targets"][0]
    assert state["up"] is False and state["ejected_for"] > 25
    samples = (await admin_get(server, "/metrics"))[2]
    line = (
        f'proxy_upstream_ejections_total{{reason="consecutive_failures",'
        f'target="{failing.url}",upstream="app"}} 1.0'
    )
    assert line in samples


async def test_every_target_down_means_panic_mode_not_failure(backend, proxy):
    origin = await backend(
        answering(
            lambda r: http_response(503 if r.target == "/healthz" else 200, "X", body=b"served")
        )
    )
    check = {"interval": 0.05, "unhealthy_threshold": 1}
    server = await proxy(config_dict({"app": upstream(origin.url, health_check=check)}))

    async def down() -> bool:
        return (await pools(server))["app"]["panic"] is True

    await eventually(down)
    assert await fetch(server.proxy_address[1], 3) == [(200, b"served")] * 3
    samples = (await admin_get(server, "/metrics"))[2]
    assert 'proxy_upstream_panic{upstream="app"} 1.0' in samples


async def test_retry_after_rests_the_target(backend, proxy):
    busy = await backend(answering(http_response(503, "Busy", [("Retry-After", "30")], b"busy")))
    steady = await backend(answering(named("steady")))
    server = await proxy(config_dict({"app": upstream(busy.url, steady.url)}))
    results = await fetch(server.proxy_address[1], 6)
    assert results[0] == (503, b"busy")  # passed on as it came, never retried
    assert results[1:] == [(200, b"steady")] * 5
    assert (await pools(server))["app"]["targets"][0]["resting_for"] > 25


# --- bounded queues ---


async def test_max_pending_rejects_at_once_with_503_and_retry_after(backend, proxy):
    release = asyncio.Event()
    origin = await backend(held_until(release, OK))
    server = await proxy(
        config_dict(
            {
                "app": upstream(
                    origin.url, pool={"limit": 2}, max_pending=3, timeouts={"connect": 10}
                )
            }
        )
    )
    port = server.proxy_address[1]
    tasks = [
        asyncio.create_task(exchange(port, get(extra="Connection: close\r\n"))) for _ in range(20)
    ]
    done, _ = await asyncio.wait(tasks, timeout=3)  # the 15 refusals come back at once
    assert len(done) == 15
    assert all(t.result().startswith(b"HTTP/1.1 503 ") for t in done)
    assert all(b"\r\nRetry-After: 1\r\n" in t.result() for t in done)
    release.set()
    answers = await asyncio.gather(*tasks)
    assert sum(a.startswith(b"HTTP/1.1 200 ") for a in answers) == 5
    assert (await pools(server))["app"]["pending_rejected"] == 15


async def test_no_pool_slot_leaks_after_100_aborted_requests(backend, proxy):
    async def slow(backend, reader, writer):
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            await asyncio.sleep(0.5 if request.target == "/slow" else 0)
            writer.write(OK)
            await writer.drain()

    origin = await backend(slow)
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 5})}))
    port = server.proxy_address[1]

    async def abort_one() -> None:
        client = await RawClient.connect(port)
        client.writer.write(get("/slow"))
        await client.writer.drain()
        await asyncio.sleep(0.02)
        client.writer.transport.abort()

    for _ in range(10):
        await asyncio.gather(*(abort_one() for _ in range(10)))

    async def drained() -> bool:
        state = (await pools(server))["app"]
        return state["in_flight"] == 0 and state["active"] == 0 and state["waiting"] == 0

    await eventually(drained)
    answer = await exchange(port, get("/fast", extra="Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    with contextlib.suppress(Exception):
        await server.stop()


async def test_nothing_is_retried_after_the_response_headers_reached_the_client(backend, proxy):
    async def dies_mid_body(backend, reader, writer):
        backend.record(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    broken = await backend(dies_mid_body)
    spare = await backend(answering(named("spare")))
    server = await proxy(config_dict({"app": upstream(broken.url, spare.url)}))
    received = await exchange(server.proxy_address[1], get())
    assert received.startswith(b"HTTP/1.1 200 OK") and b"hello" in received
    assert not received.endswith(b"0\r\n\r\n")  # aborted, not finished
    assert spare.requests == []  # the GET was not made again elsewhere
    assert (await pools(server))["app"]["retries"] == {}
