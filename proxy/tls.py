"""TLS contexts: the listener's (one per certificate, terminating clients' TLS; certificates.py
chooses among them by SNI) and each upstream's (verifying its targets, presenting a client
certificate). Owns loading certificate files: a file that cannot be loaded, or a certificate
that has expired, is a ConfigError naming its key. Knows nothing of aiohttp or sockets.
"""

from __future__ import annotations

import _ssl
import functools
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.config import Config, ConfigError, ListenTLS, UpstreamTLS

ALPN = ["http/1.1"]  # what the listener speaks (aiohttp serves no HTTP/2)
# TLS 1.0 and 1.1 are never accepted (RFC 8996); config.py admits only these two.
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_TICKETS = 2  # TLS 1.3 session tickets per handshake: OpenSSL's default

# The stdlib's one PEM certificate decoder that needs no handshake: private, but in CPython since
# 2.7 and used by its own test suite (checked on 3.11.7). Avoids `cryptography` at runtime.
_decode_certificate: Callable[[str], dict[str, Any]] = _ssl._test_decode_cert  # type: ignore[attr-defined]

# RFC 4514 §3 short names for the attributes a client certificate's subject usually has.
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate as loaded: its key path, the names it serves, and when it expires."""

    path: str  # the key of its file: "listen.tls.cert", "listen.tls.certificates[0].cert"
    names: tuple[str, ...]  # lower-case DNS names, wildcards ("*.example.com") included
    not_after: float  # Unix time
    context: ssl.SSLContext  # the context it was loaded into


FileStamp = tuple[tuple[int, int, int, int] | None, ...]


def file_stamp(*paths: str) -> FileStamp:
    """What identifies each file's version without reading it: inode, device, mtime and size
    (a rename over it and a Kubernetes secret's symlink swap both change the inode)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_ino, info.st_dev, info.st_mtime_ns, info.st_size))
    return tuple(stamps)


def tls_files_stamp(tls: UpstreamTLS) -> FileStamp:
    """The versions of an upstream's TLS files: its CAs and its client certificate."""
    return file_stamp(*filter(None, (tls.ca_file, tls.cert, tls.key)))


def listener_pairs(tls: ListenTLS) -> list[tuple[str, str, str]]:
    """(key path, cert, key) of the default certificate, then of listen.tls.certificates."""
    pairs = [("listen.tls", tls.cert, tls.key)]
    pairs += [(f"listen.tls.certificates[{i}]", p.cert, p.key)
              for i, p in enumerate(tls.certificates)]  # fmt: skip
    return pairs


def listen_files(tls: ListenTLS) -> tuple[str, ...]:
    """Every file the listener reads: certificates, keys and client_ca."""
    files = (name for _, cert, key in listener_pairs(tls) for name in (cert, key))
    return (*files, *filter(None, [tls.client_ca]))


def _reason(exc: OSError) -> str:
    """An OpenSSL or OS error, without the `(_ssl.c:NNNN)` that helps nobody configuring."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not match the certificate"
    if not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    return re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))


def load_pair(context: ssl.SSLContext, path: str, cert: str, key: str) -> Certificate:
    """Load `cert` and `key` (the pair at key `path`) into `context`: a ConfigError names the key
    if they cannot be read or do not match. An expired certificate loads (see `expired`)."""
    try:
        context.load_cert_chain(cert, key)
        decoded = _decode_certificate(cert)  # the first certificate of the chain: the leaf
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"{path}: cannot load certificate {cert!r} and key {key!r}: {_reason(exc)}"
        ) from None
    not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    return Certificate(f"{path}.cert", _dns_names(decoded), not_after, context)


def expired(certificates: Iterable[Certificate]) -> list[str]:
    """One line per expired certificate, by key. `--check` fails on them; a running proxy (or
    one starting) serves them with a warning: one expired name must not take down every other
    name at the next restart or reload (proxy_tls_certificate_expiry_timestamp_seconds and
    the ProxyCertificateExpiresSoon alert say it is coming)."""
    now = time.time()
    return [
        f"{c.path}: expired on {datetime.fromtimestamp(c.not_after, UTC):%Y-%m-%d}"
        for c in certificates
        if c.not_after <= now
    ]


def _dns_names(decoded: dict[str, Any]) -> tuple[str, ...]:
    san = decoded.get("subjectAltName")
    if san is not None:  # RFC 6125 §6.4.4: beside a subjectAltName the CN names nothing
        names = (value for kind, value in san if kind == "DNS")
    else:
        names = (value for rdn in decoded["subject"] for kind, value in rdn if kind == "commonName")
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names))


def configure_listener(context: ssl.SSLContext, tls: ListenTLS) -> None:
    """The settings every listener context shares (verification's CAs apart)."""
    context.minimum_version = MIN_VERSIONS[tls.min_version]
    context.set_alpn_protocols(ALPN)
    context.verify_mode = ssl.CERT_NONE if tls.client_ca is None else ssl.CERT_REQUIRED
    # A resumed session skips verification: with client certificates required, a client whose
    # CA a reload removed could resume for as long as its ticket lives. No tickets then.
    if tls.client_ca is None:
        context.options &= ~ssl.OP_NO_TICKET
        context.num_tickets = _TICKETS
    else:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0


def server_context(tls: ListenTLS) -> ssl.SSLContext:
    """A listener context with `tls`'s settings and its client CAs, and no certificate yet."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    configure_listener(context, tls)
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except OSError as exc:
            raise ConfigError(
                f"listen.tls.client_ca: cannot load {tls.client_ca!r}: {_reason(exc)}"
            ) from None
    return context


def listener_certificates(tls: ListenTLS) -> tuple[Certificate, ...]:
    """The default certificate, then listen.tls.certificates in order, each in a context of
    its own with the same settings."""
    return tuple(load_pair(server_context(tls), *pair) for pair in listener_pairs(tls))


def client_subject(transport: Any) -> str | None:
    """The subject of the client certificate the listener verified (listen.tls.client_ca), as
    RFC 4514 writes it (most specific first: "CN=alice,OU=ops,O=Example"); None without one."""
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:  # None without TLS; {} when no certificate was asked for
        return None
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(kind, kind)}={_escape(value)}" for kind, value in rdn)
        for rdn in reversed(peercert["subject"])
    )


def _escape(value: str) -> str:
    """RFC 4514 §2.4: the characters that would end or change an attribute value."""
    value = re.sub(r'([,+"\\<>;])', r"\\\1", value)
    if value.startswith(("#", " ")):
        value = "\\" + value
    return value[:-1] + "\\ " if value.endswith(" ") else value


def client_context(tls: UpstreamTLS, path: str) -> tuple[ssl.SSLContext, Certificate | None]:
    """Verifies certificates against the system's CAs, or `ca_file`'s, unless `verify: false`;
    presents `cert` (with `key`) to targets that ask for a client certificate. Returns the
    context and the client certificate it holds."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{path}.ca_file: cannot load {tls.ca_file!r}: {exc}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client = None
    if tls.cert is not None and tls.key is not None:
        client = load_pair(context, path, tls.cert, tls.key)
    return context, client


def check_files(config: Config, *, strict: bool) -> list[Certificate]:
    """Load every certificate, key and CA file the config names, as `--check` (`strict`:
    expired certificates are errors too) and start-up do: the certificates, or a ConfigError
    with one line per bad key."""
    loads: list[Callable[[], Certificate | None]] = []
    if config.listen.tls is not None:
        tls = config.listen.tls
        loads.append(functools.partial(_client_ca, tls))
        loads += [functools.partial(_pair, *pair) for pair in listener_pairs(tls)]
    for name, upstream in config.upstreams.items():
        if upstream.tls.ca_file is not None or upstream.tls.cert is not None:
            loads.append(functools.partial(_client_certificate, upstream.tls, name))
    loaded, errors = [], []
    for load in loads:
        try:
            certificate = load()
        except ConfigError as exc:
            errors.append(str(exc))
        else:
            loaded += [certificate] if certificate is not None else []
    errors += expired(loaded) if strict else []
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    return loaded


def _client_ca(tls: ListenTLS) -> None:
    server_context(tls)  # loads client_ca


def _pair(path: str, cert: str, key: str) -> Certificate:
    return load_pair(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), path, cert, key)


def _client_certificate(tls: UpstreamTLS, name: str) -> Certificate | None:
    return client_context(tls, f"upstreams.{name}.tls")[1]
