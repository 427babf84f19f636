from __future__ import annotations

from multidict import CIMultiDict

from proxy import headers


def upstream_headers(items, **kwargs):
    defaults = {"client_ip": "192.0.2.1", "scheme": "http", "host": "h.test"}
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


def test_te_is_kept_only_as_trailers():
    assert ("TE", "trailers") in upstream_headers([("Connection", "TE"), ("TE", "trailers")])
    assert not [n for n, _ in upstream_headers([("TE", "gzip")]) if n == "TE"]


def test_forwarded_for_chain_is_appended_and_others_set():
    items = [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9")]
    got = dict(upstream_headers(items, scheme="http"))
    assert got["X-Forwarded-For"] == "203.0.113.9, 192.0.2.1"
    assert got["X-Forwarded-Proto"] == "http"
    assert got["X-Forwarded-Host"] == "h.test"


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
