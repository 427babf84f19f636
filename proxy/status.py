"""The live status page: `GET /`, one self-contained HTML page, and `GET /status.json`, what it
polls every 2 s: each upstream and target, in rotation or not and why, its pool, the last 10 s
of requests (recent.py), the config hash and the last reload.

Reads what admin.py's pool view and recent.py already keep; knows nothing of the hot path. The
supervisor of `workers: N` serves the same page over the workers' answers merged (`merged`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from proxy import __version__
from proxy.admin import pools_view
from proxy.recent import Recent, Totals
from proxy.reload import ReloadOutcome
from proxy.snapshot import Snapshot

WINDOW = 10  # seconds of requests the page shows
PAGE_DATA = "/*STATUS*/null"  # where status.html takes the first view, so it renders at once
# An upstream's pool figures that add up across workers (each worker has a pool of its own).
SUMMED = ("limit", "limit_per_host", "active", "idle", "waiting", "in_flight",
          "connections_created", "requests", "pending_rejected", "stale_connections", "tunnels",
          "tunnels_limit")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sources:
    """What the page reads, each asked at every request: a reload swaps all of them."""

    snapshot: Callable[[], Snapshot]
    recent: Recent
    state: Callable[[], str]  # "starting", "serving" or "draining"
    config_hash: Callable[[], str]
    last_reload: Callable[[], ReloadOutcome | None]


def recent_view(totals: Totals) -> dict[str, Any]:
    """The window's figures, with the raw latency buckets so that workers' windows add up."""
    ratio, reuse = totals.error_ratio, totals.reuse_ratio
    p50, p99 = totals.quantile(0.5), totals.quantile(0.99)
    return {
        "seconds": totals.seconds,
        "requests": totals.requests,
        "errors": totals.errors,
        "rate": round(totals.rate, 2),
        "error_ratio": None if ratio is None else round(ratio, 4),
        "p50": None if p50 is None else round(p50, 4),
        "p99": None if p99 is None else round(p99, 4),
        "latency": list(totals.latency),
        "forwarded": totals.forwarded,
        "reused": totals.reused,
        "reuse_ratio": None if reuse is None else round(reuse, 4),
    }


def rotation(target: dict[str, Any]) -> list[str]:
    """Why a target of the pool view is out of rotation, most lasting first; [] when it is in."""
    why = [] if target["healthy"] else ["unhealthy"]
    if target["ejected_for"] > 0:
        why.append(f"ejected for {math.ceil(target['ejected_for'])} s")
    if target["resting_for"] > 0:
        why.append(f"resting for {math.ceil(target['resting_for'])} s")
    if not target["up"] and not why:
        why.append("out of rotation")  # a moment from its way back, below the 0.1 s shown
    return why


def status_view(sources: Sources, started: float) -> dict[str, Any]:
    """One process's status: /pools's view of every upstream, each with its last WINDOW
    seconds, and the process's own state."""
    recent = sources.recent
    upstreams = pools_view(sources.snapshot())["upstreams"]
    for name, upstream in upstreams.items():
        upstream["recent"] = recent_view(recent.totals(("upstream", name), WINDOW))
        for target in upstream["targets"]:
            target["recent"] = recent_view(recent.totals(("target", name, target["url"]), WINDOW))
            target["out_because"] = rotation(target)
    last = sources.last_reload()
    return {
        "state": sources.state(),
        "config_hash": sources.config_hash(),
        "last_reload": asdict(last) if last is not None else None,
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(time.monotonic() - started, 1),
        "window": WINDOW,
        "upstreams": upstreams,
    }


def _merged_totals(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' windows as one: counts add up, the quantiles come from the sums."""
    latency = [sum(counts) for counts in zip(*(w["latency"] for w in windows), strict=True)]
    requests = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    forwarded = sum(w["forwarded"] for w in windows)
    reused = sum(w["reused"] for w in windows)
    return recent_view(
        Totals(requests, errors, tuple(latency), windows[0]["seconds"], forwarded, reused)
    )


def _merged_target(copies: list[dict[str, Any]]) -> dict[str, Any]:
    """One target as every worker that knows it sees it: in rotation only where all say so
    (as proxy_upstream_target_up merges), the longest ejection and rest."""
    target = {**copies[0]}
    target["up"] = all(t["up"] for t in copies)
    target["up_on"] = sum(t["up"] for t in copies)
    target["workers"] = len(copies)
    target["healthy"] = all(t["healthy"] for t in copies)
    for key in ("ejected_for", "resting_for"):
        target[key] = max(t[key] for t in copies)
    for key in ("in_flight", "active", "idle"):
        target[key] = sum(t[key] for t in copies)
    target["recent"] = _merged_totals([t["recent"] for t in copies])
    target["out_because"] = rotation(target)
    return target


def _merged_upstream(copies: list[dict[str, Any]]) -> dict[str, Any]:
    upstream = {**copies[0], "workers": len(copies), "limit_each": copies[0]["limit"]}
    for key in SUMMED:
        upstream[key] = sum(u[key] for u in copies)
    served, created = upstream["requests"], upstream["connections_created"]
    upstream["reuse_ratio"] = round(max(0, served - created) / served, 4) if served else None
    upstream["panic"] = any(u["panic"] for u in copies)
    upstream["recent"] = _merged_totals([u["recent"] for u in copies])
    by_url: dict[str, list[dict[str, Any]]] = {}
    for u in copies:  # discovery runs in each worker: a target one has not found yet is missing
        for target in u["targets"]:
            by_url.setdefault(target["url"], []).append(target)
    upstream["targets"] = [_merged_target(same) for same in by_url.values()]
    return upstream


def merged(
    state: str, answers: list[tuple[int, int | None, dict[str, Any] | None]]
) -> dict[str, Any]:
    """The supervisor's status: the same shape as one process's, its pool and request figures
    summed over the workers that answered (the backend sees all of them), and `workers`, each
    one's own state, config hash and last reload. `answers`: (index, pid, status or None)."""
    statuses = [status for _, _, status in answers if status is not None]
    upstreams: dict[str, list[dict[str, Any]]] = {}
    for status in statuses:
        for name, upstream in status["upstreams"].items():
            upstreams.setdefault(name, []).append(upstream)
    hashes = {status["config_hash"] for status in statuses}
    reloads = [s["last_reload"] for s in statuses if s["last_reload"] is not None]
    return {
        "state": state,
        # One hash when every worker runs the same file; "" while they differ (a reload that
        # some refused, or a worker that restarted on a newer file).
        "config_hash": hashes.pop() if len(hashes) == 1 else "",
        "last_reload": max(reloads, key=lambda r: r["time"]) if reloads else None,
        "pid": os.getpid(),
        "version": __version__,
        "window": WINDOW,
        "upstreams": {name: _merged_upstream(copies) for name, copies in upstreams.items()},
        "workers": [_worker(index, pid, status) for index, pid, status in answers],
    }


def _worker(index: int, pid: int | None, status: dict[str, Any] | None) -> dict[str, Any]:
    """One worker's line on the supervisor's page: what may differ from one to another."""
    own = {"worker": index, "pid": pid, "answered": status is not None}
    if status is not None:
        own |= {key: status[key] for key in ("state", "config_hash", "last_reload", "uptime")}
    return own


@cache
def _template() -> str:
    return resources.files("proxy").joinpath("status.html").read_text(encoding="utf-8")


def page(status: dict[str, Any], nonce: str) -> str:
    """status.html with `status` in it, so the first paint needs no fetch. Inside <script>, a
    "</script>" in a config string would end the element: <, > and & go as JSON escapes."""
    data = json.dumps(status).replace("<", "\\u003c").replace(">", "\\u003e")
    # The nonce first: a config string that reads like the placeholder stays as it is.
    html = _template().replace(NONCE, nonce)
    return html.replace(PAGE_DATA, data.replace("&", "\\u0026"), 1)


def handlers(view: Callable[[], Awaitable[dict[str, Any]]]) -> list[web.RouteDef]:
    """`GET /` and `GET /status.json` over `view()`; the admin guard applies to both."""

    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(await view(), headers=NO_STORE)

    async def status_page(request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        return web.Response(
            text=page(await view(), nonce), content_type="text/html", charset="utf-8",
            headers={**NO_STORE, **page_headers(nonce)},
        )  # fmt: skip

    return [web.get("/", status_page), web.get("/status.json", status_json)]


def routes(sources: Sources) -> list[web.RouteDef]:
    """One process's page (ProxyServer._admin_routes)."""
    started = time.monotonic()

    async def view() -> dict[str, Any]:
        return status_view(sources, started)

    return handlers(view)


class WorkerAnswer(Protocol):
    """workers.Answer, as far as this module reads it."""

    @property
    def pid(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def text(self) -> str: ...


# s a round of questions to the workers serves every page that asks within it: open pages poll
# every 2 s each, and N of them would otherwise ask every worker N times as often.
SHARED_FOR = 1.0


class SharedRound:
    """The workers' answers to GET /status.json, asked once for every page that asks within
    `shared_for` s of the round's start, finished or not. `forget()` when what they would
    answer changed (a reload, a rollback, a worker started again): the next page asks anew.
    A round that failed is not shared."""

    def __init__(
        self,
        ask_all: Callable[[], Awaitable[Sequence[WorkerAnswer | None]]],
        shared_for: float = SHARED_FOR,
    ) -> None:
        self._ask_all = ask_all
        self._shared_for = shared_for
        self._last: asyncio.Future[Sequence[WorkerAnswer | None]] | None = None
        self._started = -math.inf

    async def answers(self) -> Sequence[WorkerAnswer | None]:
        last, now = self._last, time.monotonic()
        if (
            last is None
            or now - self._started >= self._shared_for
            or (last.done() and (last.cancelled() or last.exception() is not None))
        ):
            last = self._last = asyncio.ensure_future(self._ask_all())
            self._started = now
        # Shielded: a page that goes away does not cancel the round the others wait for.
        return await asyncio.shield(last)

    def forget(self) -> None:
        self._last = None


def supervisor_routes(state: Callable[[], str], workers: SharedRound) -> list[web.RouteDef]:
    """The supervisor's page: every worker's answer to GET /status.json (None for one starting
    again or not answering), merged into one process's shape."""

    async def view() -> dict[str, Any]:
        answers = await workers.answers()
        return merged(state(), [
            (i, a.pid if a is not None else None,
             json.loads(a.text) if a is not None and a.status == 200 else None)
            for i, a in enumerate(answers)
        ])  # fmt: skip

    return handlers(view)


NO_STORE = {"Cache-Control": "no-store"}
NONCE = "STATUS-NONCE"  # status.html's placeholder for the response's CSP nonce


def page_headers(nonce: str) -> dict[str, str]:
    """The page runs only its own script and styles, fetches only its own origin, and may not
    be framed (a browser sends the admin credentials along with every request to it)."""
    return {
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; "
        f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
