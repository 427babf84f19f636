"""A request without a body, written below ClientSession._request: the upstream's own pool
(its PoolConnector), the request head serialised by aiohttp's own serialiser and written on the
pooled connection, the response read by aiohttp's own ResponseHandler.

Why: `ClientSession._request` builds a ClientRequest and a ClientResponse per request, merges
headers, checks cookies, URL and proxy settings the proxy never uses: measured, a minimal proxy
spends 0.49-0.75x its CPU per request without it (`bench/run.py --targets minimal,minimal-raw`).
What it must keep is what the session did for a GET or HEAD with no body, byte for byte: the
request line (the URL's raw path and query), Host first (the client's value, else the
target's) and the other headers in their order, `Connection: close` when the pool never reuses
connections; the same connection key (the host as written); a response's 1xx skipped (101
excepted), a body without framing read to the upstream's close, the connection released to the
pool at the body's end (closed if it was not read to the end); and the same exceptions, a
connect timeout included (failures.py classifies them, retry.py retries by them). A fresh-eyes
review compared both paths on real sockets; each difference it found is a test in
tests/e2e/test_wire.py. Requests with a body, upgrades and anything else go through the session
(forward.py decides).

Every private aiohttp name used here is checked at start-up (internals.py).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp
from aiohttp import http
from aiohttp.client_reqrep import RequestInfo
from aiohttp.connector import Connection
from aiohttp.hdrs import HOST_ALL
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.balancing import TargetState
from proxy.pool import PoolConnector, key_request

METHODS = frozenset({"GET", "HEAD"})  # what may go this way (with no body, no upgrade)

# The session's defaults (upstream.py's _proxy_session leaves them as aiohttp has them; its
# read_bufsize is aiohttp's DEFAULT_CHUNK_SIZE).
_MAX_LINE, _MAX_FIELD, _MAX_HEADERS = 8190, 8190, 128


def connect_request(target: TargetState) -> aiohttp.ClientRequest:
    """What the connector reads of a request to `target` (its connection key, host, port, TLS
    and SNI): one per target, never sent, made as the session makes its own (ssl=True: the
    connector's context), so both ways share one pool. Made in the running loop."""
    if target.connect_request is None:
        target.connect_request = key_request(
            target.url, target.server_hostname, asyncio.get_running_loop()
        )
    request: aiohttp.ClientRequest = target.connect_request
    return request


class WireResponse:
    """The names of ClientResponse that forward.py, respond.py and upstream.py read (status,
    reason, headers, content, connection, close)."""

    __slots__ = ("connection", "content", "headers", "reason", "status")

    def __init__(
        self,
        message: http.RawResponseMessage,
        content: aiohttp.StreamReader,
        connection: Connection,
    ) -> None:
        self.status = message.code
        self.reason = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self.connection: Connection | None = connection

    def close(self) -> None:
        """Close the connection: it must not be reused (aiohttp's ClientResponse.close)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _request_headers(url: URL, given: CIMultiDict[str], force_close: bool) -> CIMultiDict[str]:
    """The headers as ClientRequest makes them: Host first, the target's unless one is given
    (its value then takes that first place), the others in order; `Connection: close` last
    when the pool never reuses a connection. `given` itself when it is already so, else a new
    multidict: it is never changed, since a retry sends it again."""
    if (
        not force_close
        and next(iter(given), "").lower() == "host"
        and len(given.getall("Host")) == 1
    ):
        return given
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Host"] = url.host_port_subcomponent or ""
    for name, value in given.items():
        if name in HOST_ALL:
            headers[name] = value
        else:
            headers.add(name, value)
    if force_close and "Connection" not in headers:
        headers["Connection"] = "close"
    return headers


# What an attempt's response is: the session's, or this module's with the same names.
UpstreamResponse = aiohttp.ClientResponse | WireResponse


class Request:
    """`async with Request(...) as response`: the attempt's request, sent; its response head,
    read. On leaving, the connection goes back to the pool, or is closed if its response was
    not read to the end (ResponseHandler.should_close), as the session's context does."""

    __slots__ = ("_connection", "_connector", "_headers", "_method", "_target", "_timeout", "_url")

    def __init__(
        self,
        connector: PoolConnector,
        target: TargetState,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._connector = connector
        self._target = target
        self._method = method
        self._url = url
        self._headers = headers
        self._timeout = timeout
        self._connection: Connection | None = None

    async def __aenter__(self) -> WireResponse:
        connector = self._connector
        try:
            connection = await connector.connect(connect_request(self._target), [], self._timeout)
        except TimeoutError as exc:  # timeouts.connect: a connect failure, retried
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {self._url}") from exc
        self._connection = connection
        try:
            return await self._send(connection)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
                raise aiohttp.ClientOSError(*exc.args) from exc  # as the session does
            raise

    async def _send(self, connection: Connection) -> WireResponse:
        protocol = connection.protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        protocol.set_response_params(
            skip_payload=self._method == "HEAD",
            # A body without Content-Length or chunked framing ends when the upstream closes.
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=self._timeout.sock_read,
            read_bufsize=DEFAULT_CHUNK_SIZE,
            timeout_ceil_threshold=self._connector._timeout_ceil_threshold,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
            max_headers=_MAX_HEADERS,
        )
        headers = _request_headers(self._url, self._headers, self._connector.force_close)
        # aiohttp's serialiser: the same bytes, the same refusal of a control character.
        head = _serialize_headers(f"{self._method} {self._url.raw_path_qs} HTTP/1.1", headers)
        protocol.transport.write(head)
        protocol.start_timeout()  # timeouts.read, from here until the headers (as send() does)
        while True:  # ClientResponse.start: 1xx other than 101 are skipped
            try:
                message, payload = await protocol.read()
            except http.HttpProcessingError as exc:
                info = RequestInfo(self._url, self._method, CIMultiDictProxy(headers), self._url)
                raise aiohttp.ClientResponseError(
                    info, (), status=exc.code, message=exc.message, headers=exc.headers
                ) from exc
            if not 100 <= message.code <= 199 or message.code == 101:
                break
        payload.on_eof(connection.release)  # to the pool as soon as its body is in
        return WireResponse(message, payload, connection)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            self._connection.release()  # closed instead if the body was not read to its end
