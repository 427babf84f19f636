"""The listener's certificates: chosen for each handshake by SNI, and replaced without a restart.

The listener is handed one SSLContext for its whole life (`ListenerCertificates.context`). Its
sni_callback, run during each ClientHello, points that handshake at the context of the
certificate serving the name, taken from the set in force (`SSLObject.context = ...`). A
rotation loads a whole new set beside the old one and swaps one reference: connections already
established keep the context and session they got, new handshakes get the new certificates.
Knows nothing of aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.config import ConfigError, ListenTLS
from proxy.tls import (
    Certificate,
    FileStamp,
    configure_listener,
    expired,
    file_stamp,
    listen_files,
    listener_certificates,
    server_context,
)

log = logging.getLogger("proxy")

POLL_INTERVAL = 5.0  # s between two looks at the certificate files


@dataclass(frozen=True, slots=True)
class CertificateSet:
    """The listener's certificates as loaded at one moment: never changed, only replaced."""

    certificates: tuple[Certificate, ...]  # the default first, then listen.tls.certificates
    by_name: Mapping[str, ssl.SSLContext]  # exact names and "*." wildcards; the first one wins
    stamp: FileStamp  # the files' versions, taken before they were read

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello's SNI name: the certificate carrying that exact name,
        else a wildcard for its first label (*.example.com serves a.example.com, but neither
        example.com nor a.b.example.com: RFC 6125 §6.4.3), else the default."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.by_name.get(name)
            _, dot, parent = name.partition(".")
            if found is None and dot:
                found = self.by_name.get("*." + parent)
            if found is not None:
                return found
        return self.certificates[0].context


def load_certificates(tls: ListenTLS) -> CertificateSet:
    """Read every file of `tls`; a ConfigError names the first bad key."""
    stamp = file_stamp(*listen_files(tls))  # first: a write during the read is seen next time
    certificates = listener_certificates(tls)
    for line in expired(certificates):
        log.warning("%s; serving it anyway (--check fails on it)", line)
    by_name: dict[str, ssl.SSLContext] = {}
    for certificate in certificates:
        for name in certificate.names:
            by_name.setdefault(name, certificate.context)
    return CertificateSet(certificates, by_name, stamp)


class ListenerCertificates:
    """`context` for the listener; `use()` a new set at a reload; `watch()` the files."""

    def __init__(
        self,
        tls: ListenTLS,
        *,
        on_failure: Callable[[], None] = lambda: None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.tls = tls
        self.current = load_certificates(tls)
        # The context the listener holds. It gets no certificate of its own: every handshake
        # switches to one of the set's contexts, so a stale certificate can never be served.
        # What OpenSSL reads from the SSL object before the switch (the protocol versions and
        # whether to ask for a client certificate) is set here too; the certificate, ALPN and
        # the CAs that verify client certificates are read from the context switched to.
        self.context = server_context(tls)
        self.context.sni_callback = self._on_server_name
        self._on_failure = on_failure
        self._poll_interval = poll_interval
        self._seen = self.current.stamp  # the files' versions last tried, good or bad

    def _on_server_name(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        # OpenSSL calls this for every ClientHello, with None when it carries no SNI.
        connection.context = self.current.select(server_name)

    def use(self, tls: ListenTLS, certificates: CertificateSet) -> None:
        """New handshakes from now on: `tls`'s settings, `certificates` (load_certificates())."""
        configure_listener(self.context, tls)
        self.tls, self.current, self._seen = tls, certificates, certificates.stamp

    def load(self, tls: ListenTLS) -> CertificateSet:
        """load_certificates(), for a reload; files that fail are not tried again by watch()
        until they change (the failure is counted once)."""
        try:
            return load_certificates(tls)
        except ConfigError:
            if tls == self.tls:
                self._seen = file_stamp(*listen_files(tls))
            raise

    @property
    def expiry(self) -> dict[str, float]:
        """When each certificate in force expires, by its key."""
        return {c.path: c.not_after for c in self.current.certificates}

    def reread(self) -> bool:
        """Load the files again if any changed since they were last tried: True if they were
        and are now in force. Bad files are logged, and left alone until they change again."""
        stamp = file_stamp(*listen_files(self.tls))
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            certificates = load_certificates(self.tls)
        except ConfigError as exc:
            self._on_failure()
            log.error("certificate files changed but cannot be used, keeping the previous: %s", exc)
            return False
        self.use(self.tls, certificates)
        log.info("certificate files changed: new handshakes use the new ones")
        return True

    async def watch(self) -> None:
        """Re-read the files whenever one changes, until cancelled."""
        while True:
            await asyncio.sleep(self._poll_interval)
            self.reread()
