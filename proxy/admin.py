"""The admin listener's application: metrics, the live pool view, health and readiness.

Owns what operators, Prometheus and orchestrators ask the proxy; knows nothing of the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.guard import AdminGuard
from proxy.rollback import Verification, verify_seconds
from proxy.snapshot import Snapshot


def pools_view(snapshot: Snapshot, connections: bool = False) -> dict[str, Any]:
    """Every pool as it is now: how a user sizes `limit` and `keepalive_timeout`; with
    `connections`, each upstream connection too (why the pool holds what it holds)."""
    upstreams = {}
    now = time.monotonic()
    for name, upstream in snapshot.upstreams.items():
        targets = upstream.target_stats()
        pool = upstream.settings.pool
        created, served = upstream.connector.created, upstream.requests
        upstreams[name] = {
            "targets": [
                {
                    "url": stats.url,
                    "discovered_from": target.discovered_from or None,
                    "weight": target.weight,
                    "effective_weight": round(upstream.balancer.effective_weight(target, now), 3),
                    "up": target.available(now),
                    "healthy": target.healthy,
                    "ejected_for": round(max(0.0, target.ejected_until - now), 1),
                    "resting_for": round(max(0.0, target.rested_until - now), 1),
                    "in_flight": target.in_flight,
                    "active": stats.active,
                    "idle": stats.idle,
                }
                for stats, target in zip(targets, upstream.targets, strict=True)
            ],
            "balance": upstream.settings.balance,
            "panic": not any(t.available(now) for t in upstream.targets),
            "limit": pool.limit,
            "limit_per_host": pool.limit_per_host,
            "keepalive_timeout": pool.keepalive_timeout,
            "active": sum(t.active for t in targets),
            "idle": sum(t.idle for t in targets),
            "waiting": upstream.connector.waiting,
            "in_flight": upstream.in_flight,
            "connections_created": created,
            "requests": served,
            # Share of requests that reused a pooled connection instead of opening one.
            "reuse_ratio": round(max(0, served - created) / served, 4) if served else None,
            "retries": dict(upstream.retries),
            "stale_connections": upstream.stale,
            "retired_connections": upstream.connector.retired,
            "pending_rejected": upstream.pending_rejected,
            "tunnels": upstream.tunnels_open,
            "tunnels_limit": upstream.settings.tunnels.limit,
            "connections_closed": dict(upstream.connector.closes),
        }
        if upstream.discovery is not None:
            upstreams[name]["discovery"] = {
                "refreshes": dict(upstream.discovery.refreshes),
                "last_error": upstream.discovery.last_error,
            }
        if connections:
            upstreams[name]["connections"] = upstream.connector.connections()
    return {"upstreams": upstreams}


def guarded(guard: AdminGuard) -> Middleware:
    """Every admin request passes `guard` first: a refusal is answered here, one line."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = guard.check(request.method, request.path, request.headers)
        if refusal is not None:
            return web.Response(
                status=refusal.status, text=refusal.reason + "\n", headers=refusal.headers
            )
        return await handler(request)

    return middleware


async def healthz(request: web.Request) -> web.Response:
    # Alive as long as the process answers: liveness must not fail during a drain.
    return web.Response(text="ok\n")


def reload_handler(
    reload: Callable[[float | None], Awaitable[tuple[bool, str]]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /reload: 200 and what changed, or 400 and the config error line. `?verify=30`:
    watch it for 30 s (rollback.py); answered at once, the verdict is logged."""

    async def handler(request: web.Request) -> web.Response:
        verify = None
        if "verify" in request.query:
            try:
                verify = verify_seconds(request.query["verify"])
            except ValueError as exc:
                return web.Response(status=400, text=f"{exc}\n")
        applied, message = await reload(verify)
        return web.Response(status=200 if applied else 400, text=message + "\n")

    return handler


def verification_routes(
    verification: Callable[[], Verification | None],
    roll_back: Callable[[str], Awaitable[tuple[bool, str]]],
) -> list[web.RouteDef]:
    """A worker's, for its supervisor only (workers.py): the state of the last reload's watch,
    and rolling it back when another worker did."""

    async def state(request: web.Request) -> web.Response:
        found = verification()
        return web.json_response({"state": found.state if found else "unwatched"})

    async def rollback(request: web.Request) -> web.Response:
        done, message = await roll_back(request.query.get("why", "asked by the supervisor"))
        return web.Response(status=200 if done else 409, text=message + "\n")

    return [web.get("/reload/verification", state), web.post("/reload/rollback", rollback)]


def admin_app(
    state: Callable[[], str],
    registry: CollectorRegistry,
    current: Callable[[], Snapshot],
    reload: Callable[[float | None], Awaitable[tuple[bool, str]]],
    guard: AdminGuard,
    routes: Iterable[web.RouteDef] = (),
) -> web.Application:
    """`state()` is "starting", "serving" or "draining"; `reload()` re-reads the config file;
    `guard` decides who may ask (guard.py); `routes` are the pages of other modules (the status
    page, the pool advice)."""

    async def readyz(request: web.Request) -> web.Response:
        now = state()
        return web.Response(status=200 if now == "serving" else 503, text=now + "\n")

    async def pools(request: web.Request) -> web.Response:
        listed = request.query.get("connections", "0") not in ("0", "", "false")
        return web.json_response(pools_view(current(), connections=listed))

    app = web.Application(middlewares=[guarded(guard)])
    app.router.add_post("/reload", reload_handler(reload))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/pools", pools)
    # prometheus-client's own handler: it negotiates OpenMetrics and compression.
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_routes(routes)
    return app
