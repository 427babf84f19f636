"""The configuration: frozen dataclasses that mirror the YAML key for key, and their validation.

Owns parsing and checking `config.yaml`; knows nothing of aiohttp. Attribute names are the YAML
key names, so the key path in an error message is the attribute path in code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.checks import (
    ConfigError,
    IPNetwork,
    boolean,
    fraction,
    host_name,
    ip_network,
    key,
    list_of,
    mapping_of,
    non_negative_int,
    non_negative_seconds,
    one_of,
    optional,
    optional_section,
    parse_section,
    path_prefix,
    port,
    positive_int,
    positive_seconds,
    section,
    show,
    status_range,
    target_url,
    text,
    tls_version,
)
from proxy.checks import fail as _fail
from proxy.checks import is_int as _is_int

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


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = key(positive_seconds, 5.0)
    read: float = key(positive_seconds, 30.0)


@dataclass(frozen=True, slots=True)
class Target:
    url: str = key(target_url)
    weight: int = key(positive_int, 1)


def target(value: Any, path: str) -> Target:
    """A target: "http://host:port", or {url: ..., weight: N}."""
    if isinstance(value, dict):
        return parse_section(Target, value, path)
    return Target(url=target_url(value, path))


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
    targets: tuple[Target, ...] = key(list_of(target))
    pool: Pool = key(section(Pool), Pool())
    timeouts: Timeouts = key(section(Timeouts), Timeouts())
    balance: str = key(one_of("round_robin", "least_requests", "random"), "round_robin")
    max_pending: int = key(non_negative_int, 0)
    retries: Retries = key(section(Retries), Retries())
    health_check: HealthCheck | None = key(optional_section(HealthCheck), None)
    outlier: Outlier | None = key(optional_section(Outlier), None)
    tls: UpstreamTLS = key(section(UpstreamTLS), UpstreamTLS())
    tunnels: Tunnels = key(section(Tunnels), Tunnels())


@dataclass(frozen=True, slots=True)
class Match:
    path_prefix: str = key(path_prefix)
    host: str | None = key(host_name, None)


@dataclass(frozen=True, slots=True)
class Route:
    match: Match = key(section(Match))
    upstream: str = key(text)
    name: str = key(text, "")  # "" until parse_config fills in host + path_prefix
    strip_prefix: bool = key(boolean, False)
    max_body: int | None = key(non_negative_int, None)  # overrides listen.limits.max_body
    upgrade: bool = key(boolean, True)  # false: an Upgrade request gets 400


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


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document; pure, raises ConfigError naming the first bad key."""
    config = parse_section(Config, data, "")
    _check_together(config)
    routes = []
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if route.upstream not in config.upstreams:
            known = ", ".join(config.upstreams)
            raise ConfigError(
                f"routes[{i}].upstream: unknown upstream {show(route.upstream)} (known: {known})"
            )
        if not route.name:
            route = dataclasses.replace(
                route, name=(route.match.host or "") + route.match.path_prefix
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
    """Read, parse and validate a config file; every failure is a one-line ConfigError."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None
    return parse_config(parse_yaml(source, str(path)))
