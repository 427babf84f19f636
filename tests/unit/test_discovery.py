"""proxy/discovery.py against a real DNS server on 127.0.0.1 (tests/dns.py) and the system
resolver: what a name resolves to, what each failure says, and what the refresh loop keeps."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy import config
from proxy.config import DnsTarget, SrvTarget
from proxy.discovery import Discovery, DiscoveryError, Found, resolve
from tests.dns import DnsServer

API = DnsTarget(dns="api.test", port=8080, weight=3)
SRV = SrvTarget(srv="_http._tcp.api.test")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as started:
        yield started


def servers(server: DnsServer) -> tuple[tuple[str, int], ...]:
    return (("127.0.0.1", server.port),)


def api(*addresses: str, weight: int = 3) -> list[Found]:
    """What API resolves to for `addresses`."""
    return [Found(f"http://{a}:8080", weight, "dns:api.test", "api.test") for a in addresses]


async def until(check: Callable[[], bool], within: float = 2.0) -> None:
    """Poll `check` (state the loop gives no event for) for at most `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


# --- resolve(): what a name becomes ---


async def test_every_a_and_aaaa_address_is_a_target_with_ipv6_bracketed(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.2", "10.0.0.1"])
    server.set_aaaa("api.test", ["fd00::1"])
    found = await resolve(API, servers(server), 1.0)
    assert found == api("10.0.0.1", "10.0.0.2", "[fd00::1]")
    assert sorted(server.queries) == [("api.test", "A"), ("api.test", "AAAA")]


async def test_a_name_with_only_aaaa_records_resolves(server: DnsServer) -> None:
    server.set_aaaa("api.test", ["fd00::2", "fd00::1"])
    assert await resolve(API, servers(server), 1.0) == api("[fd00::1]", "[fd00::2]")


async def test_an_answer_too_big_for_udp_is_asked_again_over_tcp(server: DnsServer) -> None:
    addresses = [f"10.0.1.{i}" for i in range(60)]  # about 1 KB: over 512 bytes, so TC is set
    server.set_a("api.test", addresses)
    found = await resolve(API, servers(server), 1.0)
    assert [f.url for f in found] == sorted(f"http://{a}:8080" for a in addresses)
    assert server.tcp_queries == 1


async def test_srv_keeps_the_lowest_priority_and_reads_the_additional_section(
    server: DnsServer,
) -> None:
    server.set_srv(
        "_http._tcp.api.test",
        [(10, 5, 9001, "a.api.test."), (10, 0, 9002, "b.api.test."), (20, 7, 9003, "c.api.test.")],
    )
    server.set_a("a.api.test", ["10.0.0.1"])
    server.set_aaaa("a.api.test", ["fd00::1"])
    server.set_a("b.api.test", ["10.0.0.2"])
    server.set_a("c.api.test", ["10.0.0.3"])
    found = await resolve(SRV, servers(server), 1.0)
    where = "srv:_http._tcp.api.test"
    assert found == [
        Found("http://10.0.0.1:9001", 5, where, "a.api.test"),
        Found("http://10.0.0.2:9002", 1, where, "b.api.test"),  # weight 0 counts as 1
        Found("http://[fd00::1]:9001", 5, where, "a.api.test"),
    ]
    assert server.queries == [("_http._tcp.api.test", "SRV")]  # no second query: all given


async def test_srv_targets_missing_from_the_additional_section_are_asked_for(
    server: DnsServer,
) -> None:
    server.additional = False
    server.set_srv("_http._tcp.api.test", [(1, 2, 9001, "a.api.test."), (1, 4, 9002, "b.api.test")])
    server.set_a("a.api.test", ["10.0.0.1"])
    server.set_aaaa("b.api.test", ["fd00::2"])
    found = await resolve(SrvTarget(srv="_http._tcp.api.test", scheme="https"), servers(server), 1)
    assert found == [
        Found("https://10.0.0.1:9001", 2, "srv:_http._tcp.api.test", "a.api.test"),
        Found("https://[fd00::2]:9002", 4, "srv:_http._tcp.api.test", "b.api.test"),
    ]
    asked = sorted(server.queries[1:])
    assert asked == [("a.api.test", "A"), ("a.api.test", "AAAA"), ("b.api.test", "A"),
                     ("b.api.test", "AAAA")]  # fmt: skip


async def test_an_srv_target_without_addresses_is_left_out(server: DnsServer) -> None:
    server.set_srv(
        "_http._tcp.api.test", [(1, 1, 9001, "gone.api.test."), (1, 1, 9002, "a.api.test.")]
    )
    server.set_a("a.api.test", ["10.0.0.1"])
    found = await resolve(SRV, servers(server), 1.0)
    assert found == [Found("http://10.0.0.1:9002", 1, "srv:_http._tcp.api.test", "a.api.test")]


@pytest.mark.parametrize(
    ("spec", "prepare", "message"),
    [
        (API, lambda s: None, "dns:api.test: no such name (NXDOMAIN)"),
        (SRV, lambda s: None, "srv:_http._tcp.api.test: no such name (NXDOMAIN)"),
        (API, lambda s: s.set_srv("api.test", []), "dns:api.test: no A or AAAA records"),
        (SRV, lambda s: s.set_a("_http._tcp.api.test", ["10.0.0.1"]),
         "srv:_http._tcp.api.test: no SRV records"),
        (SRV, lambda s: s.set_srv("_http._tcp.api.test", [(1, 1, 80, "gone.test.")]),
         "srv:_http._tcp.api.test: no target of the SRV records has an A or AAAA record"),
    ],
)  # fmt: skip
async def test_a_name_with_nothing_to_offer_is_an_error_saying_so(
    server: DnsServer,
    spec: DnsTarget | SrvTarget,
    prepare: Callable[[DnsServer], None],
    message: str,
) -> None:
    prepare(server)
    with pytest.raises(DiscoveryError) as caught:
        await resolve(spec, servers(server), 1.0)
    assert str(caught.value) == message


async def test_servfail_is_an_error_naming_the_server_and_rcode(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    server.fail = True
    with pytest.raises(DiscoveryError) as caught:
        await resolve(API, servers(server), 1.0)
    answered = f"Do53:127.0.0.1@{server.port} answered SERVFAIL"
    assert str(caught.value) == f"dns:api.test: A query failed: {answered}"


async def test_servfail_for_an_srv_target_names_the_target(server: DnsServer) -> None:
    server.additional = False
    server.set_srv("_http._tcp.api.test", [(1, 1, 9001, "a.api.test.")])
    server.set_a("a.api.test", ["10.0.0.1"])
    server.fail_names.add("a.api.test")
    with pytest.raises(DiscoveryError) as caught:
        await resolve(SRV, servers(server), 1.0)
    answered = f"Do53:127.0.0.1@{server.port} answered SERVFAIL"
    assert str(caught.value) == (
        f"srv:_http._tcp.api.test: target a.api.test.: A query failed: {answered}"
    )


async def test_a_silent_server_is_a_timeout_error_within_the_timeout(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    server.silent = True
    started = time.monotonic()
    with pytest.raises(DiscoveryError) as caught:
        await resolve(API, servers(server), 0.3)
    assert time.monotonic() - started < 0.6
    assert str(caught.value) == f"dns:api.test: no answer from 127.0.0.1:{server.port} within 0.3 s"
    assert ("api.test", "A") in server.queries


async def test_the_system_resolver_answers_localhost_from_etc_hosts() -> None:
    spec = DnsTarget(dns="localhost", port=8080)
    expected = sorted(  # this machine's /etc/hosts: 127.0.0.1, and ::1 where it lists it
        {f"http://{a}:8080" if ":" not in a else f"http://[{a}]:8080"
         for *_, (a, *_) in socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)}
    )  # fmt: skip
    found = await resolve(spec, (), 2.0)
    assert "http://127.0.0.1:8080" in expected
    assert found == [Found(url, 1, "dns:localhost", "localhost") for url in expected]


async def test_the_system_resolver_says_why_a_name_does_not_resolve() -> None:
    with pytest.raises(DiscoveryError) as caught:
        await resolve(DnsTarget(dns="nope.invalid", port=80), (), 2.0)
    assert str(caught.value).startswith("dns:nope.invalid: getaddrinfo failed: ")


async def test_srv_needs_name_servers() -> None:
    with pytest.raises(DiscoveryError) as caught:
        await resolve(SRV, (), 1.0)
    assert str(caught.value) == (
        "srv:_http._tcp.api.test: needs discovery.resolver name servers (getaddrinfo has no SRV)"
    )


# --- Discovery: the refresh loop ---


class Heard:
    """on_change's calls, in order."""

    def __init__(self) -> None:
        self.sets: list[tuple[Found, ...]] = []

    def __call__(self, found: tuple[Found, ...]) -> None:
        self.sets.append(found)


def discovery(
    server: DnsServer, heard: Heard, *specs: DnsTarget | SrvTarget, refresh: float = 0.2
) -> Discovery:
    settings = config.Discovery(refresh=refresh, resolver=servers(server))
    return Discovery("api", specs or (API,), settings, heard)


async def test_first_tells_what_was_found_then_only_changes_are_told(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    heard = Heard()
    found = discovery(server, heard)
    await found.first(1.0)
    assert heard.sets == [tuple(api("10.0.0.1"))]
    found.start()
    try:
        await until(lambda: found.refreshes["ok"] >= 4)  # three refreshes, nothing changed
        assert heard.sets == [tuple(api("10.0.0.1"))]
        server.set_a("api.test", ["10.0.0.1", "10.0.0.2"])
        started = time.monotonic()
        await until(lambda: len(heard.sets) == 2)
        assert time.monotonic() - started < 1.0
        assert heard.sets[1] == tuple(api("10.0.0.1", "10.0.0.2"))
        assert found.refreshes["failed"] == 0
        assert found.last_error is None
    finally:
        await found.aclose()


async def test_first_with_nothing_found_tells_an_empty_set_and_never_raises(
    server: DnsServer,
) -> None:
    heard = Heard()
    found = discovery(server, heard)
    await found.first(1.0)
    assert heard.sets == [()]
    assert found.refreshes == {"ok": 0, "failed": 1}
    assert found.last_error == "dns:api.test: no such name (NXDOMAIN)"


async def test_a_failing_server_keeps_the_last_good_set_until_it_recovers(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    server.set_a("api.test", ["10.0.0.1", "10.0.0.2"])
    heard = Heard()
    found = discovery(server, heard)
    await found.first(1.0)
    found.start()
    try:
        server.fail = True
        await until(lambda: found.refreshes["failed"] >= 2)
        answered = f"Do53:127.0.0.1@{server.port} answered SERVFAIL"
        assert found.last_error == f"dns:api.test: A query failed: {answered}"
        server.fail, server.silent = False, True
        await until(lambda: found.refreshes["failed"] >= 4, within=3.0)
        assert found.last_error == f"dns:api.test: no answer from {server.address} within 0.2 s"
        assert heard.sets == [tuple(api("10.0.0.1", "10.0.0.2"))]  # nothing fewer, ever

        server.set_a("api.test", ["10.0.0.3"])
        server.silent = False
        await until(lambda: len(heard.sets) == 2)
        assert heard.sets[1] == tuple(api("10.0.0.3"))
        assert found.last_error is None
    finally:
        await found.aclose()
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert records == [  # one warning for the whole failing stretch, one line at recovery
        ("WARNING", f"upstream api: dns:api.test: A query failed: {answered}; "
                    "keeping its last 2 targets"),
        ("INFO", "upstream api: dns:api.test resolves again (1 targets)"),
    ]  # fmt: skip


async def test_one_failing_spec_keeps_its_set_while_the_others_change(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    server.set_srv("_http._tcp.api.test", [(1, 1, 9001, "a.api.test.")])
    server.set_a("a.api.test", ["10.0.1.1"])
    heard = Heard()
    found = discovery(server, heard, API, SRV)
    await found.first(1.0)
    srv = Found("http://10.0.1.1:9001", 1, "srv:_http._tcp.api.test", "a.api.test")
    assert heard.sets == [(*api("10.0.0.1"), srv)]
    found.start()
    try:
        server.remove("_http._tcp.api.test")  # NXDOMAIN from now on: keep 10.0.1.1
        server.set_a("api.test", ["10.0.0.2"])
        await until(lambda: len(heard.sets) == 2)
        assert heard.sets[1] == (*api("10.0.0.2"), srv)
        await until(lambda: found.refreshes["failed"] >= 3)
        assert len(heard.sets) == 2
        assert found.last_error == "srv:_http._tcp.api.test: no such name (NXDOMAIN)"
    finally:
        await found.aclose()


async def test_an_on_change_that_raises_does_not_stop_the_refresh(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    calls: list[tuple[Found, ...]] = []

    def on_change(found: tuple[Found, ...]) -> None:
        calls.append(found)
        raise RuntimeError("broken owner")

    settings = config.Discovery(refresh=0.2, resolver=servers(server))
    found = Discovery("api", [API], settings, on_change)
    await found.first(1.0)
    found.start()
    try:
        server.set_a("api.test", ["10.0.0.2"])
        await until(lambda: len(calls) == 2)
        assert calls[1] == tuple(api("10.0.0.2"))
    finally:
        await found.aclose()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "upstream api: on_change of discovery failed"
    ] * 2


async def test_aclose_ends_the_refresh_task(server: DnsServer) -> None:
    server.set_a("api.test", ["10.0.0.1"])
    found = discovery(server, Heard(), refresh=0.05)
    found.start()
    await until(lambda: found.refreshes["ok"] >= 1)
    before = len(server.queries)
    await found.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await asyncio.sleep(0.2)
    assert len(server.queries) == before  # no resolution after aclose
    await found.aclose()  # twice is harmless


# --- tests/dns.py itself: usable from another process, and leaves nothing behind ---


def test_the_dns_server_answers_another_process_while_the_test_blocks() -> None:
    program = (
        "import asyncio, sys\n"
        "from proxy.config import DnsTarget\n"
        "from proxy.discovery import resolve\n"
        "spec = DnsTarget(dns='api.test', port=80)\n"
        "found = asyncio.run(resolve(spec, (('127.0.0.1', int(sys.argv[1])),), 2.0))\n"
        "print(' '.join(f.url for f in found))\n"
    )
    with DnsServer() as server:
        server.set_a("api.test", ["10.0.0.1"])
        done = subprocess.run(
            [sys.executable, "-c", program, str(server.port)],
            capture_output=True, text=True, timeout=20, cwd=REPO,
        )  # fmt: skip
    assert (done.stdout, done.stderr) == ("http://10.0.0.1:80\n", "")


async def test_the_dns_server_stops_its_thread_and_sockets_under_async_with() -> None:
    threads = threading.active_count()
    async with DnsServer() as server:
        server.set_a("api.test", ["10.0.0.1"])
        assert await resolve(API, (("127.0.0.1", server.port),), 1.0) == api("10.0.0.1")
        assert threading.active_count() == threads + 1
    assert threading.active_count() == threads  # and filterwarnings=error: no unclosed socket
