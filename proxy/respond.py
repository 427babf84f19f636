"""What the client gets: the proxy's own short answers, the upstream's response copied as it
comes, and a response that broke after its headers cut so that it looks broken.

Called by forward.py; decides statuses only for what the client did (`refuse`) or what broke
after the headers. Knows nothing of routes, retries or YAML.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from yarl import URL

from proxy import headers as hdrs
from proxy import intake, tunnel
from proxy.balancing import TargetState
from proxy.deadlines import body_finished
from proxy.exchange import Exchange
from proxy.failures import CLIENT_ABORT, UPSTREAM_ERRORS, Failure, classify
from proxy.listener import ForwardedResponse, plain_response
from proxy.upstream import Upstream
from proxy.wire import UpstreamResponse

log = logging.getLogger("proxy")


def answer(exchange: Exchange, status: int, detail: str, *, busy: bool = False) -> web.Response:
    """A response the proxy makes itself, recorded as what the client got. `busy`: the
    upstream is overloaded, so tell the client when to come back (RFC 9110 §10.2.3)."""
    response = plain_response(status, detail)
    if busy:
        response.headers["Retry-After"] = "1"
    if exchange.response_rules is not None:  # the route's headers.response (policy.py)
        exchange.response_rules.apply(response.headers)
    exchange.status = status
    exchange.bytes_sent = len(response.body)  # type: ignore[arg-type]
    return response


def broken_after_headers(
    request: web.BaseRequest,
    url: URL,
    upstream: Upstream,
    target: TargetState,
    response: web.StreamResponse,
    exchange: Exchange,
    failure: Failure,
    exc: BaseException,
) -> web.StreamResponse:
    """The response had started when `failure` happened: never retried; the target is blamed
    (unless the client left) and the client connection is cut."""
    if failure is not CLIENT_ABORT:
        upstream.failed(target, failure.kind)
        log_failure(request, url, upstream, failure, exc, AFTER_HEADERS)
    abort(request, response)
    return failed_after_headers(exchange, failure, response)


def failed_after_headers(
    exchange: Exchange, failure: Failure, response: web.StreamResponse
) -> web.StreamResponse:
    """After the headers: the status stays what the client saw, unless the client left."""
    exchange.error = failure.kind
    if failure is CLIENT_ABORT:
        exchange.status = 499
    return response


AFTER_HEADERS = "after the response headers (client connection aborted) "


def log_failure(
    request: web.BaseRequest,
    url: URL,
    upstream: Upstream,
    failure: Failure,
    exc: BaseException | None,
    when: str,
) -> None:
    log.warning(
        "%s %s -> upstream %s: %s %s(%r)",
        request.method,
        url,
        upstream.name,
        failure.detail,
        when,
        exc,
    )


async def copy_body(
    request: web.BaseRequest,
    source: aiohttp.StreamReader,
    response: ForwardedResponse,
    exchange: Exchange,
) -> tuple[Failure, BaseException] | None:
    """Copy each chunk as it arrives (SSE needs that); `write` waits while the client is slow.
    Reads fail on the upstream's side, writes on the client's: the failure says which."""
    try:
        # Bytes that came in with the headers leave with them, in one write; if there are
        # none yet, the client must not wait for the headers until the body starts.
        chunk = source.read_nowait()
    except UPSTREAM_ERRORS as exc:
        return classify(exc), exc
    if source.at_eof():  # the whole body came with the head: head, body and end in one write
        try:
            await response.write_eof(chunk)
        except ConnectionError as exc:
            return CLIENT_ABORT, exc
        exchange.bytes_sent += len(chunk)
        return None
    if not chunk:
        response.flush_headers(request)
    while True:
        if chunk:
            try:
                await response.write(chunk)
            except ConnectionError as exc:
                return CLIENT_ABORT, exc
            exchange.bytes_sent += len(chunk)
        try:
            chunk = await source.readany()
        except UPSTREAM_ERRORS as exc:
            return classify(exc), exc
        if not chunk:
            return None


def forwardable(upstream_response: UpstreamResponse, upgrading: bool) -> ForwardedResponse:
    """The client's copy of the upstream's status line and headers; ValueError for one that
    must not be forwarded (the caller answers 502)."""
    status = upstream_response.status
    headers = hdrs.to_client(upstream_response.headers)
    # A 101 switches only with an Upgrade header (RFC 9110 §15.2.2); without one aiohttp has
    # already released the connection it came on.
    if status == 101 and upgrading and upstream_response.connection is not None:
        headers = tunnel.switching_headers(upstream_response.headers, headers)
    elif status == 426:  # Upgrade Required must say which (RFC 9110 §15.5.22)
        for value in upstream_response.headers.getall("Upgrade", ()):
            headers.add("Upgrade", value)
    # aiohttp passes "000" as 0 and any three digits; 1xx other than 101 it consumes itself.
    # A 101 to a request that asked for no upgrade answers a question nobody asked, and the
    # bytes after it are not HTTP (RFC 9110 §15.2.2).
    elif not 200 <= status <= 599:
        raise ValueError(f"status {status} cannot answer this request")
    # _real_headers: the multidict made above becomes the response's own (aiohttp would copy it).
    return ForwardedResponse(status=status, reason=upstream_response.reason, _real_headers=headers)


def refuse(exchange: Exchange, refusal: intake.Refusal) -> web.Response:
    response = answer(exchange, refusal.status, refusal.detail)
    if refusal.close:
        response.force_close()
    return response


def client_failed(
    request: web.BaseRequest,
    exchange: Exchange,
    response: web.StreamResponse | None,
    refusal: intake.Refusal,
    exc: BaseException,
) -> web.StreamResponse:
    """The client's request body failed: a 4xx if no response started, else a cut connection;
    never counted against the target."""
    log.info("%s %s from %s: %s (%r)", request.method, request.raw_path, exchange.client,
             refusal.detail, exc)  # fmt: skip
    body_finished(request)
    if response is None:
        return refuse(exchange, refusal)
    abort(request, response)
    exchange.status = 499
    return response


def abort(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """After the headers went out, a broken body must look broken: cut the connection.

    Returning normally would make aiohttp send the final chunk (or leave a Content-Length short
    on a live connection), and the client would take a truncated body for a complete one.
    """
    response.force_close()
    if request.transport is not None:
        request.transport.abort()
