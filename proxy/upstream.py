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
from yarl import URL

from proxy import config
from proxy.balancing import Balancer, TargetState
from proxy.discovery import Discovery, Found
from proxy.health import HealthChecker, Outlier, rest, retry_after_seconds
from proxy.policy import target_host
from proxy.pool import Acquisition, PoolConnector, gone_for
from proxy.tls import Certificate, FileStamp, client_context, expired, tls_files_stamp
from proxy.wire import UpstreamResponse

if TYPE_CHECKING:
    from proxy.tunnel import Tunnel

log = logging.getLogger("proxy")

# "Keep-Alive: timeout=5, max=100" (RFC 2068 §19.7.1, still sent by Apache, nginx and others).
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?i)\btimeout\s*=\s*(\d+(?:\.\d+)?)")

# aiohttp invents these on requests unless told not to (AIOHTTP-NOTES §0.3); a proxy must not.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

_TUNNELS_CLOSE = 5.0  # s aclose() waits for aborted tunnels to report closed (one loop turn)
_FIRST_DISCOVERY = 5.0  # s the first resolution of dns/srv targets may take


@dataclass(frozen=True, slots=True)
class TargetStats:
    url: str
    active: int
    idle: int


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What an upstream read from its TLS files (tls.ca_file, tls.cert, tls.key): the context its
    connections to https targets use, the client certificate in it, and the files' versions as
    they were read. A reload that finds the files changed builds the upstream again; its
    rollback builds it from the ClientTLS it had before, not from the files (server.py)."""

    context: Any  # ssl.SSLContext; True when no target is https (aiohttp's default)
    certificate: Certificate | None  # tls.cert, presented to https targets that ask
    files: FileStamp


def read_client_tls(name: str, settings: config.Upstream) -> ClientTLS:
    """The upstream's ClientTLS from its files (none read unless a target is https)."""
    files = tls_files_stamp(settings.tls)  # first: a file replaced meanwhile is read again
    https = any(
        (t.url if isinstance(t, config.Target) else t.scheme + ":").startswith("https:")
        for t in settings.targets
    )
    if not https:
        return ClientTLS(True, None, files)
    context, certificate = client_context(settings.tls, f"upstreams.{name}.tls")
    for line in expired(filter(None, [certificate])):
        log.warning("%s; presenting it anyway (--check fails on it)", line)
    return ClientTLS(context, certificate, files)


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
    """A named pool of targets. Build inside the running event loop; `await discover()` finds
    its dns/srv targets once; `start()` begins health checks, discovery and warming; close
    with `aclose()`."""

    def __init__(self, name: str, settings: config.Upstream, tls: ClientTLS | None = None) -> None:
        """`tls`: what to verify and present with, instead of reading the files again."""
        self.name = name
        self.settings = settings
        tls_name = settings.tls.server_name
        self.fixed = tuple(
            TargetState(t.url, t.weight, server_hostname=tls_name, authority=target_host(t.url))
            for t in settings.targets
            if isinstance(t, config.Target)
        )
        self.targets = self.fixed  # fixed ones first, then the discovered, as found
        self.balancer = Balancer(self.targets, settings.balance, slow_start=settings.slow_start)
        # balance: hash: what it hashes (client_ip unless hash_on says); None for the others.
        self.hash_on = (settings.hash_on or "client_ip") if settings.balance == "hash" else None
        specs = [t for t in settings.targets if not isinstance(t, config.Target)]
        self.discovery = (
            Discovery(name, specs, settings.discovery, self._discovered) if specs else None
        )
        self._discovered_once = False
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
        # Verify https targets (system CAs, or tls.ca_file); SNI and the expected certificate
        # name are the target's host (a discovered one's: the name it was found by) unless
        # tls.server_name says otherwise.
        self.tls = tls or read_client_tls(name, settings)  # server.py rebuilds on file changes
        self.ssl: Any = self.tls.context
        self.client_certificate = self.tls.certificate
        https = self.ssl is not True
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
            max_requests=pool.max_requests,
            max_age=pool.max_age,
            remember_gone=gone_for(settings.timeouts.connect),
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

    def succeed(self, previous: Upstream) -> None:
        """A reload replaces `previous` (same name) with this one: its totals go on counting
        (connection closes, tunnel bytes, discovery refreshes), and discovery starts from the
        targets it found, so a DNS outage during the reload does not empty the upstream."""
        self.connector.closes = previous.connector.closes
        self.tunnel_bytes = previous.tunnel_bytes
        if self.discovery is not None and previous.discovery is not None:
            self.discovery.seed(previous.discovery)

    async def discover(self) -> None:
        """Resolve the dns/srv targets once, before the upstream takes requests (at start-up,
        and before a reload swaps it in). A name that does not resolve leaves the upstream
        without its targets until one refresh does: requests get 503 meanwhile."""
        if self.discovery is not None:
            await self.discovery.first(_FIRST_DISCOVERY)

    def start(self) -> None:
        if self.settings.health_check is not None:
            self.health = HealthChecker(
                self.name, self.targets, self.settings.health_check, ssl=self.ssl
            )
            self.health.start()
        if self.discovery is not None:
            self.discovery.start()
        pool = self.settings.pool
        if pool.min_idle or pool.max_age:  # one task: opens warm ones, retires old idle ones
            self.connector.start_warming(
                self._warm_targets, pool.min_idle, connect_timeout=self.settings.timeouts.connect
            )

    def _warm_targets(self) -> list[tuple[str, str | None]]:
        """The targets min_idle keeps connections open to: those in rotation now."""
        now = time.monotonic()
        return [(t.url, t.server_hostname) for t in self.targets if t.available(now)]

    def _discovered(self, found: tuple[Found, ...]) -> None:
        """Discovery's answer changed: add what is new (in rotation, health checks and
        slow_start permitting), keep what stays (its state and connections), and drain what
        left: no new requests, its requests in flight finish, its connections then close."""
        known = {t.url: t for t in self.targets if t.discovered_from}
        taken = {t.url for t in self.fixed}  # a fixed target serves its address itself
        discovered = []
        joined = []  # new, or back after they left (their old connections may still go on)
        for item in found:
            if item.url in taken:
                continue  # found twice (two names, one address): the first one stands
            taken.add(item.url)
            target = known.pop(item.url, None)
            if target is None:
                target = TargetState(
                    item.url, item.weight, discovered_from=item.discovered_from,
                    server_hostname=(self.settings.tls.server_name or item.server_name)
                    if item.url.startswith("https:") else None,
                    authority=_authority(item),
                )  # fmt: skip
                joined.append(target)
            target.weight = item.weight
            discovered.append(target)
        self.targets = self.fixed + tuple(discovered)
        if self._discovered_once:
            self.balancer.set_targets(self.targets, time.monotonic())  # new ones ramp up
        else:  # the first answer: the upstream's targets from the start, none ramping
            self.balancer = Balancer(
                self.targets, self.settings.balance, slow_start=self.settings.slow_start
            )
            self._discovered_once = True
        if self.health is not None:
            self.health.targets = self.targets
            self.health.joined(joined)
        for back in joined:
            self.connector.target_back(back.host, back.port)
        for gone in known.values():
            self.connector.close_target(gone.host, gone.port)
        if known or discovered:
            log.info(
                "upstream %s: %d targets (%d discovered)%s", self.name, len(self.targets),
                len(discovered), f"; draining {', '.join(known)}" if known else "",
            )  # fmt: skip

    def pick(self, exclude: Sequence[TargetState] = (), key: str | None = None) -> TargetState:
        """The target for the next attempt, by the upstream's `balance` (`key`: what
        balance: hash hashes). Raises NoTarget while discovery has found none."""
        target = self.balancer.pick(time.monotonic(), exclude, key)
        if self.balancer.panic != self.panicking:
            self.panicking = self.balancer.panic
            if self.panicking:
                log.warning("upstream %s: no target is healthy; panic mode, trying them all",
                            self.name)  # fmt: skip
            else:
                log.info("upstream %s: healthy targets again, panic mode over", self.name)
        return target

    def answered(
        self, target: TargetState, acquisition: Acquisition, response: UpstreamResponse
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

    async def aclose(self, reason: str = "shutdown") -> None:
        """Stop health checks, discovery and warming; close the sessions, every pooled
        connection (counted under `reason`: reload or shutdown) and every tunnel."""
        if self.health is not None:
            await self.health.aclose()
        if self.discovery is not None:
            await self.discovery.aclose()
        await self.connector.stop_warming()
        if self.tunnels:
            self._tunnels_gone = asyncio.Event()
            for tunnel in list(self.tunnels):
                tunnel.close(abort=True)
            with contextlib.suppress(TimeoutError):  # each one writes its access log line
                await asyncio.wait_for(self._tunnels_gone.wait(), _TUNNELS_CLOSE)
        await self.connector.close_all(reason)
        await asyncio.gather(self.session.close(), self.tunnel_session.close())


def _authority(found: Found) -> str:
    """host_header: target for a discovered target: the name it was found by and its port
    (as a virtual host expects it), by the rule of a fixed target's (policy.target_host)."""
    return target_host(str(URL(found.url).with_host(found.server_name)))
