"""Pool sizing advice (`GET /pools/advice`, `proxy_upstream_pool_advice`): what the last 10
minutes of a pool say about its `limit`, `max_pending` and `keepalive_timeout`.

Owns the rolling window each pool feeds (PoolWindow: O(1) per event, one slot per 10 s) and the
rules that turn its figures into a recommended value and a one-line reason (`advise`), as data.
pool.py feeds the window from the points that already count these events; knows nothing of
requests, and reads the pools only through their windows and settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import config

if TYPE_CHECKING:
    from proxy.snapshot import Snapshot

SPAN = 600  # s the window covers, and the longest ?window= may ask
SLOT = 10  # s per slot: a pool's sizing does not change within seconds
_SLOTS = SPAN // SLOT
AGES_KEPT = 32  # idle ages per slot kept for the low percentile (the shortest is always kept)
MIN_IDLE_CLOSES = 2  # idle closes seen before their age sizes keepalive_timeout
SETTINGS = ("limit", "max_pending", "keepalive_timeout")  # the gauge's `setting` label
HEADROOM = 1.25  # a raised limit: the peak demand seen plus a quarter
OVER_PROVISIONED = 4  # peak in use at most limit / 4 (and no wait): limit may be lowered
SHORT_WAIT = 0.25  # waits under this share of timeouts.connect: a deeper queue would serve them
LONG_WAIT = 0.5  # waits over this share of timeouts.connect: an unbounded queue needs a bound


class _Slot:
    """Ten seconds of one pool."""

    __slots__ = ("acquired", "ages", "announced", "index", "peak_active", "peak_waiting",
                 "refused", "remote_idle", "shortest_idle", "stale", "wait_max", "wait_total",
                 "waits")  # fmt: skip

    def __init__(self, index: int = -1) -> None:
        self.index = index  # the slot's start, in SLOT seconds of the window's clock
        self.acquired = 0  # connections handed to requests
        self.peak_active = 0  # the most connections in use when one was handed out
        self.peak_waiting = 0  # the most requests waiting for a slot at once
        self.waits = 0  # waits for a slot (a request woken to find the slot taken waits again)
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.refused = 0  # requests refused at once: max_pending were waiting
        self.stale = 0  # reused connections found closed before any byte of the response
        self.remote_idle = 0  # idle connections the upstream closed
        self.shortest_idle = math.inf  # the shortest idle age of those
        self.ages: list[float] = []  # the first AGES_KEPT idle ages, for a low percentile
        self.announced = math.inf  # the smallest Keep-Alive: timeout the upstream announced


class PoolWindow:
    """The last SPAN seconds of one pool, in slots of SLOT seconds of `clock`: a ring that
    each event updates in place (a comparison or an addition), never a list per request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self._ring = [_Slot() for _ in range(_SLOTS)]
        self._index = -1
        self._slot = self._ring[0]

    def _current(self) -> _Slot:
        index = int(self._clock() // SLOT)
        if index != self._index:
            slot = self._ring[index % _SLOTS]
            if slot.index != index:  # ten minutes old, or never used: a new one
                slot = self._ring[index % _SLOTS] = _Slot(index)
            self._index, self._slot = index, slot
        return self._slot

    # --- fed by pool.py, at the points that already count these events ---

    def took(self, active: int) -> None:
        """A request got its connection; `active` are in use now, that one included."""
        slot = self._current()
        slot.acquired += 1
        if active > slot.peak_active:
            slot.peak_active = active

    def queued(self, waiting: int) -> None:
        """A request began waiting for a slot; `waiting` wait now, that one included."""
        slot = self._current()
        if waiting > slot.peak_waiting:
            slot.peak_waiting = waiting

    def waited(self, seconds: float) -> None:
        """A wait for a slot ended: a slot came, or the connect timeout ran out."""
        slot = self._current()
        slot.waits += 1
        slot.wait_total += seconds
        if seconds > slot.wait_max:
            slot.wait_max = seconds

    def refused(self) -> None:
        self._current().refused += 1

    def went_stale(self) -> None:
        self._current().stale += 1

    def closed_idle(self, age: float) -> None:
        """The upstream closed a connection that had been idle `age` seconds."""
        slot = self._current()
        slot.remote_idle += 1
        slot.shortest_idle = min(slot.shortest_idle, age)
        if len(slot.ages) < AGES_KEPT:
            slot.ages.append(age)

    def announced(self, timeout: float) -> None:
        """A response said `Keep-Alive: timeout=<timeout>`."""
        slot = self._current()
        if timeout < slot.announced:
            slot.announced = timeout

    # --- read by the advice page and at scrape time ---

    def figures(self, seconds: int = SPAN) -> Figures:
        """The sums, peaks and extremes of the slots that began in the last `seconds` (whole
        slots: up to SLOT seconds more), and how many seconds of them the pool has lived."""
        now = self._clock()
        last = int(now // SLOT)
        first = last - max(1, math.ceil(seconds / SLOT)) + 1
        slots = [slot for slot in self._ring if first <= slot.index <= last]
        ages = sorted(age for slot in slots for age in slot.ages)
        waits = sum(slot.waits for slot in slots)
        shortest = min((slot.shortest_idle for slot in slots), default=math.inf)
        announced = min((slot.announced for slot in slots), default=math.inf)
        return Figures(
            seconds=round(min(seconds, now - self.started), 1),
            acquired=sum(slot.acquired for slot in slots),
            peak_active=max((slot.peak_active for slot in slots), default=0),
            peak_waiting=max((slot.peak_waiting for slot in slots), default=0),
            waits=waits,
            wait_mean=round(sum(slot.wait_total for slot in slots) / waits, 4) if waits else 0.0,
            wait_max=round(max((slot.wait_max for slot in slots), default=0.0), 4),
            refused=sum(slot.refused for slot in slots),
            stale=sum(slot.stale for slot in slots),
            remote_idle_closes=sum(slot.remote_idle for slot in slots),
            shortest_idle_close=round(shortest, 3) if shortest < math.inf else None,
            low_idle_close=_low_age(ages),
            announced_timeout=announced if announced < math.inf else None,
        )


def _low_age(ages: list[float]) -> float | None:
    """The idle age the upstream closes at, from the sorted ages seen: the 10th percentile
    (nearest rank) of ten or more; of fewer, the median, since one backend restart closes every
    idle connection at once, at whatever age each had (0.02 s, 1.5 s, 7 s: not a timeout of
    0.02 s). None until MIN_IDLE_CLOSES were seen."""
    if len(ages) < MIN_IDLE_CLOSES:
        return None
    rank = math.ceil(len(ages) / 10) if len(ages) >= 10 else math.ceil(len(ages) / 2)
    return round(ages[rank - 1], 3)


@dataclass(frozen=True, slots=True)
class Figures:
    """What a window saw over `seconds`; the JSON of GET /pools/advice under "window"."""

    seconds: float
    acquired: int = 0
    peak_active: int = 0
    peak_waiting: int = 0
    waits: int = 0
    wait_mean: float = 0.0
    wait_max: float = 0.0
    refused: int = 0
    stale: int = 0
    remote_idle_closes: int = 0
    shortest_idle_close: float | None = None
    low_idle_close: float | None = None
    announced_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """What the advice weighs the figures against: one upstream's settings, one worker's."""

    limit: int
    limit_per_host: int
    max_pending: int
    keepalive_timeout: float
    connect_timeout: float
    backend_budget: int
    workers: int

    @classmethod
    def of(cls, upstream: config.Upstream, workers: int) -> Settings:
        pool = upstream.pool
        return cls(pool.limit, pool.limit_per_host, upstream.max_pending, pool.keepalive_timeout,
                   upstream.timeouts.connect, pool.backend_budget, workers)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Advice:
    """One setting's recommendation. `action`: keep, raise, lower, may_lower (over-provisioned:
    only worth it for the backend's connection budget), check (a sign, but nothing to
    measure a value from)."""

    action: str
    value: float
    reason: str


# --- the rules ---


def advise(figures: Figures, settings: Settings) -> dict[str, Advice]:
    """Each setting's advice, from what the window saw under these settings."""
    return {
        "limit": advise_limit(figures, settings),
        "max_pending": advise_max_pending(figures, settings),
        "keepalive_timeout": advise_keepalive(figures, settings),
    }


def advise_limit(f: Figures, s: Settings) -> Advice:
    """Raise a limit that made requests wait while every connection was in use; say when one
    is far above what was used; and keep workers x limit within backend_budget."""
    cap = max(1, s.backend_budget // s.workers) if s.backend_budget else 0
    period = _period(f.seconds)
    if not s.limit:
        if cap:
            return Advice("lower", cap, f"unlimited (0) while backend_budget {s.backend_budget} "
                          f"allows {_per_worker(s)}: use {cap}")  # fmt: skip
        return Advice("keep", 0, f"unlimited (0); peak {f.peak_active} in use in the last "
                      f"{period}")  # fmt: skip
    if f.waits and f.peak_active >= s.limit:
        demand = f.peak_active + f.peak_waiting
        wanted = max(s.limit + 1, math.ceil(demand * HEADROOM))
        why = (f"{f.waits} waits for a slot (longest {_s(f.wait_max)}, mean {_s(f.wait_mean)}) "
               f"with all {s.limit} in use and up to {f.peak_waiting} waiting in the last "
               f"{period}")  # fmt: skip
        if not cap or wanted <= cap:
            return Advice("raise", wanted, f"{why}: use {wanted} (peak demand {demand} + 25%)")
        if cap > s.limit:
            return Advice("raise", cap, f"{why}: use {cap} (peak demand {demand} + 25% = "
                          f"{wanted}, capped at {_per_worker(s)})")  # fmt: skip
        return Advice("keep" if cap == s.limit else "lower", cap, f"{why}; it would take "
                      f"{wanted}, but {_per_worker(s)}: add backend capacity, or replicas "
                      f"with a share of the budget each")  # fmt: skip
    if cap and s.limit > cap:
        return Advice("lower", cap, f"workers {s.workers} x limit {s.limit} = "
                      f"{s.workers * s.limit} > backend_budget {s.backend_budget}: use {cap} "
                      f"(peak {f.peak_active} in use in the last {period})")  # fmt: skip
    if f.waits:  # waits while connections were free: per target, or behind earlier waiters
        held = (f"limit_per_host {s.limit_per_host} per target held them"
                if s.limit_per_host else "each behind requests already waiting")  # fmt: skip
        return Advice("keep", s.limit, f"{f.waits} waits for a slot (longest "
                      f"{_s(f.wait_max)}) with at most {f.peak_active} of {s.limit} in use: "
                      f"{held}, not limit")  # fmt: skip
    if not f.acquired:
        return Advice("keep", s.limit, f"no request in the last {period}: nothing to judge")
    if f.peak_active * OVER_PROVISIONED <= s.limit and s.limit > 2:
        lower = max(2, f.peak_active * 2)
        return Advice("may_lower", lower, f"peak {f.peak_active} of {s.limit} in use in the "
                      f"last {period}, no wait: over-provisioned; {lower} would do (twice the "
                      f"peak), which matters only for the backend's connection budget")  # fmt: skip
    return Advice("keep", s.limit, f"peak {f.peak_active} of {s.limit} in use in the last "
                  f"{period}, no wait: fine")  # fmt: skip


def advise_max_pending(f: Figures, s: Settings) -> Advice:
    """A queue that refused requests it could have served soon may be deeper; an unbounded
    one whose requests waited long should get a bound, so the excess gets a fast 503."""
    period = _period(f.seconds)
    connect = _s(s.connect_timeout)
    if f.refused:
        why = (f"{f.refused} requests refused at once with {s.max_pending} already waiting in "
               f"the last {period}")  # fmt: skip
        if f.wait_max < s.connect_timeout * SHORT_WAIT:
            deeper = s.max_pending * 2
            return Advice(
                "raise",
                deeper,
                f"{why}, while waits stayed short (longest "
                f"{_s(f.wait_max)} of timeouts.connect {connect}): use {deeper}",
            )
        return Advice(
            "keep",
            s.max_pending,
            f"{why}, and waits were long (up to "
            f"{_s(f.wait_max)} of timeouts.connect {connect}): a deeper queue would "
            f"only wait longer; raise limit (see limit) or the backend's capacity",
        )
    if not s.max_pending and f.wait_max >= s.connect_timeout * LONG_WAIT and s.limit:
        return Advice("lower", s.limit, f"unbounded (0) while requests waited up to "
                      f"{_s(f.wait_max)} of timeouts.connect {connect} in the last {period}: "
                      f"bound the queue at {s.limit} (one pool's worth: each waits about one "
                      f"response at most), so the excess gets a fast 503")  # fmt: skip
    bound = f"max_pending {s.max_pending}" if s.max_pending else "unbounded (0)"
    if not f.waits:
        return Advice("keep", s.max_pending, f"{bound}; no request waited for a slot in the "
                      f"last {period}")  # fmt: skip
    return Advice("keep", s.max_pending, f"{bound}; no request refused, up to "
                  f"{f.peak_waiting} waiting at once, longest {_s(f.wait_max)} of "
                  f"timeouts.connect {connect} in the last {period}")  # fmt: skip


def advise_keepalive(f: Figures, s: Settings) -> Advice:
    """Keep idle connections for less than the upstream does: above its idle timeout, a reused
    connection races its close (the stale keep-alive 502 a retry must hide)."""
    period = _period(f.seconds)
    now = _s(s.keepalive_timeout)
    if not s.keepalive_timeout:
        return Advice("keep", 0, "keep-alive off (0): every request opens a connection")
    seen, announced = f.low_idle_close, f.announced_timeout
    if announced is not None and announced < 1:
        return Advice("check", s.keepalive_timeout, f"the upstream announced Keep-Alive: "
                      f"timeout={announced:g}: it barely keeps idle connections (the pool "
                      f"retires them before that); consider keepalive_timeout 0")  # fmt: skip
    if seen is not None and (announced is None or seen < announced):
        bound = seen
        what = (f"{_s(seen)} after which the upstream was seen closing idle connections "
                f"({f.remote_idle_closes} in the last {period}, shortest "
                f"{_s(f.shortest_idle_close or seen)})")  # fmt: skip
    elif announced is not None:
        bound = announced
        what = f"the Keep-Alive: timeout={announced:g} the upstream announced"
    else:
        if f.stale:
            return Advice("check", s.keepalive_timeout, f"{f.stale} reused connections were "
                          f"found closed by the upstream in the last {period}, but no idle "
                          f"close was seen to time: keep {now} below the backend's own idle "
                          f"timeout")  # fmt: skip
        return Advice("keep", s.keepalive_timeout, f"no idle connection closed by the upstream "
                      f"and no Keep-Alive timeout announced in the last {period}: {now} is "
                      f"not known to be too long")  # fmt: skip
    below = _below(bound)
    if s.keepalive_timeout <= below:
        return Advice("keep", s.keepalive_timeout, f"{now} is below {what}")
    if s.keepalive_timeout > bound:
        return Advice("lower", below, f"keepalive_timeout {s.keepalive_timeout:g} > {what}: "
                      f"use {below:g}")  # fmt: skip
    return Advice("lower", below, f"keepalive_timeout {s.keepalive_timeout:g} leaves less "
                  f"than 1 s before {what}: use {below:g}")  # fmt: skip


def budget(s: Settings, peak_in_use: int) -> dict[str, Any] | None:
    """The README's replicas x workers x limit against backend_budget, for one replica (this
    process, or the supervisor's workers); None when the budget is not known (0)."""
    if not s.backend_budget:
        return None
    per_replica = s.workers * s.limit
    replicas = s.backend_budget // per_replica if per_replica else 0
    exceeded = not per_replica or per_replica > s.backend_budget
    used = f"workers {s.workers} x limit {s.limit} = {per_replica}"
    if not s.limit:
        reason = f"limit 0 (unlimited): no bound under backend_budget {s.backend_budget}"
    elif exceeded:
        reason = (f"{used} > backend_budget {s.backend_budget}: one replica alone may exceed "
                  f"it; use limit {max(1, s.backend_budget // s.workers)}")  # fmt: skip
    else:
        reason = (f"{used} per replica: backend_budget {s.backend_budget} fits {replicas} "
                  f"replicas (replicas x workers x limit <= {s.backend_budget})")  # fmt: skip
    return {
        "backend_budget": s.backend_budget,
        "workers": s.workers,
        "limit": s.limit,
        "per_replica": per_replica,
        "replicas": replicas,
        "exceeded": exceeded,
        "peak_in_use": peak_in_use,
        "reason": f"{reason}; peak {peak_in_use} in use here",
    }


def _below(seconds: float) -> float:
    """1 s below `seconds`, in whole seconds; half of it (to 0.1 s, at least 0.1) when that
    would leave less than 1 s."""
    whole = math.floor(seconds - 1)
    return float(whole) if whole >= 1 else max(0.1, math.floor(seconds * 5) / 10)


def _per_worker(s: Settings) -> str:
    return (
        f"backend_budget {s.backend_budget} / {s.workers} workers = {s.backend_budget // s.workers}"
    )


def _s(seconds: float) -> str:
    return f"{round(seconds, 2):g} s"


def _period(seconds: float) -> str:
    return f"{round(seconds / 60, 1):g} min" if seconds >= 60 else f"{seconds:.0f} s"


# --- the page and the gauge ---


def upstream_advice(figures: Figures, settings: Settings) -> dict[str, Any]:
    """One upstream's entry of GET /pools/advice."""
    entry: dict[str, Any] = {
        "settings": asdict(settings),
        "window": asdict(figures),
        "advice": {name: asdict(advice) for name, advice in advise(figures, settings).items()},
    }
    checked = budget(settings, figures.peak_active)
    if checked is not None:
        entry["budget"] = checked
    return entry


def advice_view(snapshot: Snapshot, workers: int, seconds: int = SPAN) -> dict[str, Any]:
    return {
        "window": seconds,
        "upstreams": {
            name: upstream_advice(
                upstream.connector.window.figures(seconds), Settings.of(upstream.settings, workers)
            )
            for name, upstream in snapshot.upstreams.items()
        },
    }


def gauge_values(snapshot: Snapshot | None, workers: int) -> Iterator[tuple[str, str, float]]:
    """(upstream, setting, recommended value) for proxy_upstream_pool_advice, over SPAN."""
    for name, upstream in snapshot.upstreams.items() if snapshot is not None else ():
        settings = Settings.of(upstream.settings, workers)
        for setting, advice in advise(upstream.connector.window.figures(), settings).items():
            yield name, setting, advice.value


def window_seconds(query: Mapping[str, str]) -> int:
    """?window=SECONDS, whole seconds from 1 to SPAN; ValueError says what is wrong."""
    raw = query.get("window", str(SPAN))
    if not raw.isdigit() or not 1 <= int(raw) <= SPAN:
        raise ValueError(f"window: must be whole seconds from 1 to {SPAN}, got {raw!r}")
    return int(raw)


def advice_handler(
    current: Callable[[], Snapshot], workers: Callable[[], int]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /pools/advice[?window=SECONDS]."""

    async def handler(request: web.Request) -> web.Response:
        try:
            seconds = window_seconds(request.query)
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        return web.json_response(advice_view(current(), workers(), seconds))

    return handler


# --- workers: N, in the supervisor ---

# A setting is each worker's own, so the workers' advice is combined per setting by what it
# guards: the busiest worker's limit and max_pending, the shortest keep-alive any worker found
# safe. proxy_upstream_pool_advice merges the same way (merging.py).
COMBINE = {"limit": max, "max_pending": max, "keepalive_timeout": min}


def combine_workers(answers: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The supervisor's upstreams from its workers' GET /pools/advice answers (None: a worker
    that did not answer): each setting's advice from the worker COMBINE picks (ties: the
    first that advises a change), and the budget with this replica's peaks added up: the
    backend sees every worker's connections (an upper bound: the peaks need not coincide)."""
    names: dict[str, None] = {}
    for answer in answers:
        names.update(dict.fromkeys(answer["upstreams"] if answer else ()))
    combined = {}
    for name in names:
        entries = [(i, a["upstreams"][name]) for i, a in enumerate(answers)
                   if a and name in a["upstreams"]]  # fmt: skip
        advice = {}
        for setting, pick in COMBINE.items():
            ranked = sorted(entries, key=lambda e: e[1]["advice"][setting]["action"] == "keep")
            worker, entry = pick(ranked, key=lambda e: e[1]["advice"][setting]["value"])
            advice[setting] = {**entry["advice"][setting], "worker": worker}
        first = entries[0][1]
        peaks = sum(entry["window"]["peak_active"] for _, entry in entries)
        combined[name] = {"settings": first["settings"], "advice": advice}
        checked = budget(Settings(**first["settings"]), peaks)
        if checked is not None:
            combined[name]["budget"] = checked
    return combined


def supervisor_view(
    seconds: int, answers: Sequence[tuple[int | None, Mapping[str, Any] | None]]
) -> dict[str, Any]:
    """The supervisor's GET /pools/advice: the combined advice, then each worker's own.
    `answers[i]` is worker i's (pid, its GET /pools/advice), None for one that did not answer."""
    views = [view for _, view in answers]
    return {
        "window": seconds,
        "upstreams": combine_workers(views),
        "workers": [
            {"worker": i, "pid": pid, "upstreams": view["upstreams"] if view else None}
            for i, (pid, view) in enumerate(answers)
        ],
    }
