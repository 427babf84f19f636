from __future__ import annotations

import pytest

from proxy.retry import retry_reason, within_budget


@pytest.mark.parametrize(
    ("phase", "method", "has_body", "reused", "expected"),
    [
        ("connect", "POST", True, None, "connect"),  # nothing was sent: any method
        ("connect", "GET", False, None, "connect"),
        ("before_response", "GET", False, True, "stale"),
        ("before_response", "GET", False, False, "reset"),
        ("before_response", "PUT", False, True, "stale"),
        ("before_response", "DELETE", False, False, "reset"),
        ("before_response", "POST", False, True, None),  # RFC 9110 §9.2.2: never replay a POST
        ("before_response", "PATCH", False, True, None),
        ("before_response", "PUT", True, True, None),  # its body was streamed: not replayable
        ("", "GET", False, True, None),  # read timeout, malformed response
    ],
)
def test_only_safe_attempts_are_retried(phase, method, has_body, reused, expected):
    assert retry_reason(phase, method, has_body, reused) == expected


@pytest.mark.parametrize(
    ("reason", "retries", "requests", "budget", "allowed"),
    [
        ("connect", 0, 1, 0.2, True),
        ("connect", 2, 1, 0.2, True),  # at least 3 retries in flight are always allowed
        ("connect", 3, 10, 0.2, False),
        ("reset", 19, 100, 0.2, True),
        ("reset", 20, 100, 0.2, False),
        ("connect", 0, 100, 0.0, True),
        ("stale", 50, 50, 0.0, True),  # the upstream never saw the first attempt
    ],
)
def test_retry_budget(reason, retries, requests, budget, allowed):
    assert within_budget(reason, retries, requests, budget) is allowed
