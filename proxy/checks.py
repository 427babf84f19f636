"""The building blocks of config validation: checks that turn a YAML value into a typed one or
raise ConfigError naming the key path, and the generic reader of a section into a dataclass.

Knows nothing of the proxy's keys: proxy/config.py declares them with these.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import field
from typing import Any, TypeVar

import re2  # type: ignore[import-untyped]

T = TypeVar("T")
Check = Callable[[Any, str], Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def fail(path: str, required: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: {required}, got {show(value)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: Any, path: str) -> int:
    if not is_int(value) or value < 1:
        raise fail(path, "must be an integer >= 1", value)
    return int(value)


def fraction(value: Any, path: str) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise fail(path, "must be a number from 0 to 1", value)
    return float(value)


def status_range(value: Any, path: str) -> tuple[int, int]:
    """ "200-399" or "200" (a YAML integer too): the inclusive range of healthy statuses."""
    required = "must be a status or a range of statuses like 200-399"
    text = str(value) if is_int(value) else value
    if not isinstance(text, str):
        raise fail(path, required, value)
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise fail(path, required, value) from None
    if not 100 <= first <= last <= 599:
        raise fail(path, required, value)
    return first, last


def non_negative_int(value: Any, path: str) -> int:
    if not is_int(value) or value < 0:
        raise fail(path, "must be an integer >= 0", value)
    return int(value)


def port(value: Any, path: str) -> int:
    if not is_int(value) or not 0 <= value <= 65535:
        raise fail(path, "must be an integer from 0 to 65535", value)
    return int(value)


def non_negative_seconds(value: Any, path: str) -> float:
    if not _is_number(value) or value < 0:
        raise fail(path, "must be a number of seconds >= 0", value)
    return float(value)


def positive_seconds(value: Any, path: str) -> float:
    if not _is_number(value) or value <= 0:
        raise fail(path, "must be a number of seconds > 0", value)
    return float(value)


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise fail(path, "must be true or false", value)
    return value


def text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(path, "must be a non-empty string", value)
    return value


def host_name(value: Any, path: str) -> str:
    """A Host header to match: compared case-insensitively and without its port."""
    if not isinstance(value, str) or not value or any(c in value for c in " /:"):
        raise fail(path, "must be a host name without port or scheme", value)
    return value.lower()


def path_prefix(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise fail(path, "must be a string starting with '/'", value)
    return value


def target_url(value: Any, path: str) -> str:
    """An upstream target: scheme, host and port only; requests keep their own path."""
    required = (
        "must be an http:// or https:// URL with a host and no path, like http://10.0.0.5:9001"
    )
    if not isinstance(value, str):
        raise fail(path, required, value)
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise fail(path, required, value) from None
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise fail(path, required, value)
    if url.query or url.fragment or url.username or url.password:
        raise fail(path, required, value)
    return f"{url.scheme}://{url.netloc}"


def text_value(value: Any, path: str) -> str:
    """A header or parameter value: a string (may be empty), or a number written unquoted."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise fail(path, "must be a string", value)
    return value if isinstance(value, str) else str(value)


def positive_number(value: Any, path: str) -> float:
    if not _is_number(value) or value <= 0:
        raise fail(path, "must be a number > 0", value)
    return float(value)


def one_of_int(*choices: int) -> Check:
    def check(value: Any, path: str) -> int:
        if not is_int(value) or value not in choices:
            raise fail(path, "must be one of " + ", ".join(map(str, choices)), value)
        return int(value)

    return check


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2


def header_field_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise fail(path, "must be a header name (letters, digits, '-' and the like)", value)
    return value


def method(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or value != value.upper():
        raise fail(path, "must be an HTTP method in upper case, like GET", value)
    return value


def host_pattern(value: Any, path: str) -> str:
    """An exact host name, or "*." + a domain: any one or more labels before it."""
    name = host_name(value, path)
    rest = name[2:] if name.startswith("*.") else name
    if "*" in rest or not rest:
        raise fail(path, 'must be a host name, or "*." followed by a domain', value)
    return name


def regex(value: Any, path: str) -> str:
    """A pattern RE2 compiles: matching is linear in the input, whatever the pattern."""
    if not isinstance(value, str) or not value:
        raise fail(path, "must be a regular expression", value)
    try:
        re2.compile(value)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""  # google-re2 gives bytes: b"missing ): (a"
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise fail(path, f"must be a regular expression RE2 accepts ({reason})", value) from None
    return value


def regex_groups(pattern: str) -> int:
    """How many groups a pattern `regex` accepted has."""
    return int(re2.compile(pattern).groups)


# What a path the proxy writes itself (a rewrite, a redirect's Location) must not hold: the query
# and fragment delimiters, whitespace and control characters (RFC 3986 §3.3).
_NOT_IN_PATH = re.compile(r"[?#\s\x00-\x1f\x7f]")


def request_path(value: Any, path: str) -> str:
    """An absolute path without query: the request's own query is kept after it."""
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value.startswith(("//", "/\\"))  # another host, to a browser
        or _NOT_IN_PATH.search(value)
    ):
        raise fail(path, "must be a path starting with one '/', without '?', '#' or spaces", value)
    return value


_REDIRECT_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def redirect_host(value: Any, path: str) -> str:
    """A host for a Location: letters, digits, dots and hyphens (or an IPv6 literal in
    brackets); nothing that could move the authority ('@', '/', '?', '#', ':')."""
    if not isinstance(value, str) or not _REDIRECT_HOST.fullmatch(value):
        raise fail(path, "must be a host name or an IP address, without port", value)
    return value.lower()


def rate(value: Any, path: str) -> float:
    """Requests per second: from 0.001 (one in about 17 minutes) to a billion."""
    if not _is_number(value) or not 0.001 <= value <= 1e9:
        raise fail(path, "must be a number from 0.001 to 1e9", value)
    return float(value)


_REFERENCE = re.compile(r"\\([0-9]{1,2})|\\\\")


def replacement_pieces(template: str) -> tuple[str | int, ...]:
    """A rewrite replacement as literal text and group numbers: `\\1` to `\\99` are the
    pattern's groups (`\\0` the whole match), `\\\\` a backslash. ValueError for any other
    backslash, so that nothing is read as an escape sequence nobody meant."""
    pieces: list[str | int] = []
    start = 0
    for reference in _REFERENCE.finditer(template):
        literal = template[start : reference.start()]
        if "\\" in literal:
            raise ValueError("a backslash must start \\1 to \\99 or \\\\")
        pieces.append(literal)
        group = reference.group(1)
        pieces.append(int(group) if group is not None else "\\")
        start = reference.end()
    if "\\" in template[start:]:
        raise ValueError("a backslash must start \\1 to \\99 or \\\\")
    pieces.append(template[start:])
    return tuple(piece for piece in pieces if piece != "")


def replacement(value: Any, path: str) -> str:
    """A rewrite.regex replacement: a path, with \\1 ... for the pattern's groups."""
    if not isinstance(value, str) or _NOT_IN_PATH.search(value):
        raise fail(path, "must be a path without '?', '#' or spaces (\\1 for a group)", value)
    try:
        replacement_pieces(value)
    except ValueError as exc:
        raise fail(path, str(exc), value) from None
    return value


def rate_limit_key(value: Any, path: str) -> str:
    if value in ("client_ip", "route"):
        return str(value)
    if isinstance(value, str) and value.startswith("header:"):
        header_field_name(value[len("header:") :], path)
        return value
    raise fail(path, "must be client_ip, route or header:NAME", value)


# RFC 1035 §2.3.1 as relaxed by RFC 2181 §11 for SRV owners ("_http._tcp..."): labels of 1-63
# letters, digits, "-" and "_", at most 253 characters, an optional final dot.
_DNS_NAME = re.compile(r"(?=.{1,253}\.?$)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")  # fmt: skip


def dns_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value):
        raise fail(path, "must be a DNS name like api.default.svc.cluster.local", value)
    return value.lower()


def resolver(value: Any, path: str) -> tuple[tuple[str, int], ...]:
    """system (getaddrinfo), or a list of name servers as "ip:port" ("[v6]:port")."""
    if value == "system":
        return ()
    required = 'must be system or a list of name servers like ["10.96.0.10:53"]'
    if not isinstance(value, list) or not value:
        raise fail(path, required, value)
    servers = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        host, sep, number = str(item).rpartition(":") if isinstance(item, str) else ("", "", "")
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            server_port = int(number)
        except ValueError:
            raise fail(
                where, 'must be a name server as "ip:port", like "10.96.0.10:53"', item
            ) from None
        bracketed = host.startswith("[")
        if not sep or not 1 <= server_port <= 65535 or (address.version == 6) != bracketed:
            raise fail(where, 'must be a name server as "ip:port", like "10.96.0.10:53"', item)
        servers.append((str(address), server_port))
    return tuple(servers)


def hash_key(value: Any, path: str) -> str:
    """What balance: hash hashes: client_ip, path, header:NAME or cookie:NAME."""
    if value in ("client_ip", "path"):
        return str(value)
    if isinstance(value, str) and value.startswith(("header:", "cookie:")):
        kind, _, name = value.partition(":")
        if kind == "header":
            header_field_name(name, path)
        elif not _TOKEN.fullmatch(name):
            raise fail(path, "must name a cookie after cookie:", value)
        return value
    raise fail(path, "must be client_ip, path, header:NAME or cookie:NAME", value)


def request_id_header(value: Any, path: str) -> str:
    """A header name, or "" (off)."""
    return "" if value == "" else header_field_name(value, path)


def one_of(*choices: str) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in choices:
            raise fail(path, "must be one of " + ", ".join(choices), value)
        return str(value)

    return check


def optional_section(cls: type[T]) -> Check:
    """A section that is off when absent, and all defaults when present but empty."""

    def check(value: Any, path: str) -> T:
        return parse_section(cls, {} if value is None else value, path)

    return check


def list_of(item: Check, *, empty: bool = False) -> Check:
    def check(value: Any, path: str) -> tuple[Any, ...]:
        if value is None and empty:
            return ()
        if not isinstance(value, list) or not (value or empty):
            raise fail(path, "must be a list" if empty else "must be a non-empty list", value)
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return check


def optional(item: Check) -> Check:
    """`item`, or null (the key's default: off)."""

    def check(value: Any, path: str) -> Any:
        return None if value is None else item(value, path)

    return check


def ip_network(value: Any, path: str) -> IPNetwork:
    """An address or a CIDR block (10.0.0.0/8, 192.0.2.7, fd00::/8), without host bits set."""
    required = "must be an IP address or CIDR block like 10.0.0.0/8"
    if not isinstance(value, str):
        raise fail(path, required, value)
    try:
        network = ipaddress.ip_network(value.strip())
    except ValueError as exc:
        raise fail(path, f"{required} ({exc})", value) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        # ::ffff:a.b.c.d/N names IPv4 addresses, which peers are compared as (identity.py).
        mapped = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def tls_version(value: Any, path: str) -> str:
    """ "1.2" or "1.3" (also unquoted: YAML reads 1.2 as a number)."""
    text = {1.2: "1.2", 1.3: "1.3"}.get(value, value) if _is_number(value) else value
    if text not in ("1.2", "1.3"):
        raise fail(path, 'must be "1.2" or "1.3" (TLS 1.0 and 1.1 are never accepted)', value)
    return str(text)


def mapping_of(item: Check, *, empty: bool = False) -> Check:
    def check(value: Any, path: str) -> dict[str, Any]:
        if value is None and empty:
            return {}
        if not isinstance(value, dict) or not (value or empty):
            raise fail(path, "must be a non-empty mapping of names", value)
        parsed = {}
        for name, v in value.items():
            if not isinstance(name, str) or not name:
                raise fail(path, "names must be non-empty strings", name)
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
        raise fail(where, "must be a mapping", value)
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
