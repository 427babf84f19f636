"""proxy/slo.py: the recording rules and burn-rate pages generated from routes[].slo."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from proxy import slo
from proxy.config import LATENCY_BUCKETS, Config, parse_config


def config(*routes: dict[str, Any]) -> Config:
    return parse_config(
        {
            "upstreams": {"api": {"targets": ["http://127.0.0.1:9001"]}},
            "routes": [{"upstream": "api", **route} for route in routes],
        }
    )


def generated(*routes: dict[str, Any]) -> dict[str, Any]:
    document = yaml.safe_load(slo.rules(config(*routes)))
    assert isinstance(document, dict)
    return document


def group(document: dict[str, Any], name: str) -> list[dict[str, Any]]:
    (rules,) = [g["rules"] for g in document["groups"] if g["name"] == f"proxy-slo:{name}"]
    return list(rules)


def by_name(rules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in rules if "record" in r and r["record"] != slo.OBJECTIVE}


API_BOTH = {
    "name": "api",
    "match": {"path_prefix": "/api/"},
    "slo": {"availability": 99.9, "latency": 0.25, "latency_target": 99},
}


def test_the_recording_rules_of_a_route_with_both_objectives():
    rules = group(generated(API_BOTH), "api")
    recorded = by_name(rules)
    assert list(recorded) == [
        "route:slo_errors_per_request:ratio_rate5m",
        "route:slo_errors_per_request:ratio_rate30m",
        "route:slo_errors_per_request:ratio_rate1h",
        "route:slo_errors_per_request:ratio_rate6h",
        "route:slo_errors_per_request:ratio_rate3d",
        "route:slo_slow_requests_per_request:ratio_rate5m",
        "route:slo_slow_requests_per_request:ratio_rate30m",
        "route:slo_slow_requests_per_request:ratio_rate1h",
        "route:slo_slow_requests_per_request:ratio_rate6h",
        "route:slo_slow_requests_per_request:ratio_rate3d",
    ]
    assert recorded["route:slo_errors_per_request:ratio_rate5m"] == {
        "record": "route:slo_errors_per_request:ratio_rate5m",
        "expr": (
            "(\n"
            '  sum by (route) (rate(proxy_requests_total{route="api", code=~"5.."}[5m]))\n'
            "    or\n"
            '  0 * sum by (route) (rate(proxy_requests_total{route="api"}[5m]))\n'
            ")\n"
            "  /\n"
            '(sum by (route) (rate(proxy_requests_total{route="api", code!="499"}[5m])) > 0)\n'
        ),
        "labels": {"route": "api"},
    }
    assert recorded["route:slo_slow_requests_per_request:ratio_rate1h"] == {
        "record": "route:slo_slow_requests_per_request:ratio_rate1h",
        "expr": (
            "1 - (\n"
            "  sum by (route) (rate(proxy_request_duration_seconds_bucket"
            '{route="api", le="0.25"}[1h]))\n'
            "    /\n"
            "  (sum by (route) (rate(proxy_request_duration_seconds_count"
            '{route="api"}[1h])) > 0)\n'
            ")\n"
        ),
        "labels": {"route": "api"},
    }
    objectives = [r for r in rules if r.get("record") == slo.OBJECTIVE]
    assert objectives == [
        {
            "record": "route:slo_objective:ratio",
            "expr": "vector(0.999)",
            "labels": {"route": "api", "slo": "availability"},
        },
        {
            "record": "route:slo_objective:ratio",
            "expr": "vector(0.99)",
            "labels": {"route": "api", "slo": "latency"},
        },
    ]


def test_the_pages_are_the_workbooks_two_window_pairs():
    alerts = [r for r in group(generated(API_BOTH), "api") if "alert" in r]
    assert [(a["alert"], a["labels"]["window"]) for a in alerts] == [
        ("ProxyRouteErrorBudgetBurn", "1h"),
        ("ProxyRouteErrorBudgetBurn", "6h"),
        ("ProxyRouteLatencyBudgetBurn", "1h"),
        ("ProxyRouteLatencyBudgetBurn", "6h"),
    ]
    fast_errors, slow_errors, fast_latency, slow_latency = alerts
    assert fast_errors["expr"] == (
        'route:slo_errors_per_request:ratio_rate1h{route="api"} / 0.001 > 14.4\n'
        "  and\n"
        'route:slo_errors_per_request:ratio_rate5m{route="api"} / 0.001 > 14.4\n'
    )
    assert slow_errors["expr"] == (
        'route:slo_errors_per_request:ratio_rate6h{route="api"} / 0.001 > 6\n'
        "  and\n"
        'route:slo_errors_per_request:ratio_rate30m{route="api"} / 0.001 > 6\n'
    )
    assert fast_latency["expr"] == (
        'route:slo_slow_requests_per_request:ratio_rate1h{route="api"} / 0.01 > 14.4\n'
        "  and\n"
        'route:slo_slow_requests_per_request:ratio_rate5m{route="api"} / 0.01 > 14.4\n'
    )
    assert "ratio_rate6h" in slow_latency["expr"] and "ratio_rate30m" in slow_latency["expr"]
    for alert in alerts:
        assert alert["for"] == "2m"
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["route"] == "api"
        assert set(alert["annotations"]) == {"summary", "description"}
    assert [a["labels"]["slo"] for a in alerts] == ["availability"] * 2 + ["latency"] * 2
    assert fast_errors["annotations"]["description"] == (
        "Over the last 1h and 5m, 5xx responses (budget: 0.1% of requests, for 99.9% "
        "availability) burned the availability budget of route {{ $labels.route }} "
        '{{ $value | printf "%.1f" }} times as fast as a 30-day budget allows (pages above '
        "14.4: 2% of the budget spent in 1h, all of it in 2.1 days)."
    )
    assert (
        "requests slower than 0.25 s (budget: 1% of requests, for 99% under 0.25 s)"
        in (slow_latency["annotations"]["description"])
    )
    assert (
        "pages above 6: 5% of the budget spent in 6h, all of it in 5.0 days"
        in (slow_latency["annotations"]["description"])
    )


def test_burn_thresholds_are_a_share_of_a_30_day_budget():
    # 14.4 for 1 hour and 6 for 6 hours spend 2% and 5% of 30 days' budget.
    spent = {long: float(burn) * slo._HOURS[long] / (30 * 24) for long, _, burn in slo.PAGES}
    assert spent == pytest.approx({"1h": 0.02, "6h": 0.05})
    assert [(long, short) for long, short, _ in slo.PAGES] == [("1h", "5m"), ("6h", "30m")]


@pytest.mark.parametrize(
    ("availability", "budget"), [(99.9, "0.001"), (99.5, "0.005"), (99.99, "0.0001"), (95, "0.05")]
)
def test_budgets_are_written_exactly(availability, budget):
    route = {"name": "r", "match": {"path_prefix": "/"}, "slo": {"availability": availability}}
    (fast, _) = [r for r in group(generated(route), "r") if "alert" in r]
    assert f"/ {budget} > 14.4" in fast["expr"]


def test_only_routes_with_an_slo_get_rules():
    document = generated(
        {"name": "plain", "match": {"path_prefix": "/plain/"}},
        API_BOTH,
        {"match": {"path_prefix": "/static/"}, "slo": {"availability": 99.5}},
    )
    assert [g["name"] for g in document["groups"]] == ["proxy-slo:api", "proxy-slo:/static/"]
    assert "plain" not in slo.rules(config({"name": "plain", "match": {"path_prefix": "/"}}))
    assert yaml.safe_load(slo.rules(config({"match": {"path_prefix": "/"}}))) == {"groups": []}


def test_availability_only_and_latency_only():
    document = generated(
        {"name": "a", "match": {"path_prefix": "/a/"}, "slo": {"availability": 99.5}},
        {"name": "l", "match": {"path_prefix": "/l/"}, "slo": {"latency": 1.0}},
    )
    only_availability, only_latency = group(document, "a"), group(document, "l")
    assert {r.get("alert") for r in only_availability} == {None, "ProxyRouteErrorBudgetBurn"}
    assert not any("slow_requests" in r.get("record", "") for r in only_availability)
    assert {r.get("alert") for r in only_latency} == {None, "ProxyRouteLatencyBudgetBurn"}
    assert not any("errors" in r.get("record", "") for r in only_latency)
    # latency_target defaults to 99%; the integral bound as prometheus_client writes it
    # ("1.0") or as Prometheus 3 normalises it ("1").
    (objective,) = [r for r in only_latency if r.get("record") == slo.OBJECTIVE]
    assert objective["expr"] == "vector(0.99)"
    slow = by_name(only_latency)["route:slo_slow_requests_per_request:ratio_rate5m"]
    assert 'le=~"1\\\\.0|1"' in slow["expr"]


@pytest.mark.parametrize("bound", LATENCY_BUCKETS)
def test_every_bucket_bound_matches_how_it_is_exposed(bound):
    matcher = slo.le_matcher(bound)
    exposed = str(bound)  # proxy/metrics.py: Buckets.cumulative
    if matcher.startswith('le="'):
        assert matcher == f'le="{exposed}"'
    else:
        pattern = yaml.safe_load(matcher[len("le=~") :])  # a YAML string is quoted like PromQL
        assert re.fullmatch(pattern, exposed) and re.fullmatch(pattern, f"{bound:g}")


def test_route_names_are_quoted_everywhere():
    weird = 'host.example~^/a"b\\c*{{ x }}: #y'
    text = slo.rules(config({"name": weird, "match": {"path_prefix": "/"}, "slo": API_BOTH["slo"]}))
    (only,) = yaml.safe_load(text)["groups"]
    assert only["name"] == f"proxy-slo:{weird}"
    literal = '"host.example~^/a\\"b\\\\c*{{ x }}: #y"'
    for rule in only["rules"]:
        if rule.get("record") == slo.OBJECTIVE:
            assert rule["labels"]["route"] == weird
        elif "record" in rule:
            assert rule["labels"] == {"route": weird}
            assert f"{{route={literal}" in rule["expr"]
        else:  # alert labels are templates: "{{" is kept literal
            assert rule["labels"]["route"] == 'host.example~^/a"b\\c*{{ "{{" }} x }}: #y'
            assert f"{{route={literal}}}" in rule["expr"]


def test_output_is_deterministic_and_says_it_is_generated():
    routes = (API_BOTH, {"match": {"path_prefix": "/s/"}, "slo": {"availability": 99}})
    first, second = slo.rules(config(*routes)), slo.rules(config(*routes))
    assert first == second
    assert first.startswith("# Generated by `python -m proxy rules --config FILE`")
    assert first.splitlines()[1].startswith("# do not edit by hand")
    assert slo.rules(config(*routes), source="x/y.yml").startswith(
        "# Generated by `python -m proxy rules --config x/y.yml`"
    )


def test_print_rules(tmp_path, capsys):
    path = tmp_path / "proxy.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"api": {"targets": ["http://127.0.0.1:9001"]}},
                "routes": [{**API_BOTH, "upstream": "api"}],
            }
        )
    )
    assert slo.print_rules(str(path)) == 0
    out, err = capsys.readouterr()
    assert out == slo.rules(config(API_BOTH), source=str(path)) and err == ""


def test_print_rules_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "proxy.yml"
    path.write_text(
        "upstreams: {api: {targets: [http://127.0.0.1:9001]}}\n"
        "routes: [{match: {path_prefix: /}, upstream: api, slo: {latency: 0.3}}]\n"
    )
    assert slo.print_rules(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "slo.latency" in err
    assert slo.print_rules(str(tmp_path / "missing.yml")) == 2
    assert capsys.readouterr().err.count("\n") == 1
