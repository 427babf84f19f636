"""The hot path: route a client request, stream it to a target, stream the answer back.

Reads top to bottom as the data flows. Every upstream failure is classified in one place,
`classify()`. Knows nothing of YAML or Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy import headers as hdrs
from proxy.listener import ForwardedResponse, plain_response
from proxy.routing import RoutingTable, forwarded_path, host_key
from proxy.upstream import Upstream

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


class Forwarder:
    """The data-plane request handler."""

    def __init__(self, current: Callable[[], Snapshot], scheme: str) -> None:
        self._current = current  # returns the snapshot in force now
        self._scheme = scheme

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        snapshot = self._current()
        hosts = request.headers.getall("Host", ())
        # RFC 9112 §3.2: exactly one Host on HTTP/1.1; HTTP/1.0 may have none.
        if len(hosts) > 1 or (not hosts and request.version >= aiohttp.HttpVersion11):
            return plain_response(400, "a request needs exactly one Host header")
        host = hosts[0] if hosts else None
        target = request.raw_path
        absolute = not target.startswith("/")
        if absolute:
            # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
            parsed = origin_form(target)
            if parsed is None or parsed[0] is None:
                return plain_response(400, "the request-target must be a path or an http URL")
            host, target = parsed

        if "#" in target:
            # Not part of any request-target form (RFC 9112 §3.2), and yarl would drop it.
            return plain_response(400, "the request-target must not contain a fragment")

        route = snapshot.routes.match(host_key(host), target)
        if route is None:
            return plain_response(404, "no route matches this request")
        upstream = snapshot.upstreams[route.upstream]

        out_headers = hdrs.to_upstream(
            request.headers, client_ip=request.remote, scheme=self._scheme, host=host
        )
        if absolute and host is not None:
            out_headers["Host"] = host
        return await self._forward(request, upstream, out_headers, forwarded_path(route, target))

    async def _forward(
        self,
        request: web.BaseRequest,
        upstream: Upstream,
        out_headers: CIMultiDict[str],
        path: str,
    ) -> web.StreamResponse:
        # `encoded=True`: the target goes out byte for byte, never re-quoted or normalised.
        url = URL(upstream.pick_target() + path, encoded=True)
        # A body-less request must stay body-less: data=<empty stream> would make it chunked.
        body = request.content if request.body_exists else None
        if body is not None and _expects_continue(request):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            async with upstream.session.request(
                request.method, url, headers=out_headers, data=body, allow_redirects=False
            ) as upstream_response:
                response = ForwardedResponse(
                    status=upstream_response.status,
                    reason=upstream_response.reason,
                    headers=hdrs.to_client(upstream_response.headers),
                )
                try:
                    await response.prepare(request)
                except ConnectionError:  # the client went away while we waited
                    return response
                except ValueError as exc:
                    log.warning(
                        "%s %s -> %s: %s (%s)",
                        request.method,
                        url,
                        upstream.name,
                        _UNFORWARDABLE.detail,
                        exc,
                    )
                    return plain_response(_UNFORWARDABLE.status, _UNFORWARDABLE.detail)
                failure = await _copy_body(request, upstream_response.content, response)
                if failure is not None:
                    _abort(request, response, failure)
                    return response
                await response.write_eof()
                return response
        except UPSTREAM_ERRORS as exc:
            failure = classify(exc)
            log.warning(
                "%s %s -> %s: %s (%r)", request.method, url, upstream.name, failure.detail, exc
            )
            return plain_response(failure.status, failure.detail)


async def _copy_body(
    request: web.BaseRequest, source: aiohttp.StreamReader, response: ForwardedResponse
) -> Failure | None:
    """Copy each chunk as it arrives (SSE needs that); `write` waits while the client is slow."""
    try:
        # Bytes that came in with the headers leave with them, in one write; if there are
        # none yet, the client must not wait for the headers until the body starts.
        chunk = source.read_nowait()
    except UPSTREAM_ERRORS as exc:
        return classify(exc)
    if chunk:
        try:
            await response.write(chunk)
        except ConnectionError:
            return Failure(499, "client_abort", "client went away")
    else:
        response.flush_headers(request)
    while True:
        try:
            chunk = await source.readany()
        except UPSTREAM_ERRORS as exc:
            return classify(exc)
        if not chunk:
            return None
        try:
            await response.write(chunk)
        except ConnectionError:
            return Failure(499, "client_abort", "client went away")


def _abort(request: web.BaseRequest, response: web.StreamResponse, failure: Failure) -> None:
    """After the headers went out, a broken body must look broken: cut the connection.

    Returning normally would make aiohttp send the final chunk (or leave a Content-Length short
    on a live connection), and the client would take a truncated body for a complete one.
    """
    if failure.kind != "client_abort":
        log.warning("upstream failed mid-body (%s): aborting the client connection", failure.detail)
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
