"""When a failed attempt is made again, on another target, and the budget that bounds retries.

Pure decisions, after RFC 9110 §9.2.2 (a proxy must not retry a non-idempotent request on its
own) and Envoy's retry budget; knows nothing of aiohttp.
"""

from __future__ import annotations

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MIN_RETRIES_IN_FLIGHT = 3  # the budget always allows this many retries at once (as Envoy's)


def retry_reason(phase: str, method: str, has_body: bool, reused: bool | None) -> str | None:
    """Why this failed attempt may be retried, or None if it must not be.

    `phase` is "connect" when no connection was made (nothing was sent, so any method may go
    again) or "before_response" when the connection failed before any response arrived (only
    an idempotent request with no body to replay). Anything later is never retried.
    """
    if phase == "connect":
        return "connect"
    if phase == "before_response" and method in IDEMPOTENT and not has_body:
        # A reused connection that the upstream had closed: the stale keep-alive race.
        return "stale" if reused else "reset"
    return None


def within_budget(
    reason: str, retries_in_flight: int, requests_in_flight: int, budget: float
) -> bool:
    """Retries in flight stay under `budget` times the requests in flight (but at least
    MIN_RETRIES_IN_FLIGHT are allowed), so a failing upstream sees that much extra load at most.

    A "stale" retry is outside the budget: the upstream never saw the first attempt (it had
    closed that idle connection), so the retry, on a fresh connection, adds no load, and says
    nothing about the upstream's health. Many idle connections go stale at once, and each of
    their requests must still succeed.
    """
    if reason == "stale":
        return True
    return retries_in_flight < max(MIN_RETRIES_IN_FLIGHT, budget * requests_in_flight)
