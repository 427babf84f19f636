"""Reloads and shutdown, with the proxy run as a subprocess as a user runs it."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.support import (
    RELOAD,
    ProxyProcess,
    answering,
    config_dict,
    eventually,
    free_port,
    http_response,
    metric_value,
    never_answers,
    read_request,
    run_cli,
    upstream,
    write_config,
)


def named(name: str) -> bytes:
    return http_response(body=name.encode())


class Running:
    """A proxy subprocess with a config file that the test rewrites."""

    def __init__(self, tmp_path, upstreams, routes, **top) -> None:
        self.port, self.admin = free_port(), free_port()
        self.path = tmp_path / "proxy.yaml"
        self.top = top
        self.write(upstreams, routes)
        self.process = ProxyProcess(self.path, self.admin)

    def write(self, upstreams, routes, **top) -> None:
        config = config_dict(
            upstreams,
            routes,
            listen={"port": self.port},
            access_log={"enabled": False},
            **{**self.top, **top},
        )
        config["admin"]["port"] = self.admin
        write_config(self.path, config)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        async with session.get(f"http://127.0.0.1:{self.admin}/metrics") as response:
            return metric_value(await response.text(), name, **labels)

    async def reloads(self, session: aiohttp.ClientSession, result: str) -> float:
        return await self.metric(session, "proxy_config_reloads_total", result=result)


@pytest.fixture
def running(tmp_path):
    started: list[Running] = []

    def start(upstreams, routes, **top) -> Running:
        proxy = Running(tmp_path, upstreams, routes, **top)
        started.append(proxy)
        proxy.process.wait_ready()
        return proxy

    yield start
    for proxy in started:
        proxy.process.kill()


def routes(*pairs: tuple[str, str]) -> list[dict]:
    return [
        {"name": name, "match": {"path_prefix": prefix}, "upstream": name} for name, prefix in pairs
    ]


async def get_body(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def test_sighup_keeps_unchanged_upstreams_warm_and_replaces_changed_ones(backend, running):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    table = routes(("a", "/a/"), ("b", "/b/"))
    proxy = running({"a": upstream(a.url), "b": upstream(b.url)}, table)
    async with aiohttp.ClientSession() as session:
        assert await get_body(session, proxy.url("/a/")) == (200, b"a")
        assert await get_body(session, proxy.url("/b/")) == (200, b"b")
        proxy.write(
            {"a": upstream(a.url), "b": upstream(b.url, pool={"limit": 7})},
            [*table, {"name": "new", "match": {"path_prefix": "/n/"}, "upstream": "a"}],
        )
        proxy.process.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await proxy.reloads(session, "success") == 1

        await eventually(reloaded)
        assert await get_body(session, proxy.url("/a/")) == (200, b"a")
        assert await get_body(session, proxy.url("/b/")) == (200, b"b")
        assert await get_body(session, proxy.url("/n/")) == (200, b"a")
        assert await proxy.metric(session, "proxy_upstream_pool_limit", upstream="b") == 7
    assert a.connections == 1  # unchanged upstream: its warm connection was kept
    assert b.connections == 2  # changed upstream: a new pool


async def test_a_bad_file_is_rejected_and_the_running_table_keeps_serving(backend, running):
    a = await backend(answering(named("a")))
    proxy = running({"a": upstream(a.url)}, routes(("a", "/")))
    good = proxy.path.read_text()
    async with aiohttp.ClientSession() as session:
        proxy.path.write_text(good.replace("path_prefix: /", "path_prefix: nope"))
        async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
            assert response.status == 400
            assert await response.text() == (
                "routes[0].match.path_prefix: must be a string starting with '/', got 'nope'\n"
            )
        proxy.process.signal(signal.SIGHUP)

        async def counted() -> bool:
            return await proxy.reloads(session, "failure") == 2

        await eventually(counted)
        assert await get_body(session, proxy.url("/x")) == (200, b"a")
        assert await proxy.reloads(session, "success") == 0
    proxy.process.signal(signal.SIGTERM)
    returncode, stderr = proxy.process.wait()
    assert returncode == 0
    assert "reload rejected, still serving the previous config: routes[0].match" in stderr


async def test_post_reload_applies_and_says_what_changed(backend, running):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    proxy = running({"a": upstream(a.url), "b": upstream(b.url)}, routes(("a", "/")))
    proxy.write(
        {"a": upstream(a.url), "b": upstream(b.url)},
        [{"name": "a", "match": {"path_prefix": "/"}, "upstream": "b"}],
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
            assert response.status == 200
            assert await response.text() == "route a changed: upstream 'a' -> 'b'\n"
        assert await get_body(session, proxy.url("/")) == (200, b"b")


async def test_stream_in_flight_finishes_on_the_table_it_started_with(backend, running):
    release = asyncio.Event()

    async def stream(backend, reader, writer):
        backend.record(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    old = await backend(stream)
    new = await backend(answering(named("new")))
    proxy = running({"app": upstream(old.url)}, routes(("app", "/")))
    async with aiohttp.ClientSession() as session, session.get(proxy.url("/stream")) as streaming:
        assert await streaming.content.readexactly(5) == b"first"
        proxy.write({"app": upstream(new.url)}, routes(("app", "/")))
        async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
            assert response.status == 200
        assert await get_body(session, proxy.url("/")) == (200, b"new")
        release.set()
        assert await streaming.content.read() == b"second"


async def test_twenty_reloads_under_sustained_traffic_and_streams_lose_nothing(backend, running):
    async def slow_stream(backend, reader, writer):
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            if request.target != "/stream":
                writer.write(named("ok"))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    first = await backend(slow_stream)
    second = await backend(slow_stream)
    proxy = running({"app": upstream(first.url)}, routes(("app", "/")))
    configs = [
        ({"app": upstream(second.url)}, routes(("app", "/"))),  # the upstream changes
        ({"app": upstream(second.url, pool={"limit": 50})}, routes(("app", "/"))),
        ({"app": upstream(first.url)}, routes(("app", "/"))),
    ]
    failures: list[str] = []
    done = {"requests": 0, "streams": 0}
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def traffic() -> None:
            while not stop.is_set():
                try:
                    status, body = await get_body(session, proxy.url("/"))
                    if (status, body) != (200, b"ok"):
                        failures.append(f"{status} {body!r}")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                done["requests"] += 1

        async def stream() -> None:
            try:
                status, body = await get_body(session, proxy.url("/stream"))
                if (status, body) != (200, b"x" * 20):
                    failures.append(f"stream {status} {body!r}")
            except aiohttp.ClientError as exc:
                failures.append(f"stream {exc!r}")
            done["streams"] += 1

        workers = [asyncio.create_task(traffic()) for _ in range(8)]
        streams = [asyncio.create_task(stream()) for _ in range(6)]
        for i in range(20):
            await asyncio.sleep(0.1)
            proxy.write(*configs[i % len(configs)])
            async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
                assert response.status == 200, await response.text()
        await asyncio.gather(*streams)
        stop.set()
        await asyncio.gather(*workers)
        assert await proxy.reloads(session, "success") == 20
    print(
        f"20 reloads: {done['requests']} requests, {done['streams']} streams, "
        f"{len(failures)} failures"
    )
    assert failures == []
    assert done["streams"] == 6 and done["requests"] > 100


async def test_sigterm_drains_with_delay_then_grace_and_exits_0(backend, running):
    async def slow(backend, reader, writer):
        backend.record(await read_request(reader))
        await asyncio.sleep(1.0)
        writer.write(named("finished"))
        await writer.drain()
        await reader.read()

    origin = await backend(slow)
    proxy = running(
        {"app": upstream(origin.url)}, routes(("app", "/")), shutdown={"delay": 0.6, "grace": 5}
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        in_flight = asyncio.create_task(get_body(session, proxy.url("/slow")))
        await origin.received(1)
        signalled = time.monotonic()
        proxy.process.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with session.get(f"http://127.0.0.1:{proxy.admin}/readyz") as ready:
            assert ready.status == 503  # at once
        # During shutdown.delay the listener still accepts (load balancers are catching up).
        accepted = asyncio.create_task(session.get(proxy.url("/during-delay")))
        await asyncio.sleep(0.6)
        with pytest.raises(aiohttp.ClientConnectorError):  # after it, it does not
            await session.get(proxy.url("/after-delay"))
        assert await in_flight == (200, b"finished")
        async with await accepted as response:
            assert response.status == 200
    returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr
    assert time.monotonic() - signalled < 5


async def test_grace_bounds_the_drain(backend, running):
    origin = await backend(never_answers)
    proxy = running(
        {"app": upstream(origin.url, timeouts={"read": 60})},
        routes(("app", "/")),
        shutdown={"grace": 0.5},
    )
    async with aiohttp.ClientSession() as session:
        stuck = asyncio.create_task(get_body(session, proxy.url("/stuck")))
        await origin.received(1)
        started = time.monotonic()
        proxy.process.signal(signal.SIGTERM)
        returncode, _ = await asyncio.to_thread(proxy.process.wait)
        assert returncode == 0
        assert time.monotonic() - started < 4
        with pytest.raises(aiohttp.ClientError):
            await stuck


async def test_a_second_signal_exits_at_once(backend, running):
    origin = await backend(never_answers)
    proxy = running(
        {"app": upstream(origin.url, timeouts={"read": 60})},
        routes(("app", "/")),
        shutdown={"grace": 30},
    )
    async with aiohttp.ClientSession() as session:
        stuck = asyncio.create_task(get_body(session, proxy.url("/stuck")))
        await origin.received(1)
        proxy.process.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proxy.process.signal(signal.SIGINT)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
        assert time.monotonic() - started < 2
        assert returncode == 1
        assert "second SIGINT: exiting now" in stderr
        with pytest.raises(aiohttp.ClientError):
            await stuck


def test_check_diff_prints_what_a_reload_would_change(tmp_path):
    running_path = write_config(
        tmp_path / "running.yaml",
        config_dict(
            {"a": upstream("http://127.0.0.1:1"), "b": upstream("http://127.0.0.1:2")},
            routes(("a", "/a/"), ("b", "/b/")),
        ),
    )
    new_path = write_config(
        tmp_path / "new.yaml",
        config_dict(
            {
                "a": upstream("http://127.0.0.1:1", pool={"limit": 5}),
                "c": upstream("http://127.0.0.1:3"),
            },
            routes(("a", "/a/"), ("c", "/c/")),
            shutdown={"grace": 10},
        ),
    )
    result = run_cli("--config", str(new_path), "--check", "--diff", str(running_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config OK: 2 upstreams, 2 routes",
        "route b removed",
        "route c added",
        "shutdown changed (applied at the next restart): shutdown.grace 30.0 -> 10.0",
        "upstream a changed: pool.limit 100 -> 5",
        "upstream b removed",
        "upstream c added",
    ]
