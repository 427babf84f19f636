"""`workers: 2`: worker processes on one port, restarted when they die, with metrics merged that
never go down, reloads answered per worker, the client port checked at start-up, and nothing
written to disk."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics

from tests.e2e.test_operations import Running, get_body, named, routes
from tests.support import (
    RELOAD,
    REPO,
    ProxyProcess,
    answering,
    config_dict,
    eventually,
    free_port,
    upstream,
    write_config,
)


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


async def stopped(proxy: Running | ProxyProcess) -> tuple[int, str]:
    process = proxy.process if isinstance(proxy, Running) else proxy
    if process.proc.poll() is None:
        process.signal(signal.SIGTERM)
    return await asyncio.to_thread(process.wait)


async def post_reload(session: aiohttp.ClientSession, proxy: Running) -> tuple[int, str]:
    async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
        return response.status, await response.text()


async def totals(session: aiohttp.ClientSession, proxy: Running) -> dict[tuple[str, str], float]:
    """Every sample of every counter and histogram, read as OpenMetrics (whose parser also
    checks that each histogram's samples come together and in order)."""
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with session.get(f"http://127.0.0.1:{proxy.admin}/metrics", headers=headers) as answer:
        text = await answer.text()
    return {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in openmetrics(text)
        if family.type in ("counter", "histogram")
        for s in family.samples
    }


async def test_the_supervisors_status_right_after_a_reload_is_the_reloaded_one(backend, tmp_path):
    """Pages share a round of questions to the workers for a second; a reload starts anew."""
    a = await backend(answering(named("a")))
    proxy = Running(tmp_path, {"a": upstream(a.url)}, routes(("a", "/")), workers=2)
    try:
        await asyncio.to_thread(proxy.process.wait_ready)
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.admin_url("/status.json")) as response:
                before = (await response.json())["config_hash"]
            proxy.write({"a": upstream(a.url, pool={"limit": 7})}, routes(("a", "/")))
            async with session.post(proxy.admin_url("/reload"), headers=RELOAD) as response:
                assert response.status == 200, await response.text()
            async with session.get(proxy.admin_url("/status.json")) as response:
                after = await response.json()
        assert after["config_hash"] not in ("", before)  # on 3311d4c: the one from before
        assert after["last_reload"]["result"] == "success"
        assert after["upstreams"]["a"]["limit"] == 14  # 7 per worker
    finally:
        assert (await stopped(proxy))[0] == 0


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
        returncode, stderr = await stopped(proxy)
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
        returncode, stderr = await stopped(proxy)
    assert returncode == 0, stderr
    assert "exited with -9; starting it again" in stderr


async def test_merged_counters_never_decrease_when_a_worker_is_slow_killed_or_replaced(
    backend, tmp_path
):
    a = await backend(answering(named("a")))
    proxy = await started(tmp_path, {"a": upstream(a.url)}, routes(("a", "/")))
    requests = ("proxy_requests_total", json.dumps(
        {"code": "200", "method": "GET", "route": "a", "upstream": "a"}, sort_keys=True
    ))  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            await spread(session, proxy, 40)
            workers = await pools(session, proxy)
            assert all(w["upstreams"]["a"]["requests"] for w in workers)  # both counted some

            async def all_counted() -> bool:
                return (await totals(session, proxy)).get(requests) == 40

            await eventually(all_counted)
            scrapes = [await totals(session, proxy)]
            os.kill(workers[1]["pid"], signal.SIGSTOP)  # slow: the scrape gives up on it
            try:
                scrapes.append(await totals(session, proxy))
            finally:
                os.kill(workers[1]["pid"], signal.SIGCONT)
            os.kill(workers[0]["pid"], signal.SIGKILL)
            scrapes.append(await totals(session, proxy))  # worker 0 down

            async def replaced() -> bool:
                now = await pools(session, proxy)
                return now[0]["pid"] != workers[0]["pid"] and now[0]["upstreams"] is not None

            await eventually(replaced, within=15)
            scrapes.append(await totals(session, proxy))  # worker 0 a new process, from 0
            await spread(session, proxy, 20)

            async def counted_again() -> bool:
                scrapes.append(await totals(session, proxy))
                return scrapes[-1][requests] == 60

            await eventually(counted_again)
        for before, after in itertools.pairwise(scrapes):
            decreased = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
            assert not decreased
    finally:
        returncode, stderr = await stopped(proxy)
    assert returncode == 0, stderr


async def test_post_reload_answers_once_every_worker_applied_it_with_a_line_each(backend, tmp_path):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    both = {"a": upstream(a.url), "b": upstream(b.url)}
    proxy = await started(tmp_path, both, routes(("a", "/")))
    try:
        async with aiohttp.ClientSession() as session:
            pids = [w["pid"] for w in await pools(session, proxy)]
            proxy.write(both, [{"name": "a", "match": {"path_prefix": "/"}, "upstream": "b"}])
            status, text = await post_reload(session, proxy)
            assert status == 200, text
            assert text.splitlines() == [
                f"worker {i} (pid {pid}): route a changed: upstream 'a' -> 'b'"
                for i, pid in enumerate(pids)
            ]
            # Applied by both before the answer: new connections on either worker go to b.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                answers = await asyncio.gather(
                    *(get_body(fresh, proxy.url("/")) for _ in range(20))
                )
            assert answers == [(200, b"b")] * 20

            proxy.path.write_text("upstreams: [\n")
            status, text = await post_reload(session, proxy)
            lines = text.splitlines()
            assert status == 400 and len(lines) == 2, text
            for i, (pid, line) in enumerate(zip(pids, lines, strict=True)):
                assert line.startswith(f"worker {i} (pid {pid}): {proxy.path}: invalid YAML")
            # Every counter is summed: each worker counts the reloads it applied or refused.
            assert await proxy.reloads(session, "success") == 2
            assert await proxy.reloads(session, "failure") == 2
    finally:
        returncode, stderr = await stopped(proxy)
    assert returncode == 0, stderr


async def test_post_reload_says_which_worker_is_down(backend, tmp_path):
    a = await backend(answering(named("a")))
    proxy = await started(tmp_path, {"a": upstream(a.url)}, routes(("a", "/")))
    try:
        async with aiohttp.ClientSession() as session:
            pids = [w["pid"] for w in await pools(session, proxy)]
            os.kill(pids[0], signal.SIGKILL)

            async def down() -> bool:
                return (await pools(session, proxy))[0]["upstreams"] is None

            await eventually(down)
            status, text = await post_reload(session, proxy)
            assert status == 400
            assert text.splitlines() == [
                "worker 0: down or not answering, not reloaded",
                f"worker 1 (pid {pids[1]}): no changes",
            ]

            async def back() -> bool:
                return (await pools(session, proxy))[0]["upstreams"] is not None

            await eventually(back, within=15)  # a worker missing at the stop would exit 1
    finally:
        returncode, stderr = await stopped(proxy)
    assert returncode == 0, stderr


async def test_sighup_reloads_every_worker_and_logs_each_answer(backend, tmp_path):
    a = await backend(answering(named("a")))
    b = await backend(answering(named("b")))
    proxy = await started(
        tmp_path, {"a": upstream(a.url), "b": upstream(b.url)}, routes(("a", "/"))
    )
    try:
        proxy.write(
            {"a": upstream(a.url), "b": upstream(b.url)},
            [{"name": "a", "match": {"path_prefix": "/"}, "upstream": "b"}],
        )
        proxy.process.signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as session:

            async def both_reloaded() -> bool:
                return await proxy.reloads(session, "success") == 2  # once per worker

            await eventually(both_reloaded, within=10)
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                answers = await asyncio.gather(
                    *(get_body(fresh, proxy.url("/")) for _ in range(20))
                )
            assert answers == [(200, b"b")] * 20
    finally:
        returncode, stderr = await stopped(proxy)
    assert returncode == 0, stderr
    for i in (0, 1):
        assert f"reload: worker {i} (pid " in stderr, stderr


async def ended(process: ProxyProcess, within: float) -> tuple[int, str]:
    """Its exit code and stderr once it exits by itself; if it is still running after `within`
    seconds, the test fails, and SIGTERM stops it (and its workers, through it)."""
    try:
        return await asyncio.to_thread(process.wait, within)
    except subprocess.TimeoutExpired:
        process.signal(signal.SIGTERM)
        code, stderr = await asyncio.to_thread(process.wait)
        pytest.fail(f"still running after {within} s (exited with {code} on SIGTERM): {stderr}")


def start(tmp_path: Path, listen: dict, workers: int = 2, name: str = "proxy") -> ProxyProcess:
    admin = free_port()
    config = config_dict({"a": upstream("http://127.0.0.1:9")}, listen=listen, workers=workers)
    config["admin"]["port"] = admin
    return ProxyProcess(write_config(tmp_path / f"{name}.yaml", config), admin)


@pytest.mark.parametrize("taken", ["by a listener without SO_REUSEPORT", "not on this machine"])
async def test_a_client_port_that_cannot_be_bound_exits_1_as_one_process_does(tmp_path, taken):
    with socket.socket() as other:
        if taken == "not on this machine":
            listen = {"host": "192.0.2.1", "port": free_port()}  # TEST-NET-1
        else:
            other.bind(("127.0.0.1", 0))
            other.listen()
            listen = {"host": "127.0.0.1", "port": other.getsockname()[1]}
        single = start(tmp_path, listen, workers=1, name="single")
        code, single_err = await ended(single, 10)
        assert code == 1
        began = time.monotonic()
        supervisor = start(tmp_path, listen)
        code, stderr = await ended(supervisor, 10)
    assert code == 1 and time.monotonic() - began < 5, stderr
    line = stderr.strip().splitlines()[-1]
    assert line == single_err.strip().splitlines()[-1], (stderr, single_err)
    assert line.startswith(f"proxy: cannot listen on {listen['host']}:{listen['port']} (")
    assert line.endswith("): free the port or change listen.port in the config")
    assert "started (pid" not in stderr  # no worker was started


async def test_every_worker_failing_its_first_start_exits_1(tmp_path):
    """The config file is a FIFO: the supervisor reads a valid config, each worker a broken one."""
    fifo = tmp_path / "proxy.yaml"
    os.mkfifo(fifo)
    admin, port = free_port(), free_port()
    config = config_dict({"a": upstream("http://127.0.0.1:9")}, listen={"port": port}, workers=2)
    config["admin"]["port"] = admin
    write_config(tmp_path / "valid.yaml", config)
    valid = (tmp_path / "valid.yaml").read_bytes()
    proxy = ProxyProcess(fifo, admin)

    def feed() -> None:
        with open(fifo, "wb") as supervisor:
            supervisor.write(valid)
        # Until its admin port is bound, the supervisor may still be reading the file.
        while proxy.proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", admin)):
                break
            time.sleep(0.02)
        while proxy.proc.poll() is None:  # every worker that opens the file reads a broken one
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO  # no reader yet
            else:
                os.write(fd, b"upstreams: [\n")
                os.close(fd)
            time.sleep(0.02)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        code, stderr = await ended(proxy, 20)
    finally:
        feeder.join()
    assert code == 1, stderr
    assert "every worker exited with 1 at its first start: stopping" in stderr
    assert stderr.count("proxy worker: ") >= 2  # each says why


# A private mount namespace in which / (and /tmp, /var/tmp if mounted apart) are read-only, as
# `readOnlyRootFilesystem: true` makes them. Needs root (CAP_SYS_ADMIN); skipped otherwise.
READ_ONLY = [
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    'mount -o remount,bind,ro / && for m in /tmp /var/tmp; do '
    '! mountpoint -q "$m" || mount -o remount,bind,ro "$m" || exit 1; done && exec "$@"',
    "read-only",
]  # fmt: skip


async def test_workers_start_and_serve_on_a_read_only_filesystem(backend, tmp_path):
    probe = await asyncio.to_thread(
        subprocess.run,
        [*READ_ONLY, sys.executable, "-c", "import tempfile; tempfile.mkdtemp()"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if "No usable temporary directory" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount namespace here: {probe.stderr.strip()}")
    a = await backend(answering(named("a")))
    port, admin = free_port(), free_port()
    config = config_dict({"a": upstream(a.url)}, listen={"port": port}, workers=2)
    config["admin"]["port"] = admin
    path = write_config(tmp_path / "proxy.yaml", config)
    proxy = ProxyProcess(path, admin, wrapper=READ_ONLY)
    try:
        await asyncio.to_thread(proxy.wait_ready)
        async with aiohttp.ClientSession() as session:
            assert await get_body(session, f"http://127.0.0.1:{port}/") == (200, b"a")
            url = f"http://127.0.0.1:{admin}/metrics"
            async with session.get(url) as response:
                text = await response.text()
            assert 'proxy_requests_total{code="200"' in text
    finally:
        code, stderr = await stopped(proxy)
        proxy.kill()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def samples(merged) -> dict[tuple[str, str], float]:
    return {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in merged
        for s in family.samples
    }


WORKER = (
    "# TYPE proxy_requests_total counter\n"
    'proxy_requests_total{{code="200"}} {n}\n'
    "# TYPE proxy_upstream_connections gauge\n"
    'proxy_upstream_connections{{upstream="a",state="idle"}} {n}\n'
    "# TYPE proxy_upstream_pool_limit gauge\n"
    'proxy_upstream_pool_limit{{upstream="a"}} 9\n'
    "# TYPE proxy_upstream_target_up gauge\n"
    'proxy_upstream_target_up{{upstream="a",target="t"}} {up}\n'
    "# TYPE proxy_config_reloads_total counter\n"
    'proxy_config_reloads_total{{result="success"}} 1\n'
)
REQUESTS = ("proxy_requests_total", '{"code": "200"}')
IDLE = ("proxy_upstream_connections", '{"state": "idle", "upstream": "a"}')


def test_merge_sums_every_counter_and_aggregates_each_gauge_by_its_meaning():
    from proxy.merging import Merger

    merged = samples(Merger().merge([(1, WORKER.format(n=3, up=1)), (2, WORKER.format(n=4, up=0))]))
    assert merged[REQUESTS] == 7
    assert merged[IDLE] == 7
    assert merged[("proxy_upstream_pool_limit", '{"upstream": "a"}')] == 9
    assert merged[("proxy_upstream_target_up", '{"target": "t", "upstream": "a"}')] == 0
    assert merged[("proxy_config_reloads_total", '{"result": "success"}')] == 2


def test_merge_keeps_the_totals_of_a_silent_or_replaced_worker_but_not_its_gauges():
    from proxy.merging import Merger

    merger = Merger()
    merger.merge([(1, WORKER.format(n=3, up=1)), (2, WORKER.format(n=4, up=1))])
    silent = samples(merger.merge([(1, WORKER.format(n=5, up=1)), None]))
    assert silent[REQUESTS] == 5 + 4 and silent[IDLE] == 5  # worker 2's last total, no gauge
    replaced = samples(merger.merge([(1, WORKER.format(n=5, up=1)), (3, WORKER.format(n=1, up=1))]))
    assert replaced[REQUESTS] == 5 + 4 + 1  # pid 2's last total is kept in the baseline
    assert replaced[IDLE] == 5 + 1
    # A series that starts again in the same process (a pool replaced by a reload) too.
    again = samples(merger.merge([(1, WORKER.format(n=2, up=1)), (3, WORKER.format(n=1, up=1))]))
    assert again[REQUESTS] == 5 + 2 + 4 + 1
