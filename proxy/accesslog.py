"""The access log: one line per request, JSON or text, written to stdout by a thread.

Owns formatting and writing; the event loop only appends to a queue, so a slow or blocked
stdout never stalls request handling. Knows nothing of aiohttp.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from proxy.exchange import Exchange

MAX_PENDING = 65536  # lines waiting for the writer; past this, lines are dropped and counted
BATCH_DELAY = 0.05  # s the writer waits after a first line, so it wakes ~20 times/s under load


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds; the date-time part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((wall - second) * 1000):03d}Z"


def _quote(text: str | None) -> str:
    """A JSON string; json.dumps only when the text needs escaping (rarely)."""
    if text is None:
        return "null"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def _seconds(value: float | None) -> str:
    return "null" if value is None else f"{value:.6f}"


def _text_value(text: str | None) -> str:
    """`-`, or the text in double quotes (a certificate subject has commas and spaces)."""
    if text is None:
        return "-"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def json_formatter() -> Callable[[Exchange], str]:
    clock = _Clock()

    def as_json(e: Exchange) -> str:
        reused = "null" if e.reused is None else ("true" if e.reused else "false")
        return (
            f'{{"time":"{clock(e.time)}","client":{_quote(e.client)},'
            f'"method":{_quote(e.method)},"target":{_quote(e.target)},"status":{e.status},'
            f'"bytes":{e.bytes_sent},"duration":{e.duration:.6f},'
            f'"upstream_duration":{_seconds(e.upstream_seconds)},'
            f'"pool_wait":{e.pool_wait:.6f},"route":{_quote(e.route)},'
            f'"upstream":{_quote(e.upstream)},"upstream_target":{_quote(e.upstream_target)},'
            f'"reused":{reused},"error":{_quote(e.error)},"bytes_received":{e.bytes_received},'
            f'"client_cert":{_quote(e.client_cert)},'
            f'"request_id":{_quote(e.identity.request_id)},'
            f'"trace_id":{_quote(e.identity.trace_id)}}}'
        )

    return as_json


def text_formatter() -> Callable[[Exchange], str]:
    clock = _Clock()

    def as_text(e: Exchange) -> str:
        upstream_seconds = "-" if e.upstream_seconds is None else f"{e.upstream_seconds:.6f}"
        target = e.target.replace("\\", "\\\\").replace('"', '\\"')
        reused = "-" if e.reused is None else str(e.reused).lower()
        return (
            f'{clock(e.time)} {e.client or "-"} "{e.method} {target}" {e.status} '
            f"{e.bytes_sent} {e.duration:.6f} {upstream_seconds} route={e.route or '-'} "
            f"upstream={e.upstream or '-'} target={e.upstream_target or '-'} reused={reused} "
            f"pool_wait={e.pool_wait:.6f} error={e.error or '-'} received={e.bytes_received}"
            f" client_cert={_text_value(e.client_cert)}"
            f" request_id={_text_value(e.identity.request_id)}"
            f" trace_id={e.identity.trace_id or '-'}"
        )

    return as_text


class AccessLog:
    """Call `start()`, then `write()` from the event loop; `close()` flushes what is queued."""

    def __init__(self, stream: TextIO, format: str) -> None:
        self._stream = stream
        self._format = json_formatter() if format == "json" else text_formatter()
        self._queue: queue.SimpleQueue[Exchange | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self.dropped = 0  # lines lost because the writer fell MAX_PENDING behind

    def start(self) -> None:
        self._thread.start()

    def write(self, exchange: Exchange) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self._queue.put(exchange)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            time.sleep(BATCH_DELAY)
            lines = []
            while item is not None:
                lines.append(self._format(item))
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            if item is None:
                return
