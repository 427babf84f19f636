"""The routing table: which route a request belongs to, and the path it is forwarded with.

Owns matching on the Host header and the raw request path; knows nothing of aiohttp or YAML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.config import Route

# RFC 9110 §7.2 / RFC 3986 §3.2.2: uri-host [":" port], where uri-host is an IP literal in
# brackets or a reg-name (unreserved, pct-encoded, sub-delims), and the port is digits.
_VALID_HOST = re.compile(r"(?:\[[0-9A-Za-z:.%~_-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")
_ENCODED_DOT = re.compile(r"%2[eE]")
# What some backends also take for a "/": a backslash (IIS, Windows), and an encoded slash or
# backslash (backends that decode before they normalise).
_OTHER_SLASH = re.compile(r"\\|%2[fF]|%5[cC]")


def valid_host(host: str) -> bool:
    """Whether a Host header (or an absolute-form authority) is a host with an optional
    numeric port: no spaces, slashes, userinfo or empty host (RFC 9112 §3.2: else 400)."""
    return _VALID_HOST.fullmatch(host) is not None


def _is_dot_segment(part: str) -> bool:
    # "..;x" is ".." to Tomcat and Jetty, which drop path parameters first.
    return part in (".", "..") or part.startswith((".;", "..;"))


def normalized_path(target: str) -> str | None:
    """The path routes are matched on: the target's path with dot-segments removed (RFC 3986
    §5.2.4), "%2e" counting as "."; None when it climbs above "/", or when backends would
    disagree on its dot-segments (see below).

    A backend that normalises would serve /internal/secret for /public/../internal/secret or
    /public/%2e%2e/internal/secret: the route table must see what the backend will see. Where
    backends differ, no single answer is right, so dot-segments next to an empty segment
    ("//..": nginx merges slashes, RFC 3986 does not), with a parameter ("..;/": Tomcat), or
    among other slashes ("\\", "%2f", "%5c") make the path None too.
    """
    path = target.partition("?")[0]
    if "/." not in path and "%" not in path and "\\" not in path:
        return path  # no dot-segment can be in it: the common case, at no cost
    decoded = _ENCODED_DOT.sub(".", path) if "%" in path else path
    other = _OTHER_SLASH.sub("/", decoded)
    if "/." not in other:
        return path
    ambiguous = other != decoded or "//" in decoded or ";" in decoded
    if ambiguous and any(_is_dot_segment(part) for part in other.split("/")):
        return None
    parts = decoded.split("/")[1:]
    segments: list[str] = []
    for part in parts:
        if part == "..":
            if not segments:
                return None
            segments.pop()
        elif part != ".":
            segments.append(part)
    if parts[-1] in (".", ".."):
        segments.append("")  # "/a/b/.." is the directory "/a/"
    return "/" + "/".join(segments)


def host_key(host_header: str | None) -> str | None:
    """The Host header as routes compare it: lower case, without the port (RFC 9110 §7.2)."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):  # IPv6 literal, "[::1]:8080"
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(":")
    return host[:colon] if colon != -1 else host


def origin_form(raw_target: str) -> tuple[str | None, str] | None:
    """(authority, origin-form) for an absolute-form target, None for anything else. The
    authority is as sent: the caller checks it with `valid_host`."""
    scheme, sep, rest = raw_target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    slash = rest.find("/")
    query = rest.find("?")
    cut = min(i for i in (slash, query, len(rest)) if i != -1)
    path = rest[cut:]
    return rest[:cut] or None, path if path.startswith("/") else "/" + path


def forwarded_path(route: Route, raw_target: str, path: str) -> str:
    """The request-target sent upstream: unchanged, or, with strip_prefix, the matched `path`
    (normalised) without the prefix but with a leading '/', and the raw query after it."""
    if not route.strip_prefix:
        return raw_target
    rest = path[len(route.match.path_prefix) :]
    _, question, query = raw_target.partition("?")
    return (rest if rest.startswith("/") else "/" + rest) + question + query


class RoutingTable:
    """Routes in file order; the first whose host and literal path prefix match wins."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple((r.match.host, r.match.path_prefix, r) for r in routes)

    def match(self, host: str | None, path: str) -> Route | None:
        """`host` is already `host_key()`-normalised; `path` is `normalized_path()`'s."""
        for route_host, prefix, route in self._routes:
            if path.startswith(prefix) and (route_host is None or route_host == host):
                return route
        return None

    def __len__(self) -> int:
        return len(self._routes)
