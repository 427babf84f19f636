"""Soak: the real proxy under mixed load for minutes while backends are killed and the config is
reloaded; fails if a request that should have succeeded failed, or if the proxy's memory, file
descriptors or pool slots grow without bound.

    python bench/soak.py                 # 30 minutes: a line a minute, then Markdown tables
    python bench/soak.py --seconds 60    # CI: about 65 s end to end, a line every 10 s

What runs, all on 127.0.0.1 (free ports), each in a process of its own, stopped by PID at the end
(and killed with this script if it dies first, by PR_SET_PDEATHSIG):
- three aiohttp backends (this file with --backend): `pair-a` and `pair-b`, the two targets of
  upstream `pair` (round_robin, 3 attempts, health checks every 1 s, outlier ejection), and
  `solo`, the one target of upstream `solo` (health checks);
- `python -m proxy --config <tmp>/config.yaml`, routes /pair/ and /solo/ (prefix stripped).

The load: --clients asyncio tasks (default 40) in this process, about 100 requests/s in all.
Each picks at random, 70 % to `pair`, and pauses 0-0.2 s after every request: GET on a
keep-alive session; GET on a new connection; POST of 1 KiB-1 MiB (log-uniform), answered with
the body's SHA-256; an SSE-like stream of 8 events 0.25 s apart, read to its end; a 1-4 MiB
download read 64 KiB at a time with pauses (a slow reader, digest checked); and a client that
closes the connection mid-response. Every client call is bounded by a timeout (10-40 s), so the
run always ends.

Faults: every kill period (60 s; for runs under 5 minutes a quarter of the run, at least 15 s)
one backend in turn (pair-a, solo, pair-b) gets SIGKILL and is started again on its port 5 s
later. Every half period the proxy reloads its config, alternately by SIGHUP and POST /reload,
every other time with a change (both upstreams' pool.limit, which replaces both upstreams while
requests are in flight).

A failure is any request that did not complete and verify, except (counted apart, "excused"):
- requests to `solo` that overlap the time its only target was down (kill to restart + 1 s);
- POSTs, streams, slow downloads and aborts to `pair` that were in flight when one of its targets
  was killed (started before the kill + 0.5 s, ended after it): the proxy must not replay a body
  or a response already begun. GETs to `pair` are never excused: the proxy retries them.
Also failures: a reload not applied (POST /reload not 200, or SIGHUP not counted in
proxy_config_reloads_total within 5 s), an admin endpoint that does not answer 200, a proxy that
dies, or one that does not exit 0 on SIGTERM at the end.

Growth. Samples every 5 s (2 s for runs under 5 minutes): the proxy's VmRSS, open fds
(/proc/PID/fd), pool slots (/pools: active + idle, and in_flight, summed over upstreams) and
proxy_client_connections. The first 10 s (or 10 % of the run) are warm-up; the rest is cut in
thirds. The run fails when
- RSS: the median of the last third is more than 25 % and more than 20 MiB above the median of
  the first third (a leak grows steadily; noise and allocator high-water marks do not);
- fds or pool slots: the lowest sample of the last third is above the highest of the first third
  by more than max(8, 20 %) (every late sample above every early one is growth, not load noise);
- a sample exceeds what the config allows: pool slots above the sum of pool limits, requests in
  flight above 2 x clients, fds above start-up + clients + 2 x pool limits (an upstream being
  replaced holds its own) + 32;
- at rest (load stopped, client sessions closed; waited for up to 15 s) requests in flight,
  active pool connections or client connections are not 0, or fds exceed start-up + idle pooled
  connections + 16 (then the proxy's sockets are listed by peer).
The proxy exposes no count of its asyncio tasks, so none is reported: requests in flight and
client connections at rest stand in for tasks that never end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
BLOCK = bytes(range(256)) * 256  # 64 KiB; every download is this block repeated, then cut
EVENTS, EVENT_INTERVAL = 8, 0.25
DOWN_FOR = 5.0  # s a killed backend stays down
RECOVERY = 1.0  # s after the sole target is back during which failures are still excused
IN_FLIGHT_AT_KILL = 0.5  # s: a request started this soon after a kill was in flight at it
POOL_LIMITS = ((64, 40), (56, 32))  # (pair, solo) pool.limit of the two configs reloaded
CLIENT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError)

# kind -> (label, weight in the mix, timeout s, may fail when its target dies in flight)
KINDS: dict[str, tuple[str, int, float, bool]] = {
    "keepalive": ("GET, keep-alive", 40, 10, False),
    "newconn": ("GET, new connection", 15, 10, False),
    "upload": ("POST 1 KiB-1 MiB, digest checked", 15, 30, True),
    "stream": (f"SSE stream, {EVENTS} events read to the end", 10, 20, True),
    "slowread": ("slow reader, 1-4 MiB", 10, 40, True),
    "abort": ("client closes mid-response", 10, 10, True),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the backend: `python bench/soak.py --backend PORT NAME`, one process per target ---


def serve_backend(port: int, name: str) -> None:
    from aiohttp import web

    async def small(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {name}\n")

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.Response(text=f"{digest.hexdigest()} {size}\n")

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client went away
            for i in range(int(request.query.get("n", EVENTS))):
                await response.write(f"id: {i}\ndata: tick {i} from {name}\n\n".encode())
                await asyncio.sleep(EVENT_INTERVAL)
            await response.write(b"event: end\ndata: done\n\n")
            await response.write_eof()
        return response

    async def large(request: web.Request) -> web.StreamResponse:
        left = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = left
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while left:
                chunk = BLOCK[: min(left, len(BLOCK))]
                await response.write(chunk)
                left -= len(chunk)
            await response.write_eof()
        return response

    app = web.Application(client_max_size=4 * 1024**2)
    for path, handler in (("/healthz", small), ("/small", small), ("/events", events)):
        app.router.add_get(path, handler)
    app.router.add_get("/large", large)
    app.router.add_post("/upload", upload)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, reuse_address=True)


# --- processes ---

_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child: SIGKILL it if this script dies without running its `finally` (kill -9)."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the proxy's access log
            stderr=stderr,
            preexec_fn=_die_with_parent,
        )


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL) -> int:
    """Send `sig` to `proc` by PID and reap it (SIGKILL after 15 s); its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_until(check: Callable[[], bool], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise SystemExit(f"soak: {what} within {within:.0f} s")


@dataclass
class Backend:
    name: str
    upstream: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, __file__, "--backend", str(self.port), self.name]
        self.proc = spawn(cmd, self.log)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"soak: backend {self.name} exited {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def kill(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def proxy_yaml(port: int, admin: int, backends: dict[str, Backend], variant: int) -> str:
    pair_limit, solo_limit = POOL_LIMITS[variant]
    url = {name: f"http://127.0.0.1:{b.port}" for name, b in backends.items()}
    checks = "{interval: 1, timeout: 1, healthy_threshold: 2, unhealthy_threshold: 2}"
    return f"""# written by bench/soak.py (variant {variant})
listen: {{host: 127.0.0.1, port: {port}, keepalive_timeout: 75}}
admin: {{host: 127.0.0.1, port: {admin}}}
shutdown: {{grace: 10}}
upstreams:
  pair:
    targets: [{url["pair-a"]}, {url["pair-b"]}]
    retries: {{attempts: 3, budget: 0.5}}
    health_check: {checks}
    outlier: {{consecutive_failures: 3, ejection_time: 5}}
    pool: {{limit: {pair_limit}, keepalive_timeout: 30}}
    timeouts: {{connect: 2, read: 10}}
  solo:
    targets: [{url["solo"]}]
    health_check: {checks}
    pool: {{limit: {solo_limit}, keepalive_timeout: 30}}
    timeouts: {{connect: 2, read: 10}}
routes:
  - {{name: pair, match: {{path_prefix: /pair/}}, upstream: pair, strip_prefix: true}}
  - {{name: solo, match: {{path_prefix: /solo/}}, upstream: solo, strip_prefix: true}}
"""


# --- the load ---


class Failed(Exception):
    """A response that arrived but is not what the backend sent."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


@functools.lru_cache(maxsize=8)
def download_digest(size: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, len(BLOCK)):
        digest.update(BLOCK[: min(len(BLOCK), size - start)])
    return digest.hexdigest()


@dataclass
class Clients:
    base: str
    keepalive: aiohttp.ClientSession
    fresh: aiohttp.ClientSession  # a new connection for every request
    payload: bytes  # random bytes that uploads are cut from

    async def run(self, kind: str, up: str, rng: random.Random) -> None:
        url = f"{self.base}/{up}"
        either = self.keepalive if rng.random() < 0.6 else self.fresh
        if kind in ("keepalive", "newconn"):
            session = self.keepalive if kind == "keepalive" else self.fresh
            async with session.get(f"{url}/small") as response:
                body = await response.read()
                expect(response.status == 200 and body.startswith(b"ok "), f"{response.status}")
        elif kind == "upload":
            size = int(2 ** rng.uniform(10, 20))
            start = rng.randrange(len(self.payload) - size)
            body = self.payload[start : start + size]
            async with either.post(f"{url}/upload", data=body) as response:
                reply = (await response.read()).decode(errors="replace").split()
                want = [hashlib.sha256(body).hexdigest(), str(size)]
                expect(response.status == 200 and reply == want, f"{response.status} {reply}")
        elif kind == "stream":
            async with self.keepalive.get(f"{url}/events") as response:
                expect(response.status == 200, f"{response.status}")
                ticks, ended = 0, False
                async for line in response.content:
                    ticks += line.startswith(b"data: tick ")
                    ended = ended or line == b"event: end\n"
                expect(ticks == EVENTS and ended, f"{ticks} events, end seen: {ended}")
        elif kind == "slowread":
            size = rng.choice((1, 2, 3, 4)) * 1024**2
            async with self.keepalive.get(f"{url}/large?size={size}") as response:
                expect(response.status == 200, f"{response.status}")
                digest, left = hashlib.sha256(), size
                while left:
                    chunk = await response.content.readexactly(min(left, len(BLOCK)))
                    digest.update(chunk)
                    left -= len(chunk)
                    await asyncio.sleep(0.05)  # about 1.3 MiB/s
                expect(await response.content.read() == b"", "more than Content-Length")
                expect(digest.hexdigest() == download_digest(size), "digest differs")
        else:  # abort: take the first bytes, then close the connection mid-body
            path = "events?n=40" if rng.random() < 0.5 else f"large?size={8 * 1024**2}"
            async with either.get(f"{url}/{path}") as response:
                expect(response.status == 200, f"{response.status}")
                expect(len(await response.content.read(4096)) > 0, "no body before the abort")
                response.close()


@dataclass
class Down:
    """A backend killed at `start` (s into the run), back (plus RECOVERY) at `end`."""

    upstream: str
    start: float
    end: float = math.inf


@dataclass
class Tally:
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {k: Counter() for k in KINDS})
    downs: list[Down] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reloads: Counter[str] = field(default_factory=Counter)
    kills: int = 0

    def record(self, kind: str, up: str, start: float, end: float, error: str | None) -> None:
        if error is None:
            self.counts[kind]["ok"] += 1
        elif excuse := self.excused(kind, up, start, end):
            self.counts[kind][excuse] += 1
        else:
            self.counts[kind]["failed"] += 1
            self.failures.append(f"{start:6.1f}-{end:.1f} s  {kind} /{up}/: {error}")

    def excused(self, kind: str, up: str, start: float, end: float) -> str | None:
        """Why this failure is not counted: "solo down", "killed in flight", or None."""
        for down in self.downs:
            if down.upstream != up:
                continue
            if up == "solo" and start < down.end and end > down.start:
                return "solo down"  # its only target was down
            in_flight = start < down.start + IN_FLIGHT_AT_KILL and end >= down.start
            if in_flight and KINDS[kind][3]:
                return "killed in flight"  # not replayable, on a target that died
        return None


async def client(i: int, clients: Clients, tally: Tally, t0: float, until: float) -> None:
    rng = random.Random(i)
    kinds, weights = list(KINDS), [spec[1] for spec in KINDS.values()]
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        up = "pair" if rng.random() < 0.7 else "solo"
        start, error = time.monotonic(), None
        try:
            async with asyncio.timeout(KINDS[kind][2]):
                await clients.run(kind, up, rng)
        except Failed as exc:
            error = str(exc)
        except CLIENT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
        tally.record(kind, up, start - t0, time.monotonic() - t0, error)
        await asyncio.sleep(rng.uniform(0, 0.2))


# --- watching the proxy ---


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    active: int
    idle: int
    in_flight: int
    clients: int

    @property
    def slots(self) -> int:
        return self.active + self.idle


class AdminError(Exception):
    """An admin endpoint did not answer 200."""


def rss_and_fds(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
    assert rss_kib is not None
    return int(rss_kib.group(1)) / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def sockets(pid: int, peers: dict[int, str], listeners: dict[int, str]) -> str:
    """What the process's fds are: TCP sockets by state and peer (a backend, a client of one of
    its listeners), other fds by kind; for a report of fds that stay open."""
    inodes, found = set(), Counter[str]()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
            else:
                found[re.sub(r":\[\d+\]$", "", link)] += 1  # pipe, anon_inode:[eventpoll], ...
    states = {"01": "established", "08": "close-wait", "0A": "listening"}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            inodes.discard(fields[9])
            local, peer = (int(address.split(":")[1], 16) for address in fields[1:3])
            state = states.get(fields[3], f"state {fields[3]}")
            if local not in listeners:
                found[f"{state} to {peers.get(peer, peer)}"] += 1
            elif state == "listening":
                found[f"listening {listeners[local]}"] += 1
            else:
                found[f"{state} client of {listeners[local]}"] += 1
    if inodes:
        found["other sockets"] = len(inodes)
    return ", ".join(f"{n} {what}" for what, n in found.most_common())


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class Proxy:
    def __init__(self, root: Path, backends: dict[str, Backend]) -> None:
        self.root, self.backends = root, backends
        self.port, self.admin_port = free_port(), free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.config, self.log = root / "config.yaml", root / "proxy.log"
        self.variant = 0
        self.write_config()
        self.proc = spawn([sys.executable, "-m", "proxy", "--config", str(self.config)], self.log)

    def write_config(self) -> None:
        text = proxy_yaml(self.port, self.admin_port, self.backends, self.variant)
        (self.root / "config.new").write_text(text)
        os.replace(self.root / "config.new", self.config)  # a reload never reads half a file

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"soak: the proxy exited {self.proc.returncode}:\n{self.errors()}")
        with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as response:
            return bool(response.status == 200)

    def errors(self, most: int = 60) -> str:
        """The last `most` lines of the proxy log's ERROR records and tracebacks."""
        keep, inside = [], False
        for line in self.log.read_text(errors="replace").splitlines():
            if re.match(r"\d{4}-\d\d-\d\d ", line):  # a new log record
                inside = " ERROR " in line or " CRITICAL " in line
            inside = inside or line.startswith("Traceback")
            if inside:
                keep.append(line if len(line) <= 240 else line[:240] + "...")
        return "\n".join(keep[-most:])

    async def get(self, admin: aiohttp.ClientSession, path: str) -> str:
        try:
            async with asyncio.timeout(10), admin.get(self.admin_url + path) as response:
                text = await response.text()
        except CLIENT_ERRORS as exc:
            raise AdminError(f"GET {path}: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            raise AdminError(f"GET {path}: {response.status} {text.strip()[:120]!r}")
        return text

    async def sample(self, admin: aiohttp.ClientSession, t: float) -> Sample:
        if self.proc.poll() is not None:
            raise SystemExit(
                f"soak: FAIL: the proxy died (exit {self.proc.returncode}):\n{self.errors()}"
            )
        rss, fds = rss_and_fds(self.proc.pid)
        pools = json.loads(await self.get(admin, "/pools"))["upstreams"].values()
        clients = metric(await self.get(admin, "/metrics"), "proxy_client_connections")
        return Sample(
            t,
            rss,
            fds,
            sum(p["active"] for p in pools),
            sum(p["idle"] for p in pools),
            sum(p["in_flight"] for p in pools),
            int(clients),
        )

    async def reload(self, admin: aiohttp.ClientSession, by_signal: bool) -> str | None:
        """Reload: None when it was applied, else why not."""
        if not by_signal:
            async with (
                asyncio.timeout(10),
                admin.post(self.admin_url + "/reload", headers={"X-Proxy-Reload": "1"}) as response,
            ):
                body = await response.text()
            return None if response.status == 200 else f"POST /reload: {response.status} {body}"
        name = 'proxy_config_reloads_total{result="success"}'
        before = metric(await self.get(admin, "/metrics"), name)
        os.kill(self.proc.pid, signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if metric(await self.get(admin, "/metrics"), name) > before:
                return None
        return f"SIGHUP: {name} did not grow within 5 s"


# --- the run ---


@dataclass
class Plan:
    seconds: float
    clients: int
    kill_every: float
    sample_every: float
    report_every: float
    warmup: float

    @classmethod
    def for_run(cls, seconds: float, clients: int) -> Plan:
        return cls(
            seconds=seconds,
            clients=clients,
            kill_every=60.0 if seconds >= 300 else max(15.0, seconds / 4),
            sample_every=5.0 if seconds >= 300 else 2.0,
            report_every=60.0 if seconds >= 120 else 10.0,
            warmup=max(10.0, seconds / 10),
        )


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def kill_backends(plan: Plan, backends: dict[str, Backend], tally: Tally, t0: float) -> None:
    order = ("pair-a", "solo", "pair-b")
    k = 1
    while (at := t0 + plan.kill_every * k) + DOWN_FOR + 5 < t0 + plan.seconds:
        await sleep_until(at)
        backend = backends[order[(k - 1) % len(order)]]
        down = Down(backend.upstream, time.monotonic() - t0)
        tally.downs.append(down)  # before the kill: a request failing at once is excused
        backend.kill()
        tally.kills += 1
        await asyncio.sleep(DOWN_FOR)
        backend.start()
        for _ in range(200):
            with contextlib.suppress(OSError):
                if backend.ready():
                    break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit(f"soak: backend {backend.name} did not come back within 10 s")
        down.end = time.monotonic() - t0 + RECOVERY
        k += 1


async def reload_proxy(
    plan: Plan, proxy: Proxy, admin: aiohttp.ClientSession, tally: Tally, t0: float
) -> None:
    j = 0
    while (at := t0 + plan.kill_every / 2 * (j + 0.5)) < t0 + plan.seconds - 2:
        await sleep_until(at)
        if j % 4 in (0, 3):  # a change every other reload, by SIGHUP and by POST in turn
            proxy.variant ^= 1
            proxy.write_config()
        try:
            error = await proxy.reload(admin, by_signal=j % 2 == 0)
        except (*CLIENT_ERRORS, AdminError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        tally.reloads["failed" if error else "ok"] += 1
        if error:
            tally.failures.append(f"{at - t0:6.1f} s  reload: {error}")
        j += 1


def progress(label: str, tally: Tally, s: Sample) -> str:
    kinds = " ".join(f"{k} {c['ok']}/{c['failed']}" for k, c in tally.counts.items())
    down = sum(c["solo down"] + c["killed in flight"] for c in tally.counts.values())
    return (
        f"soak {label} | ok/failed {kinds} | excused {down} | kills {tally.kills}, reloads "
        f"{tally.reloads['ok']}/{tally.reloads['failed']} | RSS {s.rss_mib:.1f} MiB, fds {s.fds}"
        f", pool active/idle/in flight {s.active}/{s.idle}/{s.in_flight}, clients {s.clients}"
    )


@dataclass
class Run:
    tally: Tally
    samples: list[Sample]
    start: Sample  # before the load
    rest: Sample  # after it
    rest_fds: str = ""  # what the fds at rest are


async def soak(plan: Plan, proxy: Proxy, backends: dict[str, Backend]) -> Run:
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=15)
    async with contextlib.AsyncExitStack() as stack:
        admin = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        run = Run(tally, [], await proxy.sample(admin, 0.0), await proxy.sample(admin, 0.0))
        sessions = (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False),
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=timeout,
                auto_decompress=False,
            ),
        )
        clients = Clients(f"http://127.0.0.1:{proxy.port}", *sessions, os.urandom(2 * 1024**2))
        t0 = time.monotonic()
        faults = [
            asyncio.create_task(kill_backends(plan, backends, tally, t0)),
            asyncio.create_task(reload_proxy(plan, proxy, admin, tally, t0)),
        ]
        load = [
            asyncio.create_task(client(i, clients, tally, t0, t0 + plan.seconds))
            for i in range(plan.clients)
        ]
        try:
            next_report = plan.report_every
            while (t := time.monotonic() - t0) < plan.seconds:
                await asyncio.sleep(min(plan.sample_every, plan.seconds - t))
                for task in faults:
                    if task.done() and task.exception():
                        await task  # raises what went wrong
                t = time.monotonic() - t0
                try:
                    run.samples.append(await proxy.sample(admin, t))
                except AdminError as exc:
                    tally.failures.append(f"{t:6.1f} s  admin: {exc}")
                    continue
                if t >= next_report - 0.5 or t >= plan.seconds:
                    print(progress(f"{t:5.0f} s", tally, run.samples[-1]), file=sys.stderr)
                    next_report += plan.report_every
            await asyncio.gather(*load, *faults)  # each client call is bounded: this ends
        finally:
            for task in (*faults, *load):
                task.cancel()
            for session in sessions:
                await session.close()
        rest_by = time.monotonic() + 15
        while True:
            with contextlib.suppress(AdminError):
                run.rest = await proxy.sample(admin, time.monotonic() - t0)
                if at_rest(run.start, run.rest) or time.monotonic() > rest_by:
                    break
            await asyncio.sleep(0.5)
        peers = {b.port: b.name for b in backends.values()}
        listeners = {proxy.port: "proxy", proxy.admin_port: "admin"}
        run.rest_fds = sockets(proxy.proc.pid, peers, listeners)
    return run


# --- the verdict ---


def at_rest(start: Sample, rest: Sample) -> bool:
    """Back where it started but for idle pooled connections (and a little slack)."""
    idle_only = rest.in_flight == rest.active == rest.clients == 0
    return idle_only and rest.fds <= start.fds + rest.idle + 16


def judge(plan: Plan, run: Run) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """(what grew without bound, {measure: (median of the first third, of the last third)})."""
    problems: list[str] = []
    thirds: dict[str, tuple[float, float]] = {}
    judged = [s for s in run.samples if s.t >= plan.warmup]
    slots_ceiling = max(sum(limits) for limits in POOL_LIMITS)
    fds_ceiling = run.start.fds + plan.clients + 2 * slots_ceiling + 32
    ceilings: list[tuple[str, Callable[[Sample], float], float]] = [
        ("pool slots", lambda s: s.slots, slots_ceiling),
        ("requests in flight", lambda s: s.in_flight, 2 * plan.clients),
        ("fds", lambda s: s.fds, fds_ceiling),
    ]
    for name, value, ceiling in ceilings:
        if over := [s for s in judged if value(s) > ceiling]:
            problems.append(
                f"{name} above {ceiling:.0f} in {len(over)} samples, from {over[0].t:.0f} s "
                f"(max {max(map(value, over)):.0f})"
            )
    if len(judged) < 6:
        problems.append(f"only {len(judged)} samples after warm-up: run longer to judge growth")
        return problems, thirds
    n = len(judged) // 3
    first, last = judged[:n], judged[-n:]
    measures: dict[str, Callable[[Sample], float]] = {
        "RSS": lambda s: s.rss_mib,
        "fds": lambda s: s.fds,
        "pool slots": lambda s: s.slots,
    }
    for name, value in measures.items():
        thirds[name] = (statistics.median(map(value, first)), statistics.median(map(value, last)))
    rss0, rss1 = thirds["RSS"]
    if rss1 > 1.25 * rss0 and rss1 - rss0 > 20:
        problems.append(f"RSS grew from {rss0:.1f} to {rss1:.1f} MiB (medians, first/last third)")
    for name in ("fds", "pool slots"):
        early, late = max(map(measures[name], first)), min(map(measures[name], last))
        if late > early + max(8, 0.2 * early):
            problems.append(f"{name} grew: last third >= {late:.0f}, first third <= {early:.0f}")
    rest = run.rest
    if not at_rest(run.start, rest):
        problems.append(
            f"at rest: {rest.in_flight} requests in flight, {rest.active} active pool connections"
            f", {rest.clients} client connections (want 0 each); {rest.fds} fds (want <= "
            f"{run.start.fds} at start + {rest.idle} idle pooled + 16): {run.rest_fds}"
        )
    return problems, thirds


def summary(run: Run, thirds: dict[str, tuple[float, float]]) -> str:
    lines = [
        "| load | ok | failed | excused: solo down | excused: pair target killed in flight |",
        "|---|---|---|---|---|",
    ]
    total = Counter[str]()
    for kind, (label, *_) in KINDS.items():
        c = run.tally.counts[kind]
        total += c
        excused = f"{c['solo down']} | {c['killed in flight']}"
        lines.append(f"| {label} | {c['ok']:,} | {c['failed']} | {excused} |")
    reloads = run.tally.reloads
    lines += [
        f"| **all requests** | **{total['ok']:,}** | **{total['failed']}** | "
        f"{total['solo down']} | {total['killed in flight']} |",
        f"| config reloads (SIGHUP, POST /reload) | {reloads['ok']} | {reloads['failed']} | | |",
        "",
        "| proxy | start | first third, median | last third, median | max | at rest |",
        "|---|---|---|---|---|---|",
    ]
    rows: list[tuple[str, str, Callable[[Sample], float]]] = [
        ("RSS, MiB", "RSS", lambda s: s.rss_mib),
        ("open fds", "fds", lambda s: s.fds),
        ("pool slots (active + idle)", "pool slots", lambda s: s.slots),
        ("requests in flight", "", lambda s: s.in_flight),
        ("client connections", "", lambda s: s.clients),
    ]
    for label, key, value in rows:
        cells = [value(run.start), *thirds.get(key, (math.nan, math.nan))]
        cells += [max(map(value, run.samples), default=math.nan), value(run.rest)]
        digits = 1 if key == "RSS" else 0
        shown = ["—" if math.isnan(v) else f"{v:.{digits}f}" for v in cells]
        lines.append(f"| {label} | {' | '.join(shown)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=30.0, help="load for N minutes (30)")
    length.add_argument("--seconds", type=float, help="load for N seconds instead (CI: 60)")
    parser.add_argument("--clients", type=int, default=40, help="concurrent clients (40)")
    parser.add_argument("--backend", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        serve_backend(int(args.backend[0]), args.backend[1])
        return 0
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    plan = Plan.for_run(seconds, args.clients)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxy-soak-") as tmp:
        root = Path(tmp)
        backends = {
            name: Backend(name, upstream, free_port(), root / f"{name}.log")
            for name, upstream in (("pair-a", "pair"), ("pair-b", "pair"), ("solo", "solo"))
        }
        proxy: Proxy | None = None
        try:
            for backend in backends.values():
                backend.start()
            proxy = Proxy(root, backends)
            for backend in backends.values():
                wait_until(backend.ready, f"backend {backend.name} did not listen")
            wait_until(proxy.ready, "the proxy did not become ready")
            print(
                f"soak: {plan.seconds:.0f} s, {plan.clients} clients, proxy pid {proxy.proc.pid};"
                f" a backend killed every {plan.kill_every:.0f} s, a reload every "
                f"{plan.kill_every / 2:.1f} s; ready after {time.monotonic() - began:.1f} s",
                file=sys.stderr,
            )
            run = asyncio.run(soak(plan, proxy, backends))
            if (code := stop(proxy.proc, signal.SIGTERM)) != 0:
                run.tally.failures.append(f"the proxy exited {code} on SIGTERM, not 0")
            errors = proxy.errors()
        finally:
            if proxy is not None:
                stop(proxy.proc)
            for backend in backends.values():
                backend.kill()
    problems, thirds = judge(plan, run)
    tally = run.tally
    print(progress("at rest", tally, run.rest), file=sys.stderr)
    print(
        f"\n{plan.seconds:.0f} s, {plan.clients} clients, {tally.kills} backend kills (SIGKILL, "
        f"{DOWN_FOR:.0f} s down), {sum(tally.reloads.values())} reloads; "
        f"{time.monotonic() - began:.0f} s end to end\n"
    )
    print(summary(run, thirds))
    if not tally.failures and not problems:
        print("\nsoak: PASS: every request that should have succeeded did; no unbounded growth")
        return 0
    print(f"\nsoak: FAIL: {len(tally.failures)} failures, {len(problems)} growth problems")
    for line in [*tally.failures[:20], *problems]:
        print(f"  {line}")
    if len(tally.failures) > 20:
        print(f"  ... and {len(tally.failures) - 20} more failures")
    if errors:
        print(f"\nthe proxy logged:\n{errors}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
