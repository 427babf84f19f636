"""What the proxy accepts from a client before anything goes upstream: exactly one valid Host,
a request-target routes can be matched on safely, and a body within its limit; and, once a
body failed, whether the client was the one who broke it.

Pure checks over one aiohttp request; the answer to a refused request is a `Refusal`, which
forward.py turns into the response. Knows nothing of routes, upstreams or metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.deadlines import ClientBodyError, ClientBodyTimeout
from proxy.routing import normalized_path, origin_form, valid_host


class Refusal(Exception):
    """The client's request is refused with `status` before anything goes upstream."""

    def __init__(self, status: int, detail: str, *, close: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.close = close  # the connection must close: what is left of it is unread


@dataclass(frozen=True, slots=True)
class Addressed:
    """Where a request is addressed: its Host and origin-form target, and the path that routes
    are matched on."""

    host: str | None  # the Host header, or the authority of an absolute-form target
    target: str  # origin-form, byte for byte as received
    path: str  # `normalized_path(target)`
    absolute: bool  # the client sent an absolute-form target


def addressed(request: web.BaseRequest) -> Addressed:
    """The request's host and target; Refusal(400) where RFC 9112 §3.2 says to reject."""
    hosts = request.headers.getall("Host", ())
    # RFC 9112 §3.2: exactly one Host on HTTP/1.1; HTTP/1.0 may have none.
    if len(hosts) > 1 or (not hosts and request.version >= aiohttp.HttpVersion11):
        raise Refusal(400, "a request needs exactly one Host header")
    host = hosts[0] if hosts else None
    target = request.raw_path
    absolute = not target.startswith("/")
    if absolute:
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
        parsed = origin_form(target)
        if parsed is None or parsed[0] is None:
            raise Refusal(400, "the request-target must be a path or an http URL")
        host, target = parsed
    if host is not None and not valid_host(host):  # userinfo included
        raise Refusal(400, "invalid Host (a host name or address, and a port)")
    if "#" in target:
        # Not part of any request-target form (RFC 9112 §3.2), and yarl would drop it.
        raise Refusal(400, "the request-target must not contain a fragment")
    path = normalized_path(target)
    if path is None:
        raise Refusal(400, "the request path climbs above /, or its dot-segments are ambiguous")
    return Addressed(host, target, path, absolute)


def body(
    request: web.BaseRequest, max_body: int
) -> aiohttp.StreamReader | AsyncIterator[bytes] | None:
    """The request body to stream upstream, None for a request without one (data=<an empty
    stream> would make aiohttp send a body-less GET chunked). `max_body` (0: none) is enforced
    at once on a Content-Length, and as it streams on a chunked body."""
    if not request.body_exists:
        return None
    length = request.content_length
    if max_body and length is not None and length > max_body:
        raise Refusal(413, f"the request body exceeds {max_body} bytes", close=True)
    if max_body and length is None:
        return _at_most(request.content, max_body)
    return request.content


class BodyTooLarge(ClientBodyError):
    """Set on a chunked request body that grew past its max_body."""


async def _at_most(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    received = 0
    while chunk := await content.readany():
        received += len(chunk)
        if received > limit:
            error = BodyTooLarge(limit)
            content.set_exception(error)  # what client_body_failure() finds afterwards
            raise error
        yield chunk


# The client's answer when its own request body failed (the upstream is not to blame).
_BODY_FAILURES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ClientBodyTimeout, 408, "the request body stopped arriving"),
    (BodyTooLarge, 413, "the request body is too large"),
    (Exception, 400, "malformed request body"),  # aiohttp's parser: a bad chunk size, say
)


def client_body_failure(request: web.BaseRequest) -> tuple[Refusal, BaseException] | None:
    """Whether the request's own body failed (then an upstream error that followed is the
    client's doing): the refusal to answer with, and the error."""
    exc = request.content.exception() if request.body_exists else None
    if exc is None:
        return None
    for exc_type, status, detail in _BODY_FAILURES:
        if isinstance(exc, exc_type):
            return Refusal(status, detail, close=True), exc
    return None
