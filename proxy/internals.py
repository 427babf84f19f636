"""Every private aiohttp name the proxy leans on, in one table, checked once at start-up.

listener.py, deadlines.py, pool.py and wire.py override or read these (each says why). A release
that renames one would otherwise fail silently: a pool gauge stuck at zero, aiohttp's hidden
retry back on, a deadline that never fires, a tunnel that aiohttp closes under the relay.
Checked against aiohttp 3.14.5 (pyproject pins ~=3.14.0). Knows nothing else.
"""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
from aiohttp import helpers, http_writer, web
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector, Connection
from aiohttp.web_protocol import RequestHandler

# (what, where to look, the names that must be there). Slots and methods are class attributes;
# attributes set in __init__ are looked up on an instance made for the check.
_CLASS_NAMES: tuple[tuple[str, type, tuple[str, ...]], ...] = (
    ("BaseConnector", BaseConnector,
     ("_wait_for_available_connection", "_get", "_release", "_release_acquired", "_cleanup")),
    ("TCPConnector", aiohttp.TCPConnector, ("_create_connection",)),
    ("ClientRequest", aiohttp.ClientRequest, ("connection_key",)),
    ("RequestHandler", RequestHandler,
     ("handle_error", "finish_response", "data_received", "pause_writing", "resume_writing",
      "_current_request", "_request_in_progress", "_waiter", "_request_count", "_messages",
      "_reading_paused", "_keepalive_timeout", "_loop", "_message_tail", "_force_close")),
    ("ResponseHandler", ResponseHandler, ("_drop_timeout",)),
    ("StreamResponse", web.StreamResponse,
     ("_prepare_headers", "_send_headers_immediately", "_req", "_payload_writer", "_eof_sent",
      "_keep_alive")),
    ("BaseSite", web.BaseSite, ("_server", "_runner", "_backlog", "_ssl_context")),
)  # fmt: skip
_INSTANCE_NAMES = {
    "TCPConnector": (
        "_factory",
        "_acquired",
        "_acquired_per_host",
        "_conns",
        "_loop",
        "_keepalive_timeout",
        "_timeout_ceil_threshold",  # wire.py: the session's read timeout rounding
    ),
    "ClientSession": ("_retry_connection",),
    "ResponseHandler": ("_buffer", "_tail", "_should_close"),
    "Connection": ("_protocol", "_key", "_connector"),
    "web.Server": ("_kwargs", "_loop"),
}


class AiohttpMoved(RuntimeError):
    """An aiohttp internal the proxy relies on is not where it was."""


async def check_aiohttp(
    class_names: tuple[tuple[str, type, tuple[str, ...]], ...] = _CLASS_NAMES,
) -> None:
    """Raise AiohttpMoved naming every missing internal and the aiohttp version."""
    missing = [
        f"{owner}.{name}"
        for owner, cls, names in class_names
        for name in names
        if not hasattr(cls, name)
    ]
    connector = aiohttp.TCPConnector()
    session = aiohttp.ClientSession(connector=connector)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()  # pragma: no cover - never called

    protocol = ResponseHandler(asyncio.get_running_loop())
    instances = {
        "Connection": Connection(connector, None, None, asyncio.get_running_loop()),  # type: ignore[arg-type]
        "TCPConnector": connector,
        "ClientSession": session,
        "ResponseHandler": protocol,
        "web.Server": web.Server(handler),
    }
    # wire.py writes a request head as ClientRequest.send does, with aiohttp's serialiser.
    if not callable(getattr(http_writer, "_serialize_headers", None)):
        missing.append("http_writer._serialize_headers")
    # deadlines.py lets an answered request's state go (BaseRequest lists its attributes);
    # listener.py's ForwardedResponse writes its head on the request's _payload_writer.
    missing += [
        f"BaseRequest.{name}"
        for name in ("_message", "_headers", "_rel_url", "_cache", "_payload_writer")
        if name not in web.BaseRequest.ATTRS
    ]
    # ForwardedResponse decides its head with aiohttp's own rules, and is made around the
    # header multidict respond.py built (no copy).
    missing += [
        f"helpers.{name}"
        for name in ("must_be_empty_body", "should_remove_content_length", "rfc822_formatted_time")
        if not callable(getattr(helpers, name, None))
    ]
    if "_real_headers" not in inspect.signature(web.StreamResponse).parameters:
        missing.append("StreamResponse(_real_headers=)")
    try:
        missing += [
            f"{owner}.{name}"
            for owner, names in _INSTANCE_NAMES.items()
            for name in names
            if not hasattr(instances[owner], name)
        ]
    finally:
        await session.close()
    if missing:
        raise AiohttpMoved(
            f"aiohttp {aiohttp.__version__} lacks {', '.join(missing)}, which this proxy was "
            "built against (aiohttp 3.14.5): install aiohttp~=3.14.0 as pyproject.toml says"
        )
