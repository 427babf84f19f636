"""Upstream failures: the one map from an exception to the client's status and the error kind,
and how far an attempt got (which decides whether it may be retried). Knows nothing else."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp


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
UNFORWARDABLE = Failure(502, "protocol", "upstream sent a header that cannot be forwarded")


def classify(exc: BaseException) -> Failure:
    """The one mapping from an upstream exception to a status and an error kind."""
    for exc_type, failure in _FAILURES:
        if isinstance(exc, exc_type):
            return failure
    raise TypeError(f"not an upstream failure: {exc!r}") from exc


CLIENT_ABORT = Failure(499, "client_abort", "client went away")
# routes[].timeouts.total ran out (a deadline of the proxy's, not an aiohttp exception).
TOTAL_TIMEOUT = Failure(504, "timeout", "upstream did not finish within the route's total timeout")


def phase(exc: BaseException) -> str:
    """How far an attempt got before `exc`: what decides whether it may be retried."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"  # no connection: nothing was sent
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "before_response"  # the connection broke before a response arrived
    return ""  # a read timeout or a malformed response: the upstream may have acted on it
