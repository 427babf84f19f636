"""The two header transforms a proxy owes (RFC 9110 §7.6): to the upstream and back to the client.

Pure functions over multidicts: duplicates keep every value in order, names keep their case.
Knows nothing of sockets or aiohttp request objects.
"""

from __future__ import annotations

from multidict import CIMultiDict, MultiMapping

# Hop-by-hop: they describe one connection, so a proxy consumes them and never forwards them
# (RFC 9110 §7.6.1, RFC 9112 §9.6). Lower case, as compared.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",  # non-standard, still sent by some clients
        "te",  # kept only as "TE: trailers", see below
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
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)


def _end_to_end(
    headers: MultiMapping[str], drop: frozenset[str], *, same_spelling: bool = False
) -> CIMultiDict[str]:
    # Names listed in Connection are hop-by-hop for this message too (RFC 9110 §7.6.1).
    listed = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        # "TE: trailers" (which RFC 9110 §10.1.4 makes the sender list in Connection) says the
        # client accepts trailers: the one TE value worth passing on.
        te_trailers = lower == "te" and value.strip().lower() == "trailers"
        if (lower in drop or lower in listed) and not te_trailers:
            continue
        if same_spelling:
            # aiohttp's ClientSession._prepare_headers (3.14.5) tracks names case-sensitively,
            # so "x-a" after "X-A" would replace every earlier value. Names are
            # case-insensitive (RFC 9110 §5.1): repeat the first spelling instead.
            name = spelling.setdefault(lower, name)
        out.add(name, value)
    return out


_DROP_TO_UPSTREAM = HOP_BY_HOP | _REQUEST_ONLY


def to_upstream(
    headers: MultiMapping[str], *, client_ip: str | None, scheme: str, host: str | None
) -> CIMultiDict[str]:
    """Request headers as sent upstream: end-to-end ones unchanged, plus X-Forwarded-*."""
    out = _end_to_end(headers, _DROP_TO_UPSTREAM, same_spelling=True)
    chain = headers.getall("X-Forwarded-For", [])
    if client_ip:
        chain.append(client_ip)
    if chain:
        out.add("X-Forwarded-For", ", ".join(chain))
    out.add("X-Forwarded-Proto", scheme)
    if host is not None:
        out.add("X-Forwarded-Host", host)
    return out


def to_client(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """Response headers as sent to the client: every end-to-end header, in order."""
    return _end_to_end(headers, HOP_BY_HOP)
