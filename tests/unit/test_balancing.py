from __future__ import annotations

import collections
import os
import random
import subprocess
import sys

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.balancing import Balancer, NoTarget, TargetState, hash_key


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


# --- balance: hash ---

KEYS = [f"client-{i}" for i in range(1000)]
# SHAKE-128 of the url for the ring points, blake2b of the key: the same in every process and
# on every machine.
EXPECTED_URLS = ["http://t3:80", "http://t5:80", "http://t5:80", "http://t8:80", "http://t9:80"]


def mapping(balancer: Balancer, keys: list[str] = KEYS, now: float = 0.0) -> dict[str, TargetState]:
    return {key: balancer.pick(now, key=key) for key in keys}


def home_and_next(pool: list[TargetState], key: str) -> tuple[TargetState, TargetState]:
    """The key's target, and where it goes when that one is gone: the next one clockwise."""
    home = Balancer(pool, "hash").pick(0.0, key=key)
    rest = [t for t in pool if t is not home]
    return home, Balancer(rest, "hash").pick(0.0, key=key)


def test_hash_ring_moves_only_the_keys_of_a_target_that_leaves():
    pool = targets(*[1] * 10)
    balancer = Balancer(pool, "hash")
    before = mapping(balancer)
    gone = pool[3]
    balancer.set_targets([t for t in pool if t is not gone])
    after = mapping(balancer)
    staying = [k for k in KEYS if before[k] is not gone]
    kept = sum(after[k] is before[k] for k in staying) / len(staying)
    moved = sum(after[k] is not before[k] for k in KEYS) / len(KEYS)
    assert kept >= 0.95
    assert 0.05 <= moved <= 0.15
    assert gone not in after.values()


def test_hash_ring_moves_keys_only_to_a_target_that_joins():
    pool = targets(*[1] * 10)
    balancer = Balancer(pool, "hash")
    before = mapping(balancer)
    new = TargetState("http://t10:80")
    balancer.set_targets([*pool, new])
    after = mapping(balancer)
    moved = [k for k in KEYS if after[k] is not before[k]]
    assert 0.03 <= len(moved) / len(KEYS) <= 0.15
    assert {after[k] for k in moved} == {new}


def test_hash_honours_weights():
    heavy, _ = pool = targets(3, 1)
    keys = [f"user-{i}" for i in range(10_000)]
    counts = collections.Counter(mapping(Balancer(pool, "hash"), keys).values())
    assert 0.65 <= counts[heavy] / len(keys) <= 0.85


def leave_and_join(pool: list[TargetState], odd: TargetState) -> None:
    """`odd` leaves, then comes back: every key of a target that stayed keeps that target, and
    only `odd`'s keys move."""
    balancer = Balancer(pool, "hash")
    before = mapping(balancer)
    balancer.set_targets([t for t in pool if t is not odd])
    after = mapping(balancer)
    assert all(after[k] is before[k] for k in KEYS if before[k] is not odd)
    balancer.set_targets(pool)
    assert mapping(balancer) == before


@pytest.mark.parametrize(
    "weights",
    [
        [2] * 9 + [1],  # the weight-1 one leaves: the others' gcd goes from 1 to 2
        [10] * 9 + [3],  # SRV-like weights
        [10] * 9 + [5],
        [4, 6, 6, 9],  # gcd 1 -> 3 without the first, 1 -> 2 without the last
        [1, 65535, 3],  # far above the points cap
    ],
)
def test_hash_keys_of_targets_that_stay_never_move_whatever_the_weights(weights):
    pool = targets(*weights)
    for odd in pool:
        leave_and_join(pool, odd)


def test_hash_srv_weights_one_target_leaving_moves_only_its_share():
    pool = targets(*[10] * 9, 3)
    balancer = Balancer(pool, "hash")
    before = mapping(balancer)
    balancer.set_targets(pool[:-1])
    after = mapping(balancer)
    moved = sum(after[k] is not before[k] for k in KEYS) / len(KEYS)
    own = sum(t is pool[-1] for t in before.values()) / len(KEYS)
    assert moved == own
    assert own <= 2 * 3 / 93  # its weight's share, give or take the ring's spread


def test_hash_weight_change_moves_keys_only_to_or_from_that_target():
    pool = targets(2, 1, 1, 1)
    balancer = Balancer(pool, "hash")
    before = mapping(balancer)
    pool[0].weight = 3
    balancer.set_targets(pool)
    after = mapping(balancer)
    moved = [k for k in KEYS if after[k] is not before[k]]
    assert moved
    assert {after[k] for k in moved} == {pool[0]}


def test_hash_ring_is_bounded_whatever_the_weights():
    # SRV weights go to 65535: weights above the cap count as the cap on the ring, so 100 such
    # targets still build a ring of 48,000 points (about 30 ms) and never millions.
    balancer = Balancer(targets(1, 65535), "hash")
    assert len(balancer._ring_hashes) == 48 + 480
    assert len(Balancer(targets(*[65535] * 100), "hash")._ring_hashes) == 48_000


def test_hash_honours_srv_like_weights_up_to_the_cap():
    heavy, _ = pool = targets(10, 3)
    keys = [f"user-{i}" for i in range(10_000)]
    counts = collections.Counter(mapping(Balancer(pool, "hash"), keys).values())
    assert 0.65 <= counts[heavy] / len(keys) <= 0.88  # 10/13 = 0.77


def test_hash_sends_a_key_to_the_same_target_in_every_balancer():
    first = {k: t.url for k, t in mapping(Balancer(targets(*[1] * 10), "hash")).items()}
    second = {k: t.url for k, t in mapping(Balancer(targets(*[1] * 10), "hash")).items()}
    assert first == second
    # Pinned: a hash salted per process (Python's hash()) would not give these in every run.
    assert [first[f"client-{i}"] for i in range(5)] == EXPECTED_URLS


def test_hash_mapping_does_not_depend_on_the_process_hash_seed():
    script = (
        "from proxy.balancing import Balancer, TargetState\n"
        "b = Balancer([TargetState(f'http://t{i}:80') for i in range(10)], 'hash')\n"
        "print(' '.join(b.pick(0.0, key=f'client-{i}').url for i in range(50)))\n"
    )
    urls = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        urls.append(done.stdout.split())
    here = [t.url for t in mapping(Balancer(targets(*[1] * 10), "hash"), KEYS[:50]).values()]
    assert urls[0] == urls[1] == here


def test_hash_bounded_load_spills_an_overloaded_targets_keys_to_the_next():
    pool = targets(1, 1, 1, 1)
    home, following = home_and_next(pool, "client-7")
    balancer = Balancer(pool, "hash")
    home.in_flight = 10  # bound: ceil(1.25 * (10 + 1) / 4) = 4
    assert balancer.pick(0.0, key="client-7") is following
    for target in pool:
        target.in_flight = 1  # bound: ceil(1.25 * (4 + 1) / 4) = 2: within it
    assert balancer.pick(0.0, key="client-7") is home


def test_hash_skips_an_unavailable_target_and_its_keys_come_back():
    pool = targets(1, 1, 1, 1)
    home, following = home_and_next(pool, "client-3")
    balancer = Balancer(pool, "hash")
    home.ejected_until = 10.0
    assert balancer.pick(5.0, key="client-3") is following
    assert balancer.panic is False
    assert balancer.pick(10.0, key="client-3") is home


def test_hash_never_falls_back_to_an_unavailable_target_while_one_is_available():
    # A is unhealthy; B was down too (panic) and has just recovered, so it ramps under slow
    # start and most keys are past its ramp: they must still go to B, not to unhealthy A.
    a, b = pool = targets(1, 1)
    a.healthy = False
    balancer = Balancer(pool, "hash", slow_start=30.0)
    b.healthy = False
    balancer.pick(100.0, key="x")
    b.healthy = True
    assert set(mapping(balancer, now=101.0).values()) == {b}
    assert balancer.panic is False


def test_hash_fallback_over_the_load_bound_prefers_an_available_target():
    a, b, c = pool = targets(1, 1, 1)
    a.healthy = c.healthy = False
    b.in_flight = 100  # far over its bound, and the only available target
    balancer = Balancer(pool, "hash")
    assert set(mapping(balancer).values()) == {b}
    # Nothing available left to try: a target not tried yet, unavailable or not.
    assert {balancer.pick(0.0, exclude=[b], key=k) for k in KEYS} == {a, c}


def test_hash_retry_excludes_the_tried_target():
    pool = targets(1, 1, 1)
    home, following = home_and_next(pool, "client-9")
    balancer = Balancer(pool, "hash")
    assert balancer.pick(0.0, exclude=[home], key="client-9") is following
    assert balancer.pick(0.0, exclude=pool, key="client-9") in pool  # nowhere else: any target


def test_hash_panic_mode_keeps_the_keys_target():
    pool = targets(1, 1, 1)
    home, following = home_and_next(pool, "client-5")
    for target in pool:
        target.healthy = False
    balancer = Balancer(pool, "hash")
    assert balancer.pick(0.0, key="client-5") is home
    assert balancer.panic is True
    assert balancer.pick(0.0, exclude=[home], key="client-5") is following


def test_hash_without_a_key_balances_by_least_requests():
    busy, idle = pool = targets(1, 1)
    busy.in_flight = 5
    balancer = Balancer(pool, "hash", random.Random(4))
    assert {balancer.pick(0.0, key=None) for _ in range(20)} == {idle}


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random", "hash"])
def test_no_target_until_discovery_finds_one(strategy):
    balancer = Balancer([], strategy)
    with pytest.raises(NoTarget):
        balancer.pick(0.0, key="k")
    (only,) = targets(1)
    balancer.set_targets([only])
    assert balancer.pick(0.0, key="k") is only
    balancer.set_targets([])
    with pytest.raises(NoTarget):
        balancer.pick(0.0)


def test_set_targets_keeps_the_single_target_fast_path_right():
    a, b = pool = targets(1, 1)
    balancer = Balancer(pool, "round_robin")
    balancer.set_targets([b])
    assert {balancer.pick(0.0) for _ in range(4)} == {b}
    balancer.set_targets([a, b])
    assert {balancer.pick(0.0) for _ in range(4)} == {a, b}


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize(
    ("hash_on", "request_headers", "expected"),
    [
        (None, headers(), "192.0.2.1"),
        ("client_ip", headers(), "192.0.2.1"),
        ("path", headers(), "/a/b"),
        ("header:X-User", headers(("x-user", "ann")), "ann"),
        ("header:X-User", headers(("X-Other", "ann")), None),
        ("cookie:b", headers(("Cookie", "a=1; b=2")), "2"),
        ("cookie:a", headers(("Cookie", "a=1;b=2")), "1"),
        ("cookie:sid", headers(("Cookie", "a=1"), ("Cookie", "sid=xyz; c=3")), "xyz"),
        ("cookie:sid", headers(("Cookie", "sid=1; sid=2")), "1"),  # the first wins
        ("cookie:sid", headers(("Cookie", "xsid=1; sidx=2; sid")), None),
        ("cookie:sid", headers(("Cookie", "sid=a=b")), "a=b"),
        ("cookie:sid", headers(), None),
        ("cookie:sid", {"Cookie": "sid=plain"}, "plain"),  # a plain mapping: one Cookie line
    ],
)
def test_hash_key_for_each_hash_on(hash_on, request_headers, expected):
    assert hash_key(hash_on, "192.0.2.1", "/a/b", request_headers) == expected


def test_hash_key_without_a_client_ip_is_none():
    assert hash_key("client_ip", None, "/", headers()) is None


# --- slow start ---


def test_slow_start_ramps_a_new_targets_weight_from_10_percent():
    pool = targets(1, 1)
    balancer = Balancer(pool, "round_robin", slow_start=10.0)
    new = TargetState("http://new:80")
    balancer.set_targets([*pool, new], now=100.0)
    assert balancer.effective_weight(new, 100.0) == pytest.approx(0.1)
    assert balancer.effective_weight(new, 105.0) == pytest.approx(0.55)
    assert balancer.effective_weight(new, 110.0) == 1.0
    assert balancer.effective_weight(new, 500.0) == 1.0
    assert balancer.effective_weight(pool[0], 100.0) == 1.0


def test_slow_start_of_a_target_added_without_a_time_begins_at_the_next_pick():
    pool = targets(1, 1)
    balancer = Balancer(pool, "round_robin", slow_start=10.0)
    new = TargetState("http://new:80", weight=2)
    balancer.set_targets([*pool, new])
    balancer.pick(50.0)
    assert balancer.effective_weight(new, 50.0) == pytest.approx(0.2)
    assert balancer.effective_weight(new, 55.0) == pytest.approx(1.1)


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random"])
def test_slow_start_share_of_a_new_target_grows(strategy):
    pool = targets(1, 1, 1, 1)
    balancer = Balancer(pool, strategy, random.Random(5), slow_start=100.0)
    new = TargetState("http://new:80")
    balancer.set_targets([*pool, new], now=0.0)

    def share(now: float) -> float:
        return sum(balancer.pick(now) is new for _ in range(4000)) / 4000

    # Full weight it would get 1/5; at 10% of its weight 0.1/4.1, at 55% 0.55/4.55.
    assert share(0.0) < 0.045
    assert 0.09 <= share(50.0) <= 0.15
    assert 0.17 <= share(150.0) <= 0.23


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random", "hash"])
def test_slow_start_does_not_ramp_the_start_up_targets(strategy):
    a, _ = pool = targets(1, 1)
    balancer = Balancer(pool, strategy, random.Random(6), slow_start=30.0)
    assert balancer.effective_weight(a, 0.0) == 1.0
    counts = collections.Counter(balancer.pick(0.0, key=f"k{i}") for i in range(1000))
    assert 400 <= counts[a] <= 600


def test_slow_start_ramps_a_recovered_target():
    a, b, _, _ = pool = targets(1, 1, 1, 1)
    b.ejected_until = 20.0
    balancer = Balancer(pool, "round_robin", slow_start=10.0)
    assert b not in {balancer.pick(5.0) for _ in range(10)}  # seen out of rotation
    assert sum(balancer.pick(20.0) is b for _ in range(310)) == 10  # 0.1 of 3.1 per round
    assert balancer.effective_weight(b, 20.0) == pytest.approx(0.1)
    assert balancer.effective_weight(b, 25.0) == pytest.approx(0.55)
    assert balancer.effective_weight(a, 20.0) == 1.0  # never out: not ramped


def test_slow_start_with_hash_moves_keys_to_a_new_target_gradually_and_once():
    pool = targets(*[1] * 9)
    balancer = Balancer(pool, "hash", slow_start=10.0)
    new = TargetState("http://t9:80")
    balancer.set_targets([*pool, new], now=0.0)
    on_new = [{k for k, t in mapping(balancer, now=now).items() if t is new} for now in (0, 5, 10)]
    assert len(on_new[0]) < 0.03 * len(KEYS)
    assert on_new[0] <= on_new[1] <= on_new[2]  # a key that moved to it stays
    assert 0.05 * len(KEYS) <= len(on_new[2]) <= 0.15 * len(KEYS)


@pytest.mark.parametrize("strategy", ["round_robin", "least_requests", "random"])
def test_slow_start_off_gives_a_new_target_its_full_weight_at_once(strategy):
    pool = targets(1, 1)
    balancer = Balancer(pool, strategy, random.Random(7))
    new = TargetState("http://new:80")
    balancer.set_targets([*pool, new])
    assert balancer.effective_weight(new, 0.0) == 1.0
    picks = sum(balancer.pick(0.0) is new for _ in range(3000))
    if strategy == "round_robin":
        assert picks == 1000
    else:
        assert 900 <= picks <= 1100
