"""The pool advice rules (advice.py), each with its reason, and the window that feeds them."""

from __future__ import annotations

import pytest

from proxy.advice import (
    Figures,
    PoolWindow,
    Settings,
    advise,
    advise_keepalive,
    budget,
    combine_workers,
    upstream_advice,
    window_seconds,
)

TEN_MIN = 600.0


def settings(**changed: float) -> Settings:
    values = {"limit": 100, "limit_per_host": 0, "max_pending": 0, "keepalive_timeout": 30.0,
              "connect_timeout": 5.0, "backend_budget": 0, "workers": 1, **changed}  # fmt: skip
    return Settings(**values)  # type: ignore[arg-type]


def figures(**changed: float) -> Figures:
    return Figures(**{"seconds": TEN_MIN, "acquired": 1000, "peak_active": 50, **changed})  # type: ignore[arg-type]


# --- limit ---


@pytest.mark.parametrize(
    ("seen", "settings_", "action", "value", "reason"),
    [
        # Requests waited with every connection in use: the peak demand plus a quarter.
        (figures(peak_active=10, peak_waiting=14, waits=30, wait_max=0.8, wait_mean=0.3),
         settings(limit=10), "raise", 30,
         "30 waits for a slot (longest 0.8 s, mean 0.3 s) with all 10 in use and up to 14 "
         "waiting in the last 10 min: use 30 (peak demand 24 + 25%)"),
        # ...capped at the backend's budget per worker.
        (figures(peak_active=10, peak_waiting=14, waits=30, wait_max=0.8, wait_mean=0.3),
         settings(limit=10, backend_budget=40, workers=2), "raise", 20,
         "use 20 (peak demand 24 + 25% = 30, capped at backend_budget 40 / 2 workers = 20)"),
        # ...and kept when the budget allows no more.
        (figures(peak_active=10, peak_waiting=14, waits=30, wait_max=0.8, wait_mean=0.3),
         settings(limit=10, backend_budget=20, workers=2), "keep", 10,
         "it would take 30, but backend_budget 20 / 2 workers = 10: add backend capacity"),
        # workers x limit above the budget, whatever the load.
        (figures(peak_active=3), settings(limit=50, backend_budget=80, workers=2), "lower", 40,
         "workers 2 x limit 50 = 100 > backend_budget 80: use 40 (peak 3 in use in the last "
         "10 min)"),
        (figures(peak_active=3), settings(limit=0, backend_budget=80, workers=2), "lower", 40,
         "unlimited (0) while backend_budget 80 allows backend_budget 80 / 2 workers = 40"),
        (figures(peak_active=3), settings(limit=0), "keep", 0,
         "unlimited (0); peak 3 in use in the last 10 min"),
        # Waits while connections were free: limit_per_host held them.
        (figures(peak_active=4, waits=5, wait_max=0.2), settings(limit=10, limit_per_host=2),
         "keep", 10, "5 waits for a slot (longest 0.2 s) with at most 4 of 10 in use: "
         "limit_per_host 2 per target held them, not limit"),
        (figures(peak_active=12), settings(), "may_lower", 24,
         "peak 12 of 100 in use in the last 10 min, no wait: over-provisioned; 24 would do"),
        (figures(peak_active=40), settings(), "keep", 100,
         "peak 40 of 100 in use in the last 10 min, no wait: fine"),
        (figures(acquired=0, peak_active=0, seconds=45), settings(), "keep", 100,
         "no request in the last 45 s: nothing to judge"),
    ],
)  # fmt: skip
def test_limit_rules(seen, settings_, action, value, reason):
    advice = advise(seen, settings_)["limit"]
    assert (advice.action, advice.value) == (action, value)
    assert reason in advice.reason


# --- max_pending ---


@pytest.mark.parametrize(
    ("seen", "settings_", "action", "value", "reason"),
    [
        (figures(refused=7, waits=40, wait_max=0.3), settings(max_pending=20), "raise", 40,
         "7 requests refused at once with 20 already waiting in the last 10 min, while waits "
         "stayed short (longest 0.3 s of timeouts.connect 5 s): use 40"),
        (figures(refused=7, waits=40, wait_max=3.0), settings(max_pending=20), "keep", 20,
         "and waits were long (up to 3 s of timeouts.connect 5 s): a deeper queue would only "
         "wait longer; raise limit"),
        (figures(waits=40, wait_max=3.0, peak_waiting=80), settings(limit=10), "lower", 10,
         "unbounded (0) while requests waited up to 3 s of timeouts.connect 5 s in the last "
         "10 min: bound the queue at 10"),
        (figures(waits=40, wait_max=0.5, peak_waiting=8), settings(max_pending=50), "keep", 50,
         "max_pending 50; no request refused, up to 8 waiting at once, longest 0.5 s"),
        (figures(), settings(), "keep", 0,
         "unbounded (0); no request waited for a slot in the last 10 min"),
    ],
)  # fmt: skip
def test_max_pending_rules(seen, settings_, action, value, reason):
    advice = advise(seen, settings_)["max_pending"]
    assert (advice.action, advice.value) == (action, value)
    assert reason in advice.reason


# --- keepalive_timeout ---


@pytest.mark.parametrize(
    ("seen", "settings_", "action", "value", "reason"),
    [
        # The issue's own example.
        (figures(remote_idle_closes=3, shortest_idle_close=4.0, low_idle_close=4.0),
         settings(), "lower", 3,
         "keepalive_timeout 30 > 4 s after which the upstream was seen closing idle "
         "connections (3 in the last 10 min, shortest 4 s): use 3"),
        # Under 2 s: half of it, to 0.1 s.
        (figures(remote_idle_closes=1, shortest_idle_close=1.5, low_idle_close=1.5),
         settings(), "lower", 0.7, "use 0.7"),
        # Within 1 s of the upstream's close.
        (figures(remote_idle_closes=2, shortest_idle_close=4.2, low_idle_close=4.2),
         settings(keepalive_timeout=4), "lower", 3,
         "keepalive_timeout 4 leaves less than 1 s before 4.2 s after which"),
        (figures(remote_idle_closes=2, shortest_idle_close=9.0, low_idle_close=9.0),
         settings(keepalive_timeout=5), "keep", 5,
         "5 s is below 9 s after which the upstream was seen closing idle connections"),
        (figures(announced_timeout=5.0), settings(), "lower", 4,
         "keepalive_timeout 30 > the Keep-Alive: timeout=5 the upstream announced: use 4"),
        # The smaller of what was seen and what was announced.
        (figures(announced_timeout=5.0, remote_idle_closes=1, shortest_idle_close=3.0,
                 low_idle_close=3.0), settings(), "lower", 2, "3 s after which"),
        (figures(stale=4), settings(), "check", 30,
         "4 reused connections were found closed by the upstream in the last 10 min, but no "
         "idle close was seen to time"),
        (figures(), settings(), "keep", 30, "no idle connection closed by the upstream and no "
         "Keep-Alive timeout announced in the last 10 min: 30 s is not known to be too long"),
        (figures(announced_timeout=5.0), settings(keepalive_timeout=0), "keep", 0,
         "keep-alive off (0)"),
    ],
)  # fmt: skip
def test_keepalive_timeout_rules(seen, settings_, action, value, reason):
    advice = advise(seen, settings_)["keepalive_timeout"]
    assert (advice.action, advice.value) == (action, value)
    assert reason in advice.reason


# --- backend_budget ---


def test_budget_counts_the_replicas_that_fit():
    checked = budget(settings(limit=100, backend_budget=800, workers=2), peak_in_use=37)
    assert checked is not None
    assert (checked["per_replica"], checked["replicas"], checked["exceeded"]) == (200, 4, False)
    assert checked["reason"] == (
        "workers 2 x limit 100 = 200 per replica: backend_budget 800 fits 4 replicas "
        "(replicas x workers x limit <= 800); peak 37 in use here"
    )


def test_budget_exceeded_by_one_replica_alone():
    checked = budget(settings(limit=50, backend_budget=80, workers=2), peak_in_use=0)
    assert checked is not None
    assert (checked["replicas"], checked["exceeded"]) == (0, True)
    assert "workers 2 x limit 50 = 100 > backend_budget 80: one replica alone may exceed it; " \
        "use limit 40" in checked["reason"]  # fmt: skip


def test_no_budget_block_when_the_budget_is_unknown():
    assert budget(settings(), peak_in_use=5) is None
    assert "budget" not in upstream_advice(figures(), settings())


# --- the window ---


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_keeps_ten_minutes_of_peaks_sums_and_extremes():
    clock = Clock()
    window = PoolWindow(clock)
    window.took(3)
    window.queued(2)
    window.waited(0.5)
    window.refused()
    window.went_stale()
    window.announced(5.0)
    for age in (4.0, 4.2, 4.1, 0.3):
        window.closed_idle(age)
    clock.now += 300
    window.took(7)
    window.waited(0.1)
    window.announced(2.0)
    seen = window.figures()
    assert seen == Figures(
        seconds=300.0, acquired=2, peak_active=7, peak_waiting=2, waits=2, wait_mean=0.3,
        wait_max=0.5, refused=1, stale=1, remote_idle_closes=4, shortest_idle_close=0.3,
        low_idle_close=4.0, announced_timeout=2.0,
    )  # fmt: skip
    # ?window=60: only the last minute's slots.
    assert window.figures(60).peak_active == 7 and window.figures(60).refused == 0
    clock.now += 301  # the first slot is now older than ten minutes
    assert window.figures().peak_active == 7 and window.figures().refused == 0
    clock.now += 600
    assert window.figures() == Figures(seconds=600.0)


def test_low_idle_close_is_the_tenth_percentile_once_there_are_ten():
    window = PoolWindow(Clock())
    for age in (0.2, *([5.0] * 19)):  # one restart-like outlier among twenty
        window.closed_idle(age)
    seen = window.figures()
    assert (seen.shortest_idle_close, seen.low_idle_close) == (0.2, 5.0)


@pytest.mark.parametrize("raw", ["0", "601", "-1", "ten", ""])
def test_window_query_must_be_whole_seconds_up_to_ten_minutes(raw):
    with pytest.raises(ValueError, match="window: must be whole seconds from 1 to 600"):
        window_seconds({"window": raw})
    assert window_seconds({}) == 600 and window_seconds({"window": "30"}) == 30


# --- workers: N ---


def test_workers_combine_to_the_busiest_limit_and_the_shortest_keepalive():
    s = settings(limit=10, backend_budget=100, workers=2)
    busy = upstream_advice(figures(peak_active=10, peak_waiting=6, waits=9, wait_max=0.4), s)
    quiet = upstream_advice(figures(peak_active=2, low_idle_close=3.0, remote_idle_closes=1,
                                    shortest_idle_close=3.0), s)  # fmt: skip
    combined = combine_workers([{"upstreams": {"api": quiet}}, None, {"upstreams": {"api": busy}}])
    advice = combined["api"]["advice"]
    assert (advice["limit"]["value"], advice["limit"]["worker"]) == (20, 2)
    assert (advice["keepalive_timeout"]["value"], advice["keepalive_timeout"]["worker"]) == (2, 0)
    assert combined["api"]["budget"]["peak_in_use"] == 12  # the backend sees both workers'


def test_a_few_idle_closes_size_by_their_median_and_one_sizes_nothing():
    """One backend restart closes idle connections at whatever age each had: found by review,
    where ages 0.02, 1.5 and 7 s advised keepalive_timeout 0.1."""
    clock = Clock()
    window = PoolWindow(clock)
    window.closed_idle(0.02)
    assert window.figures().low_idle_close is None  # one close: no timeout to infer
    for age in (1.5, 7.0):
        window.closed_idle(age)
    clock.now += 1
    assert window.figures().low_idle_close == 1.5


def test_an_announced_timeout_under_a_second_is_a_check_not_a_value():
    advice = advise_keepalive(figures(announced_timeout=0.0), settings())
    assert (advice.action, advice.value) == ("check", 30.0)
    assert "consider keepalive_timeout 0" in advice.reason
