"""Target health: active checks on connections of their own, passive ejection of targets that
keep failing requests, and the rest a target asks for with Retry-After.

Owns the transitions of `TargetState.healthy`, `ejected_until` and `rested_until`; knows nothing
of routes or of the request pool (checks never take one of its slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any

import aiohttp

from proxy import config
from proxy.balancing import TargetState

log = logging.getLogger("proxy")

MAX_EJECTION = 300.0  # s: the cap of the doubling ejection time (Envoy's default too)
MAX_REST = 300.0  # s: the longest rest a Retry-After can ask for


def eject(target: TargetState, reason: str, until: float) -> None:
    target.ejected_until = max(target.ejected_until, until)
    target.ejection_counts[reason] = target.ejection_counts.get(reason, 0) + 1


class Outlier:
    """Passive: a target whose requests fail `consecutive_failures` times in a row is taken out
    of rotation for `ejection_time`, doubled on each ejection in a row, up to MAX_EJECTION."""

    def __init__(self, upstream: str, settings: config.Outlier | None) -> None:
        self.upstream = upstream
        self.settings = settings

    def record(self, target: TargetState, failed: bool, now: float) -> None:
        settings = self.settings
        if settings is None:
            return
        if not failed:
            target.consecutive_failures = 0
            if now >= target.ejected_until:
                target.ejections = 0  # back in rotation and serving: the back-off starts over
            return
        target.consecutive_failures += 1
        if target.consecutive_failures < settings.consecutive_failures:
            return
        cap = max(MAX_EJECTION, settings.ejection_time)
        seconds = min(settings.ejection_time * 2**target.ejections, cap)
        target.ejections += 1
        target.consecutive_failures = 0
        eject(target, "consecutive_failures", now + seconds)
        log.warning(
            "upstream %s: target %s ejected for %.0f s after %d failures in a row",
            self.upstream, target.url, seconds, settings.consecutive_failures,
        )  # fmt: skip


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def rest(upstream: str, target: TargetState, seconds: float, now: float) -> None:
    """A target that answered 503 with Retry-After gets the rest it asked for."""
    seconds = min(seconds, MAX_REST)
    if seconds <= 0:
        return
    target.rested_until = max(target.rested_until, now + seconds)
    target.ejection_counts["retry_after"] = target.ejection_counts.get("retry_after", 0) + 1
    log.info("upstream %s: target %s rested for %.0f s (Retry-After)", upstream, target.url,
             seconds)  # fmt: skip


class HealthChecker:
    """Active: GET `path` on every target each `interval`, on connections of its own."""

    def __init__(
        self,
        upstream: str,
        targets: tuple[TargetState, ...],
        settings: config.HealthCheck,
        *,
        ssl: Any = True,
    ) -> None:
        self.upstream = upstream
        self._ssl = ssl  # the upstream's TLS context: checks verify certificates as requests do
        self.targets = targets  # upstream.py replaces it when discovery finds another set
        self.settings = settings
        # By target: > 0 successes in a row, < 0 failures. Weak: a target discovery dropped
        # goes with its streak.
        self._streak: weakref.WeakKeyDictionary[TargetState, int] = weakref.WeakKeyDictionary()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_checks: set[asyncio.Task[None]] = set()  # of targets that just joined

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # A connection per check, never one of the request pool's slots.
            connector=aiohttp.TCPConnector(force_close=True, limit=0, ssl=self._ssl),
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "proxy-health-check"},
            trust_env=False,
        )
        self._task = asyncio.create_task(self._run(), name=f"health-check {self.upstream}")

    def joined(self, targets: Iterable[TargetState]) -> None:
        """Targets discovery added while serving: out of rotation until one check passes (as
        Envoy holds new hosts for their first check), and checked now, not at the next round."""
        for target in targets:
            target.healthy = False
            self._streak[target] = self.settings.healthy_threshold - 1  # one pass brings it in
            if self._session is not None:
                check = asyncio.create_task(self._check(target), name=f"health-check {target.url}")
                self._first_checks.add(check)
                check.add_done_callback(self._first_checks.discard)

    async def aclose(self) -> None:
        for check in list(self._first_checks):
            check.cancel()
        await asyncio.gather(*self._first_checks, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._check(target) for target in self.targets))
            await asyncio.sleep(self.settings.interval)

    async def _check(self, target: TargetState) -> None:
        assert self._session is not None
        low, high = self.settings.expect_status
        try:
            async with self._session.get(
                target.url + self.settings.path,
                allow_redirects=False,
                server_hostname=target.server_hostname,
            ) as response:
                passed = low <= response.status <= high
                detail = f"status {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            passed, detail = False, type(exc).__name__
        self._count(target, passed, detail)

    def _count(self, target: TargetState, passed: bool, detail: str) -> None:
        streak = self._streak.get(target, 0)
        streak = max(streak, 0) + 1 if passed else min(streak, 0) - 1
        self._streak[target] = streak
        settings = self.settings
        if target.healthy and -streak >= settings.unhealthy_threshold:
            target.healthy = False
            target.ejection_counts["health_check"] = (
                target.ejection_counts.get("health_check", 0) + 1
            )
            log.warning("upstream %s: target %s is down (%d failed checks, last: %s)",
                        self.upstream, target.url, -streak, detail)  # fmt: skip
        elif not target.healthy and streak >= settings.healthy_threshold:
            target.healthy = True
            log.info("upstream %s: target %s is up again (%d passed checks)",
                     self.upstream, target.url, streak)  # fmt: skip
