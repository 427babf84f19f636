"""TLS at the edge: SNI, rotation without a restart, TLS versions, client certificates both ways,
the expiry gauge and `--check`. Certificates are made at test time (trustme); real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import ssl
import time
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import web

from proxy.config import load_config, parse_config
from proxy.server import ProxyServer
from tests.support import (
    REPO,
    admin_get,
    answering,
    config_dict,
    eventually,
    get,
    http_response,
    read_response,
    run_cli,
    upstream,
    write_config,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    """The CA the proxy trusts for client certificates (not the one of its own certificates)."""
    return trustme.CA()


def write_pair(
    ca: trustme.CA, directory: Path, stem: str, *names: str, **issue: Any
) -> dict[str, str]:
    """A certificate (common name `stem`) for `names` and its key, as a config's cert/key."""
    cert = ca.issue_cert(*names, common_name=stem, **issue)
    paths = {"cert": directory / f"{stem}.pem", "key": directory / f"{stem}.key"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


def replace_file(target: str, source: str) -> None:
    """Put `source`'s bytes at `target` by an atomic rename, as cert-manager or a deploy does."""
    temporary = Path(target + ".new")
    temporary.write_bytes(Path(source).read_bytes())
    os.replace(temporary, target)


def client_context(ca: trustme.CA, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    """Trusts `ca`; names are not checked: the tests look at which certificate came."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    for name, version in versions.items():
        setattr(context, name, version)
    return context


class TLSClient:
    """One TLS connection to the proxy, kept open across requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(
        cls, port: int, context: ssl.SSLContext, server_name: str | None = None
    ) -> TLSClient:
        # server_hostname "" sends no SNI.
        return cls(*await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name or ""
        ))  # fmt: skip

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self.writer.get_extra_info("ssl_object")

    @property
    def certificate(self) -> str:
        """The common name of the certificate the proxy presented."""
        subject = self.ssl_object.getpeercert()["subject"]
        return next(value for rdn in subject for kind, value in rdn if kind == "commonName")

    async def get(self, target: str = "/") -> int:
        self.writer.write(get(target))
        await self.writer.drain()
        return (await asyncio.wait_for(read_response(self.reader), 5)).status

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def certificate_for(port: int, context: ssl.SSLContext, server_name: str | None) -> str:
    client = await TLSClient.connect(port, context, server_name)
    try:
        return client.certificate
    finally:
        await client.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[ProxyServer]]:
    """ProxyServers a test builds itself (with a config file, an access log or a fast poll)."""
    started: list[ProxyServer] = []
    yield started
    for server in started:
        await server.stop()


async def start(
    started: list[ProxyServer], config: dict[str, Any], path: Path | None = None, **kwargs: Any
) -> ProxyServer:
    if path is not None:
        write_config(path, config)
    parsed = load_config(path) if path is not None else parse_config(config)
    server = ProxyServer(parsed, config_path=path, shutdown_grace=2.0, **kwargs)
    started.append(server)
    await server.start()
    return server


# --- SNI ---


async def test_sni_picks_exact_name_then_one_label_wildcard_else_default(
    backend, proxy, ca, tmp_path
):
    origin = await backend(answering(http_response(body=b"ok")))
    tls = write_pair(ca, tmp_path, "default", "default.test")
    tls["certificates"] = [  # type: ignore[assignment]
        write_pair(ca, tmp_path, "api", "api.example.com"),
        write_pair(ca, tmp_path, "wildcard", "*.example.com"),
    ]
    server = await proxy(config_dict({"app": upstream(origin.url)}, listen={"tls": tls}))
    port = server.proxy_address[1]
    context = client_context(ca)
    expected = {
        "api.example.com": "api",
        "www.example.com": "wildcard",  # no exact name: the wildcard
        "a.b.example.com": "default",  # a wildcard matches exactly one label
        "example.com": "default",
        "default.test": "default",
        "unknown.test": "default",
        None: "default",  # no SNI at all
    }
    got = {name: await certificate_for(port, context, name) for name in expected}
    assert got == expected

    context.set_alpn_protocols(["h2", "http/1.1"])
    client = await TLSClient.connect(port, context, "www.example.com")
    try:
        assert client.ssl_object.selected_alpn_protocol() == "http/1.1"
        assert await client.get() == 200
    finally:
        await client.close()


# --- rotation ---


async def test_reload_rotates_certificate_while_open_connection_keeps_its_own(
    backend, servers, ca, tmp_path
):
    origin = await backend(answering(http_response(body=b"ok")))
    live = write_pair(ca, tmp_path, "v1", "app.test")
    renewed = write_pair(ca, tmp_path, "v2", "app.test")
    config = config_dict({"app": upstream(origin.url)}, listen={"tls": live})
    server = await start(servers, config, tmp_path / "proxy.yaml", certificate_poll=3600)
    port = server.proxy_address[1]
    context = client_context(ca)
    kept = await TLSClient.connect(port, context, "app.test")
    try:
        assert (kept.certificate, await kept.get()) == ("v1", 200)
        replace_file(live["cert"], renewed["cert"])
        replace_file(live["key"], renewed["key"])
        applied, _ = await server.reload()
        assert applied
        assert await certificate_for(port, context, "app.test") == "v2"
        # The connection made before carries on, on its session and certificate.
        assert (kept.certificate, await kept.get()) == ("v1", 200)
    finally:
        await kept.close()
    assert server.metrics.reloads == {"success": 1, "failure": 0, "rolled_back": 0}


async def test_file_watcher_rotates_certificate_without_a_reload(backend, servers, ca, tmp_path):
    origin = await backend(answering(http_response(body=b"ok")))
    live = write_pair(ca, tmp_path, "v1", "app.test")
    renewed = write_pair(ca, tmp_path, "v2", "app.test")
    config = config_dict({"app": upstream(origin.url)}, listen={"tls": live})
    server = await start(servers, config, certificate_poll=0.05)
    port = server.proxy_address[1]
    context = client_context(ca)
    kept = await TLSClient.connect(port, context, "app.test")
    try:
        assert (kept.certificate, await kept.get()) == ("v1", 200)
        replace_file(live["key"], renewed["key"])
        replace_file(live["cert"], renewed["cert"])

        async def renewed_served() -> bool:
            return await certificate_for(port, context, "app.test") == "v2"

        await eventually(renewed_served)
        assert (kept.certificate, await kept.get()) == ("v1", 200)
    finally:
        await kept.close()


async def test_bad_new_certificate_keeps_the_old_and_counts_a_failed_reload(
    backend, servers, ca, tmp_path, caplog
):
    origin = await backend(answering(http_response(body=b"ok")))
    live = write_pair(ca, tmp_path, "v1", "app.test")
    other = write_pair(ca, tmp_path, "v2", "app.test")
    tls = {**write_pair(ca, tmp_path, "default", "default.test"), "certificates": [live]}
    config = config_dict({"app": upstream(origin.url)}, listen={"tls": tls})
    server = await start(servers, config, tmp_path / "proxy.yaml", certificate_poll=0.05)
    port = server.proxy_address[1]
    context = client_context(ca)
    replace_file(live["cert"], other["cert"])  # and the key stays v1's: a mismatched pair

    async def failed_once() -> bool:
        return server.metrics.reloads["failure"] == 1

    await eventually(failed_once)
    assert "listen.tls.certificates[0]: cannot load certificate" in caplog.text
    assert "the key does not match the certificate" in caplog.text
    assert await certificate_for(port, context, "app.test") == "v1"

    # A reload reads the same bad files: refused, counted once more, the old ones kept.
    applied, message = await server.reload()
    assert not applied
    assert message.startswith(
        f"listen.tls.certificates[0]: cannot load certificate {live['cert']!r}"
    )
    assert server.metrics.reloads == {"success": 0, "failure": 2, "rolled_back": 0}
    await asyncio.sleep(0.3)  # the watcher does not retry the same bad files
    assert server.metrics.reloads["failure"] == 2
    assert await certificate_for(port, context, "app.test") == "v1"

    replace_file(live["key"], other["key"])  # now a good pair

    async def renewed_served() -> bool:
        return await certificate_for(port, context, "app.test") == "v2"

    await eventually(renewed_served)
    assert server.metrics.reloads == {"success": 0, "failure": 2, "rolled_back": 0}


# --- protocol versions ---


def capped_at_tls_1_1(ca: trustme.CA) -> ssl.SSLContext:
    context = client_context(ca)
    with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated, rightly
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # what OpenSSL 3 needs to offer TLS 1.1
    return context


async def test_tls_1_1_is_never_accepted_and_min_version_1_3_refuses_1_2(
    backend, proxy, ca, tmp_path
):
    origin = await backend(answering(http_response(body=b"ok")))
    pair = write_pair(ca, tmp_path, "default", "default.test")
    default = await proxy(config_dict({"app": upstream(origin.url)}, listen={"tls": pair}))
    strict = await proxy(
        config_dict({"app": upstream(origin.url)}, listen={"tls": {**pair, "min_version": "1.3"}})
    )

    # The TLS 1.1 client can speak TLS 1.1 here: a server that allows it gets a handshake.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.load_cert_chain(pair["cert"], pair["key"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    old_server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=permissive)
    try:
        old_port = old_server.sockets[0].getsockname()[1]
        client = await TLSClient.connect(old_port, capped_at_tls_1_1(ca))
        assert client.ssl_object.version() == "TLSv1.1"
        await client.close()
    finally:
        old_server.close()
        await old_server.wait_closed()

    for server in (default, strict):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await TLSClient.connect(server.proxy_address[1], capped_at_tls_1_1(ca))

    tls_1_2 = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    client = await TLSClient.connect(default.proxy_address[1], tls_1_2)
    assert (client.ssl_object.version(), await client.get()) == ("TLSv1.2", 200)
    await client.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await TLSClient.connect(strict.proxy_address[1], tls_1_2)
    client = await TLSClient.connect(strict.proxy_address[1], client_context(ca))
    assert (client.ssl_object.version(), await client.get()) == ("TLSv1.3", 200)
    await client.close()
    # OpenSSL's security level may refuse TLS 1.1 on its own: the contexts must say so too.
    for server, version in ((default, ssl.TLSVersion.TLSv1_2), (strict, ssl.TLSVersion.TLSv1_3)):
        listener = server._certificates
        assert listener is not None
        contexts = [listener.context, *(c.context for c in listener.current.certificates)]
        assert {c.minimum_version for c in contexts} == {version}


# --- client certificates ---


async def refused(port: int, context: ssl.SSLContext, server_name: str | None = None) -> bool:
    """Whether the proxy refuses this client: in TLS 1.3 the client's handshake completes before
    the server checks its certificate, so the refusal may only show on the first read."""
    try:
        client = await TLSClient.connect(port, context, server_name)
        try:
            await client.get()
        finally:
            await client.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, AssertionError):
        return True
    return False


async def test_client_ca_requires_a_certificate_it_issued_and_logs_its_subject(
    backend, servers, ca, client_ca, tmp_path
):
    origin = await backend(answering(http_response(body=b"ok")))
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    tls = {
        **write_pair(ca, tmp_path, "default", "default.test"),
        "certificates": [write_pair(ca, tmp_path, "api", "api.example.com")],
        "client_ca": str(tmp_path / "client-ca.pem"),
    }
    log = io.StringIO()
    server = await start(
        servers, config_dict({"app": upstream(origin.url)}, listen={"tls": tls}),
        access_log_stream=log,
    )  # fmt: skip
    port = server.proxy_address[1]

    assert await refused(port, client_context(ca), "api.example.com")  # no certificate
    stranger = client_context(ca)
    trustme.CA().issue_cert("alice@example.test", common_name="alice").configure_cert(stranger)
    assert await refused(port, stranger, "api.example.com")  # from a CA the proxy does not trust

    alice = client_context(ca)
    client_ca.issue_cert(
        "alice@example.test", common_name="alice", organization_name="Example, Inc.",
        organization_unit_name="ops",
    ).configure_cert(alice)  # fmt: skip
    for server_name in ("api.example.com", None):  # verified whichever certificate serves it
        client = await TLSClient.connect(port, alice, server_name)
        try:
            assert await client.get(f"/{server_name}") == 200
        finally:
            await client.close()
    await server.stop()
    entries = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [(e["target"], e["status"], e["client_cert"]) for e in entries] == [
        (target, 200, "CN=alice,OU=ops,O=Example\\, Inc.")
        for target in ("/api.example.com", "/None")
    ]


@pytest.fixture
async def mtls_backend(ca, client_ca, tmp_path) -> AsyncIterator[int]:
    """An https backend on 127.0.0.1 that requires a client certificate from `client_ca` and
    answers with its common name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(context)

    async def handler(request: web.Request) -> web.Response:
        peercert = request.transport.get_extra_info("peercert")  # type: ignore[union-attr]
        names = [
            value for rdn in peercert["subject"] for kind, value in rdn if kind == "commonName"
        ]
        return web.Response(text=f"hello {names[0]}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def test_upstream_client_certificate_is_presented_to_a_backend_requiring_one(
    proxy, mtls_backend, ca, client_ca, tmp_path
):
    import aiohttp

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    target = f"https://127.0.0.1:{mtls_backend}"
    tls = {"ca_file": str(tmp_path / "ca.pem")}
    client = write_pair(client_ca, tmp_path, "proxy-client", "proxy.internal")
    without = await proxy(config_dict({"app": upstream(target, tls=tls)}))
    with_cert = await proxy(config_dict({"app": upstream(target, tls={**tls, **client})}))
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{without.proxy_address[1]}/"
        async with session.get(url) as response:
            assert response.status == 502
        url = f"http://127.0.0.1:{with_cert.proxy_address[1]}/"
        async with session.get(url) as response:
            assert (response.status, await response.text()) == (200, "hello proxy-client")


async def test_reload_picks_up_a_renewed_upstream_client_certificate(
    backend, servers, mtls_backend, ca, client_ca, tmp_path
):
    import aiohttp

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = write_pair(client_ca, tmp_path, "client-v1", "proxy.internal")
    renewed = write_pair(client_ca, tmp_path, "client-v2", "proxy.internal")
    tls = {"ca_file": str(tmp_path / "ca.pem"), **client}
    config = config_dict({"app": upstream(f"https://127.0.0.1:{mtls_backend}", tls=tls)})
    server = await start(servers, config, tmp_path / "proxy.yaml")
    url = f"http://127.0.0.1:{server.proxy_address[1]}/"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert await response.text() == "hello client-v1"
        replace_file(client["cert"], renewed["cert"])
        replace_file(client["key"], renewed["key"])
        assert (await server.reload())[0]
        async with session.get(url) as response:
            assert await response.text() == "hello client-v2"


async def test_a_reload_that_reads_a_refused_upstream_client_certificate_is_rolled_back(
    servers, mtls_backend, ca, client_ca, tmp_path, loads
):
    """Only the files changed, not the config: the upstream is built again from them, watched
    like a changed one, and rolled back to the certificate it had read before (the files still
    hold the refused one). Before, the reload said "no changes" and nothing was watched."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = write_pair(client_ca, tmp_path, "client-v1", "proxy.internal")
    refused = write_pair(ca, tmp_path, "client-v2", "proxy.internal")  # not from client_ca
    tls = {"ca_file": str(tmp_path / "ca.pem"), **client}
    config = config_dict(
        {"app": upstream(f"https://127.0.0.1:{mtls_backend}", tls=tls)},
        reload={"verify": 5}, access_log={"enabled": False},
    )  # fmt: skip
    server = await start(servers, config, tmp_path / "proxy.yaml")
    load = loads(f"http://127.0.0.1:{server.proxy_address[1]}/", loops=3)
    await asyncio.sleep(1.2)  # a healthy second or more before the reload
    replace_file(client["cert"], refused["cert"])
    replace_file(client["key"], refused["key"])
    reloaded = time.monotonic()
    assert await server.reload() == (
        True,
        "upstream app rebuilt: its TLS files changed; verify 5 s: watching upstream app "
        "(max_error_ratio 0.05)",
    )
    await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=7)
    assert server.last_reload is not None
    assert "restored: upstream app rebuilt: its TLS from before the reload;" in (
        server.last_reload.message
    )
    assert server.last_reload.message.endswith(
        "fix it before the next reload (and the TLS files of upstream app)"
    )
    seen = time.monotonic()
    await asyncio.sleep(1)  # load on the restored upstream
    await load.stop()
    assert load.count(reloaded, status=502) > 0  # the refused certificate did break it
    after = [(status, body) for sent, status, body in load.sent if sent >= seen]
    assert len(after) > 20
    assert after == [(200, b"hello client-v1")] * len(after)


# --- the expiry gauge ---


async def test_settings_and_tls_files_changed_together_both_show_in_reload_and_rollback(
    servers, mtls_backend, ca, client_ca, tmp_path, loads
):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = write_pair(client_ca, tmp_path, "client-v1", "proxy.internal")
    refused = write_pair(ca, tmp_path, "client-v2", "proxy.internal")  # not from client_ca
    tls = {"ca_file": str(tmp_path / "ca.pem"), **client}

    def config(limit: int) -> dict[str, Any]:
        target = f"https://127.0.0.1:{mtls_backend}"
        return config_dict(
            {"app": upstream(target, tls=tls, pool={"limit": limit})},
            reload={"verify": 5}, access_log={"enabled": False},
        )  # fmt: skip

    server = await start(servers, config(100), tmp_path / "proxy.yaml")
    load = loads(f"http://127.0.0.1:{server.proxy_address[1]}/", loops=3)
    await asyncio.sleep(1.2)  # a healthy second or more before the reload
    replace_file(client["cert"], refused["cert"])
    replace_file(client["key"], refused["key"])
    write_config(tmp_path / "proxy.yaml", config(50))
    applied, message = await server.reload()
    assert applied and message.startswith(
        "upstream app changed: pool.limit 100 -> 50; upstream app rebuilt: its TLS files changed;"
    ), message
    await eventually(lambda: server.metrics.reloads["rolled_back"] == 1, within=7)
    await load.stop()
    assert server.last_reload is not None
    rolled_back = server.last_reload.message
    assert "restored: upstream app changed: pool.limit 50 -> 100; upstream app rebuilt: its " \
        "TLS from before the reload;" in rolled_back, rolled_back  # fmt: skip
    assert rolled_back.endswith("(and the TLS files of upstream app)")


async def test_expiry_gauge_has_each_certificate_not_after_by_key(backend, proxy, ca, tmp_path):
    origin = await backend(answering(http_response(body=b"ok")))
    default_expiry = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    other_expiry = datetime(2029, 1, 2, 3, 4, 5, tzinfo=UTC)
    client_expiry = datetime(2030, 2, 3, 4, 5, 6, tzinfo=UTC)
    tls = write_pair(ca, tmp_path, "default", "default.test", not_after=default_expiry)
    tls["certificates"] = [  # type: ignore[assignment]
        write_pair(ca, tmp_path, "other", "other.test", not_after=other_expiry)
    ]
    client = write_pair(ca, tmp_path, "client", "proxy.internal", not_after=client_expiry)
    config = config_dict(
        {"app": upstream(origin.url), "secure": upstream("https://127.0.0.1:1", tls=client)},
        listen={"tls": tls},
    )
    server = await proxy(config)
    from prometheus_client.parser import text_string_to_metric_families

    text = (await admin_get(server, "/metrics"))[2]
    name = "proxy_tls_certificate_expiry_timestamp_seconds"
    [family] = [f for f in text_string_to_metric_families(text) if f.name == name]
    assert family.type == "gauge"
    assert {sample.labels["name"]: sample.value for sample in family.samples} == {
        "listen.tls.cert": default_expiry.timestamp(),
        "listen.tls.certificates[0].cert": other_expiry.timestamp(),
        "upstreams.secure.tls.cert": client_expiry.timestamp(),
    }
    # The alert rule's metric (which the TLS-less exposition of test_deploy.py lacks).
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    [rule] = [
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r["alert"] == "ProxyCertificateExpiresSoon"
    ]
    assert name in rule["expr"]


# --- --check and start-up ---


def check(tmp_path: Path, config: dict[str, Any], *args: str) -> tuple[int, str, str]:
    path = write_config(tmp_path / "proxy.yaml", config)
    result = run_cli("--config", str(path), *args)
    return result.returncode, result.stdout, result.stderr


def test_check_names_the_key_of_a_mismatched_pair_and_of_an_expired_certificate(ca, tmp_path):
    good = write_pair(ca, tmp_path, "good", "good.test")
    second = write_pair(ca, tmp_path, "second", "second.test")
    mismatched = {"cert": second["cert"], "key": good["key"]}
    expired = write_pair(
        ca, tmp_path, "expired", "old.test", not_after=datetime(2026, 1, 1, tzinfo=UTC)
    )
    app = {"app": upstream("http://127.0.0.1:1")}

    config = config_dict(app, listen={"tls": {**good, "certificates": [good, mismatched]}})
    assert check(tmp_path, config, "--check") == (
        2, "",
        f"listen.tls.certificates[1]: cannot load certificate {second['cert']!r} and key "
        f"{good['key']!r}: the key does not match the certificate\n",
    )  # fmt: skip
    config = config_dict(app, listen={"tls": {**good, "certificates": [good, expired]}})
    line = "listen.tls.certificates[1].cert: expired on 2026-01-01\n"
    assert check(tmp_path, config, "--check") == (2, "", line)
    # Both problems at once, one line each.
    config = config_dict(app, listen={"tls": {**good, "certificates": [mismatched, expired]}})
    assert check(tmp_path, config, "--check") == (
        2, "",
        f"listen.tls.certificates[0]: cannot load certificate {second['cert']!r} and key "
        f"{good['key']!r}: the key does not match the certificate\n{line}",
    )  # fmt: skip
    config = config_dict({"app": upstream("https://127.0.0.1:1", tls=expired)})
    assert check(tmp_path, config, "--check") == (
        2, "", "upstreams.app.tls.cert: expired on 2026-01-01\n"
    )  # fmt: skip
    config = config_dict(app, listen={"tls": {**good, "client_ca": str(tmp_path / "nope.pem")}})
    assert check(tmp_path, config, "--check") == (
        2, "", f"listen.tls.client_ca: cannot load {str(tmp_path / 'nope.pem')!r}: "
        "No such file or directory\n",
    )  # fmt: skip
    config = config_dict(app, listen={"tls": {**good, "certificates": [second]}})
    assert check(tmp_path, config, "--check") == (0, "config OK: 1 upstreams, 1 routes\n", "")


async def test_with_client_ca_no_session_resumes_past_a_reload_that_distrusts_its_ca(
    backend, servers, ca, client_ca, tmp_path
):
    """A resumed session skips client verification: with client_ca the proxy issues no
    tickets, so once a reload drops a CA, no client of it gets back in (TLS 1.2 and 1.3)."""
    import socket

    origin = await backend(answering(http_response(body=b"ok")))
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    tls = {**write_pair(ca, tmp_path, "default", "app.test"), "client_ca": str(ca_file)}
    config = config_dict({"app": upstream(origin.url)}, listen={"tls": tls})
    server = await start(servers, config, tmp_path / "proxy.yaml", certificate_poll=3600)
    port = server.proxy_address[1]
    clients = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        alice = client_context(ca, maximum_version=version)
        client_ca.issue_cert("alice@example.test", common_name="alice").configure_cert(alice)
        clients[version] = alice

    def handshake(context: ssl.SSLContext, session: ssl.SSLSession | None) -> Any:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="app.test", session=session) as tls_sock,
        ):
            tls_sock.sendall(get("/"))
            assert tls_sock.recv(12) == b"HTTP/1.1 200"  # TLS 1.3 tickets come after it
            with contextlib.suppress(ValueError):  # no session to keep at all
                return tls_sock.session
            return None

    sessions = {v: await asyncio.to_thread(handshake, c, None) for v, c in clients.items()}
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # alice's CA is no longer trusted
    applied, _ = await server.reload()
    assert applied
    for version, context in clients.items():
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            await asyncio.to_thread(handshake, context, sessions[version])


async def test_an_expired_certificate_is_served_with_a_warning_and_blocks_no_reload(
    backend, servers, ca, tmp_path, caplog
):
    """One expired name must not take every other name down at the next restart or reload:
    --check fails on it (above); serving, it is a warning, and the expiry gauge says it."""
    origin = await backend(answering(http_response(body=b"ok")))
    good = write_pair(ca, tmp_path, "good", "good.test")
    old = write_pair(
        ca, tmp_path, "expired", "old.test", not_after=datetime(2026, 1, 1, tzinfo=UTC)
    )
    config = config_dict(
        {"app": upstream(origin.url)}, listen={"tls": {**good, "certificates": [old]}}
    )
    path = tmp_path / "proxy.yaml"
    server = await start(servers, config, path, certificate_poll=3600)
    assert "listen.tls.certificates[0].cert: expired on 2026-01-01" in caplog.text
    client = await TLSClient.connect(server.proxy_address[1], client_context(ca), "good.test")
    assert (client.certificate, await client.get()) == ("good", 200)
    await client.close()
    config["upstreams"]["app"]["pool"] = {"limit": 7}  # an unrelated change
    write_config(path, config)
    assert (await server.reload())[0]
