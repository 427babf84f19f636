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
            "(known: limit, limit_per_host, keepalive_timeout)",
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
        ("routes[0].match.path_prefix", ..., "routes[0].match: missing required key 'path_prefix'"),
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
            "(known: match, upstream, name, strip_prefix, max_body, upgrade)",
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
            "(known: upstreams, routes, listen, admin, access_log, shutdown, workers)",
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
            "upstreams.api.balance: must be one of round_robin, least_requests, random, "
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
