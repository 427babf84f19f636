"""One `Upstream` per YAML upstream: its own ClientSession and TCPConnector, target choice, and
the pool's live state.

Owns how the pool is configured for a proxy (pool.py is the pool itself) and the upstream's
targets; knows nothing of routes or YAML.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy import config
from proxy.balancing import Balancer, TargetState
from proxy.health import HealthChecker, Outlier, rest, retry_after_seconds
from proxy.pool import Acquisition, PoolConnector
from proxy.tls import Certificate, client_context, expired, tls_files_stamp

if TYPE_CHECKING:
    from proxy.tunnel import Tunnel

log = logging.getLogger("proxy")

# "Keep-Alive: timeout=5, max=100" (RFC 2068 §19.7.1, still sent by Apache, nginx and others).
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?i)\btimeout\s*=\s*(\d+(?:\.\d+)?)")

# aiohttp invents these on requests unless told not to (AIOHTTP-NOTES §0.3); a proxy must not.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

_TUNNELS_CLOSE = 5.0  # s aclose() waits for aborted tunnels to report closed (one loop turn)


@dataclass(frozen=True, slots=True)
class TargetStats:
    url: str
    active: int
    idle: int


def _proxy_session(connector: PoolConnector, timeouts: config.Timeouts) -> aiohttp.ClientSession:
    """A ClientSession that passes requests through as they are (AIOHTTP-NOTES §0, §10)."""
    session = aiohttp.ClientSession(
        connector=connector,
        # Never the default total=300 s: it would cut every long stream at 5 minutes.
        # `connect` bounds the wait for a pool slot plus the TCP connect; `sock_read`
        # bounds the silence between two reads.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=timeouts.connect, sock_read=timeouts.read
        ),
        auto_decompress=False,  # bodies pass through compressed as they are
        cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would mix users' cookies
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        trust_env=False,  # HTTP_PROXY in the environment must not reroute upstream traffic
        raise_for_status=False,
    )
    # aiohttp silently retries an idempotent request once on a broken connection; the proxy
    # makes every retry itself, by its own rules, and counts it (retry.py). Checked at
    # start-up by internals.py.
    session._retry_connection = False
    return session


class Upstream:
    """A named pool of targets. Build inside the running event loop; `start()` begins its
    health checks; close with `aclose()`."""

    def __init__(self, name: str, settings: config.Upstream) -> None:
        self.name = name
        self.settings = settings
        self.targets = tuple(TargetState(t.url, t.weight) for t in settings.targets)
        self.balancer = Balancer(self.targets, settings.balance)
        self.outlier = Outlier(name, settings.outlier)
        self.health: HealthChecker | None = None  # made in start(), with the TLS context
        self.in_flight = 0  # requests being forwarded now (kept by forward.py)
        self.requests = 0  # requests forwarded since start
        self.retries_in_flight = 0  # attempts after the first, being made now
        self.retries: dict[str, int] = {}  # by reason, since start
        self.stale = 0  # reused connections found closed, and recovered from by a retry
        self.pending_rejected = 0  # requests refused at once because max_pending were waiting
        self.panicking = False
        self.drained: asyncio.Event | None = None  # set when a retiring upstream is idle
        pool = settings.pool
        https = any(t.url.startswith("https://") for t in self.targets)
        # Verify https targets (system CAs, or tls.ca_file); SNI and the expected certificate
        # name are the target's host unless tls.server_name says otherwise.
        self.ssl: Any = True
        self.client_certificate: Certificate | None = None  # tls.cert, presented to https targets
        self.client_files = tls_files_stamp(settings.tls)  # server.py rebuilds it when they change
        if https:
            tls_path = f"upstreams.{name}.tls"
            self.ssl, self.client_certificate = client_context(settings.tls, tls_path)
            for line in expired(filter(None, [self.client_certificate])):
                log.warning("%s; presenting it anyway (--check fails on it)", line)
        self.server_hostname = settings.tls.server_name
        self.connector = PoolConnector(
            name=name,
            ssl=self.ssl,
            max_pending=settings.max_pending,
            limit=pool.limit,
            limit_per_host=pool.limit_per_host,
            # keepalive_timeout=0 alone would keep idle sockets; force_close closes each one.
            keepalive_timeout=pool.keepalive_timeout if pool.keepalive_timeout > 0 else None,
            force_close=pool.keepalive_timeout == 0,
            # Needed only where Python's SSL transport can leak aborted sockets (< 3.12.8).
            enable_cleanup_closed=https and sys.version_info < (3, 12, 8),
        )
        self.session = _proxy_session(self.connector, settings.timeouts)
        # Upgraded connections (tunnel.py) have a session of their own: a tunnel holds its
        # connection for as long as it lives, so it must not take a slot of pool.limit, and
        # its connection is never pooled. tunnels.limit is enforced by forward.py.
        tunnel_connector = PoolConnector(
            name=name, ssl=self.ssl, limit=0, force_close=True,
            enable_cleanup_closed=https and sys.version_info < (3, 12, 8),
        )  # fmt: skip
        self.tunnel_session = _proxy_session(tunnel_connector, settings.timeouts)
        self.tunnels_open = 0  # upgrade requests being forwarded or relayed now
        self.tunnel_bytes = {"upstream": 0, "downstream": 0}  # relayed since start
        self.tunnels: dict[Tunnel, TargetState] = {}  # relaying now, counted in in_flight
        self._tunnels_gone: asyncio.Event | None = None  # set by aclose()

    def start(self) -> None:
        if self.settings.health_check is not None:
            self.health = HealthChecker(
                self.name, self.targets, self.settings.health_check,
                ssl=self.ssl, server_hostname=self.server_hostname,
            )  # fmt: skip
            self.health.start()

    def pick(self, exclude: Sequence[TargetState] = ()) -> TargetState:
        """The target for the next attempt, by the upstream's `balance`."""
        target = self.balancer.pick(time.monotonic(), exclude)
        if self.balancer.panic != self.panicking:
            self.panicking = self.balancer.panic
            if self.panicking:
                log.warning("upstream %s: no target is healthy; panic mode, trying them all",
                            self.name)  # fmt: skip
            else:
                log.info("upstream %s: healthy targets again, panic mode over", self.name)
        return target

    def answered(
        self, target: TargetState, acquisition: Acquisition, response: aiohttp.ClientResponse
    ) -> None:
        """Learn from a response's status line and headers: passive health, a rest the target
        asked for, and the idle timeout it announced for this connection."""
        status = response.status
        if self.outlier.settings is not None:
            self.outlier.record(target, status in (502, 503, 504), time.monotonic())
        # Only 503 speaks for the whole target (RFC 9110 §15.6.4); a 429 (RFC 6585 §4) is about
        # one client's rate, and resting the target for it would refuse every client.
        if status == 503:
            seconds = retry_after_seconds(response.headers.get("Retry-After"))
            if seconds:
                rest(self.name, target, seconds, time.monotonic())
        keep_alive = response.headers.get("Keep-Alive")
        if keep_alive is not None and acquisition.protocol is not None:
            match = _KEEP_ALIVE_TIMEOUT.search(keep_alive)
            if match:
                self.connector.retire_after(acquisition.protocol, float(match.group(1)))

    def failed(self, target: TargetState, kind: str) -> None:
        """A connect, timeout, reset or protocol failure of `target` (`kind`)."""
        target.attempt_failures[kind] = target.attempt_failures.get(kind, 0) + 1
        if self.outlier.settings is not None:
            self.outlier.record(target, True, time.monotonic())

    def target_stats(self) -> list[TargetStats]:
        """Active and idle connections per configured target, in config order."""
        by_address = self.connector.target_stats()
        return [TargetStats(t.url, *by_address.get((t.host, t.port), (0, 0))) for t in self.targets]

    def finished(self, upgrade: bool) -> None:
        """A request forwarded to this upstream is done; for an upgrade, its tunnel too."""
        self.in_flight -= 1
        self.tunnels_open -= upgrade
        if self.drained is not None and not self.in_flight:
            self.drained.set()  # a reload replaced it, or the server stops: it may close now

    # A tunnel stays in flight, on its upstream and its target, from its request to its close
    # (least_requests counts open WebSockets). The last two are tunnel.Owner.

    def tunnel_opened(self, tunnel: Tunnel, target: TargetState) -> None:
        self.tunnels[tunnel] = target

    def count_tunnel_bytes(self, direction: str, count: int) -> None:
        self.tunnel_bytes[direction] += count

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        target = self.tunnels.pop(tunnel, None)
        if target is not None:
            target.in_flight -= 1
        self.finished(upgrade=True)
        if not self.tunnels and self._tunnels_gone is not None:
            self._tunnels_gone.set()

    async def aclose(self) -> None:
        """Stop health checks; close the sessions, every pooled connection and every tunnel."""
        if self.health is not None:
            await self.health.aclose()
        if self.tunnels:
            self._tunnels_gone = asyncio.Event()
            for tunnel in list(self.tunnels):
                tunnel.close(abort=True)
            with contextlib.suppress(TimeoutError):  # each one writes its access log line
                await asyncio.wait_for(self._tunnels_gone.wait(), _TUNNELS_CLOSE)
        await asyncio.gather(self.session.close(), self.tunnel_session.close())
