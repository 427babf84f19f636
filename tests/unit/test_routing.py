from __future__ import annotations

import pytest

from proxy.config import Match, Route
from proxy.routing import RoutingTable, forwarded_path, host_key, normalized_path, valid_host


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
        # A path with dot-segments is stripped in its normalised form (a rewrite).
        ("/api/", "/api/a/b/../c?q=/../", "/a/c?q=/../"),
        ("/api/", "/x/../api/%2e/y", "/y"),
        ("/", "//x", "/x"),
    ],
)
def test_strip_prefix_keeps_a_leading_slash(prefix, raw, expected):
    path = normalized_path(raw)
    assert path is not None
    assert forwarded_path(route("r", prefix, strip=True), raw, path) == expected


def test_without_strip_prefix_the_target_is_unchanged():
    raw = "/api/a%2F/../b?x=.."
    assert forwarded_path(route("r", "/api/"), raw, "/api/b") == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/static/app.v1.js?x=/../", "/static/app.v1.js"),
        ("/public/../internal/secret", "/internal/secret"),
        ("/public/%2e%2e/internal/secret", "/internal/secret"),
        ("/public/%2E./internal/x", "/internal/x"),
        ("/a/./b/", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/.hidden/..x", "/a/.hidden/..x"),
        ("/a/%2e%2f", None),  # ".%2f": a dot-segment to a backend that decodes "%2f"
        ("/a/%2fb", "/a/%2fb"),  # only dots are decoded: %2f stays a character
        ("/..", None),
        ("/a/../../b", None),
        ("/%2e%2e/etc/passwd", None),
        # Where backends disagree on dot-segments, there is no one right answer: refused.
        ("/public//../internal/secret", None),  # nginx merges slashes first, RFC 3986 not
        ("/public/..;/internal/secret", None),  # Tomcat and Jetty drop ";..." first
        ("/public/.;x/../internal", None),
        ("/public/..\\internal/secret", None),  # IIS takes "\\" for "/"
        ("/public/..%5cinternal", None),
        ("/public/%2e%2e%2finternal", None),  # a backend that decodes "%2f" first
        ("/svc/a%2F..", None),
        # ...but those characters without a dot-segment are just characters.
        ("/a/.hidden//x", "/a/.hidden//x"),
        ("/static/%2fetc", "/static/%2fetc"),
        ("/a;b/c", "/a;b/c"),
        ("/a\\b", "/a\\b"),
    ],
)
def test_routes_see_the_path_without_dot_segments(raw, expected):
    assert normalized_path(raw) == expected


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("example.com", True),
        ("example.com:8080", True),
        ("127.0.0.1", True),
        ("[::1]:8080", True),
        ("h:", True),  # RFC 3986: port = *DIGIT
        ("", False),
        ("a b/c?d", False),
        ("example.com:http", False),
        ("user@example.com", False),
        ("example.com/x", False),
        ("[::1", False),
    ],
)
def test_host_must_be_a_host_and_an_optional_numeric_port(host, valid):
    assert valid_host(host) is valid
