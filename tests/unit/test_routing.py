from __future__ import annotations

import random
from collections import Counter

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Match, Route, SplitTo, parse_config
from proxy.routing import RoutingTable, host_key, normalized_path, valid_host


def route(name: str, prefix: str, host: str | None = None, strip: bool = False) -> Route:
    return Route(
        match=Match(path_prefix=prefix, host=host), upstream="u", name=name, strip_prefix=strip
    )


def forwarded_path(route: Route, raw: str, path: str) -> str:
    return RoutingTable([route]).forwarded_path(route, raw, path)


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


# --- the conditions beyond host and prefix ---


def table(*routes: dict) -> RoutingTable:
    """A table from YAML-shaped routes (parse_config checks them as it would a file)."""
    config = parse_config(
        {"upstreams": {"u": {"targets": ["http://127.0.0.1:1"]}}, "routes": list(routes)}
    )
    return RoutingTable(config.routes)


def matched(
    t: RoutingTable,
    path: str,
    *,
    host: str | None = "x.test",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> str | None:
    lines = CIMultiDictProxy(CIMultiDict(headers or {}))
    target = path
    found = t.match(host_key(host), normalized_path(target) or "", method, lines, target)
    return found.name if found else None


def named(name: str, upstream: str = "u", **match: object) -> dict:
    return {"name": name, "match": match, "upstream": upstream}


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.example.com", "wild"),
        ("a.b.example.com", "wild"),  # one or more labels
        ("A.Example.COM:8443", "wild"),  # case and port as host_key() leaves them
        ("example.com", None),  # not the bare domain
        (".example.com", None),  # an empty label is no label
        ("aexample.com", None),
        ("a.example.com.evil", None),
        (None, None),
    ],
)
def test_wildcard_host_matches_one_or_more_labels_before_the_domain(host, expected):
    t = table(named("wild", path_prefix="/", host="*.example.com"))
    assert matched(t, "/", host=host) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/login", "exact"), ("/login/", "prefix"), ("/loginx", "prefix"), ("/a/../login", "exact")],
)
def test_path_exact_needs_the_whole_normalised_path(path, expected):
    t = table(named("exact", path_exact="/login"), named("prefix", path_prefix="/login"))
    assert matched(t, path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/users/42", "re"),
        ("/users/42/", "re"),
        ("/users/42?x=1", "re"),  # the query is not part of the path
        ("/users/42/x", None),  # a full match, not a search
        ("/v1/users/42", None),
        ("/users/", None),
        ("/users/%34%32", None),  # percent-encoding is not decoded
        ("/x/../users/7", "re"),  # the normalised path, as the backend will see it
    ],
)
def test_path_regex_is_a_full_match_on_the_path(path, expected):
    t = table(named("re", path_regex="/users/[0-9]+/?"))
    assert matched(t, path) == expected


def test_pathological_regex_input_is_linear():
    t = table(named("re", path_regex="(a+)+$"))
    assert matched(t, "/" + "a" * 10240) is None
    assert matched(t, "/" + "a" * 10240 + "!") is None


@pytest.mark.parametrize(
    ("method", "expected"), [("GET", "read"), ("HEAD", "read"), ("POST", None), ("get", None)]
)
def test_methods_match_any_of_them_exactly(method, expected):
    t = table(named("read", path_prefix="/", methods=["GET", "HEAD"]))
    assert matched(t, "/", method=method) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("x-canary", "1"), ("X-Debug", "")], "canary"),
        ([("X-Canary", "2"), ("X-Canary", "1"), ("X-Debug", "y")], "canary"),  # any line
        ([("X-Canary", "1")], "other"),  # X-Debug must be present
        ([("X-Canary", "10"), ("X-Debug", "y")], "other"),  # the exact value
        ([("X-Canary", "1"), ("X-Debug", "y"), ("X-Internal", "z")], "other"),  # must be absent
    ],
)
def test_header_conditions_all_hold_with_names_in_any_case(headers, expected):
    t = table(
        named("canary", path_prefix="/", headers={
            "X-Canary": "1", "x-debug": {"present": True}, "X-Internal": {"present": False},
        }),
        named("other", path_prefix="/"),
    )  # fmt: skip
    assert matched(t, "/", headers=headers) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/?v=2", "v2"),
        ("/?a=1&v=2&b", "v2"),
        ("/?v=1&v=2", "v2"),  # any occurrence of a repeated parameter
        ("/?v=2&flag", "v2"),
        ("/?v=%32", None),  # raw: percent-encoding is not decoded
        ("/?V=2", None),  # names are case-sensitive
        ("/?v=20", None),
        ("/", None),
    ],
)
def test_query_condition_compares_raw_parameters(target, expected):
    t = table(named("v2", path_prefix="/", query={"v": "2"}))
    assert matched(t, target) == expected


def test_empty_query_value_matches_a_bare_name():
    t = table(named("flag", path_prefix="/", query={"debug": ""}))
    assert [matched(t, x) for x in ("/?debug", "/?debug=", "/?debug=1")] == ["flag", "flag", None]


def test_first_matching_route_wins_in_file_order_across_conditions():
    t = table(
        named("post", path_prefix="/api/", methods=["POST"]),
        named("exact", path_exact="/api/x"),
        named("api", path_prefix="/api/"),
        named("narrower-but-later", path_exact="/api/y"),
    )
    assert matched(t, "/api/x", method="POST") == "post"
    assert matched(t, "/api/x") == "exact"
    assert matched(t, "/api/y") == "api"


@pytest.mark.parametrize(
    ("rewrite", "raw", "expected"),
    [
        ({"prefix": "/v2/"}, "/api/users?x=%2F", "/v2/users?x=%2F"),
        ({"prefix": "/"}, "/api/users", "/users"),
        ({"prefix": "/v2/"}, "/api/a/../b?q=/../", "/v2/b?q=/../"),  # the normalised path
        (
            {"regex": {"pattern": "^/api/old/(.*)$", "replacement": "/new/\\1"}},
            "/api/old/a/b?x=1",
            "/new/a/b?x=1",
        ),
        ({"regex": {"pattern": "v1", "replacement": "v2"}}, "/api/v1/v1?v1", "/api/v2/v1?v1"),
        ({"regex": {"pattern": "^/api/(x)?", "replacement": "\\1"}}, "/api/y", "/y"),
        ({"regex": {"pattern": "^/nope", "replacement": "/z"}}, "/api/y?q", "/api/y?q"),
        ({"regex": {"pattern": "^/api/(.*)", "replacement": "\\\\\\1"}}, "/api/a", "/\\a"),
    ],
)
def test_rewrite_replaces_the_path_and_keeps_the_raw_query(rewrite, raw, expected):
    t = table({"match": {"path_prefix": "/api/"}, "upstream": "u", "rewrite": rewrite})
    path = normalized_path(raw)
    assert path is not None
    found = t.match(None, path, "GET", None, raw)
    assert found is not None
    assert t.forwarded_path(found, raw, path) == expected


def test_split_picks_by_weight_with_the_generator_given():
    split = Route(match=Match(path_prefix="/"), name="s",
                  split=(SplitTo("a", 1), SplitTo("b", 3)))  # fmt: skip
    seeded = RoutingTable([split], random.Random(7))
    picks = [seeded.upstream_for(split) for _ in range(4000)]
    # Binomial(4000, 1/4): mean 1000, sd 27; +-4 sd.
    assert 890 <= Counter(picks)["a"] <= 1110
    assert set(picks) == {"a", "b"}
    again = RoutingTable([split], random.Random(7))
    assert [again.upstream_for(split) for _ in range(4000)] == picks


def test_a_redirect_route_has_no_upstream():
    t = table({"match": {"path_prefix": "/"}, "redirect": {"scheme": "https"}})
    found = t.match(None, "/")
    assert found is not None
    assert t.upstream_for(found) == ""
