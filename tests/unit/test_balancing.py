from __future__ import annotations

import collections
import random

import pytest

from proxy.balancing import Balancer, TargetState


def targets(*weights: int) -> list[TargetState]:
    return [TargetState(f"http://t{i}:80", w) for i, w in enumerate(weights)]


def test_smooth_weighted_round_robin_interleaves():
    a, b, c = pool = targets(5, 1, 1)
    balancer = Balancer(pool, "round_robin")
    picks = [balancer.pick(0.0) for _ in range(7)]
    assert picks == [a, a, b, a, c, a, a]  # nginx's sequence, not a a a a a b c


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random"])
def test_unavailable_targets_are_skipped(strategy):
    a, b, c = pool = targets(1, 1, 1)
    b.healthy = False
    c.ejected_until = 10.0
    balancer = Balancer(pool, strategy, random.Random(1))
    assert {balancer.pick(5.0) for _ in range(20)} == {a}
    assert balancer.panic is False
    assert c in {balancer.pick(11.0) for _ in range(20)}  # the ejection is over


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random"])
def test_panic_mode_tries_every_target_when_none_is_available(strategy):
    pool = targets(1, 1)
    for target in pool:
        target.healthy = False
    balancer = Balancer(pool, strategy, random.Random(2))
    assert {balancer.pick(0.0) for _ in range(30)} == set(pool)
    assert balancer.panic is True


def test_a_retry_goes_to_a_target_not_yet_tried():
    a, b = pool = targets(1, 1)
    balancer = Balancer(pool, "round_robin")
    assert {balancer.pick(0.0, exclude=[a]) for _ in range(5)} == {b}
    assert balancer.pick(0.0, exclude=[a, b]) in pool  # nowhere else: any target


def test_least_requests_picks_fewer_in_flight_per_weight():
    light, heavy = pool = targets(1, 4)
    light.in_flight, heavy.in_flight = 1, 3  # 1 per weight vs 0.75 per weight
    balancer = Balancer(pool, "least_requests", random.Random(3))
    assert collections.Counter(balancer.pick(0.0) for _ in range(50)) == {heavy: 50}
