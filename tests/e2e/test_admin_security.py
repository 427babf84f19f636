"""The admin listener answers operators only: a bearer token (admin.token_file) on everything but
the probes, a Host check against DNS rebinding, and a header POST /reload must carry against
cross-site requests. Real proxies (in process, and as subprocesses for SIGHUP and `workers: 2`),
real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import ConfigError, load_config
from proxy.server import ProxyServer
from tests.e2e.test_operations import Running, routes
from tests.support import (
    RELOAD,
    RawClient,
    answering,
    config_dict,
    eventually,
    free_port,
    http_response,
    metric_value,
    require_tool,
    run_cli,
    stop_process,
    upstream,
    write_config,
)

TOKEN = "s3cret-admin-token"
Start = Callable[..., Awaitable[ProxyServer]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def admin(backend, tmp_path: Path) -> AsyncIterator[Start]:
    """A ProxyServer started from a config file (so POST /reload has one to read), with the
    given `admin:` keys; `token` writes the token file first."""
    servers: list[ProxyServer] = []
    origin = await backend(answering(http_response(body=b"ok")))

    async def start(token: str | None = None, **keys: Any) -> ProxyServer:
        config = config_dict({"api": upstream(origin.url)})
        if token is not None:
            (tmp_path / "token").write_text(token)
            keys["token_file"] = str(tmp_path / "token")
        config["admin"].update(keys)
        path = write_config(tmp_path / "proxy.yaml", config)
        server = ProxyServer(load_config(path), config_path=path, shutdown_grace=2.0)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def call(
    server: ProxyServer | int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    port = server if isinstance(server, int) else server.admin_address[1]
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.text()


async def unauthorized(server: ProxyServer | int, reason: str) -> float:
    _, _, text = await call(server, "GET", "/metrics", bearer(TOKEN))
    return metric_value(text, "proxy_admin_unauthorized_total", reason=reason)


# --- the token ---


async def test_without_a_token_file_everything_answers_as_before(admin):
    server = await admin()
    for path in ("/metrics", "/pools", "/healthz", "/readyz"):
        assert (await call(server, "GET", path))[0] == 200, path
    status, _, text = await call(server, "POST", "/reload", RELOAD)
    assert (status, text) == (200, "no changes\n")
    assert await unauthorized(server, "missing") == 0


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/metrics"), ("GET", "/pools"), ("POST", "/reload")]
)
async def test_with_a_token_every_endpoint_but_the_probes_needs_it(admin, method, path):
    server = await admin(token=f"  {TOKEN}\n")  # surrounding whitespace is not the token's
    for headers in ({}, bearer("wrong"), bearer(TOKEN + "x"), {"Authorization": TOKEN}):
        status, answer, text = await call(server, method, path, {**RELOAD, **headers})
        assert (status, answer["WWW-Authenticate"]) == (401, "Bearer"), headers
        assert text == "a bearer token is required (admin.token_file)\n"
    status, _, _ = await call(server, method, path, {**RELOAD, **bearer(TOKEN)})
    assert status == 200
    # The scheme is case-insensitive (RFC 9110 §11.1).
    lower_case = {**RELOAD, "Authorization": f"bearer {TOKEN}"}
    assert (await call(server, method, path, lower_case))[0] == 200


async def test_probes_answer_without_the_token(admin):
    server = await admin(token=TOKEN)
    assert (await call(server, "GET", "/healthz"))[:1] == (200,)
    assert (await call(server, "GET", "/readyz"))[2] == "serving\n"
    assert (await call(server, "HEAD", "/readyz"))[0] == 200
    # An unknown path is not a way around the token: 401 before 404.
    assert (await call(server, "GET", "/nope"))[0] == 401
    assert (await call(server, "GET", "/nope", bearer(TOKEN)))[0] == 404


async def test_the_unauthorized_counter_counts_each_refusal_by_reason(admin):
    server = await admin(token=TOKEN)
    sequence = [
        ({}, 401),  # missing
        ({"Authorization": f"Basic {TOKEN}"}, 401),  # missing: not a bearer token
        ({"Authorization": "Bearer "}, 401),  # missing: no credentials
        (bearer("guess-1"), 401),  # wrong
        (bearer("guess-2"), 401),  # wrong
        (bearer(TOKEN), 200),
    ]
    for headers, expected in sequence:
        assert (await call(server, "GET", "/pools", headers))[0] == expected
    for _ in range(3):  # probes never count
        assert (await call(server, "GET", "/healthz"))[0] == 200
    assert await unauthorized(server, "missing") == 3
    assert await unauthorized(server, "wrong") == 2


async def test_a_token_file_that_is_empty_or_unreadable_is_a_config_error(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    config = config_dict({"api": upstream("http://127.0.0.1:1")})
    for token_file, message in (
        (empty, f"admin.token_file: must hold a token, got an empty file '{empty}'"),
        (
            tmp_path / "absent",
            f"admin.token_file: cannot read '{tmp_path / 'absent'}' (No such file or directory)",
        ),
    ):
        config["admin"]["token_file"] = str(token_file)
        path = write_config(tmp_path / "proxy.yaml", config)
        result = run_cli("--config", str(path), "--check")
        assert (result.returncode, result.stderr) == (2, message + "\n")
        with pytest.raises(ConfigError, match=r"^admin\.token_file: "):
            ProxyServer(load_config(path))


async def test_post_reload_reads_the_token_file_again(admin, tmp_path: Path):
    server = await admin(token=TOKEN)
    (tmp_path / "token").write_text("the-new-token\n")
    status, _, text = await call(server, "POST", "/reload", {**RELOAD, **bearer(TOKEN)})
    assert (status, text) == (200, "no changes\n")  # the config file is the same
    assert (await call(server, "GET", "/pools", bearer(TOKEN)))[0] == 401
    assert (await call(server, "GET", "/pools", bearer("the-new-token")))[0] == 200

    (tmp_path / "token").write_text("")  # rejected like a bad config: the token stays
    status, _, text = await call(server, "POST", "/reload", {**RELOAD, **bearer("the-new-token")})
    assert status == 400
    empty = tmp_path / "token"
    assert text == f"admin.token_file: must hold a token, got an empty file '{empty}'\n"
    assert (await call(server, "GET", "/pools", bearer("the-new-token")))[0] == 200
    _, _, metrics = await call(server, "GET", "/metrics", bearer("the-new-token"))
    assert metric_value(metrics, "proxy_config_reloads_total", result="failure") == 1


async def test_sighup_rotates_the_token_and_keeps_it_when_the_file_is_unreadable(
    backend, tmp_path: Path
):
    origin = await backend(answering(http_response(body=b"ok")))
    token = tmp_path / "admin-token"
    token.write_text("first\n")
    admin_keys = {"host": "127.0.0.1", "token_file": str(token)}
    proxy = Running(tmp_path, {"api": upstream(origin.url)}, routes(("api", "/")), admin=admin_keys)
    try:
        await asyncio.to_thread(proxy.process.wait_ready)  # /readyz: no token needed
        assert (await call(proxy.admin, "GET", "/metrics", bearer("first")))[0] == 200
        assert (await call(proxy.admin, "GET", "/metrics", bearer("second")))[0] == 401

        token.write_text("second\n")
        proxy.process.signal(signal.SIGHUP)

        async def rotated() -> bool:
            return (await call(proxy.admin, "GET", "/metrics", bearer("second")))[0] == 200

        await eventually(rotated)
        assert (await call(proxy.admin, "GET", "/metrics", bearer("first")))[0] == 401

        token.unlink()
        proxy.process.signal(signal.SIGHUP)

        async def rejected() -> bool:
            _, _, text = await call(proxy.admin, "GET", "/metrics", bearer("second"))
            return metric_value(text, "proxy_config_reloads_total", result="failure") == 1

        await eventually(rejected)
        assert (await call(proxy.admin, "GET", "/pools", bearer("second")))[0] == 200
    finally:
        proxy.process.signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr
    rejected_line = "reload rejected, still serving the previous config: admin.token_file: "
    assert f"{rejected_line}cannot read '{token}' (No such file or directory)" in stderr


# --- POST /reload against cross-site requests ---


async def test_post_reload_without_the_custom_header_or_json_is_refused(admin):
    server = await admin()
    # What a cross-site form or no-cors fetch can send: no custom header, a "simple" type.
    for headers in (
        {},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
    ):
        status, _, text = await call(server, "POST", "/reload", headers)
        assert (status, text) == (
            403,
            "POST /reload needs the header X-Proxy-Reload: 1 or Content-Type: application/json "
            "(a guard against cross-site requests)\n",
        )
    _, _, metrics = await call(server, "GET", "/metrics")
    assert metric_value(metrics, "proxy_config_reloads_total", result="success") == 0
    assert (await call(server, "POST", "/reload", RELOAD))[0] == 200
    # A browser sends this type cross-site only after a preflight the listener never grants.
    assert (await call(server, "POST", "/reload", {"Content-Type": "application/json"}))[0] == 200


async def test_with_a_token_a_missing_token_is_refused_before_the_header(admin):
    server = await admin(token=TOKEN)
    assert (await call(server, "POST", "/reload"))[0] == 401
    assert (await call(server, "POST", "/reload", bearer(TOKEN)))[0] == 403


# --- Host, against DNS rebinding ---


async def raw_status(port: int, request: bytes) -> int:
    client = await RawClient.connect(port)
    try:
        return (await client.request(request)).status
    finally:
        await client.close()


def request_with_host(host: str | None, path: str = "/metrics", version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}"] + ([f"Host: {host}"] if host is not None else [])
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1")


async def test_the_admin_listener_answers_only_for_ip_literals_localhost_and_allowed_hosts(admin):
    server = await admin(allowed_hosts=["proxy-admin.internal"])
    port = server.admin_address[1]
    answered = [
        f"127.0.0.1:{port}", "127.0.0.1", "10.1.2.3:9901", "[::1]", f"[::1]:{port}",
        "[fd00::7]:9901", "localhost", f"LocalHost:{port}", "localhost.",
        "proxy-admin.internal", f"Proxy-Admin.Internal:{port}",
    ]  # fmt: skip
    refused = [
        "evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example",
        "proxy-admin.internal.evil.example", "[::1", "",
    ]  # fmt: skip
    for host in answered:
        assert await raw_status(port, request_with_host(host)) == 200, host
    for host in refused:
        assert await raw_status(port, request_with_host(host)) == 421, host
        assert await raw_status(port, request_with_host(host, "/healthz")) == 421, host
    # No Host at all: never a browser (HTTP/1.0), answered.
    assert await raw_status(port, request_with_host(None, version="1.0")) == 200


async def test_a_reload_applies_allowed_hosts_and_says_so(admin, tmp_path: Path):
    server = await admin()
    port = server.admin_address[1]
    assert await raw_status(port, request_with_host("proxy-0.proxy")) == 421
    config = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
    config["admin"]["allowed_hosts"] = ["Proxy-0.proxy"]
    write_config(tmp_path / "proxy.yaml", config)
    status, _, text = await call(server, "POST", "/reload", RELOAD)
    assert (status, text) == (200, "admin changed: admin.allowed_hosts () -> ('proxy-0.proxy',)\n")
    assert await raw_status(port, request_with_host("proxy-0.proxy:9901")) == 200


async def test_a_refused_host_is_told_why_in_one_line(admin):
    server = await admin(token=TOKEN)
    status, _, text = await call(
        server, "GET", "/metrics", {**bearer(TOKEN), "Host": "evil.example:9901"}
    )
    assert (status, text) == (
        421,
        "the admin listener does not answer for host 'evil.example:9901' (admin.allowed_hosts)\n",
    )
    assert await unauthorized(server, "missing") == 0  # a Host refusal is not a 401


# --- workers: the supervisor's listener ---


async def test_with_workers_the_supervisor_asks_for_the_token_and_rotates_it(
    backend, tmp_path: Path
):
    origin = await backend(answering(http_response(body=b"ok")))
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    admin_keys = {"host": "127.0.0.1", "token_file": str(token)}
    proxy = Running(
        tmp_path, {"api": upstream(origin.url)}, routes(("api", "/")), workers=2, admin=admin_keys
    )
    try:
        await asyncio.to_thread(proxy.process.wait_ready)
        assert (await call(proxy.admin, "GET", "/pools"))[0] == 401
        assert (await call(proxy.admin, "GET", "/metrics", bearer("wrong")))[0] == 401
        status, _, text = await call(proxy.admin, "GET", "/pools", bearer(TOKEN))
        assert status == 200 and len(yaml.safe_load(text)["workers"]) == 2
        # The supervisor's refusals and its workers' (none: it asks them with their secret).
        assert await unauthorized(proxy.admin, "missing") == 1
        assert await unauthorized(proxy.admin, "wrong") == 1
        _, _, text = await call(proxy.admin, "GET", "/metrics", bearer(TOKEN))
        assert text.count("# TYPE proxy_admin_unauthorized_total counter") == 1  # one family
        assert (await call(proxy.admin, "POST", "/reload", bearer(TOKEN)))[0] == 403
        # The workers' own admin sockets (abstract: anything in the network namespace can
        # connect) answer only the supervisor's secret, not even the operators' token.
        prefix = f"@proxy-{proxy.process.proc.pid}-"
        table = await asyncio.to_thread(Path("/proc/net/unix").read_text)
        names = [line.split()[-1] for line in table.splitlines()]
        sockets = sorted({name for name in names if name.startswith(prefix)})
        assert len(sockets) == 2, names
        for name in sockets:
            connector = aiohttp.UnixConnector(path="\0" + name[1:])
            async with aiohttp.ClientSession(connector=connector) as session:
                for headers in ({}, bearer(TOKEN)):
                    async with session.get("http://localhost/pools", headers=headers) as answer:
                        assert answer.status == 401

        token.write_text("rotated")
        status, _, text = await call(proxy.admin, "POST", "/reload", {**RELOAD, **bearer(TOKEN)})
        assert status == 200, text
        assert len(text.splitlines()) == 2  # each worker applied it
        assert (await call(proxy.admin, "GET", "/pools", bearer(TOKEN)))[0] == 401
        assert (await call(proxy.admin, "GET", "/pools", bearer("rotated")))[0] == 200
    finally:
        proxy.process.signal(signal.SIGTERM)
        returncode, stderr = await asyncio.to_thread(proxy.process.wait)
    assert returncode == 0, stderr


# --- Prometheus with the token, as deploy/ ships it ---


async def test_real_prometheus_scrapes_with_a_credentials_file(admin, tmp_path: Path):
    binary = require_tool("prometheus", "Debian: apt-get install -y prometheus")
    server = await admin(token=TOKEN)
    shipped = yaml.safe_load(
        (Path(__file__).parents[2] / "deploy" / "prometheus" / "prometheus.yml").read_text()
    )
    (job,) = shipped["scrape_configs"]
    job["authorization"]["credentials_file"] = str(tmp_path / "token")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.admin_address[1]}"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]})
    )
    port = free_port()
    prometheus = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                url = f"http://127.0.0.1:{port}/api/v1/query"
                try:
                    async with session.get(url, params={"query": "up"}) as response:
                        body = await response.json()
                except (aiohttp.ClientConnectionError, aiohttp.ContentTypeError):
                    return False
                return [r["value"][1] for r in body["data"]["result"]] == ["1"]

            await eventually(up, within=30)
        assert await unauthorized(server, "missing") == 0
    finally:
        await stop_process(prometheus)
