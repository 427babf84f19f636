"""The hot path: route a client request, stream it to a target, stream the answer back.

Reads top to bottom as the data flows. What is accepted from a client is intake.py's, what the
client gets respond.py's, upgrades tunnel.py's; upstream failures are classified by failures.py
and retries decided by retry.py. Knows nothing of YAML or Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy import headers as hdrs
from proxy import intake, ratelimit, respond, tracing, tunnel, wire
from proxy.balancing import NoTarget, TargetState, hash_key
from proxy.checks import IPNetwork
from proxy.deadlines import peer_of
from proxy.exchange import Exchange
from proxy.failures import (
    CLIENT_ABORT,
    TOTAL_TIMEOUT,
    UNFORWARDABLE,
    UPSTREAM_ERRORS,
    Failure,
    classify,
    phase,
)
from proxy.identity import ClientIdentity
from proxy.listener import ForwardedResponse, plain_response
from proxy.policy import PLAIN, RoutePolicy
from proxy.pool import ACQUISITION, Acquisition, PoolFull, take_upgraded
from proxy.redirect import answer as redirect_answer
from proxy.retry import retry_reason, within_budget
from proxy.routing import host_key
from proxy.snapshot import Snapshot
from proxy.tls import client_subject
from proxy.upstream import Upstream
from proxy.wire import UpstreamResponse

log = logging.getLogger("proxy")


Observer = Callable[[Exchange], None]


@dataclass(frozen=True, slots=True)
class Attempted:
    """An attempt that failed before any response header: what _forward decides a retry on."""

    failure: Failure
    phase: str  # "connect", "before_response", or "" when it must not be retried
    reused: bool | None  # whether the connection had served a request before
    exc: BaseException
    url: URL


@dataclass(slots=True)
class Forwarding:
    """A request on its way to an upstream, routed and accepted: what every attempt at it reads.
    Its headers are sent again by a retry (only `host_header: target` changes their Host)."""

    request: web.BaseRequest
    exchange: Exchange
    upstream: Upstream
    headers: CIMultiDict[str]
    path: str  # the target's path and query, as forwarded (routes' strip_prefix applied)
    body: aiohttp.StreamReader | AsyncIterator[bytes] | None
    policy: RoutePolicy
    deadline: asyncio.Timeout | None = None  # routes[].timeouts.total's, once _forward starts it


class Forwarder:
    """The data-plane request handler."""

    def __init__(
        self,
        current: Callable[[], Snapshot],
        scheme: str,
        observe: Observer,
        *,
        max_body: int = 0,
        allow_underscores: bool = False,
        trusted_proxies: Iterable[IPNetwork] = (),
    ) -> None:
        self._current = current  # returns the snapshot in force now
        self._scheme = scheme
        self._observe = observe
        self._max_body = max_body  # listen.limits.max_body; a route's own overrides it
        self._underscores = allow_underscores
        self._identity = ClientIdentity(trusted_proxies)
        log.addFilter(tracing.LOG_FILTER)  # log lines about a request end with its ID

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = peer_of(request)
        # exchange.client is who the client is from here on (logs, rate limits).
        client, trusted = self._identity.identify(peer, request.headers)
        exchange = Exchange(time.time(), time.perf_counter(), client, request.method,
                            request.raw_path)  # fmt: skip
        exchange.client_cert = client_subject(request.transport)
        snapshot = self._current()  # the one this request is handled with, whatever reloads
        exchange.identity = tracing.identify(
            request.headers, snapshot.request_id.header, snapshot.request_id.trust_incoming,
            snapshot.trace_context,
        )  # fmt: skip
        tracing.CURRENT.set(exchange.identity)  # every response and log line of this request
        try:
            return await self._handle(request, exchange, snapshot, peer, trusted)
        except asyncio.CancelledError:  # the client went away (handler_cancellation=True)
            exchange.status = 499
            if exchange.upstream and exchange.error is None:
                exchange.error = "client_abort"
            raise
        except Exception:  # a bug: answer and count it as what it is, a 500
            log.exception("%s %s: internal error", request.method, request.raw_path)
            exchange.status = 500
            if request.writer.output_size > 0 and request.transport is not None:
                request.transport.abort()  # a response had started: it must look broken
            response = plain_response(500, "internal error")
            response.force_close()
            return response
        finally:
            if not exchange.relaying:  # else the tunnel observes it when it closes
                exchange.duration = time.perf_counter() - exchange.started
                self._observe(exchange)

    async def _handle(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        snapshot: Snapshot,
        peer: str | None,
        trusted: bool,
    ) -> web.StreamResponse:
        try:
            to = intake.addressed(request)
            route = snapshot.routes.match(
                host_key(to.host), to.path, request.method, request.headers, to.target
            )
            if route is None:
                raise intake.Refusal(404, "no route matches this request")
            exchange.route = route.name
            exchange.upstream = snapshot.routes.upstream_for(route)  # a split's: per request
            policy = snapshot.policies.get(route.name, PLAIN)
            exchange.response_rules = policy.response_headers
            if wait := snapshot.limits.retry_after(route, exchange.client, request.headers):
                return ratelimit.too_many(exchange, wait)
            if route.redirect is not None:  # the route answers itself (its rate_limit holds)
                target = snapshot.routes.forwarded_path(route, to.target, to.path)
                return redirect_answer(exchange, route.redirect, self._scheme, to.host, target)
            max_body = self._max_body if route.max_body is None else route.max_body
            body = intake.body(request, max_body)
            out_headers = hdrs.to_upstream(
                request.headers, peer=peer, scheme=self._scheme, host=to.host, trusted=trusted,
                underscores=self._underscores,
            )  # fmt: skip
            tracing.to_upstream(out_headers, exchange.identity)
        except intake.Refusal as refusal:
            return respond.refuse(exchange, refusal)
        except ValueError:  # hdrs.to_upstream
            return respond.answer(exchange, 400, "header values must be UTF-8 text")
        upstream = snapshot.upstreams[exchange.upstream]
        if to.absolute and to.host is not None:
            out_headers["Host"] = to.host
        if policy.host is not None:  # host_header: <literal> (target: per attempt, _attempt)
            out_headers["Host"] = policy.host
        if policy.request_headers is not None:  # after the proxy's own, X-Forwarded-* included
            policy.request_headers.apply(out_headers)
        path = snapshot.routes.forwarded_path(route, to.target, to.path)
        upgrade = tunnel.upgrade_asked(request)
        if upgrade is not None:
            if not route.upgrade:
                return respond.answer(exchange, 400, "this route does not upgrade connections")
            limit = upstream.settings.tunnels.limit
            if limit and upstream.tunnels_open >= limit:
                exchange.tunnel = "rejected"
                return respond.answer(exchange, 503, "too many tunnels to this upstream", busy=True)
            tunnel.with_upgrade(out_headers, upgrade)  # which is how _attempt knows
            upstream.tunnels_open += 1
        upstream.in_flight += 1
        upstream.requests += 1
        forwarding = Forwarding(request, exchange, upstream, out_headers, path, body, policy)
        try:
            return await self._forward(forwarding)
        finally:
            if not exchange.relaying:  # else it is in flight until its tunnel closes
                upstream.finished(upgrade is not None)

    async def _forward(self, forwarding: Forwarding) -> web.StreamResponse:
        request, policy = forwarding.request, forwarding.policy
        if forwarding.body is not None and _expects_continue(request):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not policy.total:
            return await self._try_targets(forwarding)
        # routes[].timeouts.total: one loop timer for the whole exchange. When it fires it
        # cancels the attempt in flight, which answers for it (_attempt: 504, or a cut).
        async with asyncio.timeout(policy.total) as deadline:
            forwarding.deadline = deadline
            return await self._try_targets(forwarding)

    async def _try_targets(self, forwarding: Forwarding) -> web.StreamResponse:
        request, exchange, upstream = forwarding.request, forwarding.exchange, forwarding.upstream
        path, body, policy = forwarding.path, forwarding.body, forwarding.policy
        attempts = policy.attempts or upstream.settings.retries.attempts  # the route's first
        tried: list[TargetState] = []
        fresh_only = False
        key = None
        if upstream.hash_on is not None:  # balance: hash
            key = hash_key(
                upstream.hash_on, exchange.client, path.partition("?")[0], request.headers
            )
        while True:
            try:
                target = upstream.pick(tried, key)
            except NoTarget:  # discovery has found none (yet): nothing to try, nothing failed
                return respond.answer(
                    exchange, 503, "no target discovered for this upstream yet", busy=True
                )
            tried.append(target)
            retry = len(tried) > 1
            upstream.retries_in_flight += retry
            try:
                outcome = await self._attempt(forwarding, target, fresh_only)
            finally:
                upstream.retries_in_flight -= retry
            if isinstance(outcome, web.StreamResponse):
                return outcome
            failure = outcome.failure
            reason = retry_reason(outcome.phase, request.method, body is not None, outcome.reused)
            if (
                reason is None
                or len(tried) >= attempts
                or not within_budget(
                    reason,
                    upstream.retries_in_flight,
                    upstream.in_flight,
                    upstream.settings.retries.budget,
                )
            ):
                respond.log_failure(request, outcome.url, upstream, failure, outcome.exc, "")
                exchange.error = failure.kind
                return respond.answer(exchange, failure.status, failure.detail)
            upstream.retries[reason] = upstream.retries.get(reason, 0) + 1
            upstream.stale += reason == "stale"
            fresh_only = reason == "stale"
            log.info("%s %s -> upstream %s: %s (%r); retrying (%s)", request.method, outcome.url,
                     upstream.name, failure.detail, outcome.exc, reason)  # fmt: skip

    async def _attempt(
        self, forwarding: Forwarding, target: TargetState, fresh_only: bool
    ) -> web.StreamResponse | Attempted:
        """One try on one target: the response, or a failure from before any response header
        (which _try_targets may retry). `fresh_only`: on a newly opened connection."""
        request, exchange, upstream = forwarding.request, forwarding.exchange, forwarding.upstream
        out_headers, path, body = forwarding.headers, forwarding.path, forwarding.body
        policy, deadline = forwarding.policy, forwarding.deadline
        exchange.upstream_target = target.url
        if policy.target_host:  # host_header: target, this attempt's
            out_headers["Host"] = target.authority
        # `encoded=True`: the target goes out byte for byte, never re-quoted or normalised.
        url = URL(target.url + path, encoded=True)
        # Only an upgrade _handle forwards carries Upgrade here (headers.py drops the client's).
        # It goes on a connection of its own, never pooled and outside pool.limit.
        upgrading = "Upgrade" in out_headers
        session = upstream.tunnel_session if upgrading else upstream.session
        acquisition = Acquisition(fresh_only)
        ACQUISITION.set(acquisition)
        target.in_flight += 1
        sent = time.perf_counter()
        response: ForwardedResponse | None = None
        # routes[].timeouts.read, or the session's own (a request's replaces it whole).
        timeout = policy.client_timeouts.get(upstream.name) or session.timeout
        sending: AbstractAsyncContextManager[UpstreamResponse]
        if body is None and not upgrading and request.method in wire.METHODS:
            # The common case below ClientSession._request: the same pool and bytes (wire.py).
            sending = wire.Request(upstream.connector, target, request.method, url,
                                    out_headers, timeout)  # fmt: skip
        else:
            sending = session.request(
                request.method, url, headers=out_headers, data=body, allow_redirects=False,
                server_hostname=target.server_hostname, timeout=timeout,
            )  # fmt: skip
        try:
            async with sending as upstream_response:
                exchange.upstream_seconds = time.perf_counter() - sent
                exchange.reused = acquisition.reused
                try:
                    response = respond.forwardable(upstream_response, upgrading)
                    if policy.response_headers is not None:
                        policy.response_headers.apply(response.headers)
                    upstream.answered(target, acquisition, upstream_response)
                    exchange.status = response.status
                    await response.prepare(request)
                except ConnectionError:  # the client went away while we waited
                    assert response is not None
                    return respond.failed_after_headers(exchange, CLIENT_ABORT, response)
                except ValueError as exc:  # a response no client should get
                    # ...and a connection no request should reuse: aiohttp may have pooled it
                    # already (a body-less response is complete with its head).
                    upstream_response.close()
                    if acquisition.protocol is not None:
                        acquisition.protocol.close()
                    upstream.failed(target, UNFORWARDABLE.kind)
                    respond.log_failure(request, url, upstream, UNFORWARDABLE, exc, "")
                    exchange.error = UNFORWARDABLE.kind
                    return respond.answer(exchange, UNFORWARDABLE.status, UNFORWARDABLE.detail)
                if upgrading:
                    exchange.tunnel = "upgraded" if response.status == 101 else "refused"
                    if response.status == 101:
                        assert isinstance(upstream_response, aiohttp.ClientResponse)
                        opened = await tunnel.open_tunnel(
                            request, response, upstream_response, take_upgraded, exchange,
                            upstream, upstream.settings.tunnels.idle_timeout, self._observe,
                        )  # fmt: skip
                        if opened is not None:  # in flight, on its target too, until it closes
                            exchange.relaying = True
                            upstream.tunnel_opened(opened, target)
                        return response
                broken = await respond.copy_body(
                    request, upstream_response.content, response, exchange
                )
                if broken is not None:
                    return respond.broken_after_headers(
                        request, url, upstream, target, response, exchange, *broken
                    )
                await response.write_eof()
                return response
        except asyncio.CancelledError:
            if deadline is None or not deadline.expired():
                raise  # the client went away
            # timeouts.total ran out; asyncio.timeout() in _forward uncancels the task.
            failure = TOTAL_TIMEOUT
            if response is not None:  # the headers are the client's: it must see a cut
                return respond.broken_after_headers(
                    request, url, upstream, target, response, exchange, failure, TimeoutError()
                )
            upstream.failed(target, failure.kind)
            respond.log_failure(request, url, upstream, failure, None, "")
            exchange.error = failure.kind
            return respond.answer(exchange, failure.status, failure.detail)
        except PoolFull:
            upstream.pending_rejected += 1
            return respond.answer(
                exchange, 503, "too many requests wait for this upstream", busy=True
            )
        except UPSTREAM_ERRORS as exc:
            started = response is not None and response.prepared
            client_failure = intake.client_body_failure(request)
            if client_failure is not None:  # the client's body failed, not the upstream
                return respond.client_failed(
                    request, exchange, response if started else None, *client_failure
                )
            if started:
                assert response is not None
                # After the headers nothing is retried, and a connection error here is the
                # client's (aiohttp's ClientConnectionResetError is a ClientError too).
                failure = CLIENT_ABORT if isinstance(exc, ConnectionError) else classify(exc)
                return respond.broken_after_headers(
                    request, url, upstream, target, response, exchange, failure, exc
                )
            if acquisition.queued:  # the connect timeout ran out while waiting for a slot
                exchange.error = "timeout"
                return respond.answer(
                    exchange, 503, "no upstream connection free in time", busy=True
                )
            if upgrading:
                exchange.tunnel = "failed"  # unless a retry upgrades it after all
            failure, reached = classify(exc), phase(exc)
            # Per attempt, a connect timeout is a connect failure: the target never answered.
            upstream.failed(target, "connect" if reached == "connect" else failure.kind)
            return Attempted(failure, reached, acquisition.reused, exc, url)
        finally:
            target.in_flight -= not exchange.relaying  # a tunnel's target: when it closes
            exchange.pool_wait += acquisition.waited
            # Callbacks scheduled in this task (a connection's reader, a tunnel's timer) keep
            # a copy of its context, this acquisition included: it must not hold a protocol.
            acquisition.protocol = None


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return (
        expect is not None
        and expect.lower() == "100-continue"
        and request.version >= aiohttp.HttpVersion11
    )
