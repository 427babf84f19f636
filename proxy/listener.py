"""The client-facing HTTP/1.1 server: aiohttp's low-level server, with these behaviours changed.

1. Every client read and write has a deadline (listen.timeouts): a complete request head
   (from connect, or from its first byte on a kept-alive connection), a silent request body,
   and response bytes the client leaves unaccepted. aiohttp bounds only idle keep-alive time.
2. Malformed requests get a short 400 (414 for a long request line, 431 for oversized headers)
   and an INFO log line, where aiohttp answers 400 to everything, echoes the offending bytes and
   logs a traceback at ERROR. A parse error inside a request body fails that body, where aiohttp
   would leave it waiting for ever.
3. A typo in the handler's keyword arguments raises, where aiohttp would drop *all* of them
   silently (auto_decompress=False among them) and log a warning per connection.
4. `ForwardedResponse` keeps the upstream's headers as they were: aiohttp would add `Server` and
   `Content-Type: application/octet-stream` when the upstream sent none, and drop the
   `Content-Length` of a 304. It also sends its headers with the first body bytes. The proxy's
   own answers carry no `Server` header.

Everything here leans on aiohttp internals, all listed in internals.py and checked there at
start-up against aiohttp 3.14.5.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("proxy")


class _OwnResponse(web.Response):
    """A response of the proxy's own, without the `Server: Python/3.x aiohttp/3.y` header
    aiohttp adds: versions help an attacker and nobody else."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


def plain_response(status: int, detail: str = "") -> web.Response:
    """A response the proxy makes itself: status line and one sentence, in plain text."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n" if detail else f"{status} {phrase}\n"
    return _OwnResponse(status=status, text=body, content_type="text/plain")


@dataclass(frozen=True, slots=True)
class Deadlines:
    """listen.timeouts, and whether connections are kept alive between requests at all."""

    header: float  # s for a complete request head, from connect or its first byte
    body: float  # s of silence while a request body streams in
    send: float  # s the client may leave response bytes unaccepted
    keepalive: bool = True  # False (listen.keepalive_timeout: 0): one request per connection


TIMEOUT_PHASES = ("header", "body", "send")


class ClientBodyTimeout(Exception):
    """Set on a request body that went silent for longer than listen.timeouts.body."""


_TIMEOUT_BODY = b"408 Request Timeout: the request head was not received in time\n"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class _ProxyRequestHandler(RequestHandler):
    """One client connection: aiohttp's, plus a deadline on every read and write.

    aiohttp bounds only the idle time between requests (and not at all when keepalive_timeout
    is 0): a client that trickles its head or its body, or stops reading a response, would keep
    its connection, and the upstream pool slot behind it, for as long as it likes. One timer
    per connection, re-armed lazily, checks the phase the connection is in when it fires.
    """

    def __init__(self, manager: ProxyHTTPServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager  # aiohttp drops its own reference on connection_lost
        self._deadlines = manager.deadlines
        self._head_started: float | None = None  # a request head is being read since then
        self._line_seen = False  # that head's request line is complete
        self._line_bytes = 0  # that request line's length so far
        self._last_read = 0.0
        self._write_paused_at: float | None = None
        self._body_expired: web.BaseRequest | None = None
        self._payload: StreamReader | None = None  # the body of the last request parsed
        self._timer: asyncio.TimerHandle | None = None

    # -- events that start or end a phase --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        now = self._loop.time()
        self._head_started = self._last_read = now  # the head is due from connect on
        self._arm(now + self._deadlines.header)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self._last_read = self._loop.time()
        if self._head_started is None and self._waiter is not None:
            # The first byte of the next head on a kept-alive connection (nginx's
            # client_header_timeout starts here; until then keepalive_timeout applies).
            self._head_started = now
            self._arm(now + self._deadlines.header)
        if not self._line_seen:
            end = data.find(b"\n")
            self._line_seen = end != -1
            self._line_bytes += len(data) if end == -1 else end
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:  # a head is complete: its body, if any, is next
            self._head_started = None
            message, payload = self._messages[-1]
            if isinstance(message, RawRequestMessage):
                self._line_seen, self._line_bytes = False, 0  # else handle_error needs them
                self._payload = payload
            elif self._payload is not None and not self._payload.is_eof():
                # A parse error inside the body being read (a bad chunk size): aiohttp queues
                # it as the next request's error and leaves this body waiting for ever. The
                # body is the one that failed: its reader (the forwarder) must learn it.
                self._payload.set_exception(getattr(message, "exc", None) or BadHttpMessage(""))
            self._arm(now + self._deadlines.body)

    def pause_writing(self) -> None:
        super().pause_writing()
        now = self._write_paused_at = self._loop.time()
        self._arm(now + self._deadlines.send)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused_at = None

    # -- the timer --

    def _arm(self, when: float) -> None:
        """Have the timer fire no later than `when` (it re-arms itself if that is early)."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        deadlines = self._deadlines
        due: list[float] = []
        if self._write_paused_at is not None:
            if now - self._write_paused_at >= deadlines.send:
                return self._expire("send")
            due.append(self._write_paused_at + deadlines.send)
        request = self._current_request
        if request is not None:
            content = request.content
            if self._body_expired is request:
                # The handler was told a second ago and has not let go: cut the connection.
                self.transport.abort()
                return None
            if not content.is_eof() and content.exception() is None:
                if self._reading_paused:
                    self._last_read = now  # the proxy stopped reading, not the client
                if now - self._last_read >= deadlines.body:
                    return self._expire("body")
                due.append(self._last_read + deadlines.body)
        elif self._head_started is not None:
            if now - self._head_started >= deadlines.header:
                return self._expire("header")
            due.append(self._head_started + deadlines.header)
        if due:
            self._timer = self._loop.call_at(min(due), self._check_deadlines)
        return None

    def _expire(self, phase: str) -> None:
        self._server.client_timeouts[phase] += 1
        request = self._current_request
        log.info("client %s: %s timeout", self._peer(), phase)
        if phase == "body" and request is not None:
            # The handler answers 408 (or cuts a response that started) when the body read
            # fails; if it has not let go a second later, the connection is cut.
            self._body_expired = request
            request.content.set_exception(ClientBodyTimeout())
            self._timer = self._loop.call_later(1.0, self._check_deadlines)
            return
        assert self.transport is not None
        if phase == "header" and not self._request_in_progress:
            self._server.on_rejected(self._peer(), 408)
            self.transport.write(_REQUEST_TIMEOUT)
            self.force_close()  # closes the transport once the 408 is written
        else:
            self.transport.abort()  # send: the client reads nothing, so say nothing

    def _peer(self) -> str | None:
        peer = self.peername
        return peer[0] if isinstance(peer, tuple) else None

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
        log.info("rejected malformed request from %s: %s", request.remote, exc.message)
        self._server.on_rejected(request.remote, status)
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
        if not deadlines.keepalive:
            kwargs["request_factory"] = self._request_without_keepalive
        super().__init__(handler, **kwargs)
        self.deadlines = deadlines
        self.on_rejected = on_rejected
        self.client_timeouts = dict.fromkeys(TIMEOUT_PHASES, 0)
        self.open_connections = 0
        self._closed_waiters: list[asyncio.Future[None]] = []

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)

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
        closing = message._replace(should_close=True)
        return web.BaseRequest(closing, payload, protocol, writer, task, self._loop)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def connection_closed(self) -> None:
        """Wait until some client connection closes."""
        waiter = self._loop.create_future()
        self._closed_waiters.append(waiter)
        await waiter


_MAY_BE_INVENTED = ("Server", "Content-Type")


class ForwardedResponse(web.StreamResponse):
    """A response whose status, reason and headers are copied from the upstream's.

    Its headers are held back until the first body write, so that a small response leaves in
    one write instead of two (bench/: about 10% less CPU per request). Whoever prepares it
    must call `flush_headers()` before waiting for a body that is not there yet.
    """

    _send_headers_immediately = False  # as aiohttp's own web.Response does

    def flush_headers(self, request: web.BaseRequest) -> None:
        request.writer.send_headers()

    async def _prepare_headers(self) -> None:
        headers = self.headers
        absent = [name for name in _MAY_BE_INVENTED if name not in headers]
        # RFC 9110 §8.6 lets a 304 carry the Content-Length of the representation.
        length_304 = headers.get("Content-Length") if self.status == 304 else None
        await super()._prepare_headers()
        for name in absent:
            headers.popall(name, None)
        if length_304 is not None:
            headers["Content-Length"] = length_304


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
