"""A deadline on every client read and write (listen.timeouts): a complete request head, a
request body that goes silent, and response bytes the client leaves unaccepted.

aiohttp bounds only the idle time between requests (and not at all when keepalive_timeout is
0): a client that trickles its head or its body, or stops reading a response, would keep its
connection, and the upstream pool slot behind it, for as long as it likes. `DeadlineHandler` is
aiohttp's per-connection protocol with one timer, armed lazily and checking, when it fires,
which phase the connection is in. Leans on RequestHandler internals listed in internals.py.

It also keeps an idle connection small (bench/idle.py): no instance dict, a list where aiohttp
allocates a deque, and the last request's message and headers, and its response's headers, let
go of once the response is sent, where aiohttp would hold them until the next request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger("proxy")

TIMEOUT_PHASES = ("header", "body", "send")


@dataclass(frozen=True, slots=True)
class Deadlines:
    """listen.timeouts, and whether connections are kept alive between requests at all."""

    header: float  # s for a complete request head, from connect or its first byte
    body: float  # s of silence while a request body streams in
    send: float  # s the client may leave response bytes unaccepted
    keepalive: bool = True  # False (listen.keepalive_timeout: 0): one request per connection


class ClientBodyError(Exception):
    """Set on a request body that failed through the client's doing; the forwarder answers
    for it (400/408/413), so aiohttp must not log it as an unhandled exception."""


class ClientBodyTimeout(ClientBodyError):
    """The request body went silent for longer than listen.timeouts.body."""


class MalformedBody(ClientBodyError):
    """aiohttp's parser refused the request body (a bad chunk size, say)."""


class ClientServer(Protocol):
    """What a client connection counts on its server for (listener.py's ProxyHTTPServer)."""

    deadlines: Deadlines
    client_timeouts: dict[str, int]
    on_rejected: Callable[[str | None, int], None]

    def handed_off(self, handler: RequestHandler) -> None:
        """`handler`'s connection left aiohttp (a tunnel, tunnel.py); it is still open."""

    def handed_off_closed(self) -> None:
        """A connection handed off has closed."""


_TIMEOUT_BODY = b"408 Request Timeout: the request head was not received in time\n"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
_RECHECK = 1.0  # s: how soon to look again at what cannot be decided now


class _Popped:
    """A parsed request as aiohttp's `RequestHandler.start()` holds it. That loop keeps the last
    request's locals (message, request, response) for as long as it waits for the next one,
    i.e. for the whole idle time of a keep-alive connection: some 2 KiB per idle connection
    for a bare GET, more for a browser's headers. Through this box the message is let go of
    once the response is sent (`DeadlineHandler.finish_response`); the request factory
    (listener.py) unboxes it with `popped_message`."""

    __slots__ = ("message",)

    def __init__(self, message: RawRequestMessage) -> None:
        self.message: RawRequestMessage | None = message


def popped_message(message: Any) -> RawRequestMessage:
    """The message a request factory is given, unboxed (see `_Popped`)."""
    if isinstance(message, _Popped):
        assert message.message is not None
        return message.message
    return message  # type: ignore[no-any-return]


class _MessageQueue(list[Any]):
    """RequestHandler._messages, the parsed requests not yet handled. aiohttp's deque allocates
    a 64-slot block with every connection (760 bytes, the largest single item of an idle
    connection); an empty list holds nothing. It is short (aiohttp pauses reading at 32
    requests), so popping from the front costs nothing. What it hands aiohttp is boxed."""

    __slots__ = ("popped",)

    def __init__(self) -> None:
        super().__init__()
        self.popped: _Popped | None = None  # the request being handled

    def popleft(self) -> tuple[Any, Any]:
        message, payload = self.pop(0)
        if isinstance(message, RawRequestMessage):
            self.popped = popped = _Popped(message)
            return popped, payload
        return message, payload  # a parse error (aiohttp's _ErrInfo)


# What an answered request is left holding instead of its message, headers and URL.
_SPENT = RawRequestMessage(
    "GET", "/", HttpVersion11, CIMultiDictProxy(CIMultiDict()), (), True, None, False, False,
    URL("/"),
)  # fmt: skip


class DeadlineHandler(RequestHandler):
    """One client connection: aiohttp's, plus a deadline on every read and write."""

    # No instance __dict__ (RequestHandler and its bases have slots): an idle connection
    # costs memory per attribute, not per dict.
    __slots__ = (
        "_body_expired",
        "_counts",
        "_deadlines",
        "_head_started",
        "_last_read",
        "_line_bytes",
        "_line_seen",
        "_payload",
        "_timer",
        "_write_paused_at",
        "peer",
    )  # fmt: skip

    def __init__(self, manager: ClientServer, *, peer: str | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._messages = _MessageQueue()  # type: ignore[assignment]
        # The address this connection came from: the PROXY protocol header's source (accept.py)
        # or, from connection_made on, the TCP peer's. Who the client is, identity.py decides.
        self.peer = peer
        self._counts = manager  # aiohttp drops its own reference on connection_lost
        self._deadlines = manager.deadlines
        self._head_started: float | None = None  # a request head is being read since then
        self._line_seen = False  # that head's request line is complete
        self._line_bytes = 0  # that request line's length so far
        self._last_read = 0.0
        self._write_paused_at: float | None = None
        self._payload: StreamReader | None = None  # the body of the last request parsed
        self._body_expired: StreamReader | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- events that start or end a phase --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.peer is None:
            peername = transport.get_extra_info("peername")
            self.peer = str(peername[0]) if isinstance(peername, tuple) else None
        now = self._loop.time()
        self._head_started = self._last_read = now  # the head is due from connect on
        self._arm(now + self._deadlines.header)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # Sent (or failed): nothing reads this request's message, headers or URL, nor the
            # response's headers, again; aiohttp's start() holds both until the next request.
            messages: _MessageQueue = self._messages  # type: ignore[assignment]
            if messages.popped is not None:
                messages.popped.message = None
                messages.popped = None
            request._message = _SPENT
            request._headers = _SPENT.headers
            request._rel_url = _SPENT.url
            request._cache.clear()
            resp.headers.clear()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self._last_read = self._loop.time()
        payload = self._payload
        reading_head = payload is None or payload.is_eof()
        if reading_head and not self._line_seen:
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
                if not payload.is_eof():
                    self._arm(now + self._deadlines.body)
                elif message.upgrade and not self._upgraded:
                    # aiohttp switches only for "websocket": for any other protocol, bytes the
                    # client sends before the 101 would be parsed as HTTP. Keep them for the
                    # tunnel (aiohttp parses them as HTTP after all if the upgrade is refused).
                    self._upgraded = True
            elif self._payload is not None and not self._payload.is_eof():
                # A parse error inside the body being read (a bad chunk size): aiohttp queues
                # it as the next request's error and leaves this body waiting for ever. The
                # body is the one that failed: its reader (the forwarder) must learn it.
                cause = getattr(message, "exc", None) or BadHttpMessage("")
                self._payload.set_exception(MalformedBody(str(cause)))
        elif reading_head and self._head_started is None:
            # Head bytes that did not complete a head: on a kept-alive connection, nginx's
            # client_header_timeout starts here (until then keepalive_timeout applies).
            self._head_started = now
            self._arm(now + self._deadlines.header)

    @property
    def server(self) -> ClientServer:
        return self._counts

    def hand_off(self, protocol: asyncio.BaseProtocol) -> tuple[asyncio.Transport, bytes]:
        """Give this connection to `protocol` (an upgraded one, tunnel.py): from here on aiohttp
        neither reads, writes nor closes it, and its server forgets it, but still counts it
        open until `handed_off_closed()`. The request being handled must have written all of
        its response. Returns the transport and the bytes received after the request head
        (the upgraded protocol's first)."""
        transport = self.transport
        assert transport is not None
        tail, self._message_tail = self._message_tail, b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.keep_alive(False)  # and its keep-alive timer is cancelled (it holds this handler)
        self.transport = None  # aiohttp's end of this request touches the transport no more...
        self._force_close = True  # ...and start() ends after it without closing it
        self._counts.handed_off(self)
        transport.set_protocol(protocol)
        return transport, tail

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
        payload = self._payload
        if payload is not None and not payload.is_eof():
            # The body being received: the current request's, or a pipelined one's.
            if self._body_expired is payload:
                # Told a second ago, and nobody let go of it: cut the connection.
                self.transport.abort()
                return None
            if payload.exception() is None:
                if self._reading_paused:
                    self._last_read = now  # the proxy stopped reading, not the client
                if now - self._last_read >= deadlines.body:
                    return self._expire("body")
                due.append(self._last_read + deadlines.body)
        elif self._head_started is not None and not self._upgraded:
            if self._current_request is not None:
                due.append(now + _RECHECK)  # a pipelined head: due once the response is sent
            elif now - self._head_started >= deadlines.header:
                return self._expire("header")
            else:
                due.append(self._head_started + deadlines.header)
        if due:
            self._timer = self._loop.call_at(min(due), self._check_deadlines)
        return None

    def _expire(self, phase: str) -> None:
        self._counts.client_timeouts[phase] += 1
        log.info("client %s: %s timeout", self.peer, phase)
        assert self.transport is not None
        if phase == "body" and self._payload is not None:
            # Its reader (the forwarder) answers 408, or cuts a response that started, and
            # marks the body finished; if nobody has a second later, the connection is cut.
            self._body_expired = self._payload
            self._payload.set_exception(ClientBodyTimeout())
            self._timer = self._loop.call_later(_RECHECK, self._check_deadlines)
        elif phase == "header" and not self._request_in_progress:
            self._counts.on_rejected(self.peer, 408)
            self.transport.write(_REQUEST_TIMEOUT)
            self.force_close()  # closes the transport once the 408 is written
        else:
            self.transport.abort()  # send: the client reads nothing, so say nothing

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp reads the rest of an unfinished body after the response ("lingering") and
        # logs its failure with a traceback at ERROR; the forwarder already answered it.
        if isinstance(kw.get("exc_info"), ClientBodyError):
            return
        super().log_exception(*args, **kw)


def peer_of(request: web.BaseRequest) -> str | None:
    """The address `request`'s connection came from (DeadlineHandler.peer)."""
    handler = request.protocol
    return handler.peer if isinstance(handler, DeadlineHandler) else request.remote


def body_finished(request: web.BaseRequest) -> None:
    """The forwarder has answered a failed body: the hard cut is not needed."""
    handler = request.protocol
    if isinstance(handler, DeadlineHandler) and handler._body_expired is request.content:
        handler._body_expired = None
