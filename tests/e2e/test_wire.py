"""wire.py: a GET or HEAD without a body, written below ClientSession._request, must reach the
backend and come back exactly as the session's did. Each test is a difference a review found
between the two paths on real sockets (they all failed on wire.py's first version)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from tests.support import (
    Handler,
    RawBackend,
    RawClient,
    answering,
    config_dict,
    exchange,
    get,
    http_response,
    read_request,
    upstream,
)


def closing_after(data: bytes) -> Handler:
    """A backend that answers `data` and closes: a body without framing ends there."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_request(reader)
        if request is not None:
            backend.record(request)
            writer.write(data)
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world",
        b"HTTP/1.0 200 OK\r\n\r\nhello world",
    ],
    ids=["http11-no-length", "http10"],
)
async def test_a_body_delimited_by_the_close_is_forwarded_whole(backend, proxy, answer):
    """Not an empty 200 that looks complete (read_until_eof, as the session has it)."""
    origin = await backend(closing_after(answer))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    raw = await exchange(server.proxy_address[1], get(extra="Connection: close\r\n"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"b\r\nhello world\r\n0\r\n\r\n"


async def test_host_goes_first_the_clients_value_or_the_targets(backend, proxy):
    """ClientRequest puts Host first whatever its place in the request; one that was not sent
    (HTTP/1.0) is the target's."""
    origin = await backend(answering(http_response(body=b"ok")))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        await client.request(b"GET /x HTTP/1.1\r\nX-A: 1\r\nAccept: */*\r\nHost: h.test\r\n\r\n")
    finally:
        await client.close()
    await exchange(server.proxy_address[1], b"GET /y HTTP/1.0\r\nX-A: 1\r\n\r\n")
    sent, without = origin.requests
    assert sent.names[:3] == ["Host", "X-A", "Accept"] and sent.header("Host") == "h.test"
    assert without.names[:2] == ["Host", "X-A"]
    assert without.header("Host") == f"127.0.0.1:{origin.port}"


async def test_a_retry_names_its_own_target_in_host(backend, proxy):
    """The headers are built per attempt: a retry's Host is not the first target's."""

    async def hang_up(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_request(reader)
        if request is not None:
            backend.record(request)  # then close without a word: retried as a reset

    bad = await backend(hang_up)
    good = await backend(answering(http_response(body=b"ok")))
    server = await proxy(config_dict({"app": upstream(bad.url, good.url)}))
    for i in range(2):
        raw = await exchange(server.proxy_address[1], f"GET /{i} HTTP/1.0\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.0 200"), raw
    assert bad.requests
    assert {tuple(r.all("Host")) for r in good.requests} == {(f"127.0.0.1:{good.port}",)}


@pytest.fixture
def unreachable() -> Iterator[str]:
    """A listener whose accept queue is full: a connect to it hangs (no refusal)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(5):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # in progress: it stays in the queue
            sock.connect(("127.0.0.1", port))
        fill.append(sock)
    yield f"http://127.0.0.1:{port}"
    for sock in fill:
        sock.close()
    listener.close()


async def test_a_connect_timeout_is_a_connect_failure_and_retried(backend, proxy, unreachable):
    """timeouts.connect running out is retried on the next target (504 without it)."""
    good = await backend(answering(http_response(body=b"ok")))
    settings = upstream(unreachable, good.url, timeouts={"connect": 0.3})
    server = await proxy(config_dict({"app": settings}))
    client = await RawClient.connect(server.proxy_address[1])
    try:
        statuses = [(await client.request(get(f"/{i}"))).status for i in range(4)]
    finally:
        await client.close()
    assert statuses == [200] * 4
    failures = server.current().upstreams["app"].targets[0].attempt_failures
    assert failures.get("connect", 0) >= 1 and "timeout" not in failures


async def test_a_target_written_in_capitals_keeps_one_pool_for_every_method(backend, proxy):
    """The connection key takes the host as written, as the session's does: GET and POST
    share the connection."""
    origin = await backend(answering(http_response(body=b"ok")))
    server = await proxy(config_dict({"app": upstream(f"http://LocalHost:{origin.port}")}))
    post = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
    client = await RawClient.connect(server.proxy_address[1])
    try:
        for raw in (get("/a"), post, get("/c"), post):
            assert (await client.request(raw)).status == 200
    finally:
        await client.close()
    assert origin.connections == 1


def _varied(request) -> bytes:
    """An answer framed as the request's path says."""
    path = request.target
    if path.startswith("/chunked"):
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    if path.startswith("/empty"):
        return http_response(204, "No Content", content_length=False)
    if path.startswith("/same"):
        return http_response(304, "Not Modified", [("ETag", '"v"'), ("Content-Length", "5")])
    if request.method == "HEAD":  # the same head as a GET's, without the body
        return http_response(headers=[("Content-Length", "5")])
    return http_response(body=b"hello")


async def test_one_pooled_connection_answers_every_kind_of_response_in_turn(backend, proxy):
    """A connection's response parser is made again only when what it must parse changes
    (HEAD or not, the read timeout): bodies, framings and bodiless answers in any order, and
    requests with a body (the session's path) between them, each reach the client whole."""
    origin = await backend(answering(_varied))
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 1})}))
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    head = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    sequence = [get("/a"), head, get("/chunked"), get("/empty"), head, get("/same"), post,
                get("/b"), head, head, get("/chunked"), post, get("/c")]  # fmt: skip
    client = await RawClient.connect(server.proxy_address[1])
    try:
        answers = [
            await client.request(raw, head_request=raw.startswith(b"HEAD")) for raw in sequence
        ]
    finally:
        await client.close()
    assert [(a.status, a.body) for a in answers] == [
        (200, b"hello"), (200, b""), (200, b"hello"), (204, b""), (200, b""), (304, b""),
        (200, b"hello"), (200, b"hello"), (200, b""), (200, b""), (200, b"hello"),
        (200, b"hello"), (200, b"hello"),
    ]  # fmt: skip
    assert [a.header("Content-Length") for a in answers[:2]] == ["5", "5"]
    assert origin.connections == 1
    assert [r.method for r in origin.requests] == [raw.split(b" ")[0].decode() for raw in sequence]


def _first_with_stray(stray: bytes) -> Handler:
    """A backend whose answer to /1 is followed, in the same write, by the start of another."""
    first, second = http_response(body=b"first") + stray, http_response(body=b"second")
    return answering(lambda request: first if request.target == "/1" else second)


@pytest.mark.parametrize(
    "stray",
    [b"H", b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nX-Junk: "],
    ids=["one-byte", "redirect-prefix"],
)
async def test_a_partial_response_after_a_response_never_reaches_the_next_request(
    backend, proxy, stray
):
    """The start of a response nobody asked for, in the same read as the one asked for, is
    parsed by no later request: the next client gets its own answer, not a 302 made of the
    stray head and its body (a response parser kept across requests did that; review)."""
    origin = await backend(_first_with_stray(stray))
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    answers = []
    for path in ("/1", "/2"):  # two clients, one after the other
        client = await RawClient.connect(server.proxy_address[1])
        try:
            answers.append(await client.request(get(path)))
        finally:
            await client.close()
        await asyncio.sleep(0.1)  # the stray bytes are in before the next request
    assert [(a.status, a.body) for a in answers] == [(200, b"first"), (200, b"second")]
    assert answers[1].header("Location") is None
