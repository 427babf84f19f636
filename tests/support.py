"""Real peers for the tests: raw HTTP backends and clients over 127.0.0.1 sockets.

Nothing here mocks aiohttp: the raw backend is an asyncio server that sees the exact bytes the
proxy sends, and the raw client sends exact bytes and reads what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import parse_config
from proxy.server import ProxyServer

REPO = Path(__file__).resolve().parent.parent
RELOAD = {"X-Proxy-Reload": "1"}  # POST /reload's guard against cross-site requests


@dataclass
class RawRequest:
    head: bytes  # request line and headers, exactly as received, without the blank line
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Bytes up to the blank line, or None at a clean EOF."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return data[:-4]


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return first, headers


async def read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    lowered = {k.lower(): v for k, v in headers}
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    length = int(lowered.get("content-length", "0"))
    return await reader.readexactly(length)


async def read_request(reader: asyncio.StreamReader, *, body: bool = True) -> RawRequest | None:
    head = await read_head(reader)
    if head is None:
        return None
    first, headers = parse_head(head)
    method, target, version = first.split(" ")
    data = await read_body(reader, headers) if body else b""
    return RawRequest(head, method, target, version, headers, data)


def http_response(
    status: int = 200,
    reason: str = "OK",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    hdrs = list(headers or [])
    if content_length and not any(k.lower() == "content-length" for k, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}" for k, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


Handler = Callable[["RawBackend", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawBackend:
    """An HTTP/1.1 backend on 127.0.0.1:0 that records what arrives and counts its connections."""

    handler: Handler
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0  # accepted since start
    open: int = 0
    max_open: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set when any connection ends
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, request: RawRequest) -> None:
        self.requests.append(request)
        self._arrived.set()

    async def received(self, count: int = 1, *, within: float = 5.0) -> None:
        """Wait until `count` requests have arrived (at most `within` seconds)."""
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self.tasks.discard(task)
            self.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.server.wait_closed()


def answering(response: bytes | Callable[[RawRequest], bytes], *, delay: float = 0.0) -> Handler:
    """A keep-alive backend that answers every request with `response` (after `delay`)."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            if delay:
                await asyncio.sleep(delay)
            writer.write(response(request) if callable(response) else response)
            await writer.drain()

    return handler


def held_until(release: asyncio.Event, response: bytes) -> Handler:
    """A keep-alive backend that holds every request until `release` is set."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (request := await read_request(reader)) is not None:
            backend.record(request)
            await release.wait()
            writer.write(response)
            await writer.drain()

    return handler


async def never_answers(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Takes one request and answers nothing for a minute."""
    request = await read_request(reader)
    if request is not None:
        backend.record(request)
    await asyncio.sleep(60)


def closes_idle_after(seconds: float, response: bytes) -> Handler:
    """Keeps a connection open for `seconds` of idleness, then closes it without a word."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                request = await asyncio.wait_for(read_request(reader), seconds)
            except TimeoutError:
                return  # RawBackend closes the connection
            if request is None:
                return
            backend.record(request)
            writer.write(response)
            await writer.drain()

    return handler


def closes_on_reuse(response: bytes) -> Handler:
    """Answers the first request of a connection; hangs up when a second one arrives."""

    async def handler(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_request(reader)
        if request is None:
            return
        backend.record(request)
        writer.write(response)
        await writer.drain()
        await read_head(reader)

    return handler


def require_tool(name: str, install: str) -> str:
    """The path of command `name`; a skip where it is missing, but a failure under CI=true,
    where .ci/run installs it (a skip there would hide a broken install step)."""
    import pytest

    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def config_dict(
    upstreams: dict[str, Any], routes: list[dict[str, Any]] | None = None, **top: Any
) -> dict[str, Any]:
    """A config on 127.0.0.1, ports 0; one catch-all route to the first upstream by default."""
    first = next(iter(upstreams))
    return {
        "listen": {"host": "127.0.0.1", "port": 0, **top.pop("listen", {})},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstreams": upstreams,
        "routes": routes or [{"match": {"path_prefix": "/"}, "upstream": first}],
        **top,
    }


def upstream(*targets: str, **settings: Any) -> dict[str, Any]:
    return {"targets": list(targets), **settings}


async def start_proxy(config: dict[str, Any]) -> ProxyServer:
    server = ProxyServer(parse_config(config), shutdown_grace=2.0)
    await server.start()
    return server


async def exchange(port: int, data: bytes, *, within: float = 5.0) -> bytes:
    """Send raw bytes, return everything read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> RawResponse:
    head = await read_head(reader)
    assert head is not None, "the proxy closed the connection without answering"
    first, headers = parse_head(head)
    _, status, reason = first.split(" ", 2)
    empty = head_request or int(status) in (204, 304) or 100 <= int(status) < 200
    body = b"" if empty else await read_body(reader, headers)
    return RawResponse(int(status), reason, headers, body)


class RawClient:
    """One client connection to the proxy, for keep-alive and byte-level checks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, data: bytes, *, head_request: bool = False) -> RawResponse:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(read_response(self.reader, head_request=head_request), 5)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 5.0) -> None:
    """Poll `check` until it is true, for state the proxy exposes no event for (a scrape);
    `check` may be a coroutine function or a plain predicate."""
    async with asyncio.timeout(within):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.01)


async def admin_get(server: ProxyServer, path: str, **headers: str) -> tuple[int, str, str]:
    """GET an admin endpoint: (status, content type, body)."""
    import aiohttp

    url = f"http://127.0.0.1:{server.admin_address[1]}{path}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.content_type, await response.text()


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The first sample of `name` whose labels include `labels`, in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise KeyError(f"no sample {name} {labels}")


def get(target: str = "/", host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


# --- the proxy as a subprocess, as a user runs it ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class ProxyProcess:
    """`python -m proxy --config FILE` in a subprocess, started and waited for like a user would
    (`module`: another entry point that takes --config, such as proxy.demo; `wrapper`: a command
    it runs under, such as unshare).

    Its stdout (the access log) and stderr are read as they come, by a thread each: a pipe
    nobody reads fills at 64 KiB, and a proxy logging many failures would block on it (stderr
    is written from the event loop)."""

    def __init__(
        self,
        config_path: Path,
        admin_port: int,
        module: str = "proxy",
        wrapper: Sequence[str] = (),
    ) -> None:
        self.admin_port = admin_port
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", module, "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self._out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [
            threading.Thread(target=self._drain, args=(name,), daemon=True) for name in self._out
        ]
        for reader in self._readers:
            reader.start()

    def _drain(self, name: str) -> None:
        stream = getattr(self.proc, name)
        for line in stream:
            self._out[name].append(line)
        stream.close()

    def _finished(self, timeout: float | None = None) -> tuple[str, str]:
        """stdout and stderr, once the process has exited and both pipes reached their end (or
        `timeout` s passed: a child still holding them)."""
        for reader in self._readers:
            reader.join(timeout)
        return "".join(self._out["stdout"]), "".join(self._out["stderr"])

    def wait_ready(self, timeout: float = 15) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited early: {self._finished()}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.admin_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise AssertionError("proxy did not become ready")

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 15) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self._finished()[1]

    def kill(self) -> None:
        """Stop it now, workers included. SIGKILL would reach only a supervisor: its workers run
        in sessions of their own and would live on, holding the pipes. Two SIGTERMs are "exit
        now" (a supervisor SIGKILLs its workers first); SIGKILL if that takes over 10 s."""
        for _ in range(2):
            if self.proc.poll() is None:
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)  # the first starts a drain; the second ends it
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._finished(timeout=10)


async def stop_process(process: asyncio.subprocess.Process, within: float = 10) -> None:
    """SIGTERM a process this test started, then SIGKILL it if it has not exited `within` s."""
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        process.kill()
        await process.wait()


class Load:
    """`loops` clients sending GET `url` one after another until stopped; each answer is kept
    with the time (monotonic) its request was sent. `connector`: e.g. one connection only."""

    def __init__(self, url: str, loops: int = 2, connector: aiohttp.BaseConnector | None = None):
        self.url = url
        self.sent: list[tuple[float, int, bytes]] = []
        self._session = aiohttp.ClientSession(connector=connector)
        self._running = True
        self._loops = [asyncio.create_task(self._loop()) for _ in range(loops)]

    async def _loop(self) -> None:
        while self._running:
            sent = time.monotonic()
            async with self._session.get(self.url) as response:
                self.sent.append((sent, response.status, await response.read()))

    def count(self, after: float = 0.0, status: int | None = None) -> int:
        return sum(1 for t, s, _ in self.sent if t >= after and status in (None, s))

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._session.close()
