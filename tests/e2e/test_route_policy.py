"""Per-route policy (issue 11, part B): header rules both ways, the Host sent upstream, the
route's read and total timeouts and its attempts. Real backends record the bytes they get."""

from __future__ import annotations

import asyncio
import time

from tests.support import (
    RawClient,
    admin_get,
    answering,
    config_dict,
    exchange,
    free_port,
    get,
    http_response,
    metric_value,
    read_request,
    upstream,
)


def route(prefix: str, name: str = "app", **settings) -> dict:
    return {"match": {"path_prefix": prefix}, "upstream": name, **settings}


async def one(port: int, data: bytes):
    client = await RawClient.connect(port)
    try:
        return await client.request(data)
    finally:
        await client.close()


def host_lines(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")[1:] if line.lower().startswith(b"host:")]


# --- headers ---


async def test_request_rules_remove_then_set_then_add_after_the_proxys_own(backend, proxy):
    origin = await backend(answering(http_response(body=b"ok")))
    rules = {
        # Names in any case; a header both removed and added ends with the added value only.
        "remove": ["x-internal-token", "X-Both"],
        "set": {"X-Env": "prod", "X-Forwarded-Proto": "https"},
        "add": {"X-Seen": "1", "x-both": "new"},
    }
    server = await proxy(
        config_dict({"app": upstream(origin.url)}, [route("/", headers={"request": rules})])
    )
    sent = (
        "X-Internal-Token: secret\r\nX-Env: dev\r\nX-Env: test\r\nx-seen: 0\r\n"
        "X-Both: old\r\nX-Both: older\r\n"
    )
    answer = await one(server.proxy_address[1], get(extra=sent))
    assert answer.status == 200
    got = origin.requests[0]
    assert got.all("X-Internal-Token") == []
    assert got.all("X-Env") == ["prod"]  # set replaces every value the client sent
    assert got.all("X-Seen") == ["0", "1"]  # add appends
    assert got.all("X-Both") == ["new"]
    # After the proxy's own X-Forwarded-*: the rule's value, not the proxy's "http".
    assert got.all("X-Forwarded-Proto") == ["https"]
    assert got.all("X-Forwarded-For") == ["127.0.0.1"]
    # One spelling on the wire, so aiohttp kept both values (it tracks names by case).
    assert [k for k, _ in got.headers if k.lower() == "x-seen"] == ["x-seen", "x-seen"]


async def test_response_rules_reach_the_client_and_other_routes_are_untouched(backend, proxy):
    head = [
        ("Server", "backend/1.0"),
        ("X-Powered-By", "php"),
        ("X-Keep", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    origin = await backend(answering(http_response(headers=head, body=b"ok")))
    rules = {
        "remove": ["server", "X-Powered-By"],
        "set": {"Strict-Transport-Security": "max-age=63072000"},
        "add": {"X-Keep": "2"},
    }
    routes = [route("/ruled/", headers={"response": rules}), route("/")]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    port = server.proxy_address[1]

    ruled = await one(port, get("/ruled/x"))
    assert ruled.status == 200 and ruled.body == b"ok"
    assert ruled.all("Server") == [] and ruled.all("X-Powered-By") == []
    assert ruled.all("Strict-Transport-Security") == ["max-age=63072000"]
    assert ruled.all("X-Keep") == ["1", "2"]
    assert ruled.all("Set-Cookie") == ["a=1", "b=2"]

    plain = await one(port, get("/other"))
    assert plain.all("Server") == ["backend/1.0"]
    assert plain.all("Strict-Transport-Security") == []


async def test_response_rules_apply_to_the_proxys_own_502_for_that_route(proxy):
    rules = {"set": {"Strict-Transport-Security": "max-age=63072000"}, "add": {"X-Route": "api"}}
    refusing = f"http://127.0.0.1:{free_port()}"
    routes = [route("/api/", headers={"response": rules}), route("/")]
    server = await proxy(config_dict({"app": upstream(refusing)}, routes))
    port = server.proxy_address[1]

    failed = await one(port, get("/api/x"))
    assert failed.status == 502
    assert failed.all("Strict-Transport-Security") == ["max-age=63072000"]
    assert failed.all("X-Route") == ["api"]
    assert b"could not connect" in failed.body

    other = await one(port, get("/x"))  # another route's 502 keeps the proxy's own headers
    assert other.status == 502
    assert other.all("Strict-Transport-Security") == []
    assert other.all("X-Route") == []


async def test_response_rules_remove_from_the_proxys_own_503(backend, proxy):
    origin = await backend(answering(http_response(body=b"slow"), delay=1.0))
    rules = {"remove": ["Retry-After"], "set": {"Strict-Transport-Security": "max-age=1"}}
    settings = {"pool": {"limit": 1}, "timeouts": {"connect": 0.3}}
    routes = [route("/", headers={"response": rules})]
    server = await proxy(config_dict({"app": upstream(origin.url, **settings)}, routes))
    port = server.proxy_address[1]
    slow = asyncio.create_task(exchange(port, get(extra="Connection: close\r\n")))
    await origin.received(1)
    waited = await one(port, get())
    assert waited.status == 503  # no connection free in time: the proxy's own, busy answer
    assert waited.all("Retry-After") == []
    assert waited.all("Strict-Transport-Security") == ["max-age=1"]
    assert (await slow).endswith(b"slow")


# --- host_header ---


async def test_host_header_pass_target_and_literal_are_exactly_what_the_backend_gets(
    backend, proxy
):
    origin = await backend(answering(http_response(body=b"ok")))
    routes = [
        route("/target/", host_header="target"),
        route("/literal/", host_header="api.example.com:8443"),
        route("/", host_header="pass"),
    ]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    port = server.proxy_address[1]

    for target in ("/pass", "/target/x", "/literal/x"):
        # The client's own spelling "host": aiohttp must not add a second Host of its own.
        request = f"GET {target} HTTP/1.1\r\nhost: Client.Example:8080\r\n\r\n".encode()
        assert (await one(port, request)).status == 200
    passed, targeted, literal = origin.requests
    assert host_lines(passed.head) == [b"Host: Client.Example:8080"]
    assert [v for k, v in targeted.headers if k.lower() == "host"] == [f"127.0.0.1:{origin.port}"]
    assert len(host_lines(targeted.head)) == 1
    assert [v for k, v in literal.headers if k.lower() == "host"] == ["api.example.com:8443"]
    assert len(host_lines(literal.head)) == 1
    # X-Forwarded-Host still says what the client asked for.
    assert literal.all("X-Forwarded-Host") == ["Client.Example:8080"]


async def test_host_header_literal_also_replaces_an_absolute_form_authority(backend, proxy):
    origin = await backend(answering(http_response(body=b"ok")))
    routes = [route("/", host_header="internal.test")]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    request = b"GET http://outside.test/x HTTP/1.1\r\nHost: outside.test\r\n\r\n"
    assert (await one(server.proxy_address[1], request)).status == 200
    assert origin.requests[0].all("Host") == ["internal.test"]
    assert origin.requests[0].target == "/x"


# --- timeouts ---


async def test_route_read_timeout_overrides_a_longer_upstream_read(backend, proxy):
    origin = await backend(answering(http_response(body=b"late"), delay=2.0))
    routes = [route("/", timeouts={"read": 0.3})]
    server = await proxy(config_dict({"app": upstream(origin.url, timeouts={"read": 30})}, routes))
    started = time.monotonic()
    answer = await one(server.proxy_address[1], get())
    assert answer.status == 504
    assert time.monotonic() - started < 1.5


async def test_route_read_timeout_overrides_a_shorter_upstream_read(backend, proxy):
    origin = await backend(answering(http_response(body=b"late"), delay=0.6))
    routes = [route("/long/", timeouts={"read": 5}), route("/")]
    server = await proxy(config_dict({"app": upstream(origin.url, timeouts={"read": 0.3})}, routes))
    port = server.proxy_address[1]
    assert (await one(port, get("/long/x"))).body == b"late"
    assert (await one(port, get("/x"))).status == 504  # the upstream's read, elsewhere


async def test_total_timeout_before_the_response_headers_is_504(backend, proxy):
    origin = await backend(answering(http_response(body=b"late"), delay=3.0))
    routes = [route("/", timeouts={"total": 0.4})]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    started = time.monotonic()
    answer = await one(server.proxy_address[1], get())
    assert answer.status == 504
    assert b"total timeout" in answer.body
    assert time.monotonic() - started < 2.0
    _, _, metrics = await admin_get(server, "/metrics")
    target = origin.url
    failures = "proxy_upstream_attempt_failures_total"
    assert metric_value(metrics, failures, upstream="app", target=target, kind="timeout") == 1


async def trickles(backend, reader, writer) -> None:
    """Answers headers and a chunk at once, then one chunk every 0.1 s, never finishing: no read
    timeout ever fires."""
    request = await read_request(reader)
    assert request is not None
    backend.record(request)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    await writer.drain()
    for _ in range(100):
        await asyncio.sleep(0.1)
        writer.write(b"1\r\n.\r\n")
        await writer.drain()


async def test_total_timeout_after_the_response_headers_cuts_the_client(backend, proxy):
    origin = await backend(trickles)
    routes = [route("/", timeouts={"total": 0.5, "read": 1})]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    started = time.monotonic()
    # exchange() reads until the proxy closes the connection.
    received = await exchange(server.proxy_address[1], get(), within=5)
    assert time.monotonic() - started < 3.0
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert b"first" in received
    assert not received.endswith(b"0\r\n\r\n")  # never a body that looks complete


async def test_total_timeout_after_headers_cuts_a_content_length_body_short(backend, proxy):
    async def stalls(backend, reader, writer) -> None:
        backend.record(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(30)

    origin = await backend(stalls)
    routes = [route("/", timeouts={"total": 0.4})]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    received = await exchange(server.proxy_address[1], get(), within=5)
    _, _, body = received.partition(b"\r\n\r\n")
    assert body == b"0123456789"  # and the connection closed: the client knows it is short


async def test_total_timeout_does_not_touch_an_exchange_that_finishes_in_time(backend, proxy):
    origin = await backend(answering(http_response(body=b"quick"), delay=0.05))
    routes = [route("/", timeouts={"total": 2})]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for _ in range(3):  # the same connection: nothing was cut or left pending
            assert (await client.request(get())).body == b"quick"
        await asyncio.sleep(2.2)  # past the bound of the first: its timer is gone
        assert (await client.request(get())).body == b"quick"
    finally:
        await client.close()


# --- retries ---


async def test_route_attempts_override_the_upstreams(proxy):
    refusing = f"http://127.0.0.1:{free_port()}"
    routes = [route("/once/", retries={"attempts": 1}), route("/")]
    server = await proxy(
        config_dict({"app": upstream(refusing, retries={"attempts": 2, "budget": 1})}, routes)
    )
    port = server.proxy_address[1]
    failures = "proxy_upstream_attempt_failures_total"

    async def attempts() -> float:
        _, _, metrics = await admin_get(server, "/metrics")
        return metric_value(metrics, failures, upstream="app", target=refusing, kind="connect")

    assert (await one(port, get("/once/x"))).status == 502
    assert await attempts() == 1
    assert (await one(port, get("/x"))).status == 502
    assert await attempts() == 3  # the upstream's 2


async def test_route_attempts_counted_on_the_wire(backend, proxy):
    async def hangs_up(backend, reader, writer) -> None:
        request = await read_request(reader)
        if request is not None:
            backend.record(request)
        writer.transport.abort()

    origin = await backend(hangs_up)
    routes = [route("/once/", retries={"attempts": 1}), route("/")]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    port = server.proxy_address[1]
    assert (await one(port, get("/once/x"))).status == 502
    assert len(origin.requests) == 1
    assert (await one(port, get("/x"))).status == 502
    assert len(origin.requests) == 3  # retries.attempts 2 by default


async def test_host_header_leaves_health_checks_alone(backend, proxy):
    origin = await backend(answering(http_response(body=b"ok")))
    check = {"path": "/healthz", "interval": 0.1, "healthy_threshold": 1}
    routes = [route("/", host_header="api.example.com")]
    server = await proxy(config_dict({"app": upstream(origin.url, health_check=check)}, routes))
    assert (await one(server.proxy_address[1], get("/x"))).status == 200
    await origin.received(3)
    checks = [r for r in origin.requests if r.target == "/healthz"]
    served = [r for r in origin.requests if r.target == "/x"]
    assert checks and {r.header("Host") for r in checks} == {f"127.0.0.1:{origin.port}"}
    assert [r.header("Host") for r in served] == ["api.example.com"]
