"""One `Upstream` per YAML upstream: its own ClientSession and TCPConnector, target choice, and
the pool's live state.

Owns the connection pool and how it is configured for a proxy; knows nothing of routes or YAML.
The only module that touches aiohttp's private connector state, all of it in `PoolConnector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from proxy import config
from proxy.balancing import Balancer, TargetState
from proxy.health import HealthChecker, Outlier, rest, retry_after_seconds
from proxy.tls import Certificate, client_context, expired, tls_files_stamp

if TYPE_CHECKING:
    from proxy.tunnel import Tunnel

log = logging.getLogger("proxy")

# "Keep-Alive: timeout=5, max=100" (RFC 2068 §19.7.1, still sent by Apache, nginx and others).
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?i)\btimeout\s*=\s*(\d+(?:\.\d+)?)")

# aiohttp invents these on requests unless told not to (AIOHTTP-NOTES §0.3); a proxy must not.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

# Why an upstream connection was closed instead of being reused.
DISCARD_REASONS = ("unsolicited_data",)
_STRAY_LOG_EVERY = 60.0  # s between two log lines about stray bytes from one upstream
_TUNNELS_CLOSE = 5.0  # s aclose() waits for aborted tunnels to report closed (one loop turn)


class Acquisition:
    """What the connector saw while getting one attempt its connection. Set per attempt in a
    ContextVar, because it happens deep inside aiohttp's connector, in the request's own task."""

    __slots__ = ("fresh_only", "protocol", "queued", "reused", "waited")

    def __init__(self, fresh_only: bool = False) -> None:
        self.fresh_only = fresh_only  # never an idle pooled connection (a retry after a stale one)
        self.waited = 0.0  # seconds spent waiting for a pool slot
        self.queued = False  # still waiting for a slot when the attempt ended
        self.reused: bool | None = None  # whether the connection had served a request before
        self.protocol: ResponseHandler | None = None


ACQUISITION: ContextVar[Acquisition] = ContextVar("acquisition")


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, deaf while it sits idle in the pool.

    aiohttp keeps parsing bytes that arrive on an idle pooled connection and hands them to the
    next request as its response (AIOHTTP-NOTES §1.13): a backend that writes a second response
    would answer another client's request, and every request after it on that connection would
    get the answer meant for the one before. No byte may arrive while no request is out, so a
    connection that receives one is closed unread, as nginx does.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_stray: Callable[[ResponseHandler], None]
    ) -> None:
        super().__init__(loop)
        self.idle = False  # in the pool, with no request out
        self._on_stray = on_stray

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            self.idle = False
            self.close()  # the connector's _get skips a closed connection
            self._on_stray(self)
            return
        super().data_received(data)


def take_upgraded(
    response: aiohttp.ClientResponse, protocol: asyncio.BaseProtocol
) -> tuple[asyncio.Transport, bytes]:
    """Take the connection a 101 came on away from aiohttp and give it to `protocol` (tunnel.py):
    out of its connector's count, never pooled, read, timed or closed by aiohttp again. Returns
    the transport and the bytes that came after the 101 head. Uses `Connection._protocol`,
    `._key`, `._connector`, `BaseConnector._release_acquired`, `ResponseHandler._tail` and
    `._drop_timeout` (internals.py checks them)."""
    connection = response.connection
    assert connection is not None and connection.protocol is not None  # forwardable checked
    handler = connection.protocol
    transport = handler.transport
    assert transport is not None
    connection._connector._release_acquired(connection._key, handler)
    connection._protocol = None  # the response's release() leaves the connection alone
    handler._drop_timeout()  # timeouts.read: a quiet tunnel is not a slow response
    handler.transport = None
    tail, handler._tail = handler._tail, b""
    transport.set_protocol(protocol)
    return transport, tail


def _holds_stray_bytes(protocol: ResponseHandler) -> bool:
    """Whether bytes beyond the last response were parsed or buffered (aiohttp 3.14.5's
    `DataQueue._buffer` holds parsed responses nobody read, `_tail` unparsed bytes)."""
    return bool(protocol._buffer or protocol._tail)


class PoolFull(aiohttp.ClientConnectionError):
    """`max_pending` requests already wait for a slot: this one is refused at once."""


@dataclass(frozen=True, slots=True)
class TargetStats:
    url: str
    active: int
    idle: int


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that also counts what the pool metrics need.

    Overrides three private coroutines (`_wait_for_available_connection`, `_get`,
    `_create_connection`), the private `_release` and `_factory`, and the public `connect`, and
    reads two private attributes (`_acquired`, `_conns`) of aiohttp's BaseConnector, checked
    against aiohttp 3.14.5 (pinned ~=3.14.0); `check_aiohttp()` fails at start-up if they move.
    """

    def __init__(self, *, name: str = "", max_pending: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name  # the upstream's, for log lines
        self.max_pending = max_pending  # 0 = unbounded
        self.created = 0  # TCP connections opened since start
        self.waiting = 0  # requests waiting for a free slot now
        self.retired = 0  # idle connections closed before the upstream's announced timeout
        self.discarded = dict.fromkeys(DISCARD_REASONS, 0)  # closed, never reused, by reason
        self._stray_logged = -_STRAY_LOG_EVERY
        self._factory = functools.partial(  # type: ignore[assignment]
            GuardedResponseHandler, loop=self._loop, on_stray=self._discard_stray
        )
        self._retire_at: weakref.WeakKeyDictionary[ResponseHandler, float] = (
            weakref.WeakKeyDictionary()
        )
        self._target_of: weakref.WeakKeyDictionary[ResponseHandler, tuple[str, int | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._unused: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        if self.max_pending and self.waiting >= self.max_pending:
            raise PoolFull(f"{self.waiting} requests already wait for a connection")
        acquisition = ACQUISITION.get(None) or Acquisition()
        self.waiting += 1
        acquisition.queued = True
        started = time.monotonic()
        try:
            await super()._wait_for_available_connection(key, traces)
            acquisition.queued = False  # stays True if the connect timeout ends the wait
        finally:
            self.waiting -= 1
            acquisition.waited += time.monotonic() - started

    async def _get(self, key: Any, traces: Any) -> Any:
        # Skip idle connections past the idle timeout their upstream announced (Keep-Alive:
        # timeout=N): reusing one races the upstream closing it, the stale keep-alive 502.
        acquisition = ACQUISITION.get(None)
        if acquisition is not None and acquisition.fresh_only:
            return None  # its siblings are likely stale too: open a new connection
        while (connection := await super()._get(key, traces)) is not None:
            protocol = connection.protocol
            if protocol is None:  # pragma: no cover - aiohttp hands out live connections
                return connection
            if isinstance(protocol, GuardedResponseHandler):
                protocol.idle = False
            if _holds_stray_bytes(protocol):
                self._discard_stray(protocol)  # the second line of defence, see _release
                connection.close()
                continue
            deadline = self._retire_at.get(protocol)
            if deadline is None or time.monotonic() < deadline:
                return connection
            self.retired += 1
            connection.close()
        return None

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        # Bytes that came in after the response (with it, or while the client was still being
        # written to) make aiohttp close the connection; they are counted here. Bytes that come
        # later, once it is idle, are refused by GuardedResponseHandler.
        if _holds_stray_bytes(protocol) and protocol.is_connected():
            self._discard_stray(protocol)
            should_close = True
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, GuardedResponseHandler) and protocol.is_connected():
            protocol.idle = True

    def _discard_stray(self, protocol: ResponseHandler) -> None:
        self.discarded["unsolicited_data"] += 1
        now = time.monotonic()
        if now - self._stray_logged < _STRAY_LOG_EVERY:
            return  # counted; one line a minute is enough to say it goes on
        self._stray_logged = now
        host, port = self._target_of.get(protocol, ("?", None))
        log.warning(
            "upstream %s: target %s:%s sent bytes that answer no request; closed that "
            "connection (a buggy backend, or a request smuggled in a body; %d so far, see "
            "proxy_upstream_connections_discarded_total)",
            self.name, host, port, self.discarded["unsolicited_data"],
        )  # fmt: skip

    def retire_after(self, protocol: ResponseHandler, seconds: float) -> None:
        """Do not reuse `protocol` once about `seconds` have passed from now (its response's
        headers): a little before the upstream's idle timer, which starts later, runs out."""
        margin = min(1.0, seconds / 2)  # leave time for the request to reach the upstream
        self._retire_at[protocol] = time.monotonic() + seconds - margin

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        self.created += 1
        key = req.connection_key
        self._target_of[protocol] = (key.host, key.port)
        self._unused.add(protocol)
        return protocol

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        fresh = protocol is not None and protocol in self._unused
        if protocol is not None and fresh:
            self._unused.discard(protocol)
        acquisition = ACQUISITION.get(None)
        if acquisition is not None:
            acquisition.reused = not fresh
            acquisition.protocol = protocol
        return connection

    def target_stats(self) -> dict[tuple[str, int | None], tuple[int, int]]:
        """(host, port) -> (active, idle) connections: the one reader of aiohttp's private
        pool state (`_acquired`, `_conns`), read at scrape time, never per request."""
        stats: dict[tuple[str, int | None], list[int]] = {}
        for protocol in getattr(self, "_acquired", ()):
            if not isinstance(protocol, ResponseHandler):
                continue  # aiohttp's placeholder for a connection still being made
            target = self._target_of.get(protocol)
            if target is not None:
                stats.setdefault(target, [0, 0])[0] += 1
        for key, idle in getattr(self, "_conns", {}).items():
            alive = sum(1 for protocol, _ in idle if protocol.is_connected())
            stats.setdefault((key.host, key.port), [0, 0])[1] += alive
        return {target: (active, idle) for target, (active, idle) in stats.items()}


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
