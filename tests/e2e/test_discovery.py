"""dns and srv targets through the real proxy: a real DNS server on 127.0.0.1 whose answers the
tests change, backends on 127.0.0.1 and 127.0.0.2, and clients that keep asking meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_config
from proxy.server import ProxyServer
from tests.dns import DnsServer
from tests.support import (
    RawBackend,
    RawRequest,
    admin_get,
    answering,
    config_dict,
    eventually,
    http_response,
    metric_value,
    start_proxy,
    write_config,
)

NAME = "svc.test"
REFRESH = 0.2


def _named(body: bytes) -> RawBackend:
    return RawBackend(answering(lambda request: http_response(body=body)))


async def _serve_on(backend: RawBackend, host: str, port: int) -> RawBackend:
    backend.server = await asyncio.start_server(backend._serve, host, port)
    return backend


async def _pair() -> tuple[RawBackend, RawBackend]:
    """Backends on 127.0.0.1 and 127.0.0.2 on one port: what a dns target's addresses are."""
    for _ in range(20):
        first = await _serve_on(_named(b"one"), "127.0.0.1", 0)
        try:
            second = await _serve_on(_named(b"two"), "127.0.0.2", first.port)
        except OSError:  # that port is taken on 127.0.0.2: try another
            await first.stop()
            continue
        return first, second
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@contextlib.asynccontextmanager
async def _proxy(
    dns: DnsServer, target: dict[str, object], **settings: object
) -> AsyncIterator[ProxyServer]:
    upstream = {"targets": [target], "discovery": {"refresh": REFRESH, "resolver": [dns.address]}}
    server = await start_proxy(config_dict({"svc": {**upstream, **settings}}))
    try:
        yield server
    finally:
        await server.stop()


async def _ask(
    session: aiohttp.ClientSession, server: ProxyServer, path: str = "/"
) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.proxy_address[1]}{path}"
    async with session.get(url) as response:
        return response.status, await response.text()


async def _pools(server: ProxyServer, query: str = "") -> dict[str, object]:
    status, _, body = await admin_get(server, "/pools" + query)
    assert status == 200
    return json.loads(body)["upstreams"]["svc"]  # type: ignore[no-any-return]


async def test_targets_follow_dns_and_drain_without_a_failed_request() -> None:
    one, two = await _pair()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1"])
        async with _proxy(dns, {"dns": NAME, "port": one.port}) as server:
            seen: list[tuple[int, str]] = []
            stop = asyncio.Event()

            async def client() -> None:
                async with aiohttp.ClientSession() as session:
                    while not stop.is_set():
                        seen.append(await _ask(session, server))

            clients = [asyncio.create_task(client()) for _ in range(4)]
            try:
                await eventually(lambda: len(seen) > 20)
                dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])  # scaled up: a target appears
                await eventually(lambda: len(two.requests) > 20)
                dns.set_a(NAME, ["127.0.0.2"])  # 127.0.0.1 leaves: it drains
                await eventually(lambda: one.open == 0, within=5)
                settled = len(seen)
                await eventually(lambda: len(seen) > settled + 50)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert {status for status, _ in seen} == {200}  # not one request failed
            assert {body for _, body in seen[settled:]} == {"two"}  # nothing reaches .1 now
            view = await _pools(server)
            assert [t["url"] for t in view["targets"]] == [f"http://127.0.0.2:{one.port}"]  # type: ignore[index]
            assert view["targets"][0]["discovered_from"] == f"dns:{NAME}"  # type: ignore[index]
            assert view["connections_closed"]["reload"] >= 1  # type: ignore[index]
            _, _, metrics = await admin_get(server, "/metrics")
            assert metric_value(metrics, "proxy_upstream_targets", upstream="svc") == 1
            ok = metric_value(
                metrics, "proxy_upstream_discovery_refreshes_total", upstream="svc", result="ok"
            )
            assert ok >= 3
    await one.stop()
    await two.stop()


async def test_a_failing_dns_keeps_the_last_good_set() -> None:
    one, two = await _pair()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])
        async with _proxy(dns, {"dns": NAME, "port": one.port}) as server:
            dns.fail = True
            await eventually(
                lambda: server.current().upstreams["svc"].discovery.refreshes["failed"] >= 2  # type: ignore[union-attr]
            )
            dns.fail, dns.silent = False, True  # and then a server that does not answer at all
            failed = server.current().upstreams["svc"].discovery.refreshes["failed"]  # type: ignore[union-attr]
            await eventually(
                lambda: server.current().upstreams["svc"].discovery.refreshes["failed"] > failed,  # type: ignore[union-attr]
                within=10,
            )
            async with aiohttp.ClientSession() as session:
                answers = [await _ask(session, server) for _ in range(20)]
            assert Counter(answers) == {(200, "one"): 10, (200, "two"): 10}
            view = await _pools(server)
            assert len(view["targets"]) == 2  # type: ignore[arg-type]
            assert view["discovery"]["last_error"]  # type: ignore[index]
            _, _, metrics = await admin_get(server, "/metrics")
            failed_total = metric_value(
                metrics, "proxy_upstream_discovery_refreshes_total", upstream="svc", result="failed"
            )
            assert failed_total >= 3
    await one.stop()
    await two.stop()


async def test_srv_weights_are_honoured() -> None:
    heavy, light = _named(b"heavy"), _named(b"light")
    await heavy.start()
    await light.start()
    async with DnsServer() as dns:
        dns.set_a("a.svc.test", ["127.0.0.1"])
        dns.set_srv(
            "_http._tcp.svc.test",
            [(10, 3, heavy.port, "a.svc.test."), (10, 1, light.port, "a.svc.test."),
             (20, 5, heavy.port + 1, "a.svc.test.")],  # a backup: a higher priority value
        )  # fmt: skip
        async with _proxy(dns, {"srv": "_http._tcp.svc.test"}) as server:
            async with aiohttp.ClientSession() as session:
                answers = Counter([(await _ask(session, server))[1] for _ in range(400)])
            # Smooth weighted round robin: exactly 3 to 1.
            assert answers == {"heavy": 300, "light": 100}
            view = await _pools(server)
            weights = {t["url"]: t["weight"] for t in view["targets"]}  # type: ignore[union-attr]
            assert weights == {heavy.url: 3, light.url: 1}
    await heavy.stop()
    await light.stop()


async def test_no_target_yet_is_a_503_until_the_name_resolves() -> None:
    one, two = await _pair()
    async with (
        DnsServer() as dns,  # knows no such name yet: NXDOMAIN
        _proxy(dns, {"dns": NAME, "port": one.port}) as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"http://127.0.0.1:{server.proxy_address[1]}/"
        async with session.get(url) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
        dns.set_a(NAME, ["127.0.0.2"])
        await eventually(lambda: len(server.current().upstreams["svc"].targets) == 1)
        assert await _ask(session, server) == (200, "two")
    await one.stop()
    await two.stop()


async def test_host_header_target_is_the_name_and_port_a_dns_target_was_found_by() -> None:
    backend = RawBackend(answering(http_response(body=b"ok")))
    await backend.start()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1"])
        upstream = {"targets": [{"dns": NAME, "port": backend.port}],
                    "discovery": {"refresh": REFRESH, "resolver": [dns.address]}}  # fmt: skip
        route = {"match": {"path_prefix": "/"}, "upstream": "svc", "host_header": "target"}
        server = await start_proxy(config_dict({"svc": upstream}, [route]))
        try:
            async with aiohttp.ClientSession() as session:
                assert await _ask(session, server) == (200, "ok")
        finally:
            await server.stop()
    request: RawRequest = backend.requests[0]
    assert request.header("Host") == f"{NAME}:{backend.port}"
    await backend.stop()


async def test_system_resolver_resolves_localhost() -> None:
    backend = RawBackend(answering(http_response(body=b"ok")))
    await backend.start()
    upstream = {"targets": [{"dns": "localhost", "port": backend.port}]}
    server = await start_proxy(config_dict({"svc": upstream}))
    try:
        view = await _pools(server)
        urls = [t["url"] for t in view["targets"]]  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{backend.port}" in urls
        async with aiohttp.ClientSession() as session:
            # ::1 may be one of localhost's addresses, with nothing listening there: the
            # attempt fails over to 127.0.0.1 (retries.attempts 2).
            assert await _ask(session, server) == (200, "ok")
    finally:
        await server.stop()
    await backend.stop()


@pytest.mark.parametrize("hash_on", ["header:X-User", "cookie:user"])
async def test_hash_keeps_a_key_on_its_target_and_falls_back_without_one(hash_on: str) -> None:
    one, two = await _pair()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])
        async with _proxy(
            dns, {"dns": NAME, "port": one.port}, balance="hash", hash_on=hash_on
        ) as server:
            url = f"http://127.0.0.1:{server.proxy_address[1]}/"

            def keyed(user: str) -> dict[str, str]:
                if hash_on.startswith("header:"):
                    return {"X-User": user}
                return {"Cookie": f"theme=dark; user={user}"}

            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
                where: dict[str, set[str]] = {}
                for round_ in range(3):
                    for i in range(40):
                        user = f"user-{i}"
                        async with session.get(url, headers=keyed(user)) as response:
                            assert response.status == 200
                            where.setdefault(user, set()).add(await response.text())
                    del round_
                assert all(len(bodies) == 1 for bodies in where.values())  # each key stays put
                spread = Counter(next(iter(b)) for b in where.values())
                assert set(spread) == {"one", "two"}  # and keys spread over both
                # Without the key: least_requests, which uses both.
                unkeyed = Counter([(await _ask(session, server))[1] for _ in range(40)])
                assert set(unkeyed) == {"one", "two"}
    await one.stop()
    await two.stop()


async def test_a_reload_during_a_dns_outage_keeps_the_targets(tmp_path: Path) -> None:
    backend = await RawBackend(answering(http_response(body=b"ok"))).start()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1"])

        def settings(limit: int) -> dict[str, object]:
            upstream = {"targets": [{"dns": NAME, "port": backend.port}], "pool": {"limit": limit},
                        "discovery": {"refresh": REFRESH, "resolver": [dns.address]}}  # fmt: skip
            return config_dict({"svc": upstream})

        path = write_config(tmp_path / "proxy.yaml", settings(100))
        server = ProxyServer(load_config(path), config_path=path, shutdown_grace=1)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                assert await _ask(session, server) == (200, "ok")
                dns.fail = True  # SERVFAIL from now on
                write_config(path, settings(50))  # rebuilds the upstream: a new discovery
                assert (await server.reload())[0]
                upstream = server.current().upstreams["svc"]
                assert upstream.settings.pool.limit == 50
                assert [t.url for t in upstream.targets] == [backend.url]
                assert [(await _ask(session, server))[0] for _ in range(5)] == [200] * 5
                # One total across the reload: the old upstream's refreshes and the new one's.
                assert upstream.discovery is not None
                assert upstream.discovery.refreshes["ok"] >= 1
                assert upstream.discovery.refreshes["failed"] >= 1
        finally:
            await server.stop()
    await backend.stop()


@pytest.mark.parametrize("passes", [True, False])
async def test_with_health_checks_a_new_address_waits_for_its_first_check(passes: bool) -> None:
    checked = asyncio.Event()

    def answer(request: RawRequest) -> bytes:
        if request.target == "/healthz":
            checked.set()
            return http_response(status=200 if passes else 503)
        return http_response(body=b"two")

    one, two = await _pair()
    two.handler = answering(answer)
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1"])
        # Rounds 30 s apart and 3 passes to come back: only the check made when the address
        # joins, and its one pass, can bring it in within this test.
        check = {"interval": 30, "healthy_threshold": 3, "unhealthy_threshold": 1}
        async with (
            _proxy(dns, {"dns": NAME, "port": one.port}, health_check=check) as server,
            aiohttp.ClientSession() as session,
        ):
            dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])
            await asyncio.wait_for(checked.wait(), 5)  # checked at once, not 30 s later
            await eventually(lambda: len(server.current().upstreams["svc"].targets) == 2)
            await asyncio.sleep(0.1)  # the check's answer counted
            answers = {(await _ask(session, server))[1] for _ in range(10)}
            assert answers == ({"one", "two"} if passes else {"one"})
    await one.stop()
    await two.stop()


async def test_an_address_that_comes_back_is_pooled_again() -> None:
    one, two = await _pair()
    async with DnsServer() as dns:
        dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])
        async with (
            _proxy(dns, {"dns": NAME, "port": one.port}) as server,
            aiohttp.ClientSession() as session,
        ):
            upstream = server.current().upstreams["svc"]
            dns.set_a(NAME, ["127.0.0.2"])
            await eventually(lambda: len(upstream.targets) == 1)
            dns.set_a(NAME, ["127.0.0.1", "127.0.0.2"])
            await eventually(lambda: len(upstream.targets) == 2)
            before = one.connections
            for _ in range(20):
                assert (await _ask(session, server))[0] == 200
            # Ten requests each, one after another: one connection to 127.0.0.1, reused.
            assert one.connections - before == 1
            assert upstream.connector.closes["reload"] == 0
    await one.stop()
    await two.stop()
