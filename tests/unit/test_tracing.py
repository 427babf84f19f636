"""Request IDs and W3C trace context (https://www.w3.org/TR/trace-context/): kept, continued,
replaced or started, decided from the client's headers alone."""

from __future__ import annotations

import logging
import os
import re

import pytest
from multidict import CIMultiDict

from proxy.tracing import CURRENT, LOG_FILTER, _Randomness, identify, to_upstream

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
HEX = re.compile(r"[0-9a-f]+")


def decide(*headers: tuple[str, str], trust: bool = True, trace: bool = True):
    return identify(CIMultiDict(headers), "X-Request-Id", trust, trace)


@pytest.mark.parametrize("value", ["abc", "x" * 200, "!~", "a-b_c.d:e/f=g"])
def test_a_trusted_visible_ascii_id_is_kept(value):
    assert decide(("x-request-id", value)).request_id == value


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("X-Request-Id", "")],
        [("X-Request-Id", "x" * 201)],
        [("X-Request-Id", "has space")],
        [("X-Request-Id", "caf\u00e9")],
        [("X-Request-Id", "a"), ("X-Request-Id", "b")],
    ],
)
def test_a_missing_invalid_or_repeated_id_is_replaced(headers):
    request_id = decide(*headers).request_id
    assert request_id is not None and len(request_id) == 32 and HEX.fullmatch(request_id)


def test_an_untrusted_id_is_replaced_and_every_new_id_differs():
    ids = {decide(("X-Request-Id", "mine"), trust=False).request_id for _ in range(100)}
    assert len(ids) == 100 and "mine" not in ids


def test_ids_stay_unique_across_batches_of_randomness_and_in_a_forked_child():
    made = [decide() for _ in range(3 * _Randomness.BATCH + 7)]
    values = [v for i in made for v in (i.request_id, i.trace_id, i.traceparent.split("-")[2])]
    assert len(set(values)) == len(values)
    assert all(HEX.fullmatch(v) for v in values)
    # A child forked mid-batch must not hand out what its parent will (register_at_fork).
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit code is checked below
        os.close(read)
        os.write(write, decide().request_id.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        from_child = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    assert len(from_child) == 32 and from_child != decide().request_id


def test_request_id_off():
    identity = identify(CIMultiDict({"X-Request-Id": "x"}), "", True, True)
    assert identity.request_id is None
    out = CIMultiDict({"X-Request-Id": "x"})
    to_upstream(out, identity)
    assert out["X-Request-Id"] == "x"  # passes through untouched


def test_a_valid_traceparent_is_continued_with_a_new_parent_id_and_its_flags():
    identity = decide(("traceparent", f"00-{TRACE}-{PARENT}-01"))
    version, trace, parent, flags = identity.traceparent.split("-")
    assert (version, trace, flags, identity.trace_id) == ("00", TRACE, "01", TRACE)
    assert parent != PARENT and len(parent) == 16 and HEX.fullmatch(parent)
    out = CIMultiDict([("traceparent", "old"), ("tracestate", "a=1"), ("tracestate", "b=2")])
    to_upstream(out, identity)
    assert out.getall("traceparent") == [identity.traceparent]
    assert out.getall("tracestate") == ["a=1", "b=2"]


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper case
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace-id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent-id
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE}-{PARENT}-01-extra",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        "",
    ],
)
def test_an_invalid_traceparent_starts_a_new_unsampled_trace_without_tracestate(value):
    identity = decide(("traceparent", value))
    version, trace, parent, flags = identity.traceparent.split("-")
    assert (version, flags) == ("00", "00")
    assert trace != TRACE and len(trace) == 32 and HEX.fullmatch(trace)
    assert len(parent) == 16 and identity.trace_id == trace
    out = CIMultiDict([("traceparent", value), ("tracestate", "a=1")])
    to_upstream(out, identity)
    assert out.getall("traceparent") == [identity.traceparent] and "tracestate" not in out


def test_two_traceparent_headers_are_invalid():
    valid = f"00-{TRACE}-{PARENT}-01"
    assert decide(("traceparent", valid), ("traceparent", valid)).trace_id != TRACE


def test_trace_context_off_leaves_both_headers_alone():
    identity = decide(("traceparent", "garbage"), trace=False)
    assert identity.traceparent is None and identity.trace_id is None
    out = CIMultiDict([("traceparent", "garbage"), ("tracestate", "a=1")])
    to_upstream(out, identity)
    assert out.getall("traceparent") == ["garbage"] and out.getall("tracestate") == ["a=1"]


def test_log_lines_during_a_request_end_with_its_id():
    record = logging.LogRecord("proxy", logging.WARNING, "", 0, "%s failed (%d%%)", ("x", 5), None)
    token = CURRENT.set(decide(("X-Request-Id", "req-1")))
    try:
        LOG_FILTER.filter(record)
    finally:
        CURRENT.reset(token)
    assert record.getMessage() == "x failed (5%) request_id=req-1"
    outside = logging.LogRecord("proxy", logging.INFO, "", 0, "plain", (), None)
    LOG_FILTER.filter(outside)
    assert outside.getMessage() == "plain"


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        (f"00-{TRACE}-{PARENT}-01", True),
        (f"01-{TRACE}-{PARENT}-01", True),  # a higher version, read as 00 (§4.3)
        (f"01-{TRACE}-{PARENT}-01-more", True),
        (f"00-{TRACE}-{PARENT}-01-more", False),  # version 00 has nothing after the flags
        (f"ff-{TRACE}-{PARENT}-01", False),
        (f"01-{TRACE}-{PARENT}-01x", False),
    ],
)
def test_higher_traceparent_versions_are_read_as_00(traceparent, continued):
    identity = identify(CIMultiDict(traceparent=traceparent), "X-Request-Id", True, True)
    assert (identity.trace_id == TRACE) is continued
    assert identity.traceparent is not None and identity.traceparent.startswith("00-")
