"""Target choice: which target of an upstream gets the next request.

Owns each target's live state (in flight, health, ejection, rest, time in rotation), the four
strategies (round_robin, least_requests, random, hash) and slow start; knows nothing of aiohttp,
YAML or routes. The target set may change while running (discovery): `Balancer.set_targets`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping
from yarl import URL

# The hash ring. A target's points depend on its own URL and weight only, never on the other
# targets (no gcd, no scaling to the largest weight): when one target joins or leaves, or its
# weight changes, only the keys on its own arcs move and every other key keeps its target.
# Points per unit of weight: a target's share of the ring strays from its weight's share by
# about 1/sqrt(points) (simulated: ±10% at 48 points for 2 targets, ±14% for 10); the bounded
# load below keeps a target whose arcs came out long from taking more than 125% of its fair
# share of the requests in flight anyway. (Weights 10 instead of 1 give a finer ring.)
_POINTS_PER_WEIGHT = 48
# A target's points are capped, so the ring stays small whatever the weights (SRV weights go
# to 65535; a YAML weight is any positive int): weights 1..10 get exactly proportional shares
# of the ring (SRV's customary 10 included), a weight above 10 counts as 10 on it (the bounded
# load still uses the real weight). Not a cap relative to the largest weight present: that
# would make every target's points depend on the others again. The cap is what a ring build
# (on the event loop, at each discovery change) may cost: 100 targets at the cap are 48,000
# points, built in 22-26 ms (measured on a busy 2-core box, Python 3.11; 10 targets: 2 ms):
# about half a 50 ms budget, a margin for slower machines. (The old ring, with points per
# weight divided by the weights' gcd, took 33 s for weights [1, 65535].)
_MAX_POINTS = 480

# Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016; Envoy's
# hash_balance_factor): a target takes at most this many times its weight's share of the
# requests in flight before its keys spill over to the next target on the ring. 1.25 is the
# paper's and Envoy's usual setting: it leaves hot keys room to stay put (few keys move) yet
# caps any target at 125% of its fair load.
_LOAD_FACTOR = 1.25

_RAMP_START = 0.1  # slow start: a target enters rotation at 10% of its weight...


class NoTarget(Exception):
    """The upstream has no target at all (discovery has found none yet)."""


@dataclass(eq=False, slots=True, weakref_slot=True)
class TargetState:
    """One target as the proxy sees it now. Compared by identity."""

    url: str
    weight: int = 1
    in_flight: int = 0  # requests being forwarded to it now
    healthy: bool = True  # the active health check's verdict (True when there is none)
    ejected_until: float = 0.0  # monotonic; passive outlier ejection
    rested_until: float = 0.0  # monotonic; the target asked for a rest (Retry-After)
    consecutive_failures: int = 0
    ejections: int = 0  # ejections in a row, for the doubling back-off
    ejection_counts: dict[str, int] = field(default_factory=dict)  # by reason, for metrics
    attempt_failures: dict[str, int] = field(default_factory=dict)  # by failure kind
    smooth_weight: float = 0  # smooth weighted round robin's running weight
    # Slow start: when it last came into rotation (monotonic; -inf = since start-up, no ramp),
    # and whether it was available when a pick last looked (to see it recover).
    in_rotation_since: float = -math.inf
    was_available: bool = True
    # Set by upstream.py for its own use (TLS, the Host header, discovery, /pools).
    server_hostname: str | None = None  # SNI and the certificate name to verify (https)
    authority: str = ""  # host[:port] for routes[].host_header: target
    discovered_from: str = ""  # "dns:NAME" or "srv:NAME"; "" for a fixed target
    host: str = ""
    port: int | None = None
    connect_request: Any = None  # wire.py's, made at its first request (a ClientRequest)

    def __post_init__(self) -> None:
        url = URL(self.url)
        self.host, self.port = url.host or "", url.port

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and now >= self.rested_until


def hash_key(
    hash_on: str | None, client_ip: str | None, path: str, headers: Mapping[str, str]
) -> str | None:
    """What `balance: hash` hashes for a request (config's `hash_on`; None = client_ip), or None
    when the request lacks it (the balancer then uses least_requests). `path` is the request's
    path without its query; `headers` a multidict in practice (every Cookie line is read)."""
    if hash_on is None or hash_on == "client_ip":
        return client_ip
    if hash_on == "path":
        return path
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        return headers.get(name)
    # cookie:NAME. RFC 6265 §5.4: "name=value" pairs joined by "; "; HTTP/2 may split them over
    # several Cookie lines (RFC 9113 §8.2.3). The first pair of that name wins (§5.4 step 2
    # sends the most specific cookie first).
    lines: Sequence[str]
    if isinstance(headers, MultiMapping):
        lines = headers.getall("Cookie", ())
    else:
        lines = [line] if (line := headers.get("Cookie")) is not None else []
    for line in lines:
        for pair in line.split(";"):
            cookie, sep, value = pair.strip().partition("=")
            if sep and cookie == name:
                return value
    return None


def _hash64(text: str) -> int:
    # Not hash(): it is salted per process, and with `workers: N` every worker must send a key
    # to the same target. surrogatepass: a header value may hold undecodable bytes.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _ring_position(hash64: int) -> float:
    # The top 53 bits, exact in a float (a float list sorts and bisects much faster than ints
    # of 64 bits, which CPython stores in several digits).
    return float(hash64 >> 11)


def _ring_points(url: str, weight: int) -> list[float]:
    """A target's ring points: _POINTS_PER_WEIGHT per unit of weight, at most _MAX_POINTS.
    The first n 8-byte blocks of SHAKE-128(url) (an extendable-output hash: asking for more
    output extends it), so a target's points depend on nothing else, the same in every process
    and on every machine, and a weight change keeps the points the smaller weight had."""
    count = max(1, min(_POINTS_PER_WEIGHT * weight, _MAX_POINTS))
    stream = hashlib.shake_128(url.encode("utf-8", "surrogatepass")).digest(8 * count)
    return [_ring_position(h) for h in struct.unpack(f">{count}Q", stream)]


class Balancer:
    """Picks among the targets that are available now; when none is, among all (panic mode,
    as Envoy does: better to try a target that may have recovered than to fail everything)."""

    def __init__(
        self,
        targets: Sequence[TargetState],
        strategy: str,
        rng: random.Random | None = None,
        *,
        slow_start: float = 0.0,
    ) -> None:
        self._rng = rng or random.Random()
        self._hashing = strategy == "hash"
        # A hash request without a key (no such header or cookie) is balanced by least_requests.
        self._choose: Callable[[Sequence[TargetState], Sequence[float]], TargetState] = {
            "round_robin": self._round_robin,
            "least_requests": self._least_requests,
            "random": self._random,
            "hash": self._least_requests,
        }[strategy]
        self.slow_start = slow_start  # s; 0 = off
        self._ramp_until = -math.inf  # no target ramps from then on: the usual, cheap case
        self.panic = False  # the last pick found no available target
        self._install(targets)  # the start-up set: full weight at once

    def set_targets(self, targets: Sequence[TargetState], now: float | None = None) -> None:
        """Replace the target set (discovery). Targets that stay are the same objects and keep
        their state; new ones slow-start from `now`, or from the next pick when None."""
        old = set(self.targets)
        for target in targets:
            if self.slow_start and target not in old:
                if now is None:
                    target.was_available = False  # the next pick sees it "recover"
                else:
                    self._start_ramp(target, now)
        self._install(targets)

    def _install(self, targets: Sequence[TargetState]) -> None:
        self.targets = tuple(targets)
        self._weights = tuple(t.weight for t in self.targets)
        if self._hashing:
            self._build_ring()

    def _build_ring(self) -> None:
        # Points in a sorted list of floats (to bisect) and a dict to their target: quicker to
        # build than a second list in the same order (an argsort), which took half again as long.
        # Two targets' points coinciding (odds ~1e-7 for 48,000 points) go to the later target.
        self._ring_hashes: list[float] = []
        self._ring_owners: dict[float, TargetState] = {}
        for target in self.targets:
            points = _ring_points(target.url, target.weight)
            self._ring_hashes += points
            self._ring_owners.update(zip(points, itertools.repeat(target)))
        self._ring_hashes.sort()

    def effective_weight(self, target: TargetState, now: float) -> float:
        """The target's weight now: slow start ramps it from 10% to 100% over slow_start s."""
        elapsed = now - target.in_rotation_since
        if not self.slow_start or elapsed >= self.slow_start:
            return float(target.weight)
        return target.weight * (_RAMP_START + (1 - _RAMP_START) * max(elapsed, 0) / self.slow_start)

    def pick(
        self, now: float, exclude: Sequence[TargetState] = (), key: str | None = None
    ) -> TargetState:
        """The target for the next attempt; `exclude` holds targets this request already tried
        (a retry goes elsewhere when there is anywhere else to go); `key` is the request's
        `hash_key` (used by hash only)."""
        targets = self.targets
        if self.slow_start:
            self._track(now)
        if len(targets) == 1:  # the common case, kept cheap
            only = targets[0]
            self.panic = not only.available(now)
            return only
        if not targets:
            raise NoTarget("no target (discovery has found none yet)")
        if key is not None and self._hashing:
            return self._by_hash(_hash64(key), now, exclude)
        ramping = now < self._ramp_until
        if not exclude:
            for target in targets:
                if not target.available(now):
                    break
            else:  # all in rotation, nothing to exclude: the common case, no list to build
                self.panic = False
                if ramping:
                    return self._choose(targets, [self.effective_weight(t, now) for t in targets])
                return self._choose(targets, self._weights)
        candidates = [t for t in targets if t.available(now) and t not in exclude]
        self.panic = not candidates and not any(t.available(now) for t in targets)
        if not candidates:
            candidates = [t for t in targets if t not in exclude] or list(targets)
        if len(candidates) == 1:
            return candidates[0]
        if ramping:
            return self._choose(candidates, [self.effective_weight(t, now) for t in candidates])
        return self._choose(candidates, [t.weight for t in candidates])

    def _track(self, now: float) -> None:
        """Slow start: a target that is available now and was not at the last pick (recovered,
        or new) starts its ramp now. Runs only when slow start is on."""
        for target in self.targets:
            available = target.available(now)
            if available != target.was_available:
                target.was_available = available
                if available:
                    self._start_ramp(target, now)

    def _start_ramp(self, target: TargetState, now: float) -> None:
        target.in_rotation_since = now
        target.was_available = True
        self._ramp_until = max(self._ramp_until, now + self.slow_start)

    def _by_hash(self, point: int, now: float, exclude: Sequence[TargetState]) -> TargetState:
        """The first target clockwise from the key's point that is available, not excluded,
        within its bounded load and past its ramp; usually the very first point's."""
        weight_available = in_flight = 0
        for target in self.targets:
            in_flight += target.in_flight
            if target.available(now):
                weight_available += target.weight
        self.panic = not weight_available  # then every target counts as available
        # Its in-flight requests plus this one, shared by weight, times the load factor.
        per_weight = _LOAD_FACTOR * (in_flight + 1) / (weight_available or sum(self._weights))
        # Slow start keeps the hash deterministic: a ramping target takes the key only if the
        # key's own fraction (its low 16 bits; its place on the ring is its top 53) is below
        # the ramp's, so each key moves to it once, as the ramp passes it, and never flaps.
        ramping = now < self._ramp_until
        fraction = (point & 0xFFFF) / 0x10000
        ring, owners = self._ring_hashes, self._ring_owners
        start = bisect.bisect(ring, _ring_position(point))
        # Each target is judged once, at its first point on the walk; the walk ends when every
        # target has been judged. Fallbacks, also the first on the walk so still by key: an
        # available target not tried yet, ignoring its load bound and ramp (never an unhealthy
        # or ejected one while an available one is left); else any not tried yet (as the other
        # strategies would); else the key's own.
        seen: set[TargetState] = set()
        available = untried = None
        for step in range(len(ring)):
            target = owners[ring[(start + step) % len(ring)]]
            if target in seen:
                continue
            seen.add(target)
            if target not in exclude:
                if self.panic or target.available(now):
                    if target.in_flight < math.ceil(per_weight * target.weight) and (
                        not ramping or fraction < self.effective_weight(target, now) / target.weight
                    ):
                        return target
                    if available is None:
                        available = target
                elif untried is None:
                    untried = target
            if len(seen) == len(self.targets):
                break
        return available or untried or owners[ring[start % len(ring)]]

    def _round_robin(
        self, candidates: Sequence[TargetState], weights: Sequence[float]
    ) -> TargetState:
        # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        total: float = 0
        best = candidates[0]
        for target, weight in zip(candidates, weights, strict=True):
            target.smooth_weight += weight
            total += weight
            if target.smooth_weight > best.smooth_weight:
                best = target
        best.smooth_weight -= total
        return best

    def _draw(self, weights: Sequence[float], skip: int = -1) -> int:
        """The index of a target drawn by weight (never `skip`): one random() and a walk."""
        total = sum(weights) - (weights[skip] if skip >= 0 else 0)
        left = self._rng.random() * total
        for i, weight in enumerate(weights):
            if i == skip:
                continue
            left -= weight
            if left < 0:
                return i
        return len(weights) - 1 if skip != len(weights) - 1 else len(weights) - 2

    def _random(self, candidates: Sequence[TargetState], weights: Sequence[float]) -> TargetState:
        return candidates[self._draw(weights)]

    def _least_requests(
        self, candidates: Sequence[TargetState], weights: Sequence[float]
    ) -> TargetState:
        # Power of two choices: two targets drawn by weight, the one with fewer requests in
        # flight per unit of weight wins. Near-optimal spread without scanning every target.
        i = self._draw(weights)
        j = self._draw(weights, skip=i)
        first, second = candidates[i], candidates[j]
        if second.in_flight * weights[i] < first.in_flight * weights[j]:
            return second
        return first
