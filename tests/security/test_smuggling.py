"""Request smuggling and response desync: an attacker's bytes never reach the backend as a request
the proxy did not itself parse and answer, and no client ever reads another client's response.

Every case shares ONE pooled upstream connection (`pool.limit: 1`) between the clients, and
asserts the exact bytes each backend connection received (wire.mismatch: byte for byte except
the body framing the proxy chose). The rule is RFC 9112 §6.1/§6.3 and §11.2: a proxy rejects
an ambiguous or malformed message with 400 and closes, or normalises it; it never forwards
the ambiguity. Where the RFC allows both, a row accepts both and says so.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.security.wire import (
    HOST,
    Answers,
    Forwarded,
    Reply,
    answer,
    backend_mismatch,
    converse,
    describe,
    fwd,
    status,
)
from tests.support import config_dict, upstream

# Framing is what is checked here, byte for byte: no request ID or trace context added.
PLAIN = {"request_id": {"header": ""}, "trace_context": False}

SMUGGLED = f"GET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
WARMUP = fwd("GET", "/warmup")
VICTIM = fwd("GET", "/victim")


def raw(head: str, body: bytes = b"") -> bytes:
    """A request head (lines joined as written, so each row shows its exact line ends)."""
    return head.encode("latin-1") + body


def post(*lines: str, body: bytes = b"", target: str = "/a", version: str = "1.1") -> bytes:
    head = f"POST {target} HTTP/{version}\r\nHost: {HOST}\r\n" + "".join(lines) + "\r\n"
    return raw(head, body)


CHUNKED = "Transfer-Encoding: chunked\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


@dataclass(frozen=True)
class Outcome:
    """One acceptable result for the attacker: the statuses of the answers on its connection,
    in order, whether the proxy must close that connection (None: either), and what the
    backend must have received from it."""

    statuses: tuple[frozenset[int], ...]
    closed: bool | None
    forwarded: tuple[Forwarded, ...] = ()

    def problems(self, answers: Answers) -> list[str]:
        found = []
        if answers.error:
            found.append(f"malformed answer: {answers.error}")
        if len(answers.responses) != len(self.statuses):
            found.append(f"{len(answers.responses)} answers, expected {len(self.statuses)}")
        for response, allowed in zip(answers.responses, self.statuses, strict=False):
            if status(response) not in allowed:
                found.append(f"status {status(response)} not in {sorted(allowed)}")
        for response, request in zip(answers.responses, self.forwarded, strict=False):
            if status(response) == 200 and response.body != request.answer:
                found.append(f"answer {response.body!r} is not the one to {request.answer!r}")
        if self.closed is not None and answers.closed != self.closed:
            found.append("connection " + ("left open" if self.closed else "closed"))
        return found


def rejected(*statuses: int) -> Outcome:
    """Refused with one of `statuses` (400 unless given), connection closed, nothing upstream."""
    return Outcome((frozenset(statuses or (400,)),), closed=True)


REJECTED = rejected(400)
# RFC 9112 §6.3: a request whose final coding is not chunked MUST get 400 and a close; §6.1 says
# an unknown coding SHOULD get 501. Both apply to an unknown coding; either status is right.
REJECTED_CODING = rejected(400, 501)
# A number too large to hold: 400, or 413 (RFC 9110 §15.5.14), then close.
REJECTED_SIZE = rejected(400, 413)


def served(*requests: Forwarded, closed: bool | None = False) -> Outcome:
    """Each request answered in order (200 naming it) and forwarded exactly as given."""
    return Outcome(tuple(frozenset({200}) for _ in requests), closed, requests)


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    outcomes: tuple[Outcome, ...]


def case(id: str, data: bytes, *outcomes: Outcome) -> pytest.param:
    return pytest.param(Case(id, data, outcomes), id=id)


A_HELLO = fwd("POST", "/a", body=b"hello")
A_EMPTY = fwd("POST", "/a")
CL_SMUGGLE = b"0\r\n\r\n" + SMUGGLED  # TE reads an empty body, CL reads a request in it

REQUEST_CASES = [
    # --- Content-Length and Transfer-Encoding together (RFC 9112 §6.1, §6.3 item 3) ---
    # "ought to be handled as an error", or forwarded with TE alone; either way the server
    # MUST close after answering (§6.1), so the tail is never read as a request.
    case(
        "cl_then_te",
        post(f"Content-Length: {len(CL_SMUGGLE)}\r\n", CHUNKED, body=CL_SMUGGLE),
        REJECTED,
        served(A_EMPTY, closed=True),
    ),
    case(
        "te_then_cl",
        post(CHUNKED, f"Content-Length: {len(CL_SMUGGLE)}\r\n", body=CL_SMUGGLE),
        REJECTED,
        served(A_EMPTY, closed=True),
    ),
    case(
        "cl_with_te_obfuscated_by_case_and_space",
        post("Content-Length: 4\r\n", "transfer-encoding:  CHUNKED\r\n", body=CL_SMUGGLE),
        REJECTED,
        served(A_EMPTY, closed=True),
    ),
    # --- Transfer-Encoding obfuscations ---
    case(
        "te_chunked_identity",
        post("Transfer-Encoding: chunked, identity\r\n", body=CL_SMUGGLE),
        REJECTED_CODING,
    ),
    case("te_xchunked", post("Transfer-Encoding: xchunked\r\n", body=CL_SMUGGLE), REJECTED_CODING),
    case("te_chunkedx", post("Transfer-Encoding: chunkedx\r\n", body=CL_SMUGGLE), REJECTED_CODING),
    case(
        "te_vertical_tab",
        post("Transfer-Encoding:\x0bchunked\r\n", body=CL_SMUGGLE),
        REJECTED_CODING,
    ),
    case("te_quoted", post('Transfer-Encoding: "chunked"\r\n', body=CL_SMUGGLE), REJECTED_CODING),
    case(
        "te_twice_chunked_then_identity",
        post(CHUNKED, "Transfer-Encoding: identity\r\n", body=CL_SMUGGLE),
        REJECTED_CODING,
    ),
    # Chunked applied twice (RFC 9112 §7: a sender MUST NOT): no reading of it is safe.
    case("te_twice_chunked", post(CHUNKED, CHUNKED, body=HELLO_CHUNKED), REJECTED),
    # RFC 9112 §6.1: TE on HTTP/1.0 MUST be treated "as if the framing is faulty" and the
    # connection closed "after processing the message". Faulty framing reads as 400 (§6.3);
    # the "after processing" lets a server decode it strictly as chunked, answer, and close:
    # with the connection gone nothing is left to desync. Either, but always the close.
    case(
        "te_on_http10",
        post(CHUNKED, body=HELLO_CHUNKED, version="1.0"),
        REJECTED,
        served(A_HELLO, closed=True),
    ),
    case(
        "te_and_cl_on_http10",
        post("Content-Length: 5\r\n", CHUNKED, body=HELLO_CHUNKED, version="1.0"),
        REJECTED,
        served(A_HELLO, closed=True),
    ),
    # RFC 9112 §5.1: whitespace between a field name and its colon MUST get 400.
    case(
        "te_space_before_colon",
        post(
            f"Content-Length: {len(CL_SMUGGLE)}\r\n",
            "Transfer-Encoding : chunked\r\n",
            body=CL_SMUGGLE,
        ),
        REJECTED,
    ),
    # " chunked" and "chunked\t": optional whitespace around a value is not part of it (RFC 9110
    # §5.5), so these are valid chunked requests; refusing them is over-strict but safe.
    case(
        "te_leading_spaces",
        post("Transfer-Encoding:   chunked\r\n", body=HELLO_CHUNKED),
        served(A_HELLO),
        REJECTED,
    ),
    case(
        "te_trailing_tab",
        post("Transfer-Encoding: chunked\t\r\n", body=HELLO_CHUNKED),
        served(A_HELLO),
        REJECTED,
    ),
    # RFC 9112 §2.2: a whitespace-preceded line right after the start-line MUST be rejected or
    # ignored; ignored, the body is the Content-Length's.
    case(
        "te_line_before_host_starts_with_space",
        raw(
            f"POST /a HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: {HOST}\r\n"
            "Content-Length: 5\r\n\r\n",
            b"hello",
        ),
        REJECTED,
        served(A_HELLO),
    ),
    # --- Content-Length oddities (RFC 9112 §6.3 item 5, RFC 9110 §8.6) ---
    # Identical duplicates MUST be rejected or replaced by one valid Content-Length.
    case(
        "cl_duplicate_same",
        post("Content-Length: 5\r\n", "Content-Length: 5\r\n", body=b"hello"),
        REJECTED,
        served(A_HELLO),
    ),
    case(
        "cl_list_same", post("Content-Length: 5, 5\r\n", body=b"hello"), REJECTED, served(A_HELLO)
    ),
    case(
        "cl_duplicate_different",
        post("Content-Length: 5\r\n", "Content-Length: 6\r\n", body=b"hello" + SMUGGLED),
        REJECTED,
    ),
    case("cl_list_different", post("Content-Length: 5, 6\r\n", body=b"hello" + SMUGGLED), REJECTED),
    case("cl_plus_sign", post("Content-Length: +5\r\n", body=b"hello"), REJECTED),
    case("cl_hex", post("Content-Length: 0x5\r\n", body=b"hello"), REJECTED),
    case("cl_negative", post("Content-Length: -5\r\n", body=b"hello"), REJECTED),
    case("cl_space_before_colon", post("Content-Length : 5\r\n", body=b"hello"), REJECTED),
    case(
        "cl_huge", post("Content-Length: 99999999999999999999999\r\n", body=b"hello"), REJECTED_SIZE
    ),
    case(
        "cl_2_pow_64_plus_5",
        post("Content-Length: 18446744073709551621\r\n", body=b"hello"),
        REJECTED_SIZE,
    ),
    # " 5 ": whitespace around the value is optional whitespace (RFC 9110 §5.5): valid.
    case(
        "cl_spaces_around",
        post("Content-Length:  5 \r\n", body=b"hello"),
        served(A_HELLO),
        REJECTED,
    ),
    # A body that looks like a request is a body: it goes upstream inside its framing.
    case(
        "cl_body_is_a_request",
        raw(
            f"GET /a HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n", SMUGGLED
        ),
        served(fwd("GET", "/a", body=SMUGGLED)),
    ),
    # --- chunk-size lines (RFC 9112 §7.1: chunk-size = 1*HEXDIG, then [ext] CRLF) ---
    case("chunk_size_leading_spaces", post(CHUNKED, body=b"  5\r\nhello\r\n0\r\n\r\n"), REJECTED),
    # Trailing spaces before CRLF are not in the grammar (BWS is allowed only before ";"), but a
    # tolerant reader that takes 5 and re-frames the body forwards no ambiguity.
    case(
        "chunk_size_trailing_spaces",
        post(CHUNKED, body=b"5  \r\nhello\r\n0\r\n\r\n"),
        REJECTED,
        served(A_HELLO),
    ),
    case("chunk_size_0x_prefix", post(CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n"), REJECTED),
    case("chunk_size_negative", post(CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n"), REJECTED),
    case("chunk_size_plus", post(CHUNKED, body=b"+5\r\nhello\r\n0\r\n\r\n"), REJECTED),
    # 2**64 + 5: a 64-bit parser that wraps reads 5.
    case(
        "chunk_size_overflow",
        post(CHUNKED, body=b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
        REJECTED_SIZE,
    ),
    case(
        "chunk_size_huge",
        post(CHUNKED, body=b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        REJECTED_SIZE,
    ),
    # RFC 9112 §7.1.1: a recipient MUST ignore unrecognised chunk extensions, quoted ones too.
    case(
        "chunk_ext_token",
        post(CHUNKED, body=b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        served(A_HELLO),
    ),
    case(
        "chunk_ext_quoted_with_semicolon_and_escape",
        post(CHUNKED, body=b'5;n="a;b\\"c";m=d\r\nhello\r\n0\r\n\r\n'),
        served(A_HELLO),
    ),
    # A bare LF ending the chunk line (inside or without an extension): one parser's line end is
    # another's extension byte, the "funky chunks" desync.
    case("chunk_ext_bare_lf", post(CHUNKED, body=b"5;x\nhello\r\n0\r\n\r\n"), REJECTED),
    case(
        "chunk_ext_quoted_bare_lf",
        post(CHUNKED, body=b'5;x="a\nb"\r\nhello\r\n0\r\n\r\n'),
        REJECTED,
    ),
    case("chunk_size_bare_lf", post(CHUNKED, body=b"5\nhello\r\n0\r\n\r\n"), REJECTED),
    case("last_chunk_bare_lf", post(CHUNKED, body=b"5\r\nhello\r\n0\n\n"), REJECTED),
    case("chunk_data_missing_crlf", post(CHUNKED, body=b"5\r\nhello0\r\n\r\n"), REJECTED),
    case("chunk_data_longer_than_size", post(CHUNKED, body=b"3\r\nhello\r\n0\r\n\r\n"), REJECTED),
    case("chunk_data_then_request", post(CHUNKED, body=b"5\r\nhello" + SMUGGLED), REJECTED),
    # A trailer section naming Content-Length: never a framing field (RFC 9110 §6.5.1); the
    # proxy drops trailers (it cannot relay them) or refuses.
    case(
        "trailer_named_content_length",
        post(CHUNKED, body=b"5\r\nhello\r\n0\r\nContent-Length: 44\r\n\r\n"),
        served(A_HELLO),
        REJECTED,
    ),
    # --- line ends, folding and control bytes in the head ---
    # RFC 9112 §2.2: a recipient MAY take a bare LF as a line end: reject or normalise to CRLF.
    case(
        "bare_lf_head",
        raw(f"GET /a HTTP/1.1\nHost: {HOST}\n\n"),
        REJECTED,
        served(fwd("GET", "/a")),
    ),
    case(
        "bare_lf_before_content_length",
        raw(f"POST /a HTTP/1.1\r\nHost: {HOST}\r\nX-Note: a\nContent-Length: 5\r\n\r\n", b"hello"),
        REJECTED,
        served(fwd("POST", "/a", ("X-Note", "a"), body=b"hello")),
    ),
    # A bare CR MUST be treated as invalid or replaced by SP (RFC 9112 §2.2).
    case("bare_cr_ends_request_line", raw(f"GET /a HTTP/1.1\rHost: {HOST}\r\n\r\n"), REJECTED),
    # RFC 9112 §5.2: obs-fold in a request MUST be rejected or replaced by SP.
    case(
        "obs_fold",
        raw(f"GET /a HTTP/1.1\r\nHost: {HOST}\r\nX-Folded: a\r\n b\r\n\r\n"),
        REJECTED,
        served(fwd("GET", "/a", ("X-Folded", "a b"))),
    ),
    case(
        "obs_fold_hides_te",
        post(
            "Content-Length: 5\r\n", "X-Folded: a\r\n Transfer-Encoding: chunked\r\n", body=b"hello"
        ),
        REJECTED,
        served(fwd("POST", "/a", ("X-Folded", "a Transfer-Encoding: chunked"), body=b"hello")),
    ),
    # RFC 9110 §5.5: CR, LF or NUL in a value MUST be rejected or replaced by SP.
    case(
        "nul_in_value",
        raw(f"GET /a HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\x00b\r\n\r\n"),
        REJECTED,
        served(fwd("GET", "/a", ("X-A", "a b"))),
    ),
    case(
        "bare_cr_in_value",
        raw(f"GET /a HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\rb\r\n\r\n"),
        REJECTED,
        served(fwd("GET", "/a", ("X-A", "a b"))),
    ),
    case(
        "bare_cr_hides_te",
        post("Content-Length: 5\r\n", "X-A: a\rTransfer-Encoding: chunked\r\n", body=b"hello"),
        REJECTED,
        served(fwd("POST", "/a", ("X-A", "a Transfer-Encoding: chunked"), body=b"hello")),
    ),
    # --- pipelining and keep-alive: each request answered in order, each its own upstream ---
    case(
        "pipelined_after_content_length_body",
        post("Content-Length: 5\r\n", body=b"hello", target="/p1")
        + raw(f"GET /p2 HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        served(fwd("POST", "/p1", body=b"hello"), fwd("GET", "/p2")),
    ),
    case(
        "pipelined_after_chunked_body",
        post(CHUNKED, body=HELLO_CHUNKED, target="/p1")
        + raw(f"GET /p2 HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        served(fwd("POST", "/p1", body=b"hello"), fwd("GET", "/p2")),
    ),
    case(
        "http10_keep_alive_pipelined",
        raw(
            f"GET /k1 HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n"
            f"GET /k2 HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n"
        ),
        served(fwd("GET", "/k1"), fwd("GET", "/k2"), closed=None),
    ),
    case(
        "http10_keep_alive_post_then_get",
        post(
            "Connection: keep-alive\r\n",
            "Content-Length: 5\r\n",
            body=b"hello",
            target="/k1",
            version="1.0",
        )
        + raw(f"GET /k2 HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n"),
        served(fwd("POST", "/k1", body=b"hello"), fwd("GET", "/k2"), closed=None),
    ),
    # A request after one that ends the connection (HTTP/1.0 without keep-alive, or
    # "Connection: close"): the server MUST NOT process it (RFC 9112 §9.6). The client broke
    # a MUST NOT by sending it, so refusing the whole write is as safe as answering the first.
    case(
        "http10_without_keep_alive_then_pipelined",
        raw(f"GET /k1 HTTP/1.0\r\nHost: {HOST}\r\n\r\nGET /k2 HTTP/1.0\r\nHost: {HOST}\r\n\r\n"),
        served(fwd("GET", "/k1"), closed=True),
        REJECTED,
    ),
    case(
        "connection_close_then_pipelined",
        raw(f"GET /c1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n") + SMUGGLED,
        served(fwd("GET", "/c1"), closed=True),
        REJECTED,
    ),
]


async def _answered(port: int, target: str) -> Answers:
    return await converse(port, raw(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), expect=1)


def _own_answer(answers: Answers, target: str) -> list[str]:
    """Problems with a plain GET's answer: it must be exactly one 200 naming `target`."""
    found = [answers.error] if answers.error else []
    bodies = [r.body for r in answers.responses]
    if answers.statuses != [200] or bodies != [f"GET {target}".encode()]:
        found.append(f"expected one 200 'GET {target}', got {answers.statuses} {bodies!r}")
    if any(r.all("Set-Cookie") for r in answers.responses):
        found.append("a Set-Cookie it was never sent")
    return found


@pytest.mark.parametrize("case", REQUEST_CASES)
async def test_smuggling_attempt_never_reaches_the_backend_or_another_client(recorder, proxy, case):
    origin = await recorder()
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 1})}, **PLAIN))
    port = server.proxy_address[1]
    warmup = await _answered(port, "/warmup")  # leaves one idle connection in the pool
    most = max(len(o.statuses) for o in case.outcomes)
    attacker = await converse(port, case.raw, expect=most)
    victim = await _answered(port, "/victim")
    await origin.settle(2)  # the warm-up and the victim were answered: only strays remain

    report = f"attacker: {attacker}\nvictim: {victim}\n{describe(origin)}"
    assert _own_answer(warmup, "/warmup") == [], report
    checked = []
    for outcome in case.outcomes:
        problems = outcome.problems(attacker)
        if not problems:
            upstream_bytes = [[WARMUP, *outcome.forwarded, VICTIM]]
            problem = backend_mismatch(origin, upstream_bytes)
            problems = [problem] if problem else []
        if not problems:
            break
        checked.append(problems)
    else:
        pytest.fail(f"no acceptable outcome: {checked}\n{report}")
    assert _own_answer(victim, "/victim") == [], report
    assert origin.malformed == [], report


# --- the response side: a misbehaving backend must not reach the next client ---


@dataclass(frozen=True)
class ResponseCase:
    id: str
    reply: Reply  # what the backend writes for the first client's request
    first: tuple[tuple[int, bytes | None], ...]  # acceptable (status, body or None: any)
    method: str = "GET"
    wait: float = 0.05  # before the next client comes: time for late stray bytes to land
    reuse_allowed: bool = False  # a well-formed exchange: the connection may serve the next


FIRST = b"GET /first"
SET_COOKIE_302 = (
    b"HTTP/1.1 302 Found\r\nLocation: /evil\r\nSet-Cookie: session=ATTACKER\r\n"
    b"Content-Length: 0\r\n\r\n"
)
BAD_GATEWAY = (502, None)


def respond(id: str, reply: Reply, *first: tuple[int, bytes | None], **kw: object) -> pytest.param:
    return pytest.param(ResponseCase(id, reply, first, **kw), id=id)  # type: ignore[arg-type]


RESPONSE_CASES = [
    # Bytes beyond the end of the response, in the same write. The first answer was complete,
    # so the first client may have it, or a 502 if the proxy refuses the whole read.
    respond(
        "two_responses_for_one_request",
        Reply(answer(FIRST) + answer(b"SMUGGLED")),
        (200, FIRST),
        BAD_GATEWAY,
    ),
    respond(
        "extra_byte_after_content_length_body",
        Reply(answer(FIRST) + b"X"),
        (200, FIRST),
        BAD_GATEWAY,
    ),
    # Written 0.3 s after the answer, when the connection sits idle in the pool (issue 8).
    respond(
        "unsolicited_302_on_idle_connection",
        Reply(answer(FIRST), SET_COOKIE_302, 0.3),
        (200, FIRST),
        wait=0.6,
    ),
    respond(
        "unsolicited_byte_on_idle_connection",
        Reply(answer(FIRST), b"X", 0.3),
        (200, FIRST),
        wait=0.6,
    ),
    # RFC 9110 §5.5: a CR or LF inside a value: reject (502) or replace by SP; never pass it on.
    respond(
        "bare_cr_in_header_value",
        Reply(
            b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\n"
            b"Content-Length: 10\r\n\r\nGET /first"
        ),
        (200, FIRST),
        BAD_GATEWAY,
    ),
    # RFC 9112 §2.2 lets a recipient take a bare LF for a line end: then this is two header
    # lines, the framing is unambiguous and no byte is left over, so the connection may serve
    # the next request (aiohttp's client parser does so, as nginx does). Forwarded, the two
    # lines leave with CRLF; the Set-Cookie is the backend's own.
    respond(
        "bare_lf_in_header_value",
        Reply(
            b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: injected=1\r\n"
            b"Content-Length: 10\r\n\r\nGET /first"
        ),
        (200, FIRST),
        BAD_GATEWAY,
        reuse_allowed=True,
    ),
    respond(
        "switching_protocols_without_upgrade_request",
        Reply(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            + answer(b"SMUGGLED")
        ),
        BAD_GATEWAY,
    ),
    respond(
        "status_000", Reply(b"HTTP/1.1 000 X\r\nContent-Length: 10\r\n\r\nGET /first"), BAD_GATEWAY
    ),
    respond(
        "status_600", Reply(b"HTTP/1.1 600 X\r\nContent-Length: 10\r\n\r\nGET /first"), BAD_GATEWAY
    ),
    # Never forwarded as it came. RFC 9112 §5.1 also lets a proxy remove the whitespace and
    # forward it: then the client gets the answer, with a well-formed Content-Length.
    respond(
        "content_length_space_before_colon",
        Reply(b"HTTP/1.1 200 OK\r\nContent-Length : 10\r\n\r\nGET /first"),
        BAD_GATEWAY,
        (200, FIRST),
    ),
    # RFC 9112 §6.3 item 5: differing Content-Lengths from upstream: close it and 502.
    respond(
        "duplicate_content_length_differs",
        Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 6\r\n\r\nGET /first"),
        BAD_GATEWAY,
    ),
    # RFC 9112 §6.3 item 3: an error, or forwarded by TE alone without the Content-Length.
    respond(
        "content_length_and_chunked",
        Reply(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"a\r\nGET /first\r\n0\r\n\r\n"
        ),
        BAD_GATEWAY,
        (200, FIRST),
    ),
    # A HEAD response has no body (RFC 9112 §6.3 item 1): those bytes would be the next
    # response. The head may reach the client (without them), or a 502.
    respond(
        "head_response_with_a_body",
        Reply(answer(b"HEAD /first")),
        (200, b""),
        BAD_GATEWAY,
        method="HEAD",
    ),
    # Interim responses before the final one are well-formed HTTP: the client gets the final
    # answer, and the connection may be reused.
    respond(
        "continue_then_final",
        Reply(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(FIRST)),
        (200, FIRST),
        reuse_allowed=True,
    ),
    respond(
        "early_hints_then_final",
        Reply(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + answer(FIRST)),
        (200, FIRST),
        reuse_allowed=True,
    ),
]


@pytest.mark.parametrize("case", RESPONSE_CASES)
async def test_misbehaving_backend_never_answers_the_next_client(recorder, proxy, case):
    origin = await recorder({"/first": case.reply})
    server = await proxy(config_dict({"app": upstream(origin.url, pool={"limit": 1})}, **PLAIN))
    port = server.proxy_address[1]
    request = raw(f"{case.method} /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    first = await converse(port, request, [case.method], expect=1)
    await asyncio.sleep(case.wait)
    second = await _answered(port, "/second")
    third = await _answered(port, "/third")
    await origin.settle(3)

    report = f"first: {first}\nsecond: {second}\nthird: {third}\n{describe(origin)}"
    got = [(status(r), r.body) for r in first.responses]
    assert first.error is None, report
    assert len(got) == 1, report
    assert any(s == got[0][0] and b in (None, got[0][1]) for s, b in case.first), report
    assert _own_answer(second, "/second") == [], report
    assert _own_answer(third, "/third") == [], report
    first_request = Forwarded(case.method, "/first")
    closed = [[first_request], [fwd("GET", "/second"), fwd("GET", "/third")]]
    reused = [[first_request, fwd("GET", "/second"), fwd("GET", "/third")]]
    # The poisoned connection is closed, so the next requests arrive on a new one.
    problem = backend_mismatch(origin, closed)
    if problem is not None and case.reuse_allowed:
        problem = backend_mismatch(origin, reused)
    assert problem is None, f"{problem}\n{report}"
