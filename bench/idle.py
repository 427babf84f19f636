"""Memory per idle client connection: this proxy and nginx as a reverse proxy, in one run.

    python bench/idle.py                      # 10,000 idle keep-alive connections to each
    python bench/idle.py -n 2000 --targets proxy
    python bench/idle.py --no-request         # connected, no request sent yet

For each target in turn: start it (the proxy as `python -m proxy --config <tmp>` with
listen.limits.max_connections 20000; nginx with `worker_processes 1`, `worker_connections 20000`,
keepalive_timeout 300), send one request on one connection and close it (warm-up: first-request
allocations are not per-connection memory), wait for RSS to settle and read it (VmRSS from
/proc/PID/status; for nginx master + worker), then open N TCP connections from this process
(asyncio, raw sockets), send ONE complete keep-alive request on each and read its response, so
every connection is an idle keep-alive connection (with --no-request: connected, nothing sent),
wait until the target holds all N (its open descriptors) and its RSS settles, and read RSS again.
Prints a Markdown table: RSS before and after (MiB) and the difference per connection (KiB).

The request is `GET /idle`, which neither target forwards: the proxy answers 404 (no route
matches; its one upstream, a port nobody listens on, is never reached) and nginx `return 404`
(its proxy_pass location goes to the same dead port, unused). Keep-alive and header timeouts are
far above the measurement time on both. RLIMIT_NOFILE is raised (the hard limit too, as root)
for this process and the targets, which inherit it. Everything listens on 127.0.0.1 (free
ports); each target is stopped by PID when measured (and dies with this script: PR_SET_PDEATHSIG).
Every wait is bounded (--timeout per target), so the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUEST = b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n"
_LIBC = ctypes.CDLL(None, use_errno=True)
_LONG = 3600  # s: keep-alive and header timeouts, far above any run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to at least `wanted` (soft and, as root, hard); return the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            hard = min(wanted, nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [self.proc.pid, *(int(c) for c in children.split())]

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())

    def fds(self) -> int:
        return sum(fd_count(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.name == "proxy" else signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn(cmd: list[str], root: Path, name: str) -> subprocess.Popen[bytes]:
    with open(root / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the proxy's access log
            stderr=log,
            preexec_fn=_die_with_parent,
        )


def start_proxy(root: Path, dead: int) -> Target:
    port, admin = free_port(), free_port()
    config = root / "proxy.yaml"
    config.write_text(
        f"listen:\n"
        f"  host: 127.0.0.1\n  port: {port}\n  keepalive_timeout: {_LONG}\n"
        f"  timeouts: {{header: {_LONG}}}\n"
        f"  limits: {{max_connections: 20000}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"upstreams: {{never: {{targets: ['http://127.0.0.1:{dead}']}}}}\n"
        "routes: [{match: {path_prefix: /never/}, upstream: never}]\n"
    )
    cmd = [sys.executable, "-m", "proxy", "--config", str(config)]
    return Target("proxy", spawn(cmd, root, "proxy"), port)


def start_nginx(root: Path, dead: int) -> Target:
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 30000;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {root}/nginx-body;
    proxy_temp_path {root}/nginx-proxy;
    fastcgi_temp_path {root}/nginx-fcgi;
    uwsgi_temp_path {root}/nginx-uwsgi;
    scgi_temp_path {root}/nginx-scgi;
    keepalive_timeout 300;
    client_header_timeout 300;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /never/ {{ proxy_pass http://127.0.0.1:{dead}; }}
        location / {{ return 404; }}
    }}
}}
""")
    cmd = ["nginx", "-c", str(conf), "-p", str(root), "-g", "daemon off;"]
    return Target("nginx", spawn(cmd, root, "nginx"), port)


async def wait_listening(target: Target, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        if target.proc.poll() is not None:
            raise SystemExit(f"bench: {target.name} exited ({target.proc.returncode}); see log")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", target.port)
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"bench: {target.name} is not listening after {within} s"
                ) from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


async def one_request(port: int, send: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4096)
    if send:
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"connection" and b"close" in value.lower():
                raise RuntimeError("the target closed a keep-alive connection")
        await reader.readexactly(length)
    return reader, writer


async def settle(target: Target, fds_wanted: int, within: float) -> int:
    """RSS (KiB) once the target holds `fds_wanted` descriptors and RSS stops moving."""
    deadline = time.monotonic() + within
    while target.fds() < fds_wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {target.name} holds {target.fds()} fds, not {fds_wanted}")
        await asyncio.sleep(0.2)
    samples = [target.rss()]
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        samples.append(target.rss())
        last = samples[-4:]
        if len(last) == 4 and max(last) - min(last) <= 64:  # KiB: four samples alike
            break
    return samples[-1]


@dataclass
class Result:
    name: str
    connections: int
    before_kib: int
    after_kib: int


async def measure(target: Target, n: int, send: bool, within: float, parallel: int) -> Result:
    async with asyncio.timeout(within):
        await wait_listening(target, 30)
        _, warm = await one_request(target.port, True)
        warm.close()
        await asyncio.sleep(1.0)
        fds_before = target.fds()
        before = await settle(target, 0, 10)
        gate = asyncio.Semaphore(parallel)

        async def connect() -> asyncio.StreamWriter:
            async with gate:
                return (await one_request(target.port, send))[1]

        writers = await asyncio.gather(*(connect() for _ in range(n)))
        try:
            after = await settle(target, fds_before + n, within)
            if target.proc.poll() is not None:
                raise SystemExit(f"bench: {target.name} died while measured")
        finally:
            for writer in writers:
                writer.transport.abort()
    return Result(target.name, n, before, after)


def table(results: list[Result], send: bool) -> str:
    kind = "idle keep-alive (one request each)" if send else "connected, no request yet"
    lines = [
        f"Connections: {kind}.",
        "",
        "| target | connections | RSS before (MiB) | after (MiB) | per connection (KiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        per = (r.after_kib - r.before_kib) / r.connections
        lines.append(
            f"| {r.name} | {r.connections:,} | {r.before_kib / 1024:.1f} "
            f"| {r.after_kib / 1024:.1f} | {per:.2f} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    parser.add_argument("--no-request", action="store_true", help="connect only; send nothing")
    parser.add_argument("--targets", default="proxy,nginx", help="comma-separated: proxy, nginx")
    parser.add_argument("--timeout", type=float, default=180.0, help="s per target, at most")
    parser.add_argument("--parallel", type=int, default=256, help="connections opened at once")
    args = parser.parse_args()
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(names) - {"proxy", "nginx"}
    if unknown:
        raise SystemExit(f"bench: unknown targets {sorted(unknown)}")
    if "nginx" in names and shutil.which("nginx") is None:
        raise SystemExit("bench: nginx is not installed (Debian: apt-get install -y nginx-light)")
    if args.connections > 19_000:
        raise SystemExit("bench: at most 19,000 connections (max_connections 20000 on both)")
    limit = raise_fd_limit(args.connections + 1024)
    if limit < args.connections + 256:
        raise SystemExit(f"bench: RLIMIT_NOFILE is {limit}; {args.connections + 256} needed")
    dead = free_port()  # nobody listens there: the upstream both targets never reach
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        root = Path(tmp)
        for name in names:
            target = (start_proxy if name == "proxy" else start_nginx)(root, dead)
            try:
                results.append(
                    await measure(
                        target, args.connections, not args.no_request, args.timeout, args.parallel
                    )
                )
            finally:
                target.stop()
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(results, not args.no_request))


if __name__ == "__main__":
    asyncio.run(main())
