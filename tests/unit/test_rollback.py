"""rollback.py's decisions: what a reload is watched for, when it is rolled back, on a clock we
move (no sockets; the e2e tests in tests/e2e/test_reload_rollback.py run them for real)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import Config, parse_config
from proxy.exchange import Exchange
from proxy.guard import load_policy
from proxy.recent import Recent
from proxy.reload import describe_changes
from proxy.rollback import (
    MIN_ERRORS,
    MIN_REQUESTS,
    Counts,
    InForce,
    Verification,
    describe_watch,
    judge,
    verify_seconds,
    watched,
)

API = ("route", "api")


@pytest.mark.parametrize(
    ("after", "before", "rolled_back"),
    [
        (Counts(120, 37), Counts(), True),  # a new route failing 31%
        (Counts(120, 37), Counts(100, 0), True),  # healthy before, failing after
        (Counts(9, 9), Counts(), False),  # too few requests to tell
        (Counts(20, MIN_ERRORS - 1), Counts(), False),  # two unlucky requests
        (Counts(100, 5), Counts(), False),  # exactly max_error_ratio: not above it
        (Counts(100, 6), Counts(), True),  # above it
        (Counts(100, 10), Counts(100, 10), False),  # failing 10% before and after: not the reload
        (Counts(100, 14), Counts(100, 10), False),  # worse, but by less than max_error_ratio
        (Counts(100, 16), Counts(100, 10), True),  # worse by more than max_error_ratio
        (Counts(100, 10), Counts(MIN_REQUESTS - 1, 9), True),  # too little before: from 0
    ],
)
def test_judge_rolls_back_only_when_the_reload_made_it_worse_by_more_than_the_ratio(
    after: Counts, before: Counts, rolled_back: bool
) -> None:
    assert (judge(API, after, before, 0.05) is not None) is rolled_back


def test_judge_says_which_key_failed_how_often_against_what() -> None:
    assert judge(API, Counts(120, 37), Counts(80, 0), 0.05) == (
        "route api: 37 of 120 requests failed since the reload (0.31, 0.00 before it; "
        "max_error_ratio 0.05)"
    )


def config(upstreams: dict[str, Any], routes: list[dict[str, Any]], **top: Any) -> Config:
    return parse_config({"upstreams": upstreams, "routes": routes, **top})


def route(name: str, prefix: str, to: str) -> dict[str, Any]:
    return {"name": name, "match": {"path_prefix": prefix}, "upstream": to}


OLD = config(
    {"api": {"targets": ["http://a:1"]}, "web": {"targets": ["http://w:1"]},
     "gone": {"targets": ["http://g:1"]}},
    [route("api", "/api/", "api"), route("web", "/", "web")],
)  # fmt: skip


def test_watched_are_the_added_and_changed_routes_and_upstreams_not_the_removed_or_same() -> None:
    new = config(
        {"api": {"targets": ["http://b:1"]}, "web": {"targets": ["http://w:1"]},
         "v2": {"targets": ["http://v:1"]}},
        [route("api", "/api/", "api"), route("v2", "/v2/", "v2"), route("web", "/", "v2")],
    )  # fmt: skip
    assert watched(OLD, new) == [
        ("upstream", "api"),  # targets changed
        ("upstream", "v2"),  # added
        ("route", "v2"),  # added
        ("route", "web"),  # now to v2
    ]
    assert watched(OLD, OLD) == []


def test_an_upstream_built_again_for_its_tls_files_is_watched_as_a_changed_one() -> None:
    assert watched(OLD, OLD, reread={"web"}) == [("upstream", "web")]
    assert describe_watch(OLD, OLD, 5, reread={"web"}) == (
        "verify 5 s: watching upstream web (max_error_ratio 0.05)"
    )


def test_a_reload_during_a_watch_keeps_watching_what_the_first_rebuilt_for_tls() -> None:
    clock = Clock()
    recent = Recent(clock)
    previous = InForce(OLD, load_policy(OLD.admin), None, "0" * 16)
    first = Verification(previous, OLD, 5, recent, no_verdict, clock, reread={"web"})
    second = Verification(first.previous, OLD, 5, recent, no_verdict, clock, follows=first)
    assert second.keys == [("upstream", "web")]


def test_describe_watch_for_the_reload_answer_and_check_diff() -> None:
    new = config(
        {"api": {"targets": ["http://b:1"]}, "web": {"targets": ["http://w:1"]}},
        [route("api", "/api/", "api"), route("web", "/", "web")],
        reload={"verify": 30, "max_error_ratio": 0.02},
    )
    assert describe_watch(OLD, new, 30) == (
        "verify 30 s: watching upstream api (max_error_ratio 0.02)"
    )
    assert describe_watch(OLD, new, 0) is None
    assert describe_watch(OLD, OLD, 5) == "verify 5 s: nothing added or changed to watch"


def test_describe_changes_reports_the_reload_key_as_applied_by_the_reload() -> None:
    new = config(
        {"api": {"targets": ["http://a:1"]}, "web": {"targets": ["http://w:1"]},
         "gone": {"targets": ["http://g:1"]}},
        [route("api", "/api/", "api"), route("web", "/", "web")],
        reload={"verify": 30},
    )  # fmt: skip
    assert describe_changes(OLD, new) == ["reload changed: reload.verify 0.0 -> 30.0"]


@pytest.mark.parametrize("value", ["abc", "-1", "3601", "nan", "inf", ""])
def test_verify_parameter_must_be_seconds_from_0_to_an_hour(value: str) -> None:
    with pytest.raises(ValueError, match=r"^verify: must be a number of seconds from 0 to 3600"):
        verify_seconds(value)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("30", 30.0), ("2.5", 2.5)])
def test_verify_parameter_accepts_seconds(value: str, seconds: float) -> None:
    assert verify_seconds(value) == seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.5

    def __call__(self) -> float:
        return self.now


def served(recent: Recent, count: int, failed: int = 0) -> None:
    for i in range(count):
        status = 500 if i < failed else 200
        recent.record(Exchange(0.0, 0.0, None, "GET", "/", route="api", upstream="api",
                               upstream_target="http://b:1", status=status))  # fmt: skip


async def no_verdict(verification: Verification, why: str | None) -> None:
    raise AssertionError("the watch is not started in these tests")


def verification(recent: Recent, clock: Clock, seconds: float) -> Verification:
    new = config(
        {"api": {"targets": ["http://b:1"]}, "web": {"targets": ["http://w:1"]}},
        [route("api", "/api/", "api"), route("web", "/", "web")],
    )
    previous = InForce(OLD, load_policy(OLD.admin), None, "0" * 16)
    return Verification(previous, new, seconds, recent, no_verdict, clock)


def test_counts_whole_seconds_after_the_reload_and_compares_with_the_minute_before() -> None:
    clock = Clock()
    recent = Recent(clock)
    for _ in range(3):  # three healthy seconds before the reload
        served(recent, 10)
        clock.now += 1
    served(recent, 5, failed=5)  # the reload's own second: left out, it mixes both configs
    watch = verification(recent, clock, 2)
    assert watch.before[("upstream", "api")] == Counts(30, 0)
    clock.now += 1
    served(recent, 10, failed=2)  # the second in progress: not yet counted
    assert watch.count() is None
    clock.now += 1
    assert watch.count() is None  # 2 failed: below MIN_ERRORS
    served(recent, 10, failed=2)
    clock.now += 1
    why = watch.count()
    assert why == (
        "upstream api: 4 of 20 requests failed since the reload (0.20, 0.00 before it; "
        "max_error_ratio 0.05)"
    )
    assert watch.keys == [("upstream", "api")]  # the route did not change: not watched


def test_a_watch_longer_than_recent_minute_keeps_counting() -> None:
    clock = Clock()
    recent = Recent(clock)
    watch = verification(recent, clock, 120)
    for _ in range(90):
        clock.now += 1
        served(recent, 1)
        assert watch.count() is None
    clock.now += 1
    watch.count()
    assert watch.after[("upstream", "api")] == Counts(90, 0)
