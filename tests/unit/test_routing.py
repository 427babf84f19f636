from __future__ import annotations

import pytest

from proxy.config import Match, Route
from proxy.routing import RoutingTable, forwarded_path, host_key


def route(name: str, prefix: str, host: str | None = None, strip: bool = False) -> Route:
    return Route(
        match=Match(path_prefix=prefix, host=host), upstream="u", name=name, strip_prefix=strip
    )


TABLE = RoutingTable(
    [
        route("api-host", "/api/", host="api.test"),
        route("api", "/api/"),
        route("exact", "/v1"),
        route("ipv6", "/", host="[::1]"),
    ]
)


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.test", "/api/x", "api-host"),
        ("API.TEST:8080", "/api/x", "api-host"),
        ("other.test", "/api/x", "api"),
        (None, "/api/", "api"),
        ("other.test", "/api", None),  # a literal prefix: "/api" does not start with "/api/"
        ("x", "/v1", "exact"),
        ("x", "/v1beta/y", "exact"),  # literal prefix, as documented
        ("[::1]:8080", "/z", "ipv6"),
        ("x", "/nothing", None),
    ],
)
def test_first_matching_route_wins(host, path, expected):
    matched = TABLE.match(host_key(host), path)
    assert (matched.name if matched else None) == expected


@pytest.mark.parametrize(
    ("prefix", "raw", "expected"),
    [
        ("/api/", "/api/users?x=1", "/users?x=1"),
        ("/api", "/api", "/"),
        ("/api", "/api?x=%2F", "/?x=%2F"),
        ("/api/", "/api/a%2Fb/../c", "/a%2Fb/../c"),
        ("/", "//x", "/x"),
    ],
)
def test_strip_prefix_keeps_a_leading_slash(prefix, raw, expected):
    assert forwarded_path(route("r", prefix, strip=True), raw) == expected


def test_without_strip_prefix_the_path_is_unchanged():
    assert forwarded_path(route("r", "/api/"), "/api/a%2F") == "/api/a%2F"
