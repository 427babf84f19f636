"""The two header transforms a proxy owes (RFC 9110 §7.6): to the upstream and back to the client.

Pure functions over multidicts: duplicates keep every value in order, names keep their case.
Knows nothing of sockets or aiohttp request objects.
"""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet

from multidict import CIMultiDict, MultiMapping

# Hop-by-hop: they describe one connection, so a proxy consumes them and never forwards them
# (RFC 9110 §7.6.1, RFC 9112 §9.6). Lower case, as compared.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",  # non-standard, still sent by some clients
        # "TE: trailers" too: the proxy does not relay trailers (aiohttp reads and drops
        # them), so it must not tell the upstream that the client accepts them.
        "te",
        "trailer",
        "transfer-encoding",  # the proxy re-frames each body itself
        "upgrade",
        # Credentials for and challenges from *this* proxy, which asks for none (as Go does).
        "proxy-authenticate",
        "proxy-authorization",
    }
)

# Consumed by this proxy rather than forwarded, for the reason given.
_REQUEST_ONLY = frozenset(
    {
        "expect",  # the proxy answered "100 Continue" itself (RFC 9110 §10.1.1)
        "x-forwarded-for",  # rewritten below, not copied
    }
)

# What proxies say about the client. Believed from a trusted proxy (listen.trusted_proxies);
# from anyone else a forgery, removed and replaced by the proxy's own.
_SAID_BY_PROXIES = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"}
)


# A token (RFC 9110 §5.1): what a field name must be. aiohttp's client parser lets through
# names such as "Content-Length " that a lenient client downstream would take for framing.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _end_to_end(
    headers: MultiMapping[str],
    drop: frozenset[str],
    *,
    same_spelling: bool = False,
    underscores: bool = True,
    check_names: bool = False,
) -> CIMultiDict[str]:
    # Names listed in Connection are hop-by-hop for this message too (RFC 9110 §7.6.1), except
    # Host: a request has exactly one, whatever Connection says (AIOHTTP-NOTES §1.16).
    connection = headers.getall("Connection", None)
    listed: AbstractSet[str] = _NONE_LISTED
    if connection is not None:
        tokens = {token.strip().lower() for value in connection for token in value.split(",")}
        listed = tokens - _HOST
    verdicts = _verdicts(drop, underscores, check_names)
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        lower = verdicts.get(name)
        if lower is None:
            lower = _verdict(name, drop, underscores, check_names)
            if len(verdicts) < _MAX_VERDICTS and len(name) <= _MAX_KEPT_NAME:
                verdicts[name] = lower  # names are the peer's: what is kept is bounded
        if not lower or lower in listed:
            continue
        if not value.isascii():
            # aiohttp's parser keeps bytes that are not UTF-8 as surrogates, and its writer
            # then drops them: a value would change silently. Refuse it instead
            # (UnicodeEncodeError is a ValueError: 400 from a client, 502 from an upstream).
            value.encode()
        if same_spelling:
            # aiohttp's ClientSession._prepare_headers (3.14.5) tracks names case-sensitively,
            # so "x-a" after "X-A" would replace every earlier value. Names are
            # case-insensitive (RFC 9110 §5.1): repeat the first spelling instead.
            name = spelling.setdefault(lower, name)
        out.add(name, value)
    return out


def _verdict(name: str, drop: frozenset[str], underscores: bool, check_names: bool) -> str:
    """A field name's lower-case form, or "" when the transform drops it whatever its value;
    ValueError for a name that is not a token (never memoised)."""
    if check_names and _FIELD_NAME.fullmatch(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    lower = name.lower()
    if lower in drop:
        return ""
    if "_" in lower and (not underscores or lower.replace("_", "-") in _NOT_AS_UNDERSCORES):
        # CGI and WSGI servers map "X_Forwarded_For" and "X-Forwarded-For" to one
        # variable: a client could forge the proxy's own headers (nginx drops them too),
        # and with underscores allowed, those still may not pass under another spelling.
        return ""
    return lower


_NONE_LISTED: frozenset[str] = frozenset()
_HOST = frozenset({"host"})

# Each transform's verdicts on the names it has seen, by spelling: the same few dozen names
# come in every message, and deciding one afresh (lower-casing, the token check, the sets)
# was most of the transform's cost. Bounded, since a peer can send any name it likes.
_MAX_VERDICTS, _MAX_KEPT_NAME = 4096, 64  # at most 256 KiB of names per transform
_VERDICTS: dict[tuple[frozenset[str], bool, bool], dict[str, str]] = {}


def _verdicts(drop: frozenset[str], underscores: bool, check_names: bool) -> dict[str, str]:
    return _VERDICTS.setdefault((drop, underscores, check_names), {})


# Forwarded and X-Real-IP are never believed: only X-Forwarded-For/-Proto/-Host are walked or
# kept from a trusted proxy, so a balancer that passes a client's X-Real-IP on (AWS ALB does)
# cannot carry its lie to the backend.
_FROM_TRUSTED_PROXY = HOP_BY_HOP | _REQUEST_ONLY | {"forwarded", "x-real-ip"}
_FROM_CLIENT = _FROM_TRUSTED_PROXY | _SAID_BY_PROXIES
# What may not arrive under an underscore spelling either, whoever sent it.
_NOT_AS_UNDERSCORES = _FROM_CLIENT


def to_upstream(
    headers: MultiMapping[str],
    *,
    peer: str | None,
    scheme: str,
    host: str | None,
    trusted: bool = False,
    underscores: bool = False,
) -> CIMultiDict[str]:
    """Request headers as sent upstream: end-to-end ones unchanged, plus X-Forwarded-*.

    `peer` sent the request (identity.py): the client itself, unless `trusted` (one of
    listen.trusted_proxies). A client's X-Forwarded-*, Forwarded and X-Real-IP are removed and
    the proxy's own set; a trusted proxy's X-Forwarded-* are kept, `peer` appended to its
    X-Forwarded-For, and X-Forwarded-Proto/-Host set only where it sent none (its Forwarded
    and X-Real-IP are removed all the same).
    Names with "_" are dropped unless `underscores` (listen.allow_underscores_in_headers).
    Raises ValueError for a value that was not UTF-8 (it could not be sent as it came)."""
    drop = _FROM_TRUSTED_PROXY if trusted else _FROM_CLIENT
    out = _end_to_end(headers, drop, same_spelling=True, underscores=underscores)
    chain = headers.getall("X-Forwarded-For", []) if trusted else []
    if peer:
        chain.append(peer)
    if chain:
        out.add("X-Forwarded-For", ", ".join(chain))
    if not trusted or "X-Forwarded-Proto" not in out:
        out.add("X-Forwarded-Proto", scheme)
    if host is not None and (not trusted or "X-Forwarded-Host" not in out):
        out.add("X-Forwarded-Host", host)
    return out


def to_client(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """Response headers as sent to the client: every end-to-end header, in order.
    Raises ValueError for a field name that is not a token, or a value that was not UTF-8."""
    # aiohttp's server parser already refuses a request's bad names; its client parser does not.
    return _end_to_end(headers, HOP_BY_HOP, check_names=True)
