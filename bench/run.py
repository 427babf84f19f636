"""Benchmark: the backend directly, this proxy, a minimal aiohttp proxy, nginx, HAProxy, one run.

    python bench/run.py                  # about 6 minutes; prints progress and a Markdown table
    python bench/run.py --quick          # one short round (about a minute), to check it all runs

Needs wrk and nginx (Debian: apt-get install -y wrk nginx-light); HAProxy (apt-get install -y
haproxy) when installed. nginx serves as the backend and, as a reference, as a reverse proxy with
upstream keepalive; HAProxy is the other such reference (one thread, keep-alive both ways).
`minimal` is bench/minimal.py, a minimal pooled aiohttp proxy on the same event loop: the
"CPU vs minimal" column divides each target's CPU µs/request by minimal's (minimal-uvloop's for
the *-uvloop targets when it ran), same run, same case. Runs are interleaved (direct, minimal,
proxy, nginx, ..., direct, ...) and medians are reported, because a shared machine is noisy.
Every proxy (this one, minimal, nginx and HAProxy) is pinned to one core; wrk to the other.

Reports, per case: requests/s, p50/p99 latency, each proxy's CPU microseconds per request (from
/proc/PID/stat), and the backend connections opened during the run (nginx stub_status). Then a
1 GiB download and a 1 GiB upload through the proxy and through nginx (MB/s ratio), with RSS
before and after; for proxy-2w, how evenly SO_REUSEPORT spread the requests over its workers.
Every server listens on 127.0.0.1 and is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from worktree import checkout  # bench/worktree.py, beside this script

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL = b"hello, world\n"
LARGE = b"x" * 16384
PROXY_CORE, LOAD_CORE = "1", "0"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    backend: int
    backend_status: int
    nginx_proxy: int
    sink: int
    backend2: int  # the same nginx backend on a second port: a second target
    haproxy: int
    slow: int  # bench/sink.py answering after SLOW_DELAY: proxy-slow's and proxy-shed's backend


@dataclass(frozen=True)
class Variant:
    """One way of running the proxy under test: how it is started and what its config adds to
    proxy_config()'s (one nginx target, the plain route)."""

    launcher: tuple[str, ...] = ("-m", "proxy")
    top: str = ""  # top-level YAML added to the config
    backend: str = "nginx"  # "nginx"; "two": both nginx ports, by `balance`; "slow": SLOW_DELAY
    balance: str = ""  # with backend "two"
    routed: bool = False  # the benchmarked route with a per-route policy (_ROUTED)
    max_pending: int = 0  # the backend upstream's max_pending (0: none)


# The proxy under test, in variants. "baseline" runs `python -m proxy` from a checkout of
# --baseline REV, so its YAML stays what any revision reads.
PROXY_VARIANTS = {
    "proxy": Variant(),  # metrics and JSON access log on, as shipped
    "proxy-nolog": Variant(top="access_log: {enabled: false}\n"),  # metrics only
    "proxy-bare": Variant(("bench/bare.py",), "access_log: {enabled: false}\n"),  # neither
    "baseline": Variant(),
    # Two targets balanced by least_requests.
    "proxy-2lr": Variant(backend="two", balance="least_requests"),
    # The same two by round_robin, and by balance: hash on the client's address (issue 12:
    # hash costs at most 1.05x round_robin).
    "proxy-2rr": Variant(backend="two", balance="round_robin"),
    "proxy-hash": Variant(backend="two", balance="hash"),
    # Two worker processes on both cores (not pinned); CPU counts the supervisor and workers.
    "proxy-2w": Variant(top="workers: 2\n"),
    # The benchmarked route with issue 11's per-route policy: a regex and a method match,
    # request and response header rules and a rate limit that never refuses (its cost, not
    # its 429s), beside the request ID every variant has. Compare with "proxy".
    "proxy-routed": Variant(routed=True),
    # The proxy on uvloop (issue 13): compare with "proxy", and with "minimal-uvloop".
    "proxy-uvloop": Variant(top="event_loop: uvloop\n"),
    # Overload where the pool is the bottleneck (issue 13 target 3): a backend that answers
    # after SLOW_DELAY, so 200 clients against pool.limit 100 queue for the pool, not for the
    # proxy's CPU. proxy-shed adds max_pending 20: 100 in flight, 20 waiting, the rest 503 at
    # once. Their access logs are kept, for the latency of the admitted (200) requests alone.
    "proxy-slow": Variant(backend="slow"),
    "proxy-shed": Variant(backend="slow", max_pending=20),
}

# The minimal pooled aiohttp proxy (bench/minimal.py), the reference of "CPU vs minimal", by
# event loop. Its pool limit is --pool-limit, as the proxy's.
MINIMAL_VARIANTS = {"minimal": "asyncio", "minimal-uvloop": "uvloop", "minimal-raw": "asyncio"}
# Targets that are not the proxy: nginx and HAProxy as reverse proxies, and the backend itself.
REFERENCES = ("direct", "nginx", "haproxy", *MINIMAL_VARIANTS)
DEFAULT_TARGETS = "direct,minimal,proxy,nginx,haproxy"

_ROUTED = """
  - name: all
    match: {path_regex: "^/(small|large|[a-z]+)$", methods: [GET, HEAD]}
    upstream: backend
    headers:
      request: {set: {X-Env: bench}, add: {X-Seen: "1"}, remove: [X-Internal-Token]}
      response: {set: {Strict-Transport-Security: "max-age=63072000"}, remove: [X-Powered-By]}
    rate_limit: {requests_per_second: 1000000, burst: 1000000, key: client_ip}
"""


def nginx_conf(ports: Ports, root: Path, pool_limit: int) -> tuple[str, str]:
    """(backend config, reverse-proxy config): two nginx instances, one worker each."""

    def common(name: str) -> str:
        return f"""
worker_processes 1;
pid {root}/{name}.pid;
error_log {root}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/{name}-body;
    proxy_temp_path {root}/{name}-proxy;
    fastcgi_temp_path {root}/{name}-fcgi;
    uwsgi_temp_path {root}/{name}-uwsgi;
    scgi_temp_path {root}/{name}-scgi;
    keepalive_requests 1000000;
"""

    backend = (
        common("backend")
        + f"""
    server {{
        listen 127.0.0.1:{ports.backend} backlog=4096;
        listen 127.0.0.1:{ports.backend2} backlog=4096;
        client_max_body_size 0;
        root {root}/www;
        location = /small {{ default_type text/plain; }}
        location = /large {{ default_type text/plain; }}
        location = /huge {{ default_type application/octet-stream; }}
    }}
    server {{
        listen 127.0.0.1:{ports.backend_status};
        location / {{ stub_status; }}
    }}
}}
"""
    )
    proxy = (
        common("nginx-proxy")
        + f"""
    upstream backend {{
        server 127.0.0.1:{ports.backend};
        keepalive {pool_limit};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{ports.nginx_proxy} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        # The 1 GiB transfers, streamed as the proxy streams them: the download through
        # memory buffers only (no temp file), the upload unbuffered and chunked to the sink.
        location = /huge {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
        location = /upload {{
            proxy_pass http://127.0.0.1:{ports.sink};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            client_max_body_size 0;
        }}
    }}
}}
"""
    )
    return backend, proxy


def haproxy_conf(ports: Ports, root: Path, pool_limit: int) -> str:
    """HAProxy as nginx-as-proxy is configured: one process and thread, HTTP mode, keep-alive
    to the client and to the backend (idle backend connections kept, up to `pool_limit`)."""
    # HAProxy refuses to start when it cannot raise its file limit to about 2 * maxconn.
    maxconn = min(4096, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2)
    return f"""
global
    nbthread 1
    maxconn {maxconn}
    pidfile {root}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
frontend bench
    bind 127.0.0.1:{ports.haproxy} backlog 4096
    default_backend backend
backend backend
    server nginx 127.0.0.1:{ports.backend} pool-max-conn {pool_limit}
"""


def proxy_config(ports: Ports, pool_limit: int, port: int, admin_port: int, v: Variant) -> str:
    if v.backend == "two":
        targets = f"[http://127.0.0.1:{ports.backend}, http://127.0.0.1:{ports.backend2}]"
        targets += f"\n    balance: {v.balance}"
        targets += "\n    hash_on: client_ip" if v.balance == "hash" else ""
    else:
        backend = ports.slow if v.backend == "slow" else ports.backend
        targets = f"[http://127.0.0.1:{backend}]"
    pending = f"\n    max_pending: {v.max_pending}" if v.max_pending else ""
    route = _ROUTED if v.routed else PLAIN_ROUTE
    return (
        v.top
        + f"""
listen: {{host: 127.0.0.1, port: {port}, keepalive_timeout: 75}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstreams:
  backend:
    targets: {targets}
    pool: {{limit: {pool_limit}, limit_per_host: 0, keepalive_timeout: 60}}
    timeouts: {{connect: 5, read: 30}}{pending}
  sink:
    targets: [http://127.0.0.1:{ports.sink}]
routes:
  - name: upload
    match: {{path_prefix: /upload}}
    upstream: sink{route}"""
    )


LOGGED = ("proxy-slow", "proxy-shed")  # access log kept: the latency of the admitted requests
SLOW_DELAY = 0.05  # s the slow backend takes per answer: 100 connections serve 2,000 req/s
PLAIN_ROUTE = """
  - name: all
    match: {path_prefix: /}
    upstream: backend
"""


def wait_http(
    url: str,
    timeout: float = 20,
    proc: subprocess.Popen[bytes] | None = None,
    name: str = "",
    log: Path | None = None,
) -> None:
    """Wait for `url` to answer; fail at once, with the tail of `log`, if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:].strip() if log and log.exists() else ""
            raise SystemExit(
                f"bench: {name or url} exited with code {proc.returncode} before answering"
                + (f"; its stderr ends with:\n{tail}" if tail else "")
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: {name or url} did not answer at {url} within {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def backend_accepts(status_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/", timeout=5) as response:
        text = response.read().decode()
    return int(text.splitlines()[2].split()[0])  # "server accepts handled requests" counts


def descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [p for child in children for p in (child, *descendants(child))]


def nginx_worker_pids(master_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise SystemExit(f"bench: cannot read wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * _UNITS[unit]


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_request: float | None
    backend_connections: int
    per_worker: tuple[int, ...] = ()  # proxy-2w: the requests each worker served in the run
    admitted: tuple[int, ...] = ()  # LOGGED: durations (µs) of the 200s, then the shed count


def wrk(url: str, clients: int, duration: float) -> tuple[float, float, float, int, int]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            f"-c{clients}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in match.groups())
    return rps, p50, p99, requests, errors


class Bench:
    def __init__(self, root: Path, pool_limit: int, baseline: Path | None) -> None:
        self.root = root
        self.ports = Ports(*(free_port() for _ in range(7)))
        self.pool_limit = pool_limit
        self.baseline = baseline  # a checkout of another revision, run as target "baseline"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.targets: dict[str, tuple[int, list[int]]] = {}  # name -> (port, PIDs to charge)
        self.admin_ports: dict[str, int] = {}  # the proxy variants' admin listeners

    def start(self, targets: list[str]) -> None:
        """Start the backend, the sink and every server that `targets` name; wait until each
        answers. A target that exits first stops the run with its stderr."""
        www = self.root / "www"
        www.mkdir()
        (www / "small").write_bytes(SMALL)
        (www / "large").write_bytes(LARGE)
        with open(www / "huge", "wb") as f:
            f.truncate(1024**3)  # sparse: 1 GiB of zeros without using the disk
        backend_conf, proxy_conf = nginx_conf(self.ports, self.root, self.pool_limit)
        nginx_proxy = None
        for name, text, core in (
            ("backend", backend_conf, None),
            ("nginx-proxy", proxy_conf, PROXY_CORE),
        ):
            if name == "nginx-proxy" and "nginx" not in targets:
                continue
            conf = self.root / f"{name}.conf"
            conf.write_text(text)
            cmd = ["nginx", "-c", str(conf), "-p", str(self.root), "-g", "daemon off;"]
            if core:
                cmd = ["taskset", "-c", core, *cmd]
            self.procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
            nginx_proxy = self.procs[-1]
        sink = [sys.executable, str(REPO / "bench" / "sink.py"), str(self.ports.sink)]
        self.procs.append(subprocess.Popen(sink))
        if {"proxy-slow", "proxy-shed"} & set(targets):  # beside wrk, off the proxy's core
            slow = [*sink[:-1], str(self.ports.slow), str(SLOW_DELAY)]
            self.procs.append(subprocess.Popen(["taskset", "-c", LOAD_CORE, *slow]))
        # (name, URL that answers once it is up, its process, its stderr)
        waits = [self._start_proxy(name) for name in targets if name in PROXY_VARIANTS]
        waits += [self._start_minimal(name) for name in targets if name in MINIMAL_VARIANTS]
        if "haproxy" in targets:
            waits.append(self._start_haproxy())
        wait_http(f"http://127.0.0.1:{self.ports.backend}/small")
        self.targets["direct"] = (self.ports.backend, [])
        if "nginx" in targets:
            assert nginx_proxy is not None
            wait_http(f"http://127.0.0.1:{self.ports.nginx_proxy}/small")
            self.targets["nginx"] = (self.ports.nginx_proxy, nginx_worker_pids(nginx_proxy.pid))
        for name, url, proc, log in waits:
            wait_http(url, proc=proc, name=name, log=log)

    def _start_proxy(self, name: str) -> tuple[str, str, subprocess.Popen[bytes], Path]:
        """Start variant `name` of the proxy on its own ports."""
        port, admin_port = free_port(), free_port()
        variant = PROXY_VARIANTS[name]
        source = self.baseline if name == "baseline" and self.baseline else REPO
        config = self.root / f"{name}.yaml"
        config.write_text(proxy_config(self.ports, self.pool_limit, port, admin_port, variant))
        log = self.root / f"{name}.stderr"
        # The access log: kept for LOGGED only (the child keeps its own copy of the file).
        access = self.access_log(name) if name in LOGGED else Path(os.devnull)
        with open(log, "wb") as stderr, open(access, "wb") as stdout:
            proxy = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    "0,1" if name == "proxy-2w" else PROXY_CORE,
                    sys.executable,
                    *variant.launcher,
                    "--config",
                    str(config),
                ],
                cwd=source,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(source)},
            )
        self.procs.append(proxy)
        self.targets[name] = (port, [proxy.pid])
        self.admin_ports[name] = admin_port
        return name, f"http://127.0.0.1:{admin_port}/readyz", proxy, log

    def _start_minimal(self, name: str) -> tuple[str, str, subprocess.Popen[bytes], Path]:
        """Start bench/minimal.py, the minimal pooled aiohttp proxy, on the loop `name` says."""
        port = free_port()
        log = self.root / f"{name}.stderr"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(
                [
                    *("taskset", "-c", PROXY_CORE, sys.executable),
                    str(REPO / "bench" / "minimal.py"),
                    *("--port", str(port), "--upstream", f"http://127.0.0.1:{self.ports.backend}"),
                    *("--pool-limit", str(self.pool_limit), "--loop", MINIMAL_VARIANTS[name]),
                    # minimal-raw: requests below ClientSession._request (bench/minimal.py)
                    *("--client", "raw" if name == "minimal-raw" else "session"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.procs.append(proc)
        self.targets[name] = (port, [proc.pid])
        return name, f"http://127.0.0.1:{port}/small", proc, log

    def _start_haproxy(self) -> tuple[str, str, subprocess.Popen[bytes], Path]:
        conf = self.root / "haproxy.cfg"
        conf.write_text(haproxy_conf(self.ports, self.root, self.pool_limit))
        log = self.root / "haproxy.stderr"
        with open(log, "wb") as stderr:
            # -db: in the foreground, one process (no master-worker): the PID to charge.
            cmd = ["taskset", "-c", PROXY_CORE, "haproxy", "-db", "-f", str(conf)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        self.procs.append(proc)
        self.targets["haproxy"] = (self.ports.haproxy, [proc.pid])
        return "haproxy", f"http://127.0.0.1:{self.ports.haproxy}/small", proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def url(self, target: str, path: str) -> str:
        return f"http://127.0.0.1:{self.targets[target][0]}{path}"

    def measure(self, target: str, path: str, clients: int, duration: float) -> Run:
        pids = self.targets[target][1]
        if target == "proxy-2w":
            pids = [*pids, *descendants(pids[0])]  # the workers, however often restarted
        served_before = self.served_per_worker(target)
        logged = self.access_log(target).stat().st_size if target in LOGGED else 0
        cpu_before = sum(cpu_seconds(p) for p in pids)
        accepts_before = backend_accepts(self.ports.backend_status)
        rps, p50, p99, requests, errors = wrk(self.url(target, path), clients, duration)
        cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        opened = backend_accepts(self.ports.backend_status) - accepts_before - 1  # minus ours
        served = self.served_per_worker(target)
        return Run(
            rps,
            p50,
            p99,
            requests,
            errors,
            cpu / requests * 1e6 if pids and requests else None,
            opened,
            tuple(after - before for after, before in zip(served, served_before, strict=True)),
            self.admitted(target, logged),
        )

    def access_log(self, target: str) -> Path:
        return self.root / f"{target}.access.log"

    def admitted(self, target: str, since: int) -> tuple[int, ...]:
        """A LOGGED target's: the durations (µs) of the requests answered 200 in its access log
        from byte `since` on, then the count of the others (shed); () for other targets."""
        if target not in LOGGED:
            return ()
        with open(self.access_log(target), "rb") as log:
            log.seek(since)
            lines = [json.loads(line) for line in log.read().splitlines() if line.strip()]
        ok = sorted(round(e["duration"] * 1e6) for e in lines if e["status"] == 200)
        return (*ok, sum(1 for e in lines if e["status"] != 200))

    def served_per_worker(self, target: str) -> tuple[int, ...]:
        """proxy-2w: the requests each worker has sent to the backend so far (the supervisor's
        /pools lists every worker's pools); () for the other targets."""
        if target != "proxy-2w":
            return ()
        url = f"http://127.0.0.1:{self.admin_ports[target]}/pools"
        with urllib.request.urlopen(url, timeout=5) as response:
            workers = json.loads(response.read())["workers"]
        return tuple(w["upstreams"]["backend"]["requests"] for w in workers)

    def transfer(self, target: str) -> dict[str, float]:
        """1 GiB down and 1 GiB up through `target`, TRANSFERS times each, with its RSS around
        them (of its first process: the proxy, or nginx's one worker). The first of each is
        reported apart: it goes over a pooled backend connection that has carried only small
        responses, whose kernel receive buffer is still growing (the README says more)."""
        pid = self.targets[target][1][0]
        before = rss_mib(pid)
        down, up = [], []
        for _ in range(TRANSFERS):
            down.append(self._download(target))
            up.append(self._upload(target))
        return {
            "rss_before_mib": before,
            "peak_rss_after_mib": peak_rss_mib(pid),
            "rss_after_mib": rss_mib(pid),
            "first_download_mib_s": down[0],
            "first_upload_mib_s": up[0],
            "download_mib_s": statistics.median(down[1:]),
            "upload_mib_s": statistics.median(up[1:]),
        }

    def _download(self, target: str) -> float:
        started = time.monotonic()
        subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", self.url(target, "/huge")], check=True, timeout=600
        )
        return 1024 / (time.monotonic() - started)

    def _upload(self, target: str) -> float:
        started = time.monotonic()
        received = subprocess.run(
            # chunked, as curl sends stdin: the proxy re-chunks it upstream
            f"head -c {1024**3} /dev/zero | curl -sS -T - {self.url(target, '/upload')}",
            shell=True,
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        ).stdout
        if received.strip() != str(1024**3):
            raise SystemExit(f"bench: the upload sink received {received.strip()!r} bytes")
        return 1024 / (time.monotonic() - started)


TRANSFERS = 3  # 1 GiB each way, per target: the first, then the median of the others


def median_run(runs: list[Run]) -> Run:
    cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
    return Run(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        cpu_us_per_request=statistics.median(cpu) if cpu else None,
        backend_connections=max(r.backend_connections for r in runs),
    )


def worker_spread(samples: dict[tuple[str, int, str], list[Run]]) -> str:
    """SO_REUSEPORT's spread of requests over proxy-2w's workers: per case, the worst run's
    largest distance of one worker's count from the workers' mean, in percent."""
    cases = []
    for (body, clients, target), runs in samples.items():
        spreads = [
            max(abs(n - statistics.mean(run.per_worker)) for n in run.per_worker)
            / statistics.mean(run.per_worker)
            for run in runs
            if target == "proxy-2w" and run.per_worker and sum(run.per_worker)
        ]
        if spreads:
            cases.append(f"{body}/{clients} ±{max(spreads):.0%}")
    return ", ".join(cases)


def shed_figures(samples: dict[tuple[str, int, str], list[Run]], target: str) -> str:
    """For a LOGGED target, per case: p50 and p99 of the admitted requests (answered 200, from
    its access log, all rounds together), their ratio, and how many were shed (503 at once)."""
    cases = []
    for (body, clients, name), runs in samples.items():
        if name != target:
            continue
        ok = sorted(d for run in runs for d in run.admitted[:-1])
        shed = sum(run.admitted[-1] for run in runs if run.admitted)
        if ok:
            p50, p99 = ok[len(ok) // 2] / 1e3, ok[min(len(ok) - 1, len(ok) * 99 // 100)] / 1e3
            cases.append(
                f"{body}/{clients}: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({p99 / p50:.2f}x), "
                f"{len(ok):,} admitted, {shed:,} shed"
            )
    return "; ".join(cases)


def minimal_for(target: str, targets: list[str]) -> str:
    """The reference of target's "CPU vs minimal": minimal on the same event loop if it ran."""
    if target.endswith("-uvloop") and "minimal-uvloop" in targets:
        return "minimal-uvloop"
    return "minimal"


def cpu_ratio(run: Run, reference: Run | None) -> str:
    if reference and reference.cpu_us_per_request and run.cpu_us_per_request is not None:
        return f"{run.cpu_us_per_request / reference.cpu_us_per_request:.2f}"
    return "—"


def table(results: dict[tuple[str, int, str], Run], targets: list[str]) -> str:
    rows = [
        "| body | clients | target | req/s | p50 ms | p99 ms | CPU µs/req | backend conns "
        "| req/s vs direct | req/s vs nginx | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    minimal = any(t in targets for t in MINIMAL_VARIANTS)
    if minimal:
        rows[0] += " CPU vs minimal |"
        rows[1] += "---|"
    if "baseline" in targets:
        rows[0] += " CPU vs baseline |"
        rows[1] += "---|"
    for (body, clients, target), run in results.items():
        direct = results.get((body, clients, "direct"))
        nginx = results.get((body, clients, "nginx"))
        cpu = f"{run.cpu_us_per_request:.0f}" if run.cpu_us_per_request is not None else "—"
        vs_direct = f"{run.rps / direct.rps:.2f}" if direct else "—"
        vs_nginx = f"{run.rps / nginx.rps:.2f}" if nginx and "nginx" in targets else "—"
        rows.append(
            f"| {body} | {clients} | {target} | {run.rps:,.0f} | {run.p50_ms:.2f} "
            f"| {run.p99_ms:.2f} | {cpu} | {run.backend_connections} | {vs_direct} "
            f"| {vs_nginx} | {run.errors} |"
        )
        if minimal:
            reference = results.get((body, clients, minimal_for(target, targets)))
            rows[-1] += f" {cpu_ratio(run, reference)} |"
        if "baseline" in targets:
            rows[-1] += f" {cpu_ratio(run, results.get((body, clients, 'baseline')))} |"
    return "\n".join(rows)


@contextlib.contextmanager
def bench_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user and read www/
        yield Path(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--pool-limit", type=int, default=100, help="pool.limit of the proxy")
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 s, no 1 GiB transfer (about 1 minute)"
    )
    parser.add_argument("--no-transfer", action="store_true", help="skip the 1 GiB transfers")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--targets",
        default=DEFAULT_TARGETS,
        help=f"comma-separated (default {DEFAULT_TARGETS}; haproxy is skipped when not "
        "installed), from: " + ", ".join([*REFERENCES, *PROXY_VARIANTS]) + " (minimal: "
        "bench/minimal.py, a minimal pooled aiohttp proxy; proxy-nolog: access log off; "
        "proxy-bare: metrics and access log off)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the proxy at git revision REV as target 'baseline', to measure a "
        "change before and after in one run",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.no_transfer = 2.0, 1, True
    for tool in ("wrk", "nginx", "taskset", "curl"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} is not installed (Debian: apt-get install -y wrk nginx-light "
                "util-linux curl)",
                file=sys.stderr,
            )
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (proxy on one, load on the other)", file=sys.stderr)
        return 2

    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in (*REFERENCES, *PROXY_VARIANTS)]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    if "haproxy" in targets and shutil.which("haproxy") is None:
        print(
            "bench: haproxy is not installed (Debian: apt-get install -y haproxy): "
            "skipping the haproxy target",
            file=sys.stderr,
        )
        targets.remove("haproxy")
    if args.baseline:
        targets.append("baseline")
    cases = [(body, clients) for body in ("small", "16KiB") for clients in (50, 200)]
    paths = {"small": "/small", "16KiB": "/large"}
    samples: dict[tuple[str, int, str], list[Run]] = {}
    total = len(cases) * len(targets) * args.rounds
    done = 0
    with bench_dir() as root, contextlib.ExitStack() as stack:
        baseline = None
        if args.baseline:
            baseline = stack.enter_context(checkout(args.baseline, root / "baseline-src"))
        bench = Bench(root, args.pool_limit, baseline)
        try:
            bench.start(targets)
            for target in targets:  # warm up pools and caches
                wrk(bench.url(target, "/small"), 50, 1)
            for round_ in range(args.rounds):
                for body, clients in cases:
                    for target in targets:
                        done += 1
                        print(
                            f"[{done}/{total}] round {round_ + 1}: {target:14} {body:5} "
                            f"{clients:3} clients",
                            file=sys.stderr,
                            flush=True,
                        )
                        run = bench.measure(target, paths[body], clients, args.duration)
                        samples.setdefault((body, clients, target), []).append(run)
            transfers = {}
            for target in ("proxy", "proxy-uvloop", "nginx") if not args.no_transfer else ():
                if target in targets:
                    print(
                        f"1 GiB down and up through {target}, {TRANSFERS} times...",
                        file=sys.stderr,
                    )
                    transfers[target] = bench.transfer(target)
        finally:
            bench.stop()

    results = {key: median_run(runs) for key, runs in samples.items()}
    print(
        f"\n{args.rounds} interleaved rounds of {args.duration:.0f} s, medians; "
        f"pool.limit {args.pool_limit}; proxy pinned to core {PROXY_CORE}, wrk to core "
        f"{LOAD_CORE}\n"
    )
    print(table(results, targets))
    if any(t in targets for t in MINIMAL_VARIANTS):
        print(
            "\nCPU vs minimal: CPU µs/request over that of bench/minimal.py (a minimal pooled\n"
            "aiohttp proxy) in the same case: over minimal-uvloop's for *-uvloop targets when it\n"
            "ran, else over minimal's (asyncio). Below 1: less CPU per request than minimal."
        )
    for target, transfer in transfers.items():
        print(
            f"\n1 GiB transfers through {target}, {TRANSFERS} each way: RSS "
            f"{transfer['rss_before_mib']:.0f} MiB before, {transfer['rss_after_mib']:.0f} MiB "
            f"after, peak {transfer['peak_rss_after_mib']:.0f} MiB; download "
            f"{transfer['download_mib_s']:.0f} MiB/s, upload {transfer['upload_mib_s']:.0f} MiB/s "
            f"(the first: {transfer['first_download_mib_s']:.0f} and "
            f"{transfer['first_upload_mib_s']:.0f})"
        )
    nginx = transfers.get("nginx")
    for target, transfer in transfers.items():
        if nginx is not None and target != "nginx":
            print(
                f"{target}: MB/s vs nginx: download "
                f"{transfer['download_mib_s'] / nginx['download_mib_s']:.2f}, "
                f"upload {transfer['upload_mib_s'] / nginx['upload_mib_s']:.2f} (the first: "
                f"{transfer['first_download_mib_s'] / nginx['first_download_mib_s']:.2f} and "
                f"{transfer['first_upload_mib_s'] / nginx['first_upload_mib_s']:.2f})"
            )
    for target in LOGGED:
        figures = shed_figures(samples, target)
        if figures:
            print(f"\n{target}, the requests answered 200 only (its access log): {figures}")
    spread = worker_spread(samples)
    if spread:
        print(
            "\nproxy-2w requests per worker (each run's, from the supervisor's /pools): the "
            "largest distance from the workers' mean, per case: " + spread
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [
                        {"body": b, "clients": c, "target": t, **asdict(r)}
                        for (b, c, t), r in results.items()
                    ],
                    "transfers": transfers,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
