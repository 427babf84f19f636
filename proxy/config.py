"""The configuration: frozen dataclasses that mirror the YAML key for key, and their validation.

Owns parsing and checking `config.yaml`; knows nothing of aiohttp. Attribute names are the YAML
key names, so the key path in an error message is the attribute path in code.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
Check = Callable[[Any, str], Any]


class ConfigError(Exception):
    """One problem, as `<key path>: <what is required>, got <value>`."""


# --- checks: each takes (value, key path) and returns the parsed value or raises ConfigError ---


def show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "[]" if not value else "a list"
    return str(value)


def _fail(path: str, required: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: {required}, got {show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: Any, path: str) -> int:
    if not _is_int(value) or value < 1:
        raise _fail(path, "must be an integer >= 1", value)
    return int(value)


def fraction(value: Any, path: str) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise _fail(path, "must be a number from 0 to 1", value)
    return float(value)


def status_range(value: Any, path: str) -> tuple[int, int]:
    """ "200-399" or "200" (a YAML integer too): the inclusive range of healthy statuses."""
    required = "must be a status or a range of statuses like 200-399"
    text = str(value) if _is_int(value) else value
    if not isinstance(text, str):
        raise _fail(path, required, value)
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise _fail(path, required, value) from None
    if not 100 <= first <= last <= 599:
        raise _fail(path, required, value)
    return first, last


def non_negative_int(value: Any, path: str) -> int:
    if not _is_int(value) or value < 0:
        raise _fail(path, "must be an integer >= 0", value)
    return int(value)


def port(value: Any, path: str) -> int:
    if not _is_int(value) or not 0 <= value <= 65535:
        raise _fail(path, "must be an integer from 0 to 65535", value)
    return int(value)


def non_negative_seconds(value: Any, path: str) -> float:
    if not _is_number(value) or value < 0:
        raise _fail(path, "must be a number of seconds >= 0", value)
    return float(value)


def positive_seconds(value: Any, path: str) -> float:
    if not _is_number(value) or value <= 0:
        raise _fail(path, "must be a number of seconds > 0", value)
    return float(value)


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false", value)
    return value


def text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "must be a non-empty string", value)
    return value


def host_name(value: Any, path: str) -> str:
    """A Host header to match: compared case-insensitively and without its port."""
    if not isinstance(value, str) or not value or any(c in value for c in " /:"):
        raise _fail(path, "must be a host name without port or scheme", value)
    return value.lower()


def path_prefix(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail(path, "must be a string starting with '/'", value)
    return value


def target_url(value: Any, path: str) -> str:
    """An upstream target: scheme, host and port only; requests keep their own path."""
    required = (
        "must be an http:// or https:// URL with a host and no path, like http://10.0.0.5:9001"
    )
    if not isinstance(value, str):
        raise _fail(path, required, value)
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _fail(path, required, value) from None
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise _fail(path, required, value)
    if url.query or url.fragment or url.username or url.password:
        raise _fail(path, required, value)
    return f"{url.scheme}://{url.netloc}"


def one_of(*choices: str) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in choices:
            raise _fail(path, "must be one of " + ", ".join(choices), value)
        return str(value)

    return check


def optional_section(cls: type[T]) -> Check:
    """A section that is off when absent, and all defaults when present but empty."""

    def check(value: Any, path: str) -> T:
        return parse_section(cls, {} if value is None else value, path)

    return check


def list_of(item: Check) -> Check:
    def check(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or not value:
            raise _fail(path, "must be a non-empty list", value)
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return check


def mapping_of(item: Check) -> Check:
    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict) or not value:
            raise _fail(path, "must be a non-empty mapping of names", value)
        parsed = {}
        for name, v in value.items():
            if not isinstance(name, str) or not name:
                raise _fail(path, "names must be non-empty strings", name)
            parsed[name] = item(v, f"{path}.{name}")
        return parsed

    return check


def section(cls: type[T]) -> Check:
    """Parse a mapping into dataclass `cls`, whose fields carry their own checks."""

    def check(value: Any, path: str) -> T:
        return parse_section(cls, value, path)

    return check


def key(check: Check, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is a YAML key: its check, and its default if it is optional."""
    metadata = {"check": check}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_section(cls: type[T], value: Any, path: str) -> T:
    """Check each key in file order, so the first error reported is the first in the file."""
    where = path or "config"
    if value is None and path:
        value = {}  # `admin:` with nothing under it means "all defaults"
    if not isinstance(value, dict):
        raise _fail(where, "must be a mapping", value)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    parsed: dict[str, Any] = {}
    for name, raw in value.items():
        child = f"{path}.{name}" if path else str(name)
        if name not in known:
            raise ConfigError(f"{where}: unknown key {show(name)} (known: {', '.join(known)})")
        parsed[name] = known[name].metadata["check"](raw, child)
    for name, f in known.items():
        optional = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if name not in parsed and not optional:
            raise ConfigError(f"{where}: missing required key '{name}'")
    return cls(**parsed)


# --- the schema ---


@dataclass(frozen=True, slots=True)
class ListenTLS:
    cert: str = key(text)  # PEM certificate chain
    key: str = key(text)  # PEM private key


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = key(text, "0.0.0.0")
    port: int = key(port, 8080)
    keepalive_timeout: float = key(non_negative_seconds, 75.0)
    tls: ListenTLS | None = key(optional_section(ListenTLS), None)


@dataclass(frozen=True, slots=True)
class Admin:
    host: str = key(text, "127.0.0.1")
    port: int = key(port, 9901)


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
    ca_file: str | None = key(text, None)  # PEM CAs to trust instead of the system's
    verify: bool = key(boolean, True)
    server_name: str | None = key(host_name, None)  # SNI and the name the cert must carry


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


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document; pure, raises ConfigError naming the first bad key."""
    config = parse_section(Config, data, "")
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
