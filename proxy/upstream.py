"""One `Upstream` per YAML upstream: its own ClientSession and TCPConnector, and target choice.

Owns the connection pool and how it is configured for a proxy; knows nothing of routes or YAML.
"""

from __future__ import annotations

import itertools
import sys

import aiohttp

from proxy import config

# aiohttp invents these on requests unless told not to (AIOHTTP-NOTES §0.3); a proxy must not.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Upstream:
    """A named pool of targets. Build inside the running event loop; close with `aclose()`."""

    def __init__(self, name: str, settings: config.Upstream) -> None:
        self.name = name
        self.settings = settings
        self.targets = settings.targets
        self._next_target = itertools.cycle(settings.targets).__next__
        pool = settings.pool
        https = any(t.startswith("https://") for t in settings.targets)
        self.connector = aiohttp.TCPConnector(
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

    async def aclose(self) -> None:
        """Close the session and every pooled connection (in-flight ones are aborted)."""
        await self.session.close()
