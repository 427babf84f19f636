"""The routing table: which route a request belongs to, and the path it is forwarded with.

Owns matching on the Host header and the raw request path; knows nothing of aiohttp or YAML.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config import Route


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
    """(authority, origin-form) for an absolute-form target, None for anything else."""
    scheme, sep, rest = raw_target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    slash = rest.find("/")
    query = rest.find("?")
    cut = min(i for i in (slash, query, len(rest)) if i != -1)
    path = rest[cut:]
    return rest[:cut] or None, path if path.startswith("/") else "/" + path


def forwarded_path(route: Route, raw_path: str) -> str:
    """The request-target sent upstream: unchanged, or without the prefix but with a leading '/'."""
    if not route.strip_prefix:
        return raw_path
    rest = raw_path[len(route.match.path_prefix) :]
    return rest if rest.startswith("/") else "/" + rest


class RoutingTable:
    """Routes in file order; the first whose host and literal path prefix match wins."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple((r.match.host, r.match.path_prefix, r) for r in routes)

    def match(self, host: str | None, raw_path: str) -> Route | None:
        """`host` is already `host_key()`-normalised; `raw_path` is the raw origin-form target."""
        for route_host, prefix, route in self._routes:
            if raw_path.startswith(prefix) and (route_host is None or route_host == host):
                return route
        return None

    def __len__(self) -> int:
        return len(self._routes)
