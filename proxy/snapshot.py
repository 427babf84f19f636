"""`Snapshot`: the routing table, the upstreams and the per-request policy in force, read once by
each request; a reload builds a new one and swaps the reference. Knows nothing of requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config import RequestId
from proxy.policy import RoutePolicy
from proxy.ratelimit import RateLimits
from proxy.routing import RoutingTable
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one request reads, once, at its start: a reload swaps the whole snapshot."""

    routes: RoutingTable
    upstreams: Mapping[str, Upstream]
    limits: RateLimits = field(default_factory=lambda: RateLimits(()))  # routes[].rate_limit
    request_id: RequestId = field(default_factory=RequestId)
    trace_context: bool = True
    # By route name, only routes with a policy of their own (policy.py); others get PLAIN.
    policies: Mapping[str, RoutePolicy] = field(default_factory=dict)

    def start(self) -> None:
        for upstream in self.upstreams.values():
            upstream.start()

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))
