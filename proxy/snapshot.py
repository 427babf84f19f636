"""`Snapshot`: the routing table, the upstreams and the per-request policy in force, read once by
each request; a reload builds a new one (`build_snapshot`, which takes over the upstreams that
did not change) and swaps the reference. Knows nothing of requests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config import Config, RequestId
from proxy.policy import RoutePolicy, route_policies
from proxy.ratelimit import RateLimits, worker_count
from proxy.routing import RoutingTable
from proxy.tls import tls_files_stamp
from proxy.upstream import ClientTLS, Upstream


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


async def build_snapshot(
    config: Config,
    keep: Snapshot | None = None,
    rng: random.Random | None = None,
    tls: Mapping[str, ClientTLS] | None = None,
) -> Snapshot:
    """The routing table and one Upstream per configured upstream. Upstreams of `keep` whose
    settings and TLS files did not change are taken over as they are, with their warm
    connections. With `tls` (a rollback's: what each upstream had read before the reload),
    an upstream is taken over only if it holds the same versions of its TLS files, else built
    with that TLS, not from the files. If one cannot be built (a certificate file unreadable,
    say), those built so far are closed."""
    upstreams: dict[str, Upstream] = {}
    built: list[Upstream] = []
    try:
        for name, settings in config.upstreams.items():
            current = keep.upstreams.get(name) if keep is not None else None
            wanted = tls.get(name) if tls is not None else None
            if (
                current is not None
                and current.settings == settings
                and (not _rotated(current) if wanted is None else current.tls.files == wanted.files)
            ):
                upstreams[name] = current
            else:
                upstreams[name] = Upstream(name, settings, wanted)
                built.append(upstreams[name])
                if current is not None:
                    upstreams[name].succeed(current)
        # dns/srv targets resolved before the snapshot serves (or a reload swaps it in).
        await asyncio.gather(*(upstream.discover() for upstream in built))
    except BaseException:
        await asyncio.gather(*(upstream.aclose("reload") for upstream in built))
        raise
    return Snapshot(
        routes=RoutingTable(config.routes, rng), upstreams=upstreams,
        policies=route_policies(config),
        # Each worker enforces its share of every rate limit (ratelimit.py).
        limits=RateLimits(config.routes, worker_count(config), keep.limits if keep else None),
        request_id=config.request_id, trace_context=config.trace_context,
    )  # fmt: skip


def _rotated(upstream: Upstream) -> bool:
    """Whether the upstream's TLS files (tls.ca_file, tls.cert, tls.key) changed since it was
    built: a reload then builds it again, with the new CAs and certificate."""
    return tls_files_stamp(upstream.settings.tls) != upstream.tls.files


def rebuilt_for_tls(old: Snapshot, new: Snapshot) -> list[str]:
    """Upstreams whose TLS files `new` holds in other versions than `old`, under the same
    tls settings: read again (a reload), or their versions from before it (a rollback)."""
    return [
        name
        for name, upstream in new.upstreams.items()
        if (before := old.upstreams.get(name)) is not None
        and before.settings.tls == upstream.settings.tls
        and before.tls.files != upstream.tls.files
    ]


def files_differ(snapshot: Snapshot) -> list[str]:
    """Upstreams whose TLS files on disk are not the versions they hold (after a rollback)."""
    return [name for name, upstream in snapshot.upstreams.items() if _rotated(upstream)]


def upstream_tls(snapshot: Snapshot) -> dict[str, ClientTLS]:
    return {name: upstream.tls for name, upstream in snapshot.upstreams.items()}
