"""A route's policy for what it forwards: header rules both ways, the Host sent upstream, its
read and total timeouts and its attempts, precomputed once per route when a snapshot is built.

Knows nothing of requests or sockets; a route without any of these keys gets `PLAIN`, which
costs a request nothing beyond a few `is None` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy import config


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """routes[].headers.request or .response: remove, then set (replace), then add (append).
    Names are case-insensitive (RFC 9110 §5.1)."""

    remove: tuple[str, ...]
    set: tuple[tuple[str, str], ...]
    add: tuple[tuple[str, str], ...]

    def apply(self, headers: CIMultiDict[str]) -> None:
        for name in self.remove:
            headers.popall(name, None)
        for name, value in self.set:
            headers[name] = value
        for name, value in self.add:
            if name in headers:
                # aiohttp's client tracks names case-sensitively (headers.py, same_spelling):
                # a second spelling would replace the values already there. Keep the first.
                name = next(k for k in headers if k.lower() == name.lower())
            headers.add(name, value)


def header_edits(rules: config.HeaderRules) -> HeaderEdits | None:
    """None when there is nothing to do: the request pays nothing."""
    if not (rules.remove or rules.set or rules.add):
        return None
    return HeaderEdits(tuple(rules.remove), tuple(rules.set.items()), tuple(rules.add.items()))


def target_host(url: str) -> str:
    """routes[].host_header: target — the target's host and port as in its URL, the port left
    out when it is the scheme's default (as a browser sends it, and as aiohttp itself would)."""
    host = URL(url).host_port_subcomponent
    assert host is not None  # config.target_url: an absolute URL with a host
    return host


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None  # the proxy's own answers too
    host: str | None = None  # a literal Host (host_header: <value>)
    target_host: bool = False  # host_header: target (each target's `authority`)
    # timeouts.read: the ClientTimeout per upstream (its connect, the route's read).
    client_timeouts: Mapping[str, aiohttp.ClientTimeout] = field(default_factory=dict)
    total: float = 0.0  # timeouts.total, seconds; 0 = no bound
    attempts: int | None = None  # retries.attempts; None = the upstream's


PLAIN = RoutePolicy()


def route_policy(route: config.Route, upstreams: Mapping[str, config.Upstream]) -> RoutePolicy:
    """The route's policy; PLAIN for a route that sets none of these keys."""
    names = [name for name in route.upstreams if name in upstreams]
    host = route.host_header
    timeouts = route.timeouts or config.RouteTimeouts()
    client_timeouts = {}
    if timeouts.read is not None:
        # As upstream.py's session timeout, with the route's read (AIOHTTP-NOTES §0.8).
        client_timeouts = {
            n: aiohttp.ClientTimeout(
                total=None, connect=upstreams[n].timeouts.connect, sock_read=timeouts.read
            )
            for n in names
        }
    policy = RoutePolicy(
        request_headers=header_edits(route.headers.request),
        response_headers=header_edits(route.headers.response),
        host=None if host in ("pass", "target") else host,
        target_host=host == "target",
        client_timeouts=client_timeouts,
        total=timeouts.total,
        attempts=route.retries.attempts if route.retries is not None else None,
    )
    return PLAIN if policy == PLAIN else policy


def route_policies(cfg: config.Config) -> dict[str, RoutePolicy]:
    """Each route's policy by route name (unique), only for routes that have one."""
    policies = {route.name: route_policy(route, cfg.upstreams) for route in cfg.routes}
    return {name: policy for name, policy in policies.items() if policy is not PLAIN}
