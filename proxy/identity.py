"""Who the client is: the address the proxy logs, sends as X-Forwarded-For, and (later) limits
and hashes by.

It is the connection's peer (the PROXY protocol header's source with listen.proxy_protocol),
unless that peer is one of listen.trusted_proxies: then X-Forwarded-For is walked from the
right, past the trusted hops, to the first address that is not one (nginx's real_ip_recursive).
Pure: knows nothing of connections or aiohttp request objects.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from multidict import MultiMapping

from proxy.checks import IPNetwork

_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96, IPv4 addresses written as IPv6 ones (RFC 4291 §2.5.5.2)


def _parse(text: str) -> tuple[int, int] | None:
    """(IP version, the address as an integer), or None if `text` is not an IP address.
    inet_pton, not ipaddress: a tenth of the cost, and as strict (no leading zeros, ports,
    brackets or zone ids). An IPv4-mapped IPv6 address is its IPv4 address."""
    try:
        if ":" not in text:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):  # ValueError: a NUL in the text
        return None
    if value >> 32 == 0xFFFF:
        return 4, value ^ _MAPPED
    return 6, value


def _text(version: int, value: int) -> str:
    """An address written as the socket module writes peers (2001:db8::1, lower case)."""
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


class ClientIdentity:
    """listen.trusted_proxies, and the one decision made with them per request."""

    __slots__ = ("_networks",)

    def __init__(self, trusted_proxies: Iterable[IPNetwork]) -> None:
        # (version, network address, mask) as integers: a trust check is two integer ops.
        self._networks = tuple(
            (net.version, int(net.network_address), int(net.netmask)) for net in trusted_proxies
        )

    def identify(self, peer: str | None, headers: MultiMapping[str]) -> tuple[str | None, bool]:
        """(the client's address, whether `peer` is a trusted proxy).

        An X-Forwarded-For entry that is not an IP address stops the walk, and the client is
        the last trusted hop walked: never a string the client chose. (nginx takes that entry
        for the client address instead.)"""
        if not self._networks or peer is None:
            return peer, False  # the default: no parsing at all
        address = _parse(peer)
        if address is None or not self._trusts(*address):  # a Unix socket is never trusted
            return peer, False
        client = peer
        # Every X-Forwarded-For line, in order, as one list (RFC 9110 §5.3).
        entries = ",".join(headers.getall("X-Forwarded-For", ())).split(",")
        for entry in reversed(entries):
            address = _parse(entry.strip())
            if address is None:
                break  # malformed (or no header at all): the client is the last trusted hop
            client = _text(*address)
            if not self._trusts(*address):
                break
        return client, True

    def _trusts(self, version: int, value: int) -> bool:
        return any(version == v and value & mask == network for v, network, mask in self._networks)
