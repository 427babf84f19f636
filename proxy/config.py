"""The configuration: frozen dataclasses that mirror the YAML key for key, and their validation.

Owns parsing and checking `config.yaml`; knows nothing of aiohttp. Attribute names are the YAML
key names, so the key path in an error message is the attribute path in code.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.checks import (
    ConfigError,
    IPNetwork,
    boolean,
    dns_name,
    fraction,
    hash_key,
    header_field_name,
    host_name,
    host_pattern,
    ip_network,
    key,
    list_of,
    mapping_of,
    method,
    non_negative_int,
    non_negative_seconds,
    one_of,
    one_of_int,
    optional,
    optional_section,
    parse_section,
    path_prefix,
    port,
    positive_int,
    positive_seconds,
    rate,
    rate_limit_key,
    redirect_host,
    regex,
    regex_groups,
    replacement,
    replacement_pieces,
    request_id_header,
    request_path,
    resolver,
    section,
    show,
    status_range,
    target_url,
    text,
    text_value,
    tls_version,
)
from proxy.checks import fail as _fail
from proxy.checks import is_int as _is_int
from proxy.variables import substitute

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "show"]


# --- the schema ---


@dataclass(frozen=True, slots=True)
class CertificatePair:
    cert: str = key(text)  # PEM certificate chain
    key: str = key(text)  # PEM private key


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenTLS:
    cert: str = key(text)  # the default certificate chain (PEM)
    # More certificates, chosen by SNI from the names each one carries.
    certificates: tuple[CertificatePair, ...] = key(
        list_of(section(CertificatePair), empty=True), ()
    )
    min_version: str = key(tls_version, "1.2")
    client_ca: str | None = key(optional(text), None)  # require and verify client certificates
    key: str = key(text)  # its private key (PEM); last: the name shadows key() below it


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Deadlines for every client read and write (a slow or stalled client is cut)."""

    header: float = key(positive_seconds, 10.0)  # a complete request head (and TLS handshake)
    body: float = key(positive_seconds, 60.0)  # silence while a request body streams in
    send: float = key(positive_seconds, 60.0)  # response bytes left unaccepted by the client


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = key(positive_int, 10000)  # client connections open at once
    max_body: int = key(non_negative_int, 0)  # request body bytes (0 = no limit)
    max_request_line: int = key(positive_int, 8190)  # bytes; longer gets 414
    max_header: int = key(positive_int, 8190)  # bytes per header line; longer gets 431
    max_headers: int = key(positive_int, 128)  # header lines; more gets 431


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = key(text, "0.0.0.0")
    port: int = key(port, 8080)
    keepalive_timeout: float = key(non_negative_seconds, 75.0)  # 0: no keep-alive
    tls: ListenTLS | None = key(optional_section(ListenTLS), None)
    timeouts: ClientTimeouts = key(section(ClientTimeouts), ClientTimeouts())
    limits: Limits = key(section(Limits), Limits())
    # nginx's default: "X_Forwarded_For" and "X-Forwarded-For" are one CGI variable.
    allow_underscores_in_headers: bool = key(boolean, False)
    # Peers whose X-Forwarded-* headers are believed (none: every peer is the client).
    trusted_proxies: tuple[IPNetwork, ...] = key(list_of(ip_network, empty=True), ())
    proxy_protocol: bool = key(boolean, False)  # every connection starts with a PROXY header


@dataclass(frozen=True, slots=True)
class Admin:
    host: str = key(text, "127.0.0.1")
    port: int = key(port, 9901)
    token_file: str | None = key(optional(text), None)  # bearer token for all but the probes
    allowed_hosts: tuple[str, ...] = key(list_of(host_name, empty=True), ())  # beside IPs


@dataclass(frozen=True, slots=True)
class Pool:
    limit: int = key(non_negative_int, 100)
    limit_per_host: int = key(non_negative_int, 0)
    keepalive_timeout: float = key(non_negative_seconds, 30.0)
    max_requests: int = key(non_negative_int, 0)  # a connection closes after this many (0 = no)
    max_age: float = key(non_negative_seconds, 0.0)  # s, ±10% jitter, closed once idle (0 = no)
    min_idle: int = key(non_negative_int, 0)  # warm connections kept open per target
    # Connections the backend accepts from all proxies together (0 = not known): the pool
    # advice (advice.py) checks replicas x workers x limit against it.
    backend_budget: int = key(non_negative_int, 0)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = key(positive_seconds, 5.0)
    read: float = key(positive_seconds, 30.0)


@dataclass(frozen=True, slots=True)
class Target:
    url: str = key(target_url)
    weight: int = key(positive_int, 1)


def location_port(value: Any, path: str) -> int:
    """A port a Location can name (0, "any free port" to a listener, is none)."""
    if not _is_int(value) or not 1 <= value <= 65535:
        raise _fail(path, "must be an integer from 1 to 65535", value)
    return int(value)


@dataclass(frozen=True, slots=True)
class DnsTarget:
    """Every A and AAAA address of `dns` is a target (address:port), resolved again every
    discovery.refresh seconds."""

    dns: str = key(dns_name)
    port: int = key(location_port)
    scheme: str = key(one_of("http", "https"), "http")
    weight: int = key(positive_int, 1)  # each address's


@dataclass(frozen=True, slots=True)
class SrvTarget:
    """Every SRV record of `srv` is a target: its host, port and weight (RFC 2782)."""

    srv: str = key(dns_name)
    scheme: str = key(one_of("http", "https"), "http")


AnyTarget = Target | DnsTarget | SrvTarget


def target(value: Any, path: str) -> AnyTarget:
    """A target: "http://host:port", {url: ..., weight: N}, {dns: ..., port: N} or {srv: ...}."""
    if isinstance(value, dict):
        if "dns" in value:
            return parse_section(DnsTarget, value, path)
        if "srv" in value:
            return parse_section(SrvTarget, value, path)
        return parse_section(Target, value, path)
    return Target(url=target_url(value, path))


@dataclass(frozen=True, slots=True)
class Discovery:
    refresh: float = key(positive_seconds, 10.0)  # s between two resolutions of a name
    # () = system (getaddrinfo; dns targets only); else the name servers asked, in order.
    resolver: tuple[tuple[str, int], ...] = key(resolver, ())


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = key(positive_int, 2)
    budget: float = key(fraction, 0.2)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = key(path_prefix, "/healthz")
    interval: float = key(positive_seconds, 5.0)
    timeout: float = key(positive_seconds, 1.0)
    healthy_threshold: int = key(positive_int, 2)
    unhealthy_threshold: int = key(positive_int, 3)
    expect_status: tuple[int, int] = key(status_range, (200, 399))


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive_failures: int = key(positive_int, 5)
    ejection_time: float = key(positive_seconds, 30.0)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    ca_file: str | None = key(optional(text), None)  # PEM CAs to trust instead of the system's
    verify: bool = key(boolean, True)
    server_name: str | None = key(optional(host_name), None)  # SNI and the name to verify
    cert: str | None = key(optional(text), None)  # client certificate for https targets (mTLS)
    key: str | None = key(optional(text), None)  # its private key (last, as in ListenTLS)


@dataclass(frozen=True, slots=True)
class Tunnels:
    limit: int = key(non_negative_int, 1000)  # upgraded connections open at once (0 = unlimited)
    idle_timeout: float = key(non_negative_seconds, 3600.0)  # s without a byte (0 = never)


@dataclass(frozen=True, slots=True)
class Upstream:
    targets: tuple[AnyTarget, ...] = key(list_of(target))
    pool: Pool = key(section(Pool), Pool())
    timeouts: Timeouts = key(section(Timeouts), Timeouts())
    balance: str = key(one_of("round_robin", "least_requests", "random", "hash"), "round_robin")
    # What balance: hash hashes; None = client_ip (checked in parse_config: only with hash).
    hash_on: str | None = key(optional(hash_key), None)
    slow_start: float = key(non_negative_seconds, 0.0)  # s a target's weight ramps 10% -> 100%
    discovery: Discovery = key(section(Discovery), Discovery())
    max_pending: int = key(non_negative_int, 0)
    retries: Retries = key(section(Retries), Retries())
    health_check: HealthCheck | None = key(optional_section(HealthCheck), None)
    outlier: Outlier | None = key(optional_section(Outlier), None)
    tls: UpstreamTLS = key(section(UpstreamTLS), UpstreamTLS())
    tunnels: Tunnels = key(section(Tunnels), Tunnels())


absolute_path = path_prefix  # (inside Match the name path_prefix is a field's)


@dataclass(frozen=True, slots=True)
class Present:
    """A header condition that asks only whether the header is there."""

    present: bool = key(boolean)


def header_condition(value: Any, path: str) -> str | Present:
    """`X-Canary: "1"` (exact value) or `X-Debug: {present: true|false}`."""
    if isinstance(value, dict):
        return parse_section(Present, value, path)
    return text_value(value, path)


@dataclass(frozen=True, slots=True)
class Match:
    # Exactly one of the three path conditions (checked in parse_config).
    path_prefix: str | None = key(optional(absolute_path), None)
    path_exact: str | None = key(optional(absolute_path), None)
    path_regex: str | None = key(optional(regex), None)  # full match on the normalised path
    host: str | None = key(optional(host_pattern), None)  # exact, or "*." + domain
    methods: tuple[str, ...] | None = key(optional(list_of(method)), None)  # absent = any
    headers: Mapping[str, str | Present] = key(mapping_of(header_condition, empty=True), {})
    query: Mapping[str, str] = key(mapping_of(text_value, empty=True), {})  # raw parameter = value


@dataclass(frozen=True, slots=True)
class SplitTo:
    upstream: str = key(text)
    weight: int = key(positive_int)


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int = key(one_of_int(301, 302, 303, 307, 308), 308)
    scheme: str | None = key(optional(one_of("http", "https")), None)  # None keeps the request's
    host: str | None = key(optional(redirect_host), None)
    port: int | None = key(optional(location_port), None)
    path: str | None = key(optional(request_path), None)  # the request's query is kept after it


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    pattern: str = key(regex)
    replacement: str = key(replacement)  # \1 ... refer to the pattern's groups


@dataclass(frozen=True, slots=True)
class Rewrite:
    prefix: str | None = key(optional(request_path), None)  # replaces the matched path_prefix
    regex: RegexRewrite | None = key(optional_section(RegexRewrite), None)


# Header rules may not touch what is hop-by-hop or framing, nor Host (host_header is its key):
# the proxy sets those itself (headers.py).
_UNTOUCHABLE = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authenticate", "proxy-authorization", "content-length", "host"}
)  # fmt: skip
# A field value (RFC 9110 §5.5): visible ASCII, spaces and tabs inside; no CR/LF (no header
# can be smuggled in through the config) and nothing headers.py would refuse.
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")


def header_rule_name(value: Any, path: str) -> str:
    name = header_field_name(value, path)
    if name.lower() in _UNTOUCHABLE:
        required = "must not be a hop-by-hop or framing header (the proxy sets those itself)"
        if name.lower() == "host":
            required = "must not be Host (routes[].host_header sets it)"
        raise _fail(path, required, value)
    return name


def header_values(value: Any, path: str) -> dict[str, str]:
    """`{Name: value}`: each name a header rules may touch, each value a valid field value."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, "must be a mapping of header names to values", value)
    parsed = {}
    for name, raw in value.items():
        child = f"{path}.{name}"
        parsed[header_rule_name(name, child)] = text_value(raw, child)
        if not _FIELD_VALUE.fullmatch(parsed[name]):
            required = "must be a header value (visible ASCII; spaces and tabs only inside)"
            raise _fail(child, required, raw)
    return parsed


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Applied in this order: remove, set (replace), add (append)."""

    set: Mapping[str, str] = key(header_values, {})
    add: Mapping[str, str] = key(header_values, {})
    remove: tuple[str, ...] = key(list_of(header_rule_name, empty=True), ())


# A Host value (RFC 9110 §7.2): a host name or address, an IPv6 one in brackets, and a port.
_HOST_VALUE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?")


def host_header(value: Any, path: str) -> str:
    """pass (the client's Host), target (the chosen target's host:port) or a literal Host."""
    if value in ("pass", "target"):
        return str(value)
    if not isinstance(value, str) or not _HOST_VALUE.fullmatch(value):
        required = "must be pass, target, or a Host value like api.example.com or 10.0.0.5:8080"
        raise _fail(path, required, value)
    return value


@dataclass(frozen=True, slots=True)
class RouteHeaders:
    request: HeaderRules = key(section(HeaderRules), HeaderRules())
    response: HeaderRules = key(section(HeaderRules), HeaderRules())


@dataclass(frozen=True, slots=True)
class RouteTimeouts:
    read: float | None = key(optional(positive_seconds), None)  # overrides the upstream's read
    total: float = key(non_negative_seconds, 0.0)  # the whole exchange; 0 = no bound


@dataclass(frozen=True, slots=True)
class RouteRetries:
    attempts: int = key(positive_int)  # overrides the upstream's retries.attempts


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_second: float = key(rate)
    burst: int = key(positive_int)
    key: str = key(rate_limit_key, "client_ip")  # client_ip | route | header:NAME


# Request and upstream latencies, 1 ms to 1 min: the duration histograms' bucket bounds, which
# an SLO's latency must be one of (its rules count the requests under that bound).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def bucket_bound(value: Any, path: str) -> float:
    seconds = positive_seconds(value, path)
    if seconds not in LATENCY_BUCKETS:
        bounds = ", ".join(f"{b:g}" for b in LATENCY_BUCKETS)
        raise _fail(path, f"must be a bound of the latency histogram ({bounds})", value)
    return seconds


def percent(value: Any, path: str) -> float:
    """A percentage strictly between 0 and 100, like 99.9."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 100:
        raise _fail(path, "must be a percentage between 0 and 100 (exclusive), like 99.9", value)
    return float(value)


@dataclass(frozen=True, slots=True)
class Slo:
    """routes[].slo: the objectives `python -m proxy rules` writes alerts for (slo.py)."""

    availability: float | None = key(optional(percent), None)  # % of requests not 5xx
    latency: float | None = key(optional(bucket_bound), None)  # s: requests under it are fast
    latency_target: float = key(percent, 99.0)  # % of requests faster than `latency`


@dataclass(frozen=True, slots=True)
class Route:
    match: Match = key(section(Match))
    # Exactly one of upstream, split, redirect (checked in parse_config).
    upstream: str | None = key(optional(text), None)
    split: tuple[SplitTo, ...] | None = key(optional(list_of(section(SplitTo))), None)
    redirect: Redirect | None = key(optional_section(Redirect), None)
    name: str = key(text, "")  # "" until parse_config fills in host + path condition
    strip_prefix: bool = key(boolean, False)
    rewrite: Rewrite | None = key(optional_section(Rewrite), None)
    host_header: str = key(host_header, "pass")  # pass | target | any literal Host value
    headers: RouteHeaders = key(section(RouteHeaders), RouteHeaders())
    timeouts: RouteTimeouts | None = key(optional_section(RouteTimeouts), None)
    retries: RouteRetries | None = key(optional_section(RouteRetries), None)
    rate_limit: RateLimit | None = key(optional_section(RateLimit), None)
    max_body: int | None = key(non_negative_int, None)  # overrides listen.limits.max_body
    upgrade: bool = key(boolean, True)  # false: an Upgrade request gets 400
    slo: Slo | None = key(optional_section(Slo), None)  # service level objectives (alerts)

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Every upstream this route may send to (none for a redirect)."""
        if self.split is not None:
            return tuple(dict.fromkeys(s.upstream for s in self.split))
        return (self.upstream,) if self.upstream is not None else ()


# Headers the proxy itself decides: a request ID there would replace (or, trusted, keep) them.
_NOT_AN_ID = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip",
     "traceparent", "tracestate"}
)  # fmt: skip


def request_id_name(value: Any, path: str) -> str:
    """A header name, or "" (off); never a framing or hop-by-hop one (Content-Length: a hex ID
    would break the request's framing), nor one the proxy sets itself."""
    if value == "":
        return ""
    name = header_rule_name(request_id_header(value, path), path)
    if name.lower() in _NOT_AN_ID:
        raise ConfigError(f"{path}: {show(name)} is set by the proxy itself; choose another")
    return name


@dataclass(frozen=True, slots=True)
class RequestId:
    header: str = key(request_id_name, "X-Request-Id")  # "" = off
    trust_incoming: bool = key(boolean, True)  # keep a client's id when it is 1-200 visible ASCII


@dataclass(frozen=True, slots=True)
class Shutdown:
    delay: float = key(non_negative_seconds, 0.0)  # s between /readyz 503 and closing the port
    grace: float = key(non_negative_seconds, 30.0)  # s in-flight requests get to finish


def workers_count(value: Any, path: str) -> int:
    """An integer >= 1, or "auto" (0 here: the number of CPUs, resolved at start)."""
    if value == "auto":
        return 0
    if not _is_int(value) or not 1 <= value <= 256:
        raise _fail(path, "must be an integer from 1 to 256, or auto", value)
    return int(value)


MAX_VERIFY = 3600.0  # s: reload.verify and POST /reload?verify= (rollback.py) beyond it refused


def verify_seconds(value: Any, path: str) -> float:
    """reload.verify: seconds from 0 to MAX_VERIFY, as POST /reload?verify= takes."""
    seconds = non_negative_seconds(value, path)
    if seconds > MAX_VERIFY:
        raise _fail(path, f"must be a number of seconds from 0 to {MAX_VERIFY:g}", value)
    return seconds


@dataclass(frozen=True, slots=True)
class Reload:
    """A reload's verification (rollback.py): for `verify` seconds after it, each changed or
    added route and upstream whose error ratio exceeds `max_error_ratio` rolls it back."""

    verify: float = key(verify_seconds, 0.0)  # s, 0 = off
    max_error_ratio: float = key(fraction, 0.05)


@dataclass(frozen=True, slots=True)
class AccessLog:
    format: str = key(one_of("json", "text"), "json")
    enabled: bool = key(boolean, True)


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: Mapping[str, Upstream] = key(mapping_of(section(Upstream)))
    routes: tuple[Route, ...] = key(list_of(section(Route)))
    listen: Listen = key(section(Listen), Listen())
    admin: Admin = key(section(Admin), Admin())
    access_log: AccessLog = key(section(AccessLog), AccessLog())
    shutdown: Shutdown = key(section(Shutdown), Shutdown())
    workers: int = key(workers_count, 1)  # 0 = auto
    # The event loop every process serves on (loops.py); uvloop is the optional extra
    # `pip install 'proxy[uvloop]'`, checked at start-up and by --check.
    event_loop: str = key(one_of("asyncio", "uvloop"), "asyncio")
    request_id: RequestId = key(section(RequestId), RequestId())
    trace_context: bool = key(boolean, True)  # W3C traceparent: continue or start a trace
    reload: Reload = key(section(Reload), Reload())  # verify a reload, roll it back if it fails


def _check_together(config: Config) -> None:
    """Rules between keys, each named by the key that must change."""
    listen, admin = config.listen, config.admin
    anywhere = "0.0.0.0", "::"
    same_host = listen.host == admin.host or listen.host in anywhere or admin.host in anywhere
    if listen.port == admin.port and listen.port != 0 and same_host:
        raise ConfigError(
            f"admin.port: must differ from listen.port on the same host, got {admin.port}"
        )
    for name, upstream in config.upstreams.items():
        tls = upstream.tls
        if (tls.cert is None) != (tls.key is None):
            missing = "key" if tls.key is None else "cert"
            raise ConfigError(
                f"upstreams.{name}.tls.{missing}: a client certificate needs both cert and key"
            )
        pool = upstream.pool
        if pool.limit and pool.limit_per_host > pool.limit:
            raise ConfigError(
                f"upstreams.{name}.pool.limit_per_host: must be <= pool.limit "
                f"({pool.limit}) when the limit is set, got {pool.limit_per_host}"
            )
        for bound, at in ((pool.limit_per_host, "limit_per_host"), (pool.limit, "limit")):
            if bound and pool.min_idle > bound:
                raise ConfigError(
                    f"upstreams.{name}.pool.min_idle: must be <= pool.{at} ({bound}), "
                    f"got {pool.min_idle}"
                )
        if pool.min_idle and pool.keepalive_timeout == 0:
            raise ConfigError(
                f"upstreams.{name}.pool.min_idle: needs pool.keepalive_timeout above 0 "
                "(with 0 no connection is kept idle)"
            )
        if upstream.hash_on is not None and upstream.balance != "hash":
            raise ConfigError(
                f"upstreams.{name}.hash_on: needs balance: hash, got balance: {upstream.balance}"
            )
        for i, found in enumerate(upstream.targets):
            if isinstance(found, SrvTarget) and not upstream.discovery.resolver:
                raise ConfigError(
                    f"upstreams.{name}.targets[{i}].srv: needs discovery.resolver to list name "
                    "servers (the system resolver answers no SRV queries), e.g. "
                    '["10.96.0.10:53"]'
                )


def _check_route(route: Route, i: int, upstreams: Mapping[str, Upstream]) -> None:
    """Rules within one route, each named by the key that must change."""
    where = f"routes[{i}]"
    match = route.match
    paths = [k for k in ("path_prefix", "path_exact", "path_regex") if getattr(match, k)]
    if len(paths) != 1:
        raise ConfigError(
            f"{where}.match: needs exactly one of path_prefix, path_exact, path_regex, "
            f"got {', '.join(paths) or 'none'}"
        )
    for name in match.headers:  # a name no request can carry would never match
        header_field_name(name, f"{where}.match.headers")
    targets = [k for k in ("upstream", "split", "redirect") if getattr(route, k) is not None]
    if len(targets) != 1:
        raise ConfigError(
            f"{where}: needs exactly one of upstream, split, redirect, "
            f"got {', '.join(targets) or 'none'}"
        )
    named = [(f"{where}.upstream", route.upstream)] if route.upstream is not None else []
    named += [(f"{where}.split[{j}].upstream", s.upstream) for j, s in enumerate(route.split or ())]
    for path, name in named:
        if name not in upstreams:
            known = ", ".join(upstreams)
            raise ConfigError(f"{path}: unknown upstream {show(name)} (known: {known})")
    rewrite = route.rewrite
    if rewrite is not None:
        if (rewrite.prefix is None) == (rewrite.regex is None):
            raise ConfigError(f"{where}.rewrite: needs exactly one of prefix, regex")
        if route.strip_prefix:
            raise ConfigError(
                f"{where}.rewrite: cannot go with strip_prefix (rewrite.prefix: / does the same)"
            )
        if rewrite.prefix is not None and match.path_prefix is None:
            raise ConfigError(f"{where}.rewrite.prefix: needs match.path_prefix to replace")
        if rewrite.regex is not None:
            groups = regex_groups(rewrite.regex.pattern)
            used = [p for p in replacement_pieces(rewrite.regex.replacement) if isinstance(p, int)]
            if used and max(used) > groups:
                raise ConfigError(
                    f"{where}.rewrite.regex.replacement: refers to group \\{max(used)}, "
                    f"but the pattern has {groups} group{'s' if groups != 1 else ''}"
                )
    redirect = route.redirect
    if redirect is not None and redirect.path is not None and (rewrite or route.strip_prefix):
        raise ConfigError(
            f"{where}.redirect.path: cannot go with rewrite or strip_prefix, which set the "
            "Location's path from the request's"
        )
    if route.slo is not None and route.slo.availability is None and route.slo.latency is None:
        raise ConfigError(f"{where}.slo: needs availability, latency or both")
    if route.strip_prefix and match.path_prefix is None:
        raise ConfigError(f"{where}.strip_prefix: needs match.path_prefix to strip")


def _route_name(route: Route) -> str:
    match = route.match
    # nginx's markers: "= /x" exact, "~ re" regex; so /login and exact /login differ.
    path = match.path_prefix or (f"={match.path_exact}" if match.path_exact else None)
    path = path or f"~{match.path_regex}"
    return (match.host or "") + path


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document; pure, raises ConfigError naming the first bad key."""
    config = parse_section(Config, data, "")
    _check_together(config)
    routes = []
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        _check_route(route, i, config.upstreams)
        derived = not route.name
        if derived:
            route = dataclasses.replace(route, name=_route_name(route))
        if route.name in seen and derived:  # two routes on one path, told apart by methods...
            raise ConfigError(
                f"routes[{i}].name: must be set (metrics are labelled by it): the default, host "
                f"and path, {show(route.name)}, is already routes[{seen[route.name]}]'s"
            )
        if route.name in seen:
            raise ConfigError(
                f"routes[{i}].name: must be unique (metrics are labelled by it), "
                f"got {show(route.name)}, already used by routes[{seen[route.name]}]"
            )
        seen[route.name] = i
        routes.append(route)
    return dataclasses.replace(config, routes=tuple(routes))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: PyYAML silently keeps the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(name)}", mark
                )
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(source: str, filename: str) -> Any:
    try:
        return yaml.load(source, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{filename}: invalid YAML at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: invalid YAML: {exc}") from None


def load_config(path: str | Path) -> Config:
    """Read, parse, substitute `${VAR}`s (variables.py) and validate a config file; every
    failure is a one-line ConfigError."""
    return read_config(path)[0]


def read_config(path: str | Path) -> tuple[Config, bytes]:
    """load_config, and the bytes it read: what the supervisor restores after a rollback
    (workers.py), read once (the file may be a pipe)."""
    try:
        data = Path(path).read_bytes()
        source = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None
    # ${VAR} after parsing and before validation: at start-up and at every reload.
    return parse_config(substitute(parse_yaml(source, str(path)), os.environ)), data
