from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config, parse_config, parse_yaml
from tests.support import REPO

BASE: dict[str, Any] = {
    "upstreams": {
        "api": {"targets": ["http://127.0.0.1:9001"]},
        "static": {"targets": ["http://127.0.0.1:9002"]},
    },
    "routes": [
        {"match": {"path_prefix": "/api/"}, "upstream": "api"},
        {"match": {"path_prefix": "/static/"}, "upstream": "static"},
        {"match": {"path_prefix": "/"}, "upstream": "api"},
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (list items as [i]) replaced; `...` deletes it."""
    data = copy.deepcopy(BASE)
    *parents, last = path.replace("[", ".[").split(".")
    node: Any = data
    for part in parents:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "upstreams.api.pool.limit",
            -1,
            "upstreams.api.pool.limit: must be an integer >= 0, got -1",
        ),
        (
            "upstreams.api.pool.limit",
            True,
            "upstreams.api.pool.limit: must be an integer >= 0, got true",
        ),
        (
            "upstreams.api.pool.limit_per_host",
            1.5,
            "upstreams.api.pool.limit_per_host: must be an integer >= 0, got 1.5",
        ),
        (
            "upstreams.api.pool.limt",
            5,
            "upstreams.api.pool: unknown key 'limt' "
            "(known: limit, limit_per_host, keepalive_timeout, max_requests, max_age, min_idle, "
            "backend_budget)",
        ),
        (
            "upstreams.api.pool.keepalive_timeout",
            -3,
            "upstreams.api.pool.keepalive_timeout: must be a number of seconds >= 0, got -3",
        ),
        (
            "upstreams.api.timeouts.connect",
            0,
            "upstreams.api.timeouts.connect: must be a number of seconds > 0, got 0",
        ),
        (
            "upstreams.api.timeouts.read",
            "30s",
            "upstreams.api.timeouts.read: must be a number of seconds > 0, got '30s'",
        ),
        (
            "routes[2].upstream",
            "apii",
            "routes[2].upstream: unknown upstream 'apii' (known: api, static)",
        ),
        (
            "routes[0].match.path_prefix",
            "api/",
            "routes[0].match.path_prefix: must be a string starting with '/', got 'api/'",
        ),
        (
            "routes[0].match.path_prefix",
            ...,
            "routes[0].match: needs exactly one of path_prefix, path_exact, path_regex, got none",
        ),
        (
            "routes[1].strip_prefix",
            "yes",
            "routes[1].strip_prefix: must be true or false, got 'yes'",
        ),
        (
            "routes[0].match.host",
            "api.test:80",
            "routes[0].match.host: must be a host name without port or scheme, got 'api.test:80'",
        ),
        ("routes[1].name", "", "routes[1].name: must be a non-empty string, got ''"),
        (
            "routes[1].matches",
            {},
            "routes[1]: unknown key 'matches' "
            "(known: match, upstream, split, redirect, name, strip_prefix, rewrite, host_header, "
            "headers, timeouts, retries, rate_limit, max_body, upgrade, slo)",
        ),
        ("upstreams.api.targets", [], "upstreams.api.targets: must be a non-empty list, got []"),
        (
            "upstreams.api.targets",
            "http://a:1",
            "upstreams.api.targets: must be a non-empty list, got 'http://a:1'",
        ),
        (
            "upstreams.api.targets",
            ["ftp://a:1"],
            "upstreams.api.targets[0]: must be an http:// or https:// URL with a host and no path, "
            "like http://10.0.0.5:9001, got 'ftp://a:1'",
        ),
        (
            "upstreams.api.targets",
            ["http://a:1/base"],
            "upstreams.api.targets[0]: must be an http:// or https:// URL with a host and no path, "
            "like http://10.0.0.5:9001, got 'http://a:1/base'",
        ),
        (
            "upstreams.api.targets",
            ["http://a:99999"],
            "upstreams.api.targets[0]: must be an http:// or https:// URL with a host and no path, "
            "like http://10.0.0.5:9001, got 'http://a:99999'",
        ),
        ("upstreams.api", ..., "routes[0].upstream: unknown upstream 'api' (known: static)"),
        ("upstreams", {}, "upstreams: must be a non-empty mapping of names, got a mapping"),
        ("routes", ..., "config: missing required key 'routes'"),
        ("routes", [], "routes: must be a non-empty list, got []"),
        ("listen.port", 70000, "listen.port: must be an integer from 0 to 65535, got 70000"),
        (
            "listen.keepalive_timeout",
            None,
            "listen.keepalive_timeout: must be a number of seconds >= 0, got null",
        ),
        ("admin.host", 5, "admin.host: must be a non-empty string, got 5"),
        (
            "listn",
            {},
            "config: unknown key 'listn' "
            "(known: upstreams, routes, listen, admin, access_log, shutdown, workers, event_loop, "
            "request_id, trace_context, reload)",
        ),
        ("upstreams.api.pool", 5, "upstreams.api.pool: must be a mapping, got 5"),
        (
            "upstreams.api.targets",
            [{"url": "http://a:1", "weight": 0}],
            "upstreams.api.targets[0].weight: must be an integer >= 1, got 0",
        ),
        (
            "upstreams.api.targets",
            [{"weight": 2}],
            "upstreams.api.targets[0]: missing required key 'url'",
        ),
        (
            "upstreams.api.balance",
            "fastest",
            "upstreams.api.balance: must be one of round_robin, least_requests, random, hash, "
            "got 'fastest'",
        ),
        (
            "upstreams.api.max_pending",
            -1,
            "upstreams.api.max_pending: must be an integer >= 0, got -1",
        ),
        (
            "upstreams.api.retries.attempts",
            0,
            "upstreams.api.retries.attempts: must be an integer >= 1, got 0",
        ),
        (
            "upstreams.api.retries.budget",
            1.5,
            "upstreams.api.retries.budget: must be a number from 0 to 1, got 1.5",
        ),
        (
            "upstreams.api.health_check.expect_status",
            "299-200",
            "upstreams.api.health_check.expect_status: must be a status or a range of statuses "
            "like 200-399, got '299-200'",
        ),
        (
            "upstreams.api.health_check.interval",
            0,
            "upstreams.api.health_check.interval: must be a number of seconds > 0, got 0",
        ),
        (
            "upstreams.api.health_check.path",
            "healthz",
            "upstreams.api.health_check.path: must be a string starting with '/', got 'healthz'",
        ),
        (
            "upstreams.api.outlier.consecutive_failures",
            0,
            "upstreams.api.outlier.consecutive_failures: must be an integer >= 1, got 0",
        ),
        (
            "upstreams.api.outlier.ejection_tme",
            5,
            "upstreams.api.outlier: unknown key 'ejection_tme' "
            "(known: consecutive_failures, ejection_time)",
        ),
        (
            "listen.timeouts.header",
            0,
            "listen.timeouts.header: must be a number of seconds > 0, got 0",
        ),
        (
            "listen.limits.max_connections",
            0,
            "listen.limits.max_connections: must be an integer >= 1, got 0",
        ),
        ("listen.limits.max_body", -1, "listen.limits.max_body: must be an integer >= 0, got -1"),
        (
            "listen.allow_underscores_in_headers",
            "yes",
            "listen.allow_underscores_in_headers: must be true or false, got 'yes'",
        ),
        ("routes[0].max_body", 1.5, "routes[0].max_body: must be an integer >= 0, got 1.5"),
    ],
)
def test_each_bad_value_names_its_key_path(path, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"listen": {"port": 9901}},
            "admin.port: must differ from listen.port on the same host, got 9901",
        ),
        (
            {"listen": {"host": "127.0.0.1", "port": 8080}, "admin": {"host": "0.0.0.0",
                                                                  "port": 8080}},
            "admin.port: must differ from listen.port on the same host, got 8080",
        ),
        (
            {"upstreams": {"api": {"targets": ["http://127.0.0.1:1"],
                                   "pool": {"limit": 2, "limit_per_host": 3}}}},
            "upstreams.api.pool.limit_per_host: must be <= pool.limit (2) when the limit is "
            "set, got 3",
        ),
    ],
)  # fmt: skip
def test_keys_that_contradict_each_other_are_rejected(changes, message):
    data = {**copy.deepcopy(BASE), **changes}
    data["routes"] = [{"match": {"path_prefix": "/"}, "upstream": "api"}]
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == message


ROUTE_MISTAKES: list[tuple[dict[str, Any], str]] = [
    # match
    ({"match": {}},
     "routes[0].match: needs exactly one of path_prefix, path_exact, path_regex, got none"),
    ({"match": {"path_prefix": "/", "path_exact": "/x"}},
     "routes[0].match: needs exactly one of path_prefix, path_exact, path_regex, "
     "got path_prefix, path_exact"),
    ({"match": {"path_exact": "x"}},
     "routes[0].match.path_exact: must be a string starting with '/', got 'x'"),
    ({"match": {"path_regex": "(unclosed"}},
     "routes[0].match.path_regex: must be a regular expression RE2 accepts "
     "(missing ): (unclosed), got '(unclosed'"),
    ({"match": {"path_regex": "(?=lookahead)"}},
     "routes[0].match.path_regex: must be a regular expression RE2 accepts "
     "(invalid perl operator: (?=), got '(?=lookahead)'"),
    ({"match": {"path_prefix": "/", "host": "*.*.example.com"}},
     "routes[0].match.host: must be a host name, or \"*.\" followed by a domain, "
     "got '*.*.example.com'"),
    ({"match": {"path_prefix": "/", "host": "*."}},
     "routes[0].match.host: must be a host name, or \"*.\" followed by a domain, got '*.'"),
    ({"match": {"path_prefix": "/", "methods": ["get"]}},
     "routes[0].match.methods[0]: must be an HTTP method in upper case, like GET, got 'get'"),
    ({"match": {"path_prefix": "/", "methods": []}},
     "routes[0].match.methods: must be a non-empty list, got []"),
    ({"match": {"path_prefix": "/", "headers": {"X-A": {"present": "yes"}}}},
     "routes[0].match.headers.X-A.present: must be true or false, got 'yes'"),
    ({"match": {"path_prefix": "/", "headers": {"X-A": ["1"]}}},
     "routes[0].match.headers.X-A: must be a string, got a list"),
    ({"match": {"path_prefix": "/", "headers": {"X Canary": "1"}}},
     "routes[0].match.headers: must be a header name (letters, digits, '-' and the like), "
     "got 'X Canary'"),
    ({"match": {"path_prefix": "/", "query": {"v": None}}},
     "routes[0].match.query.v: must be a string, got null"),
    # upstream | split | redirect
    ({"upstream": ...}, "routes[0]: needs exactly one of upstream, split, redirect, got none"),
    ({"redirect": {}}, "routes[0]: needs exactly one of upstream, split, redirect, "
     "got upstream, redirect"),
    ({"upstream": ..., "split": [{"upstream": "api", "weight": 0}]},
     "routes[0].split[0].weight: must be an integer >= 1, got 0"),
    ({"upstream": ..., "split": [{"upstream": "api", "weight": 1.5}]},
     "routes[0].split[0].weight: must be an integer >= 1, got 1.5"),
    ({"upstream": ..., "split": [{"upstream": "api", "weight": 1},
                                 {"upstream": "apii", "weight": 1}]},
     "routes[0].split[1].upstream: unknown upstream 'apii' (known: api, static)"),
    ({"upstream": ..., "split": []}, "routes[0].split: must be a non-empty list, got []"),
    ({"upstream": ..., "redirect": {"status": 200}},
     "routes[0].redirect.status: must be one of 301, 302, 303, 307, 308, got 200"),
    ({"upstream": ..., "redirect": {"scheme": "ftp"}},
     "routes[0].redirect.scheme: must be one of http, https, got 'ftp'"),
    ({"upstream": ..., "redirect": {"port": 0}},
     "routes[0].redirect.port: must be an integer from 1 to 65535, got 0"),
    ({"upstream": ..., "redirect": {"host": "a.test:443"}},
     "routes[0].redirect.host: must be a host name or an IP address, without port, got "
     "'a.test:443'"),
    ({"upstream": ..., "redirect": {"path": "/new?x=1"}},
     "routes[0].redirect.path: must be a path starting with one '/', without '?', '#' or "
     "spaces, "
     "got '/new?x=1'"),
    ({"upstream": ..., "redirect": {"path": "/new"}, "strip_prefix": True},
     "routes[0].redirect.path: cannot go with rewrite or strip_prefix, which set the "
     "Location's path from the request's"),
    # rewrite
    ({"rewrite": {}}, "routes[0].rewrite: needs exactly one of prefix, regex"),
    ({"rewrite": {"prefix": "/v2/", "regex": {"pattern": "a", "replacement": "b"}}},
     "routes[0].rewrite: needs exactly one of prefix, regex"),
    ({"rewrite": {"prefix": "/v2/"}, "strip_prefix": True},
     "routes[0].rewrite: cannot go with strip_prefix (rewrite.prefix: / does the same)"),
    ({"match": {"path_exact": "/api"}, "rewrite": {"prefix": "/v2/"}},
     "routes[0].rewrite.prefix: needs match.path_prefix to replace"),
    ({"match": {"path_exact": "/api"}, "strip_prefix": True},
     "routes[0].strip_prefix: needs match.path_prefix to strip"),
    ({"rewrite": {"prefix": "v2"}},
     "routes[0].rewrite.prefix: must be a path starting with one '/', without '?', '#' or "
     "spaces, "
     "got 'v2'"),
    ({"rewrite": {"regex": {"pattern": "(a", "replacement": "b"}}},
     "routes[0].rewrite.regex.pattern: must be a regular expression RE2 accepts "
     "(missing ): (a), got '(a'"),
    ({"rewrite": {"regex": {"pattern": "^/(a)/(b)$", "replacement": "/\\3"}}},
     "routes[0].rewrite.regex.replacement: refers to group \\3, but the pattern has 2 groups"),
    ({"rewrite": {"regex": {"pattern": "^/(a)$", "replacement": "/\\x"}}},
     "routes[0].rewrite.regex.replacement: a backslash must start \\1 to \\99 or \\\\, "
     "got '/\\\\x'"),
    ({"rewrite": {"regex": {"pattern": "^/(a)$", "replacement": "/\\1?x=1"}}},
     "routes[0].rewrite.regex.replacement: must be a path without '?', '#' or spaces "
     "(\\1 for a group), got '/\\\\1?x=1'"),
    ({"rewrite": {"regex": {"pattern": "^/a$"}}},
     "routes[0].rewrite.regex: missing required key 'replacement'"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "message"), ROUTE_MISTAKES)
def test_each_route_mistake_names_its_key_path(route, message):
    data = copy.deepcopy(BASE)
    first = {"match": {"path_prefix": "/api/"}, "upstream": "api", **route}
    data["routes"][0] = {k: v for k, v in first.items() if v is not ...}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == message


def test_routes_on_one_path_need_names_of_their_own():
    data = copy.deepcopy(BASE)
    data["routes"][2]["match"] = {"path_prefix": "/api/", "methods": ["POST"]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == (
        "routes[2].name: must be set (metrics are labelled by it): the default, host and path, "
        "'/api/', is already routes[0]'s"
    )
    data["routes"][2]["name"] = "api-post"
    assert parse_config(data).routes[2].name == "api-post"


def test_exact_and_prefix_routes_on_one_path_get_different_names():
    data = copy.deepcopy(BASE)
    data["routes"] = [
        {"match": {"path_exact": "/login"}, "upstream": "api"},
        {"match": {"path_prefix": "/login"}, "upstream": "api"},
        {"match": {"path_regex": "/login/.*", "host": "*.a.test"}, "upstream": "api"},
        {"match": {"path_prefix": "/"}, "split": [{"upstream": "api", "weight": 1}]},
        {"match": {"path_prefix": "/r/"}, "redirect": None},
    ]
    config = parse_config(data)
    assert [r.name for r in config.routes] == [
        "=/login", "/login", "*.a.test~/login/.*", "/", "/r/",
    ]  # fmt: skip
    assert config.routes[3].upstreams == ("api",)
    assert config.routes[4].redirect is not None
    assert config.routes[4].redirect.status == 308
    assert config.routes[4].upstreams == ()


def test_same_port_on_different_hosts_and_unlimited_pools_are_fine():
    data = copy.deepcopy(BASE)
    data["listen"] = {"host": "127.0.0.1", "port": 9000}
    data["admin"] = {"host": "127.0.0.2", "port": 9000}
    data["upstreams"]["api"]["pool"] = {"limit": 0, "limit_per_host": 5}
    parse_config(data)


def test_first_error_in_file_order_is_reported():
    data = with_change("upstreams.api.pool.limit", -1)
    data["routes"][0]["upstream"] = "nope"
    with pytest.raises(ConfigError, match=r"^upstreams\.api\.pool\.limit:"):
        parse_config(data)


def test_duplicate_route_names_are_rejected():
    data = copy.deepcopy(BASE)
    data["routes"][0]["name"] = "x"
    data["routes"][2]["name"] = "x"
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == (
        "routes[2].name: must be unique (metrics are labelled by it), got 'x', "
        "already used by routes[0]"
    )


def test_not_a_mapping_at_the_top():
    with pytest.raises(ConfigError, match=r"^config: must be a mapping, got null$"):
        parse_config(None)


def test_defaults_and_derived_route_names():
    data = copy.deepcopy(BASE)
    data["routes"][0]["match"]["host"] = "API.Example.com"
    config = parse_config(data)
    assert (config.listen.host, config.listen.port, config.listen.keepalive_timeout) == (
        "0.0.0.0",
        8080,
        75.0,
    )
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9901)
    pool = config.upstreams["api"].pool
    assert (pool.limit, pool.limit_per_host, pool.keepalive_timeout) == (100, 0, 30.0)
    timeouts = config.upstreams["api"].timeouts
    assert (timeouts.connect, timeouts.read) == (5.0, 30.0)
    assert [r.name for r in config.routes] == ["api.example.com/api/", "/static/", "/"]
    assert config.routes[0].match.host == "api.example.com"
    assert config.routes[0].strip_prefix is False


def test_resilience_defaults_and_target_forms():
    data = with_change("upstreams.api.targets", ["http://a:1", {"url": "http://b:2", "weight": 3}])
    data["upstreams"]["api"]["health_check"] = None  # present but empty: all defaults
    data["upstreams"]["api"]["outlier"] = {"consecutive_failures": 2}
    api = parse_config(data).upstreams["api"]
    assert [(t.url, t.weight) for t in api.targets] == [("http://a:1", 1), ("http://b:2", 3)]
    assert (api.balance, api.max_pending) == ("round_robin", 0)
    assert (api.retries.attempts, api.retries.budget) == (2, 0.2)
    assert api.health_check is not None and api.health_check.expect_status == (200, 399)
    assert api.outlier is not None and api.outlier.ejection_time == 30.0
    static = parse_config(BASE).upstreams["static"]
    assert static.health_check is None and static.outlier is None  # absent: off


def test_targets_are_normalised_to_scheme_and_authority():
    config = parse_config(with_change("upstreams.api.targets", ["https://h.test:8443/"]))
    assert config.upstreams["api"].targets[0].url == "https://h.test:8443"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("upstreams:\n  api: [\n", "c.yaml: invalid YAML at line 3, column 1: "),
        ("a: 1\n  b: 2\n", "c.yaml: invalid YAML at line 2, column 4: "),
        (
            "routes: []\nroutes: []\n",
            "c.yaml: invalid YAML at line 2, column 1: duplicate key 'routes'",
        ),
    ],
)
def test_invalid_yaml_names_line_and_column(source, message):
    with pytest.raises(ConfigError) as caught:
        parse_yaml(source, "c.yaml")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_missing_file_is_one_line():
    with pytest.raises(ConfigError, match=r"^/nonexistent\.yaml: cannot read config file: "):
        load_config("/nonexistent.yaml")


def test_shipped_config_is_valid():
    config = load_config(REPO / "config.yaml")
    assert list(config.upstreams) == ["api", "static"]
    assert len(config.routes) == 3


def test_readme_example_is_valid(tmp_path: Path):
    """The YAML reference in the README is a config that validates."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- reference-config -->", 1)[1].split("```yaml\n", 1)[1]
    path = tmp_path / "reference.yaml"
    path.write_text(block.split("```", 1)[0])
    load_config(path)


# --- issue 10: the edge keys ---


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("listen.trusted_proxies", ["10.0.0.0/8", "10.1.2.3/8"],
         "listen.trusted_proxies[1]: must be an IP address or CIDR block like 10.0.0.0/8 "
         "(10.1.2.3/8 has host bits set), got '10.1.2.3/8'"),
        ("listen.trusted_proxies", "10.0.0.0/8", "listen.trusted_proxies: must be a list, got "
         "'10.0.0.0/8'"),
        ("listen.proxy_protocol", "yes", "listen.proxy_protocol: must be true or false, got 'yes'"),
        ("listen.tls", {"cert": "c.pem", "key": "k.pem", "min_version": "1.1"},
         'listen.tls.min_version: must be "1.2" or "1.3" (TLS 1.0 and 1.1 are never accepted), '
         "got '1.1'"),
        ("listen.tls", {"cert": "c.pem", "key": "k.pem", "certificates": [{"cert": "a.pem"}]},
         "listen.tls.certificates[0]: missing required key 'key'"),
        ("admin.allowed_hosts", ["proxy-0.proxy:9901"],
         "admin.allowed_hosts[0]: must be a host name without port or scheme, got "
         "'proxy-0.proxy:9901'"),
        ("upstreams.api.tls", {"cert": "client.pem"},
         "upstreams.api.tls.key: a client certificate needs both cert and key"),
    ],
)  # fmt: skip
def test_edge_keys_name_their_path(path, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value))
    assert str(caught.value) == message


def test_edge_keys_parse_with_nulls_empty_lists_and_unquoted_versions():
    import ipaddress

    data = copy.deepcopy(BASE)
    data["listen"] = {"trusted_proxies": ["10.0.0.0/8", "::1"], "proxy_protocol": True,
                      "tls": {"cert": "c.pem", "key": "k.pem", "min_version": 1.3,
                              "client_ca": None, "certificates": []}}  # fmt: skip
    data["admin"] = {"token_file": None, "allowed_hosts": []}
    data["upstreams"]["api"]["tls"] = {"cert": None, "key": None}
    config = parse_config(data)
    assert config.listen.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"),
    )  # fmt: skip
    assert config.listen.tls is not None and config.listen.tls.min_version == "1.3"
    assert (config.admin.token_file, config.admin.allowed_hosts) == (None, ())
    defaults = parse_config(BASE)
    assert (defaults.listen.trusted_proxies, defaults.listen.proxy_protocol) == ((), False)


# --- routes[]: header rules, host_header, timeouts, retries (issue 11, part B) ---


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("routes[0].headers.request.remove", ["X-A", "Connection"],
         "routes[0].headers.request.remove[1]: must not be a hop-by-hop or framing header "
         "(the proxy sets those itself), got 'Connection'"),
        ("routes[0].headers.request.set", {"transfer-encoding": "chunked"},
         "routes[0].headers.request.set.transfer-encoding: must not be a hop-by-hop or framing "
         "header (the proxy sets those itself), got 'transfer-encoding'"),
        ("routes[0].headers.response.add", {"Keep-Alive": "timeout=5"},
         "routes[0].headers.response.add.Keep-Alive: must not be a hop-by-hop or framing "
         "header (the proxy sets those itself), got 'Keep-Alive'"),
        ("routes[0].headers.response.remove", ["Content-Length"],
         "routes[0].headers.response.remove[0]: must not be a hop-by-hop or framing header "
         "(the proxy sets those itself), got 'Content-Length'"),
        ("routes[0].headers.request.set", {"Host": "x.test"},
         "routes[0].headers.request.set.Host: must not be Host (routes[].host_header sets it), "
         "got 'Host'"),
        ("routes[0].headers.request.set", {"X Env": "prod"},
         "routes[0].headers.request.set.X Env: must be a header name (letters, digits, '-' and "
         "the like), got 'X Env'"),
        ("routes[0].headers.request.add", {"X-A": "a\r\nX-Injected: 1"},
         "routes[0].headers.request.add.X-A: must be a header value (visible ASCII; spaces and "
         "tabs only inside), got 'a\\r\\nX-Injected: 1'"),
        ("routes[0].headers.response.set", {"X-A": ["1"]},
         "routes[0].headers.response.set.X-A: must be a string, got a list"),
        ("routes[0].headers.response.set", ["X-A"],
         "routes[0].headers.response.set: must be a mapping of header names to values, "
         "got a list"),
        ("routes[0].headers.response.remove", "Server",
         "routes[0].headers.response.remove: must be a list, got 'Server'"),
        ("routes[0].headers.response.hide", ["Server"],
         "routes[0].headers.response: unknown key 'hide' (known: set, add, remove)"),
        ("routes[0].headers.both", {},
         "routes[0].headers: unknown key 'both' (known: request, response)"),
        ("routes[0].host_header", "api.example.com/v1",
         "routes[0].host_header: must be pass, target, or a Host value like api.example.com "
         "or 10.0.0.5:8080, got 'api.example.com/v1'"),
        ("routes[0].host_header", "",
         "routes[0].host_header: must be pass, target, or a Host value like api.example.com "
         "or 10.0.0.5:8080, got ''"),
        ("routes[0].host_header", 8080,
         "routes[0].host_header: must be pass, target, or a Host value like api.example.com "
         "or 10.0.0.5:8080, got 8080"),
        ("routes[0].timeouts.read", 0,
         "routes[0].timeouts.read: must be a number of seconds > 0, got 0"),
        ("routes[0].timeouts.total", -1,
         "routes[0].timeouts.total: must be a number of seconds >= 0, got -1"),
        ("routes[0].timeouts.connect", 1,
         "routes[0].timeouts: unknown key 'connect' (known: read, total)"),
        ("routes[0].retries", {},
         "routes[0].retries: missing required key 'attempts'"),
        ("routes[0].retries.attempts", 0,
         "routes[0].retries.attempts: must be an integer >= 1, got 0"),
        ("routes[0].retries.budget", 0.5,
         "routes[0].retries: unknown key 'budget' (known: attempts)"),
    ],
)  # fmt: skip
def test_route_policy_keys_name_their_path(path, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value))
    assert str(caught.value) == message


def test_route_policy_keys_parse_and_default_to_off():
    data = copy.deepcopy(BASE)
    data["routes"][0].update(
        host_header="10.0.0.5:8080",
        headers={"request": {"set": {"X-Env": "prod"}, "add": {"X-N": 5}, "remove": None},
                 "response": {"remove": ["Server"]}},
        timeouts={"read": 300, "total": 0},
        retries={"attempts": 1},
    )  # fmt: skip
    config = parse_config(data)
    ruled, plain = config.routes[0], config.routes[1]
    assert ruled.host_header == "10.0.0.5:8080"
    assert dict(ruled.headers.request.set) == {"X-Env": "prod"}
    assert dict(ruled.headers.request.add) == {"X-N": "5"}
    assert (ruled.headers.request.remove, ruled.headers.response.remove) == ((), ("Server",))
    assert ruled.timeouts is not None and (ruled.timeouts.read, ruled.timeouts.total) == (300, 0)
    assert ruled.retries is not None and ruled.retries.attempts == 1
    assert (plain.host_header, plain.timeouts, plain.retries) == ("pass", None, None)
    bracketed = parse_config(with_change("routes[0].host_header", "[::1]:80"))
    assert bracketed.routes[0].host_header == "[::1]:80"


# --- ${VAR} in values (proxy/variables.py), through load_config as at start-up and reload ---

# Block style: YAML reads `{` in a flow collection ({limit: ...}) as one, so quote it there.
VARS_YAML = """\
upstreams:
  api:
    targets: ["http://${API_HOST:-127.0.0.1}:${API_PORT}"]
    pool:
      limit: ${POOL_LIMIT:-100}
routes:
  - match: {path_prefix: /}
    upstream: api
    headers: {request: {set: {X-Env: "env-${ENV_NAME:-dev}", X-Cost: "$${NOT_A_VAR}"}}}
trace_context: ${TRACING:-true}
"""


def load_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, **env: str) -> Any:
    for name in ("API_HOST", "API_PORT", "POOL_LIMIT", "ENV_NAME", "TRACING", "X"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


def test_variables_are_read_as_yaml_scalars_when_they_are_the_whole_value(tmp_path, monkeypatch):
    config = load_with(tmp_path, monkeypatch, VARS_YAML, API_PORT="9001", POOL_LIMIT="7",
                       TRACING="false", ENV_NAME="prod")  # fmt: skip
    api = config.upstreams["api"]
    assert api.targets[0].url == "http://127.0.0.1:9001"  # default, and text inside a string
    assert api.pool.limit == 7  # the int 7: the check for integers passed
    assert config.trace_context is False  # the bool false
    assert dict(config.routes[0].headers.request.set) == {
        "X-Env": "env-prod",
        "X-Cost": "${NOT_A_VAR}",  # $${ is a literal ${
    }


def test_defaults_apply_to_unset_variables(tmp_path, monkeypatch):
    config = load_with(tmp_path, monkeypatch, VARS_YAML, API_PORT="9001")
    assert config.upstreams["api"].pool.limit == 100
    assert config.trace_context is True
    assert config.routes[0].headers.request.set["X-Env"] == "env-dev"


def test_an_unset_variable_without_default_names_the_key_path_and_variable(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        load_with(tmp_path, monkeypatch, VARS_YAML)
    assert str(caught.value) == (
        "upstreams.api.targets[0]: environment variable API_PORT is not set "
        "(give a default: ${API_PORT:-...})"
    )


@pytest.mark.parametrize("value", ["{a: 1}", "[1, 2]", "- a", "a: b", "@x"])
def test_a_variable_never_injects_yaml_structure(tmp_path, monkeypatch, value):
    # It stays the string it is, which the key's own check then refuses.
    with pytest.raises(ConfigError) as caught:
        load_with(tmp_path, monkeypatch, VARS_YAML, API_PORT="1", POOL_LIMIT=value)
    assert str(caught.value) == (
        f"upstreams.api.pool.limit: must be an integer >= 0, got {value!r}"
    )


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("100", 100), ("-3", -3), ("1.5", 1.5), ("true", True), ("false", False),
     # What YAML would have turned into something else: kept as written.
     ("0755", "0755"), ("12:30", "12:30"), ("1_000", "1_000"), ("s3cr3t #tail", "s3cr3t #tail"),
     ("*.example.com", "*.example.com"), ("yes", "yes"), ("null", "null"), ("", "")],
)  # fmt: skip
def test_a_whole_value_variable_is_a_decimal_number_a_boolean_or_its_text(value, parsed):
    from proxy.variables import substitute

    assert substitute({"k": "${V}"}, {"V": value}) == {"k": parsed}


def test_inside_a_longer_string_a_variable_is_plain_text(tmp_path, monkeypatch):
    config = load_with(tmp_path, monkeypatch, VARS_YAML, API_PORT="1", ENV_NAME="{a: 1}")
    assert config.routes[0].headers.request.set["X-Env"] == "env-{a: 1}"


def test_a_wrongly_typed_variable_fails_the_keys_own_check(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        load_with(tmp_path, monkeypatch, VARS_YAML, API_PORT="1", POOL_LIMIT="many")
    assert str(caught.value) == "upstreams.api.pool.limit: must be an integer >= 0, got 'many'"


@pytest.mark.parametrize("value", ["${", "${1X}", "${X:+y}", "${X"])
def test_a_malformed_reference_is_refused(tmp_path, monkeypatch, value):
    text = f"upstreams: {{api: {{targets: ['{value}']}}}}\nroutes: []\n"
    with pytest.raises(ConfigError) as caught:
        load_with(tmp_path, monkeypatch, text, X="1")
    assert str(caught.value).startswith("upstreams.api.targets[0]: '${' must start ${NAME}")


def test_keys_are_never_substituted(tmp_path, monkeypatch):
    text = VARS_YAML + '"${X}": 1\n'
    with pytest.raises(ConfigError) as caught:
        load_with(tmp_path, monkeypatch, text, API_PORT="1", X="workers")
    assert str(caught.value).startswith("config: unknown key '${X}'")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("routes[0].redirect", {"host": "good.example@evil.example"},
         "routes[0].redirect.host: must be a host name or an IP address, without port, got "
         "'good.example@evil.example'"),
        ("routes[0].redirect", {"path": "//evil.example/x"},
         "routes[0].redirect.path: must be a path starting with one '/', without '?', '#' or "
         "spaces, got '//evil.example/x'"),
        ("request_id", {"header": "X-Forwarded-For"},
         "request_id.header: 'X-Forwarded-For' is set by the proxy itself; choose another"),
        ("routes[0].rate_limit", {"requests_per_second": 1e-310, "burst": 1},
         "routes[0].rate_limit.requests_per_second: must be a number from 0.001 to 1e9, got "
         "1e-310"),
    ],
)  # fmt: skip
def test_review_findings_are_refused_at_load(path, value, message):
    data = with_change(path, value)
    if path == "routes[0].redirect":
        del data["routes"][0]["upstream"]
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == message


# --- issue 12: discovered targets, hashing, slow start, connection lifetime ---

_RESOLVER = "upstreams.api.discovery.resolver"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("upstreams.api.targets", [{"dns": "bad name", "port": 80}],
         "upstreams.api.targets[0].dns: must be a DNS name"),
        ("upstreams.api.targets", [{"dns": "api.internal"}],
         "upstreams.api.targets[0]: missing required key 'port'"),
        ("upstreams.api.targets", [{"dns": "api.internal", "port": 0}],
         "upstreams.api.targets[0].port: must be an integer from 1 to 65535"),
        ("upstreams.api.targets", [{"dns": "api.internal", "port": 80, "scheme": "ftp"}],
         "upstreams.api.targets[0].scheme: must be one of"),
        ("upstreams.api.targets", [{"srv": "_http._tcp.api.internal", "port": 80}],
         "upstreams.api.targets[0]: unknown key 'port' (known: srv, scheme)"),
        ("upstreams.api.targets", [{"srv": "_http._tcp.api.internal"}],
         "upstreams.api.targets[0].srv: needs discovery.resolver to list name servers"),
        (_RESOLVER, "cluster", f"{_RESOLVER}: must be system"),
        (_RESOLVER, ["10.0.0.1"], f"{_RESOLVER}[0]: must be a name server"),
        (_RESOLVER, ["dns.local:53"], f"{_RESOLVER}[0]: must be a name server"),
        (_RESOLVER, ["::1:53"], f"{_RESOLVER}[0]: must be a name server"),
        ("upstreams.api.discovery.refresh", 0, "upstreams.api.discovery.refresh: must be"),
        ("upstreams.api.hash_on", "client_ip",
         "upstreams.api.hash_on: needs balance: hash, got balance: round_robin"),
        ("upstreams.api.balance", "sticky", "upstreams.api.balance: must be one of"),
        ("upstreams.api.pool.min_idle", 200,
         "upstreams.api.pool.min_idle: must be <= pool.limit (100)"),
        ("upstreams.api.pool.max_age", -1, "upstreams.api.pool.max_age: must be"),
        ("event_loop", "libuv", "event_loop: must be one of asyncio, uvloop, got 'libuv'"),
        ("routes[0].slo", {"latency": 0.3},
         "routes[0].slo.latency: must be a bound of the latency histogram (0.001,"),
        ("routes[0].slo", {"latency_target": 95}, "routes[0].slo: needs availability, latency"),
        ("routes[0].slo", {"availability": 100}, "routes[0].slo.availability: must be a percent"),
        ("upstreams.api.pool", {"min_idle": 2, "keepalive_timeout": 0},
         "upstreams.api.pool.min_idle: needs pool.keepalive_timeout above 0"),
        ("upstreams.api.slow_start", "soon", "upstreams.api.slow_start: must be"),
    ],
)  # fmt: skip
def test_discovery_and_lifetime_mistakes_name_their_key_path(path, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value))
    assert str(caught.value).startswith(message), str(caught.value)


def test_hash_on_keys_and_discovered_targets_parse():
    data = with_change(
        "upstreams.api.targets",
        ["http://10.0.0.5:8080",
         {"dns": "API.Internal", "port": 8443, "scheme": "https", "weight": 2},
         {"srv": "_http._tcp.api.internal"}],
    )  # fmt: skip
    api = data["upstreams"]["api"]
    api.update(balance="hash", hash_on="cookie:session", slow_start=30,
               discovery={"refresh": 5, "resolver": ["10.96.0.10:53", "[fd00::10]:5353"]},
               pool={"max_requests": 1000, "max_age": 3600, "min_idle": 2})  # fmt: skip
    upstream = parse_config(data).upstreams["api"]
    assert [type(t).__name__ for t in upstream.targets] == ["Target", "DnsTarget", "SrvTarget"]
    dns = upstream.targets[1]
    assert (dns.dns, dns.port, dns.scheme, dns.weight) == ("api.internal", 8443, "https", 2)  # type: ignore[union-attr]
    assert upstream.discovery.resolver == (("10.96.0.10", 53), ("fd00::10", 5353))
    assert (upstream.hash_on, upstream.slow_start) == ("cookie:session", 30)
    pool = upstream.pool
    assert (pool.max_requests, pool.max_age, pool.min_idle) == (1000, 3600, 2)
    for bad in ("cookie:", "header:bad name", "query:x"):
        api["hash_on"] = bad
        with pytest.raises(ConfigError, match=r"^upstreams\.api\.hash_on: must"):
            parse_config(data)
    defaults = parse_config(BASE).upstreams["api"]
    assert (defaults.hash_on, defaults.slow_start, defaults.discovery.refresh) == (None, 0, 10)
    assert defaults.discovery.resolver == ()
    assert (defaults.pool.max_requests, defaults.pool.max_age, defaults.pool.min_idle) == (0, 0, 0)
