"""Byte-level peers for the security suite: a backend that records every byte of every upstream
connection, strict HTTP/1.1 parsers for what the proxy sends either way, and the matcher that
compares a connection's bytes with the requests it should have carried.

Strict on purpose: RFC 9112 grammar only (CRLF line ends, token names, no whitespace before the
colon, no CTL in values, exactly one framing), so anything a lenient peer might read two ways
fails here. Nothing here mocks aiohttp; everything talks over 127.0.0.1 sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field

HOST = "x.test"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")  # field-vchar, SP, HTAB; no CTL (RFC 9110 §5.5)
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.1\Z")
# RFC 9112 §2.3 says a server SHOULD answer "HTTP/1.1" even to HTTP/1.0; aiohttp answers 1.0.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ([\t\x20-\x7e\x80-\xff]*)\Z")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")  # what a sane sender writes: no ext, no sign


class Malformed(Exception):
    """The bytes are not one strictly well-formed HTTP/1.1 message."""


class Incomplete(Exception):
    """The bytes end before the message does."""


@dataclass
class Message:
    start: bytes  # the request or status line
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes  # every byte of the message as it was on the wire

    def all(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower().encode()]


def _head(data: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int]:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        if b"\n" in data[pos:].replace(b"\r\n", b""):
            raise Malformed(f"bare LF in a head: {data[pos : pos + 200]!r}")
        raise Incomplete
    start, *lines = data[pos:end].split(b"\r\n")
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise Malformed(f"bad header line {line!r}")
        if not _VALUE.match(value):
            raise Malformed(f"CTL (CR, LF, NUL...) in the value of {line!r}")
        headers.append((name, value.strip(b" \t")))
    if b"\r" in start or b"\n" in start:
        raise Malformed(f"bare CR or LF in the start line {start!r}")
    return start, headers, end + 4


def _chunked(data: bytes, pos: int) -> tuple[bytes, int]:
    body = b""
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise Incomplete
        size_line = data[pos:end]
        if not _CHUNK_SIZE.match(size_line):
            raise Malformed(f"bad chunk size line {size_line!r}")
        size = int(size_line, 16)
        pos = end + 2
        if size == 0:
            # No trailer fields: neither aiohttp nor this suite's backend sends any.
            if len(data) < pos + 2:
                raise Incomplete
            if data[pos : pos + 2] != b"\r\n":
                raise Malformed(f"bytes after the last chunk: {data[pos : pos + 40]!r}")
            return body, pos + 2
        if len(data) < pos + size + 2:
            raise Incomplete
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        body += data[pos : pos + size]
        pos += size + 2


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """("chunked", 0), ("length", n) or ("none", 0); Malformed for anything ambiguous."""
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    codings = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    if lengths and codings:
        raise Malformed("both Content-Length and Transfer-Encoding")
    if codings:
        if codings != [b"chunked"]:
            raise Malformed(f"Transfer-Encoding {codings!r}, not one 'chunked'")
        return "chunked", 0
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
            raise Malformed(f"Content-Length {lengths!r}, not one decimal")
        return "length", int(lengths[0])
    return "none", 0


def _body(data: bytes, pos: int, framing: tuple[str, int]) -> tuple[bytes, int]:
    kind, length = framing
    if kind == "chunked":
        return _chunked(data, pos)
    if len(data) < pos + length:
        raise Incomplete
    return data[pos : pos + length], pos + length


def parse_request(data: bytes, pos: int = 0) -> tuple[Message, int]:
    """One strictly well-formed request from data[pos:] and where it ends."""
    start, headers, body_at = _head(data, pos)
    if not _REQUEST_LINE.match(start):
        raise Malformed(f"bad request line {start!r}")
    body, end = _body(data, body_at, _framing(headers))
    return Message(start, headers, body, data[pos:end]), end


@dataclass
class Answers:
    """What one client connection received: the final responses parsed strictly, in order."""

    responses: list[Message]
    closed: bool  # the proxy closed the connection (EOF or reset)
    error: str | None  # set if the bytes were not well-formed responses
    raw: bytes

    @property
    def statuses(self) -> list[int]:
        return [status(r) for r in self.responses]

    def __str__(self) -> str:
        state = "closed" if self.closed else "open"
        problem = f", MALFORMED: {self.error}" if self.error else ""
        return f"statuses {self.statuses} ({state}{problem}); bytes {self.raw[:600]!r}"


def status(response: Message) -> int:
    return int(response.start[9:12])


def parse_responses(data: bytes, closed: bool, methods: list[str] | None = None) -> Answers:
    """Every response in `data`; `methods[i]` is the method of the i-th request (HEAD: no body)."""
    responses: list[Message] = []
    pos = 0
    error = None
    try:
        while pos < len(data):
            start, headers, body_at = _head(data, pos)
            match = _STATUS_LINE.match(start)
            if not match:
                raise Malformed(f"bad status line {start!r}")
            code = int(match[1])
            if code < 100 or code > 599:
                raise Malformed(f"status {code} outside 100..599")
            method = (methods or [])[len(responses)] if len(responses) < len(methods or []) else ""
            framing = _framing(headers)
            if code < 200 or code in (204, 304) or method == "HEAD":
                body, end = b"", body_at
            elif framing[0] == "none":
                if not closed:
                    raise Incomplete
                body, end = data[body_at:], len(data)  # read until close (RFC 9112 §6.3)
            else:
                body, end = _body(data, body_at, framing)
            if code >= 200:  # 1xx are interim: the final response follows
                responses.append(Message(start, headers, body, data[pos:end]))
            pos = end
    except Malformed as exc:
        error = str(exc)
    except Incomplete:
        error = f"incomplete response at byte {pos}" if closed or pos < len(data) else None
    return Answers(responses, closed, error, data)


async def converse(
    port: int,
    raw: bytes,
    methods: list[str] | None = None,
    *,
    quiet: float = 0.4,
    expect: int | None = None,
    linger: float = 0.1,
) -> Answers:
    """Send `raw` on a new connection to the proxy and collect what comes back: until the
    proxy closes, or falls quiet for `quiet` seconds, or (with `expect`) that many final
    responses have arrived and nothing more comes for `linger` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data, closed = b"", False
        deadline = time.monotonic() + 5.0
        while (left := deadline - time.monotonic()) > 0:
            answers = parse_responses(data, closed, methods)
            enough = expect is not None and len(answers.responses) >= expect
            try:
                chunk = await asyncio.wait_for(
                    reader.read(65536), min(linger if enough else quiet, left)
                )
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
        return parse_responses(data, closed, methods)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- the recording backend ---


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def naming(request: Message) -> bytes:
    """The default answer: a 200 whose body names the request, "GET /path"."""
    method, target, _ = request.start.split(b" ")
    return answer(method + b" " + target)


@dataclass
class Reply:
    """What the backend writes for one request: `now`, then `later` after `delay` seconds
    (on a connection that is by then idle in the proxy's pool)."""

    now: bytes
    later: bytes = b""
    delay: float = 0.3


@dataclass(repr=False)
class RecordingBackend:
    """An HTTP/1.1 backend on 127.0.0.1:0 that keeps every byte each connection delivered.

    It answers each strictly parsed request with `replies[target]` if set, else with `naming`.
    A request it cannot parse is noted in `malformed`, answered 400, and its connection closed.
    """

    replies: dict[str, Reply] = field(default_factory=dict)
    connections: list[bytearray] = field(default_factory=list)
    requests: list[Message] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __repr__(self) -> str:  # short: Hypothesis prints the fixture with a failing example
        return f"<RecordingBackend: {len(self.connections)} connections>"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> RecordingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.server.wait_closed()

    async def settle(self, count: int, *, within: float = 2.0, quiet: float = 0.1) -> None:
        """Wait (bounded) until `count` requests have arrived, then a little longer for strays."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.requests) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        await asyncio.sleep(quiet)

    def received(self) -> list[bytes]:
        """The bytes of each connection that carried any, in the order they were accepted.
        (A connection opened and closed without a byte carried nothing to compare.)"""
        return [bytes(c) for c in self.connections if c]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        seen = bytearray()
        self.connections.append(seen)
        pos = 0
        try:
            while chunk := await reader.read(65536):
                seen += chunk
                while True:
                    try:
                        request, pos = parse_request(bytes(seen), pos)
                    except Incomplete:
                        break
                    except Malformed as exc:
                        self.malformed.append(str(exc))
                        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        return
                    self.requests.append(request)
                    self._arrived.set()
                    self._reply(request, writer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _reply(self, request: Message, writer: asyncio.StreamWriter) -> None:
        target = request.start.split(b" ")[1].decode("latin-1")
        reply = self.replies.get(target)
        if reply is None:
            writer.write(naming(request))
            return
        writer.write(reply.now)
        if reply.later:
            asyncio.get_running_loop().call_later(reply.delay, _write_if_open, writer, reply.later)


def _write_if_open(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


# --- what a connection should have carried ---

_FRAMING = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True)
class Forwarded:
    """A request as the proxy should forward it: the client's end-to-end headers in order, then
    the proxy's X-Forwarded-*; the body framed however the proxy chooses."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = (("Host", HOST),)
    body: bytes = b""

    def head_lines(self) -> list[bytes]:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        lines += [
            "X-Forwarded-For: 127.0.0.1",
            "X-Forwarded-Proto: http",
            f"X-Forwarded-Host: {HOST}",
        ]
        return [line.encode("latin-1") for line in lines]

    @property
    def answer(self) -> bytes:
        return f"{self.method} {self.target}".encode("latin-1")


def fwd(method: str, target: str, *headers: tuple[str, str], body: bytes = b"") -> Forwarded:
    return Forwarded(method, target, (("Host", HOST), *headers), body)


def mismatch(data: bytes, expected: list[Forwarded]) -> str | None:
    """Why one connection's bytes are not exactly `expected`, or None if they are.

    Exact except for the body's framing, which is the proxy's choice: the framing header line
    (one `Content-Length: N`, or `Transfer-Encoding: chunked` with strict chunks) is checked on
    its own and every other head line must match byte for byte, in order. A body-less request
    has no framing line (or `Content-Length: 0`). No byte may follow the last request.
    """
    pos = 0
    for number, want in enumerate(expected):
        where = f"request {number} ({want.method} {want.target})"
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return f"{where}: no complete head at byte {pos}"
        lines = data[pos:end].split(b"\r\n")
        framing = [ln for ln in lines if ln.partition(b":")[0].strip().lower() in _FRAMING]
        rest = [ln for ln in lines if ln not in framing]
        if rest != want.head_lines():
            return f"{where}: head lines {rest!r} != {want.head_lines()!r}"
        pos = end + 4
        if framing == [b"Transfer-Encoding: chunked"]:
            try:
                body, pos = _chunked(data, pos)
            except (Malformed, Incomplete) as exc:
                return f"{where}: bad chunked body: {exc!r}"
        elif len(framing) == 1 and re.fullmatch(rb"Content-Length: (0|[1-9]\d*)", framing[0]):
            length = int(framing[0].split(b": ")[1])
            body = data[pos : pos + length]
            pos += length
        elif framing:
            return f"{where}: framing lines {framing!r}"
        else:
            body = b""
        if body != want.body:
            return f"{where}: body {body!r} != {want.body!r}"
    if pos != len(data):
        return f"{len(data) - pos} bytes after the last expected request: {data[pos:]!r}"
    return None


def backend_mismatch(backend: RecordingBackend, expected: list[list[Forwarded]]) -> str | None:
    """Why the backend's connections did not carry exactly `expected`, connection by connection."""
    received = backend.received()
    if len(received) != len(expected):
        return f"{len(received)} upstream connections carried bytes, expected {len(expected)}"
    for number, (data, want) in enumerate(zip(received, expected, strict=True)):
        problem = mismatch(data, want)
        if problem is not None:
            return f"upstream connection {number}: {problem}"
    return None


def describe(backend: RecordingBackend) -> str:
    parts = [f"  conn {i}: {data!r}" for i, data in enumerate(backend.received())]
    return "upstream bytes:\n" + ("\n".join(parts) or "  (none)")
