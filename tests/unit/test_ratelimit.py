"""Token buckets per route and key: sizes, refill, workers' shares, reloads, and the bound on
how many buckets a flood of keys can make."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.config import RateLimit, parse_config
from proxy.ratelimit import MAX_KEYS, Buckets, RateLimits


def limit(rps: float = 1.0, burst: int = 3, key: str = "client_ip") -> RateLimit:
    return RateLimit(requests_per_second=rps, burst=burst, key=key)


def routes(**rate_limit: object) -> tuple:
    config = parse_config(
        {
            "upstreams": {"a": {"targets": ["http://127.0.0.1:1"]}},
            "routes": [
                {"name": "limited", "match": {"path_prefix": "/"}, "upstream": "a",
                 "rate_limit": rate_limit},
                {"name": "free", "match": {"path_prefix": "/free/"}, "upstream": "a"},
            ],
        }
    )  # fmt: skip
    return config.routes


def test_a_full_bucket_lets_exactly_burst_requests_through_then_says_when():
    buckets = Buckets(limit(rps=2.0, burst=3))
    assert [buckets.take("k", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", 100.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("k", 100.25) == pytest.approx(0.25)  # refilled half a token meanwhile
    assert buckets.take("k", 100.5) == 0.0


def test_refill_never_exceeds_burst():
    buckets = Buckets(limit(rps=100.0, burst=2))
    assert buckets.take("k", 0.0) == 0.0
    assert [buckets.take("k", 1000.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert buckets.take("k", 1000.0) > 0


def test_each_key_has_its_own_bucket():
    buckets = Buckets(limit(rps=1.0, burst=1))
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0
    assert buckets.take(None, 0.0) == 0.0


@pytest.mark.parametrize(
    ("workers", "rate", "burst"),
    [(1, 10.0, 5.0), (2, 5.0, 3.0), (3, 10 / 3, 2.0), (8, 1.25, 1.0)],
)
def test_each_worker_enforces_its_share_rounded_up(workers, rate, burst):
    buckets = Buckets(limit(rps=10.0, burst=5), workers)
    assert (buckets.rate, buckets.burst) == (pytest.approx(rate), burst)


def test_a_flood_of_distinct_keys_keeps_at_most_max_keys_buckets():
    buckets = Buckets(limit(rps=1.0, burst=1), max_keys=100)
    for i in range(10_000):
        buckets.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(buckets) == 100
    assert MAX_KEYS == 65536


def test_the_least_recently_used_bucket_goes_first():
    buckets = Buckets(limit(rps=1.0, burst=1), max_keys=2)
    buckets.take("old", 0.0)
    buckets.take("busy", 0.0)
    buckets.take("old", 0.0)  # used again: now "busy" is the least recent
    buckets.take("new", 0.0)
    assert buckets.take("old", 0.0) > 0  # still drained: it was kept
    assert buckets.take("busy", 0.0) == 0.0  # dropped, so full again


@pytest.mark.parametrize(
    ("key", "client", "headers", "same_as_first"),
    [
        ("client_ip", "10.0.0.2", {}, False),
        ("client_ip", "10.0.0.1", {}, True),
        ("route", "10.0.0.2", {}, True),
        ("header:X-Api-Key", "10.0.0.1", {"x-api-key": "other"}, False),
        ("header:X-Api-Key", "10.0.0.2", {"X-API-KEY": "k1"}, True),
    ],
)
def test_the_key_decides_which_requests_share_a_bucket(key, client, headers, same_as_first):
    (limited, _) = routes(requests_per_second=0.001, burst=1, key=key)
    limits = RateLimits([limited])
    assert limits.retry_after(limited, "10.0.0.1", CIMultiDict({"X-Api-Key": "k1"})) == 0
    second = limits.retry_after(limited, client, CIMultiDict(headers))
    assert (second > 0) == same_as_first


def test_requests_without_the_header_share_one_bucket():
    (limited, _) = routes(requests_per_second=0.001, burst=1, key="header:X-Api-Key")
    limits = RateLimits([limited])
    assert limits.retry_after(limited, "10.0.0.1", CIMultiDict()) == 0
    assert limits.retry_after(limited, "10.0.0.2", CIMultiDict()) == 1000


def test_retry_after_is_whole_seconds_and_at_least_one():
    (limited, free) = routes(requests_per_second=50, burst=1, key="route")
    limits = RateLimits([limited, free])
    assert limits.retry_after(limited, None, CIMultiDict()) == 0
    assert limits.retry_after(limited, None, CIMultiDict()) == 1  # 0.02 s, rounded up to 1
    assert limits.retry_after(free, None, CIMultiDict()) == 0  # no rate_limit: never limited


def test_a_reload_keeps_buckets_of_unchanged_limits_only():
    (limited, free) = routes(requests_per_second=0.001, burst=1, key="route")
    first = RateLimits([limited, free])
    first.retry_after(limited, None, CIMultiDict())
    same = RateLimits([limited, free], keep=first)
    assert same.retry_after(limited, None, CIMultiDict()) > 0  # still drained
    (changed, _) = routes(requests_per_second=0.001, burst=2, key="route")
    assert RateLimits([changed], keep=same).retry_after(changed, None, CIMultiDict()) == 0


def test_a_long_header_key_is_kept_as_a_digest_so_the_table_stays_small():
    config = parse_config({
        "upstreams": {"a": {"targets": ["http://127.0.0.1:1"]}},
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "a",
                    "rate_limit": {"requests_per_second": 1, "burst": 1, "key": "header:K"}}],
    })  # fmt: skip
    limits = RateLimits(config.routes)
    route = config.routes[0]
    long_value = "v" * 8000
    assert limits.retry_after(route, None, CIMultiDict(K=long_value)) == 0
    assert limits.retry_after(route, None, CIMultiDict(K=long_value)) >= 1  # the same bucket
    assert limits.retry_after(route, None, CIMultiDict(K=long_value + "x")) == 0  # another
    (table,) = limits._routes.values()
    assert all(key is None or len(key) <= 64 for key in table._table)
