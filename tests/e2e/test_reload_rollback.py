"""Reloads that roll themselves back (rollback.py): a reload whose changed routes or upstreams
start failing under load is undone within `reload.verify`, and nothing fails after that; a good
one, or one nobody sends traffic to, stands. Real backends, the real proxy, real clients."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load_config
from proxy.server import ProxyServer
from tests.e2e.test_operations import Running, named, routes
from tests.e2e.test_workers import started, stopped
from tests.support import (
    RELOAD,
    Load,
    RawRequest,
    answering,
    config_dict,
    eventually,
    http_response,
    run_cli,
    upstream,
    write_config,
)

FAILING = http_response(500, "Internal Server Error", body=b"broken")


def targets(url: str) -> str:
    """An upstream's targets as the reload log shows them."""
    return f"[{{url: '{url}', weight: 1}}]"


async def post_reload(
    port: int, query: str = "", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/reload{query}", headers=headers or RELOAD
        ) as response,
    ):
        return response.status, await response.text()


Reloadable = Callable[[dict[str, Any]], Awaitable[tuple[ProxyServer, Path]]]


@pytest.fixture
async def reloadable(backend: Any, tmp_path: Path) -> AsyncIterator[Reloadable]:
    """The real ProxyServer with a config file the test rewrites (reloads read it); stopped
    after the test, before the backends."""
    servers: list[ProxyServer] = []

    async def start(config: dict[str, Any]) -> tuple[ProxyServer, Path]:
        path = write_config(tmp_path / "proxy.yaml", config)
        server = ProxyServer(load_config(path), config_path=path, shutdown_grace=2.0)
        servers.append(server)
        await server.start()
        return server, path

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """The proxy as a subprocess (test_operations.py's Running), killed after the test."""
    processes: list[Running] = []

    async def start(upstreams: dict[str, Any], table: list[dict[str, Any]], **top: Any) -> Running:
        proxy = Running(tmp_path, upstreams, table, **top)
        processes.append(proxy)
        await asyncio.to_thread(proxy.process.wait_ready)
        return proxy

    yield start
    for proxy in processes:
        proxy.process.kill()


def table(targets: dict[str, str], **top: Any) -> dict[str, Any]:
    """Upstream NAME -> target URL, each with a route of the same name on /NAME/ (the first on /
    too, last)."""
    first = next(iter(targets))
    return config_dict(
        {name: upstream(url) for name, url in targets.items()},
        [*routes(*((name, f"/{name}/") for name in targets)),
         {"name": "default", "match": {"path_prefix": "/"}, "upstream": first}],
        access_log={"enabled": False}, **top,
    )  # fmt: skip


def url(server: ProxyServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.proxy_address[1]}{path}"


async def test_a_reload_to_a_target_answering_500_rolls_back_within_verify_and_then_nothing_fails(
    backend, running, loads
):
    good = await backend(answering(named("good")))
    bad = await backend(answering(FAILING))
    proxy = await running({"api": upstream(good.url)}, routes(("api", "/")))
    async with aiohttp.ClientSession() as session:
        load = loads(proxy.url("/"), loops=3)
        await asyncio.sleep(1.2)  # a healthy second or more before the reload
        proxy.write({"api": upstream(bad.url)}, routes(("api", "/")), reload={"verify": 5})
        reloaded = time.monotonic()
        async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
            assert response.status == 200
            assert await response.text() == (
                f"reload changed: reload.verify 0.0 -> 5.0; upstream api changed: targets "
                f"{targets(good.url)} -> {targets(bad.url)}; verify 5 s: watching upstream api "
                "(max_error_ratio 0.05)\n"
            )

        async def rolled_back() -> bool:
            return await proxy.reloads(session, "rolled_back") == 1

        await eventually(rolled_back, within=7)
        seen = time.monotonic()
        await asyncio.sleep(1)  # load on the restored config
        await load.stop()
        assert seen - reloaded < 5 + 1  # within verify (+1 s: the watch counts whole seconds)
        assert await proxy.reloads(session, "success") == 1
        assert load.count(reloaded, status=500) > 0  # the reload did break the route
        after = [(s, body) for t, s, body in load.sent if t >= seen]
        assert len(after) > 20
        assert after == [(200, b"good")] * len(after)  # nothing failed after the rollback
    proxy.process.signal(signal.SIGTERM)
    returncode, stderr = proxy.process.wait()
    assert returncode == 0
    (line,) = [line for line in stderr.splitlines() if "reload rolled back" in line]
    assert " ERROR reload rolled back: upstream api: " in line
    assert "requests failed since the reload (1.00, 0.00 before it; max_error_ratio 0.05)" in line
    assert (
        f"; restored: reload changed: reload.verify 5.0 -> 0.0; upstream api changed: targets "
        f"{targets(bad.url)} -> {targets(good.url)}; the config file still holds the "
        "rolled-back config: fix it before the next reload"
    ) in line


async def test_a_good_reload_with_verify_is_verified_and_stands(backend, reloadable, caplog, loads):
    caplog.set_level(logging.INFO, "proxy")
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    server, path = await reloadable(table({"api": a.url}))
    load = loads(url(server, "/api/"))
    write_config(path, table({"api": b.url}))
    status, text = await post_reload(server.admin_address[1], "?verify=2")
    assert status == 200
    assert text.endswith("; verify 2 s: watching upstream api (max_error_ratio 0.05)\n")

    async def verified() -> bool:
        return server.last_reload is not None and server.last_reload.message.endswith("verified")

    await eventually(verified, within=5)
    await load.stop()
    assert server.last_reload is not None and server.last_reload.result == "success"
    assert server.metrics.reloads == {"success": 1, "failure": 0, "rolled_back": 0}
    (line,) = [r.getMessage() for r in caplog.records if "reload verified" in r.getMessage()]
    assert line.startswith("reload verified: upstream api 0 of ")
    assert load.count(status=200) == load.count()


async def test_a_changed_route_that_gets_no_traffic_is_not_rolled_back(backend, reloadable, loads):
    a = await backend(answering(named("a")))
    web = await backend(answering(named("web")))
    bad = await backend(answering(FAILING))
    server, path = await reloadable(table({"web": web.url, "api": a.url}))
    load = loads(url(server, "/web/"))  # traffic, but not on what the reload changes
    write_config(path, table({"web": web.url, "api": bad.url}))
    assert (await post_reload(server.admin_address[1], "?verify=1"))[0] == 200

    async def verified() -> bool:
        return server.last_reload is not None and server.last_reload.message.endswith("verified")

    await eventually(verified, within=4)
    await load.stop()
    assert server.metrics.reloads["rolled_back"] == 0
    async with aiohttp.ClientSession() as session, session.get(url(server, "/api/")) as answer:
        assert answer.status == 500  # the reload stands: nothing told the proxy it was bad


def every_tenth_fails() -> Callable[[RawRequest], bytes]:
    served = itertools.count()
    return lambda request: FAILING if next(served) % 10 == 0 else named("a")


async def test_a_route_failing_as_much_before_the_reload_is_not_rolled_back(
    backend, reloadable, loads
):
    flaky = await backend(answering(every_tenth_fails()))
    server, path = await reloadable(table({"api": flaky.url}))
    load = loads(url(server, "/api/"), loops=1)
    await asyncio.sleep(2.1)  # whole seconds failing 10% before the reload
    api = table({"api": flaky.url})
    api["upstreams"]["api"]["pool"] = {"limit": 50}  # the upstream changes: it is watched
    write_config(path, api | {"reload": {"verify": 2, "max_error_ratio": 0.05}})
    reloaded = time.monotonic()
    assert (await post_reload(server.admin_address[1]))[0] == 200

    async def verified() -> bool:
        return server.last_reload is not None and server.last_reload.message.endswith("verified")

    await eventually(verified, within=5)
    await load.stop()
    assert server.metrics.reloads["rolled_back"] == 0
    failing = load.count(reloaded, status=500) / load.count(reloaded)
    assert 0.05 < failing < 0.15  # above max_error_ratio, as before the reload


async def test_verify_must_be_a_number_of_seconds(backend, reloadable):
    a = await backend(answering(named("a")))
    server, _ = await reloadable(table({"api": a.url}))
    for query in ("?verify=abc", "?verify=-1", "?verify=3601", "?verify="):
        status, text = await post_reload(server.admin_address[1], query)
        assert (status, text) == (
            400,
            f"verify: must be a number of seconds from 0 to 3600, got {query[8:]!r}\n",
        )
    assert server.metrics.reloads == {"success": 0, "failure": 0, "rolled_back": 0}


async def test_a_second_reload_during_verify_is_watched_with_the_first_and_rolls_both_back(
    backend, reloadable, caplog, loads
):
    """The first reload is not verified yet when the second comes: a rollback restores the
    config in force before the first (the last one that was verified)."""
    caplog.set_level(logging.INFO, "proxy")
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    bad = await backend(answering(FAILING))
    server, path = await reloadable(table({"api": a.url}))
    load = loads(url(server, "/api/"))
    write_config(path, table({"api": b.url}))
    assert (await post_reload(server.admin_address[1], "?verify=3"))[0] == 200
    await asyncio.sleep(0.5)
    write_config(path, table({"api": bad.url}))
    assert (await post_reload(server.admin_address[1], "?verify=3"))[0] == 200
    await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=5)
    rolled_back = time.monotonic()
    await asyncio.sleep(0.5)
    await load.stop()
    after = {(s, body) for t, s, body in load.sent if t >= rolled_back}
    assert after == {(200, b"a")}  # the config before the first reload: the last verified
    assert server.last_reload is not None and server.last_reload.result == "rolled_back"
    assert f"restored: upstream api changed: targets {targets(bad.url)} -> {targets(a.url)}" in (
        server.last_reload.message
    )
    assert not [r for r in caplog.records if "reload verified" in r.getMessage()]


async def test_a_repeated_reload_with_nothing_changed_keeps_watching_a_bad_one(
    backend, reloadable, loads
):
    """A second SIGHUP (config management sends them) must not end the watch of a bad reload:
    found by review, where the bad reload then stood unwatched."""
    a = await backend(answering(named("a")))
    bad = await backend(answering(FAILING))
    server, path = await reloadable(table({"api": a.url}))
    load = loads(url(server, "/api/"))
    write_config(path, table({"api": bad.url}))
    assert (await post_reload(server.admin_address[1], "?verify=4"))[0] == 200
    await asyncio.sleep(0.2)
    status, text = await post_reload(server.admin_address[1])
    assert status == 200 and "verify 4 s: watching upstream api" in text, text
    await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=6)
    rolled_back = time.monotonic()
    await asyncio.sleep(0.5)
    await load.stop()
    assert {(s, body) for t, s, body in load.sent if t >= rolled_back} == {(200, b"a")}


async def test_a_rollback_keeps_the_admin_token_the_reload_read(
    backend, reloadable, loads, tmp_path
):
    """A token rotated in the same reload as a bad change stays rotated (found by review)."""
    a = await backend(answering(named("a")))
    bad = await backend(answering(FAILING))
    token = tmp_path / "token"
    token.write_text("old-token")
    admin = {"token_file": str(token)}
    server, path = await reloadable({**table({"api": a.url}), "admin": admin})
    old = {"Authorization": "Bearer old-token", **RELOAD}
    new = {"Authorization": "Bearer new-token", **RELOAD}
    token.write_text("new-token")
    write_config(path, {**table({"api": bad.url}), "admin": admin})
    load = loads(url(server, "/api/"))
    assert (await post_reload(server.admin_address[1], "?verify=4", headers=old))[0] == 200
    await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=6)
    await load.stop()
    async with aiohttp.ClientSession() as client:
        admin_url = f"http://127.0.0.1:{server.admin_address[1]}/pools"
        async with client.get(admin_url, headers=old) as response:
            assert response.status == 401
        async with client.get(admin_url, headers=new) as response:
            assert response.status == 200


async def test_shutdown_during_verify_ends_the_watch_and_leaves_no_task(backend, tmp_path):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    path = write_config(tmp_path / "proxy.yaml", table({"api": a.url}))
    server = ProxyServer(load_config(path), config_path=path, shutdown_grace=2.0)
    await server.start()
    try:
        write_config(path, table({"api": b.url}))
        assert (await post_reload(server.admin_address[1], "?verify=30"))[0] == 200
        assert _watches() == 1
    finally:
        started = time.monotonic()
        await server.stop()
    assert time.monotonic() - started < 3
    assert _watches() == 0


def _watches() -> int:
    return sum("Verification._watch" in repr(t.get_coro()) for t in asyncio.all_tasks())


async def test_sigterm_during_verify_exits_0_at_once(backend, running):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    proxy = await running({"api": upstream(a.url)}, routes(("api", "/")))
    proxy.write({"api": upstream(b.url)}, routes(("api", "/")), reload={"verify": 60})
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.admin_url("/reload"), headers=RELOAD) as response,
    ):
        assert "verify 60 s: watching upstream api" in await response.text()
    started = time.monotonic()
    proxy.process.signal(signal.SIGTERM)
    returncode, stderr = proxy.process.wait()
    assert (returncode, time.monotonic() - started < 5) == (0, True)
    assert "reload verified" not in stderr and "Task was destroyed" not in stderr


async def test_unchanged_upstreams_keep_their_warm_connections_across_the_rollback(
    backend, reloadable, loads
):
    keep = await backend(answering(named("keep")))
    a = await backend(answering(named("a")))
    bad = await backend(answering(FAILING))
    server, path = await reloadable(table({"api": a.url, "keep": keep.url}))
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/keep/")) as answer:
            assert await answer.read() == b"keep"
        load = loads(url(server, "/api/"))
        write_config(path, table({"api": bad.url, "keep": keep.url}) | {"reload": {"verify": 3}})
        assert (await post_reload(server.admin_address[1]))[0] == 200
        await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=5)
        await load.stop()
        async with session.get(url(server, "/keep/")) as answer:
            assert await answer.read() == b"keep"
    assert keep.connections == 1  # the same warm connection, before and after
    pools = server.current().upstreams
    assert pools["keep"].connector.created == 1
    assert pools["api"].settings.targets[0].url == a.url  # restored, in a new pool


async def test_an_upstream_changed_and_changed_back_during_a_watch_keeps_its_pool_at_rollback(
    backend, reloadable
):
    """A second reload restored keep's settings, so keep was built three times: the rollback
    must still see it as the upstream it replaces (same settings, same TLS files, none here)."""
    keep = await backend(answering(named("keep")))
    api = await backend(answering(named("api")))
    before = table({"api": api.url, "keep": keep.url})
    server, path = await reloadable(before)
    limited = before | {"upstreams": {**before["upstreams"],
                                      "keep": upstream(keep.url, pool={"limit": 5})}}  # fmt: skip
    write_config(path, limited | {"reload": {"verify": 30}})
    assert (await server.reload())[0]
    write_config(path, before | {"reload": {"verify": 30}})  # joins the watch
    assert (await server.reload())[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/keep/")) as answer:
            assert await answer.read() == b"keep"
        kept, connections = server.current().upstreams["keep"], keep.connections
        rolled_back, message = await server.roll_back("the test asks")
        assert rolled_back and "keep" not in message and "TLS" not in message, message
        async with session.get(url(server, "/keep/")) as answer:
            assert await answer.read() == b"keep"
    assert server.current().upstreams["keep"] is kept  # on 9b7b7df: rebuilt, pool lost
    assert keep.connections == connections


async def two_workers_rolled_back(
    backend: Any, tmp_path: Path, loads: Callable[..., Load], verify: int
) -> tuple[Any, str]:
    """Two workers on a good target, reloaded to one answering 500 with ?verify= under one
    client's load (one keep-alive connection: one worker gets all of it, the other none),
    until both rolled back. The proxy, and the reload's answer."""
    good = await backend(answering(named("a")))
    bad = await backend(answering(FAILING))
    proxy = await started(tmp_path, {"api": upstream(good.url)}, routes(("api", "/")))
    try:
        async with aiohttp.ClientSession() as session:
            proxy.write({"api": upstream(bad.url)}, routes(("api", "/")))
            load = loads(proxy.url("/"), loops=1, connector=aiohttp.TCPConnector(limit=1))
            query = f"/reload?verify={verify}"
            async with session.post(proxy.admin_url(query), headers=RELOAD) as response:
                text = await response.text()
                assert response.status == 200, text

            async def both() -> bool:  # summed over the workers
                return await proxy.reloads(session, "rolled_back") == 2

            await eventually(both, within=8)
            await load.stop()
    except BaseException:
        await stopped(proxy)
        raise
    return proxy, text


async def all_answer_a(proxy: Any, requests: int) -> None:
    fresh = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
    async with aiohttp.ClientSession(connector=fresh) as spread:
        for _ in range(requests):
            async with spread.get(proxy.url("/")) as answer:
                assert (answer.status, await answer.read()) == (200, b"a")


async def test_with_two_workers_one_rolling_back_rolls_back_the_other(backend, tmp_path, loads):
    proxy, text = await two_workers_rolled_back(backend, tmp_path, loads, verify=5)
    try:
        assert text.count("verify 5 s: watching upstream api") == 2, text
        await all_answer_a(proxy, 20)
    finally:
        _, stderr = await stopped(proxy)
    # The worker that saw it fail, and the other one, told by the supervisor.
    assert stderr.count(": reload rolled back: upstream api: ") == 1, stderr
    assert stderr.count(": reload rolled back: worker ") == 1, stderr
    assert stderr.count("reload rollback: worker ") == 1, stderr  # the supervisor's line


async def test_a_worker_started_again_after_a_rollback_serves_the_restored_config(
    backend, tmp_path, loads
):
    """The file still holds the rolled-back config: a worker that dies and is started again
    must not serve it (found by review: 15 of 40 requests got the bad target's 500)."""
    proxy, _ = await two_workers_rolled_back(backend, tmp_path, loads, verify=3)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.admin_url("/status.json")) as response:
                victim = (await response.json())["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)

            async def back() -> bool:
                async with session.get(proxy.admin_url("/status.json")) as response:
                    workers = (await response.json())["workers"]
                return all(w["answered"] for w in workers) and workers[0]["pid"] != victim

            await eventually(back, within=10)
        await all_answer_a(proxy, 40)
    finally:
        _, stderr = await stopped(proxy)
    assert "a worker started again starts from the restored config" in stderr


def test_check_diff_says_what_a_rollback_would_watch(tmp_path):
    running_path = write_config(
        tmp_path / "running.yaml",
        config_dict({"api": upstream("http://127.0.0.1:1")}, routes(("api", "/"))),
    )
    new_path = write_config(
        tmp_path / "new.yaml",
        config_dict(
            {"api": upstream("http://127.0.0.1:2"), "v2": upstream("http://127.0.0.1:3")},
            routes(("api", "/"), ("v2", "/v2/")),
            reload={"verify": 30},
        ),
    )
    result = run_cli("--config", str(new_path), "--check", "--diff", str(running_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config OK: 2 upstreams, 2 routes",
        "reload changed: reload.verify 0.0 -> 30.0",
        "route v2 added",
        f"upstream api changed: targets {targets('http://127.0.0.1:1')} -> "
        f"{targets('http://127.0.0.1:2')}",
        "upstream v2 added",
        "verify 30 s: watching upstream api, upstream v2, route v2 (max_error_ratio 0.05)",
    ]
