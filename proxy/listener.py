"""The client-facing HTTP/1.1 server: aiohttp's low-level server, with these behaviours changed.

1. Every client read and write has a deadline (deadlines.py), and the listener stops
   accepting at listen.limits.max_connections (accept.py, told of each connection here).
2. Malformed requests get a short 400 (414 for a long request line, 431 for oversized headers)
   and an INFO log line, where aiohttp answers 400 to everything, echoes the offending bytes and
   logs a traceback at ERROR. A parse error inside a request body fails that body, where aiohttp
   would leave it waiting for ever.
3. A typo in the handler's keyword arguments raises, where aiohttp would drop *all* of them
   silently (auto_decompress=False among them) and log a warning per connection.
4. `ForwardedResponse` keeps the upstream's headers as they were: aiohttp would add `Server` and
   `Content-Type: application/octet-stream` when the upstream sent none, and drop the
   `Content-Length` of a 304. It also sends its headers with the first body bytes. The proxy's
   own answers carry no `Server` header. Both carry the request's ID (tracing.py).

Everything here leans on aiohttp internals, all listed in internals.py and checked there at
start-up against aiohttp 3.14.5.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.deadlines import TIMEOUT_PHASES, DeadlineHandler, Deadlines, popped_message
from proxy.tracing import stamp

log = logging.getLogger("proxy")


class _OwnResponse(web.Response):
    """A response of the proxy's own, without the `Server: Python/3.x aiohttp/3.y` header
    aiohttp adds: versions help an attacker and nobody else."""

    async def _prepare_headers(self) -> None:
        stamp(self.headers)  # the request ID, when the request had one (tracing.py)
        await super()._prepare_headers()
        self.headers.popall("Server", None)


def plain_response(status: int, detail: str = "") -> web.Response:
    """A response the proxy makes itself: status line and one sentence, in plain text."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n" if detail else f"{status} {phrase}\n"
    return _OwnResponse(status=status, text=body, content_type="text/plain")


class _ProxyRequestHandler(DeadlineHandler):
    """One client connection: deadlines (deadlines.py), and parse errors answered briefly."""

    __slots__ = ()

    # -- responses --

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status = _status_for_parse_error(exc, self._line_bytes > self.max_line_size)
        log.info("rejected malformed request from %s: %s", self.peer, exc.message)
        self._counts.on_rejected(self.peer, status)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        response = plain_response(status, _PARSE_ERROR_DETAIL.get(status, "malformed request"))
        response.force_close()  # the parser's position in the byte stream is unknowable now
        return response


_PARSE_ERROR_DETAIL = {
    414: "request-target too long",
    431: "request header fields too large",
}


def _status_for_parse_error(exc: HttpProcessingError, long_line: bool) -> int:
    # aiohttp's parser raises LineTooLong both for a long request line and for a long header
    # line, and BadHttpMessage for too many headers: which one it was is told by whether the
    # request line itself was over the limit.
    if isinstance(exc, LineTooLong):
        return 414 if long_line else 431
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return 431
    return 400


class ProxyHTTPServer(web.Server):
    """aiohttp's low-level server, minus its kwarg-dropping fallback (see module docstring),
    with deadlines on every client connection and its counts of what it refused.

    `on_rejected(client, status)` is told of each request refused before it reached a handler.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        deadlines: Deadlines,
        on_rejected: Callable[[str | None, int], None] = lambda client, status: None,
        **kwargs: Any,
    ) -> None:
        kwargs["request_factory"] = (
            self._request if deadlines.keepalive else self._request_without_keepalive
        )
        super().__init__(handler, **kwargs)
        self.deadlines = deadlines
        self.on_rejected = on_rejected
        self.client_timeouts = dict.fromkeys(TIMEOUT_PHASES, 0)
        self.open_connections = 0
        self._closed_waiters: list[asyncio.Future[None]] = []

    def __call__(self, peer: str | None = None) -> RequestHandler:
        """A connection's handler; `peer`: the client a PROXY protocol header named."""
        return _ProxyRequestHandler(self, peer=peer, loop=self._loop, **self._kwargs)

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # aiohttp's own factory, given the message as the handler boxed it (deadlines.py).
        message = popped_message(message)
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop)

    def _request_without_keepalive(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # listen.keepalive_timeout 0 (aiohttp would then keep idle connections for ever): every
        # request is the connection's last, so its response says "Connection: close".
        closing = popped_message(message)._replace(should_close=True)
        return self._request(closing, payload, protocol, writer, task)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        self.connection_ended()

    def handed_off(self, handler: RequestHandler) -> None:
        # aiohttp forgets it (it would close it at shutdown, and hold the handler for ever);
        # the connection stays open, and counted, until handed_off_closed().
        super().connection_lost(handler, None)

    def handed_off_closed(self) -> None:
        self.open_connections -= 1
        self.connection_ended()

    def connection_ended(self) -> None:
        """A client connection (or one still in its TLS handshake) is gone."""
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def connection_closed(self) -> None:
        """Wait until some client connection closes."""
        waiter = self._loop.create_future()
        self._closed_waiters.append(waiter)
        await waiter


class ForwardedResponse(web.StreamResponse):
    """A response whose status, reason and headers are copied from the upstream's.

    Its head is made in one synchronous step (`_head`) rather than aiohttp's five coroutines,
    which also invent a `Server` header and `Content-Type: application/octet-stream` and drop a
    304's `Content-Length`; what it keeps of them is the framing, `Date` and `Connection`.
    Its headers are held back until the first body write, so that a small response leaves in
    one write instead of two (bench/: about 10% less CPU per request). Whoever prepares it
    must call `flush_headers()` before waiting for a body that is not there yet.
    """

    _send_headers_immediately = False  # as aiohttp's own web.Response does

    def flush_headers(self, request: web.BaseRequest) -> None:
        request.writer.send_headers()

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._payload_writer is not None or self._eof_sent:
            return await super().prepare(request)  # prepared before: aiohttp's answer
        writer = request._payload_writer
        status_line = self._head(request, writer)
        self._req, self._payload_writer = request, writer
        await writer.write_headers(status_line, self.headers)
        return writer

    def _head(self, request: web.BaseRequest, writer: AbstractStreamWriter) -> str:
        """What aiohttp's StreamResponse._prepare_headers decides (3.14.5), for a response with
        no cookies, compression or chunked flag of its own: the body's framing to the client,
        `Date` when the upstream sent none, and `Connection` where keep-alive differs from
        the version's default. Returns the status line."""
        method, status, headers = request.method, self.status, self.headers
        stamp(headers)  # the request ID, when the request had one (tracing.py)
        empty = must_be_empty_body(method, status)
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        version = request.version
        length = headers.get("Content-Length")
        writer.length = None if length is None else int(length)
        if empty:
            # RFC 9110 §8.6: a 304 may carry the representation's length; 1xx and 204 not.
            if (
                length is not None
                and status != 304
                and should_remove_content_length(method, status)
            ):
                del headers["Content-Length"]
            headers.popall("Transfer-Encoding", None)  # RFC 9112 §6.1
        elif length is None:
            if version >= HttpVersion11:
                writer.enable_chunking()
                headers["Transfer-Encoding"] = "chunked"
            else:
                keep_alive = False  # an HTTP/1.0 client reads an unframed body to the close
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        if "Connection" not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers["Connection"] = "keep-alive"
            elif version == HttpVersion11:
                headers["Connection"] = "close"
        self._keep_alive = keep_alive
        return f"HTTP/{version[0]}.{version[1]} {status} {self.reason}"


def handler_kwargs(
    keepalive_timeout: float, max_request_line: int, max_header: int, max_headers: int
) -> dict[str, Any]:
    """RequestHandler arguments for the data plane (each one checked by a test)."""
    return {
        "keepalive_timeout": keepalive_timeout,
        # Forward compressed uploads as they came (aiohttp would gunzip them, notes §0.1).
        "auto_decompress": False,
        "access_log": None,
        "max_line_size": max_request_line,
        "max_field_size": max_header,  # name + value of one header line
        "max_headers": max_headers,
    }
