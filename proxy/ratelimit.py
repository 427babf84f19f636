"""routes[].rate_limit: a token bucket per route and key (the client's address, the route, or a
header's value), and the answer for a request over it (429, Retry-After, no upstream contact).

Each worker enforces its share: requests_per_second / workers and burst / workers, rounded up.
A route's table holds at most MAX_KEYS buckets, least recently used dropped first, so a flood of
distinct addresses or header values costs bounded memory. The buckets are pure; `too_many` is
the one answer. Knows nothing of YAML or metrics.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from aiohttp import web
from multidict import MultiMapping

from proxy import respond
from proxy.config import Config, RateLimit, Route
from proxy.exchange import Exchange

# Buckets per route. One, with its key and table entry, takes ~280 bytes (tracemalloc, an IPv4
# or IPv6 address as key): 65536 of them ~18 MiB per limited route, at worst. A key dropped
# while its bucket was not full again gets a full one next time: a flood of new keys can loosen
# the limit for the keys it pushes out, never tighten it.
MAX_KEYS = 65536
_LONGEST_KEY = 64  # characters of a header:NAME key kept as they are; longer ones are hashed


def worker_count(config: Config) -> int:
    """How many processes share the limits: `workers` (auto: the CPUs, as workers.py starts)."""
    return config.workers or os.cpu_count() or 1


class Buckets:
    """One route's buckets: `take` a token for a key, or learn how long until there is one."""

    __slots__ = ("_table", "burst", "header", "max_keys", "per_client", "rate", "settings")

    def __init__(self, settings: RateLimit, workers: int = 1, max_keys: int = MAX_KEYS) -> None:
        self.settings = settings
        self.rate = settings.requests_per_second / workers  # tokens per second
        self.burst = float(math.ceil(settings.burst / workers))  # at least 1: burst >= 1
        kind, _, name = settings.key.partition(":")
        self.header = name if kind == "header" else None  # key: header:NAME
        self.per_client = kind == "client_ip"  # else one bucket (key: route)
        self.max_keys = max_keys
        # key -> [tokens, when last refilled]; the most recently used last.
        self._table: OrderedDict[str | None, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: str | None, now: float) -> float:
        """0.0 if a token was taken; else the seconds until the key's bucket has one."""
        table = self._table
        bucket = table.get(key)
        if bucket is None:
            if len(table) >= self.max_keys:
                table.popitem(last=False)
            bucket = table[key] = [self.burst, now]
        else:
            table.move_to_end(key)
            tokens = bucket[0] + (now - bucket[1]) * self.rate
            bucket[0] = tokens if tokens < self.burst else self.burst
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate


class RateLimits:
    """Every limited route's buckets, by route name. A reload keeps a route's buckets while its
    rate_limit is unchanged; the buckets of routes gone or changed are dropped."""

    __slots__ = ("_routes", "_workers")

    def __init__(
        self, routes: Iterable[Route], workers: int = 1, keep: RateLimits | None = None
    ) -> None:
        self._workers = workers
        kept: Mapping[str, Buckets] = {}
        if keep is not None and keep._workers == workers:
            kept = keep._routes
        self._routes: dict[str, Buckets] = {}
        for route in routes:
            if route.rate_limit is not None:
                old = kept.get(route.name)
                if old is None or old.settings != route.rate_limit:
                    old = Buckets(route.rate_limit, workers)
                self._routes[route.name] = old

    def retry_after(self, route: Route, client: str | None, headers: MultiMapping[str]) -> int:
        """0 if the request may go on; else the whole seconds (at least 1) the client is to
        wait, for Retry-After (RFC 9110 §10.2.3)."""
        if route.rate_limit is None:
            return 0  # the common case: one attribute read
        buckets = self._routes[route.name]
        if buckets.header is not None:
            key = headers.get(buckets.header)  # without it, requests share the None bucket
            if key is not None and len(key) > _LONGEST_KEY:
                # A client picks this value: 65,536 keys of 8 KiB would be half a GiB.
                key = hashlib.blake2b(
                    key.encode("utf-8", "surrogateescape"), digest_size=16
                ).hexdigest()
        else:
            key = client if buckets.per_client else None
        wait = buckets.take(key, time.monotonic())
        return max(1, math.ceil(wait)) if wait else 0


def too_many(exchange: Exchange, seconds: int) -> web.Response:
    """The answer over the limit, counted as such: nothing went upstream."""
    exchange.rate_limited = True
    response = respond.answer(exchange, 429, "too many requests on this route; retry later")
    response.headers["Retry-After"] = str(seconds)
    return response
