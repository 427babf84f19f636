"""deploy/prometheus/slo-*.yml: the SLO rules generated from routes[].slo (proxy/slo.py).

The shipped rules are the generator's output for the shipped example (never stale), pass
`promtool check rules`, and `promtool test rules slo-rules_test.yml` fires every page from
synthetic series. Then the rules meet a real exposition: a proxy serves known traffic (5xx and
slow answers included), its /metrics becomes promtool's input, and the recording rules, pages
and the dashboard's SLO panels give the expected figures from it, so a renamed metric, label or
bucket spelling fails here.

Under CI=true these fail, not skip, when promtool is missing (tests/support.require_tool).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from proxy.config import load_config, parse_config
from proxy.slo import rules
from tests.support import (
    REPO,
    RawBackend,
    RawClient,
    admin_get,
    config_dict,
    eventually,
    get,
    http_response,
    metric_value,
    read_request,
    require_tool,
    upstream,
)

PROMETHEUS = REPO / "deploy" / "prometheus"
EXAMPLE = PROMETHEUS / "slo-example.yml"
RULES = PROMETHEUS / "slo-rules.yml"
TESTS = PROMETHEUS / "slo-rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "proxy-dashboard.json"


def promtool() -> str:
    return require_tool("promtool", "Debian: apt-get install -y prometheus")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def alerts_of(text: str) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "alert" in r]


def test_shipped_rules_are_the_generated_ones_for_the_example():
    expected = rules(load_config(EXAMPLE), source="deploy/prometheus/slo-example.yml")
    assert RULES.read_text() == expected, (
        "deploy/prometheus/slo-rules.yml is stale: python -m proxy rules --config "
        "deploy/prometheus/slo-example.yml > deploy/prometheus/slo-rules.yml"
    )


def test_shipped_rules_pass_promtool_check():
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_page_fires_on_the_series_that_should_trigger_it():
    result = run(promtool(), "test", "rules", TESTS.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every (alert, route, window) of the shipped rules is expected to fire somewhere...
    defined = {
        (a["alert"], a["labels"]["route"], a["labels"]["window"])
        for a in alerts_of(RULES.read_text())
    }
    cases = [
        case
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fired = {
        (case["alertname"], alert["exp_labels"]["route"], alert["exp_labels"]["window"])
        for case in cases
        for alert in case["exp_alerts"]
    }
    assert fired == defined
    # ...and each alert name is also expected to stay silent somewhere.
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert silent == {name for name, _, _ in defined}


def test_the_dashboards_slo_panels_use_recorded_series():
    dashboard = json.loads(DASHBOARD.read_text())
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "SLO"]
    below = [p for p in dashboard["panels"] if p["gridPos"]["y"] > row["gridPos"]["y"]]
    expressions = [t["expr"] for p in below for t in p.get("targets", [])]
    assert any("budget left" in p["title"].lower() for p in below)
    recorded = {
        r["record"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    used = {name for e in expressions for name in re.findall(r"\broute:[a-z0-9_]+:[a-z0-9_]+", e)}
    assert used and used <= recorded


# --- the rules against a real exposition ---

ROUTES = [
    {
        "name": "api",
        "match": {"path_prefix": "/api/"},
        "upstream": "app",
        "slo": {"availability": 99.9, "latency": 0.1, "latency_target": 95},
    },
    {
        # a name to quote; an integral bound, which prometheus_client writes "1.0"
        "name": 'files/*~"x"',
        "match": {"path_prefix": "/files/"},
        "upstream": "app",
        "slo": {"availability": 99, "latency": 1.0},
    },
    {"name": "other", "match": {"path_prefix": "/"}, "upstream": "app"},
]


def app(backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    async def serve() -> None:
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            if "slow" in request.target:
                await asyncio.sleep(0.3)
            status = 500 if "fail" in request.target else 200
            writer.write(http_response(status, "X", body=b"x"))
            await writer.drain()

    return serve()


def promql_string(value: str) -> str:
    return json.dumps(value)


def series_of(exposition: str) -> list[dict[str, str]]:
    """The exposition's samples the rules read, each as a counter growing by its value every
    minute (so its rate per minute is the exposed count)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "proxy_requests_total",
        "proxy_request_duration_seconds_bucket",
        "proxy_request_duration_seconds_count",
    }
    out = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in wanted:
                labels = ", ".join(f"{k}={promql_string(v)}" for k, v in sample.labels.items())
                out.append(
                    {"series": f"{sample.name}{{{labels}}}", "values": f"0+{sample.value:g}x90"}
                )
    return out


async def test_rules_and_dashboard_on_a_real_exposition(backend, proxy, tmp_path: Path):
    tool = promtool()
    origin = await backend(app)
    config = config_dict({"app": upstream(origin.url)}, ROUTES)
    server = await proxy(config)
    client = await RawClient.connect(server.proxy_address[1])
    try:
        # api: 20 requests, 4 answered 500, 5 slower than 0.1 s; files: 4 fast 200s.
        for path in ["/api/ok"] * 11 + ["/api/fail"] * 4 + ["/api/slow"] * 5 + ["/files/a"] * 4:
            await client.request(get(path))
    finally:
        await client.close()

    async def counted() -> bool:  # a request is counted once its response is finished
        exposition = (await admin_get(server, "/metrics"))[2]
        return metric_value(exposition, "proxy_request_duration_seconds_count", route=files) == 4

    files = 'files/*~"x"'
    await eventually(counted)
    exposition = (await admin_get(server, "/metrics"))[2]

    # What the rules read, named and labelled as the rules name them.
    text = rules(parse_config(config))
    for metric in re.findall(r"\bproxy_[a-z_]+\b", text):
        assert f"\n{metric}{{" in exposition, metric
    assert metric_value(exposition, "proxy_requests_total", route="api", code="500") == 4
    assert metric_value(exposition, "proxy_request_duration_seconds_bucket", route="api", le="0.1")
    assert metric_value(exposition, "proxy_request_duration_seconds_bucket", route=files, le="1.0")

    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    budget_left = panels["Error budget left per route (last 3 days)"]["targets"]
    burn_rate = panels["Burn rate per route (1h)"]["targets"]

    def panel(expr: str) -> str:
        return expr.replace("$route", ".*")

    (tmp_path / "rules.yml").write_text(text)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series_of(exposition),
                "promql_expr_test": [
                    {
                        "expr": f"round(1000 * {name})",
                        "eval_time": "80m",
                        "exp_samples": [
                            {"labels": f"{{route={promql_string(route)}}}", "value": value}
                            for route, value in values
                        ],
                    }
                    for name, values in [
                        ("route:slo_errors_per_request:ratio_rate5m", [("api", 200), (files, 0)]),
                        ("route:slo_errors_per_request:ratio_rate3d", [("api", 200), (files, 0)]),
                        (
                            "route:slo_slow_requests_per_request:ratio_rate1h",
                            [("api", 250), (files, 0)],
                        ),
                        (
                            "route:slo_slow_requests_per_request:ratio_rate6h",
                            [("api", 250), (files, 0)],
                        ),
                    ]
                ]
                + [
                    # The dashboard: burn rates 200 (0.2 / 0.001) and 5 (0.25 / 0.05); budget
                    # left 1 - 200 and 1 - 5 for api, all of it for files.
                    {
                        "expr": f"round({panel(target['expr'])})",
                        "eval_time": "80m",
                        "exp_samples": [
                            {"labels": f"{{route={promql_string(route)}}}", "value": value}
                            for route, value in values
                        ],
                    }
                    for target, values in [
                        (burn_rate[0], [("api", 200), (files, 0)]),
                        (burn_rate[1], [("api", 5), (files, 0)]),
                        (budget_left[0], [("api", -199), (files, 1)]),
                        (budget_left[1], [("api", -4), (files, 1)]),
                    ]
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "80m",
                        "alertname": "ProxyRouteErrorBudgetBurn",
                        "exp_alerts": [
                            {
                                "exp_labels": alert["labels"],
                                "exp_annotations": {
                                    key: value.replace("{{ $labels.route }}", "api").replace(
                                        '{{ $value | printf "%.1f" }}', "200.0"
                                    )
                                    for key, value in alert["annotations"].items()
                                },
                            }
                            for alert in alerts_of(text)
                            if alert["alert"] == "ProxyRouteErrorBudgetBurn"
                            and alert["labels"]["route"] == "api"
                        ],
                    },
                    {
                        # burn rate 5: below both thresholds
                        "eval_time": "80m",
                        "alertname": "ProxyRouteLatencyBudgetBurn",
                        "exp_alerts": [],
                    },
                ],
            }
        ],
    }
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = run(tool, "test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_any_route_name_survives_quoting_and_alert_templates(tmp_path: Path):
    name = 'host.test~^/a{{ .x }}"b\\c: #*'
    config = config_dict(
        {"app": upstream("http://127.0.0.1:9001")},
        [
            {
                "name": name,
                "match": {"path_prefix": "/"},
                "upstream": "app",
                "slo": {"availability": 99},
            }
        ],
    )
    text = rules(parse_config(config))
    (tmp_path / "rules.yml").write_text(text)
    route = promql_string(name)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'proxy_requests_total{{route={route}, code="500"}}',
                        "values": "0+10x30",
                    }
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": "ProxyRouteErrorBudgetBurn",
                        "exp_alerts": [
                            {
                                "exp_labels": {**alert["labels"], "route": name},
                                "exp_annotations": {
                                    key: value.replace("{{ $labels.route }}", name).replace(
                                        '{{ $value | printf "%.1f" }}', "100.0"
                                    )
                                    for key, value in alert["annotations"].items()
                                },
                            }
                            for alert in alerts_of(text)
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    tool = promtool()
    for args in (("check", "rules", "rules.yml"), ("test", "rules", "rules_test.yml")):
        result = run(tool, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
