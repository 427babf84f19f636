"""Who the client is (issue 10): the TCP peer, or the PROXY protocol header's source; behind
listen.trusted_proxies, the right-most untrusted X-Forwarded-For address. What a client says
about itself in X-Forwarded-* never reaches the backend, and the access log names the client."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import logging
import ssl
import struct
import time

import pytest
import trustme

from proxy.config import parse_config
from proxy.proxyproto import V2_SIGNATURE
from proxy.server import ProxyServer
from tests.support import (
    RawClient,
    admin_get,
    answering,
    config_dict,
    get,
    http_response,
    metric_value,
    read_response,
    upstream,
)

OK = http_response(body=b"ok")
FORGED = (
    "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"
    "X-Forwarded-Proto: https\r\nX-Forwarded-Host: www.shop.test\r\n"
    "Forwarded: for=203.0.113.7\r\nX-Real-IP: 203.0.113.7\r\n"
)
SAID_BY_PROXIES = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded",
                   "X-Real-IP")  # fmt: skip


@contextlib.asynccontextmanager
async def logged_proxy(backend, **listen):
    """A recording backend behind a proxy (listen settings `listen`) whose JSON access log is
    read back: yields (backend, server, the log's lines so far, parsed)."""
    origin = await backend(answering(OK))
    stream = io.StringIO()
    config = config_dict(
        {"app": upstream(origin.url)}, listen=listen, access_log={"format": "json"}
    )
    server = ProxyServer(parse_config(config), shutdown_grace=1, access_log_stream=stream)
    await server.start()
    lines: list[dict] = []
    try:
        yield origin, server, lines
    finally:
        await server.stop()  # flushes the log
        lines += [json.loads(line) for line in stream.getvalue().splitlines()]


async def one_request(port: int, data: bytes):
    client = await RawClient.connect(port)
    try:
        return await client.request(data)
    finally:
        await client.close()


async def metric(server: ProxyServer, name: str, **labels: str) -> float:
    _, _, text = await admin_get(server, "/metrics")
    return metric_value(text, name, **labels)


# --- X-Forwarded-For and its trust ------------------------------------------------------------

REPLACED = {
    "X-Forwarded-For": ["127.0.0.1"],
    "X-Forwarded-Proto": ["http"],
    "X-Forwarded-Host": ["shop.test"],
    "Forwarded": [],
    "X-Real-IP": [],
}


@pytest.mark.parametrize(
    ("trusted", "extra", "arrived", "client"),
    [
        # Nobody trusted (the default): all a client says about itself is a forgery.
        ([], FORGED, REPLACED, "127.0.0.1"),
        (["10.0.0.0/8"], FORGED, REPLACED, "127.0.0.1"),  # trusted proxies, but not this peer
        # A trusted peer: its chain is kept, the peer appended; -Proto/-Host as it sent them.
        (["127.0.0.1/32"], FORGED, {
            "X-Forwarded-For": ["203.0.113.7, 198.51.100.1, 127.0.0.1"],
            "X-Forwarded-Proto": ["https"],
            "X-Forwarded-Host": ["www.shop.test"],
            "Forwarded": [],  # never believed, not even from a trusted proxy
            "X-Real-IP": [],
        }, "198.51.100.1"),
        (["127.0.0.1/32"], "", REPLACED, "127.0.0.1"),  # a trusted peer that sent none
        (["127.0.0.0/8", "10.0.0.0/8"], "X-Forwarded-For: 1.2.3.4, 10.0.0.7\r\n",
         {"X-Forwarded-For": ["1.2.3.4, 10.0.0.7, 127.0.0.1"]}, "1.2.3.4"),
        (["127.0.0.0/8", "10.0.0.0/8"], "X-Forwarded-For: 6.6.6.6, 1.2.3.4, 10.0.0.7\r\n",
         {"X-Forwarded-For": ["6.6.6.6, 1.2.3.4, 10.0.0.7, 127.0.0.1"]}, "1.2.3.4"),
        # A malformed entry stops the walk at the last trusted hop: never a chosen string.
        (["127.0.0.0/8", "10.0.0.0/8"], "X-Forwarded-For: 1.2.3.4, <script>, 10.0.0.7\r\n",
         {"X-Forwarded-For": ["1.2.3.4, <script>, 10.0.0.7, 127.0.0.1"]}, "10.0.0.7"),
        (["127.0.0.0/8"], "X-Forwarded-For: 1.2.3.4:5678\r\n", {}, "127.0.0.1"),
        (["127.0.0.0/8", "::1/128"], "X-Forwarded-For: 2001:DB8::7, ::1\r\n", {}, "2001:db8::7"),
    ],
)  # fmt: skip
async def test_forwarding_headers_are_believed_only_from_trusted_proxies(
    backend, trusted, extra, arrived, client
):
    async with logged_proxy(backend, trusted_proxies=trusted) as (origin, server, log):
        answer = await one_request(server.proxy_address[1], get(host="shop.test", extra=extra))
        assert answer.status == 200
    request = origin.requests[0]
    for name, values in arrived.items():
        assert request.all(name) == values, name
    assert [entry["client"] for entry in log] == [client]


async def test_forwarding_headers_spelled_with_underscores_are_removed_even_when_allowed(backend):
    extra = "X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nX_Other: 1\r\n"
    async with logged_proxy(backend, allow_underscores_in_headers=True) as (origin, server, _):
        await one_request(server.proxy_address[1], get(extra=extra))
    assert origin.requests[0].all("X_Other") == ["1"]
    assert {n.lower().replace("_", "-") for n in origin.requests[0].names} & {
        "x-real-ip", "x-forwarded-for"
    } == {"x-forwarded-for"}  # fmt: skip
    assert origin.requests[0].all("X-Forwarded-For") == ["127.0.0.1"]


# --- the PROXY protocol -----------------------------------------------------------------------


def v2(command: int, family: int, source: str = "", destination: str = "", tlvs: bytes = b""):
    block = b""
    if source:
        block = (
            ipaddress.ip_address(source).packed
            + ipaddress.ip_address(destination).packed
            + struct.pack("!HH", 56324, 443)
        )
    block += tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", "192.0.2.1"),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n", "2001:db8::1"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),  # the balancer does not know: the TCP peer
        (v2(0x21, 0x11, "192.0.2.1", "198.51.100.2"), "192.0.2.1"),
        (v2(0x21, 0x11, "192.0.2.1", "198.51.100.2", b"\x05\x00\x02id\xea\x00\x01x"), "192.0.2.1"),
        (v2(0x21, 0x21, "2001:db8::1", "2001:db8::2"), "2001:db8::1"),
        (v2(0x20, 0x00), "127.0.0.1"),  # LOCAL: the balancer's own health check
    ],
)
async def test_the_proxy_protocol_source_is_the_client_of_every_request_on_the_connection(
    backend, header, client
):
    async with logged_proxy(backend, proxy_protocol=True) as (origin, server, log):
        connection = await RawClient.connect(server.proxy_address[1])
        try:
            assert (await connection.request(header + get("/one"))).status == 200
            assert (await connection.request(get("/two", extra=FORGED))).status == 200
        finally:
            await connection.close()
    assert [r.all("X-Forwarded-For") for r in origin.requests] == [[client], [client]]
    assert [entry["client"] for entry in log] == [client, client]


async def test_a_proxy_protocol_header_in_pieces_is_read_whole_and_nothing_after_it(backend):
    header = v2(0x21, 0x11, "192.0.2.1", "198.51.100.2", b"\x05\x00\x40" + b"u" * 64)
    async with logged_proxy(backend, proxy_protocol=True) as (origin, server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
        try:
            for piece in (header[:3], header[3:14], header[14:40], header[40:], get()[:5]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(get()[5:])
            assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        finally:
            writer.close()
    assert origin.requests[0].all("X-Forwarded-For") == ["192.0.2.1"]


async def test_the_proxy_protocol_source_is_the_peer_trusted_proxies_are_checked_against(backend):
    listen = {"proxy_protocol": True, "trusted_proxies": ["192.0.2.0/24"]}
    async with logged_proxy(backend, **listen) as (origin, server, log):
        header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        extra = "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        await one_request(server.proxy_address[1], header + get(extra=extra))
    assert origin.requests[0].all("X-Forwarded-For") == ["1.2.3.4, 192.0.2.1"]
    assert origin.requests[0].all("X-Forwarded-Proto") == ["https"]
    assert log[0]["client"] == "1.2.3.4"


async def test_a_proxy_protocol_header_comes_before_tls(backend, tmp_path):
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "c.pem")
    tls = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "c.pem")}
    async with logged_proxy(backend, proxy_protocol=True, tls=tls) as (origin, server, _):
        raw, writer = await asyncio.open_connection("127.0.0.1", server.proxy_address[1])
        writer.write(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")
        await writer.drain()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        await writer.start_tls(context, server_hostname="127.0.0.1")
        writer.write(get())
        try:
            assert (await asyncio.wait_for(read_response(raw), 5)).status == 200
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
    assert origin.requests[0].all("X-Forwarded-For") == ["192.0.2.1"]
    assert origin.requests[0].all("X-Forwarded-Proto") == ["https"]


async def closed_without_a_word(port: int, data: bytes, *, then_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if then_close:
            return b""
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(reader.read(), 5)
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    "data",
    [
        get(),  # no header at all
        b"PROXY TCP4 192.0.2.999 198.51.100.2 56324 443\r\n" + get(),
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n" + get(),
        v2(0x22, 0x11, "192.0.2.1", "198.51.100.2") + get(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello
    ],
)
async def test_a_connection_without_a_valid_header_is_closed_counted_and_logged_once(
    backend, caplog, data
):
    async with logged_proxy(backend, proxy_protocol=True) as (origin, server, log):
        port = server.proxy_address[1]
        for _ in range(3):
            assert await closed_without_a_word(port, data) == b""
        assert await metric(server, "proxy_proxy_protocol_errors_total", reason="malformed") == 3
        good = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n" + get()
        assert (await one_request(port, good)).status == 200  # the listener carries on
    assert len(origin.requests) == 1
    assert [entry["client"] for entry in log] == ["192.0.2.1"]
    warnings = [r for r in caplog.records if "PROXY protocol header" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_a_header_that_never_completes_is_closed_at_the_header_deadline(backend):
    listen = {"proxy_protocol": True, "timeouts": {"header": 0.3}}
    async with logged_proxy(backend, **listen) as (origin, server, _):
        started = time.monotonic()
        assert await closed_without_a_word(server.proxy_address[1], b"PROXY TCP4 192.0") == b""
        assert 0.25 < time.monotonic() - started < 2
        assert await metric(server, "proxy_proxy_protocol_errors_total", reason="timeout") == 1
        assert await metric(server, "proxy_client_timeouts_total", phase="header") == 1
    assert origin.requests == []


async def test_a_client_that_leaves_mid_header_is_counted_as_closed(backend):
    async with logged_proxy(backend, proxy_protocol=True) as (_, server, _):
        await closed_without_a_word(server.proxy_address[1], b"PROXY TCP4", then_close=True)
        for _ in range(100):
            if await metric(server, "proxy_proxy_protocol_errors_total", reason="closed"):
                break
            await asyncio.sleep(0.02)
        assert await metric(server, "proxy_proxy_protocol_errors_total", reason="closed") == 1


async def test_with_the_proxy_protocol_off_a_proxy_line_is_just_a_bad_request(backend):
    async with logged_proxy(backend) as (origin, server, log):
        header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        answer = await one_request(server.proxy_address[1], header + get())
        for reason in ("malformed", "timeout", "closed"):
            assert await metric(server, "proxy_proxy_protocol_errors_total", reason=reason) == 0
    assert answer.status == 400
    assert origin.requests == []
    assert [entry["client"] for entry in log] == ["127.0.0.1"]
