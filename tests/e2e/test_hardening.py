"""Slow, hostile and broken peers (issue 8): every client read and write has a deadline, the
listener holds at its limits, pooled connections never carry one client's answer to another,
and what a client or upstream gets wrong is answered clearly and blamed on the right party."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import trustme

from proxy.config import parse_config
from proxy.server import ProxyServer
from tests.support import (
    REPO,
    RawBackend,
    RawClient,
    RawResponse,
    admin_get,
    answering,
    config_dict,
    eventually,
    exchange,
    free_port,
    get,
    http_response,
    metric_value,
    read_request,
    read_response,
    upstream,
    write_config,
)


def echo_path(request) -> bytes:
    return http_response(body=request.target.encode())


async def metric(server: ProxyServer, name: str, **labels: str) -> float:
    _, _, text = await admin_get(server, "/metrics")
    return metric_value(text, name, **labels)


async def served(backend, proxy, handler=None, **settings):
    """A backend and the proxy in front of it; `settings` go into the config's top level."""
    origin = await backend(handler or answering(echo_path))
    pool = settings.pop("pool", None)
    extra = {"pool": pool} if pool else {}
    server = await proxy(config_dict({"api": upstream(origin.url, **extra)}, **settings))
    return origin, server, server.proxy_address[1]


# --- response queue poisoning --------------------------------------------------------------


def poisons_idle_connections(delay: float, stray: bytes):
    """Answers each request with its path, and `delay` s after its first answer writes `stray`
    on that connection: a response to no request, as a buggy or smuggled-into backend would."""
    first = True

    async def handler(backend: RawBackend, reader, writer) -> None:
        nonlocal first
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            writer.write(echo_path(request))
            await writer.drain()
            if first:
                first = False
                await asyncio.sleep(delay)
                writer.write(stray)
                await writer.drain()

    return handler


ATTACKER = http_response(302, "Found", [("Set-Cookie", "session=ATTACKER"), ("Location", "/x")])


async def test_a_response_sent_on_an_idle_pooled_connection_never_reaches_another_client(
    backend, proxy
):
    origin, server, port = await served(
        backend, proxy, poisons_idle_connections(0.3, ATTACKER), pool={"limit": 1}
    )
    first = await RawClient.connect(port)
    assert (await first.request(get("/user1"))).body == b"/user1"
    await asyncio.sleep(0.6)  # the stray response arrives while the connection is idle
    for user in ("/user2", "/user3", "/user4"):
        client = await RawClient.connect(port)
        answer = await client.request(get(user))
        await client.close()
        assert (answer.status, answer.body, answer.header("Set-Cookie")) == (
            200,
            user.encode(),
            None,
        )
    await first.close()
    assert origin.connections == 2  # the poisoned connection was closed, not reused
    discarded = "proxy_upstream_connections_discarded_total"
    assert await metric(server, discarded, upstream="api", reason="unsolicited_data") == 1


async def test_bytes_after_a_complete_response_close_that_connection(backend, proxy):
    extra = http_response(body=b"/stolen")
    origin, server, port = await served(
        backend, proxy, answering(lambda r: echo_path(r) + extra), pool={"limit": 1}
    )
    for user in ("/a", "/b", "/c"):
        client = await RawClient.connect(port)
        answer = await client.request(get(user))
        await client.close()
        assert answer.body == user.encode()
    assert origin.connections == 3
    discarded = "proxy_upstream_connections_discarded_total"
    assert await metric(server, discarded, upstream="api", reason="unsolicited_data") == 3


# --- client deadlines -------------------------------------------------------------------------


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.read(), within)


async def read_what_arrives(reader: asyncio.StreamReader) -> bytes:
    """Everything read until the connection ends, even by a reset (the proxy closing on a
    client that is still sending resets it, after its answer arrived)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_a_request_head_trickled_byte_by_byte_gets_408_at_the_header_deadline(backend, proxy):
    origin, server, port = await served(backend, proxy, listen={"timeouts": {"header": 0.5}})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    received = asyncio.ensure_future(read_what_arrives(reader))
    with contextlib.suppress(ConnectionError):
        for byte in get("/slow"):
            if received.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
    answer = await asyncio.wait_for(received, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in answer
    assert 0.4 < time.monotonic() - started < 2
    assert origin.requests == []
    assert await metric(server, "proxy_client_timeouts_total", phase="header") == 1


async def test_a_silent_new_connection_is_closed_at_the_header_deadline(backend, proxy):
    _, _, port = await served(backend, proxy, listen={"timeouts": {"header": 0.3}})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await read_until_closed(reader, 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_an_idle_kept_alive_connection_is_not_held_to_the_header_deadline(backend, proxy):
    _, _, port = await served(
        backend, proxy, listen={"timeouts": {"header": 0.3}, "keepalive_timeout": 30}
    )
    client = await RawClient.connect(port)
    assert (await client.request(get("/1"))).body == b"/1"
    await asyncio.sleep(0.8)  # idle: keepalive_timeout applies, not the header deadline
    assert (await client.request(get("/2"))).body == b"/2"
    await client.close()


async def test_a_stalled_upload_gets_408_and_frees_its_pool_slot(backend, proxy):
    _, server, port = await served(
        backend, proxy, listen={"timeouts": {"body": 0.5}}, pool={"limit": 1}
    )
    stalled = await RawClient.connect(port)
    stalled.writer.write(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
    started = time.monotonic()
    answer = await asyncio.wait_for(read_response(stalled.reader), 5)
    assert answer.status == 408
    assert 0.4 < time.monotonic() - started < 2.5
    assert await stalled.reader.read() == b""  # and the connection is closed
    await stalled.close()
    # The only pool slot is free again: the next request goes through at once.
    client = await RawClient.connect(port)
    assert (await client.request(get("/next"))).body == b"/next"
    await client.close()
    assert await metric(server, "proxy_client_timeouts_total", phase="body") == 1
    errors = "proxy_upstream_errors_total"
    assert await metric(server, errors, upstream="api", kind="reset") == 0  # not the upstream's


def streams_forever(chunk: bytes, limit: int):
    """For /big, a chunked response that keeps coming (bounded by `limit` chunks); for any
    other path, that path."""

    async def handler(backend: RawBackend, reader, writer) -> None:
        request = await read_request(reader)
        if request is None:
            return
        backend.record(request)
        if request.target != "/big":
            writer.write(echo_path(request))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(limit):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    return handler


async def test_a_client_that_stops_reading_is_cut_at_the_send_deadline_and_frees_its_slot(
    backend, proxy
):
    _, server, port = await served(
        backend,
        proxy,
        streams_forever(b"x" * 65536, 4000),  # up to 256 MiB
        listen={"timeouts": {"send": 0.5}},
        pool={"limit": 1},
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(get("/big"))
    await writer.drain()
    # Read nothing: the proxy's buffers fill, it stops being able to write, and cuts.
    await eventually(
        lambda: _is(metric(server, "proxy_client_timeouts_total", phase="send"), 1), within=10
    )
    writer.close()
    client = await RawClient.connect(port)
    assert (await client.request(get("/next"))).body == b"/next"  # the slot is free again
    await client.close()


async def _is(value, expected) -> bool:
    return await value == expected


async def test_keepalive_timeout_zero_closes_every_connection_after_its_response(backend, proxy):
    _, _, port = await served(backend, proxy, listen={"keepalive_timeout": 0})
    answer = await exchange(port, get("/once"))
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"/once")  # and exchange() returned: the proxy closed it


async def test_a_tls_client_that_never_handshakes_is_closed_at_the_header_deadline(
    backend, proxy, tmp_path
):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "chain.pem")
    tls = {"cert": str(tmp_path / "chain.pem"), "key": str(tmp_path / "chain.pem")}
    _, server, port = await served(backend, proxy, listen={"tls": tls, "timeouts": {"header": 0.3}})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    assert await read_until_closed(reader, 3) == b""
    writer.close()
    assert time.monotonic() - started < 2
    assert await metric(server, "proxy_client_timeouts_total", phase="header") == 1
    assert (await tls_get(port, ca, "/tls")).body == b"/tls"  # one that handshakes is served


async def tls_get(port: int, ca: trustme.CA, path: str) -> RawResponse:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(get(path))
    try:
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()


# --- the listener at its limits ---------------------------------------------------------------


async def test_beyond_max_connections_new_clients_wait_until_one_closes(backend, proxy):
    _, server, port = await served(backend, proxy, listen={"limits": {"max_connections": 2}})
    holders = [await RawClient.connect(port) for _ in range(2)]
    for holder in holders:  # both accepted and served
        assert (await holder.request(get("/held"))).status == 200
    waiting = await RawClient.connect(port)  # the kernel completes the handshake: backlog
    waiting.writer.write(get("/waiting"))
    await waiting.writer.drain()
    pending = asyncio.ensure_future(read_response(waiting.reader))
    await asyncio.sleep(0.5)
    assert not pending.done()  # not accepted while two are open
    await holders[0].close()
    answer = await asyncio.wait_for(pending, 5)
    assert answer.body == b"/waiting"
    assert await metric(server, "proxy_client_accept_paused_total", reason="max_connections") >= 1
    await waiting.close()
    await holders[1].close()


# --- limits on what a client sends ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/" + "a" * 200), 414),
        (get("/", extra="X-Long: " + "b" * 300 + "\r\n"), 431),
        (get("/", extra="".join(f"X-{i}: {i}\r\n" for i in range(8))), 431),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world", 413),
    ],
)
async def test_request_limits_are_the_configured_ones(backend, proxy, raw, status):
    limits = {"max_request_line": 100, "max_header": 200, "max_headers": 6, "max_body": 10}
    origin, _, port = await served(backend, proxy, listen={"limits": limits})
    client = await RawClient.connect(port)
    answer = await client.request(raw)
    await client.close()
    assert answer.status == status
    assert answer.header("Server") is None
    assert origin.requests == []


async def test_a_chunked_body_past_max_body_gets_413(backend, proxy):
    origin, _, port = await served(backend, proxy, listen={"limits": {"max_body": 10}})
    client = await RawClient.connect(port)
    chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await client.request(chunked + b"8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n")
    await client.close()
    assert answer.status == 413
    assert all(len(r.body) <= 10 for r in origin.requests)


async def test_a_route_max_body_overrides_the_listener_one(backend, proxy):
    origin = await backend(answering(echo_path))
    routes = [
        {"name": "upload", "match": {"path_prefix": "/upload"}, "upstream": "api",
         "max_body": 1000},
        {"match": {"path_prefix": "/"}, "upstream": "api"},
    ]  # fmt: skip
    server = await proxy(
        config_dict({"api": upstream(origin.url)}, routes, listen={"limits": {"max_body": 10}})
    )
    port = server.proxy_address[1]
    body = b"x" * 500
    post = b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: 500\r\n\r\n%s"
    client = await RawClient.connect(port)
    assert (await client.request(post % (b"/upload", body))).status == 200
    assert (await client.request(post % (b"/other", body))).status == 413
    await client.close()


# --- requests the proxy refuses, and what it fixes on the way -----------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a b/c?d\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h:http\r\n\r\n",
        b"GET http://user:pw@h.test/ HTTP/1.1\r\nHost: h.test\r\n\r\n",
        b"GET /.. HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a/%2e%2e/%2e%2e/etc HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Bin: caf\xe9\r\n\r\n",
    ],
)
async def test_invalid_host_userinfo_climbing_paths_and_non_utf8_get_400(backend, proxy, raw):
    origin, _, port = await served(backend, proxy)
    client = await RawClient.connect(port)
    answer = await client.request(raw)
    await client.close()
    assert answer.status == 400
    assert origin.requests == []


async def test_routes_match_the_path_without_dot_segments(backend, proxy):
    public = await backend(answering(echo_path))
    internal = await backend(answering(echo_path))
    routes = [
        {"match": {"path_prefix": "/public/"}, "upstream": "public"},
        {"match": {"path_prefix": "/internal/", "host": "admin.test"}, "upstream": "internal"},
    ]
    server = await proxy(
        config_dict({"public": upstream(public.url), "internal": upstream(internal.url)}, routes)
    )
    port = server.proxy_address[1]
    client = await RawClient.connect(port)
    for sneaky in ("/public/../internal/secret", "/public/%2e%2e/internal/secret",
                   "/public/.%2E/internal/secret"):  # fmt: skip
        assert (await client.request(get(sneaky))).status == 404
    answer = await client.request(get("/public/a/../b?x=/../"))
    await client.close()
    assert answer.status == 200
    assert public.requests[-1].target == "/public/a/../b?x=/../"  # byte for byte
    assert internal.requests == []


async def test_header_names_with_underscores_never_reach_the_backend(backend, proxy):
    origin, _, port = await served(backend, proxy)
    client = await RawClient.connect(port)
    await client.request(get(extra="X_Forwarded_For: 6.6.6.6\r\nX-Kept: 1\r\n"))
    await client.close()
    assert origin.requests[0].all("X_Forwarded_For") == []
    assert origin.requests[0].all("X-Forwarded-For") == ["127.0.0.1"]
    assert origin.requests[0].all("X-Kept") == ["1"]


async def test_connection_naming_host_does_not_remove_it(backend, proxy):
    origin, _, port = await served(backend, proxy)
    client = await RawClient.connect(port)
    await client.request(get(host="site.test:8080", extra="Connection: Host\r\n"))
    await client.close()
    assert origin.requests[0].all("Host") == ["site.test:8080"]


async def test_the_proxys_own_answers_carry_no_server_header(backend, proxy):
    origin = await backend(answering(echo_path))
    routes = [{"match": {"path_prefix": "/api/"}, "upstream": "api"}]
    server = await proxy(config_dict({"api": upstream(origin.url)}, routes))
    answer = await exchange(
        server.proxy_address[1], get("/elsewhere", extra="Connection: close\r\n")
    )
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"\r\nServer:" not in answer


# --- upstream answers that must not be forwarded ------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Bin: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_a_response_no_client_should_get_is_a_502_and_its_connection_closed(
    backend, proxy, bad
):
    answers = iter([bad])

    def respond(request) -> bytes:
        return next(answers, None) or echo_path(request)

    origin, server, port = await served(backend, proxy, answering(respond), pool={"limit": 1})
    client = await RawClient.connect(port)
    answer = await client.request(get("/first"))
    assert answer.status == 502
    assert answer.header("Content-Length") != "5" or answer.body != b"hello"
    assert (await client.request(get("/second"))).body == b"/second"
    await client.close()
    assert origin.connections == 2
    failures = "proxy_upstream_attempt_failures_total"
    assert await metric(server, failures, target=origin.url, kind="protocol") == 1


async def test_a_malformed_upload_is_the_clients_400_and_never_blamed_on_the_target(backend, proxy):
    origin = await backend(answering(echo_path))
    settings = {"outlier": {"consecutive_failures": 1}}
    server = await proxy(config_dict({"api": upstream(origin.url, **settings)}))
    port = server.proxy_address[1]
    # The head and a first chunk go upstream; then the client sends a chunk size that is not hex.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    await asyncio.sleep(0.3)  # the request is on its way upstream, its body still open
    writer.write(b"zz\r\nab\r\n")
    answer = await read_until_closed(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    client = await RawClient.connect(port)
    assert (await client.request(get("/after"))).body == b"/after"  # the target is not ejected
    await client.close()
    ejections = "proxy_upstream_ejections_total"
    assert await metric(server, ejections, target=origin.url, reason="consecutive_failures") == 0
    for kind in ("reset", "protocol"):
        assert await metric(server, "proxy_upstream_errors_total", kind=kind) == 0
    for kind in ("reset", "protocol"):
        failures = "proxy_upstream_attempt_failures_total"
        assert await metric(server, failures, kind=kind) == 0


async def test_a_429_with_retry_after_rests_no_target_a_503_does(backend, proxy):
    origin = await backend(
        answering(lambda r: http_response(429 if r.target == "/limited" else 503,
                                          "No", [("Retry-After", "30")]))
    )  # fmt: skip
    server = await proxy(config_dict({"api": upstream(origin.url)}))
    port = server.proxy_address[1]
    client = await RawClient.connect(port)
    assert (await client.request(get("/limited"))).status == 429
    assert await metric(server, "proxy_upstream_target_up", target=origin.url) == 1
    assert (await client.request(get("/busy"))).status == 503
    assert await metric(server, "proxy_upstream_target_up", target=origin.url) == 0
    await client.close()


# --- out of file descriptors (the proxy as a subprocess, with a low `ulimit -n`) ----------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_file_descriptors_the_proxy_pauses_accepting_and_recovers(backend, tmp_path):
    origin = await backend(answering(echo_path))
    port, admin = free_port(), free_port()
    config = config_dict({"api": upstream(origin.url)}, listen={"timeouts": {"header": 60}})
    config["listen"]["port"], config["admin"]["port"] = port, admin
    config["access_log"] = {"enabled": False}
    path = write_config(tmp_path / "config.yaml", config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )  # fmt: skip
    flood: list[socket.socket] = []
    try:
        await wait_until_ready(proc, admin)
        steady = await RawClient.connect(port)
        assert (await steady.request(get("/before"))).body == b"/before"
        for _ in range(150):  # more than the 64 descriptors the proxy may open
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            flood.append(sock)
        await asyncio.sleep(0.5)
        used = cpu_seconds(proc.pid)
        await asyncio.sleep(2)
        # Its open connection is still served, and it is not spinning on accept().
        assert (await steady.request(get("/during"))).body == b"/during"
        assert cpu_seconds(proc.pid) - used < 0.5
        for sock in flood:
            sock.close()
        flood.clear()
        await steady.close()

        async def served_again() -> bool:
            with contextlib.suppress(OSError, TimeoutError):
                client = await RawClient.connect(port)
                try:
                    return (await client.request(get("/after"))).body == b"/after"
                finally:
                    await client.close()
            return False

        await eventually(served_again, within=10)
    finally:
        for sock in flood:
            sock.close()
        proc.terminate()
        _, raw_stderr = await asyncio.wait_for(proc.communicate(), 20)
    stderr = raw_stderr.decode()
    assert "Traceback" not in stderr
    assert 1 <= stderr.count("cannot accept client connections") <= 2, stderr[-2000:]


async def wait_until_ready(proc: asyncio.subprocess.Process, admin_port: int) -> None:
    async def ready() -> bool:
        assert proc.returncode is None, "the proxy exited"
        with contextlib.suppress(OSError, TimeoutError):
            reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            # The admin listener answers only for an IP address, localhost or allowed_hosts.
            writer.write(get("/readyz", host="127.0.0.1", extra="Connection: close\r\n"))
            answer = await asyncio.wait_for(reader.read(), 1)
            writer.close()
            return answer.startswith(b"HTTP/1.1 200 ")
        return False

    await eventually(ready, within=15)


# --- reloads and bugs -------------------------------------------------------------------------


def open_sessions() -> int:
    """ClientSessions alive and not closed, referenced or not (a log record may hold one)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed)


async def test_a_reload_that_fails_building_upstreams_closes_those_it_built(backend, tmp_path):
    origin = await backend(answering(echo_path))
    config = config_dict({"api": upstream(origin.url)})
    path = write_config(tmp_path / "config.yaml", config)
    server = ProxyServer(parse_config(config), config_path=path, shutdown_grace=1)
    await server.start()
    try:
        broken = config_dict({
            "api": upstream(origin.url, pool={"limit": 7}),  # changed: built anew
            "secure": upstream("https://127.0.0.1:1", tls={"ca_file": str(tmp_path / "none")}),
        })  # fmt: skip
        write_config(path, broken)
        open_before = open_sessions()
        applied, message = await server.reload()
        assert not applied
        assert "upstreams.secure.tls.ca_file" in message
        assert open_sessions() == open_before  # "api" was built anew, then closed
        client = await RawClient.connect(server.proxy_address[1])
        assert (await client.request(get("/still"))).body == b"/still"
        await client.close()
    finally:
        await server.stop()


async def test_an_unexpected_error_in_the_proxy_is_a_counted_500(backend, proxy, monkeypatch):
    from proxy import intake

    def broken(target: str) -> str:
        raise RuntimeError("a bug")

    _, server, port = await served(backend, proxy)
    monkeypatch.setattr(intake, "normalized_path", broken)  # our code, not aiohttp's
    client = await RawClient.connect(port)
    answer = await client.request(get("/bug"))
    await client.close()
    assert answer.status == 500
    requests = "proxy_requests_total"
    assert await metric(server, requests, code="500") == 1


# --- found by review: pipelining, TLS at the connection mark, no tracebacks ---------------------


async def test_a_pipelined_request_body_has_its_own_deadline(backend, proxy):
    slow_first = answering(echo_path, delay=1.5)
    _, server, port = await served(backend, proxy, slow_first, listen={"timeouts": {"body": 1}})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # A GET answered after 1.5 s, and behind it a POST whose body stops after 10 of 100 bytes.
    writer.write(
        get("/first") + b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    first = await asyncio.wait_for(read_response(reader), 5)
    second = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert (first.status, first.body) == (200, b"/first")
    assert second.status == 408
    assert await metric(server, "proxy_client_timeouts_total", phase="body") == 1


async def test_tls_clients_that_never_handshake_do_not_stop_the_listener_at_its_mark(
    backend, proxy, tmp_path
):
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "c.pem")
    listen = {
        "tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "c.pem")},
        "timeouts": {"header": 0.5},
        "limits": {"max_connections": 2},
    }
    _, _, port = await served(backend, proxy, listen=listen)
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for reader, _ in silent:  # both handshakes time out: the mark is free again
        assert await read_until_closed(reader, 3) == b""
    for _, writer in silent:
        writer.close()
    assert (await tls_get(port, ca, "/after")).body == b"/after"


@pytest.mark.parametrize(
    ("listen", "first", "then", "status"),
    [
        ({"timeouts": {"body": 0.3}},
         b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nabc", b"", 408),
        ({"limits": {"max_body": 5}},
         b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
         b"4\r\ndefg\r\n0\r\n\r\n", 413),
        ({}, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
         b"zz\r\nab\r\n", 400),
    ],
)  # fmt: skip
async def test_a_clients_failed_body_is_answered_without_an_error_log(
    backend, proxy, caplog, listen, first, then, status
):
    _, _, port = await served(backend, proxy, listen=listen)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    await asyncio.sleep(0.2)  # the request is on its way upstream, its body still open
    writer.write(then)
    answer = await read_what_arrives(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    await asyncio.sleep(0.2)  # aiohttp's lingering read, which logged a traceback, is done
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
