"""Target choice: which target of an upstream gets the next request.

Owns each target's live state (in flight, health, ejection, rest) and the three strategies;
knows nothing of aiohttp, YAML or routes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from yarl import URL


@dataclass(eq=False, slots=True)
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
    smooth_weight: int = 0  # smooth weighted round robin's running weight
    host: str = ""
    port: int | None = None

    def __post_init__(self) -> None:
        url = URL(self.url)
        self.host, self.port = url.host or "", url.port

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and now >= self.rested_until


class Balancer:
    """Picks among the targets that are available now; when none is, among all (panic mode,
    as Envoy does: better to try a target that may have recovered than to fail everything)."""

    def __init__(
        self, targets: Sequence[TargetState], strategy: str, rng: random.Random | None = None
    ) -> None:
        self.targets = tuple(targets)
        self._rng = rng or random.Random()
        self._choose: Callable[[Sequence[TargetState]], TargetState] = {
            "round_robin": self._round_robin,
            "least_requests": self._least_requests,
            "random": self._random,
        }[strategy]
        self.panic = False  # the last pick found no available target

    def pick(self, now: float, exclude: Sequence[TargetState] = ()) -> TargetState:
        """The target for the next attempt; `exclude` holds targets this request already tried
        (a retry goes elsewhere when there is anywhere else to go)."""
        targets = self.targets
        if len(targets) == 1:  # the common case, kept cheap
            only = targets[0]
            self.panic = not only.available(now)
            return only
        if not exclude:
            for target in targets:
                if not target.available(now):
                    break
            else:  # all in rotation, nothing to exclude: the common case, no list to build
                self.panic = False
                return self._choose(targets)
        candidates = [t for t in targets if t.available(now) and t not in exclude]
        self.panic = not candidates and not any(t.available(now) for t in targets)
        if not candidates:
            candidates = [t for t in targets if t not in exclude] or list(targets)
        if len(candidates) == 1:
            return candidates[0]
        return self._choose(candidates)

    def _round_robin(self, candidates: Sequence[TargetState]) -> TargetState:
        # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        total = 0
        best = candidates[0]
        for target in candidates:
            target.smooth_weight += target.weight
            total += target.weight
            if target.smooth_weight > best.smooth_weight:
                best = target
        best.smooth_weight -= total
        return best

    def _random(
        self, candidates: Sequence[TargetState], skip: TargetState | None = None
    ) -> TargetState:
        """A target drawn by weight (never `skip`): one random() and a walk, no lists."""
        total = sum(t.weight for t in candidates) - (skip.weight if skip is not None else 0)
        left = self._rng.random() * total
        for target in candidates:
            if target is skip:
                continue
            left -= target.weight
            if left < 0:
                return target
        return next(t for t in reversed(candidates) if t is not skip)

    def _least_requests(self, candidates: Sequence[TargetState]) -> TargetState:
        # Power of two choices: two targets drawn by weight, the one with fewer requests in
        # flight per unit of weight wins. Near-optimal spread without scanning every target.
        first = self._random(candidates)
        second = self._random(candidates, skip=first)
        if second.in_flight * first.weight < first.in_flight * second.weight:
            return second
        return first
