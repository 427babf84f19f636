"""A malformed client request gets a 4xx, reaches no backend, and the proxy keeps serving."""

from __future__ import annotations

import pytest

from tests.support import RawClient, answering, config_dict, exchange, get, http_response, upstream

OK = http_response(body=b"ok")


@pytest.fixture
async def served(backend, proxy):
    origin = await backend(answering(OK))
    routes = [{"match": {"path_prefix": "/api/", "host": "api.test"}, "upstream": "app"}]
    server = await proxy(config_dict({"app": upstream(origin.url)}, routes))
    return origin, server.proxy_address[1]


MANY_HEADERS = "".join(f"X-H{i}: v\r\n" for i in range(200))


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"THIS IS NOT HTTP\r\n\r\n", 400),
        (b"GET /api/ HTTP/1.1\r\nHost: api.test\r\nBad Header\r\n\r\n", 400),
        (
            b"POST /api/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /api/ HTTP/1.1\r\nHost: api.test\r\n"
            b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
        ),
        (get("/api/", "api.test", "X-Big: " + "a" * 9000 + "\r\n"), 431),
        (get("/api/", "api.test", MANY_HEADERS), 431),
        (b"GET /api/ HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /api/ HTTP/1.1\r\nHost: api.test\r\nHost: other.test\r\n\r\n", 400),
        (b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n", 400),
        (get("/nowhere", "api.test"), 404),
        (get("/api/", "other.test"), 404),
    ],
)
async def test_bad_requests_get_4xx_and_the_proxy_keeps_serving(served, raw, status):
    origin, port = served
    client = await RawClient.connect(port)
    try:
        answer = await client.request(raw)
    finally:
        await client.close()
    assert answer.status == status
    assert b"aaaa" not in answer.body  # the offending bytes are not echoed back
    assert origin.requests == []
    # ...and everyone else is still served.
    client = await RawClient.connect(port)
    try:
        assert (await client.request(get("/api/x", "api.test"))).status == 200
    finally:
        await client.close()


async def test_route_host_match_ignores_case_and_port(served):
    origin, port = served
    answer = await exchange(port, get("/api/x", "API.Test:8080", "Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert len(origin.requests) == 1
