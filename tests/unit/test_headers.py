from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy import headers
from proxy.headers import to_upstream


def upstream_headers(items, **kwargs):
    defaults = {"peer": "192.0.2.1", "scheme": "http", "host": "h.test"}
    return list(headers.to_upstream(CIMultiDict(items), **{**defaults, **kwargs}).items())


def to_client(items):
    return headers.to_client(CIMultiDict(items))


def test_end_to_end_headers_keep_order_duplicates_and_case():
    items = [("Host", "h.test"), ("x-a", "1"), ("Accept", "*/*"), ("X-A", "2")]
    assert upstream_headers(items)[:4] == [
        ("Host", "h.test"),
        ("x-a", "1"),
        ("Accept", "*/*"),
        ("x-a", "2"),
    ]


def test_connection_listed_names_are_dropped_in_both_directions():
    items = [("Connection", "close, X-Foo"), ("X-Foo", "1"), ("x-foo", "2"), ("X-Bar", "3")]
    assert [n for n, _ in upstream_headers(items)][:1] == ["X-Bar"]
    assert list(to_client(items).items()) == [("X-Bar", "3")]


def test_te_is_never_forwarded_not_even_trailers():
    # The proxy drops trailers, so it must not say the client accepts them.
    assert not [n for n, _ in upstream_headers([("Connection", "TE"), ("TE", "trailers")])
                if n == "TE"]  # fmt: skip
    assert not [n for n, _ in upstream_headers([("TE", "gzip")]) if n == "TE"]


def test_connection_cannot_remove_host():
    got = upstream_headers([("Host", "h.test"), ("Connection", "Host, X-A"), ("X-A", "1")])
    assert [v for n, v in got if n == "Host"] == ["h.test"]
    assert "X-A" not in dict(got)


def test_header_names_with_underscores_are_dropped_unless_allowed():
    items = [("X_Forwarded_For", "6.6.6.6"), ("X-Real", "1"), ("my_header", "v")]
    assert [n for n, _ in upstream_headers(items)] == [
        "X-Real", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"
    ]  # fmt: skip
    allowed = to_upstream(CIMultiDict(items), peer=None, scheme="http", host=None, underscores=True)
    assert allowed.getall("my_header") == ["v"]
    # Allowed, still no header the proxy removes may pass spelled with underscores: a CGI
    # backend would read X_Forwarded_For as X-Forwarded-For.
    assert "X_Forwarded_For" not in allowed


@pytest.mark.parametrize("name", ["Content-Length ", " X", "X:Y", "X\tY", "", "Ünï"])
def test_a_response_header_name_that_is_not_a_token_is_refused(name):
    with pytest.raises(ValueError):
        to_client(CIMultiDict([(name, "5")]))


FORGED = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("x-forwarded-for", "198.51.100.1, 10.0.0.1"),
    ("X-Forwarded-Host", "spoofed.test"),
    ("Forwarded", "for=6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
]


def test_a_clients_forwarding_headers_are_replaced_by_the_proxys():
    got = upstream_headers([("X-A", "1"), *FORGED], scheme="http")
    assert got == [
        ("X-A", "1"),
        ("X-Forwarded-For", "192.0.2.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "h.test"),
    ]


def test_a_trusted_proxys_forwarding_headers_are_kept_and_its_address_appended():
    got = CIMultiDict(upstream_headers(FORGED, scheme="http", trusted=True))
    assert got.getall("X-Forwarded-For") == ["203.0.113.9, 198.51.100.1, 10.0.0.1, 192.0.2.1"]
    assert got.getall("X-Forwarded-Proto") == ["https"]
    assert got.getall("X-Forwarded-Host") == ["spoofed.test"]
    # Forwarded and X-Real-IP are never believed, not even from a trusted proxy.
    assert ("Forwarded" in got, "X-Real-IP" in got) == (False, False)


def test_a_trusted_proxy_that_sent_no_forwarding_headers_gets_the_proxys():
    got = upstream_headers([("X-A", "1")], scheme="https", trusted=True)
    assert got[1:] == [
        ("X-Forwarded-For", "192.0.2.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "h.test"),
    ]


def test_expect_is_consumed_by_the_proxy():
    assert "Expect" not in dict(upstream_headers([("Expect", "100-continue")]))


def test_response_headers_keep_content_length_and_drop_transfer_encoding():
    items = [
        ("Content-Length", "3"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a"),
        ("Set-Cookie", "b"),
    ]
    assert list(to_client(items).items()) == [
        ("Content-Length", "3"),
        ("Set-Cookie", "a"),
        ("Set-Cookie", "b"),
    ]


def test_from_a_trusted_proxy_no_forwarding_header_passes_spelled_with_underscores():
    """A CGI backend reads X_Real_IP as X-Real-IP: from anyone, with underscores allowed."""
    items = [("X_Real_IP", "6.6.6.6"), ("X_FORWARDED_PROTO", "https"), ("x_forwarded_host", "e"),
             ("X_Custom", "kept")]  # fmt: skip
    got = to_upstream(CIMultiDict(items), peer="10.0.0.1", scheme="http", host=None,
                      trusted=True, underscores=True)  # fmt: skip
    assert [name for name in got if "_" in name] == ["X_Custom"]


def test_a_names_verdict_is_remembered_per_transform_and_never_across_them():
    forwarded = [("X-Forwarded-Proto", "https"), ("X_Custom", "1"), ("X-Keep", "2")]
    for _ in range(2):  # the second time from the remembered verdicts
        assert upstream_headers(forwarded)[:1] == [("X-Keep", "2")]
        assert upstream_headers(forwarded, trusted=True)[0] == ("X-Forwarded-Proto", "https")
        assert upstream_headers(forwarded, underscores=True)[:2] == [
            ("X_Custom", "1"),
            ("X-Keep", "2"),
        ]
        assert list(to_client(forwarded).items()) == forwarded
        # A name Connection lists is dropped for that message only, remembered or not.
        listed = [("Connection", "X-Keep"), *forwarded]
        assert list(to_client(listed)) == ["X-Forwarded-Proto", "X_Custom"]


def test_what_a_peer_can_make_the_transform_remember_is_bounded():
    sent = [(f"X-{i}-{'n' * (i % 100)}", "v") for i in range(3 * headers._MAX_VERDICTS)]
    for start in range(0, len(sent), 100):  # as many messages, each within the parser's limit
        chunk = sent[start : start + 100]
        assert list(to_client(chunk).items()) == chunk
    remembered = headers._verdicts(headers.HOP_BY_HOP, True, True)
    assert len(remembered) <= headers._MAX_VERDICTS
    assert max(map(len, remembered)) <= headers._MAX_KEPT_NAME
    with pytest.raises(ValueError):  # refused each time, never remembered
        to_client([("Bad Name", "v")])
    assert "Bad Name" not in remembered
