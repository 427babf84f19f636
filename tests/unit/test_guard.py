"""proxy/guard.py: the admin listener's decisions (Host, token, cross-site header), no sockets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.config import Admin, ConfigError
from proxy.guard import (
    BASIC_CHALLENGE,
    AdminGuard,
    AdminPolicy,
    host_allowed,
    host_name,
    load_policy,
    unauthorized,
)


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("127.0.0.1:9901", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:9901", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # not valid in a Host header, but no port to cut either
        ("LocalHost:80", "localhost"),
        ("localhost.", "localhost"),
        ("proxy:x", "proxy:x"),  # not a port: kept, and refused as a name
        ("[::1", "[::1"),
    ],
)
def test_host_name_cuts_the_port_and_brackets(host, name):
    assert host_name(host) == name


ALLOWED = frozenset({"proxy-admin.internal"})


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        (None, True),  # HTTP/1.0 without Host: never a browser
        ("10.0.0.7:9901", True),
        ("[fd00::1]:9901", True),
        ("localhost:9901", True),
        ("proxy-admin.internal:9901", True),
        ("", False),
        ("evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.evil.example", False),
        ("sub.proxy-admin.internal", False),
    ],
)
def test_host_allowed_answers_ip_literals_localhost_and_listed_names(host, answered):
    assert host_allowed(host, ALLOWED) is answered


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("Bearer tok", None),
        ("bearer tok", None),
        ("BEARER   tok  ", None),
        (None, "missing"),
        ("", "missing"),
        ("Bearer", "missing"),
        ("Bearer   ", "missing"),
        ("Basic dG9r", "missing"),
        ("tok", "missing"),
        ("Bearer tok2", "wrong"),
        ("Bearer to", "wrong"),
        ("Bearer TOK", "wrong"),
    ],
)
def test_unauthorized_says_why_a_bearer_token_is_refused(authorization, reason):
    assert unauthorized(authorization, b"tok") == reason


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (basic("ops:tok"), None),
        (basic(":tok"), None),  # a browser's prompt may leave the user name empty
        ("basic " + basic("x:tok")[6:], None),
        (basic("ops:tok2"), "wrong"),
        (basic("ops:"), "wrong"),
        (basic("ops:tok:"), "wrong"),  # only the first colon separates (RFC 7617 §2)
        (basic("tok"), "missing"),  # no colon: no password
        ("Basic", "missing"),
        ("Basic !!not-base64!!", "missing"),
        ("Basic dG9rw", "missing"),  # bad padding
        ("Basic ÿÿ", "missing"),  # not ASCII
    ],
)
def test_unauthorized_takes_the_token_as_a_basic_password_too(authorization, reason):
    assert unauthorized(authorization, b"tok") == reason


def test_a_browser_is_challenged_with_basic_and_scripts_with_bearer():
    guard = AdminGuard(AdminPolicy(b"tok", frozenset()))

    def challenge(method: str, path: str, **headers: str) -> str:
        refusal = guard.check(method, path, CIMultiDict(headers))
        assert refusal is not None and refusal.status == 401
        return refusal.headers["WWW-Authenticate"]

    assert challenge("GET", "/") == BASIC_CHALLENGE  # the status page, however asked
    assert challenge("HEAD", "/", Authorization=basic("ops:no")) == BASIC_CHALLENGE
    html = "text/html,application/xhtml+xml,*/*;q=0.8"
    assert challenge("GET", "/pools", Accept=html) == BASIC_CHALLENGE  # typed in the address bar
    assert challenge("GET", "/pools", Accept=html, Authorization="Bearer no") == "Bearer"
    assert challenge("GET", "/status.json", Accept="application/json") == "Bearer"
    assert challenge("GET", "/metrics") == "Bearer"
    assert guard.unauthorized == {"missing": 4, "wrong": 2}  # the reasons as before
    assert guard.check("GET", "/", CIMultiDict(Authorization=basic("any:tok"))) is None


def test_load_policy_reads_the_token_stripped_and_names_the_key_on_errors(tmp_path: Path):
    token = tmp_path / "token"
    token.write_bytes(b"\n  s3cret \t\n")
    policy = load_policy(Admin(token_file=str(token), allowed_hosts=("a.example",)))
    assert policy == AdminPolicy(b"s3cret", frozenset({"a.example"}))
    assert load_policy(Admin()) == AdminPolicy(None, frozenset())
    token.write_text(" \n")
    with pytest.raises(ConfigError) as caught:
        load_policy(Admin(token_file=str(token)))
    assert str(caught.value) == f"admin.token_file: must hold a token, got an empty file '{token}'"
    with pytest.raises(ConfigError) as caught:
        load_policy(Admin(token_file=str(tmp_path)))
    assert str(caught.value) == f"admin.token_file: cannot read '{tmp_path}' (Is a directory)"


def test_a_workers_policy_is_its_supervisors_secret_but_the_file_is_still_read(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("operators")
    admin = Admin(token_file=str(token), allowed_hosts=("a.example",))
    assert load_policy(admin, "internal") == AdminPolicy(b"internal", frozenset())
    token.write_text("")
    with pytest.raises(ConfigError):
        load_policy(admin, "internal")


def check(guard: AdminGuard, method: str, path: str, **headers: str) -> int | None:
    refusal = guard.check(method, path, CIMultiDict(headers))
    return None if refusal is None else refusal.status


def test_the_guard_checks_host_then_token_then_the_cross_site_header():
    guard = AdminGuard(AdminPolicy(b"tok", frozenset()))
    ok = {"Host": "127.0.0.1:9901", "Authorization": "Bearer tok"}
    assert check(guard, "GET", "/metrics", **ok) is None
    assert check(guard, "GET", "/healthz", Host="evil.example") == 421  # probes too
    assert check(guard, "GET", "/healthz", Host="127.0.0.1") is None  # no token needed
    assert check(guard, "HEAD", "/readyz") is None
    assert check(guard, "POST", "/healthz", Host="127.0.0.1") == 401  # only GET/HEAD probes
    assert check(guard, "GET", "/pools", Host="evil.example", Authorization="Bearer x") == 421
    assert check(guard, "POST", "/reload", Host="localhost") == 401
    assert check(guard, "POST", "/reload", **ok) == 403
    assert check(guard, "POST", "/reload", **ok, **{"x-proxy-reload": "1"}) is None
    assert guard.unauthorized == {"missing": 2, "wrong": 0}
    refusal = guard.check("GET", "/pools", CIMultiDict(Authorization="Bearer no"))
    assert refusal is not None and refusal.headers == {"WWW-Authenticate": "Bearer"}
    assert guard.unauthorized == {"missing": 2, "wrong": 1}


def test_without_a_token_only_host_and_the_cross_site_header_are_checked():
    guard = AdminGuard(AdminPolicy(None, frozenset()))
    assert check(guard, "GET", "/pools") is None
    assert check(guard, "POST", "/reload") == 403
    assert check(guard, "POST", "/reload", **{"X-Proxy-Reload": "1"}) is None
    assert guard.unauthorized == {"missing": 0, "wrong": 0}


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", None),
        ("Application/JSON; charset=utf-8", None),
        # What a cross-site form or a no-cors fetch can send: refused.
        ("text/plain", 403),
        ("application/x-www-form-urlencoded", 403),
        ("multipart/form-data; boundary=x", 403),
        ("text/plain; application/json", 403),
    ],
)
def test_a_change_may_say_json_instead_of_the_custom_header(content_type, status):
    guard = AdminGuard(AdminPolicy(None, frozenset()))
    assert check(guard, "POST", "/reload", **{"Content-Type": content_type}) == status
