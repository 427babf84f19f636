"""The client-facing HTTP/1.1 server: aiohttp's low-level server, with three behaviours changed.

1. Malformed requests get a short 400 (431 for oversized headers) and an INFO log line, where
   aiohttp answers 400 to everything, echoes the offending bytes and logs a traceback at ERROR.
2. A typo in the handler's keyword arguments raises, where aiohttp would drop *all* of them
   silently (auto_decompress=False among them) and log a warning per connection.
3. `ForwardedResponse` keeps the upstream's headers as they were: aiohttp would add `Server` and
   `Content-Type: application/octet-stream` when the upstream sent none, and drop the
   `Content-Length` of a 304. It also sends its headers with the first body bytes.

Everything here leans on aiohttp internals (`Server._kwargs`, `Server._loop`,
`RequestHandler.handle_error`, `StreamResponse._prepare_headers` and
`_send_headers_immediately`), checked against aiohttp
3.14.5; tests/e2e/test_transparency.py and tests/e2e/test_client_errors.py fail if they move.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("proxy")


def plain_response(status: int, detail: str = "") -> web.Response:
    """A response the proxy makes itself: status line and one sentence, in plain text."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n" if detail else f"{status} {phrase}\n"
    return web.Response(status=status, text=body, content_type="text/plain")


def _is_oversized_header(exc: BaseException) -> bool:
    # aiohttp's parser raises LineTooLong for a long header line (and, alas, for a long
    # request-target too: it cannot tell us which) and BadHttpMessage for too many headers.
    if isinstance(exc, LineTooLong):
        return True
    return isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message


class _ProxyRequestHandler(RequestHandler):
    on_rejected: Callable[[str | None, int], None] = staticmethod(lambda client, status: None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status = 431 if _is_oversized_header(exc) else 400
        log.info("rejected malformed request from %s: %s", request.remote, exc.message)
        self.on_rejected(request.remote, status)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        response = plain_response(status, "malformed request")
        response.force_close()  # the parser's position in the byte stream is unknowable now
        return response


class ProxyHTTPServer(web.Server):
    """aiohttp's low-level server, minus its kwarg-dropping fallback (see module docstring).

    `on_rejected(client, status)` is told of each request refused before it reached a handler.
    """

    on_rejected: Callable[[str | None, int], None] | None = None

    def __call__(self) -> RequestHandler:
        handler = _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        if self.on_rejected is not None:
            handler.on_rejected = self.on_rejected
        return handler


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


def handler_kwargs(keepalive_timeout: float) -> dict[str, Any]:
    """RequestHandler arguments for the data plane (each one checked by a test)."""
    return {
        "keepalive_timeout": keepalive_timeout,
        # Forward compressed uploads as they came (aiohttp would gunzip them, notes §0.1).
        "auto_decompress": False,
        "access_log": None,
    }
