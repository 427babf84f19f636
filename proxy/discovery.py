"""Upstream target discovery: the `dns` and `srv` targets of an upstream turned into addresses,
resolved once at start and again every discovery.refresh seconds in a background task.

Owns resolution (getaddrinfo, or dnspython against the configured name servers) and what a
failure does (the last good set stays). Knows nothing of aiohttp's pool or of routes: whoever
owns the upstream hears each new set through `on_change`. Never on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.resolver

from proxy import config
from proxy.config import DnsTarget, SrvTarget

log = logging.getLogger("proxy")

MAX_TIMEOUT = 5.0  # s a refresh waits for one name, at most (less when refresh is shorter)
WARN_EVERY = 60.0  # s between two warnings about a name that keeps failing


class DiscoveryError(Exception):
    """One resolution failed, as `<dns|srv>:<name>: <what went wrong>`."""


class _NoAddresses(DiscoveryError):
    """The name server says so: no such name, or no A/AAAA records (an answer, not a failure)."""


@dataclass(frozen=True, slots=True)
class Found:
    url: str  # "http://10.0.0.5:8080", "http://[fd00::1]:8080"
    weight: int
    discovered_from: str  # "dns:api.default.svc.cluster.local", "srv:_http._tcp.api.internal"
    server_name: str  # the name the address was found for, no final dot: TLS SNI and Host


def describe(spec: DnsTarget | SrvTarget) -> str:
    return f"dns:{spec.dns}" if isinstance(spec, DnsTarget) else f"srv:{spec.srv}"


async def resolve(
    spec: DnsTarget | SrvTarget,
    servers: tuple[tuple[str, int], ...],
    timeout: float,  # noqa: ASYNC109 - also dnspython's lifetime, so not asyncio.timeout alone
) -> list[Found]:
    """Every target `spec` names now, sorted, without duplicates, never empty; servers == ()
    is the system resolver. DiscoveryError names the spec and what went wrong."""
    where = describe(spec)
    asked = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in servers)
    try:
        async with asyncio.timeout(timeout):
            if isinstance(spec, SrvTarget):
                found = await _srv(_resolver(servers, timeout), spec)
            else:
                name = dns.name.from_text(spec.dns)
                addresses = await (
                    _addresses(_resolver(servers, timeout), name)
                    if servers
                    else _getaddrinfo(spec.dns, spec.port)
                )
                found = [_found(spec, a, spec.port, spec.weight, spec.dns) for a in addresses]
    except TimeoutError:
        raise DiscoveryError(
            f"{where}: no answer from {asked or 'the system resolver'} within {timeout:g} s"
        ) from None
    except DiscoveryError as exc:
        raise DiscoveryError(f"{where}: {exc}") from None
    return list(_sorted(found))


def _sorted(found: Iterable[Found]) -> tuple[Found, ...]:
    """Without duplicates, in an order that makes two equal sets compare equal."""
    return tuple(
        sorted(set(found), key=lambda f: (f.url, f.server_name, f.weight, f.discovered_from))
    )


def _found(spec: DnsTarget | SrvTarget, address: str, port: int, weight: int, name: str) -> Found:
    host = f"[{address}]" if ":" in address else address
    url = f"{spec.scheme}://{host}:{port}"
    return Found(url, weight, describe(spec), name.removesuffix("."))


def _resolver(servers: tuple[tuple[str, int], ...], timeout: float) -> dns.asyncresolver.Resolver:
    if not servers:  # config.py refuses this; a second line of defence
        raise DiscoveryError("needs discovery.resolver name servers (getaddrinfo has no SRV)")
    resolver = dns.asyncresolver.Resolver(configure=False)  # no resolv.conf, no cache
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, p) for host, p in servers]
    resolver.lifetime = timeout  # dnspython asks again over TCP when a reply has TC set
    return resolver


async def _getaddrinfo(name: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DiscoveryError(f"getaddrinfo failed: {exc.strerror}") from None
    addresses = [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise DiscoveryError("getaddrinfo gave no addresses")
    return addresses


async def _srv(resolver: dns.asyncresolver.Resolver, spec: SrvTarget) -> list[Found]:
    answer = await _lookup(resolver, dns.name.from_text(spec.srv), "SRV")
    if answer is None:
        raise DiscoveryError("no such name (NXDOMAIN)")
    # A target of "." means "decidedly not available here" (RFC 2782).
    records = [r for r in answer.rrset or () if isinstance(r, dns.rdtypes.IN.SRV.SRV)]
    records = [r for r in records if r.target != dns.name.root]
    if not records:
        raise DiscoveryError("no SRV records")
    # RFC 2782: clients MUST try the lowest priority first; higher ones are backups. We do not
    # fail over per request: the backups become targets once the primaries' records are gone.
    lowest = min(r.priority for r in records)
    records = [r for r in records if r.priority == lowest]
    # Servers are urged (RFC 2782) to put the targets' addresses in the additional section;
    # a target found there is not asked for again.
    given: dict[dns.name.Name, list[str]] = {}
    for rrset in answer.response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            given.setdefault(rrset.name, []).extend(r.to_text() for r in rrset)
    hosts = list(dict.fromkeys(r.target for r in records if r.target not in given))
    looked_up = await asyncio.gather(
        *(_addresses(resolver, host) for host in hosts), return_exceptions=True
    )
    for host, result in zip(hosts, looked_up, strict=True):
        if isinstance(result, _NoAddresses):
            result = []  # a stale record: the others still serve
        elif isinstance(result, DiscoveryError):
            raise DiscoveryError(f"target {host}: {result}")
        elif isinstance(result, BaseException):
            raise result
        given[host] = result
    # RFC 2782 weight 0 is "a very small chance" next to weighted records; balancing has no
    # such notion, so 0 counts as 1 (weight 0 alone means "no preference", the same thing).
    found = [
        _found(spec, a, r.port, max(r.weight, 1), r.target.to_text())
        for r in records
        for a in given[r.target]
    ]
    if not found:
        raise DiscoveryError("no target of the SRV records has an A or AAAA record")
    return found


async def _addresses(resolver: dns.asyncresolver.Resolver, host: dns.name.Name) -> list[str]:
    """The A and AAAA addresses of `host`; either type may be absent, but not both."""
    answers = await asyncio.gather(
        _lookup(resolver, host, "A"), _lookup(resolver, host, "AAAA"), return_exceptions=True
    )
    addresses = []
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        addresses += [r.to_text() for r in answer.rrset or ()] if answer is not None else []
    if not addresses:
        nxdomain = all(answer is None for answer in answers)
        raise _NoAddresses("no such name (NXDOMAIN)" if nxdomain else "no A or AAAA records")
    return addresses


async def _lookup(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, kind: str
) -> dns.resolver.Answer | None:
    """The answer (its rrset None when the name has no records of `kind`); None for NXDOMAIN."""
    try:
        return await resolver.resolve(name, kind, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.Timeout:
        raise TimeoutError from None  # resolve() says which servers and how long
    except dns.resolver.NoNameservers as exc:
        errors = exc.kwargs.get("errors", [])
        answered = "; ".join(f"{e[0]} answered {e[3]}" for e in errors) or "no name server left"
        raise DiscoveryError(f"{kind} query failed: {answered}") from None
    except dns.exception.DNSException as exc:
        raise DiscoveryError(f"{kind} query failed: {exc}") from None


class Discovery:
    """The discovered targets of one upstream: resolved by first(), then every settings.refresh
    seconds by start()'s task; `on_change` hears the union over specs each time it changes."""

    def __init__(
        self,
        upstream: str,
        specs: Sequence[DnsTarget | SrvTarget],
        settings: config.Discovery,
        on_change: Callable[[tuple[Found, ...]], None],
    ) -> None:
        self.upstream = upstream
        self.specs = tuple(specs)
        self.settings = settings
        self.on_change = on_change
        self.refreshes = {"ok": 0, "failed": 0}  # one per resolution of one spec
        self.last_error: str | None = None  # None while every spec resolves
        self.found: tuple[Found, ...] | None = None  # what on_change heard last
        self._good: dict[int, list[Found]] = {}  # spec index -> its last good set
        self._failing: dict[int, float] = {}  # spec index -> when its failure was last logged
        self._task: asyncio.Task[None] | None = None

    def seed(self, previous: Discovery) -> None:
        """A reload rebuilt the upstream: start from what the one it replaces found, name by
        name, so a DNS outage during the reload keeps the targets (first() then finds nothing
        new); and keep counting refreshes in the same totals."""
        self.refreshes = previous.refreshes
        for index, spec in enumerate(self.specs):
            for old, good in ((previous.specs[i], g) for i, g in previous._good.items()):
                if isinstance(spec, DnsTarget) and isinstance(old, DnsTarget):
                    if dataclasses.replace(old, weight=spec.weight) == spec:  # weight: the new
                        self._good[index] = [
                            dataclasses.replace(f, weight=spec.weight) for f in good
                        ]
                elif old == spec:
                    self._good[index] = list(good)

    async def first(self, timeout: float) -> None:  # noqa: ASYNC109 - each resolution's bound
        """Resolve every spec once and tell on_change, even when nothing was found."""
        await self._refresh(timeout)
        self._publish(_sorted(f for good in self._good.values() for f in good))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery {self.upstream}")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh)
            await self._refresh(min(self.settings.refresh, MAX_TIMEOUT))
            found = _sorted(f for good in self._good.values() for f in good)
            if found != self.found:
                self._publish(found)

    async def _refresh(self, within: float) -> None:
        await asyncio.gather(*(self._resolve(i, within) for i in range(len(self.specs))))
        if not self._failing:
            self.last_error = None

    async def _resolve(self, index: int, within: float) -> None:
        spec = self.specs[index]
        try:
            found = await resolve(spec, self.settings.resolver, within)
        except Exception as exc:  # a bug in here must not stop the other names or next round
            error = str(exc) if isinstance(exc, DiscoveryError) else f"{describe(spec)}: {exc!r}"
            self._failed(index, error)
            return
        self.refreshes["ok"] += 1
        if self._failing.pop(index, None) is not None:
            again = "upstream %s: %s resolves again (%d targets)"
            log.info(again, self.upstream, describe(spec), len(found))
        self._good[index] = found

    def _failed(self, index: int, error: str) -> None:
        self.refreshes["failed"] += 1
        self.last_error = error
        now, logged = time.monotonic(), self._failing.get(index)
        if logged is None or now - logged >= WARN_EVERY:
            kept = len(self._good.get(index, ()))
            log.warning("upstream %s: %s; keeping its last %d targets", self.upstream, error, kept)
            self._failing[index] = now

    def _publish(self, found: tuple[Found, ...]) -> None:
        self.found = found
        try:
            self.on_change(found)
        except Exception:  # the owner's bug: logged, and the refresh goes on
            log.exception("upstream %s: on_change of discovery failed", self.upstream)
