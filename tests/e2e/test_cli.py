"""The command line as a user runs it: `python -m proxy --config FILE [--check]`, signals."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.support import (
    REPO,
    ProxyProcess,
    config_dict,
    free_port,
    http_response,
    read_request,
    run_cli,
    upstream,
    write_config,
)


def test_check_accepts_the_shipped_config():
    result = run_cli("--config", str(REPO / "config.yaml"), "--check")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "config OK: 2 upstreams, 3 routes\n",
        "",
    )


@pytest.mark.parametrize(
    ("source", "line"),
    [
        (
            "upstreams:\n  api:\n    targets: [http://127.0.0.1:9001]\n    pool: {limit: -1}\n"
            "routes:\n  - {match: {path_prefix: /}, upstream: api}\n",
            "upstreams.api.pool.limit: must be an integer >= 0, got -1",
        ),
        (
            "upstreams:\n  api:\n    targets: [http://127.0.0.1:9001]\n    pool: {limt: 5}\n"
            "routes:\n  - {match: {path_prefix: /}, upstream: api}\n",
            "upstreams.api.pool: unknown key 'limt' "
            "(known: limit, limit_per_host, keepalive_timeout, max_requests, max_age, min_idle, "
            "backend_budget)",
        ),
        (
            "upstreams:\n  api: {targets: [http://a:1]}\n  static: {targets: [http://b:1]}\n"
            "routes:\n  - {match: {path_prefix: /a}, upstream: api}\n"
            "  - {match: {path_prefix: /b}, upstream: static}\n"
            "  - {match: {path_prefix: /}, upstream: apii}\n",
            "routes[2].upstream: unknown upstream 'apii' (known: api, static)",
        ),
        (
            "upstreams:\n  api: {targets: [http://a:1]\nroutes: []\n",
            "{path}: invalid YAML at line 3, column 1: expected ',' or '}}', but got '<scalar>'",
        ),
    ],
)
def test_check_prints_one_error_line_and_exits_2(tmp_path, source, line):
    path = tmp_path / "bad.yaml"
    path.write_text(source)
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == line.format(path=path) + "\n"


def test_missing_config_file_is_a_clear_error():
    result = run_cli("--config", "/nonexistent/config.yaml", "--check")
    assert result.returncode == 2
    assert result.stderr == (
        "/nonexistent/config.yaml: cannot read config file: No such file or directory\n"
    )


def test_serving_with_a_bad_config_starts_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("routes: 5\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_port_in_use_is_reported_without_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_dict({"app": upstream("http://127.0.0.1:1")}, listen={"port": port})
        config["admin"]["port"] = free_port()
        result = run_cli("--config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listen.port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_lets_in_flight_requests_finish_then_exits_0(backend, tmp_path, signum):
    received = asyncio.Event()
    release = asyncio.Event()

    async def slow(backend, reader, writer):
        await read_request(reader)
        received.set()
        await release.wait()
        writer.write(http_response(body=b"finished"))
        await writer.drain()
        await reader.read()

    origin = await backend(slow)
    port, admin_port = free_port(), free_port()
    config = config_dict({"app": upstream(origin.url)}, listen={"port": port})
    config["admin"]["port"] = admin_port
    process = ProxyProcess(write_config(tmp_path / "c.yaml", config), admin_port)
    try:
        await asyncio.to_thread(process.wait_ready)
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/slow"))
            await asyncio.wait_for(received.wait(), 5)
            process.signal(signum)
            await asyncio.sleep(0.3)
            # Draining: not ready, no new connections, but the request in flight goes on.
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                assert ready.status == 503
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{port}/new")
            release.set()
            async with await request as response:
                assert (response.status, await response.read()) == (200, b"finished")
        returncode, stderr = await asyncio.to_thread(process.wait)
    finally:
        process.kill()
    assert returncode == 0, stderr
    assert "draining" in stderr
    assert "Traceback" not in stderr


def test_rules_prints_the_slo_rules_of_a_config(tmp_path: Path) -> None:
    config = {
        "upstreams": {"api": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "api", "match": {"path_prefix": "/"}, "upstream": "api",
                    "slo": {"availability": 99.9, "latency": 0.25}}],
    }  # fmt: skip
    path = write_config(tmp_path / "proxy.yaml", config)
    done = run_cli("rules", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "alert: ProxyRouteErrorBudgetBurn" in done.stdout
    assert "alert: ProxyRouteLatencyBudgetBurn" in done.stdout
    config["routes"][0]["slo"] = {"latency": 0.3}  # type: ignore[index]
    done = run_cli("rules", "--config", str(write_config(path, config)))
    assert done.returncode == 2
    assert done.stderr.startswith("routes[0].slo.latency: must be a bound of the latency")
