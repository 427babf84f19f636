"""The Prometheus metrics: names, labels, per-request recording, and the exposition.

Per-request updates are plain integer and float additions; everything is turned into metric
families when Prometheus scrapes, and the pool gauges are read from the live pools then too.
prometheus-client's Counter and Histogram take a lock on every update; the proxy's requests and
its scrapes all run on one event loop thread, so here they need none (bench/: this halves the
cost of metrics per request). Knows nothing of aiohttp request objects.
"""

from __future__ import annotations

import bisect
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.accept import PAUSE_REASONS, PROXY_PROTOCOL_ERRORS
from proxy.config import LATENCY_BUCKETS
from proxy.deadlines import TIMEOUT_PHASES
from proxy.exchange import Exchange
from proxy.guard import UNAUTHORIZED_REASONS
from proxy.pool import CLOSE_REASONS, DISCARD_REASONS
from proxy.snapshot import Snapshot

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
DISCOVERY_RESULTS = ("ok", "failed")
ERROR_KINDS = ("connect", "timeout", "reset", "protocol", "client_abort")
ATTEMPT_FAILURE_KINDS = ("connect", "timeout", "reset", "protocol")
TUNNEL_RESULTS = ("upgraded", "refused", "rejected", "failed")
TUNNEL_DIRECTIONS = ("upstream", "downstream")
# How long tunnels live, 1 s to a day.
TUNNEL_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
RETRY_REASONS = ("connect", "reset", "stale")
EJECTION_REASONS = ("consecutive_failures", "health_check", "retry_after")
# Pool waits: 0 (no wait) is the common case; anything above it means `limit` is too small.
WAIT_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Buckets:
    """One histogram series: counts per upper bound (the last for +Inf), and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, list[tuple[str, float]]()
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class _Upstream:
    """The per-request series of one upstream."""

    __slots__ = ("errors", "pool_wait", "response", "tunnel_duration")

    def __init__(self) -> None:
        self.pool_wait = Buckets(WAIT_BUCKETS)
        self.response = Buckets(LATENCY_BUCKETS)
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.tunnel_duration = Buckets(TUNNEL_BUCKETS)


class ProxyMetrics:
    """The proxy's metrics, in their own registry (never prometheus-client's global one)."""

    def __init__(
        self,
        current: Callable[[], Snapshot],
        client_connections: Callable[[], int],
        access_log_dropped: Callable[[], int] = lambda: 0,
        client_timeouts: Callable[[], Mapping[str, int]] = dict,
        accept_paused: Callable[[], Mapping[str, int]] = dict,
        proxy_protocol_errors: Callable[[], Mapping[str, int]] = dict,
        admin_unauthorized: Callable[[], Mapping[str, int]] = dict,
        certificate_expiry: Callable[[], Mapping[str, float]] = dict,
        pool_advice: Callable[[], Iterable[tuple[str, str, float]]] = tuple,
    ) -> None:
        self.current = current
        self.client_connections = client_connections
        self.client_timeouts = client_timeouts
        self.accept_paused = accept_paused
        self.proxy_protocol_errors = proxy_protocol_errors
        self.access_log_dropped = access_log_dropped
        self.admin_unauthorized = admin_unauthorized
        self.certificate_expiry = certificate_expiry  # notAfter by key path, e.g. listen.tls.cert
        self.pool_advice = pool_advice  # (upstream, setting, recommended value): advice.py
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.tunnels: dict[tuple[str, str, str], int] = {}  # (route, upstream, result)
        self.rate_limited: dict[str, int] = {}  # by route: answered 429 by its rate_limit
        self.redirects: dict[tuple[str, int], int] = {}  # (route, status) of redirect routes
        self.durations: dict[tuple[str, str], Buckets] = {}
        self.upstreams: dict[str, _Upstream] = {}
        self.reloads = {"success": 0, "failure": 0, "rolled_back": 0}  # rollback.py
        self.last_reload_success = 0.0  # wall clock of the last config applied (start-up too)
        self.config_hash = ""
        self.registry = CollectorRegistry()
        self.registry.register(_Exposition(self))

    def prepare(
        self,
        routes: Iterable[tuple[str, str]],
        upstreams: Iterable[str],
        limited: Iterable[str] = (),
        redirects: Iterable[tuple[str, int]] = (),
    ) -> None:
        """Create every series of the configured routes and upstreams at 0, so a dashboard shows
        an idle upstream rather than nothing. `routes` are (route, upstream) name pairs;
        `limited` the names of the routes with a rate_limit; `redirects` (route, status) pairs
        of the routes that answer with a redirect."""
        for redirect in redirects:
            self.redirects.setdefault(redirect, 0)
        for route in limited:
            self.rate_limited.setdefault(route, 0)
        for route, upstream in routes:
            self.durations.setdefault((route, upstream), Buckets(LATENCY_BUCKETS))
            for result in TUNNEL_RESULTS:
                self.tunnels.setdefault((route, upstream, result), 0)
        for upstream in upstreams:
            self.upstreams.setdefault(upstream, _Upstream())

    def record(self, e: Exchange) -> None:
        """Account one finished request: the hot path, a few dict lookups and additions."""
        method = e.method if e.method in METHODS else "OTHER"
        key = (e.route, e.upstream, method, e.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        duration = self.durations.get((e.route, e.upstream))
        if duration is None:
            duration = self.durations[e.route, e.upstream] = Buckets(LATENCY_BUCKETS)
        duration.observe(e.duration)
        if e.rate_limited:
            self.rate_limited[e.route] = self.rate_limited.get(e.route, 0) + 1
        if e.redirected:
            key2 = (e.route, e.status)
            self.redirects[key2] = self.redirects.get(key2, 0) + 1
        if e.upstream:
            upstream = self.upstreams.get(e.upstream)
            if upstream is None:
                upstream = self.upstreams[e.upstream] = _Upstream()
            upstream.pool_wait.observe(e.pool_wait)
            if e.upstream_seconds is not None:
                upstream.response.observe(e.upstream_seconds)
            if e.error is not None:
                upstream.errors[e.error] += 1
            if e.tunnel is not None:
                key3 = (e.route, e.upstream, e.tunnel)
                self.tunnels[key3] = self.tunnels.get(key3, 0) + 1
                if e.tunnel == "upgraded":  # from the 101 to the close
                    upstream.tunnel_duration.observe(e.duration - (e.upstream_seconds or 0.0))


def _histogram(name: str, doc: str, labels: tuple[str, ...]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _by_label(
    name: str, doc: str, label: str, values: Iterable[str], counts: Mapping[str, int]
) -> CounterMetricFamily:
    """A counter with one label whose every value is exposed, at 0 until it happens."""
    family = CounterMetricFamily(name, doc, labels=(label,))
    for value in values:
        family.add_metric([value], counts.get(value, 0))
    return family


def admin_unauthorized_family(counts: Mapping[str, int]) -> CounterMetricFamily:
    """Also the supervisor's, for its own admin listener (workers.py)."""
    return _by_label(
        "proxy_admin_unauthorized",
        "Admin requests refused 401, by reason (missing: no bearer token; wrong: another token).",
        "reason", UNAUTHORIZED_REASONS, counts,
    )  # fmt: skip


class _Exposition(Collector):
    """Turns the counts, and the live pools, into metric families when Prometheus scrapes."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(
            "proxy_requests",
            "Requests answered, by the status the client got (499: the client went away first).",
            labels=("route", "upstream", "method", "code"),
        )
        for (route, upstream, method, code), count in m.requests.items():
            requests.add_metric([route, upstream, method, str(code)], count)
        duration = _histogram(
            "proxy_request_duration_seconds",
            "From request received to response finished.",
            ("route", "upstream"),
        )
        for (route, upstream), buckets in m.durations.items():
            duration.add_metric([route, upstream], buckets.cumulative(), buckets.sum)
        pool_wait = _histogram(
            "proxy_upstream_pool_wait_seconds",
            "Time spent waiting for a free pool slot (0 when none was needed).",
            ("upstream",),
        )
        response = _histogram(
            "proxy_upstream_response_seconds",
            "Time to the upstream's response headers.",
            ("upstream",),
        )
        errors = CounterMetricFamily(
            "proxy_upstream_errors",
            "Failures of the proxy's upstream requests, by kind.",
            labels=("upstream", "kind"),
        )
        tunnel_duration = _histogram(
            "proxy_tunnel_duration_seconds",
            "How long upgraded connections (WebSocket and others) lived, from 101 to close.",
            ("upstream",),
        )
        for name, series in m.upstreams.items():
            buckets = series.tunnel_duration
            tunnel_duration.add_metric([name], buckets.cumulative(), buckets.sum)
            pool_wait.add_metric([name], series.pool_wait.cumulative(), series.pool_wait.sum)
            response.add_metric([name], series.response.cumulative(), series.response.sum)
            for kind, count in series.errors.items():
                errors.add_metric([name, kind], count)
        tunnels = CounterMetricFamily(
            "proxy_tunnels",
            "Upgrade requests, by result: upgraded (101), refused (the upstream answered "
            "otherwise), rejected (over tunnels.limit), failed (no connection).",
            labels=("route", "upstream", "result"),
        )
        for (route, upstream, result), count in m.tunnels.items():
            tunnels.add_metric([route, upstream, result], count)
        yield from (requests, duration, pool_wait, response, errors, tunnels, tunnel_duration)
        yield _by_label(
            "proxy_rate_limited",
            "Requests answered 429 by their route's rate_limit, without contacting the upstream.",
            "route", m.rate_limited, m.rate_limited,
        )  # fmt: skip
        redirects = CounterMetricFamily(
            "proxy_redirects",
            "Requests answered with a redirect by their route (routes[].redirect), by status.",
            labels=("route", "code"),
        )
        for (route, code), count in m.redirects.items():
            redirects.add_metric([route, str(code)], count)
        yield redirects
        yield from _pool_families(m.current())
        advice = GaugeMetricFamily(
            "proxy_upstream_pool_advice",
            "The value GET /pools/advice recommends for each pool setting (limit, max_pending, "
            "keepalive_timeout), from the last 10 minutes of the pool.",
            labels=("upstream", "setting"),
        )
        for upstream, setting, value in m.pool_advice():
            advice.add_metric([upstream, setting], value)
        yield advice
        yield GaugeMetricFamily(
            "proxy_client_connections", "Open client connections.", m.client_connections()
        )
        yield _by_label(
            "proxy_client_timeouts",
            "Client connections cut by a listen.timeouts deadline, by phase (header: request "
            "head or TLS handshake; body: a silent upload; send: a client not reading).",
            "phase", TIMEOUT_PHASES, m.client_timeouts(),
        )  # fmt: skip
        yield _by_label(
            "proxy_client_accept_paused",
            "Times the listener stopped accepting, by reason (max_connections reached; out of "
            "file descriptors): new clients wait in the kernel backlog meanwhile.",
            "reason", PAUSE_REASONS, m.accept_paused(),
        )  # fmt: skip
        yield _by_label(
            "proxy_proxy_protocol_errors",
            "Client connections closed for want of a valid PROXY protocol header "
            "(listen.proxy_protocol), by reason (malformed; timeout: incomplete at "
            "listen.timeouts.header; closed: the client left first).",
            "reason", PROXY_PROTOCOL_ERRORS, m.proxy_protocol_errors(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "proxy_access_log_dropped",
            "Access log lines dropped because the writer fell behind.",
            m.access_log_dropped(),
        )
        reloads = CounterMetricFamily(
            "proxy_config_reloads", "Config reloads (SIGHUP, POST /reload), by result.",
            labels=("result",),
        )  # fmt: skip
        for result, count in m.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield admin_unauthorized_family(m.admin_unauthorized())
        yield GaugeMetricFamily(
            "proxy_config_last_reload_success_timestamp_seconds",
            "When the config in force was applied (at start-up or by the last good reload).",
            m.last_reload_success,
        )
        expiry = m.certificate_expiry()
        if expiry:  # without TLS the family is left out rather than exposed empty
            certificates = GaugeMetricFamily(
                "proxy_tls_certificate_expiry_timestamp_seconds",
                "When each certificate in use expires (its notAfter); `name` is the config key "
                "of its file (listen.tls.cert, listen.tls.certificates[0].cert, "
                "upstreams.NAME.tls.cert).",
                labels=("name",),
            )
            for name, not_after in expiry.items():
                certificates.add_metric([name], not_after)
            yield certificates
        config_hash = GaugeMetricFamily(
            "proxy_config_hash", "Always 1; `hash` identifies the config file in force.",
            labels=("hash",),
        )  # fmt: skip
        config_hash.add_metric([m.config_hash], 1)
        yield config_hash
        build = GaugeMetricFamily(
            "proxy_build_info",
            "Always 1; the labels say what is running.",
            labels=("version", "python", "aiohttp"),
        )
        build.add_metric([__version__, platform.python_version(), aiohttp.__version__], 1)
        yield build


def _pool_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Gauges read from the live pools: nothing about them is updated per request."""
    in_flight = GaugeMetricFamily(
        "proxy_requests_in_flight", "Requests being forwarded now.", labels=("upstream",)
    )
    connections = GaugeMetricFamily(
        "proxy_upstream_connections",
        "Open connections in the pool, by state (active: serving a request; idle: kept "
        "alive for reuse).",
        labels=("upstream", "state"),
    )
    created = CounterMetricFamily(
        "proxy_upstream_connections_created",
        "New TCP connections opened to the upstream (reuse = requests - created).",
        labels=("upstream",),
    )
    waiting = GaugeMetricFamily(
        "proxy_upstream_pool_waiting",
        "Requests waiting for a free pool slot now.",
        labels=("upstream",),
    )
    limit = GaugeMetricFamily(
        "proxy_upstream_pool_limit", "Configured pool.limit (0 = unlimited).", labels=("upstream",)
    )
    limit_per_host = GaugeMetricFamily(
        "proxy_upstream_pool_limit_per_host",
        "Configured pool.limit_per_host (0 = unlimited).",
        labels=("upstream",),
    )
    retries = CounterMetricFamily(
        "proxy_upstream_retries",
        "Attempts made again on another target, by the reason the previous one failed.",
        labels=("upstream", "reason"),
    )
    target_up = GaugeMetricFamily(
        "proxy_upstream_target_up",
        "1 while the target is in rotation: passing health checks, not ejected, not resting.",
        labels=("upstream", "target"),
    )
    ejections = CounterMetricFamily(
        "proxy_upstream_ejections",
        "Times a target was taken out of rotation, by reason.",
        labels=("upstream", "target", "reason"),
    )
    rejected = CounterMetricFamily(
        "proxy_upstream_pending_rejected",
        "Requests answered 503 at once because max_pending requests already waited.",
        labels=("upstream",),
    )
    stale = CounterMetricFamily(
        "proxy_upstream_stale_connections",
        "Reused connections the upstream had closed, detected and recovered from by a retry.",
        labels=("upstream",),
    )
    discarded = CounterMetricFamily(
        "proxy_upstream_connections_discarded",
        "Upstream connections closed instead of reused, by reason (unsolicited_data: bytes "
        "that answer no request arrived on it).",
        labels=("upstream", "reason"),
    )
    attempt_failures = CounterMetricFamily(
        "proxy_upstream_attempt_failures",
        "Failed attempts per target, retried or not (what retries hide from final outcomes).",
        labels=("upstream", "target", "kind"),
    )
    # Not "proxy_tunnels", as issue 9 named it: that is the family of the counter
    # proxy_tunnels_total, and OpenMetrics (which Prometheus asks for first) allows one family
    # per name: a gauge of the same name would fail every scrape.
    tunnels_open = GaugeMetricFamily(
        "proxy_tunnels_open",
        "Upgraded connections open now (handshakes included).",
        labels=("upstream",),
    )
    tunnel_bytes = CounterMetricFamily(
        "proxy_tunnel_bytes",
        "Bytes relayed through tunnels, by direction (upstream: from clients).",
        labels=("upstream", "direction"),
    )
    closed = CounterMetricFamily(
        "proxy_upstream_connections_closed",
        "Upstream connections closed, by reason (pool.py: idle_timeout, keepalive_hint, "
        "max_requests, max_age, remote, stale, error, reload, shutdown).",
        labels=("upstream", "reason"),
    )
    refreshes = CounterMetricFamily(
        "proxy_upstream_discovery_refreshes",
        "Resolutions of a dns or srv target, by result (a failed one keeps the last good set).",
        labels=("upstream", "result"),
    )
    known_targets = GaugeMetricFamily(
        "proxy_upstream_targets",
        "Targets the upstream has now: fixed ones and those discovered.",
        labels=("upstream",),
    )
    panic = GaugeMetricFamily(
        "proxy_upstream_panic",
        "1 while no target is in rotation and every target is tried (panic mode).",
        labels=("upstream",),
    )
    now = time.monotonic()
    for name, upstream in snapshot.upstreams.items():
        for reason in RETRY_REASONS:
            retries.add_metric([name, reason], upstream.retries.get(reason, 0))
        available = 0
        for target in upstream.targets:
            up = target.available(now)
            available += up
            target_up.add_metric([name, target.url], int(up))
            for reason in EJECTION_REASONS:
                count = target.ejection_counts.get(reason, 0)
                ejections.add_metric([name, target.url, reason], count)
            for kind in ATTEMPT_FAILURE_KINDS:
                count = target.attempt_failures.get(kind, 0)
                attempt_failures.add_metric([name, target.url, kind], count)
        for reason in DISCARD_REASONS:
            discarded.add_metric([name, reason], upstream.connector.discarded[reason])
        for reason in CLOSE_REASONS:
            closed.add_metric([name, reason], upstream.connector.closes[reason])
        if upstream.discovery is not None:
            for result in DISCOVERY_RESULTS:
                refreshes.add_metric([name, result], upstream.discovery.refreshes[result])
        known_targets.add_metric([name], len(upstream.targets))
        tunnels_open.add_metric([name], upstream.tunnels_open)
        for direction in TUNNEL_DIRECTIONS:
            tunnel_bytes.add_metric([name, direction], upstream.tunnel_bytes[direction])
        rejected.add_metric([name], upstream.pending_rejected)
        stale.add_metric([name], upstream.stale)
        panic.add_metric([name], int(available == 0))
        stats = upstream.target_stats()
        in_flight.add_metric([name], upstream.in_flight)
        connections.add_metric([name, "active"], sum(t.active for t in stats))
        connections.add_metric([name, "idle"], sum(t.idle for t in stats))
        created.add_metric([name], upstream.connector.created)
        waiting.add_metric([name], upstream.connector.waiting)
        limit.add_metric([name], upstream.settings.pool.limit)
        limit_per_host.add_metric([name], upstream.settings.pool.limit_per_host)
    yield from (in_flight, connections, created, waiting, limit, limit_per_host)
    yield from (retries, target_up, ejections, rejected, stale, panic)
    yield from (discarded, attempt_failures, tunnels_open, tunnel_bytes)
    yield from (closed, refreshes, known_targets)
