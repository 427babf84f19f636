from __future__ import annotations

import copy

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.config import parse_config
from proxy.policy import PLAIN, HeaderEdits, route_policies, target_host

BASE = {
    "upstreams": {
        "api": {"targets": ["http://127.0.0.1:9001", "https://api.test:443"],
                "timeouts": {"connect": 2, "read": 30}},
    },
    "routes": [{"match": {"path_prefix": "/"}, "upstream": "api"}],
}  # fmt: skip


def policy_of(**route):
    data = copy.deepcopy(BASE)
    data["routes"][0].update(route)
    return route_policies(parse_config(data)).get("/", PLAIN)


def apply(edits: HeaderEdits, items):
    headers = CIMultiDict(items)
    edits.apply(headers)
    return list(headers.items())


def test_rules_run_remove_then_set_then_add_with_names_in_any_case():
    edits = HeaderEdits(
        remove=("x-token", "X-Both"),
        set=(("x-env", "prod"),),
        add=(("X-Seen", "1"), ("x-both", "new")),
    )
    got = apply(edits, [("X-Token", "t"), ("X-Env", "dev"), ("X-Env", "qa"), ("x-seen", "0"),
                        ("X-BOTH", "old")])  # fmt: skip
    assert [(k.lower(), v) for k, v in got] == [
        ("x-env", "prod"), ("x-seen", "0"), ("x-seen", "1"), ("x-both", "new"),
    ]  # fmt: skip
    # add keeps the spelling already there: aiohttp's client would take another for a new name.
    assert [k for k, _ in got if k.lower() == "x-seen"] == ["x-seen", "x-seen"]


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:9001", "127.0.0.1:9001"),
        ("http://api.test:80", "api.test"),
        ("https://api.test:443", "api.test"),
        ("https://api.test:80", "api.test:80"),
        ("http://api.test", "api.test"),
        ("http://[::1]:8080", "[::1]:8080"),
    ],
)
def test_target_host_leaves_out_the_schemes_default_port(url, host):
    assert target_host(url) == host


def test_a_route_without_policy_keys_is_plain_and_not_stored():
    assert policy_of() is PLAIN
    assert policy_of(host_header="pass", timeouts={}, headers={"request": {}}) is PLAIN


def test_a_routes_policy_is_precomputed():
    policy = policy_of(
        host_header="target", timeouts={"read": 300, "total": 10}, retries={"attempts": 1},
        headers={"response": {"remove": ["Server"]}},
    )  # fmt: skip
    assert policy.target_host is True
    assert policy.client_timeouts == {
        "api": aiohttp.ClientTimeout(total=None, connect=2, sock_read=300)
    }
    assert (policy.total, policy.attempts, policy.request_headers) == (10, 1, None)
    assert policy.response_headers == HeaderEdits(("Server",), (), ())
    assert policy_of(host_header="x.test").host == "x.test"
