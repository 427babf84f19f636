"""Route matching, rewrites, redirects and splits (issue 11), over real sockets: each backend
answers with its own name, so the client sees which route took the request, and records the
exact request-target it got."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections import Counter
from typing import Any

from proxy.config import parse_config
from proxy.server import ProxyServer
from tests.support import (
    RawClient,
    RawResponse,
    admin_get,
    answering,
    config_dict,
    get,
    http_response,
    metric_value,
    upstream,
)


async def named_backends(backend, *names: str) -> dict[str, Any]:
    """One backend per name, each answering 200 with its name as the body."""
    started = {}
    for name in names:
        started[name] = await backend(answering(http_response(body=name.encode())))
    return started


async def routed(backend, proxy, routes: list[dict[str, Any]], *names: str, **top: Any):
    """A proxy with `routes` over backends a, b, c (or `names`): (proxy, backends)."""
    backends = await named_backends(backend, *(names or ("a", "b", "c")))
    upstreams = {name: upstream(b.url) for name, b in backends.items()}
    return await proxy(config_dict(upstreams, routes, **top)), backends


async def ask(server: ProxyServer, raw: bytes) -> RawResponse:
    client = await RawClient.connect(server.proxy_address[1])
    try:
        return await client.request(raw, head_request=raw.startswith(b"HEAD "))
    finally:
        await client.close()


async def who(server: ProxyServer, raw: bytes) -> str:
    """Which backend answered (404: none, the proxy's own answer)."""
    answer = await ask(server, raw)
    return answer.body.decode() if answer.status == 200 else str(answer.status)


def route(upstream_name: str, **match: Any) -> dict[str, Any]:
    """A route to `upstream_name`, named after it (routes on one path need names)."""
    return {"name": upstream_name, "match": match, "upstream": upstream_name}


# --- match conditions ---


async def test_wildcard_host_matches_one_or_more_labels_but_not_the_bare_domain(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", host="*.example.com", path_prefix="/"),
        route("b", path_prefix="/"),
    ])  # fmt: skip
    assert await who(server, get(host="api.example.com")) == "a"
    assert await who(server, get(host="v2.API.Example.com:8443")) == "a"
    assert await who(server, get(host="example.com")) == "b"
    assert await who(server, get(host="notexample.com")) == "b"


async def test_path_exact_takes_only_that_path_and_prefix_the_rest(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", path_exact="/login"),
        route("b", path_prefix="/login"),
    ])  # fmt: skip
    assert await who(server, get("/login")) == "a"
    assert await who(server, get("/login?next=/x")) == "a"
    assert await who(server, get("/login/")) == "b"
    assert await who(server, get("/loginx")) == "b"
    assert await who(server, get("/other")) == "404"


async def test_path_regex_must_match_the_whole_path(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", path_regex="/users/[0-9]+/?"),
        route("b", path_prefix="/"),
    ])  # fmt: skip
    assert await who(server, get("/users/42")) == "a"
    assert await who(server, get("/users/42/?tab=1")) == "a"
    assert await who(server, get("/users/42/posts")) == "b"  # a search would match this
    assert await who(server, get("/v1/users/42")) == "b"


async def test_methods_match_any_listed(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", path_prefix="/", methods=["POST", "PUT"]),
        route("b", path_prefix="/", methods=["GET"]),
    ])  # fmt: skip
    post = b"POST / HTTP/1.1\r\nHost: x.test\r\nContent-Length: 0\r\n\r\n"
    assert await who(server, post) == "a"
    assert await who(server, get()) == "b"
    assert await who(server, b"HEAD / HTTP/1.1\r\nHost: x.test\r\n\r\n") == "404"  # not listed


async def test_header_conditions_exact_present_and_absent(backend, proxy):
    server, _ = await routed(backend, proxy, [
        {**route("a", path_prefix="/"),
         "match": {"path_prefix": "/", "headers": {"X-Canary": "1", "X-Debug": {"present": True}}}},
        {**route("b", path_prefix="/"),
         "match": {"path_prefix": "/", "headers": {"x-block": {"present": False}}}},
        route("c", path_prefix="/"),
    ])  # fmt: skip
    assert await who(server, get(extra="x-canary: 1\r\nX-DEBUG: \r\n")) == "a"
    assert await who(server, get(extra="X-Canary: 1\r\n")) == "b"  # X-Debug missing
    assert await who(server, get(extra="X-Canary: 10\r\nX-Debug: y\r\n")) == "b"  # not exact
    assert await who(server, get(extra="X-Block: 1\r\n")) == "c"  # must be absent for b


async def test_query_condition_compares_the_raw_parameter(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", path_prefix="/", query={"v": "2"}),
        route("b", path_prefix="/"),
    ])  # fmt: skip
    assert await who(server, get("/x?v=2")) == "a"
    assert await who(server, get("/x?a=1&v=1&v=2")) == "a"  # any occurrence
    assert await who(server, get("/x?v=%32")) == "b"  # not decoded
    assert await who(server, get("/x?v=20")) == "b"
    assert await who(server, get("/x")) == "b"


async def test_first_matching_route_wins_even_when_a_later_one_is_narrower(backend, proxy):
    server, _ = await routed(backend, proxy, [
        route("a", path_prefix="/api/"),
        route("b", path_exact="/api/x"),
    ])  # fmt: skip
    assert await who(server, get("/api/x")) == "a"


async def test_pathological_regex_input_answers(backend, proxy):
    # `(a+)+$` backtracks exponentially in Python's re; RE2 is linear. No timing assertion:
    # the test's own timeout is the bound.
    server, _ = await routed(
        backend, proxy, [route("a", path_regex="/(a+)+$"), route("b", path_prefix="/")],
        listen={"limits": {"max_request_line": 32768}},
    )  # fmt: skip
    assert await who(server, get("/" + "a" * 10240)) == "a"
    assert await who(server, get("/" + "a" * 10240 + "!")) == "b"


# --- rewrite ---


async def test_rewrite_prefix_replaces_the_matched_prefix_and_keeps_the_raw_query(backend, proxy):
    server, backends = await routed(backend, proxy, [
        {**route("a", path_prefix="/api/"), "rewrite": {"prefix": "/v2/"}},
    ], "a")  # fmt: skip
    assert await who(server, get("/api/users/%7E1?x=%2F&y=/../")) == "a"
    assert backends["a"].requests[0].target == "/v2/users/%7E1?x=%2F&y=/../"


async def test_rewrite_regex_substitutes_groups_and_keeps_the_raw_query(backend, proxy):
    server, backends = await routed(backend, proxy, [
        {**route("a", path_prefix="/"),
         "rewrite": {"regex": {"pattern": "^/old/([^/]+)/(.*)$", "replacement": "/new/\\2/\\1"}}},
    ], "a")  # fmt: skip
    assert await who(server, get("/old/x/y/z?q=1&r")) == "a"
    assert await who(server, get("/other?q")) == "a"  # no match: the path goes unchanged
    assert [r.target for r in backends["a"].requests] == ["/new/y/z/x?q=1&r", "/other?q"]


# --- redirect ---

REDIRECTS = [
    {"name": "scheme", "match": {"path_prefix": "/s/"}, "redirect": {"scheme": "https"}},
    {"name": "host", "match": {"path_prefix": "/h/"},
     "redirect": {"host": "other.test", "status": 301}},
    {"name": "port", "match": {"path_prefix": "/p/"}, "redirect": {"port": 8443, "status": 302}},
    {"name": "path", "match": {"path_prefix": "/path/"},
     "redirect": {"path": "/new", "status": 307}},
    {"name": "all", "match": {"path_prefix": "/all/"},
     "redirect": {"scheme": "https", "host": "a.test", "port": 443, "path": "/z", "status": 303}},
    {"name": "moved", "match": {"path_prefix": "/old/"}, "redirect": {"status": 301},
     "rewrite": {"regex": {"pattern": "^/old/(.*)$", "replacement": "/new/\\1"}}},
    {"name": "idle", "match": {"path_prefix": "/idle/"}, "redirect": {"status": 301}},
    {"name": "app", "match": {"path_prefix": "/"}, "upstream": "a"},
]  # fmt: skip


async def test_redirect_builds_location_from_the_request_and_its_parts(backend, proxy):
    server, backends = await routed(backend, proxy, REDIRECTS, "a")
    host = "Example.test:8080"
    expected = {
        # The request's port goes only with the request's scheme (http://h:8080 -> https://h).
        "/s/x?q=1&r=%2F": (308, "https://Example.test/s/x?q=1&r=%2F"),
        "/h/x?q=1": (301, "http://other.test:8080/h/x?q=1"),
        "/p/x?q=1": (302, "http://Example.test:8443/p/x?q=1"),
        "/path/x/y?q=1": (307, "http://Example.test:8080/new?q=1"),
        "/all/x?q=1": (303, "https://a.test/z?q=1"),
        "/old/a/b?q=1": (301, "http://Example.test:8080/new/a/b?q=1"),
        "/path/x": (307, "http://Example.test:8080/new"),
    }
    for target, (status, location) in expected.items():
        answer = await ask(server, get(target, host=host))
        assert (answer.status, answer.header("Location")) == (status, location), target
        assert answer.header("Content-Length") == str(len(answer.body))
    answer = await ask(server, get("/s/x", host="[::1]:80"))
    assert answer.header("Location") == "https://[::1]/s/x"
    answer = await ask(server, get("/h/x", host="example.test"))
    assert answer.header("Location") == "http://other.test/h/x"
    assert backends["a"].requests == []  # a redirect contacts no upstream

    _, _, text = await admin_get(server, "/metrics")
    assert metric_value(text, "proxy_redirects_total", route="path", code="307") == 2
    assert metric_value(text, "proxy_redirects_total", route="scheme", code="308") == 2
    assert metric_value(text, "proxy_redirects_total", route="idle", code="301") == 0
    assert metric_value(text, "proxy_requests_total", route="all", upstream="", code="303") == 1


async def test_redirect_without_host_is_relative_or_refused(backend, proxy):
    server, _ = await routed(backend, proxy, REDIRECTS, "a")
    answer = await ask(server, b"GET /path/x?q HTTP/1.0\r\n\r\n")
    assert (answer.status, answer.header("Location")) == (307, "/new?q")
    answer = await ask(server, b"GET /s/x HTTP/1.0\r\n\r\n")
    assert answer.status == 400  # another scheme, but no host to name


# --- split ---


async def test_split_sends_each_request_by_weight_and_counts_the_upstream_used(backend, proxy):
    backends = await named_backends(backend, "canary", "stable")
    split = [{"upstream": "canary", "weight": 1}, {"upstream": "stable", "weight": 3}]
    routes = [{"name": "api", "match": {"path_prefix": "/"}, "split": split}]
    config = config_dict({n: upstream(b.url) for n, b in backends.items()}, routes)
    # A seeded generator (ProxyServer(split_random=...)) makes the draw repeatable.
    log = io.StringIO()
    server = ProxyServer(
        parse_config(config), shutdown_grace=2.0, split_random=random.Random(11),
        access_log_stream=log,
    )  # fmt: skip
    await server.start()
    try:
        _, _, text = await admin_get(server, "/metrics")  # every series a split can use, at 0
        for name in ("canary", "stable"):
            count = "proxy_request_duration_seconds_count"
            assert metric_value(text, count, route="api", upstream=name) == 0

        async def send(n: int) -> Counter[str]:
            client = await RawClient.connect(server.proxy_address[1])
            try:
                return Counter([(await client.request(get())).body.decode() for _ in range(n)])
            finally:
                await client.close()

        answered = sum(await asyncio.gather(*(send(500) for _ in range(4))), Counter())
        # Binomial(2000, 1/4): mean 500, sd 19.4; the bounds are +-4 sd.
        assert 422 <= answered["canary"] <= 578
        assert answered["canary"] + answered["stable"] == 2000
        assert len(backends["canary"].requests) == answered["canary"]
        _, _, text = await admin_get(server, "/metrics")
        for name in ("canary", "stable"):
            total = metric_value(text, "proxy_requests_total", route="api", upstream=name)
            assert total == answered[name]
    finally:
        await server.stop()  # flushes the access log
    logged = Counter(json.loads(line)["upstream"] for line in log.getvalue().splitlines())
    assert logged == answered


# --- found by review ---


async def test_a_rewritten_path_never_starts_with_two_slashes(backend, proxy):
    """ "//users" would be scheme-relative to many backends, and to a browser in a Location."""
    server, backends = await routed(backend, proxy, [
        {**route("a", path_prefix="/api"), "rewrite": {"prefix": "/"}, "name": "api"},
        {**route("a", path_prefix="/old"), "name": "old",
         "rewrite": {"regex": {"pattern": "^/old(/.*)$", "replacement": "\\1"}}},
        {"name": "away", "match": {"path_prefix": "/go"}, "rewrite": {"prefix": "/"},
         "redirect": {"status": 301}},
    ], "a")  # fmt: skip
    assert await who(server, get("/api/users?q")) == "a"
    assert await who(server, get("/old//evil.example/x")) == "a"
    assert [r.target for r in backends["a"].requests] == ["/users?q", "/evil.example/x"]
    # HTTP/1.0 without Host: only a relative Location is possible, and it stays on this host.
    answer = await ask(server, b"GET /go//evil.example/x HTTP/1.0\r\n\r\n")
    assert (answer.status, answer.header("Location")) == (301, "/evil.example/x")
