"""What happened in the last minute: requests, errors, latency and connection reuse by route,
upstream and target, in one-second slots.

The status page (status.py) shows the last 10 s of it; a reload's verification (rollback.py)
compares a changed route's or upstream's error ratio after the reload with its ratio before.
Prometheus keeps the long history; this is the proxy's own short memory, for answers it gives
itself. Fed once per finished request (`record`), from `ProxyServer._observe`.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.config import LATENCY_BUCKETS
from proxy.exchange import Exchange

SPAN = 60  # seconds kept

# What is asked for: ("route", name), ("upstream", name) or ("target", upstream, url).
Key = tuple[str, ...]
# What a slot counts by: (route, upstream, target URL); "" where there is none (a redirect).
_Triple = tuple[str, str, str]


class _Tally:
    __slots__ = ("errors", "forwarded", "latency", "requests", "reused")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.forwarded = 0  # answered over an upstream connection
        self.reused = 0  # ...one the pool had kept from an earlier request


def failed(e: Exchange) -> bool:
    """A request the proxy or its upstream failed: a 5xx, or an upstream error (a client that
    went away, 499, is not one; a 429 from the route's rate limit is an answer, not a failure)."""
    return e.status >= 500 or (e.error is not None and e.status != 499)


@dataclass(frozen=True, slots=True)
class Totals:
    """One key's sums over some seconds."""

    requests: int
    errors: int
    latency: tuple[int, ...]  # counts per LATENCY_BUCKETS bound, the last above them all
    seconds: int
    forwarded: int = 0  # requests answered over an upstream connection
    reused: int = 0  # ...over one the pool had kept from an earlier request

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def reuse_ratio(self) -> float | None:
        """The share of forwarded requests sent on a connection the pool kept."""
        return self.reused / self.forwarded if self.forwarded else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency, interpolated within its bucket as Prometheus's
        histogram_quantile does; the top bound when it falls above every bound."""
        total = sum(self.latency)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, count in enumerate(self.latency):
            if count and seen + count >= rank:
                if i == len(LATENCY_BUCKETS):
                    return LATENCY_BUCKETS[-1]
                low = LATENCY_BUCKETS[i - 1] if i else 0.0
                return low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / count
            seen += count
        return LATENCY_BUCKETS[-1]


_NOTHING = Totals(0, 0, (0,) * (len(LATENCY_BUCKETS) + 1), 0)


class Recent:
    """The last SPAN seconds of outcomes, one slot per second of `clock`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots: deque[tuple[int, dict[_Triple, _Tally]]] = deque()
        self._second = -1
        self._current: dict[_Triple, _Tally] = {}

    def _slot(self) -> dict[_Triple, _Tally]:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._current = {}
            self._slots.append((second, self._current))
            while self._slots[0][0] <= second - SPAN:  # older than the window: forgotten
                self._slots.popleft()
        return self._current

    def record(self, e: Exchange) -> None:
        """Count one finished request: the hot path, one dict lookup and a bisect. The sums by
        route, upstream and target are made when asked for (`combined`), not here."""
        slot = self._slot()
        triple = (e.route, e.upstream, e.upstream_target)
        tally = slot.get(triple)
        if tally is None:
            tally = slot[triple] = _Tally()
        tally.requests += 1
        tally.errors += failed(e)
        tally.latency[bisect.bisect_left(LATENCY_BUCKETS, e.duration)] += 1
        if e.reused is not None:
            tally.forwarded += 1
            tally.reused += e.reused

    def totals(self, key: Key, seconds: int, until: float | None = None) -> Totals:
        """`key`'s sums over the `seconds` whole seconds before `until` (default: now; the
        second in progress is left out, so a rate is never measured over a fraction)."""
        return self.combined([key], seconds, until)

    def combined(self, keys: Iterable[Key], seconds: int, until: float | None = None) -> Totals:
        """The sums of several keys over the same seconds."""
        end = int(self._clock() if until is None else until)
        start = end - seconds
        wanted = list(keys)
        requests = errors = forwarded = reused = 0
        latency = [0] * (len(LATENCY_BUCKETS) + 1)
        for second, slot in self._slots:
            if not start <= second < end:
                continue
            for triple, tally in slot.items():
                if any(_counts_for(key, triple) for key in wanted):
                    requests += tally.requests
                    errors += tally.errors
                    forwarded += tally.forwarded
                    reused += tally.reused
                    for i, count in enumerate(tally.latency):
                        latency[i] += count
        if not seconds:
            return _NOTHING
        return Totals(requests, errors, tuple(latency), seconds, forwarded, reused)


def _counts_for(key: Key, triple: _Triple) -> bool:
    """Whether a request counted by `triple` (route, upstream, target) counts for `key`."""
    kind, *names = key
    if kind == "route":
        return names[0] == triple[0]
    if kind == "upstream":
        return names[0] == triple[1]
    return (names[0], names[1]) == (triple[1], triple[2])
