"""`Snapshot`: the routing table and the upstreams in force, read once by each request; a
reload builds a new one and swaps the reference. Knows nothing of requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.routing import RoutingTable
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one request reads, once, at its start: a reload swaps the whole snapshot."""

    routes: RoutingTable
    upstreams: Mapping[str, Upstream]

    def start(self) -> None:
        for upstream in self.upstreams.values():
            upstream.start()

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))
