"""Who a request is, for logs and backends: its request ID (request_id) and its W3C trace
context (trace_context, https://www.w3.org/TR/trace-context/).

Decided once per request from the client's headers; the ID is carried in a context variable, so
that every response the proxy prepares for that request, and every log line about it, carry it
without being handed it. Pure but for that variable; knows nothing of aiohttp or routes.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from typing import NamedTuple

from multidict import CIMultiDict, MultiMapping

MAX_ID = 200  # characters of a client's request ID kept (request_id.trust_incoming)
_VISIBLE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID}}}")
# Version 00 exactly, lower-case hex (§3.2.2); all-zero IDs are checked apart.
# Version 00 exactly; a higher version (not ff) is read as 00 where its first fields fit, and
# may carry more after a "-" (§4.3). What goes upstream is version 00.
_TRACEPARENT = re.compile(
    r"(?:00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2}))"
    r"|(?:(?!00|ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?)"
)
_ZERO_TRACE, _ZERO_PARENT = "0" * 32, "0" * 16


class Identity(NamedTuple):
    """What `identify` decided: the headers to send upstream and what the access log shows."""

    header: str  # request_id.header
    request_id: str | None  # None: request_id.header is ""
    traceparent: str | None  # None: trace_context is false
    trace_id: str | None
    keep_tracestate: bool  # the incoming trace was continued, so its tracestate goes on


def identify(
    headers: MultiMapping[str], id_header: str, trust_incoming: bool, trace_context: bool
) -> Identity:
    """The request's ID (the client's when trusted and 1-200 visible ASCII characters, else a
    new one) and its trace (continued from a valid traceparent, else started)."""
    if not (id_header or trace_context):
        return Identity("", None, None, None, False)  # both off: nothing to make
    fresh = _RANDOM.take()
    request_id = None
    if id_header:
        request_id = _incoming_id(headers, id_header) if trust_incoming else None
        if request_id is None:
            request_id = fresh[:32]
    if not trace_context:
        return Identity(id_header, request_id, None, None, False)
    parent_id = fresh[64:]  # the proxy's hop: the upstream's parent (§3.2.2.4)
    incoming = _incoming_trace(headers)
    if incoming is not None:
        trace_id, flags = incoming
        return Identity(id_header, request_id, f"00-{trace_id}-{parent_id}-{flags}", trace_id, True)
    trace_id = fresh[32:64]
    # A new trace: sampled flag off, since nothing here records it (§3.2.2.5).
    return Identity(id_header, request_id, f"00-{trace_id}-{parent_id}-00", trace_id, False)


class _Randomness:
    """All the randomness a request may need (80 hex digits: an ID, a trace ID, a span ID),
    cut from one os.urandom() call made for 1,024 requests at a time: one getrandom() system
    call per request was 3-4% of a proxied request's CPU (bench/profile.py). The bytes are the
    kernel's CSPRNG's either way; a forked child starts a fresh batch, so no two processes
    hand out the same IDs."""

    BATCH = 1024
    _WIDTH = 80  # hex digits a request takes

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def take(self) -> str:
        at = self._at
        if at == len(self._hex):
            self._hex = os.urandom(self.BATCH * self._WIDTH // 2).hex()
            at = 0
        self._at = at + self._WIDTH
        return self._hex[at : at + self._WIDTH]

    def _forget(self) -> None:
        self._hex, self._at = "", 0


_RANDOM = _Randomness()


NO_IDENTITY = Identity("", None, None, None, False)  # a request refused before the handler

# The request this task handles: aiohttp runs each request's handler in a task of its own, so
# the value is the request's until its response is written, and tasks it starts inherit it.
CURRENT: ContextVar[Identity] = ContextVar("request_identity", default=NO_IDENTITY)


def _incoming_id(headers: MultiMapping[str], name: str) -> str | None:
    values = headers.getall(name, ())
    if len(values) != 1 or not _VISIBLE.fullmatch(values[0]):
        return None
    return values[0]


def _incoming_trace(headers: MultiMapping[str]) -> tuple[str, str] | None:
    """(trace-id, flags) of a valid traceparent; None for none, several, or an invalid one
    (§3.2.2: then the receiver starts a new trace)."""
    values = headers.getall("traceparent", ())
    if len(values) != 1:
        return None
    found = _TRACEPARENT.fullmatch(values[0])
    if found is None:
        return None
    trace_id, parent_id, flags = found.group(1, 2, 3) if found[1] else found.group(4, 5, 6)
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return trace_id, flags


def to_upstream(out: CIMultiDict[str], identity: Identity) -> None:
    """Put the request's ID and trace context on the headers going upstream (before a route's
    header rules, which may still change them)."""
    if identity.request_id is not None:
        out[identity.header] = identity.request_id
    if identity.traceparent is not None:
        out["traceparent"] = identity.traceparent
        if not identity.keep_tracestate:
            out.popall("tracestate", None)  # it describes a trace this request is not part of


def stamp(headers: CIMultiDict[str]) -> None:
    """Put the request ID on a response about to be sent (the proxy's own answers too)."""
    identity = CURRENT.get()
    if identity.request_id is not None:
        headers[identity.header] = identity.request_id


class WithRequestId(logging.Filter):
    """Ends every record logged while a request is handled with `request_id=...`."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = CURRENT.get().request_id
        if request_id is not None:
            record.msg = f"{record.getMessage()} request_id={request_id}"
            record.args = ()
        return True


LOG_FILTER = WithRequestId()  # stateless: added once to the "proxy" logger however many servers
