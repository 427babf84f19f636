"""Benchmark of tunnels (issue 9): the backend directly, this proxy and nginx, in one run.

    python bench/ws.py                   # 1,000 tunnels, 1 GiB stream, 3 rounds: ~5 minutes
    python bench/ws.py --quick           # 200 tunnels, 256 MiB, 1 round: ~1 minute

Needs nginx and taskset (Debian: apt-get install -y nginx-light util-linux). Per target:
- echo: N WebSockets (aiohttp `ws_connect`) to an aiohttp echo backend, each sending a 32-byte
  text message as soon as the previous one came back: echoes/s, and the CPU the proxy (or
  nginx's one worker) spent per message relayed, from /proc/PID/stat (one echo = 2 messages);
- idle: the RSS of the proxy (or nginx worker) with the N tunnels open and idle, minus its RSS
  before they were opened, per tunnel (first round, on a fresh process, after a warm-up);
- stream: one tunnel carrying 1 GiB from the backend to the client as fast as they go: MiB/s
  and CPU µs per MiB. It is a raw, non-WebSocket upgrade (`Upgrade: x-bench-stream`): the
  proxy relays bytes and never parses frames, so raw bytes measure the relay and not the
  WebSocket framing cost of a Python client sharing the load core.
The proxy and nginx (one worker) are pinned to core 1; the backend and the load generator
(this file run with a hidden flag, in its own process) to core 0. Rounds are interleaved
(direct, proxy, nginx, direct, ...) and medians reported. Everything listens on 127.0.0.1
and every process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE, LOAD_CORE = "1", "0"
MESSAGE = "m" * 32  # the echo payload: a small text message
STREAM_PROTOCOL = "x-bench-stream"
STREAM_CHUNK = 256 * 1024  # bytes per write by the streaming backend
MiB = 1024 * 1024
TARGETS = ("direct", "proxy", "nginx")


def log(text: str) -> None:
    print(f"ws-bench: {text}", file=sys.stderr, flush=True)


# ---- the backend: an aiohttp WebSocket echo server and a raw-upgrade streamer (core 0) ----


def serve_backend(port: int) -> None:
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def stream(request: web.Request) -> web.StreamResponse:
        """101, then `bytes` bytes as fast as the peer reads them, then close."""
        if request.headers.get("Upgrade", "").lower() != STREAM_PROTOCOL:
            return web.Response(status=400, text=f"Upgrade: {STREAM_PROTOCOL} required\n")
        total = int(request.query["bytes"])
        response = web.StreamResponse(
            status=101, headers={"Upgrade": STREAM_PROTOCOL, "Connection": "upgrade"}
        )
        response.force_close()
        await response.prepare(request)
        chunk = bytes(STREAM_CHUNK)
        sent = 0
        while sent < total:
            size = min(STREAM_CHUNK, total - sent)
            await response.write(chunk if size == STREAM_CHUNK else chunk[:size])
            sent += size
        await response.write_eof()
        return response

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.add_routes([web.get("/echo", echo), web.get("/stream", stream), web.get("/", ready)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


# ---- the load generator: JSON commands on stdin, one JSON answer per line on stdout (core 0) ----


def stream_once(port: int, total: int, timeout: float) -> dict[str, Any]:
    """One raw upgrade; read `total` bytes (or until EOF or `timeout`)."""
    started = time.monotonic()
    deadline = started + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(15)
        sock.sendall(
            f"GET /stream?bytes={total} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Connection: Upgrade\r\nUpgrade: {STREAM_PROTOCOL}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data or len(head) > 65536:
                return {"bytes": 0, "seconds": 0.0, "error": f"no 101 head: {head[:200]!r}"}
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        if head.split(b" ", 2)[1:2] != [b"101"]:
            return {"bytes": 0, "seconds": 0.0, "error": f"not a 101: {head[:200]!r}"}
        received = len(rest)
        view = memoryview(bytearray(MiB))
        while received < total and time.monotonic() < deadline:
            count = sock.recv_into(view)
            if count == 0:
                break
            received += count
        seconds = time.monotonic() - started
    error = None if received == total else f"received {received} of {total} bytes"
    return {"bytes": received, "seconds": seconds, "error": error}


async def load_worker() -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15),
    )
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_(url: str, count: int) -> dict[str, Any]:
        gate = asyncio.Semaphore(50)  # handshakes in flight: under every listen backlog

        async def one() -> aiohttp.ClientWebSocketResponse:
            async with gate, asyncio.timeout(20):
                return await session.ws_connect(url, max_msg_size=0, autoping=True)

        started = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        opened = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        sockets.extend(opened)
        return {
            "opened": len(opened),
            "seconds": time.monotonic() - started,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }

    async def echo(seconds: float) -> dict[str, Any]:
        deadline = loop.time() + seconds

        async def talk(ws: aiohttp.ClientWebSocketResponse) -> int:
            count = 0
            async with asyncio.timeout(seconds + 15):
                while loop.time() < deadline:
                    await ws.send_str(MESSAGE)
                    message = await ws.receive()
                    if message.type != aiohttp.WSMsgType.TEXT or message.data != MESSAGE:
                        raise RuntimeError(f"unexpected echo {message.type!r}")
                    count += 1
            return count

        started = time.monotonic()
        results = await asyncio.gather(*(talk(ws) for ws in sockets), return_exceptions=True)
        elapsed = time.monotonic() - started
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        alive = [ws for ws, r in zip(sockets, results, strict=True) if isinstance(r, int)]
        for ws in sockets:
            if ws not in alive:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await ws.close()
        sockets[:] = alive
        return {
            "echoes": sum(r for r in results if isinstance(r, int)),
            "seconds": elapsed,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }

    async def close() -> dict[str, Any]:
        gate = asyncio.Semaphore(200)

        async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
            async with gate, asyncio.timeout(10):
                await ws.close()

        started = time.monotonic()
        results = await asyncio.gather(*(one(ws) for ws in sockets), return_exceptions=True)
        sockets.clear()
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"seconds": time.monotonic() - started, "errors": len(errors)}

    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:  # the parent went away
                break
            command = json.loads(line)
            op = command.pop("op")
            if op == "quit":
                break
            if op == "open":
                answer = await open_(**command)
            elif op == "echo":
                answer = await echo(**command)
            elif op == "close":
                answer = await close()
            elif op == "stream":
                answer = await asyncio.to_thread(stream_once, **command)
            else:
                answer = {"error": f"unknown op {op!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await close()
        await session.close()


# ---- the orchestrator ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            get(url, timeout=1)
            return
        time.sleep(0.05)
    raise SystemExit(f"ws-bench: {url} did not answer within {timeout:.0f} s")


def nginx_conf(root: Path, port: int, status_port: int, backend_port: int, buffer: str) -> str:
    # An upgraded connection is relayed through buffers of proxy_buffer_size (one page, 4 KiB,
    # unless --nginx-buffer says otherwise), one per direction.
    buffer_line = f"proxy_buffer_size {buffer}; proxy_buffers 4 {buffer};" if buffer else ""
    return f"""
worker_processes 1;
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/nginx-body;
    proxy_temp_path {root}/nginx-proxy;
    fastcgi_temp_path {root}/nginx-fcgi;
    uwsgi_temp_path {root}/nginx-uwsgi;
    scgi_temp_path {root}/nginx-scgi;
    upstream backend {{ server 127.0.0.1:{backend_port}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            {buffer_line}
        }}
    }}
    server {{
        listen 127.0.0.1:{status_port};
        location / {{ stub_status; }}
    }}
}}
"""


def proxy_config(port: int, admin_port: int, backend_port: int, tunnels: int) -> str:
    # As shipped (metrics and the JSON access log on), with room for every tunnel.
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstreams:
  backend:
    targets: [http://127.0.0.1:{backend_port}]
    tunnels: {{limit: {tunnels + 100}, idle_timeout: 600}}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: backend
"""


@dataclass
class Sample:
    echoes_per_s: float
    cpu_us_per_message: float | None
    rss_kib_per_tunnel: float | None
    stream_mib_s: float
    cpu_us_per_mib: float | None
    errors: int


@dataclass
class Bench:
    root: Path
    tunnels: int
    nginx_buffer: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # target -> port clients connect to
    pids: dict[str, list[int]] = field(default_factory=dict)  # target -> PIDs charged
    admin_port: int = 0
    nginx_status_port: int = 0
    proxy_rss_warm_kib: int = 0  # after the warm-up: what the proxy's RSS at the end compares to
    load: subprocess.Popen[bytes] | None = None
    _pending: bytes = b""

    def spawn(self, cmd: list[str], core: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["taskset", "-c", core, *cmd], **kwargs)
        self.procs.append(proc)  # taskset execs: proc.pid is the program's own PID
        return proc

    def start(self) -> None:
        backend_port = free_port()
        self.ports = {"direct": backend_port, "proxy": free_port(), "nginx": free_port()}
        self.admin_port, self.nginx_status_port = free_port(), free_port()
        self.spawn(
            [sys.executable, __file__, "--backend", str(backend_port)],
            LOAD_CORE,
            stderr=open(self.root / "backend.err", "wb"),  # noqa: SIM115 (closed at exit)
        )
        config = self.root / "proxy.yaml"
        config.write_text(
            proxy_config(self.ports["proxy"], self.admin_port, backend_port, self.tunnels)
        )
        proxy = self.spawn(
            [sys.executable, "-m", "proxy", "--config", str(config)],
            PROXY_CORE,
            cwd=REPO,
            stdout=open(self.root / "proxy.out", "wb"),  # noqa: SIM115 (the access log)
            stderr=open(self.root / "proxy.err", "wb"),  # noqa: SIM115
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        conf = self.root / "nginx.conf"
        conf.write_text(
            nginx_conf(
                self.root,
                self.ports["nginx"],
                self.nginx_status_port,
                backend_port,
                self.nginx_buffer,
            )
        )
        nginx_cmd = ["nginx", "-c", str(conf), "-p", str(self.root)]
        checked = subprocess.run(
            [*nginx_cmd, "-t", "-q"], capture_output=True, text=True, timeout=10, check=False
        )
        if checked.returncode:
            raise SystemExit(f"ws-bench: nginx rejects its config: {checked.stderr.strip()}")
        nginx = self.spawn(
            [*nginx_cmd, "-g", "daemon off;"],
            PROXY_CORE,
            stderr=subprocess.DEVNULL,
        )
        self.load = self.spawn(
            [sys.executable, __file__, "--load"],
            LOAD_CORE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        wait_http(f"http://127.0.0.1:{backend_port}/")
        wait_http(f"http://127.0.0.1:{self.admin_port}/readyz")
        wait_http(f"http://127.0.0.1:{self.nginx_status_port}/")
        workers = subprocess.run(
            ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True, timeout=5
        ).stdout.split()
        self.pids = {"direct": [], "proxy": [proxy.pid], "nginx": [int(p) for p in workers]}
        if len(self.pids["nginx"]) != 1:
            raise SystemExit(f"ws-bench: expected one nginx worker, found {workers}")

    def stop(self) -> None:
        if self.load is not None and self.load.poll() is None:
            with contextlib.suppress(OSError):
                assert self.load.stdin is not None
                self.load.stdin.write(b'{"op": "quit"}\n')
                self.load.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.load.wait(timeout=15)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def ask(self, within: float, **command: Any) -> dict[str, Any]:
        """Send one command to the load generator; its answer, within `within` seconds."""
        assert self.load is not None and self.load.stdin and self.load.stdout
        self.load.stdin.write(json.dumps(command).encode() + b"\n")
        self.load.stdin.flush()
        deadline = time.monotonic() + within
        fd = self.load.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or self.load.poll() is not None:
                raise SystemExit(f"ws-bench: the load generator did not answer {command}")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise SystemExit("ws-bench: the load generator exited")
                self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return dict(json.loads(line))

    def tunnels_open(self, target: str) -> int | None:
        """Tunnels the target holds now, by its own account (None for the backend)."""
        if target == "proxy":
            text = get(f"http://127.0.0.1:{self.admin_port}/metrics")
            match = re.search(r'^proxy_tunnels_open\{upstream="backend"\} (\S+)', text, re.M)
            return int(float(match.group(1))) if match else None
        if target == "nginx":  # client connections, the one asking for this status included
            text = get(f"http://127.0.0.1:{self.nginx_status_port}/")
            return int(text.split()[2]) - 1
        return None

    def wait_closed(self, target: str, timeout: float = 15) -> int | None:
        deadline = time.monotonic() + timeout
        while (left := self.tunnels_open(target)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def url(self, target: str) -> str:
        return f"ws://127.0.0.1:{self.ports[target]}/echo"

    def warm_up(self) -> None:
        for target in TARGETS:
            self.ask(30, op="open", url=self.url(target), count=10)
            self.ask(30, op="echo", seconds=1)
            self.ask(30, op="close")
            self.ask(60, op="stream", port=self.ports[target], total=16 * MiB, timeout=30)
            self.wait_closed(target)
        self.proxy_rss_warm_kib = rss_kib(self.pids["proxy"])

    def run(self, target: str, seconds: float, stream_bytes: int, label: str) -> Sample:
        pids = self.pids[target]
        errors = 0
        rss_before = rss_kib(pids)
        opened = self.ask(120, op="open", url=self.url(target), count=self.tunnels)
        errors += opened["errors"]
        if opened["errors"]:
            log(f"{label}: {opened['errors']} handshakes failed, first: {opened['first_error']}")
        time.sleep(1)  # let the last handshakes' garbage go
        held = self.tunnels_open(target)
        rss_per_tunnel = None
        if pids and opened["opened"]:
            rss_per_tunnel = (rss_kib(pids) - rss_before) / opened["opened"]
        log(
            f"{label}: {opened['opened']} tunnels open in {opened['seconds']:.1f} s"
            + (f" ({held} by its count)" if held is not None else "")
            + (f", RSS +{rss_per_tunnel:.1f} KiB each" if rss_per_tunnel is not None else "")
        )

        cpu_before = cpu_seconds(pids)
        echoed = self.ask(seconds + 60, op="echo", seconds=seconds)
        cpu = cpu_seconds(pids) - cpu_before
        errors += echoed["errors"]
        if echoed["errors"]:
            log(f"{label}: {echoed['errors']} echo sockets failed, first: {echoed['first_error']}")
        echoes_per_s = echoed["echoes"] / echoed["seconds"]
        cpu_per_message = cpu / (2 * echoed["echoes"]) * 1e6 if pids and echoed["echoes"] else None
        log(
            f"{label}: {echoes_per_s:,.0f} echoes/s"
            + (f", {cpu_per_message:.0f} CPU µs per message" if cpu_per_message else "")
        )
        closed = self.ask(60, op="close")
        errors += closed["errors"]
        left = self.wait_closed(target)
        if left:
            log(f"{label}: {left} tunnels still open 15 s after the clients closed them")
            errors += left

        cpu_before = cpu_seconds(pids)
        streamed = self.ask(
            600, op="stream", port=self.ports[target], total=stream_bytes, timeout=300
        )
        cpu = cpu_seconds(pids) - cpu_before
        if streamed["error"]:
            log(f"{label}: stream: {streamed['error']}")
            errors += 1
        mib = streamed["bytes"] / MiB
        mib_s = mib / streamed["seconds"] if streamed["seconds"] else 0.0
        cpu_per_mib = cpu / mib * 1e6 if pids and mib else None
        log(
            f"{label}: stream {mib:,.0f} MiB at {mib_s:,.0f} MiB/s"
            + (f", {cpu_per_mib:,.0f} CPU µs per MiB" if cpu_per_mib else "")
        )
        self.wait_closed(target)
        return Sample(echoes_per_s, cpu_per_message, rss_per_tunnel, mib_s, cpu_per_mib, errors)

    def proxy_report(self) -> list[str]:
        """What the proxy says about itself: errors on stderr, tunnels counted and logged."""
        notes = []
        err = (self.root / "proxy.err").read_text(errors="replace")
        bad = [line for line in err.splitlines() if re.search(r"Traceback|Error|error", line)]
        notes.append(f"proxy stderr: {len(err.splitlines())} lines, {len(bad)} mention errors")
        notes += [f"    {line[:200]}" for line in bad[:5]]
        statuses: dict[int, int] = {}
        for line in (self.root / "proxy.out").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                status = int(json.loads(line)["status"])
                statuses[status] = statuses.get(status, 0) + 1
        notes.append(f"proxy access log, lines by status: {dict(sorted(statuses.items()))}")
        metrics = get(f"http://127.0.0.1:{self.admin_port}/metrics")
        for line in metrics.splitlines():
            counted = line.startswith(("proxy_tunnels_total{", "proxy_tunnels_open{"))
            if counted and not line.rstrip().endswith(" 0.0"):
                notes.append(f"proxy metric: {line}")
        notes.append(
            f"proxy RSS: {self.proxy_rss_warm_kib / 1024:.0f} MiB after the warm-up, "
            f"{rss_kib(self.pids['proxy']) / 1024:.0f} MiB at the end (every tunnel closed)"
        )
        return notes


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report(samples: dict[str, list[Sample]], tunnels: int, stream_mib: int) -> str:
    rows = [
        f"| target | echoes/s ({tunnels} sockets) | CPU µs / message relayed "
        f"| RSS KiB / idle tunnel | {stream_mib:,} MiB stream MiB/s | CPU µs / MiB "
        "| stream vs nginx | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nginx_mib_s = median([s.stream_mib_s for s in samples["nginx"]])
    for target in TARGETS:
        runs = samples[target]
        mib_s = median([s.stream_mib_s for s in runs])
        vs = f"{mib_s / nginx_mib_s:.2f}" if mib_s and nginx_mib_s else "—"
        rows.append(
            f"| {target} | {fmt(median([s.echoes_per_s for s in runs]), ',.0f')} "
            f"| {fmt(median([s.cpu_us_per_message for s in runs]), '.0f')} "
            f"| {fmt(runs[0].rss_kib_per_tunnel, '.1f')} "
            f"| {fmt(mib_s, ',.0f')} | {fmt(median([s.cpu_us_per_mib for s in runs]), ',.0f')} "
            f"| {vs} | {sum(s.errors for s in runs)} |"
        )
    return "\n".join(rows)


def verdicts(samples: dict[str, list[Sample]]) -> list[str]:
    rss = samples["proxy"][0].rss_kib_per_tunnel
    proxy_mib_s = median([s.stream_mib_s for s in samples["proxy"]]) or 0.0
    nginx_mib_s = median([s.stream_mib_s for s in samples["nginx"]]) or 0.0
    proxy_cpu = median([s.cpu_us_per_mib for s in samples["proxy"]])
    nginx_cpu = median([s.cpu_us_per_mib for s in samples["nginx"]])
    lines = [
        f"- RSS per idle tunnel <= 16 KiB: proxy {fmt(rss, '.1f')} KiB — "
        + ("met" if rss is not None and rss <= 16 else "NOT met"),
    ]
    if nginx_mib_s:
        ratio = proxy_mib_s / nginx_mib_s
        lines.append(
            f"- stream throughput within 3x of nginx, each on one core: proxy "
            f"{proxy_mib_s:,.0f} MiB/s, nginx {nginx_mib_s:,.0f} MiB/s, proxy/nginx "
            f"{ratio:.2f} — " + ("met" if ratio >= 1 / 3 else "NOT met")
        )
    if proxy_cpu and nginx_cpu:
        ratio = nginx_cpu / proxy_cpu  # MiB per CPU-second, proxy over nginx
        lines.append(
            f"- the same per CPU-second used (MiB relayed per second of CPU): proxy "
            f"{1e6 / proxy_cpu:,.0f}, nginx {1e6 / nginx_cpu:,.0f}, proxy/nginx {ratio:.2f} — "
            + ("met" if ratio >= 1 / 3 else "NOT met")
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000, help="concurrent WebSockets")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB streamed through one tunnel")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of echo per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--quick", action="store_true", help="200 tunnels, 256 MiB, 4 s of echo, 1 round"
    )
    parser.add_argument(
        "--nginx-buffer",
        default="",
        metavar="SIZE",
        help="nginx's proxy_buffer_size, e.g. 64k (default: nginx's own, one page)",
    )
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)  # internal roles
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        serve_backend(args.backend)
        return 0
    if args.load:
        asyncio.run(load_worker())
        return 0
    if args.quick:
        args.tunnels, args.gib, args.seconds, args.rounds = 200, 0.25, 4.0, 1
    for tool in ("nginx", "taskset", "pgrep"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (Debian: apt-get install -y nginx-light util-linux)")
            return 2
    if (os.cpu_count() or 1) < 2:
        log("needs 2 cores (proxy on one, load on the other)")
        return 2

    command = "python bench/ws.py " + " ".join(sys.argv[1:])
    stream_bytes = int(args.gib * 1024 * MiB)
    samples: dict[str, list[Sample]] = {t: [] for t in TARGETS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxy-ws-bench-") as tmp:
        bench = Bench(Path(tmp), args.tunnels, args.nginx_buffer)
        try:
            bench.start()
            log("started the backend, the proxy, nginx and the load generator; warming up")
            bench.warm_up()
            total = args.rounds * len(TARGETS)
            for round_ in range(args.rounds):
                for i, target in enumerate(TARGETS):
                    label = f"[{round_ * len(TARGETS) + i + 1}/{total}] {target}"
                    samples[target].append(bench.run(target, args.seconds, stream_bytes, label))
            notes = bench.proxy_report()
        finally:
            bench.stop()
    elapsed = time.monotonic() - started

    print(
        f"\n`{command.strip()}` — {elapsed:.0f} s; {args.rounds} interleaved round(s), medians "
        f"(RSS: first round); proxy and nginx (1 worker) pinned to core {PROXY_CORE}, backend "
        f"and load generator to core {LOAD_CORE}. Echo: 32-byte text messages, one in flight "
        f"per socket, {args.seconds:.0f} s; a message relayed is one way (an echo is 2). "
        f"Stream: raw `Upgrade: {STREAM_PROTOCOL}`, the backend writes {STREAM_CHUNK // 1024} "
        "KiB at a time.\n"
    )
    print(report(samples, args.tunnels, stream_bytes // MiB))
    print("\nIssue 9 targets:")
    print("\n".join(verdicts(samples)))
    print("\nThe proxy's own account:")
    print("\n".join(f"- {n}" if not n.startswith("    ") else n for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
