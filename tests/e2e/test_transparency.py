"""What the client sends reaches the backend, and what the backend answers reaches the client,
byte for byte, except where RFC 9110/9112 tells a proxy to change it."""

from __future__ import annotations

import gzip

import aiohttp
import pytest
from aiohttp import web

from proxy.deadlines import Deadlines
from proxy.listener import ProxyHTTPServer, handler_kwargs
from tests.support import (
    RawClient,
    RawRequest,
    answering,
    config_dict,
    exchange,
    get,
    http_response,
    read_response,
    upstream,
)

OK = http_response(body=b"ok")


async def one_request(backend, proxy, raw: bytes, response: bytes = OK, **route):
    """Send `raw` through a proxy to a recording backend: (what arrived, what came back)."""
    origin = await backend(answering(response))
    routes = [{"match": {"path_prefix": "/"}, "upstream": "app", **route}]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        head_request = raw.startswith(b"HEAD ")
        answer = await client.request(raw, head_request=head_request)
    finally:
        await client.close()
    return (origin.requests[0] if origin.requests else None), answer


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb",
        "/%7Euser/%7e",
        "/a;b=c;d",
        "//double//slash",
        "/a/../b/./c",
        "/q?x=%2F&y=&z&=&a=%20+b",
        "/sp%20ace?%3D=%3d",
        "/%E2%82%AC?k=%e2%82%ac",
        "/*?a[]=1&a[]=2",
    ],
)
async def test_request_target_is_forwarded_byte_for_byte(backend, proxy, target):
    arrived, answer = await one_request(backend, proxy, get(target))
    assert answer.status == 200
    assert arrived.target == target


async def test_fragment_in_request_target_is_rejected_not_silently_dropped(backend, proxy):
    arrived, answer = await one_request(backend, proxy, get("/p?q#frag"))
    assert answer.status == 400
    assert arrived is None


async def test_strip_prefix_keeps_the_rest_of_the_raw_target(backend, proxy):
    arrived, _ = await one_request(
        backend,
        proxy,
        get("/svc/a%2Fb..;c?q=%7e/../"),
        strip_prefix=True,
        match={"path_prefix": "/svc/"},
    )
    assert arrived.target == "/a%2Fb..;c?q=%7e/../"


async def test_host_passes_through_as_the_client_sent_it(backend, proxy):
    arrived, _ = await one_request(backend, proxy, get(host="Api.Example.COM:8443"))
    assert arrived.all("Host") == ["Api.Example.COM:8443"]


async def test_absolute_form_target_is_sent_in_origin_form_with_its_authority_as_host(
    backend, proxy
):
    raw = b"GET http://Other.Test:81/p%2F?q HTTP/1.1\r\nHost: ignored.test\r\n\r\n"
    arrived, answer = await one_request(backend, proxy, raw)
    assert answer.status == 200
    assert arrived.target == "/p%2F?q"
    assert arrived.all("Host") == ["Other.Test:81"]


async def test_duplicate_request_headers_keep_every_value_in_order(backend, proxy):
    extra = "X-Multi: one\r\nAccept: a/b\r\nX-Multi: two\r\nx-multi: three\r\n"
    arrived, _ = await one_request(backend, proxy, get(extra=extra))
    assert arrived.all("X-Multi") == ["one", "two", "three"]
    assert arrived.names.index("Accept") == 2  # order kept across names too


async def test_duplicate_set_cookie_headers_reach_client_separately(backend, proxy):
    response = http_response(
        headers=[
            ("Set-Cookie", "a=1; Path=/"),
            ("X-Other", "x"),
            ("Set-Cookie", "b=2; HttpOnly"),
            ("set-cookie", "c=3"),
        ],
        body=b"ok",
    )
    _, answer = await one_request(backend, proxy, get(), response)
    assert answer.all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly", "c=3"]


async def test_hop_by_hop_request_headers_are_removed(backend, proxy):
    extra = (
        "Connection: keep-alive, X-Conn-Listed\r\nX-Conn-Listed: secret\r\n"
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n"
        "Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eA==\r\n"
        "X-End-To-End: kept\r\n"
    )
    arrived, _ = await one_request(backend, proxy, get(extra=extra))
    names = {n.lower() for n in arrived.names}
    for gone in (
        "x-conn-listed",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ):
        assert gone not in names
    assert arrived.all("Connection") in ([], ["keep-alive"])  # the proxy's own, if any
    assert arrived.all("X-End-To-End") == ["kept"]


async def test_te_trailers_is_not_forwarded_while_trailers_cannot_be_relayed(backend, proxy):
    arrived, _ = await one_request(backend, proxy, get(extra="Connection: TE\r\nTE: trailers\r\n"))
    assert arrived.all("TE") == []


async def test_hop_by_hop_response_headers_are_removed(backend, proxy):
    response = http_response(
        headers=[
            ("Connection", "X-Listed"),
            ("X-Listed", "1"),
            ("Keep-Alive", "timeout=9"),
            ("Upgrade", "h2c"),
            ("Proxy-Authenticate", "Basic"),
            ("X-Kept", "yes"),
        ],
        body=b"ok",
    )
    _, answer = await one_request(backend, proxy, get(), response)
    names = {n.lower() for n, _ in answer.headers}
    assert not names & {"x-listed", "keep-alive", "upgrade", "proxy-authenticate"}
    assert answer.all("X-Kept") == ["yes"]


async def test_x_forwarded_headers_from_a_client_are_replaced_by_the_proxys(backend, proxy):
    # No listen.trusted_proxies: the peer is the client, and what it says about itself is a
    # forgery (tests/e2e/test_client_identity.py has the trusted cases).
    extra = (
        "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1, 10.0.0.1\r\n"
        "X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed.test\r\n"
    )
    arrived, _ = await one_request(backend, proxy, get(host="shop.test", extra=extra))
    assert arrived.all("X-Forwarded-For") == ["127.0.0.1"]
    assert arrived.all("X-Forwarded-Proto") == ["http"]
    assert arrived.all("X-Forwarded-Host") == ["shop.test"]


async def test_proxy_invents_no_request_headers_on_get(backend, proxy):
    arrived, _ = await one_request(backend, proxy, get(extra="X-Only: 1\r\n"))
    assert arrived.names == [
        "Host",
        "X-Only",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Request-Id",  # request_id and trace_context are on by default
        "traceparent",
    ]


async def test_body_less_get_is_sent_without_framing_headers(backend, proxy):
    arrived, _ = await one_request(backend, proxy, get())
    names = {n.lower() for n in arrived.names}
    assert "transfer-encoding" not in names
    assert "content-length" not in names
    assert arrived.body == b""


async def test_post_body_keeps_its_length_and_gets_no_content_type(backend, proxy):
    raw = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    arrived, answer = await one_request(backend, proxy, raw)
    assert answer.status == 200
    assert arrived.body == b"hello"
    assert arrived.all("Content-Length") == ["5"]
    assert not {"content-type", "transfer-encoding", "user-agent", "accept", "accept-encoding"} & {
        n.lower() for n in arrived.names
    }


async def test_chunked_upload_is_re_chunked_with_the_same_bytes(backend, proxy):
    raw = (
        b"PUT /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    arrived, _ = await one_request(backend, proxy, raw)
    assert arrived.body == b"abcde"
    assert arrived.all("Transfer-Encoding") == ["chunked"]


async def test_gzip_upload_reaches_the_backend_still_compressed(backend, proxy):
    payload = gzip.compress(b"compressed upload " * 100)
    raw = (
        b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    arrived, _ = await one_request(backend, proxy, raw)
    assert arrived.all("Content-Encoding") == ["gzip"]
    assert arrived.body == payload


async def test_gzip_response_reaches_the_client_still_compressed(backend, proxy):
    payload = gzip.compress(b"compressed download " * 100)
    response = http_response(headers=[("Content-Encoding", "gzip")], body=payload)
    _, answer = await one_request(backend, proxy, get(extra="Accept-Encoding: gzip\r\n"), response)
    assert answer.header("Content-Encoding") == "gzip"
    assert answer.header("Content-Length") == str(len(payload))
    assert answer.body == payload


async def test_redirects_are_passed_to_the_client_not_followed(backend, proxy):
    response = http_response(302, "Found", [("Location", "/elsewhere")])
    _, answer = await one_request(backend, proxy, get(), response)
    assert answer.status == 302
    assert answer.header("Location") == "/elsewhere"


async def test_status_and_reason_phrase_pass_unchanged(backend, proxy):
    response = http_response(299, "Very Custom Reason", body=b"x")
    _, answer = await one_request(backend, proxy, get(), response)
    assert (answer.status, answer.reason, answer.body) == (299, "Very Custom Reason", b"x")


async def test_proxy_invents_no_response_headers(backend, proxy):
    # No Server and no Content-Type from the backend: the client must not get aiohttp's.
    response = (
        b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nhi"
    )
    _, answer = await one_request(backend, proxy, get(), response)
    assert [n for n, _ in answer.headers] == ["Date", "Content-Length", "X-Request-Id"]
    assert answer.header("Date") == "Mon, 01 Jan 2024 00:00:00 GMT"


async def test_backend_server_and_content_type_are_kept(backend, proxy):
    response = http_response(headers=[("Server", "nginx/1.25"), ("Content-Type", "x/y")], body=b".")
    _, answer = await one_request(backend, proxy, get(), response)
    assert answer.all("Server") == ["nginx/1.25"]
    assert answer.all("Content-Type") == ["x/y"]


async def test_head_keeps_content_length(backend, proxy):
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n"
    arrived, answer = await one_request(
        backend, proxy, b"HEAD /f HTTP/1.1\r\nHost: h\r\n\r\n", response
    )
    assert arrived.method == "HEAD"
    assert answer.header("Content-Length") == "12345"
    assert answer.body == b""


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_leave_the_client_connection_usable(backend, proxy, status):
    extra = [("ETag", '"v1"'), ("Content-Length", "7")] if status == 304 else []
    statuses = iter([http_response(status, "X", extra, content_length=False), OK])
    origin = await backend(answering(lambda request: next(statuses)))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        first = await client.request(get("/1"))
        second = await client.request(get("/2"))  # same connection: nothing stray in between
    finally:
        await client.close()
    assert first.status == status
    assert "Transfer-Encoding" not in dict(first.headers)
    if status == 304:
        assert first.header("ETag") == '"v1"'
        assert first.header("Content-Length") == "7"  # RFC 9110 §8.6 allows it; kept
    else:
        assert first.header("Content-Length") is None
    assert (second.status, second.body) == (200, b"ok")
    assert origin.connections == 1


async def test_http_1_0_client_is_served(backend, proxy):
    body = b"x" * 100
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + body + b"\r\n0\r\n\r\n"
    )
    origin = await backend(answering(chunked))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    raw = await exchange(server.proxy_address[1], b"GET /old HTTP/1.0\r\n\r\n")
    head, _, received = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"chunked" not in head.lower()  # HTTP/1.0 has no chunked: the body ends at close
    assert received == body
    assert origin.requests[0].version == "HTTP/1.1"


async def test_an_unframed_body_to_an_http_1_0_keep_alive_client_ends_with_the_close(
    backend, proxy
):
    """HTTP/1.0 has no chunked framing: a body of unknown length ends when the connection
    closes, so the proxy must close it even though the client asked to keep it (aiohttp's own
    prepare kept it open, and the client waited out the keep-alive timeout; review)."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    origin = await backend(answering(chunked))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    request = b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    raw = await exchange(server.proxy_address[1], request, within=2.0)  # until the close
    head, _, received = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and received == b"hello"
    assert b"keep-alive" not in head.lower()


async def test_cookies_never_cross_between_clients_with_a_hostname_target(backend, proxy):
    # With an IP target aiohttp's default jar silently drops cookies, hiding the bug;
    # "localhost" is a hostname, so a shared jar would store and replay them.
    seen: list[RawRequest] = []

    def respond(request: RawRequest) -> bytes:
        seen.append(request)
        return http_response(headers=[("Set-Cookie", "session=VICTIM; Path=/")], body=b"ok")

    origin = await backend(answering(respond))
    target = f"http://localhost:{origin.port}"
    server = await proxy(config_dict({"app": upstream(target)}))
    port = server.proxy_address[1]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(3):
            async with session.get(f"http://127.0.0.1:{port}/login") as response:
                assert response.status == 200
    assert [request.all("Cookie") for request in seen] == [[], [], []]


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(backend, proxy):
    origin = await backend(answering(OK))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        client.writer.write(
            b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        interim = await read_response(client.reader)  # the client waits for this before the body
        assert interim.status == 100
        answer = await client.request(b"body")
    finally:
        await client.close()
    assert answer.status == 200
    assert origin.requests[0].body == b"body"
    assert origin.requests[0].header("Expect") is None


async def test_a_typo_in_listener_kwargs_fails_loudly_instead_of_dropping_them():
    # aiohttp's own web.Server would log a warning and silently drop *all* kwargs
    # (auto_decompress=False among them) on a TypeError.
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    kwargs = {**handler_kwargs(5.0, 100, 200, 7), "deadlines": Deadlines(10, 60, 60)}
    good = ProxyHTTPServer(handler, **kwargs)
    handler_made = good()
    assert handler_made._keepalive_timeout == 5.0
    assert (handler_made.max_line_size, handler_made.max_field_size) == (100, 200)
    assert handler_made.max_headers == 7
    bad = ProxyHTTPServer(handler, **{**kwargs, "auto_decompres": False})
    with pytest.raises(TypeError):
        bad()
