"""`Exchange`: one request as the proxy handled it. The hot path fills it in; metrics and the
access log read it once it is finished. Knows nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.tracing import NO_IDENTITY, Identity

if TYPE_CHECKING:
    from proxy.policy import HeaderEdits


@dataclass(slots=True)
class Exchange:
    """One request as the proxy handled it, filled in as it goes and observed once at the end
    (metrics and the access log read it; this module knows neither)."""

    time: float  # wall clock at arrival, for the log
    started: float  # perf_counter at arrival
    client: str | None  # who the client is (identity.py): logged, sent as X-Forwarded-For
    method: str
    target: str  # the raw request-target as received
    route: str = ""  # "" when no route matched
    upstream: str = ""
    upstream_target: str = ""
    status: int = 0  # what the client got; 499 when it went away first
    bytes_sent: int = 0  # response body bytes
    duration: float = 0.0
    upstream_seconds: float | None = None  # to the upstream's response headers
    pool_wait: float = 0.0  # seconds spent waiting for a pool slot
    error: str | None = None  # the `kind` of proxy_upstream_errors_total
    reused: bool | None = None  # whether the upstream connection had served a request before
    tunnel: str | None = None  # an Upgrade request's result: upgraded, refused, rejected, failed
    bytes_received: int = 0  # a tunnel's bytes from the client (bytes_sent: to the client)
    relaying: bool = False  # a tunnel carries on after the handler; it observes this at its end
    client_cert: str | None = None  # the verified client certificate's subject (client_ca)
    redirected: bool = False  # answered by the route's redirect (redirect.py)
    # The matched route's headers.response rules: respond.answer applies them to the proxy's
    # own answers for that route too.
    response_rules: HeaderEdits | None = None
    identity: Identity = NO_IDENTITY  # request ID and trace (tracing.py), for the access log
    rate_limited: bool = False  # answered 429 by the route's rate_limit (ratelimit.py)
