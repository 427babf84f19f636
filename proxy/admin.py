"""The admin listener's application: health and readiness (later: metrics and the pool view).

Owns what operators and orchestrators ask the proxy; knows nothing of the hot path.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


def admin_app(state: Callable[[], str]) -> web.Application:
    """`state()` is "starting", "serving" or "draining"."""

    async def healthz(request: web.Request) -> web.Response:
        # Alive as long as the process answers: liveness must not fail during a drain.
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        current = state()
        return web.Response(status=200 if current == "serving" else 503, text=current + "\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
