"""One `Upstream` per YAML upstream: its own ClientSession and TCPConnector, target choice, and
the pool's live state.

Owns the connection pool and how it is configured for a proxy; knows nothing of routes or YAML.
The only module that touches aiohttp's private connector state, all of it in `PoolConnector`.
"""

from __future__ import annotations

import itertools
import sys
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from proxy import config

# aiohttp invents these on requests unless told not to (AIOHTTP-NOTES §0.3); a proxy must not.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

# What the connector saw while getting the current request its connection: seconds spent
# waiting for a pool slot, and whether the connection had served a request before. ContextVars,
# because this happens deep inside aiohttp's connector, in the task of the request itself.
POOL_WAIT: ContextVar[float] = ContextVar("pool_wait", default=0.0)
REUSED: ContextVar[bool | None] = ContextVar("reused", default=None)


@dataclass(frozen=True, slots=True)
class TargetStats:
    url: str
    active: int
    idle: int


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that also counts what the pool metrics need.

    Overrides two private coroutines and reads three private attributes of aiohttp's
    BaseConnector, checked against aiohttp 3.14.5 (pinned ~=3.14.0);
    tests/e2e/test_metrics.py::test_pool_connector_hooks_exist fails loudly if they move.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.created = 0  # TCP connections opened since start
        self.waiting = 0  # requests waiting for a free slot now
        self._target_of: weakref.WeakKeyDictionary[ResponseHandler, tuple[str, int | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._unused: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        self.waiting += 1
        started = time.monotonic()
        try:
            await super()._wait_for_available_connection(key, traces)
        finally:
            self.waiting -= 1
            POOL_WAIT.set(POOL_WAIT.get() + time.monotonic() - started)

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
        REUSED.set(not fresh)
        return connection

    def target_stats(self) -> dict[tuple[str, int | None], tuple[int, int]]:
        """(host, port) -> (active, idle) connections: the one reader of aiohttp's private
        pool state (`_acquired`, `_conns`), read at scrape time, never per request."""
        stats: dict[tuple[str, int | None], list[int]] = {}
        for protocol in getattr(self, "_acquired", ()):
            target = self._target_of.get(protocol)  # None for a connection still being made
            if target is not None:
                stats.setdefault(target, [0, 0])[0] += 1
        for key, idle in getattr(self, "_conns", {}).items():
            stats.setdefault((key.host, key.port), [0, 0])[1] += len(idle)
        return {target: (active, idle) for target, (active, idle) in stats.items()}


class Upstream:
    """A named pool of targets. Build inside the running event loop; close with `aclose()`."""

    def __init__(self, name: str, settings: config.Upstream) -> None:
        self.name = name
        self.settings = settings
        self.targets = tuple(t.url for t in settings.targets)
        self._next_target = itertools.cycle(self.targets).__next__
        self.in_flight = 0  # requests being forwarded now (kept by forward.py)
        self.requests = 0  # requests forwarded since start
        pool = settings.pool
        https = any(t.startswith("https://") for t in self.targets)
        self.connector = PoolConnector(
            limit=pool.limit,
            limit_per_host=pool.limit_per_host,
            # keepalive_timeout=0 alone would keep idle sockets; force_close closes each one.
            keepalive_timeout=pool.keepalive_timeout if pool.keepalive_timeout > 0 else None,
            force_close=pool.keepalive_timeout == 0,
            # Needed only where Python's SSL transport can leak aborted sockets (< 3.12.8).
            enable_cleanup_closed=https and sys.version_info < (3, 12, 8),
        )
        self.session = aiohttp.ClientSession(
            connector=self.connector,
            # Never the default total=300 s: it would cut every long stream at 5 minutes.
            # `connect` bounds the wait for a pool slot plus the TCP connect; `sock_read`
            # bounds the silence between two reads.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=settings.timeouts.connect, sock_read=settings.timeouts.read
            ),
            auto_decompress=False,  # bodies pass through compressed as they are
            cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would mix users' cookies
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,  # HTTP_PROXY in the environment must not reroute upstream traffic
            raise_for_status=False,
        )

    def pick_target(self) -> str:
        """The next target, round robin: "scheme://host:port"."""
        return self._next_target()

    def target_stats(self) -> list[TargetStats]:
        """Active and idle connections per configured target, in config order."""
        by_address = self.connector.target_stats()
        stats = []
        for url in self.targets:
            parsed = URL(url)
            active, idle = by_address.get((parsed.host or "", parsed.port), (0, 0))
            stats.append(TargetStats(url, active, idle))
        return stats

    async def aclose(self) -> None:
        """Close the session and every pooled connection (in-flight ones are aborted)."""
        await self.session.close()
