"""The hot path: route a client request, stream it to a target, stream the answer back.

Reads top to bottom as the data flows. Every upstream failure is classified in one place,
`classify()`. Knows nothing of YAML or Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy import headers as hdrs
from proxy.listener import ForwardedResponse, plain_response
from proxy.routing import RoutingTable, forwarded_path, host_key
from proxy.upstream import POOL_WAIT, REUSED, Upstream

log = logging.getLogger("proxy")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one request reads, once, at its start: a reload swaps the whole snapshot."""

    routes: RoutingTable
    upstreams: Mapping[str, Upstream]

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))


@dataclass(frozen=True, slots=True)
class Failure:
    status: int  # what the client gets if no response header was sent yet
    kind: str  # the `kind` label of proxy_upstream_errors_total
    detail: str


# First match wins, so subclasses come before their bases (ConnectionTimeoutError is a
# ServerTimeoutError; ClientConnectorError is a ClientOSError).
_FAILURES: tuple[tuple[type[BaseException], Failure], ...] = (
    (aiohttp.ConnectionTimeoutError, Failure(504, "timeout", "timed out connecting to upstream")),
    (aiohttp.ClientConnectorError, Failure(502, "connect", "could not connect to upstream")),
    (asyncio.TimeoutError, Failure(504, "timeout", "upstream did not answer in time")),
    (aiohttp.ServerDisconnectedError, Failure(502, "reset", "upstream closed the connection")),
    (aiohttp.ClientOSError, Failure(502, "reset", "upstream connection failed")),
    (aiohttp.ClientConnectionError, Failure(502, "reset", "upstream connection failed")),
    (aiohttp.ClientResponseError, Failure(502, "protocol", "upstream sent a malformed response")),
    (aiohttp.ClientPayloadError, Failure(502, "protocol", "upstream sent a malformed body")),
    (aiohttp.ClientError, Failure(502, "protocol", "upstream request failed")),
)
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# aiohttp's client parser lets a control character through in a header value; its server then
# refuses to write it (ValueError from prepare()). Nothing was sent yet, so: 502.
_UNFORWARDABLE = Failure(502, "protocol", "upstream sent a header that cannot be forwarded")


def classify(exc: BaseException) -> Failure:
    """The one mapping from an upstream exception to a status and an error kind."""
    for exc_type, failure in _FAILURES:
        if isinstance(exc, exc_type):
            return failure
    raise TypeError(f"not an upstream failure: {exc!r}") from exc


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


@dataclass(slots=True)
class Exchange:
    """One request as the proxy handled it, filled in as it goes and observed once at the end
    (metrics and the access log read it; this module knows neither)."""

    time: float  # wall clock at arrival, for the log
    started: float  # perf_counter at arrival
    client: str | None
    method: str
    target: str  # the raw request-target as received
    route: str = ""  # "" when no route matched
    upstream: str = ""
    upstream_target: str = ""
    status: int = 0  # what the client got; 499 when it went away first
    bytes_sent: int = 0  # response body bytes
    duration: float = 0.0
    upstream_seconds: float | None = None  # to the upstream's response headers
    pool_wait: float = 0.0  # seconds spent waiting for a pool slot
    error: str | None = None  # the `kind` of proxy_upstream_errors_total
    reused: bool | None = None  # whether the upstream connection had served a request before


Observer = Callable[[Exchange], None]


class Forwarder:
    """The data-plane request handler."""

    def __init__(self, current: Callable[[], Snapshot], scheme: str, observe: Observer) -> None:
        self._current = current  # returns the snapshot in force now
        self._scheme = scheme
        self._observe = observe

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(
            time.time(), time.perf_counter(), request.remote, request.method, request.raw_path
        )
        try:
            return await self._handle(request, exchange)
        except asyncio.CancelledError:  # the client went away (handler_cancellation=True)
            exchange.status = 499
            if exchange.upstream and exchange.error is None:
                exchange.error = "client_abort"
            raise
        finally:
            exchange.duration = time.perf_counter() - exchange.started
            self._observe(exchange)

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        snapshot = self._current()
        hosts = request.headers.getall("Host", ())
        # RFC 9112 §3.2: exactly one Host on HTTP/1.1; HTTP/1.0 may have none.
        if len(hosts) > 1 or (not hosts and request.version >= aiohttp.HttpVersion11):
            return _answer(exchange, 400, "a request needs exactly one Host header")
        host = hosts[0] if hosts else None
        target = request.raw_path
        absolute = not target.startswith("/")
        if absolute:
            # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
            parsed = origin_form(target)
            if parsed is None or parsed[0] is None:
                return _answer(exchange, 400, "the request-target must be a path or an http URL")
            host, target = parsed

        if "#" in target:
            # Not part of any request-target form (RFC 9112 §3.2), and yarl would drop it.
            return _answer(exchange, 400, "the request-target must not contain a fragment")

        route = snapshot.routes.match(host_key(host), target)
        if route is None:
            return _answer(exchange, 404, "no route matches this request")
        upstream = snapshot.upstreams[route.upstream]
        exchange.route = route.name
        exchange.upstream = upstream.name

        out_headers = hdrs.to_upstream(
            request.headers, client_ip=request.remote, scheme=self._scheme, host=host
        )
        if absolute and host is not None:
            out_headers["Host"] = host
        upstream.in_flight += 1
        upstream.requests += 1
        try:
            return await self._forward(
                request, exchange, upstream, out_headers, forwarded_path(route, target)
            )
        finally:
            upstream.in_flight -= 1

    async def _forward(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream: Upstream,
        out_headers: CIMultiDict[str],
        path: str,
    ) -> web.StreamResponse:
        exchange.upstream_target = upstream.pick_target()
        # `encoded=True`: the target goes out byte for byte, never re-quoted or normalised.
        url = URL(exchange.upstream_target + path, encoded=True)
        # A body-less request must stay body-less: data=<empty stream> would make it chunked.
        body = request.content if request.body_exists else None
        if body is not None and _expects_continue(request):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        POOL_WAIT.set(0.0)
        REUSED.set(None)
        sent = time.perf_counter()
        try:
            async with upstream.session.request(
                request.method, url, headers=out_headers, data=body, allow_redirects=False
            ) as upstream_response:
                exchange.upstream_seconds = time.perf_counter() - sent
                exchange.pool_wait = POOL_WAIT.get()
                exchange.reused = REUSED.get()
                response = ForwardedResponse(
                    status=upstream_response.status,
                    reason=upstream_response.reason,
                    headers=hdrs.to_client(upstream_response.headers),
                )
                exchange.status = response.status
                try:
                    await response.prepare(request)
                except ConnectionError:  # the client went away while we waited
                    return _failed(exchange, _CLIENT_ABORT, response)
                except ValueError as exc:
                    _log_failure(request, url, upstream, _UNFORWARDABLE, exc)
                    exchange.error = _UNFORWARDABLE.kind
                    return _answer(exchange, _UNFORWARDABLE.status, _UNFORWARDABLE.detail)
                failure = await _copy_body(request, upstream_response.content, response, exchange)
                if failure is not None:
                    if failure is not _CLIENT_ABORT:
                        _log_failure(request, url, upstream, failure, None, after_headers=True)
                    _abort(request, response)
                    return _failed(exchange, failure, response)
                await response.write_eof()
                return response
        except UPSTREAM_ERRORS as exc:
            failure = classify(exc)
            _log_failure(request, url, upstream, failure, exc)
            exchange.pool_wait = POOL_WAIT.get()
            exchange.error = failure.kind
            return _answer(exchange, failure.status, failure.detail)


_CLIENT_ABORT = Failure(499, "client_abort", "client went away")


def _answer(exchange: Exchange, status: int, detail: str) -> web.Response:
    """A response the proxy makes itself, recorded as what the client got."""
    response = plain_response(status, detail)
    exchange.status = status
    exchange.bytes_sent = len(response.body)  # type: ignore[arg-type]
    return response


def _failed(
    exchange: Exchange, failure: Failure, response: web.StreamResponse
) -> web.StreamResponse:
    """After the headers: the status stays what the client saw, unless the client left."""
    exchange.error = failure.kind
    if failure is _CLIENT_ABORT:
        exchange.status = 499
    return response


def _log_failure(
    request: web.BaseRequest,
    url: URL,
    upstream: Upstream,
    failure: Failure,
    exc: BaseException | None,
    *,
    after_headers: bool = False,
) -> None:
    when = "after the response headers (client connection aborted)" if after_headers else ""
    log.warning(
        "%s %s -> upstream %s: %s %s(%r)",
        request.method,
        url,
        upstream.name,
        failure.detail,
        when,
        exc,
    )


async def _copy_body(
    request: web.BaseRequest,
    source: aiohttp.StreamReader,
    response: ForwardedResponse,
    exchange: Exchange,
) -> Failure | None:
    """Copy each chunk as it arrives (SSE needs that); `write` waits while the client is slow."""
    try:
        # Bytes that came in with the headers leave with them, in one write; if there are
        # none yet, the client must not wait for the headers until the body starts.
        chunk = source.read_nowait()
    except UPSTREAM_ERRORS as exc:
        return classify(exc)
    if not chunk:
        response.flush_headers(request)
    while True:
        if chunk:
            try:
                await response.write(chunk)
            except ConnectionError:
                return _CLIENT_ABORT
            exchange.bytes_sent += len(chunk)
        try:
            chunk = await source.readany()
        except UPSTREAM_ERRORS as exc:
            return classify(exc)
        if not chunk:
            return None


def _abort(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """After the headers went out, a broken body must look broken: cut the connection.

    Returning normally would make aiohttp send the final chunk (or leave a Content-Length short
    on a live connection), and the client would take a truncated body for a complete one.
    """
    response.force_close()
    if request.transport is not None:
        request.transport.abort()


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return (
        expect is not None
        and expect.lower() == "100-continue"
        and request.version >= aiohttp.HttpVersion11
    )
