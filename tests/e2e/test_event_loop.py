"""`event_loop: uvloop` (issue 13): the real proxy, as a subprocess on uvloop, through everything
that touches transports: plain and streamed bodies, an Upgrade tunnel through the raw relay, a
TLS listener, the PROXY protocol, `workers: 2`, SIGHUP reload and SIGTERM drain. uvloop is in
the `test` extra, so nothing here is skipped. Every peer is real, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.loops import UVLOOP_MISSING, loop_factory
from tests.support import (
    REPO,
    ProxyProcess,
    config_dict,
    eventually,
    free_port,
    run_cli,
    upstream,
    write_config,
)

MIB = 1024 * 1024
BIG = 10 * MIB
CHUNK = bytes(range(256)) * 256  # 64 KiB


@contextlib.asynccontextmanager
async def origin(name: str = "a") -> AsyncIterator[str]:
    """An aiohttp backend: /small, /big (10 MiB streamed), /upload (the body's size and hash),
    /slow (1 s), /ws (a WebSocket echo); each answer says which backend (`name`) sent it."""

    async def small(request: web.Request) -> web.Response:
        forwarded = request.headers.get("X-Forwarded-For", "-")
        return web.Response(text=f"{name} {forwarded}")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = BIG
        await response.prepare(request)
        for _ in range(BIG // len(CHUNK)):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.Response(text=f"{size} {digest.hexdigest()}")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text=f"{name} slow")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.TEXT:
                await socket_.send_str(f"{name}:{message.data}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(message.data)
        return socket_

    app = web.Application(client_max_size=0)
    app.router.add_get("/small", small)
    app.router.add_get("/big", big)
    app.router.add_post("/upload", upload)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class OnUvloop:
    """`python -m proxy` with `event_loop: uvloop`, its config file rewritten by the test."""

    def __init__(self, tmp_path: Path, target: str, **top: Any) -> None:
        self.port, self.admin = free_port(), free_port()
        self.path = tmp_path / "proxy.yaml"
        self.top = top
        self.write(target)
        self.process = ProxyProcess(self.path, self.admin)

    def write(self, target: str) -> None:
        listen = {"port": self.port, **self.top.pop("listen", {})}
        config = config_dict(
            {"origin": upstream(target)},
            listen=listen,
            access_log={"enabled": False},
            event_loop="uvloop",
            shutdown={"delay": 0, "grace": 10},
            **self.top,
        )
        self.top["listen"] = listen
        config["admin"]["port"] = self.admin
        write_config(self.path, config)

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def stop(self) -> tuple[int, str]:
        self.process.signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait)


@contextlib.asynccontextmanager
async def on_uvloop(tmp_path: Path, target: str, **top: Any) -> AsyncIterator[OnUvloop]:
    proxy = OnUvloop(tmp_path, target, **top)
    try:
        await asyncio.to_thread(proxy.process.wait_ready)
        yield proxy
    finally:
        if proxy.process.proc.poll() is None:  # SIGTERM first: a supervisor stops its workers
            proxy.process.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proxy.process.wait, 10)
        proxy.process.kill()


def runs_uvloop(pid: int) -> bool:
    """The process has uvloop's extension loaded: it imported uvloop, not just read a key."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return any("uvloop" in line and "loop.cpython" in line for line in maps.splitlines())


async def text(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.text()


# --- the key and the CLI ---


def test_check_accepts_uvloop_and_names_the_key_for_anything_else(tmp_path):
    path = write_config(tmp_path / "p.yaml", config_dict({"a": upstream("http://127.0.0.1:1")}))
    for value, code, line in (
        ("uvloop", 0, "config OK: 1 upstreams, 1 routes"),
        ("asyncio", 0, "config OK: 1 upstreams, 1 routes"),
        ("libuv", 2, "event_loop: must be one of asyncio, uvloop, got 'libuv'"),
    ):
        config = config_dict({"a": upstream("http://127.0.0.1:1")}, event_loop=value)
        write_config(path, config)
        result = run_cli("--config", str(path), "--check")
        assert result.returncode == code, result.stderr
        assert line in (result.stdout if code == 0 else result.stderr)


@pytest.mark.parametrize("check", [True, False], ids=["--check", "serving"])
def test_uvloop_not_installed_is_one_clear_line_and_exit_2(tmp_path, check):
    """A Python where `import uvloop` fails (sys.modules[name] = None is how Python blocks an
    import): the proxy does not fall back to asyncio, it says what to install."""
    config = config_dict({"a": upstream("http://127.0.0.1:1")}, event_loop="uvloop")
    path = write_config(tmp_path / "p.yaml", config)
    argv = ["--config", str(path), *(["--check"] if check else [])]
    code = (
        "import sys; sys.modules['uvloop'] = None; from proxy.__main__ import main; "
        f"sys.exit(main({argv!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [UVLOOP_MISSING]
    assert result.stdout == ""


# --- the loop's accept ---


def test_uvloop_accepts_a_burst_of_connections_in_one_loop_turn():
    """The cause of uvloop's long p99 at 200 clients: stock uvloop's sock_accept waits for a
    poll before every accept, so the accept loop took one connection per loop turn. The
    proxy's loop accepts at once while connections wait, as asyncio does."""
    loop = loop_factory("uvloop")()  # type: ignore[misc]

    async def burst() -> None:
        with socket.create_server(("127.0.0.1", 0), backlog=64) as listening:
            listening.setblocking(False)
            address = listening.getsockname()
            clients = [socket.create_connection(address) for _ in range(20)]
            turns = 0

            def turned() -> None:
                nonlocal turns
                turns += 1

            loop.call_soon(turned)
            accepted = [await loop.sock_accept(listening) for _ in range(20)]
            assert turns == 0  # all 20 in this turn: no callback ran in between
            assert all(not conn.getblocking() for conn, _ in accepted)
            # Nothing waiting: it waits for the next connection, and gets it.
            waiting = asyncio.ensure_future(loop.sock_accept(listening))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            late = socket.create_connection(address)
            conn, peer = await asyncio.wait_for(waiting, 5)
            assert peer == late.getsockname()
            for sock in [*clients, late, conn, *(c for c, _ in accepted)]:
                sock.close()

    try:
        loop.run_until_complete(burst())
    finally:
        loop.close()


# --- the proxy on uvloop ---


async def test_get_10_mib_both_ways_and_a_websocket_on_uvloop(tmp_path):
    async with origin() as target, on_uvloop(tmp_path, target) as proxy:
        assert runs_uvloop(proxy.process.proc.pid)
        async with aiohttp.ClientSession() as session:
            assert await text(session, proxy.url("/small")) == (200, "a 127.0.0.1")
            async with session.get(proxy.url("/big")) as response:
                digest, size = hashlib.sha256(), 0
                async for chunk in response.content.iter_chunked(MIB):
                    digest.update(chunk)
                    size += len(chunk)
            assert (response.status, size) == (200, BIG)
            assert digest.digest() == hashlib.sha256(CHUNK * (BIG // len(CHUNK))).digest()

            async def body() -> AsyncIterator[bytes]:
                for _ in range(BIG // len(CHUNK)):
                    yield CHUNK

            async with session.post(proxy.url("/upload"), data=body()) as response:
                answer = await response.text()
            expected = hashlib.sha256(CHUNK * (BIG // len(CHUNK))).hexdigest()
            assert (response.status, answer) == (200, f"{BIG} {expected}")
            # An Upgrade: the proxy relays raw bytes both ways (tunnel.py) on uvloop's transports.
            async with session.ws_connect(proxy.url("/ws")) as ws:
                await ws.send_str("hello")
                assert await ws.receive_str(timeout=5) == "a:hello"
                await ws.send_bytes(CHUNK * 16)  # 1 MiB
                assert await ws.receive_bytes(timeout=5) == CHUNK * 16
        code, stderr = await proxy.stop()
    assert code == 0, stderr
    assert "event loop: uvloop (proxy.loops.ProxyLoop)" in stderr


async def test_tls_listener_and_proxy_protocol_on_uvloop(tmp_path):
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    listen = {"tls": {"cert": str(pem), "key": str(pem)}, "proxy_protocol": True}
    async with origin() as target, on_uvloop(tmp_path, target, listen=listen) as proxy:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        for _ in range(3):  # three connections: each handshake on uvloop's SSL transport
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")
            await writer.drain()
            await writer.start_tls(context, server_hostname="127.0.0.1")
            writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert answer.endswith(b"\r\n\r\na 192.0.2.1")
        code, stderr = await proxy.stop()
    assert code == 0, stderr


async def test_sighup_reload_then_sigterm_drains_a_request_in_flight_on_uvloop(tmp_path):
    async with (
        origin("a") as first,
        origin("b") as second,
        on_uvloop(tmp_path, first) as proxy,
        aiohttp.ClientSession() as session,
    ):
        assert await text(session, proxy.url("/small")) == (200, "a 127.0.0.1")
        proxy.write(second)
        proxy.process.signal(signal.SIGHUP)

        async def switched() -> bool:
            return await text(session, proxy.url("/small")) == (200, "b 127.0.0.1")

        await eventually(switched)
        in_flight = asyncio.ensure_future(text(session, proxy.url("/slow")))
        await asyncio.sleep(0.3)  # the request is at the backend
        proxy.process.signal(signal.SIGTERM)
        assert await asyncio.wait_for(in_flight, 5) == (200, "b slow")
        code, stderr = await asyncio.to_thread(proxy.process.wait)
    assert code == 0, stderr
    assert "config reloaded" in stderr


async def test_two_workers_on_uvloop_serve_reload_and_stop(tmp_path):
    async with (
        origin("a") as first,
        origin("b") as second,
        on_uvloop(tmp_path, first, workers=2) as proxy,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"http://127.0.0.1:{proxy.admin}/pools") as response:
            workers = (await response.json())["workers"]
        pids = [worker["pid"] for worker in workers]
        assert len(pids) == 2
        assert all(runs_uvloop(pid) for pid in pids)
        fresh = aiohttp.TCPConnector(force_close=True)  # new connections: both workers serve
        async with aiohttp.ClientSession(connector=fresh) as spread:
            answers = await asyncio.gather(*(text(spread, proxy.url("/small")) for _ in range(20)))
        assert answers == [(200, "a 127.0.0.1")] * 20
        proxy.write(second)
        proxy.process.signal(signal.SIGHUP)

        async def switched() -> bool:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                found = await asyncio.gather(*(text(s, proxy.url("/small")) for _ in range(10)))
            return found == [(200, "b 127.0.0.1")] * 10

        await eventually(switched)
        code, stderr = await proxy.stop()
    assert code == 0, stderr
    # Each worker says which loop it runs; the supervisor serves no client and stays on
    # asyncio (workers.py says why).
    assert stderr.count("event loop: uvloop (proxy.loops.ProxyLoop)") == 2
    assert stderr.count("event loop: asyncio") == 1


async def test_a_client_that_stalls_mid_head_is_cut_at_the_header_deadline_on_uvloop(tmp_path):
    """deadlines.py swaps each client transport's protocol (set_protocol) and arms call_at
    timers: on uvloop's transports too."""
    listen = {"timeouts": {"header": 0.5}}
    async with origin() as target, on_uvloop(tmp_path, target, listen=listen) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        started = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), 5)
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        assert 0.4 <= elapsed < 3, elapsed
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        # The next client is served as usual.
        async with aiohttp.ClientSession() as session:
            assert await text(session, proxy.url("/small")) == (200, "a 127.0.0.1")
        code, stderr = await proxy.stop()
    assert code == 0, stderr
