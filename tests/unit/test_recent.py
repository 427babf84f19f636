"""recent.py: the last minute's outcomes, by route, upstream and target, on a clock we move."""

from __future__ import annotations

import pytest

from proxy.config import LATENCY_BUCKETS
from proxy.exchange import Exchange
from proxy.recent import SPAN, Recent, failed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exchange(
    status: int = 200, duration: float = 0.01, error: str | None = None, target: str = "http://a"
) -> Exchange:
    e = Exchange(0.0, 0.0, None, "GET", "/", route="r", upstream="u", upstream_target=target,
                 status=status, error=error)  # fmt: skip
    e.duration = duration
    return e


def test_counts_by_route_upstream_and_target_leaving_out_the_second_in_progress() -> None:
    clock = Clock()
    recent = Recent(clock)
    for status in (200, 200, 502, 404):
        recent.record(exchange(status))
    recent.record(exchange(target="http://b"))
    assert recent.totals(("route", "r"), 10).requests == 0  # still the current second
    clock.now += 1
    route = recent.totals(("route", "r"), 10)
    assert (route.requests, route.errors, route.rate) == (5, 1, 0.5)
    assert route.error_ratio == 0.2
    assert recent.totals(("upstream", "u"), 10).requests == 5
    assert recent.totals(("target", "u", "http://a"), 10).requests == 4
    both = recent.combined([("target", "u", "http://a"), ("target", "u", "http://b")], 10)
    assert both.requests == 5


def test_reuse_is_of_the_window_and_of_the_requests_an_upstream_connection_answered() -> None:
    clock = Clock()
    recent = Recent(clock)
    for reused in (True, True, True, False):  # a minute ago: one connection opened, reused
        e = exchange()
        e.reused = reused
        recent.record(e)
    clock.now += 30
    for reused in (False, False, None):  # now: each on a new connection; one never got one
        e = exchange(502, error="connect") if reused is None else exchange()
        e.reused = reused
        recent.record(e)
    clock.now += 1
    now = recent.totals(("upstream", "u"), 10)
    assert (now.requests, now.forwarded, now.reused, now.reuse_ratio) == (3, 2, 0, 0.0)
    assert recent.totals(("upstream", "u"), SPAN).reuse_ratio == 0.5  # 3 of 6
    assert recent.totals(("upstream", "other"), 10).reuse_ratio is None


def test_old_seconds_fall_out_of_the_window_and_of_memory() -> None:
    clock = Clock()
    recent = Recent(clock)
    recent.record(exchange())
    clock.now += 5
    recent.record(exchange())
    clock.now += 1
    assert recent.totals(("route", "r"), 3).requests == 1
    assert recent.totals(("route", "r"), 10).requests == 2
    assert recent.totals(("route", "r"), 3, until=clock.now - 5).requests == 1
    clock.now += SPAN + 1
    recent.record(exchange())
    assert recent.totals(("route", "r"), SPAN * 2).requests == 0


@pytest.mark.parametrize(
    ("status", "error", "counted"),
    [(200, None, False), (404, None, False), (429, None, False), (500, None, True),
     (503, None, True), (502, "connect", True), (499, "client_gone", False)],
)  # fmt: skip
def test_what_counts_as_an_error(status: int, error: str | None, counted: bool) -> None:
    assert failed(exchange(status, error=error)) is counted


def test_quantiles_interpolate_within_the_bucket() -> None:
    clock = Clock()
    recent = Recent(clock)
    low, high = LATENCY_BUCKETS[0], LATENCY_BUCKETS[1]
    for _ in range(99):
        recent.record(exchange(duration=low / 2))  # all in the first bucket
    recent.record(exchange(duration=(low + high) / 2))
    clock.now += 1
    totals = recent.totals(("route", "r"), 1)
    assert totals.quantile(0.5) == pytest.approx(low * 50 / 99)
    assert low < totals.quantile(0.999) <= high  # type: ignore[operator]
    recent.record(exchange(duration=LATENCY_BUCKETS[-1] * 10))
    clock.now += 1
    assert recent.totals(("route", "r"), 1).quantile(0.99) == LATENCY_BUCKETS[-1]
    assert recent.totals(("route", "nothing"), 1).quantile(0.5) is None
