"""A reload's verification: for `reload.verify` seconds after a reload, the routes and upstreams it
added or changed are watched; one failing more than before by over `reload.max_error_ratio` rolls
the reload back to the config it replaced.

Watches what recent.py counts (it must not know requests); restoring is the server's
(`ProxyServer`'s apply step, the one a reload uses). The decision is `judge`, pure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.config import MAX_VERIFY, Config, ListenTLS
from proxy.recent import SPAN, Key, Recent

if TYPE_CHECKING:
    from proxy.certificates import CertificateSet
    from proxy.guard import AdminPolicy
    from proxy.upstream import ClientTLS

log = logging.getLogger("proxy")

# One unlucky request must not undo a reload: a key is judged once it has served MIN_REQUESTS
# since the reload and MIN_ERRORS of them failed. Its ratio before the reload counts only if it
# served MIN_REQUESTS in the minute before (else it is taken as 0: new, or idle).
MIN_REQUESTS = 10
MIN_ERRORS = 3


@dataclass(frozen=True, slots=True)
class Counts:
    """Requests and the failed ones among them (recent.failed) for one key over some seconds."""

    requests: int = 0
    errors: int = 0

    @property
    def ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def plus(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors)


@dataclass(frozen=True, slots=True)
class InForce:
    """What a reload replaces and a rollback restores: the config, and what was read from files
    with it (the admin token, the listener's certificates, the file's hash, the upstreams' TLS
    files), so a rollback does not read the files again: they hold what is being rolled back."""

    config: Config
    policy: AdminPolicy
    certificates: tuple[ListenTLS, CertificateSet] | None
    config_hash: str
    # Each upstream's TLS as read (upstream.py): a rollback of a reload that re-read changed
    # files restores these, since the files now hold what failed.
    upstream_tls: Mapping[str, ClientTLS] = field(default_factory=dict)


def watched(old: Config, new: Config, reread: Collection[str] = ()) -> list[Key]:
    """The routes and upstreams `new` adds or changes (targets and discovery included), and the
    upstreams in `reread` (their TLS files changed: built again from them): the ones a reload
    from `old` can break. Removed ones get no traffic; unchanged ones are not its doing."""
    keys: list[Key] = [
        ("upstream", name)
        for name, settings in new.upstreams.items()
        if old.upstreams.get(name) != settings or name in reread
    ]
    before = {route.name: route for route in old.routes}
    keys += [("route", route.name) for route in new.routes if before.get(route.name) != route]
    return keys


def judge(key: Key, after: Counts, before: Counts, max_error_ratio: float) -> str | None:
    """Why `key` rolls the reload back, or None. The rule: its error ratio since the reload is
    worse than its ratio in the minute before by more than `max_error_ratio` (a key new or idle
    before starts from 0), over at least MIN_REQUESTS requests and MIN_ERRORS errors. A route
    already failing 10% before and 10% after was not broken by the reload: it stays."""
    if after.requests < MIN_REQUESTS or after.errors < MIN_ERRORS:
        return None
    baseline = before.ratio if before.requests >= MIN_REQUESTS else 0.0
    if after.ratio - baseline <= max_error_ratio:
        return None
    return (
        f"{' '.join(key)}: {after.errors} of {after.requests} requests failed since the "
        f"reload ({after.ratio:.2f}, {baseline:.2f} before it; max_error_ratio {max_error_ratio:g})"
    )


def describe_watch(
    old: Config, new: Config, seconds: float, reread: Collection[str] = ()
) -> str | None:
    """What a verification of `seconds` watches, for the reload's answer and `--check --diff`:
    "verify 30 s: watching route api, upstream api-v2 (max_error_ratio 0.05)"; None if nothing."""
    if seconds <= 0:
        return None
    keys = watched(old, new, reread)
    if not keys:
        return f"verify {seconds:g} s: nothing added or changed to watch"
    return (
        f"verify {seconds:g} s: watching {', '.join(' '.join(k) for k in keys)} "
        f"(max_error_ratio {new.reload.max_error_ratio:g})"
    )


def verify_seconds(value: str) -> float:
    """POST /reload?verify=: a number of seconds from 0 to MAX_VERIFY, else ValueError with the
    line to answer."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_VERIFY:  # nan and inf fail this too
        raise ValueError(
            f"verify: must be a number of seconds from 0 to {MAX_VERIFY:g}, got {value!r}"
        )
    return seconds


# Called once per verification: why it failed, or None when it passed.
Verdict = Callable[["Verification", str | None], Awaitable[None]]


class Verification:
    """One reload's watch, in a task: every second, the whole seconds since the reload are added
    to each watched key's counts and judged. The reload's own second is left out (it mixes
    requests before and after the swap); so the watch covers ceil(seconds) whole seconds after
    it. Counted here, not read from recent.py's window, so a watch longer than its minute works.

    A reload while another is watched (`follows`) does not end that watch's duty: `previous`
    stays the config in force before the first, so the keys are everything changed since it;
    a key already watched keeps its ratio from before the first reload (the minute before the
    second may hold the first one's damage); and the watch lasts until the later of the two
    ends. A repeated SIGHUP with nothing changed cannot clear a bad reload's watch.

    An upstream whose TLS files changed is built again from them by a reload even if its
    settings did not (`reread`): it is watched as a changed one, and a rollback gives it back
    the TLS it had read before (`InForce.upstream_tls`).
    """

    def __init__(
        self,
        previous: InForce,
        new: Config,
        seconds: float,
        recent: Recent,
        verdict: Verdict,
        clock: Callable[[], float] = time.monotonic,  # recent.py's clock
        follows: Verification | None = None,
        reread: Collection[str] = (),  # upstreams built again because their TLS files changed
    ) -> None:
        if follows is not None:
            previous = follows.previous
            reread = {*follows.reread, *reread}
        self.previous: InForce = previous
        self.reread: frozenset[str] = frozenset(reread)
        self.keys = watched(previous.config, new, self.reread)
        self.seconds = seconds
        self.max_error_ratio = new.reload.max_error_ratio
        # "verifying" once started, then "verified", "rolled_back" or "rollback_failed"
        self.state = "unwatched"
        self._recent = recent
        self._verdict = verdict
        self._clock = clock
        reloaded = int(clock())
        earlier: dict[Key, Counts] = follows.before if follows is not None else {}
        self.before: dict[Key, Counts] = {
            key: earlier[key] if key in earlier else _counts(recent, key, SPAN, reloaded)
            for key in self.keys
        }
        self.after = {key: Counts() for key in self.keys}
        self._counted_until = reloaded + 1  # the first second wholly after the reload
        self._ends = self._counted_until + math.ceil(seconds)
        if follows is not None:
            self._ends = max(self._ends, follows._ends)
        self._task: asyncio.Task[None] | None = None

    @property
    def due(self) -> bool:
        """Whether there is anything to watch: keys, and seconds left."""
        return bool(self.keys) and self._counted_until < self._ends

    @property
    def seconds_left(self) -> int:
        return max(0, self._ends - self._counted_until)

    @property
    def watching(self) -> bool:
        return self.state == "verifying"

    def start(self) -> None:
        self.state = "verifying"
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Cancel the watch (a newer reload, a rollback asked for, shutdown) and wait for it."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while self._counted_until < self._ends:
            # A little past the next second's start, so that second's slot is complete.
            await asyncio.sleep(int(self._clock()) + 1.01 - self._clock())
            why = self.count()
            if why is not None:  # at once: the point is to stop the damage
                await self._verdict(self, why)
                return
        self.state = "verified"
        await self._verdict(self, None)

    def count(self) -> str | None:
        """Add the whole seconds since the last count; why the reload fails, or None."""
        until = min(int(self._clock()), self._ends)
        seconds = until - self._counted_until
        if seconds > 0:
            for key in self.keys:
                self.after[key] = self.after[key].plus(_counts(self._recent, key, seconds, until))
            self._counted_until = until
        failing = [
            why
            for key in self.keys
            if (why := judge(key, self.after[key], self.before[key], self.max_error_ratio))
        ]
        return "; ".join(failing) or None

    def summary(self) -> str:
        """Each key's counts since the reload, for the "reload verified" line."""
        return ", ".join(
            f"{' '.join(key)} {self.after[key].errors} of {self.after[key].requests} failed"
            for key in self.keys
        )


def _counts(recent: Recent, key: Key, seconds: int, until: int) -> Counts:
    totals = recent.totals(key, seconds, until)
    return Counts(totals.requests, totals.errors)
