"""The PROXY protocol parser: v1 and v2 headers, the bytes behind them never taken, and no
input that makes it crash or ask for more than a header may hold."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)


def v2(command: int = 0x21, family: int = 0x11, block: bytes = b"", length: int | None = None):
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + block


def inet(source: str, destination: str = "198.51.100.2", ports=(56324, 443)) -> bytes:
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", *ports)
    )


TLVS = b"\x05\x00\x04abcd" + b"\xea\x00\x03vpc"  # PP2_TYPE_UNIQUE_ID, an AWS one: skipped
LONGEST_V1 = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)  # the spec's worst case, 107 bytes


@pytest.mark.parametrize(
    ("header", "source", "version"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", "192.0.2.1", 1),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 0 65535\r\n", "192.0.2.1", 1),
        (b"PROXY TCP6 2001:DB8::1 2001:db8::2 56324 443\r\n", "2001:db8::1", 1),
        (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 56324 443\r\n", "192.0.2.1", 1),  # dual-stack
        (b"PROXY UNKNOWN\r\n", None, 1),
        (LONGEST_V1, None, 1),
        (v2(0x21, 0x11, inet("192.0.2.1")), "192.0.2.1", 2),
        (v2(0x21, 0x11, inet("192.0.2.1") + TLVS), "192.0.2.1", 2),
        (v2(0x21, 0x21, inet("2001:db8::1", "2001:db8::2")), "2001:db8::1", 2),
        (v2(0x21, 0x21, inet("::ffff:192.0.2.1", "::1") + TLVS), "192.0.2.1", 2),
        (v2(0x20, 0x00), None, 2),  # LOCAL: the balancer's own health check
        (v2(0x20, 0x11, inet("192.0.2.1")), None, 2),  # LOCAL: its addresses are ignored
        (v2(0x21, 0x00), None, 2),  # PROXY UNSPEC: like v1 UNKNOWN
        (v2(0x21, 0x31, b"/run/lb.sock".ljust(216, b"\0")), None, 2),  # UNIX: no IP to name
    ],
)
def test_a_valid_header_names_its_source_and_takes_its_own_bytes_only(header, source, version):
    assert len(LONGEST_V1) == V1_MAX
    found = parse(header + b"GET / HTTP/1.1\r\n\r\n")
    assert found == ProxyHeader(len(header), source, version)


@pytest.mark.parametrize(
    ("data", "more"),
    [
        (b"", V1_MAX),  # either version may come: look at up to the longer v1 line
        (b"PRO", V1_MAX - 3),
        (b"PROXY TCP4 192.0.2.1 198.51", V1_MAX - 27),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r", V1_MAX - 38),
        (V2_SIGNATURE[:5], 11),
        (v2(0x21, 0x11, b"", length=12), 12),
        (v2(0x21, 0x11, inet("192.0.2.1") + TLVS)[:20], 16 + 12 + len(TLVS) - 20),
    ],
)
def test_an_incomplete_header_says_how_much_more_may_belong_to_it(data, more):
    assert parse(data) == more


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol signature"),
        (b"\x16\x03\x01\x02\x00", "no PROXY protocol signature"),  # a TLS ClientHello
        (b"proxy TCP4", "no PROXY protocol signature"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "not ended by CRLF"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", "is not 'PROXY TCP4|TCP6"),
        (b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "is not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", "is not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", "TCP4 addresses are not valid"),
        (b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n", "TCP4 addresses are not valid"),
        (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "TCP6 addresses are not valid"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 65536\r\n", "ports are not numbers"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", "ports are not numbers"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.\xff 1 2\r\n", "TCP4 addresses are not valid"),
        (b"PROXY UNKNOWN " + b"x" * 100, "longer than 107 bytes"),
        (v2(0x11, 0x11, inet("192.0.2.1")), "0x11 is not 0x20 or 0x21"),  # version 1
        (v2(0x22, 0x11, inet("192.0.2.1")), "0x22 is not 0x20 or 0x21"),
        (v2(0x21, 0x41, inet("192.0.2.1")), "family/protocol byte 0x41 is invalid"),
        (v2(0x21, 0x13, inet("192.0.2.1")), "family/protocol byte 0x13 is invalid"),
        (v2(0x21, 0x12, inet("192.0.2.1")), "over a datagram protocol"),
        (v2(0x21, 0x11, inet("192.0.2.1")[:8]), "IPv4 address block shorter"),
        (v2(0x21, 0x21, inet("192.0.2.1")), "IPv6 address block shorter"),
        (v2(0x21, 0x11, b"", length=V2_MAX), "v2 header longer than 4096 bytes"),
        (V2_SIGNATURE[:6] + b"GET", "no PROXY protocol signature"),
    ],
)
def test_bytes_that_cannot_start_a_header_are_refused_with_a_reason(data, why):
    with pytest.raises(ProxyProtocolError, match=why.replace("|", r"\|")):
        parse(data)


# --- properties ---------------------------------------------------------------------------

ports = st.integers(0, 65535)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tcp4", "tcp6", "unknown", "v2-4", "v2-6", "local"]))
    four = st.ip_addresses(v=4)
    six = st.ip_addresses(v=6)
    if kind in ("tcp4", "tcp6"):
        addresses = four if kind == "tcp4" else six
        fields = [kind.upper(), draw(addresses), draw(addresses), draw(ports), draw(ports)]
        return b"PROXY " + " ".join(map(str, fields)).encode() + b"\r\n"
    if kind == "unknown":
        tail = draw(st.binary(max_size=V1_MAX - 16).filter(lambda tail: b"\n" not in tail))
        return b"PROXY UNKNOWN" + (b" " + tail if tail else b"") + b"\r\n"
    tlvs = draw(st.binary(max_size=300))
    if kind == "local":
        return v2(0x20, draw(st.sampled_from([0x00, 0x11, 0x21])), tlvs)
    addresses = four if kind == "v2-4" else six
    block = inet(str(draw(addresses)), str(draw(addresses)), (draw(ports), draw(ports)))
    return v2(0x21, 0x11 if kind == "v2-4" else 0x21, block + tlvs)


@given(st.binary(max_size=200) | st.builds(bytes.__add__, st.sampled_from(
    [b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]
), st.binary(max_size=200)))  # fmt: skip
def test_any_bytes_give_a_header_a_bounded_wait_or_a_refusal(data):
    try:
        found = parse(data)
    except ProxyProtocolError:
        return
    if isinstance(found, ProxyHeader):
        assert 0 < found.length <= len(data)
        assert parse(data[: found.length]) == found  # decided by its own bytes alone
    else:
        assert found > 0
        assert len(data) + found <= V2_MAX


@given(valid_headers(), st.binary(max_size=200), st.lists(st.integers(1, 300), min_size=1))
def test_a_header_read_in_any_pieces_takes_exactly_its_bytes(header, after, pieces):
    """As accept.py reads it: look at no more than parse() allows, take what is header."""
    stream, taken, sizes = header + after, b"", itertools.cycle(pieces)
    found = parse(taken)
    while not isinstance(found, ProxyHeader):
        seen = stream[len(taken) : len(taken) + min(found, next(sizes))]
        assert seen, "parse() waited for bytes past the end of a valid header"
        found = parse(taken + seen)
        taken += seen[: found.length - len(taken)] if isinstance(found, ProxyHeader) else seen
    assert taken == header
    assert found == parse(header)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 ::1%,6.6.6.6 ::1 1 2\r\n",  # a scope id: ipaddress would take it
        b"PROXY TCP6 ::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0443 80\r\n",  # "Heading zeroes are not permitted"
        b"PROXY TCP4 1.2.3.4 5.6.7.8 443 080\r\n",
    ],
)
def test_v1_refuses_what_the_spec_forbids(line):
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_port_zero_is_a_port():
    assert isinstance(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 80\r\n"), ProxyHeader)
