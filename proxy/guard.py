"""Who may use the admin listener: the Host names it answers to (against DNS rebinding), the
token (admin.token_file: a bearer token, or a browser's Basic password), and the header a
state-changing request must carry (against cross-site requests). Pure decisions: admin.py
answers the refusals. Knows nothing of aiohttp (`--check` reads the token file without it) nor
of what the admin endpoints do.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import Admin, ConfigError

# Orchestrators' probes: they reveal nothing and change nothing, and a kubelet carries no token.
PROBES = frozenset({"/healthz", "/readyz"})
UNAUTHORIZED_REASONS = ("missing", "wrong")  # no token offered; a token that is not the one
# A browser cannot send a bearer token when it navigates: asked with this challenge, it prompts
# for a user name and password and sends them with every request to the listener (the status
# page's fetches too). RFC 7617 §2.1: charset says the password is sent as UTF-8.
BASIC_CHALLENGE = 'Basic realm="proxy admin", charset="UTF-8"'
# A header a browser sends cross-site only after a CORS preflight, which the admin listener
# never grants: a page cannot fire POST /reload with a form or a no-cors fetch (Fetch standard,
# "CORS-safelisted request-header").
CHANGE_HEADER = "X-Proxy-Reload"
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    token: bytes | None  # None: no token asked
    allowed_hosts: frozenset[str]  # lower-case names answered besides IP literals and localhost


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # one line
    headers: Mapping[str, str] = field(default_factory=dict)


def read_token(path: str) -> bytes:
    """The token in `path`, surrounding whitespace stripped; unreadable or empty: a ConfigError."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"admin.token_file: cannot read {path!r} ({why})") from None
    if not token:
        raise ConfigError(f"admin.token_file: must hold a token, got an empty file {path!r}")
    return token


def load_policy(admin: Admin, internal_token: str | None = None) -> AdminPolicy:
    """Reads admin.token_file (at start-up and on every reload). `internal_token`: a worker's,
    whose admin app only its supervisor asks (workers.py); the file is still read, so a worker
    rejects a reload whose token file cannot be read, as a single process does."""
    token = read_token(admin.token_file) if admin.token_file is not None else None
    if internal_token is not None:
        return AdminPolicy(internal_token.encode(), frozenset())
    return AdminPolicy(token, frozenset(admin.allowed_hosts))


def host_name(host: str) -> str:
    """The name in a Host header: the port cut, IPv6 brackets removed, lower case, no final dot."""
    if host.startswith("["):
        inside, bracket, _ = host[1:].partition("]")
        return inside if bracket else host
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit() or ":" in name:
        name = host  # no port (a bare IPv6 address has colons of its own)
    return name.rstrip(".").lower()


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """A DNS-rebinding page sends its own name as Host; an IP address, localhost or a name the
    operator listed cannot be one it controls. No Host at all (HTTP/1.0) never comes from a
    browser, so it is let through: the token still applies."""
    if host is None:
        return True
    name = host_name(host)
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def unauthorized(authorization: str | None, token: bytes) -> str | None:
    """None when `authorization` is "Bearer <token>", or Basic credentials whose password is the
    token (any user name: a browser's prompt asks for one); else why not (UNAUTHORIZED_REASONS)."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()  # RFC 9110 §11.1: any case
    if scheme == "bearer" and credentials:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives them back.
        offered: bytes | None = credentials.encode("utf-8", "surrogateescape")
    else:
        offered = basic_password(credentials) if scheme == "basic" else None
    if offered is None:
        return "missing"
    return None if hmac.compare_digest(offered, token) else "wrong"


def basic_password(credentials: str) -> bytes | None:
    """The password in Basic credentials (base64 of "user:password", RFC 7617 §2), or None when
    they are not that."""
    try:
        decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
    except ValueError:  # not ASCII, or not base64 (binascii.Error is a ValueError)
        return None
    _, colon, password = decoded.partition(b":")
    return password if colon else None


def from_a_browser(method: str, path: str, headers: Mapping[str, str]) -> bool:
    """A request a browser made by navigating (the status page, `GET /`, or any page asked for
    as HTML without credentials): its 401 asks for Basic, so that the browser prompts. Scripts
    and Prometheus keep the Bearer challenge."""
    if method in ("GET", "HEAD") and path == "/":
        return True
    return "Authorization" not in headers and "text/html" in headers.get("Accept", "")


class AdminGuard:
    """The policy in force (swapped by a reload) and the requests refused for want of a token."""

    def __init__(self, policy: AdminPolicy) -> None:
        self.policy = policy
        self.unauthorized = dict.fromkeys(UNAUTHORIZED_REASONS, 0)

    def check(self, method: str, path: str, headers: Mapping[str, str]) -> Refusal | None:
        """None: answer the request. `headers` must look names up case-insensitively."""
        policy = self.policy
        host = headers.get("Host")
        if not host_allowed(host, policy.allowed_hosts):
            # RFC 9110 §15.5.20: a name this server does not answer for.
            return Refusal(
                421, f"the admin listener does not answer for host {host!r} (admin.allowed_hosts)"
            )
        if path in PROBES and method in READ_ONLY_METHODS:
            return None
        if policy.token is not None:
            reason = unauthorized(headers.get("Authorization"), policy.token)
            if reason is not None:
                self.unauthorized[reason] += 1
                if from_a_browser(method, path, headers):
                    return Refusal(
                        401, "the admin token is required (admin.token_file): as the password, "
                        "any user name", {"WWW-Authenticate": BASIC_CHALLENGE},
                    )  # fmt: skip
                return Refusal(
                    401, "a bearer token is required (admin.token_file)",
                    {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        if method not in READ_ONLY_METHODS and not _not_cross_site(headers):
            return Refusal(
                403, f"{method} {path} needs the header {CHANGE_HEADER}: 1 or Content-Type: "
                "application/json (a guard against cross-site requests)",
            )  # fmt: skip
        return None


def _not_cross_site(headers: Mapping[str, str]) -> bool:
    """A request a browser sends cross-site only after a CORS preflight, which the admin
    listener never grants: one with a custom header, or with Content-Type application/json
    (not one of the three a plain form or a no-cors fetch may use)."""
    if CHANGE_HEADER in headers:
        return True
    media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json"
