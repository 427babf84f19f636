"""The routing table: which route a request belongs to, which upstream of a split it goes to,
and the path it is forwarded with.

Owns matching on the Host header, the path, the method, headers and the query; knows nothing of
aiohttp or YAML.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Callable, Iterable

import re2  # type: ignore[import-untyped]
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from proxy.checks import replacement_pieces
from proxy.config import Match, Present, Route

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


# One condition of a route beyond its literal prefix and exact host: called with the request's
# host_key(), normalised path, method, headers and raw origin-form target.
Condition = Callable[[str | None, str, str, MultiMapping[str], str], bool]


def _conditions(match: Match) -> tuple[Condition, ...]:
    """The checks a route needs besides `path.startswith(prefix)` and an exact host, cheapest
    first; none for a route that has only those (the common case costs what it did)."""
    checks: list[Condition] = []
    if match.methods is not None:
        methods = frozenset(match.methods)
        checks.append(lambda host, path, method, headers, target: method in methods)
    if match.host is not None and match.host.startswith("*."):
        suffix = match.host[1:]  # ".example.com": one or more labels must come before it
        checks.append(lambda host, path, method, headers, target: _below(host, suffix))
    if match.path_exact is not None:
        exact = match.path_exact
        checks.append(lambda host, path, method, headers, target: path == exact)
    for name, condition in match.headers.items():
        checks.append(_header_condition(name, condition))
    if match.query:
        wanted = tuple(match.query.items())
        checks.append(lambda host, path, method, headers, target: _has_query(target, wanted))
    if match.path_regex is not None:  # last: the dearest, though linear (RE2)
        # On bytes: google-re2 maps str offsets back through a generator on every call (6 µs
        # per match here), bytes go straight to RE2 (2.5 µs).
        fullmatch = re2.compile(match.path_regex.encode()).fullmatch
        checks.append(
            lambda host, path, method, headers, target: (
                fullmatch(path.encode("utf-8", "surrogateescape")) is not None
            )
        )
    return tuple(checks)


def _below(host: str | None, suffix: str) -> bool:
    """Whether `host` is a name under `suffix` (".example.com"), not the domain itself."""
    return (
        host is not None
        and len(host) > len(suffix)
        and host.endswith(suffix)
        and host[-len(suffix) - 1] != "."
    )


def _header_condition(name: str, condition: str | Present) -> Condition:
    if isinstance(condition, Present):
        present = condition.present
        return lambda host, path, method, headers, target: (name in headers) is present
    # Any of its field lines, as aiohttp parsed it (surrounding whitespace removed).
    return lambda host, path, method, headers, target: condition in headers.getall(name, ())


def _has_query(target: str, wanted: tuple[tuple[str, str], ...]) -> bool:
    """Whether each wanted parameter is in the raw query with that raw value: no decoding of
    %XX or "+", and any occurrence of a repeated parameter counts; "?flag" has the value ""."""
    query = target.partition("?")[2]
    if not query:
        return False
    pairs = {(name, value) for name, _, value in (p.partition("=") for p in query.split("&"))}
    return all(pair in pairs for pair in wanted)


class _Split:
    """A weighted choice between upstreams: integer weights, cumulative, for a bisect."""

    __slots__ = ("bounds", "names", "total")

    def __init__(self, route: Route) -> None:
        assert route.split is not None
        self.names = tuple(s.upstream for s in route.split)
        self.bounds = tuple(itertools.accumulate(s.weight for s in route.split))
        self.total = self.bounds[-1]


class _RegexRewrite:
    """rewrite.regex, compiled once: the first match in the path is replaced."""

    __slots__ = ("pieces", "search")

    def __init__(self, pattern: str, replacement: str) -> None:
        self.search = re2.compile(pattern).search
        self.pieces = replacement_pieces(replacement)

    def __call__(self, path: str) -> str:
        found = self.search(path)
        if found is None:
            return path
        text = "".join(p if isinstance(p, str) else (found[p] or "") for p in self.pieces)
        return path[: found.start()] + text + path[found.end() :]


class RoutingTable:
    """Routes in file order; the first whose conditions all hold wins."""

    __slots__ = ("_plain", "_random", "_rewrites", "_routes", "_splits")

    def __init__(self, routes: Iterable[Route], rng: random.Random | None = None) -> None:
        # Per route: (exact host or None, a literal prefix every match starts with, the other
        # conditions, the route). path_exact's prefix is itself; path_regex's is "".
        entries = []
        self._splits: dict[int, _Split] = {}  # by id(route): a Route holds dicts, unhashable
        self._rewrites: dict[int, _RegexRewrite] = {}
        for route in routes:
            match = route.match
            host = match.host if match.host is None or not match.host.startswith("*.") else None
            prefix = match.path_prefix or match.path_exact or ""
            entries.append((host, prefix, _conditions(match), route))
            if route.split is not None:
                self._splits[id(route)] = _Split(route)
            if route.rewrite is not None and route.rewrite.regex is not None:
                regex = route.rewrite.regex
                self._rewrites[id(route)] = _RegexRewrite(regex.pattern, regex.replacement)
        self._routes = tuple(entries)
        # Only literal prefixes and exact hosts: the loop of before the other conditions.
        self._plain = tuple((host, prefix, route) for host, prefix, _, route in entries)
        if any(conditions for _, _, conditions, _ in entries):
            self._plain = ()
        # The split's choices: a generator of its own, seedable for tests (never the module's).
        self._random = rng if rng is not None else random.Random()

    def match(
        self,
        host: str | None,
        path: str,
        method: str = "GET",
        headers: MultiMapping[str] | None = None,
        target: str = "",
    ) -> Route | None:
        """`host` is already `host_key()`-normalised; `path` is `normalized_path()`'s;
        `target` the raw origin-form target (its query is what `match.query` reads)."""
        if self._plain:
            for route_host, prefix, route in self._plain:
                if path.startswith(prefix) and (route_host is None or route_host == host):
                    return route
            return None
        for route_host, prefix, conditions, route in self._routes:
            if (
                path.startswith(prefix)
                and (route_host is None or route_host == host)
                and (not conditions or _hold(conditions, host, path, method, headers, target))
            ):
                return route
        return None

    def upstream_for(self, route: Route) -> str:
        """The upstream this request goes to: the route's, or a weighted pick of its split;
        "" for a redirect."""
        if route.upstream is not None:
            return route.upstream
        split = self._splits.get(id(route))
        if split is None:
            return ""
        return split.names[bisect.bisect_right(split.bounds, self._random.randrange(split.total))]

    def forwarded_path(self, route: Route, raw_target: str, path: str) -> str:
        """The request-target sent upstream: unchanged, or, with strip_prefix or rewrite, the
        matched `path` (normalised) with the prefix stripped or replaced, or rewrite.regex
        applied, a leading '/' ensured, and the raw query after it."""
        rewrite = route.rewrite
        if rewrite is None and not route.strip_prefix:
            return raw_target
        prefix = route.match.path_prefix
        if rewrite is None or rewrite.prefix is not None:
            assert prefix is not None  # config.py: strip_prefix and rewrite.prefix need it
            new = rewrite.prefix if rewrite is not None and rewrite.prefix is not None else ""
            rest = new + path[len(prefix) :]
        else:
            rest = self._rewrites[id(route)](path)
        _, question, query = raw_target.partition("?")
        # One leading "/", never "//": a backend may read "//host/x" as scheme-relative (and a
        # redirect's relative Location would point at another host).
        return "/" + rest.lstrip("/") + question + query

    def __len__(self) -> int:
        return len(self._routes)


_NO_HEADERS: MultiMapping[str] = CIMultiDictProxy(CIMultiDict())  # read-only


def _hold(
    conditions: tuple[Condition, ...],
    host: str | None,
    path: str,
    method: str,
    headers: MultiMapping[str] | None,
    target: str,
) -> bool:
    lines = _NO_HEADERS if headers is None else headers
    for condition in conditions:  # noqa: SIM110 - a plain loop: all() needs a generator
        if not condition(host, path, method, lines, target):
            return False
    return True
