"""Who the client is: the peer, or, behind trusted proxies, X-Forwarded-For walked from the
right past them."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.identity import ClientIdentity

PROXIES = ClientIdentity(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "fd00::/8"))


def identify(identity: ClientIdentity, peer: str | None, *forwarded_for: str):
    return identity.identify(peer, CIMultiDict(("X-Forwarded-For", v) for v in forwarded_for))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("127.0.0.1", [], "127.0.0.1"),  # a trusted peer that forwards nobody is the client
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["1.2.3.4, 10.0.0.7"], "1.2.3.4"),  # every trusted hop walked past
        ("127.0.0.1", ["1.2.3.4", "10.0.0.7"], "1.2.3.4"),  # all the lines, in order
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.7"], "1.2.3.4"),  # the right-most untrusted
        ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),  # all trusted: the left-most
        ("127.0.0.1", ["1.2.3.4, not-an-ip, 10.0.0.7"], "10.0.0.7"),  # malformed: stop there
        ("127.0.0.1", ["1.2.3.4, unknown"], "127.0.0.1"),
        ("127.0.0.1", ["1.2.3.4, , 10.0.0.7"], "10.0.0.7"),  # an empty entry is malformed
        ("127.0.0.1", ["1.2.3.4:5678"], "127.0.0.1"),  # so is one with a port
        ("127.0.0.1", ["[2001:db8::1]"], "127.0.0.1"),  # or brackets
        ("127.0.0.1", [" 2001:DB8::1 "], "2001:db8::1"),  # written as Python writes it
        ("127.0.0.1", ["1.2.3.4, ::ffff:10.0.0.5"], "1.2.3.4"),  # an IPv4 hop in IPv6 form
        ("127.0.0.1", ["::ffff:1.2.3.4"], "1.2.3.4"),
        ("fd00::1", ["1.2.3.4, fd00::2"], "1.2.3.4"),
        ("::ffff:10.0.0.1", ["1.2.3.4"], "1.2.3.4"),
    ],
)
def test_behind_trusted_proxies_the_client_is_the_right_most_untrusted_address(
    peer, forwarded_for, client
):
    assert identify(PROXIES, peer, *forwarded_for) == (client, True)


@pytest.mark.parametrize(
    ("identity", "peer"),
    [
        (ClientIdentity(()), "127.0.0.1"),  # the default: nobody is trusted
        (PROXIES, "192.0.2.1"),
        (PROXIES, "2001:db8::1"),
        (PROXIES, None),  # no peer address known
        (PROXIES, "/run/proxy.sock"),  # not an IP peer
    ],
)
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(identity, peer):
    assert identify(identity, peer, "1.2.3.4", "10.0.0.7") == (peer, False)


@given(st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=20)), max_size=6))
def test_behind_a_trusted_proxy_the_client_is_always_an_ip_address(entries):
    client, trusted = identify(PROXIES, "127.0.0.1", ", ".join(entries))
    assert trusted
    ipaddress.ip_address(client)  # whatever was forwarded: never a string the client chose


@pytest.mark.parametrize("entry", ["1.2.3.4\udcff", "1.2.3.4\x00", "\udcff"])
def test_an_entry_that_is_not_text_an_address_could_be_stops_the_walk(entry):
    """aiohttp hands non-UTF-8 bytes on as surrogates; inet_pton raises for them and for NUL."""
    identity = ClientIdentity([ipaddress.ip_network("127.0.0.0/8")])
    headers = CIMultiDict({"X-Forwarded-For": f"9.9.9.9, {entry}"})
    assert identity.identify("127.0.0.1", headers) == ("127.0.0.1", True)


def test_an_ipv4_mapped_trusted_proxy_entry_names_ipv4_peers():
    from proxy.checks import ip_network

    network = ip_network("::ffff:127.0.0.0/104", "listen.trusted_proxies[0]")
    assert network == ipaddress.ip_network("127.0.0.0/8")
    assert ClientIdentity([network]).identify("127.0.0.1", CIMultiDict())[1]
