"""Mutated requests never break the proxy: every answer is a well-formed response with a final
status in 200..599 and never 500, or the connection is closed; nothing is logged at ERROR or
with a traceback; the backend only ever receives well-formed requests, no more of them than the
client was answered for; and a plain GET on a new connection is served right after.

How it runs: one backend and one proxy per test (not per example), and the examples run inside
that test's event loop. The tests are `async def` functions decorated with `@given`:
pytest-asyncio (which pytest-aiohttp's asyncio_mode=auto runs on) recognises a Hypothesis test
and drives each example as a coroutine on the test's own loop, so the proxy and backend
fixtures, started once, serve every example and are torn down once. No thread, no second
loop, no `asyncio.run` (which would fight the fixture loop and trip filterwarnings=error).
Sharing function-scoped fixtures across examples is the point here, so that health check is
suppressed; each example clears `caplog` and checks only its own records.

Deterministic and bounded for CI: `derandomize=True` and `database=None` give the same examples
on every run, `max_examples` keeps each test to ~10-20 s, and shrinking is off (a shrink could
run past the 60 s per-test timeout). To shrink a failure to its smallest form locally, run with
FUZZ_SHRINK=1; the failing example is printed either way.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tests.security.wire import HOST, Answers, converse, status
from tests.support import config_dict, upstream

PHASES = (Phase.explicit, Phase.generate) + (
    (Phase.shrink,) if os.environ.get("FUZZ_SHRINK") else ()
)
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "70")),
    deadline=None,
    derandomize=True,
    database=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

H = f"Host: {HOST}\r\n"
BODYLESS = [
    f"GET /g HTTP/1.1\r\n{H}\r\n".encode(),
    f"GET /g?q=1 HTTP/1.1\r\n{H}Connection: close\r\nX-A: b\r\n\r\n".encode(),
    f"GET /g HTTP/1.0\r\n{H}Connection: keep-alive\r\n\r\n".encode(),
    f"DELETE /d HTTP/1.1\r\n{H}Accept: */*\r\n\r\n".encode(),
]
LENGTH = [
    f"POST /p HTTP/1.1\r\n{H}Content-Length: 5\r\n\r\nhello".encode(),
    f"PUT /p HTTP/1.1\r\n{H}Content-Length: 11\r\nConnection: close\r\n\r\nhello world".encode(),
    f"POST /p HTTP/1.0\r\n{H}Connection: keep-alive\r\nContent-Length: 2\r\n\r\nhi".encode(),
]
CHUNKED = [
    f"POST /c HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
    (
        f"POST /c HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "3;x=y\r\nabc\r\na\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"
    ).encode(),
]

# Bytes that change how a request is framed or read when they land in the wrong place.
SPECIAL = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x0b", b"\x7f", b"\xff"]
NUMBERS = [
    b"99999999999999999999",
    b"18446744073709551616",
    b"ffffffffffffffffff",
    b"-1",
    b"+5",
    b"0x5",
    b"0",
    b"5, 5",
    b"1e3",
]
HEADERS = [
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Content-Length: 0",
    b"Content-Length: 3",
    b"Content-Length: 5",
    b"Connection: close",
    b"Expect: 100-continue",
    b" folded",
    b"Host: other.test",
]


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One mutation of `data`, chosen and placed by Hypothesis."""
    kind = draw(
        st.sampled_from(
            ["flip", "insert", "delete", "truncate", "duplicate", "case", "number", "header"]
        )
    )
    size = len(data)
    if size == 0:
        return data
    at = draw(st.integers(0, size - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + draw(st.sampled_from(SPECIAL)) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + draw(st.integers(1, 3)) :]
    if kind == "truncate":
        return data[:at]
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if kind == "duplicate" and len(lines) > 1:
        line = draw(st.integers(1, len(lines) - 1))
        lines.insert(draw(st.integers(1, len(lines))), lines[line])
        return b"\r\n".join(lines) + sep + body
    if kind == "case":
        end = min(size, at + draw(st.integers(1, 20)))
        change = draw(st.sampled_from([bytes.upper, bytes.lower, bytes.swapcase]))
        return data[:at] + change(data[at:end]) + data[end:]
    if kind == "number":
        runs = list(re.finditer(rb"[0-9a-fA-F]+", data))
        run = draw(st.sampled_from(runs)) if runs else None
        if run is not None:
            return data[: run.start()] + draw(st.sampled_from(NUMBERS)) + data[run.end() :]
    if kind == "header":
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from(HEADERS)))
        return b"\r\n".join(lines) + sep + body
    return data


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    data = draw(st.sampled_from(bases))
    for _ in range(draw(st.integers(1, 4))):
        data = draw(mutation(data))
    return data


WATCHED = ("proxy", "aiohttp", "asyncio")


@pytest.fixture
async def served(recorder, proxy):
    origin = await recorder()
    server = await proxy(config_dict({"app": upstream(origin.url)}))
    return origin, server.proxy_address[1]


async def check_example(served, caplog, raw: bytes) -> None:
    origin, port = served
    caplog.clear()
    forwarded_before = len(origin.requests)
    answers = await converse(port, raw, quiet=0.25, expect=1, linger=0.15)
    await origin.settle(0, quiet=0.02)
    forwarded = len(origin.requests) - forwarded_before
    sanity = await converse(port, f"GET /sanity HTTP/1.1\r\n{H}\r\n".encode(), expect=1)

    # Seen with --hypothesis-show-statistics: what the examples reached.
    event(f"statuses {answers.statuses}, {'closed' if answers.closed else 'open'}")
    report = f"sent {raw!r}\ngot {answers}"
    assert answers.error is None, report
    assert all(200 <= s <= 599 for s in answers.statuses), report
    assert 500 not in answers.statuses, report
    logged = [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name.split(".")[0] in WATCHED and (r.levelno >= logging.ERROR or r.exc_info)
    ]
    assert logged == [], report
    assert origin.malformed == [], f"the proxy forwarded a malformed request\n{report}"
    # Each forwarded request is answered before the next is read: one more than the client
    # was answered for can be in flight when it hangs up; any more were smuggled.
    assert forwarded <= len(answers.responses) + 1, report
    assert _served(sanity), f"the proxy stopped serving: {sanity}\nafter {report}"


def _served(answers: Answers) -> bool:
    return [(status(r), r.body) for r in answers.responses] == [(200, b"GET /sanity")]


@FUZZ
@given(raw=mutated(BODYLESS))
async def test_mutated_bodyless_requests_get_well_formed_answers(served, caplog, raw):
    await check_example(served, caplog, raw)


@FUZZ
@given(raw=mutated(LENGTH))
async def test_mutated_content_length_requests_get_well_formed_answers(served, caplog, raw):
    await check_example(served, caplog, raw)


@FUZZ
@given(raw=mutated(CHUNKED))
async def test_mutated_chunked_requests_get_well_formed_answers(served, caplog, raw):
    await check_example(served, caplog, raw)
