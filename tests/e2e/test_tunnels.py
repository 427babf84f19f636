"""WebSocket and every HTTP/1.1 Upgrade through the proxy (issue 9): a real aiohttp WebSocket
backend and client, raw-socket upgrades for exact bytes and half-close, the tunnel budget, idle
timeout, reloads and the metrics. Every peer is real, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.server import ProxyServer
from tests.support import (
    RawBackend,
    RawClient,
    admin_get,
    config_dict,
    eventually,
    get,
    metric_value,
    read_head,
    read_request,
    upstream,
    write_config,
)


async def metric(server: ProxyServer, name: str, **labels: str) -> float:
    _, _, text = await admin_get(server, "/metrics")
    return metric_value(text, name, **labels)


@contextlib.asynccontextmanager
async def websocket_backend(seen: list[Any] | None = None):
    """An aiohttp WebSocket echo server: text back with "echo:", binary as is; `seen` gets
    each close code it receives. Anything else under /plain answers 200."""

    async def ws(request: web.Request) -> web.StreamResponse:
        response = web.WebSocketResponse(protocols=("chat", "superchat"), compress=True)
        await response.prepare(request)
        async for message in response:
            if message.type == aiohttp.WSMsgType.TEXT:
                await response.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await response.send_bytes(message.data)
        if seen is not None:
            seen.append(response.close_code)
        return response

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=403, text="no socket for you")

    async def plain(request: web.Request) -> web.StreamResponse:
        return web.Response(text="plain " + request.headers.get("Upgrade", "-"))

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/refuse", refuse)
    app.router.add_route("*", "/plain", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def ws_url(server: ProxyServer, path: str = "/ws") -> str:
    return f"http://127.0.0.1:{server.proxy_address[1]}{path}"


async def test_websocket_text_binary_1mib_ping_close_subprotocol_and_deflate(proxy):
    seen: list[Any] = []
    async with websocket_backend(seen) as origin:
        server = await proxy(config_dict({"ws": upstream(origin)}))
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                ws_url(server), protocols=("superchat",), compress=15, autoping=False
            ) as ws,
        ):
            assert ws.protocol == "superchat"  # chosen by the backend, end to end
            assert ws.compress == 15  # permessage-deflate negotiated through the proxy
            await ws.send_str("hello")
            assert await ws.receive_str() == "echo:hello"
            payload = os.urandom(1 << 20)
            await ws.send_bytes(payload)
            assert await ws.receive_bytes() == payload
            await ws.ping(b"are you there")
            pong = await ws.receive()
            assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"are you there")
            await ws.close(code=4001, message=b"bye")
        await eventually(lambda: bool(seen))
        assert seen == [4001]
        await eventually(lambda: _zero_open(server))  # the tunnel's request is finished
        assert await metric(server, "proxy_tunnels_total", result="upgraded") == 1
        assert await metric(server, "proxy_tunnel_bytes_total", direction="upstream") > 1 << 20


async def _zero_open(server: ProxyServer) -> bool:
    return await metric(server, "proxy_tunnels_open", upstream="ws") == 0


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-test/1\r\nConnection: Upgrade\r\n\r\n"


def raw_upgrade(path: str = "/", protocol: str = "x-test/1", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
        f"{extra}\r\n"
    ).encode()


def switches(then: bytes = b"", *, half_close_after: bytes | None = None):
    """A raw backend that answers an upgrade with 101 (plus `then` in the same write), records
    every byte it receives after it, echoes them back in upper case, and answers EOF with its own
    write EOF after sending `half_close_after`."""

    async def handler(backend: RawBackend, reader, writer) -> None:
        request = await read_request(reader)
        if request is None:
            return
        backend.record(request)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-test/1\r\nConnection: Upgrade\r\n"
            b"X-Backend: yes\r\n\r\n" + then
        )
        backend.tunneled = b""  # type: ignore[attr-defined]
        while data := await reader.read(65536):
            backend.tunneled += data  # type: ignore[attr-defined]
            writer.write(data.upper())
            await writer.drain()
        if half_close_after is not None:
            writer.write(half_close_after)
            writer.write_eof()
            await asyncio.sleep(0.2)

    return handler


async def test_a_non_websocket_upgrade_relays_exact_bytes_and_half_closes(backend, proxy):
    origin = await backend(switches(b"early bytes;", half_close_after=b"goodbye"))
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade("/chan?id=1", extra="Sec-Custom: 42\r\n"))
    head = await asyncio.wait_for(read_head(reader), 5)
    assert head is not None
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert {"Upgrade: x-test/1", "Connection: upgrade", "X-Backend: yes"} <= set(lines)
    assert await asyncio.wait_for(reader.readexactly(12), 5) == b"early bytes;"  # came with it
    request = origin.requests[0]
    assert request.target == "/chan?id=1"
    assert request.header("Upgrade") == "x-test/1"
    assert request.header("Connection") == "upgrade"
    assert request.header("Sec-Custom") == "42"
    sent = b"\x00binary\xffbytes\r\n\r\nGET / HTTP/1.1\r\n"  # not HTTP, and not parsed
    writer.write(sent)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(sent)), 5) == sent.upper()
    writer.write_eof()  # the client half-closes; the backend still sends, then closes too
    assert await asyncio.wait_for(reader.read(), 5) == b"goodbye"
    writer.close()
    assert origin.tunneled == sent  # type: ignore[attr-defined]


async def test_a_refused_handshake_passes_through_and_nothing_is_upgraded(proxy):
    async with websocket_backend() as origin:
        server = await proxy(config_dict({"ws": upstream(origin)}))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(ws_url(server, "/refuse"))
            assert caught.value.status == 403
        assert await metric(server, "proxy_tunnels_total", result="refused") == 1


async def test_tunnels_limit_rejects_at_once_and_tunnels_hold_no_pool_slot(proxy):
    async with websocket_backend() as origin:
        settings = {"pool": {"limit": 1}, "tunnels": {"limit": 20}}
        server = await proxy(config_dict({"ws": upstream(origin, **settings)}))
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(ws_url(server)) for _ in range(20)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(ws_url(server))
            assert caught.value.status == 503
            assert caught.value.headers.get("Retry-After") == "1"
            # Plain requests still flow through the one pool slot while 20 tunnels are open.
            for _ in range(5):
                async with session.get(ws_url(server, "/plain")) as response:
                    assert await response.text() == "plain -"
            for ws in sockets:
                await ws.send_str("still")
                assert await ws.receive_str() == "echo:still"
                await ws.close()
        assert await metric(server, "proxy_tunnels_total", result="rejected") == 1
        assert await metric(server, "proxy_tunnels_total", result="upgraded") == 20


async def test_an_idle_tunnel_is_closed_at_the_idle_timeout(proxy):
    async with websocket_backend() as origin:
        settings = {"tunnels": {"idle_timeout": 0.5}}
        server = await proxy(config_dict({"ws": upstream(origin, **settings)}))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(server), autoping=False, heartbeat=None)
            await ws.send_str("one")
            assert await ws.receive_str() == "echo:one"
            message = await asyncio.wait_for(ws.receive(), 5)  # nothing moves: the proxy cuts
            assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            await ws.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # HTTP/1.0 is never upgraded: Upgrade is dropped, the request answered as a plain one.
        (b"GET /plain HTTP/1.0\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x-test/1\r\n\r\n",
         b"plain -"),
        # h2c is never upgraded (the proxy speaks HTTP/1.1 upstream), as nginx does.
        (get("/plain", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
             "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"), b"plain -"),
    ],
)  # fmt: skip
async def test_http10_and_h2c_upgrades_are_plain_requests(proxy, raw, expected):
    async with websocket_backend() as origin:
        server = await proxy(config_dict({"ws": upstream(origin)}))
        client = await RawClient.connect(server.proxy_address[1])
        answer = await client.request(raw)
        await client.close()
        assert (answer.status, answer.body) == (200, expected)


async def test_a_route_with_upgrade_false_answers_400(proxy):
    async with websocket_backend() as origin:
        routes = [{"match": {"path_prefix": "/"}, "upstream": "ws", "upgrade": False}]
        server = await proxy(config_dict({"ws": upstream(origin)}, routes))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(ws_url(server))
            assert caught.value.status == 400
            async with session.get(ws_url(server, "/plain")) as response:
                assert response.status == 200


async def test_tunnels_survive_reloads_that_change_or_remove_their_upstream(tmp_path):
    async with websocket_backend() as origin:
        config = config_dict({"ws": upstream(origin), "other": upstream(origin)})
        config["shutdown"] = {"grace": 30}
        path = write_config(tmp_path / "config.yaml", config)
        server = ProxyServer(parse_config(config), config_path=path)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(ws_url(server))
                changed = config_dict({"ws": upstream(origin, pool={"limit": 3})})
                write_config(path, changed)
                assert (await server.reload())[0]
                removed = config_dict({"gone": upstream(origin)})
                write_config(path, removed)
                assert (await server.reload())[0]
                await ws.send_str("after two reloads")
                assert await ws.receive_str() == "echo:after two reloads"
                await ws.close()
        finally:
            await server.stop()


async def test_shutdown_closes_open_tunnels_at_the_end_of_grace():
    async with websocket_backend() as origin:
        config = config_dict({"ws": upstream(origin)})
        server = ProxyServer(parse_config(config), shutdown_grace=0.5)
        await server.start()
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(server))
            stopping = asyncio.ensure_future(server.stop())
            await asyncio.sleep(0.2)
            await ws.send_str("during grace")
            assert await ws.receive_str() == "echo:during grace"
            message = await asyncio.wait_for(ws.receive(), 5)
            assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            await asyncio.wait_for(stopping, 5)
            await ws.close()


async def test_a_client_that_does_not_read_holds_memory_bounded(backend, proxy):
    """The backend pushes 64 MiB into a tunnel whose client reads nothing: the proxy pauses the
    backend instead of buffering it (its RSS grows by far less than what was pushed)."""

    async def pushes(backend: RawBackend, reader, writer) -> None:
        request = await read_request(reader)
        if request is None:
            return
        writer.write(SWITCHING)
        chunk = b"z" * 65536
        backend.pushed = 0  # type: ignore[attr-defined]
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 30)
                backend.pushed += len(chunk)  # type: ignore[attr-defined]

    origin = await backend(pushes)
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    before = _rss()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade())
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    await asyncio.sleep(1.5)  # the backend pushes as fast as the proxy takes it
    pushed = origin.pushed  # type: ignore[attr-defined]
    assert pushed < 32 << 20  # the rest is held back by the backend's own socket
    assert _rss() - before < 16 << 20
    writer.close()


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_every_tunnel_metric_after_a_known_sequence(proxy):
    async with websocket_backend() as origin:
        settings = {"tunnels": {"limit": 1}}
        server = await proxy(config_dict({"ws": upstream(origin, **settings)}))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(server))
            assert await metric(server, "proxy_tunnels_open", upstream="ws") == 1
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(ws_url(server))  # rejected: over the limit
            await ws.send_bytes(b"12345")
            assert await ws.receive_bytes() == b"12345"
            await ws.close()
            await eventually(lambda: _zero_open(server))
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(ws_url(server, "/refuse"))  # refused
        _, _, text = await admin_get(server, "/metrics")
        route = {"route": "/", "upstream": "ws"}
        assert metric_value(text, "proxy_tunnels_total", result="upgraded", **route) == 1
        assert metric_value(text, "proxy_tunnels_total", result="rejected", **route) == 1
        assert metric_value(text, "proxy_tunnels_total", result="refused", **route) == 1
        assert metric_value(text, "proxy_tunnels_total", result="failed", **route) == 0
        assert metric_value(text, "proxy_tunnel_duration_seconds_count", upstream="ws") == 1
        # 5 bytes of payload each way, in frames: a 2-byte header plus a 4-byte mask upstream.
        sent = metric_value(text, "proxy_tunnel_bytes_total", direction="upstream")
        received = metric_value(text, "proxy_tunnel_bytes_total", direction="downstream")
        assert sent >= 5 + 6 and received >= 5 + 2


async def test_a_tunnel_to_a_target_that_refuses_connections_fails_and_is_counted(proxy):
    server = await proxy(config_dict({"down": upstream("http://127.0.0.1:1")}))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(ws_url(server))
        assert caught.value.status == 502
    assert await metric(server, "proxy_tunnels_total", result="failed") == 1


def half_closes_first():
    """Answers 101 with its last words and a write EOF at once, then records what it reads."""

    async def handler(backend: RawBackend, reader, writer) -> None:
        request = await read_request(reader)
        if request is None:
            return
        writer.write(SWITCHING + b"last words")
        writer.write_eof()  # the backend is done sending, but still reads
        backend.tunneled = await asyncio.wait_for(reader.read(), 5)  # type: ignore[attr-defined]

    return handler


async def test_the_backends_half_close_reaches_the_client_which_may_still_send(backend, proxy):
    origin = await backend(half_closes_first())
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade())
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    assert await asyncio.wait_for(reader.read(), 5) == b"last words"  # then EOF
    writer.write(b"the client still talks")
    writer.write_eof()
    await eventually(lambda: _has(origin, "tunneled"))
    assert origin.tunneled == b"the client still talks"  # type: ignore[attr-defined]
    writer.close()


async def _has(thing: object, name: str) -> bool:
    return hasattr(thing, name)


async def test_a_tunnel_writes_one_access_log_line_when_it_closes(tmp_path):
    import io
    import json

    async with websocket_backend() as origin:
        stream = io.StringIO()
        config = parse_config(config_dict({"ws": upstream(origin)}))
        server = ProxyServer(config, access_log_stream=stream, shutdown_grace=1)
        await server.start()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(ws_url(server), compress=0) as ws,
            ):
                await ws.send_bytes(b"12345")
                assert await ws.receive_bytes() == b"12345"
                await ws.close()
            await eventually(lambda: _zero_open(server))
        finally:
            await server.stop()
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    # Frames as they crossed: a masked 5-byte binary frame (2 + 4 + 5) and a masked close with
    # its code (2 + 4 + 2) from the client; the echo (2 + 5) and the close reply (2 + 2) back.
    assert (entry["status"], entry["bytes_received"], entry["bytes"]) == (101, 19, 11)
    assert entry["duration"] > 0 and entry["target"] == "/ws"


# --- found by review -----------------------------------------------------------------------------


async def test_a_quiet_tunnel_outlives_the_upstream_read_timeout(backend, proxy):
    origin = await backend(switches(b"hi"))
    settings = {"timeouts": {"read": 0.3}, "tunnels": {"idle_timeout": 0}}
    server = await proxy(config_dict({"x": upstream(origin.url, **settings)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade())
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    await asyncio.sleep(1.0)  # more than timeouts.read of silence from the backend
    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"STILL HERE"
    writer.close()


async def test_bytes_a_client_sends_before_the_101_of_any_upgrade_reach_the_backend(backend, proxy):
    async def slow_switch(backend: RawBackend, reader, writer) -> None:
        request = await read_request(reader)
        if request is None:
            return
        await asyncio.sleep(0.3)  # the client's early bytes arrive meanwhile
        writer.write(SWITCHING)
        backend.tunneled = await reader.readexactly(14)  # type: ignore[attr-defined]

    origin = await backend(slow_switch)
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"EARLY-1\r\nhello")  # not HTTP: must not be parsed as a request
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    await eventually(lambda: _has(origin, "tunneled"))
    assert origin.tunneled == b"EARLY-1\r\nhello"  # type: ignore[attr-defined]
    writer.close()


async def test_a_101_without_upgrade_is_a_502(backend, proxy):
    from tests.support import answering

    origin = await backend(answering(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"))
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    answer = await client.request(raw_upgrade())
    await client.close()
    assert answer.status == 502


async def test_over_tls_the_backends_close_ends_the_tunnel(backend, proxy, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "c.pem")
    origin = await backend(half_closes_first())
    tls = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "c.pem")}
    server = await proxy(config_dict({"x": upstream(origin.url)}, listen={"tls": tls}))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.proxy_address[1], ssl=context
    )
    writer.write(raw_upgrade())
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    # TLS cannot half-close: the backend's EOF closes the client's connection, after its bytes.
    assert await asyncio.wait_for(reader.read(), 5) == b"last words"
    writer.close()
    await eventually(lambda: _zero(server, "x"))


async def _zero(server: ProxyServer, name: str) -> bool:
    return await metric(server, "proxy_tunnels_open", upstream=name) == 0


async def test_a_client_reset_ends_a_tunnel_quietly_as_a_101(proxy, caplog):
    import socket
    import struct

    async with websocket_backend() as origin:
        server = await proxy(config_dict({"ws": upstream(origin)}))
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(server))
            await ws.send_str("x")
            sock = ws._response.connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws._response.connection.transport.abort()  # type: ignore[union-attr]
            await eventually(lambda: _zero_open(server))
            await ws.close()
        assert await metric(server, "proxy_requests_total", code="101") == 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_426_keeps_its_upgrade_header(backend, proxy):
    from tests.support import answering, http_response

    required = http_response(426, "Upgrade Required", [("Upgrade", "x-test/2"),
                                                        ("Connection", "Upgrade")])  # fmt: skip
    origin = await backend(answering(required))
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    client = await RawClient.connect(server.proxy_address[1])
    answer = await client.request(get("/"))
    await client.close()
    assert (answer.status, answer.all("Upgrade"), answer.all("Connection")) == (
        426,
        ["x-test/2"],
        [],
    )


# --- the relay holds nothing of aiohttp's per-request machinery (issue 9: RSS per tunnel) ---


def _alive(cls: type) -> int:
    import gc

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, cls))


async def test_after_the_101_a_tunnel_holds_no_aiohttp_handler_and_stays_counted(proxy):
    """An idle tunnel is two transports and a few small objects (bench/ws.py measures its
    RSS): the client connection's aiohttp handler and the upstream connection's protocol are
    released at the 101, while the connection still counts in proxy_client_connections (and
    so against listen.limits.max_connections) until it closes."""
    from proxy.deadlines import DeadlineHandler
    from proxy.pool import GuardedResponseHandler

    async with websocket_backend() as origin:
        server = await proxy(config_dict({"ws": upstream(origin)}))
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(ws_url(server)) for _ in range(10)]
            assert _alive(DeadlineHandler) == 0
            assert _alive(GuardedResponseHandler) == 0
            assert await metric(server, "proxy_client_connections") == 10
            assert await metric(server, "proxy_tunnels_open", upstream="ws") == 10
            for i, ws in enumerate(sockets):
                await ws.send_str(f"{i}")
                assert await ws.receive_str() == f"echo:{i}"
                await ws.close()
            await eventually(lambda: _zero_open(server))
            assert await metric(server, "proxy_client_connections") == 0


async def test_a_tunnel_whose_client_reads_nothing_is_cut_at_the_send_timeout(backend, proxy):
    """As for any response, listen.timeouts.send bounds how long a client may leave bytes
    unaccepted; the backend sees its tunnel close, and the timeout is counted."""

    async def pushes(backend: RawBackend, reader, writer) -> None:
        if await read_request(reader) is None:
            return
        writer.write(SWITCHING)
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"z" * 65536)
                await asyncio.wait_for(writer.drain(), 30)
        backend.cut = True  # type: ignore[attr-defined]

    origin = await backend(pushes)
    listen = {"timeouts": {"send": 0.5}}
    server = await proxy(config_dict({"x": upstream(origin.url)}, listen=listen))
    _, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
    writer.write(raw_upgrade())  # and never read a byte
    await eventually(lambda: _has(origin, "cut"), within=10)
    assert await metric(server, "proxy_client_timeouts_total", phase="send") == 1
    assert await metric(server, "proxy_tunnels_open", upstream="x") == 0
    writer.close()


async def test_when_both_sides_half_close_every_buffered_byte_still_arrives(backend, proxy):
    """The client half-closes, the backend answers 1 MiB and half-closes too, while the path
    to the client is slow (small socket buffers both ends): the proxy still holds the end of
    the answer when the backend's EOF comes, and must write all of it before it closes."""
    import socket

    size = 1 << 20

    async def answers_then_ends(backend: RawBackend, reader, writer) -> None:
        if await read_request(reader) is None:
            return
        writer.write(SWITCHING)
        await reader.read()  # the client's EOF
        writer.write(b"x" * size)
        await writer.drain()
        writer.write_eof()
        await asyncio.sleep(10)  # the proxy, not the backend, ends the tunnel

    origin = await backend(answers_then_ends)
    server = await proxy(config_dict({"x": upstream(origin.url)}))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.proxy_address[1]))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(raw_upgrade())
    assert await asyncio.wait_for(read_head(reader), 5) is not None
    (tunnel,) = server.current().upstreams["x"].tunnels
    assert tunnel.client.transport is not None
    proxy_side = tunnel.client.transport.get_extra_info("socket")
    proxy_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.write_eof()
    got = 0
    while chunk := await asyncio.wait_for(reader.read(4096), 5):
        got += len(chunk)
        await asyncio.sleep(0.0005)
    assert got == size
    writer.close()


async def test_open_tunnels_count_on_their_target_for_least_requests(proxy):
    """A WebSocket is a request in flight on its target until it closes: least_requests
    spreads tunnels over targets, and /pools shows them per target."""
    import json

    async with websocket_backend() as one, websocket_backend() as two:
        settings = {"balance": "least_requests"}
        config = config_dict({"ws": {"targets": [one, two], **settings}})
        server = await proxy(config)
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(ws_url(server)) for _ in range(6)]
            _, _, body = await admin_get(server, "/pools")
            targets = json.loads(body)["upstreams"]["ws"]["targets"]
            assert [t["in_flight"] for t in targets] == [3, 3]
            for ws in sockets:
                await ws.close()
            await eventually(lambda: _zero_open(server))
            _, _, body = await admin_get(server, "/pools")
            targets = json.loads(body)["upstreams"]["ws"]["targets"]
            assert [t["in_flight"] for t in targets] == [0, 0]
