"""deploy/: the Prometheus config and alert rules (checked and unit-tested by promtool), the
Grafana dashboard, and a real Prometheus scraping a running proxy.

Under CI=true these fail, not skip, when Prometheus is missing: CI installs it
(`apt-get install -y prometheus`), so a skip there would hide a broken install step.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import aiohttp
import yaml

from tests.support import (
    REPO,
    RawClient,
    admin_get,
    answering,
    config_dict,
    eventually,
    free_port,
    get,
    http_response,
    require_tool,
    stop_process,
    upstream,
)

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "proxy-dashboard.json"
ONLY_WITH_TLS = {"proxy_tls_certificate_expiry_timestamp_seconds"}


def tool(name: str) -> str:
    return require_tool(name, "Debian: apt-get install -y prometheus")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


def test_prometheus_config_and_rules_pass_promtool_check(tmp_path: Path):
    promtool = tool("promtool")
    # promtool checks that the token file exists: beside a copy, as the config expects it.
    for name in ("prometheus.yml", "alerts.yml"):
        (tmp_path / name).write_text((DEPLOY / "prometheus" / name).read_text())
    (tmp_path / "proxy-admin-token").write_text("a-token\n")
    for args in (
        ("check", "config", str(tmp_path / "prometheus.yml")),
        # compose's paths are the container's: its syntax only.
        ("check", "config", "--syntax-only", str(DEPLOY / "compose" / "prometheus.yml")),
        ("check", "rules", str(RULES)),
    ):
        result = run(promtool, *args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_configs_scrape_with_the_admin_token():
    for path in (DEPLOY / "prometheus" / "prometheus.yml", DEPLOY / "compose" / "prometheus.yml"):
        (job,) = yaml.safe_load(path.read_text())["scrape_configs"]
        assert job["authorization"]["type"] == "Bearer", path
        assert job["authorization"]["credentials_file"], path
        assert "credentials" not in job["authorization"], path  # no token in the config itself


def test_every_alert_fires_on_the_series_that_should_trigger_it():
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    )
    defined = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    assert tested == defined


async def served_exposition(backend, proxy) -> str:
    """The exposition of a proxy that has served one request and refused one connection."""
    origin = await backend(answering(http_response(body=b"ok")))
    server = await proxy(
        config_dict(
            {"api": upstream(origin.url), "down": upstream(f"http://127.0.0.1:{free_port()}")},
            [
                {"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "api"},
                {"name": "down", "match": {"path_prefix": "/"}, "upstream": "down"},
            ],
        )
    )
    client = await RawClient.connect(server.proxy_address[1])
    try:
        await client.request(get("/api/x"))
        await client.request(get("/x"))
    finally:
        await client.close()
    return (await admin_get(server, "/metrics"))[2]


async def test_exposition_passes_promtool_check_metrics(backend, proxy):
    text = await served_exposition(backend, proxy)
    result = run(tool("promtool"), "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # not even a lint warning


def names_used(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\bproxy_[a-z_]+\b", expr)}


async def test_every_metric_the_rules_and_dashboard_use_exists(backend, proxy):
    from prometheus_client.parser import text_string_to_metric_families

    text = await served_exposition(backend, proxy)
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    rules = [
        rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v["definition"] for v in dashboard["templating"]["list"]]
    used = names_used(rules) | names_used(panels) | names_used(variables)
    assert len(used) >= 10
    # Exposed only by a proxy with certificates: tests/e2e/test_tls_edge.py checks that one.
    assert used - exposed == ONLY_WITH_TLS


async def prometheus_query(session: aiohttp.ClientSession, port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query"
    async with session.get(url, params={"query": query}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def test_real_prometheus_scrapes_the_proxy(backend, proxy, tmp_path: Path):
    binary = tool("prometheus")
    origin = await backend(answering(http_response(body=b"ok")))
    server = await proxy(
        config_dict(
            {"api": upstream(origin.url, pool={"limit": 9})},
            [{"name": "api", "match": {"path_prefix": "/"}, "upstream": "api"}],
        )
    )
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for i in range(7):
            assert (await client.request(get(f"/{i}"))).status == 200
    finally:
        await client.close()

    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],  # the shipped rules load in a real Prometheus too
                "scrape_configs": [
                    {
                        "job_name": "proxy",
                        "static_configs": [{"targets": [f"127.0.0.1:{server.admin_address[1]}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as stderr:
        prometheus = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        async with aiohttp.ClientSession() as session:

            async def scraped() -> bool:
                if prometheus.returncode is not None:
                    raise AssertionError(f"prometheus exited: {log.read_text()}")
                try:
                    result = await prometheus_query(
                        session, port, 'proxy_requests_total{route="api"}'
                    )
                except (aiohttp.ClientConnectionError, aiohttp.ContentTypeError):
                    return False  # not listening yet, or 503 while its storage starts
                return bool(result)

            await eventually(scraped, within=30)
            up = await prometheus_query(session, port, 'up{job="proxy"}')
            assert [r["value"][1] for r in up] == ["1"]
            requests = await prometheus_query(
                session, port, 'proxy_requests_total{route="api",method="GET",code="200"}'
            )
            assert [r["value"][1] for r in requests] == ["7"]
            idle = await prometheus_query(
                session, port, 'proxy_upstream_connections{upstream="api",state="idle"}'
            )
            assert [r["value"][1] for r in idle] == ["1"]
            limit = await prometheus_query(session, port, "proxy_upstream_pool_limit")
            assert [(r["metric"]["upstream"], r["value"][1]) for r in limit] == [("api", "9")]
            created = await prometheus_query(
                session, port, "proxy_upstream_connections_created_total"
            )
            assert [r["value"][1] for r in created] == ["1"]
    finally:
        await stop_process(prometheus)


async def test_every_exposed_metric_is_documented_in_the_readme(backend, proxy):
    from prometheus_client.parser import text_string_to_metric_families

    text = await served_exposition(backend, proxy)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Metrics") : readme.index("### The live pool view")]
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{name}` |" in table, name
    for name in ("proxy_config_reloads_total", "proxy_workers", "proxy_worker_restarts_total"):
        assert f"`{name}`" in readme, name
