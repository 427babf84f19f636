"""Per-request identity and policy over real sockets (issue 11, part C): rate limits (429 with
Retry-After, never reaching the upstream, counted), request IDs on the wire both ways and in the
access log, W3C trace context continued or started."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import load_config, parse_config
from proxy.server import ProxyServer
from tests.support import (
    RawBackend,
    RawClient,
    admin_get,
    answering,
    config_dict,
    free_port,
    get,
    http_response,
    metric_value,
    upstream,
    write_config,
)

OK = http_response(body=b"ok")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
NEW_ID = re.compile(r"[0-9a-f]{32}")
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@contextlib.asynccontextmanager
async def logged_proxy(
    origin: RawBackend, fmt: str = "json", **top: Any
) -> AsyncIterator[tuple[ProxyServer, io.StringIO]]:
    """A proxy to `origin` on route "r" (and "/dead/" to a closed port) whose access log is
    read after it stopped."""
    routes = [
        {"name": "dead", "match": {"path_prefix": "/dead/"}, "upstream": "dead"},
        {"name": "r", "match": {"path_prefix": "/"}, "upstream": "app", **top.pop("route", {})},
    ]
    upstreams = {
        "app": upstream(origin.url),
        "dead": upstream(f"http://127.0.0.1:{free_port()}", retries={"attempts": 1}),
    }
    stream = io.StringIO()
    config = parse_config(config_dict(upstreams, routes, access_log={"format": fmt}, **top))
    server = ProxyServer(config, shutdown_grace=1, access_log_stream=stream)
    await server.start()
    try:
        yield server, stream
    finally:
        await server.stop()


async def send(server: ProxyServer, *requests: bytes) -> list:
    client = await RawClient.connect(server.proxy_address[1])
    try:
        return [await client.request(request) for request in requests]
    finally:
        await client.close()


async def rate_limited_count(server: ProxyServer, route: str = "r") -> float:
    _, _, text = await admin_get(server, "/metrics")
    return metric_value(text, "proxy_rate_limited_total", route=route)


# --- rate_limit ---


async def test_exactly_burst_requests_pass_then_429_with_retry_after_and_no_upstream_contact(
    backend,
):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 3, "key": "route"}
    async with logged_proxy(origin, route={"rate_limit": limit}) as (server, _):
        assert await rate_limited_count(server) == 0  # the series exists from the start
        responses = await send(server, *[get("/x")] * 5)
        assert [r.status for r in responses] == [200, 200, 200, 429, 429]
        assert len(origin.requests) == 3  # the 429s never reached the upstream
        # 0.01 tokens/s: the next token is ~100 s away (whole seconds, rounded up).
        assert [r.header("Retry-After") for r in responses[3:]] == ["100", "100"]
        assert responses[3].body.startswith(b"429 Too Many Requests")
        assert responses[0].header("Retry-After") is None
        assert await rate_limited_count(server) == 2
        _, _, text = await admin_get(server, "/metrics")
        assert metric_value(text, "proxy_requests_total", route="r", code="429") == 2
        with pytest.raises(KeyError):  # a route without rate_limit has no series
            metric_value(text, "proxy_rate_limited_total", route="dead")


async def test_client_ip_key_gives_each_client_its_own_bucket(backend):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 2, "key": "client_ip"}
    listen = {"trusted_proxies": ["127.0.0.1/32"]}  # the client is X-Forwarded-For's
    async with logged_proxy(origin, route={"rate_limit": limit}, listen=listen) as (server, _):

        def as_client(address: str) -> bytes:
            return get("/x", extra=f"X-Forwarded-For: {address}\r\n")

        first = await send(server, *[as_client("10.0.0.1")] * 3)
        second = await send(server, *[as_client("10.0.0.2")] * 3)
        assert [r.status for r in first] == [200, 200, 429]
        assert [r.status for r in second] == [200, 200, 429]
        assert len(origin.requests) == 4
        assert await rate_limited_count(server) == 2


async def test_header_key_gives_each_value_a_bucket_and_requests_without_it_share_one(backend):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 1, "key": "header:X-Api-Key"}
    async with logged_proxy(origin, route={"rate_limit": limit}) as (server, _):
        statuses = [
            r.status
            for r in await send(
                server,
                get("/x", extra="X-Api-Key: one\r\n"),
                get("/x", extra="x-api-key: two\r\n"),
                get("/x", extra="X-API-KEY: one\r\n"),
                get("/x"),
                get("/x"),
            )
        ]
        assert statuses == [200, 200, 429, 200, 429]
        assert await rate_limited_count(server) == 2


async def test_each_worker_enforces_its_share_of_the_burst_rounded_up(backend):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 3, "key": "route"}
    # This process is one of 2 workers: its share of burst 3 is 2.
    async with logged_proxy(origin, route={"rate_limit": limit}, workers=2) as (server, _):
        assert [r.status for r in await send(server, *[get("/x")] * 3)] == [200, 200, 429]


# --- request_id ---


async def test_a_trusted_valid_request_id_goes_upstream_and_back_and_into_the_log(backend):
    origin = await backend(answering(OK))
    async with logged_proxy(origin) as (server, log):
        (response,) = await send(server, get("/x", extra="X-Request-Id: abc-123.~!\r\n"))
    assert origin.requests[0].all("X-Request-Id") == ["abc-123.~!"]
    assert response.all("X-Request-Id") == ["abc-123.~!"]
    assert json.loads(log.getvalue())["request_id"] == "abc-123.~!"


@pytest.mark.parametrize(
    ("sent", "top"),
    [
        ("", {}),
        ("X-Request-Id: " + "x" * 201 + "\r\n", {}),
        ("X-Request-Id: has space\r\n", {}),
        ("X-Request-Id: a\r\nX-Request-Id: b\r\n", {}),
        ("X-Request-Id: mine\r\n", {"request_id": {"trust_incoming": False}}),
    ],
    ids=["missing", "too-long", "not-visible", "repeated", "untrusted"],
)
async def test_a_missing_invalid_or_untrusted_request_id_is_replaced(backend, sent, top):
    origin = await backend(answering(OK))
    async with logged_proxy(origin, **top) as (server, log):
        (response,) = await send(server, get("/x", extra=sent))
    (upstream_id,) = origin.requests[0].all("X-Request-Id")
    assert NEW_ID.fullmatch(upstream_id)
    assert response.all("X-Request-Id") == [upstream_id]
    assert json.loads(log.getvalue())["request_id"] == upstream_id


async def test_the_proxys_own_answers_carry_the_request_id_and_log_lines_name_it(backend, caplog):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 1, "key": "route"}
    caplog.set_level(logging.WARNING, logger="proxy")
    async with logged_proxy(origin, route={"rate_limit": limit}) as (server, log):
        responses = await send(
            server,
            get("/dead/x", extra="X-Request-Id: dead-1\r\n"),  # 502: nothing listens
            get("/x", extra="X-Request-Id: ok-1\r\n"),
            get("/x", extra="X-Request-Id: limited-1\r\n"),  # 429
            get("/x", host="bad host", extra="X-Request-Id: refused-1\r\n"),  # 400
        )
    statuses = [(r.status, r.header("X-Request-Id")) for r in responses]
    assert statuses == [(502, "dead-1"), (200, "ok-1"), (429, "limited-1"), (400, "refused-1")]
    warnings = [r.getMessage() for r in caplog.records if "upstream dead" in r.getMessage()]
    assert warnings and all(w.endswith("request_id=dead-1") for w in warnings)
    logged = [json.loads(line)["request_id"] for line in log.getvalue().splitlines()]
    assert logged == ["dead-1", "ok-1", "limited-1", "refused-1"]


async def test_no_route_404_carries_a_new_request_id(backend, proxy):
    origin = await backend(answering(OK))
    routes = [{"match": {"path_prefix": "/only/"}, "upstream": "app"}]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    (response,) = await send(server, get("/elsewhere"))
    assert response.status == 404 and NEW_ID.fullmatch(response.header("X-Request-Id") or "")


async def test_request_id_header_can_be_renamed_or_switched_off(backend):
    origin = await backend(answering(OK))
    async with logged_proxy(origin, request_id={"header": "X-Correlation-Id"}) as (server, log):
        (renamed,) = await send(server, get("/x", extra="X-Request-Id: passes\r\n"))
    assert origin.requests[0].all("X-Request-Id") == ["passes"]  # not ours: passed on as is
    assert NEW_ID.fullmatch(origin.requests[0].header("X-Correlation-Id") or "")
    assert renamed.header("X-Correlation-Id") == origin.requests[0].header("X-Correlation-Id")
    async with logged_proxy(origin, "text", request_id={"header": ""}) as (server, log):
        (off,) = await send(server, get("/x", extra="X-Request-Id: passes\r\n"))
    assert origin.requests[1].all("X-Request-Id") == ["passes"]
    assert off.header("X-Request-Id") is None
    assert " request_id=- " in log.getvalue()


async def test_text_access_log_has_request_id_and_trace_id(backend):
    origin = await backend(answering(OK))
    async with logged_proxy(origin, "text") as (server, log):
        await send(
            server, get("/x", extra=f'X-Request-Id: a"b\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n')
        )
    assert log.getvalue().rstrip("\n").endswith(f' request_id="a\\"b" trace_id={TRACE}')


# --- trace_context ---


async def test_a_valid_traceparent_is_continued_with_a_new_parent_id(backend):
    origin = await backend(answering(OK))
    async with logged_proxy(origin) as (server, log):
        await send(
            server,
            get("/x", extra=f"traceparent: 00-{TRACE}-{PARENT}-01\r\ntracestate: a=1,b=2\r\n"
                "tracestate: c=3\r\n"),
        )  # fmt: skip
    arrived = origin.requests[0]
    (sent,) = arrived.all("traceparent")
    found = TRACEPARENT.fullmatch(sent)
    assert found is not None and found[1] == TRACE and found[3] == "01"
    assert found[2] != PARENT  # the proxy's hop is the upstream's parent
    assert arrived.all("tracestate") == ["a=1,b=2", "c=3"]  # unchanged
    assert json.loads(log.getvalue())["trace_id"] == TRACE


@pytest.mark.parametrize(
    "sent", ["", f"traceparent: 00-{'0' * 32}-{PARENT}-01\r\n", "traceparent: 00-zz\r\n"]
)
async def test_a_missing_or_invalid_traceparent_starts_a_new_trace_and_drops_tracestate(
    backend, sent
):
    origin = await backend(answering(OK))
    async with logged_proxy(origin) as (server, log):
        await send(server, get("/x", extra=sent + "tracestate: a=1\r\n"))
    arrived = origin.requests[0]
    (traceparent,) = arrived.all("traceparent")
    found = TRACEPARENT.fullmatch(traceparent)
    assert found is not None and found[1] not in (TRACE, "0" * 32) and found[3] == "00"
    assert arrived.all("tracestate") == []
    assert json.loads(log.getvalue())["trace_id"] == found[1]


async def test_trace_context_off_passes_both_headers_untouched(backend):
    origin = await backend(answering(OK))
    async with logged_proxy(origin, trace_context=False) as (server, log):
        await send(server, get("/x", extra="traceparent: garbage\r\ntracestate: a=1\r\n"))
    arrived = origin.requests[0]
    assert (arrived.all("traceparent"), arrived.all("tracestate")) == (["garbage"], ["a=1"])
    assert json.loads(log.getvalue())["trace_id"] is None


async def test_a_request_with_a_body_over_the_limit_gets_429_and_the_connection_goes_on(backend):
    origin = await backend(answering(OK))
    limit = {"requests_per_second": 0.01, "burst": 1, "key": "route"}
    post = b"POST /x HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello"
    async with logged_proxy(origin, route={"rate_limit": limit}) as (server, _):
        responses = await send(server, post, post, post)
    assert [r.status for r in responses] == [200, 429, 429]
    assert [r.body for r in origin.requests] == [b"hello"]


async def test_a_reload_keeps_the_buckets_of_an_unchanged_limit(backend, tmp_path):
    origin = await backend(answering(OK))

    def config(burst: int) -> dict[str, Any]:
        limit = {"requests_per_second": 0.01, "burst": burst, "key": "route"}
        return config_dict(
            {"app": upstream(origin.url)},
            [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "app", "rate_limit": limit}],
        )

    path = write_config(tmp_path / "proxy.yaml", config(1))
    server = ProxyServer(load_config(path), config_path=path, shutdown_grace=1)
    await server.start()
    try:
        assert [r.status for r in await send(server, get("/"), get("/"))] == [200, 429]
        write_config(path, {**config(1), "trace_context": False})  # the limit unchanged
        assert (await server.reload())[0]
        assert [r.status for r in await send(server, get("/"))] == [429]
        write_config(path, config(2))  # a new limit: a new, full bucket
        assert (await server.reload())[0]
        assert [r.status for r in await send(server, *[get("/")] * 3)] == [200, 200, 429]
    finally:
        await server.stop()


async def test_a_request_the_parser_refuses_gets_a_request_id_too(backend):
    """431 (a header line over listen.limits.max_header) never reaches the handler: its
    answer and its access log line still carry one ID."""
    import json

    origin = await backend(answering(OK))
    async with logged_proxy(origin) as (server, stream):
        (response,) = await send(server, get("/", extra="X-Big: " + "b" * 9000 + "\r\n"))
    request_id = response.header("X-Request-Id") or ""
    assert response.status == 431 and NEW_ID.fullmatch(request_id)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["request_id"] == request_id
