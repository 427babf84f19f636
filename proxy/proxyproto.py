"""The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary) a load
balancer puts before a connection's first byte, to name the client it accepted.

`parse` is pure and decides from the bytes seen so far: a complete header, how many more bytes
may still belong to one, or an error. It never looks past the header's declared end, so the
TLS or HTTP bytes behind it stay for their reader. Knows nothing of sockets or asyncio.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, "\r\n" included (spec 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEAD = 16  # the signature, version and command, family and protocol, length
# The spec allows 64 KiB of addresses and TLVs; what a load balancer sends (addresses, a VPC
# endpoint id, a TLS client's name) is far less. nginx caps it at its header buffer, 1 KiB.
V2_MAX_LENGTH = 4096 - V2_HEAD
V2_MAX = V2_HEAD + V2_MAX_LENGTH

_V2_LOCAL, _V2_PROXY = 0x20, 0x21  # version 2 in the high nibble, the command in the low one
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0x0, 0x1, 0x2, 0x3  # address family (high nibble)
_V2_STREAM = 0x1  # transport protocol (low nibble); 0 is UNSPEC, 2 DGRAM
_V1_FAMILIES: dict[bytes, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]] = {
    b"TCP4": ipaddress.IPv4Address,
    b"TCP6": ipaddress.IPv6Address,
}


class ProxyProtocolError(ValueError):
    """The bytes cannot start a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its length in bytes, and the client it names."""

    length: int
    # The client's address; None when the header names none (v1 UNKNOWN, v2 LOCAL: a load
    # balancer's own health check, or an address family other than IPv4/IPv6): the TCP peer
    # is the client then.
    source: str | None
    version: int


def parse(data: bytes) -> ProxyHeader | int:
    """The header `data` starts with; or, while it is incomplete, how many more bytes at most
    may still belong to it (all of `data` does then). Raises ProxyProtocolError as soon as
    `data` cannot start a valid header."""
    if not data:
        return V1_MAX  # either version: parse decides once bytes are there
    if data[:12] == V2_SIGNATURE[: len(data)]:
        return _v2(data)
    if data[:6] == V1_PREFIX[: len(data)]:
        return _v1(data)
    raise ProxyProtocolError("no PROXY protocol signature")


def _v1(data: bytes) -> ProxyHeader | int:
    end = data.find(b"\n", 0, V1_MAX)
    if end == -1:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        return V1_MAX - len(data)
    if data[end - 1 : end] != b"\r":
        raise ProxyProtocolError("v1 header not ended by CRLF")
    fields = data[: end - 1].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:  # the receiver ignores the rest of the line (spec 2.1)
        return ProxyHeader(end + 1, None, 1)
    family = _V1_FAMILIES.get(fields[1]) if len(fields) == 6 else None
    if family is None:
        raise ProxyProtocolError("v1 header is not 'PROXY TCP4|TCP6 src dst sport dport'")
    try:
        if any(b"%" in field for field in fields[2:4]):
            raise ValueError("a scope id")  # ipaddress takes "::1%x"; the spec's form has none
        source, _ = (family(field.decode("ascii")) for field in fields[2:4])
    except ValueError:  # also UnicodeDecodeError
        raise ProxyProtocolError(f"v1 {fields[1].decode()} addresses are not valid") from None
    if not all(_port(field) for field in fields[4:6]):
        raise ProxyProtocolError("v1 ports are not numbers 0-65535")
    return ProxyHeader(end + 1, _address(source), 1)


def _port(field: bytes) -> bool:
    # Digits only, no leading zero ("Heading zeroes are not permitted", spec 2.1).
    return (
        field.isdigit()
        and len(field) <= 5
        and int(field) <= 65535
        and (field == b"0" or not field.startswith(b"0"))
    )


def _address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4 client named in IPv6 form (::ffff:192.0.2.1, from a dual-stack balancer) is
    # the IPv4 client, for trust checks and X-Forwarded-For alike.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _v2(data: bytes) -> ProxyHeader | int:
    if len(data) < V2_HEAD:
        return V2_HEAD - len(data)
    command, family_protocol = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"v2 version/command byte {command:#04x} is not 0x20 or 0x21")
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > _V2_UNIX or protocol > 2:
        raise ProxyProtocolError(f"v2 family/protocol byte {family_protocol:#04x} is invalid")
    if length > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"v2 header longer than {V2_MAX} bytes ({V2_HEAD + length})")
    total = V2_HEAD + length
    if len(data) < total:
        return total - len(data)
    if command == _V2_LOCAL:  # a health check from the balancer itself: the block is ignored
        return ProxyHeader(total, None, 2)
    if family in (_V2_INET, _V2_INET6) and protocol != _V2_STREAM:
        raise ProxyProtocolError("v2 PROXY over a datagram protocol on a stream listener")
    if family == _V2_INET:
        if length < 12:  # source, destination (4 bytes each), two ports; then TLVs, skipped
            raise ProxyProtocolError("v2 IPv4 address block shorter than 12 bytes")
        return ProxyHeader(total, str(ipaddress.IPv4Address(data[16:20])), 2)
    if family == _V2_INET6:
        if length < 36:
            raise ProxyProtocolError("v2 IPv6 address block shorter than 36 bytes")
        return ProxyHeader(total, _address(ipaddress.IPv6Address(data[16:32])), 2)
    # UNSPEC or UNIX: no IP address to name; the receiver uses the connection's (spec 2.2).
    return ProxyHeader(total, None, 2)
