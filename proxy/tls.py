"""TLS contexts: the listener's (terminating clients' TLS) and each upstream's (verifying its
targets). Owns loading certificates; a file that cannot be loaded is a ConfigError naming the key.
"""

from __future__ import annotations

import ssl

from proxy.config import Config, ConfigError, ListenTLS, UpstreamTLS


def server_context(tls: ListenTLS) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"listen.tls: cannot load certificate {tls.cert!r} and key {tls.key!r}: {exc}"
        ) from None
    return context


def client_context(tls: UpstreamTLS, path: str) -> ssl.SSLContext:
    """Verifies certificates against the system's CAs, or `ca_file`'s, unless `verify: false`."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{path}.ca_file: cannot load {tls.ca_file!r}: {exc}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_files(config: Config) -> None:
    """Load every certificate the config names, as `--check` and start-up do."""
    if config.listen.tls is not None:
        server_context(config.listen.tls)
    for name, upstream in config.upstreams.items():
        if upstream.tls.ca_file is not None:
            client_context(upstream.tls, f"upstreams.{name}.tls")
