"""The pure parts of TLS: names a certificate serves, SNI selection, subjects as logged, and what
a reload says about listen.tls. No sockets, no certificate files."""

from __future__ import annotations

import copy
import ssl

import pytest

from proxy.accesslog import json_formatter, text_formatter
from proxy.certificates import CertificateSet
from proxy.config import parse_config
from proxy.exchange import Exchange
from proxy.reload import describe_changes
from proxy.tls import Certificate, _dns_names, client_subject

ORG = (("organizationName", "Example"),)


@pytest.mark.parametrize(
    ("decoded", "names"),
    [
        ({"subject": (ORG, (("commonName", "cn.test"),)),
          "subjectAltName": (("DNS", "A.Example.com"), ("DNS", "*.example.com"),
                             ("IP Address", "127.0.0.1"))},
         ("a.example.com", "*.example.com")),
        # With a subjectAltName, the CN is not a name even when no DNS entry is there.
        ({"subject": ((("commonName", "cn.test"),),), "subjectAltName": (("IP Address", "::1"),)},
         ()),
        ({"subject": (ORG, (("commonName", "Only.CN.test."),))}, ("only.cn.test",)),
    ],
)  # fmt: skip
def test_names_come_from_dns_alt_names_else_the_common_name(decoded, names):
    assert _dns_names(decoded) == names


def test_select_prefers_exact_then_one_label_wildcard_then_default():
    default, exact, wild = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(3))
    certificates = (
        Certificate("listen.tls.cert", ("default.test",), 0.0, default),
        Certificate("listen.tls.certificates[0].cert", ("api.example.com",), 0.0, exact),
        Certificate("listen.tls.certificates[1].cert", ("*.example.com",), 0.0, wild),
    )
    by_name = {n: c.context for c in reversed(certificates) for n in c.names}
    chosen = CertificateSet(certificates, by_name, ())
    assert [
        chosen.select(name)
        for name in ("API.example.com.", "www.example.com", "a.b.example.com", "example.com",
                     "default.test", "", None)
    ] == [exact, wild, default, default, default, default, default]  # fmt: skip


class _Transport:
    def __init__(self, peercert):
        self.peercert = peercert

    def get_extra_info(self, name):
        return self.peercert if name == "peercert" else None


@pytest.mark.parametrize(
    ("peercert", "subject"),
    [
        (None, None),  # not TLS
        ({}, None),  # TLS without client_ca: no certificate asked for
        ({"subject": (ORG, (("organizationalUnitName", "ops"),), (("commonName", "alice"),))},
         "CN=alice,OU=ops,O=Example"),
        ({"subject": ((("commonName", 'a,b+c"d\\e<f>g;h'),),)},
         'CN=a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h'),
        ({"subject": ((("commonName", " #x "),),)}, "CN=\\ #x\\ "),
        ({"subject": ((("commonName", "a"), ("userId", "7")),)}, "CN=a+UID=7"),
    ],
)  # fmt: skip
def test_client_subject_is_written_as_rfc_4514(peercert, subject):
    assert client_subject(_Transport(peercert)) == subject
    assert client_subject(None) is None


def test_access_log_has_the_client_certificate_in_both_formats():
    exchange = Exchange(0.0, 0.0, "127.0.0.1", "GET", "/", status=200)
    assert '"client_cert":null,' in json_formatter()(exchange)
    assert " client_cert=- " in text_formatter()(exchange)
    exchange.client_cert = 'CN=a "b",O=Example\\, Inc.'
    assert '"client_cert":"CN=a \\"b\\",O=Example\\\\, Inc.",' in json_formatter()(exchange)
    assert ' client_cert="CN=a \\"b\\",O=Example\\\\, Inc." ' in text_formatter()(exchange)


BASE = {
    "listen": {"tls": {"cert": "a.pem", "key": "a.key"}},
    "upstreams": {"api": {"targets": ["http://127.0.0.1:1"]}},
    "routes": [{"match": {"path_prefix": "/"}, "upstream": "api"}],
}


def test_reload_applies_listen_tls_keys_but_turning_tls_on_or_off_takes_a_restart():
    new = copy.deepcopy(BASE)
    new["listen"]["tls"].update(min_version="1.3", certificates=[{"cert": "b.pem", "key": "b.key"}])
    assert describe_changes(parse_config(BASE), parse_config(new)) == [
        "listen.tls changed: listen.tls.certificates () -> [{cert: 'b.pem', key: 'b.key'}]; "
        "listen.tls.min_version '1.2' -> '1.3'"
    ]
    off = copy.deepcopy(BASE)
    del off["listen"]["tls"]
    [line] = describe_changes(parse_config(BASE), parse_config(off))
    assert line.startswith("listen changed (applied at the next restart): listen.tls {cert: ")
