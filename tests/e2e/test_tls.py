"""TLS both ways, with certificates made at test time (trustme), never checked-in keys."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.config import ConfigError, parse_config
from proxy.tls import check_files
from tests.support import answering, config_dict, http_response, upstream


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_backend(ca):
    """An aiohttp server on 127.0.0.1 with a certificate for 'backend.internal' and 127.0.0.1,
    answering with the X-Forwarded-Proto it received."""
    cert = ca.issue_cert("backend.internal", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"tls backend; proto={request.headers.get('X-Forwarded-Proto')}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def fetch(url: str, ssl_context: ssl.SSLContext | bool = True) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=ssl_context) as r:
        return r.status, await r.text()


async def test_listener_terminates_tls_and_says_https_upstream(backend, proxy, ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "proxy.test")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    seen = []

    def respond(request):
        seen.append(request.header("X-Forwarded-Proto"))
        return http_response(body=b"over tls")

    origin = await backend(answering(respond))
    server = await proxy(
        config_dict(
            {"app": upstream(origin.url)},
            listen={"tls": {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}},
        )
    )
    client = ssl.create_default_context()
    ca.configure_trust(client)
    url = f"https://127.0.0.1:{server.proxy_address[1]}/"
    assert await fetch(url, client) == (200, "over tls")
    assert seen == ["https"]
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await fetch(url)  # a client that does not trust the CA refuses the proxy


async def test_https_upstream_is_verified_against_ca_file(proxy, https_backend, ca, tmp_path):
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    target = f"https://127.0.0.1:{https_backend}"
    trusted = await proxy(
        config_dict({"app": upstream(target, tls={"ca_file": str(tmp_path / "ca.pem")})})
    )
    assert await fetch(f"http://127.0.0.1:{trusted.proxy_address[1]}/") == (
        200,
        "tls backend; proto=http",
    )
    # Verification is on by default: the system CAs do not know the test CA.
    untrusted = await proxy(config_dict({"app": upstream(target)}))
    status, body = await fetch(f"http://127.0.0.1:{untrusted.proxy_address[1]}/")
    assert (status, body) == (502, "502 Bad Gateway: could not connect to upstream\n")
    unverified = await proxy(config_dict({"app": upstream(target, tls={"verify": False})}))
    assert (await fetch(f"http://127.0.0.1:{unverified.proxy_address[1]}/"))[0] == 200


async def test_server_name_sets_sni_and_the_name_checked(proxy, https_backend, ca, tmp_path):
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    target = f"https://127.0.0.1:{https_backend}"
    ca_file = str(tmp_path / "ca.pem")
    right = await proxy(
        config_dict(
            {"app": upstream(target, tls={"ca_file": ca_file, "server_name": "backend.internal"})}
        )
    )
    assert (await fetch(f"http://127.0.0.1:{right.proxy_address[1]}/"))[0] == 200
    wrong = await proxy(
        config_dict(
            {"app": upstream(target, tls={"ca_file": ca_file, "server_name": "other.internal"})}
        )
    )
    assert (await fetch(f"http://127.0.0.1:{wrong.proxy_address[1]}/"))[0] == 502


def test_unreadable_certificate_files_name_their_key(tmp_path):
    config = parse_config(
        config_dict(
            {
                "app": upstream(
                    "https://127.0.0.1:1", tls={"ca_file": str(tmp_path / "missing-ca.pem")}
                )
            }
        )
    )
    with pytest.raises(ConfigError, match=r"^upstreams\.app\.tls\.ca_file: cannot load "):
        check_files(config, strict=True)
    config = parse_config(
        config_dict(
            {"app": upstream("http://127.0.0.1:1")},
            listen={"tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}},
        )
    )
    with pytest.raises(ConfigError, match=r"^listen\.tls: cannot load certificate "):
        check_files(config, strict=True)
