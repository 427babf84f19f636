"""Connection lifetime (issue 12): max_requests, max_age with jitter, min_idle warm connections,
every close counted once under its reason, and the per-connection view.

Most tests drive the PoolConnector through a real aiohttp ClientSession against raw backends on
127.0.0.1 (real sockets; nothing mocked), as upstream.py builds it. The last ones go through
the real ProxyServer and its config (`upstreams.X.pool`), so they also check the wiring.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.pool import ACQUISITION, CLOSE_REASONS, Acquisition, PoolConnector, take_upgraded
from tests.dns import DnsServer
from tests.support import (
    RawBackend,
    RawClient,
    admin_get,
    answering,
    closes_idle_after,
    closes_on_reuse,
    config_dict,
    eventually,
    get,
    held_until,
    http_response,
    read_request,
    upstream,
)

BackendFactory = Callable[..., Awaitable[RawBackend]]
OK = http_response(body=b"ok")


def no_closes(**counts: int) -> dict[str, int]:
    """The expected `closes`: zero for every reason but those given."""
    return {**dict.fromkeys(CLOSE_REASONS, 0), **counts}


@asynccontextmanager
async def pool(**settings: Any) -> AsyncIterator[tuple[PoolConnector, aiohttp.ClientSession]]:
    """A PoolConnector in a ClientSession configured as upstream.py configures its own."""
    connector = PoolConnector(name="t", **settings)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=2, sock_read=5),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    session._retry_connection = False  # as the proxy: no hidden retry on a stale connection
    try:
        yield connector, session
    finally:
        await session.close()


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, Acquisition]:
    acquisition = Acquisition()
    ACQUISITION.set(acquisition)
    async with session.get(url) as response:
        return response.status, await response.read(), acquisition


def by_peer(ports: list[int], response: bytes = OK) -> Any:
    """A keep-alive backend that records the client port of each request's connection."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        port = writer.get_extra_info("peername")[1]
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            ports.append(port)
            writer.write(response)
            await writer.drain()

    return handler


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


# --- max_requests ---


async def test_max_requests_closes_a_connection_after_its_last_response(backend):
    ports: list[int] = []
    origin = await backend(by_peer(ports))
    async with pool(max_requests=3) as (connector, session):
        for _ in range(7):
            assert (await fetch(session, origin.url))[:2] == (200, b"ok")
        await until(lambda: origin.open == 1)
        assert origin.connections == 3
        assert ports == [ports[0]] * 3 + [ports[3]] * 3 + [ports[6]]
        assert len(set(ports)) == 3
        assert connector.closes == no_closes(max_requests=2)
        assert [c["requests"] for c in connector.connections()] == [1]
    assert connector.closes == no_closes(max_requests=2, shutdown=1)


# --- max_age ---


async def test_max_age_is_jittered_per_connection_and_an_expired_idle_one_is_not_reused(backend):
    origin = await backend(answering(OK))
    async with pool(max_age=0.3, rng=random.Random(7)) as (connector, session):
        _, _, first = await fetch(session, origin.url)
        protocol = first.protocol
        assert protocol is not None
        expected = random.Random(7).uniform(0.9, 1.1) * 0.3
        lifetime = protocol.expires - protocol.opened  # type: ignore[attr-defined]
        assert lifetime == pytest.approx(expected, abs=1e-9)
        assert 0.27 <= lifetime <= 0.33
        _, _, second = await fetch(session, origin.url)  # still young: reused
        assert (second.reused, origin.connections) == (True, 1)
        await asyncio.sleep(lifetime + 0.05)
        _, _, third = await fetch(session, origin.url)
        assert (third.reused, origin.connections) == (False, 2)
        await until(lambda: origin.open == 1)
        assert connector.closes == no_closes(max_age=1)


async def test_jitter_spreads_max_age_over_ninety_to_one_hundred_ten_percent(backend):
    origin = await backend(answering(OK, delay=0.05))
    async with pool(max_age=100, rng=random.Random(3)) as (_, session):
        results = await asyncio.gather(*(fetch(session, origin.url) for _ in range(20)))
        ages = [r[2].protocol.expires - r[2].protocol.opened for r in results]  # type: ignore[union-attr]
    rng = random.Random(3)
    expected = sorted(rng.uniform(0.9, 1.1) * 100 for _ in range(20))
    assert sorted(ages) == pytest.approx(expected, abs=1e-6)
    assert all(90 <= age <= 110 for age in ages)
    assert max(ages) - min(ages) > 5  # jittered, not one deadline for all


async def test_an_active_connection_past_max_age_finishes_its_response_first(backend):
    origin = await backend(answering(http_response(body=b"x" * 1000), delay=0.4))
    async with pool(max_age=0.1, rng=random.Random(1)) as (connector, session):
        status, body, _ = await fetch(session, origin.url)
        assert (status, body) == (200, b"x" * 1000)
        await until(lambda: origin.open == 0)
        assert connector.closes == no_closes(max_age=1)
        assert connector.connections() == []


async def test_the_sweep_closes_idle_connections_past_max_age_without_a_request(backend):
    origin = await backend(answering(OK))
    async with pool(max_age=0.2, rng=random.Random(2)) as (connector, session):
        connector.start_warming(list, 0, interval=0.05)
        await fetch(session, origin.url)
        assert origin.open == 1
        await until(lambda: origin.open == 0)
        assert connector.closes == no_closes(max_age=1)
        assert len(origin.requests) == 1
        await connector.stop_warming()


# --- min_idle ---


async def test_min_idle_opens_warm_connections_to_every_target_before_any_request(backend):
    first = await backend(answering(OK))
    second = await backend(answering(OK))
    targets = [(first.url, None), (second.url, None)]
    async with pool(limit=10) as (connector, session):
        connector.start_warming(lambda: targets, 2, interval=0.05)
        await until(lambda: first.connections == 2 and second.connections == 2)
        await asyncio.sleep(0.2)  # several more rounds: still exactly two each
        assert (first.connections, second.connections) == (2, 2)
        assert first.requests == second.requests == []
        states = sorted((c["target"], c["state"], c["requests"]) for c in connector.connections())
        assert states == sorted(
            [(f"127.0.0.1:{b.port}", "idle", 0) for b in (first, second) for _ in range(2)]
        )
        # A warm connection sat idle in the pool like any other: reused from its first
        # request on (it can go stale the same way); aiohttp hands out the longest idle first.
        await connector.stop_warming()  # a round during a request would open a third one
        reused = [(await fetch(session, first.url))[2].reused for _ in range(3)]
        assert reused == [True, True, True]
        assert first.connections == 2
        assert connector.created == 4
    assert connector.closes == no_closes(shutdown=4)


async def test_min_idle_never_opens_beyond_the_pool_limit(backend):
    first = await backend(answering(OK))
    second = await backend(answering(OK))
    targets = [(first.url, None), (second.url, None)]
    async with pool(limit=3) as (connector, _):
        connector.start_warming(lambda: targets, 2, interval=0.02)
        await until(lambda: first.connections + second.connections == 3)
        await asyncio.sleep(0.2)
        assert (first.connections, second.connections) == (2, 1)  # targets in order
        assert first.max_open + second.max_open == 3


async def test_min_idle_never_opens_beyond_limit_per_host(backend):
    first = await backend(answering(OK))
    second = await backend(answering(OK))
    targets = [(first.url, None), (second.url, None)]
    async with pool(limit=0, limit_per_host=1) as (connector, _):
        connector.start_warming(lambda: targets, 3, interval=0.02)
        await until(lambda: first.connections + second.connections == 2)
        await asyncio.sleep(0.2)
        assert (first.connections, second.connections) == (1, 1)


async def test_min_idle_replaces_a_warm_connection_the_upstream_closed(backend):
    origin = await backend(closes_idle_after(0.15, OK))
    async with pool() as (connector, _):
        connector.start_warming(lambda: [(origin.url, None)], 1, interval=0.05)
        await until(lambda: origin.connections >= 3)  # opened, closed by the upstream, again
        assert connector.closes["remote"] >= 2
        assert origin.requests == []


async def test_a_target_that_refuses_connections_is_logged_once_and_warming_goes_on(
    backend, caplog
):
    origin = await backend(answering(OK))
    dead = await backend(answering(OK))
    dead_url = dead.url
    await dead.stop()  # nothing listens there now
    async with pool() as (connector, _):
        connector.start_warming(lambda: [(dead_url, None), (origin.url, None)], 1, interval=0.02)
        await until(lambda: origin.connections == 1)
        await asyncio.sleep(0.15)
    lines = [r for r in caplog.records if "cannot open a warm connection" in r.getMessage()]
    assert len(lines) == 1
    assert dead_url in lines[0].getMessage()


def idle_closer(idle: float) -> Any:
    """A backend whose idle timer fires as a request arrives: a request that comes on a
    connection idle for more than `idle` s is read, then the connection closes unanswered."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        last = time.monotonic()
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            if time.monotonic() - last > idle:
                return
            writer.write(OK)
            await writer.drain()
            last = time.monotonic()

    return handler


async def test_a_warm_connection_closed_by_the_upstream_as_it_is_used_is_stale(backend):
    origin = await backend(idle_closer(0.2))
    async with pool() as (connector, session):
        connector.start_warming(lambda: [(origin.url, None)], 1, interval=10)
        await until(lambda: connector._idle_count() == 1)
        await asyncio.sleep(0.4)  # the upstream's idle timer has run out
        acquisition = Acquisition()
        ACQUISITION.set(acquisition)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.get(origin.url):
                pass  # pragma: no cover - no response comes
        assert (acquisition.reused, len(origin.requests)) == (True, 1)
        await until(lambda: sum(connector.closes.values()) == 1)
        assert connector.closes == no_closes(stale=1)
        _, _, fresh = await fetch(session, origin.url)  # opened for this request: not reused
        assert (fresh.reused, origin.connections) == (False, 2)
        await connector.stop_warming()


@pytest.mark.parametrize(
    ("settings", "interval"),
    [({"force_close": True}, 0.05), ({"keepalive_timeout": 0.1}, 0.1),
     ({"keepalive_timeout": 0.1}, 0.2)],
)  # fmt: skip
async def test_min_idle_is_ignored_when_no_idle_connection_outlives_a_round(
    backend, caplog, settings, interval
):
    origin = await backend(answering(OK))
    async with pool(**settings) as (connector, _):
        with caplog.at_level(logging.WARNING, logger="proxy"):
            connector.start_warming(lambda: [(origin.url, None)], 2, interval=interval)
        await asyncio.sleep(interval * 5)
        assert (origin.connections, connector.created) == (0, 0)
        assert connector.closes == no_closes()
    lines = [r.getMessage() for r in caplog.records if "pool.min_idle ignored" in r.getMessage()]
    assert len(lines) == 1
    assert f"set pool.keepalive_timeout above {interval:g} s" in lines[0]


async def test_min_idle_warms_when_keepalive_timeout_outlives_a_round(backend):
    origin = await backend(answering(OK))
    async with pool(keepalive_timeout=0.5) as (connector, _):
        connector.start_warming(lambda: [(origin.url, None)], 2, interval=0.05)
        await until(lambda: origin.connections == 2)
        await asyncio.sleep(0.2)
        assert (origin.connections, origin.open) == (2, 2)


# --- every close counted once, under its reason ---


async def test_idle_timeout_counts_the_keepalive_cleanup(backend):
    origin = await backend(answering(OK))
    async with pool(keepalive_timeout=0.1) as (connector, session):
        await fetch(session, origin.url)
        await until(lambda: origin.open == 0)
        assert connector.closes == no_closes(idle_timeout=1)


async def test_idle_timeout_counts_force_close_after_each_response(backend):
    origin = await backend(answering(OK))
    async with pool(force_close=True) as (connector, session):
        for _ in range(3):
            await fetch(session, origin.url)
        await until(lambda: origin.open == 0)
        assert connector.closes == no_closes(idle_timeout=3)


async def test_keepalive_hint_counts_a_connection_past_the_announced_timeout(backend):
    origin = await backend(answering(http_response(headers=[("Keep-Alive", "timeout=1")])))
    async with pool() as (connector, session):
        _, _, first = await fetch(session, origin.url)
        assert first.protocol is not None
        connector.retire_after(first.protocol, 1.0)  # what Upstream.answered() does
        await asyncio.sleep(0.55)  # past timeout minus its margin (0.5 s)
        _, _, second = await fetch(session, origin.url)
        assert (second.reused, origin.connections, connector.retired) == (False, 2, 1)
        await until(lambda: origin.open == 1)
        assert connector.closes == no_closes(keepalive_hint=1)


async def test_remote_counts_an_idle_connection_the_upstream_closed(backend):
    origin = await backend(closes_idle_after(0.1, OK))
    async with pool() as (connector, session):
        await fetch(session, origin.url)
        await until(lambda: connector.closes["remote"] == 1)
        assert connector.closes == no_closes(remote=1)


async def test_remote_counts_a_response_that_said_connection_close(backend):
    origin = await backend(answering(http_response(headers=[("Connection", "close")], body=b"k")))
    async with pool() as (connector, session):
        for _ in range(2):
            assert (await fetch(session, origin.url))[:2] == (200, b"k")
        await until(lambda: connector.closes["remote"] == 2)
        assert connector.closes == no_closes(remote=2)


async def test_stale_counts_a_reused_connection_dead_before_its_response(backend):
    origin = await backend(closes_on_reuse(OK))
    async with pool() as (connector, session):
        await fetch(session, origin.url)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(session, origin.url)
        await until(lambda: sum(connector.closes.values()) == 1)
        assert connector.closes == no_closes(stale=1)


async def test_error_counts_a_connection_reset_mid_body(backend):
    async def cut(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backend.record(await read_request(reader))  # type: ignore[arg-type]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.transport.abort()

    origin = await backend(cut)
    async with pool() as (connector, session):
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch(session, origin.url)
        await until(lambda: sum(connector.closes.values()) == 1)
        assert connector.closes == no_closes(error=1)


async def test_error_counts_stray_bytes_on_an_idle_connection(backend):
    async def chatty(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backend.record(await read_request(reader))  # type: ignore[arg-type]
        writer.write(OK)
        await asyncio.sleep(0.1)
        writer.write(OK)  # answers no request
        await reader.read()

    origin = await backend(chatty)
    async with pool() as (connector, session):
        await fetch(session, origin.url)
        await until(lambda: sum(connector.closes.values()) == 1)
        assert connector.closes == no_closes(error=1)
        assert connector.discarded == {"unsolicited_data": 1}


async def test_close_target_closes_idle_now_and_active_after_its_response(backend):
    release = asyncio.Event()
    held = await backend(held_until(release, OK))
    other = await backend(answering(OK))
    async with pool() as (connector, session):
        release.set()
        await asyncio.gather(fetch(session, held.url), fetch(session, held.url))  # two idle
        release.clear()
        busy = asyncio.ensure_future(fetch(session, held.url))  # one of them, active
        await held.received(3)
        await fetch(session, other.url)
        connector.close_target("127.0.0.1", held.port)
        await until(lambda: held.open == 1)  # the idle one, at once
        assert connector.closes == no_closes(reload=1)
        release.set()
        status, body, _ = await busy  # the active one answers in full, then closes
        assert (status, body) == (200, b"ok")
        await until(lambda: held.open == 0)
        assert connector.closes == no_closes(reload=2)
        assert [c["target"] for c in connector.connections()] == [f"127.0.0.1:{other.port}"]
    assert connector.closes == no_closes(reload=2, shutdown=1)


async def test_a_connection_opened_to_a_target_after_it_left_closes_after_its_response(backend):
    release = asyncio.Event()
    held = await backend(held_until(release, OK))
    async with pool(limit=1) as (connector, session):
        first = asyncio.ensure_future(fetch(session, held.url))
        await held.received(1)
        queued = asyncio.ensure_future(fetch(session, held.url))  # waits for the only slot
        await until(lambda: connector.waiting == 1)
        connector.close_target("127.0.0.1", held.port)
        release.set()
        assert [(await r)[:2] for r in (first, queued)] == [(200, b"ok")] * 2
        assert held.connections == 2  # the queued one opened a new connection to it...
        await until(lambda: held.open == 0)  # ...which closes after its response
        assert connector.closes == no_closes(reload=2)
        assert connector.connections() == []
        connector.target_back("127.0.0.1", held.port)  # discovery found it again
        assert (await fetch(session, held.url))[2].reused is False
        assert (await fetch(session, held.url))[2].reused is True  # pooled as usual
        assert (held.connections, held.open) == (3, 1)
        assert connector.closes == no_closes(reload=2)


async def test_a_target_that_left_is_forgotten_once_no_connection_to_it_can_be_opened(backend):
    """Addresses discovery drops and never sees again (a pod's) must not pile up: past
    remember_gone (upstream.py: gone_for(timeouts.connect)) nothing that chose one before it
    left can still connect, and a connection to it is pooled as any other."""
    origin = await backend(answering(OK))
    async with pool(remember_gone=0.2) as (connector, session):
        connector.close_target("127.0.0.1", origin.port)
        assert (await fetch(session, origin.url))[:2] == (200, b"ok")
        await until(lambda: origin.open == 0)  # opened after it left: closed after its response
        assert connector.closes == no_closes(reload=1)
        await asyncio.sleep(0.3)
        for i in range(1000):  # a thousand pods come and go
            connector.close_target(f"10.0.{i // 256}.{i % 256}", 8080)
        assert len(connector._gone) == 1000  # 127.0.0.1 forgotten: it left 0.3 s ago
        assert (await fetch(session, origin.url))[2].reused is False
        assert (await fetch(session, origin.url))[2].reused is True  # pooled as usual
        await asyncio.sleep(0.3)
        connector.close_target("10.1.0.0", 8080)
        assert len(connector._gone) == 1
        assert connector.closes == no_closes(reload=1)


async def test_a_connection_opened_as_its_target_left_closes_even_if_it_is_forgotten_meanwhile(
    backend,
):
    """Decided when it opens, not at its release: a response that outlasts remember_gone
    (a stream, a long poll) would otherwise leave it pooled to an address that is gone."""
    gates = {"/first": asyncio.Event(), "/queued": asyncio.Event()}

    async def gated(held: RawBackend, reader: Any, writer: Any) -> None:
        while (request := await read_request(reader)) is not None:
            held.record(request)
            await gates[request.target].wait()
            writer.write(OK)
            await writer.drain()

    held = await backend(gated)
    async with pool(limit=1, remember_gone=0.2) as (connector, session):
        first = asyncio.ensure_future(fetch(session, held.url + "/first"))
        await held.received(1)
        queued = asyncio.ensure_future(fetch(session, held.url + "/queued"))  # picked it
        await until(lambda: connector.waiting == 1)
        connector.close_target("127.0.0.1", held.port)
        gates["/first"].set()
        await held.received(2)  # the queued request opened a new connection to it
        await asyncio.sleep(0.3)  # its response outlasts remember_gone...
        connector.close_target("10.0.0.1", 8080)  # ...and the next departure forgets it
        gates["/queued"].set()
        assert [(await r)[:2] for r in (first, queued)] == [(200, b"ok")] * 2
        await until(lambda: held.open == 0)  # on 4a21537: pooled, idle, to a gone target
        assert connector.closes == no_closes(reload=2)
        assert connector.connections() == []


async def test_a_warming_round_asks_again_whether_a_target_is_still_there(backend):
    """A round that took its list before a target left, and (slowed by targets that time out)
    outlasts _gone's memory of it, must not warm it: after a departure the list is asked
    again. Here the memory is 0 s and the departure comes right after the list is taken."""
    gone = await backend(answering(OK))
    stays = await backend(answering(OK))
    lists = 0

    async with pool(remember_gone=0) as (connector, _):

        def targets() -> list[tuple[str, str | None]]:
            nonlocal lists
            lists += 1
            if lists > 1:
                return [(stays.url, None)]
            connector.close_target("127.0.0.1", gone.port)  # leaves as the list is taken...
            connector.close_target("10.0.0.1", 8080)  # ...and is forgotten at the next
            return [(gone.url, None), (stays.url, None)]

        connector.start_warming(targets, 1, interval=0.02)
        await until(lambda: stays.connections == 1)
        await until(lambda: lists > 3)  # a few rounds more
        assert gone.connections == 0  # on 4a21537: 1, pooled
        await connector.stop_warming()


async def test_warming_goes_on_when_the_upstreams_list_fails(backend):
    """Asking the list again is guarded as the first ask is: logged, never the task's end."""
    origin = await backend(answering(OK))
    lists = 0

    async with pool() as (connector, _):

        def targets() -> list[tuple[str, str | None]]:
            nonlocal lists
            lists += 1
            if lists == 1:
                connector.close_target("10.0.0.1", 8080)  # a departure: the list is asked again
                return [(origin.url, None)]
            if lists == 2:
                raise RuntimeError("the upstream's list, once")
            return [(origin.url, None)]

        connector.start_warming(targets, 1, interval=0.02)
        await until(lambda: origin.connections == 1)  # warmed on a later round
        assert lists >= 3
        await connector.stop_warming()


async def test_warming_opens_nothing_to_a_target_that_left(backend):
    gone = await backend(answering(OK))
    stays = await backend(answering(OK))
    targets = [(gone.url, None), (stays.url, None)]  # a list one discovery round late
    async with pool() as (connector, _):
        connector.close_target("127.0.0.1", gone.port)
        connector.start_warming(lambda: targets, 1, interval=0.02)
        await until(lambda: stays.connections == 1)
        await asyncio.sleep(0.1)
        assert (gone.connections, stays.connections) == (0, 1)
        connector.target_back("127.0.0.1", gone.port)
        await until(lambda: gone.connections == 1)
        assert (gone.open, connector.closes) == (1, no_closes())
        await connector.stop_warming()


async def test_close_all_counts_every_connection_once_under_its_reason(backend):
    release = asyncio.Event()
    origin = await backend(held_until(release, OK))
    async with pool() as (connector, session):
        release.set()
        await asyncio.gather(*(fetch(session, origin.url) for _ in range(3)))
        release.clear()
        busy = asyncio.ensure_future(fetch(session, origin.url))
        await origin.received(4)
        await connector.close_all("reload")
        await until(lambda: origin.open == 1)
        assert connector.closes == no_closes(reload=2)
        release.set()
        assert (await busy)[:2] == (200, b"ok")
        await until(lambda: origin.open == 0)
    assert connector.closes == no_closes(reload=3)


async def test_session_close_counts_idle_and_active_connections_as_shutdown(backend):
    origin = await backend(held_until(asyncio.Event(), OK))
    connector: PoolConnector
    async with pool() as (connector, session):
        busy = asyncio.ensure_future(fetch(session, origin.url))
        await origin.received(1)
        connector.start_warming(lambda: [(origin.url, None)], 1, interval=0.02)
        await until(lambda: origin.connections == 2)
    with pytest.raises(aiohttp.ClientError):
        await busy
    assert connector.closes == no_closes(shutdown=2)


async def test_an_upgraded_connection_leaves_the_pool_uncounted(backend):
    async def upgrades(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backend.record(await read_request(reader))  # type: ignore[arg-type]
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: echo\r\n\r\n")  # fmt: skip
        await writer.drain()
        await reader.read()

    origin = await backend(upgrades)
    async with pool(limit=0, force_close=True) as (connector, session):
        headers = {"Connection": "Upgrade", "Upgrade": "echo"}
        async with session.get(origin.url, headers=headers) as response:
            assert response.status == 101
            transport, _ = take_upgraded(response, asyncio.Protocol())
        transport.close()
        await until(lambda: origin.open == 0)
        assert connector.closes == no_closes()


# --- the per-connection view ---


async def test_connections_describes_each_open_connection(backend):
    release = asyncio.Event()
    ports: list[int] = []
    origin = await backend(by_peer(ports))
    slow = await backend(held_until(release, OK))
    async with pool() as (connector, session):
        for _ in range(2):
            await fetch(session, origin.url)
        busy = asyncio.ensure_future(fetch(session, slow.url))
        await slow.received(1)
        await asyncio.sleep(0.05)
        active, idle = connector.connections()
        assert set(idle) == {"target", "local_port", "age", "requests", "state", "idle_since"}
        assert idle["target"] == f"127.0.0.1:{origin.port}"
        assert idle["local_port"] == ports[0]
        assert (idle["requests"], idle["state"]) == (2, "idle")
        assert 0.04 <= idle["idle_since"] <= idle["age"] < 2
        assert active["target"] == f"127.0.0.1:{slow.port}"
        assert (active["requests"], active["state"], active["idle_since"]) == (1, "active", None)
        assert isinstance(active["local_port"], int)
        assert round(active["age"], 3) == active["age"]
        release.set()
        await busy


# --- through the real proxy (needs upstream.py's pool wiring and admin.py's view) ---


def _pool_config(origin: RawBackend, **pool_settings: Any) -> dict[str, Any]:
    return config_dict({"app": upstream(origin.url, pool=pool_settings)})


async def test_proxy_closes_each_upstream_connection_after_max_requests(backend, proxy):
    ports: list[int] = []
    origin = await backend(by_peer(ports))
    server = await proxy(_pool_config(origin, max_requests=3))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for i in range(7):
            assert (await client.request(get(f"/{i}"))).status == 200
    finally:
        await client.close()
    assert origin.connections == 3
    assert len(set(ports)) == 3
    connector = server.current().upstreams["app"].connector
    await until(lambda: connector.closes["max_requests"] == 2)
    assert connector.closes == no_closes(max_requests=2)


async def test_proxy_keeps_min_idle_warm_connections_and_lists_them(backend, proxy):
    first = await backend(answering(OK))
    second = await backend(answering(OK))
    pool_settings = {"min_idle": 2, "limit": 10}
    server = await proxy(config_dict({"app": upstream(first.url, second.url, pool=pool_settings)}))
    await until(lambda: (first.connections, second.connections) == (2, 2))
    assert first.requests == second.requests == []
    status, _, body = await admin_get(server, "/pools?connections=1")
    assert status == 200
    listed = json.loads(body)["upstreams"]["app"]["connections"]
    assert sorted((c["target"], c["state"]) for c in listed) == sorted(
        [(f"127.0.0.1:{b.port}", "idle") for b in (first, second) for _ in range(2)]
    )


async def _pool_view(server: Any, query: str = "") -> dict[str, Any]:
    status, _, body = await admin_get(server, "/pools" + query)
    assert status == 200
    view: dict[str, Any] = json.loads(body)["upstreams"]["svc"]
    return view


async def test_proxy_closes_a_queued_requests_connection_to_a_drained_target(backend, proxy):
    release = asyncio.Event()
    one = await backend(held_until(release, http_response(body=b"one")))
    two = RawBackend(answering(http_response(body=b"two")))
    try:  # the same port on 127.0.0.2: the address discovery moves the name to
        two.server = await asyncio.start_server(two._serve, "127.0.0.2", one.port)
    except OSError:
        pytest.skip("that port is taken on 127.0.0.2")
    try:
        async with DnsServer() as dns:
            dns.set_a("svc.test", ["127.0.0.1"])
            server = await proxy(config_dict({"svc": {
                "targets": [{"dns": "svc.test", "port": one.port}],
                "discovery": {"refresh": 0.1, "resolver": [dns.address]},
                "pool": {"limit": 1, "keepalive_timeout": 30},
            }}))  # fmt: skip
            url = f"http://127.0.0.1:{server.proxy_address[1]}/"
            connector = server.current().upstreams["svc"].connector
            async with aiohttp.ClientSession() as client:

                async def ask() -> tuple[int, str]:
                    async with client.get(url) as response:
                        return response.status, await response.text()

                first = asyncio.ensure_future(ask())
                await one.received(1)
                queued = asyncio.ensure_future(ask())  # picked 127.0.0.1, waits for the slot
                await until(lambda: connector.waiting == 1)
                dns.set_a("svc.test", ["127.0.0.2"])  # 127.0.0.1 leaves: drained
                want = [f"http://127.0.0.2:{one.port}"]
                await until(lambda: [t.url for t in server.current().upstreams["svc"].targets]
                            == want)  # fmt: skip
                release.set()
                assert [await first, await queued] == [(200, "one")] * 2
                await until(lambda: one.open == 0)
                view = await _pool_view(server, "?connections=1")
                assert view["connections"] == []
                assert {k: v for k, v in view["connections_closed"].items() if v} == {"reload": 2}
                assert (one.connections, two.connections) == (2, 0)
    finally:
        await two.stop()


async def test_proxy_retries_a_stale_warm_connection_on_a_fresh_one(backend, proxy):
    origin = await backend(idle_closer(0.5))
    server = await proxy(config_dict({"svc": {"targets": [origin.url], "pool": {"min_idle": 2}}}))
    await until(lambda: origin.connections == 2)
    await asyncio.sleep(1.0)  # both warm connections are past the upstream's idle timer
    client = await RawClient.connect(server.proxy_address[1])
    try:
        response = await client.request(get("/"))
    finally:
        await client.close()
    assert (response.status, response.body) == (200, b"ok")
    view = await _pool_view(server)
    assert view["retries"] == {"stale": 1}  # on a fresh connection, not the other warm one
    assert view["stale_connections"] == 1
    assert {k: v for k, v in view["connections_closed"].items() if v} == {"stale": 1}
    assert len(origin.requests) == 2


async def test_proxy_opens_no_warm_connection_that_keepalive_timeout_would_close(backend, proxy):
    origin = await backend(answering(OK))
    pool_settings = {"min_idle": 2, "keepalive_timeout": 0.3}  # the warming round is 1 s
    await proxy(config_dict({"svc": upstream(origin.url, pool=pool_settings)}))
    await asyncio.sleep(1.5)  # without the check: 2 opened at once, closed, 2 more at 1 s
    assert origin.connections == 0


async def test_a_request_arriving_as_a_connection_frees_queues_behind_those_waiting() -> None:
    """aiohttp hands a freed connection to whoever asks first: a request asking between the
    release and the woken waiter's turn would take it, and the waiter would wait again."""
    backend = await RawBackend(answering(http_response(body=b"ok"))).start()
    connector = PoolConnector(limit=1, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(connect=5)

    def request() -> aiohttp.ClientRequest:
        return aiohttp.ClientRequest(
            "GET", URL(backend.url), loop=asyncio.get_running_loop(), ssl=True
        )

    try:
        first = await connector.connect(request(), [], timeout)
        waiter = asyncio.create_task(connector.connect(request(), [], timeout))
        await eventually(lambda: connector.waiting == 1)
        # A request arrives, and before it runs the connection is freed: its turn comes before
        # the woken waiter's (before the fix it took the connection, the waiter waited again).
        newcomer = asyncio.create_task(connector.connect(request(), [], timeout))
        first.release()
        await asyncio.sleep(0)
        second = await asyncio.wait_for(waiter, 2)  # the one that waited gets it
        assert not newcomer.done()
        assert connector.waiting == 1  # the newcomer waits its turn
        second.release()
        third = await asyncio.wait_for(newcomer, 2)
        third.release()
        assert backend.connections == 1  # one connection, handed on in order
    finally:
        await connector.close()
        await backend.stop()
