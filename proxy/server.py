"""The composition root: listeners, the snapshot in force, signals, and shutdown.

Owns the proxy's lifecycle; per-request logic lives in forward.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import TextIO

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.admin import admin_app
from proxy.config import Config
from proxy.forward import Exchange, Forwarder, Snapshot
from proxy.listener import ProxyHTTPServer, handler_kwargs
from proxy.metrics import ProxyMetrics
from proxy.routing import RoutingTable
from proxy.upstream import Upstream

log = logging.getLogger("proxy")

SHUTDOWN_GRACE = 30.0  # s in-flight requests get to finish after SIGTERM


class StartupError(Exception):
    """The proxy could not start (a port in use, say); the message says what to do."""


def build_snapshot(config: Config) -> Snapshot:
    """Routing table and one Upstream (session + pool) per configured upstream."""
    upstreams = {name: Upstream(name, settings) for name, settings in config.upstreams.items()}
    return Snapshot(routes=RoutingTable(config.routes), upstreams=upstreams)


class ProxyServer:
    """The data-plane listener and the admin listener around one snapshot."""

    def __init__(
        self,
        config: Config,
        *,
        shutdown_grace: float = SHUTDOWN_GRACE,
        access_log_stream: TextIO | None = None,
    ) -> None:
        self.config = config
        self.state = "starting"
        self._shutdown_grace = shutdown_grace
        self._snapshot: Snapshot | None = None
        self._proxy_server: ProxyHTTPServer | None = None
        self._proxy_runner: web.BaseRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.access_log = (
            AccessLog(access_log_stream or sys.stdout, config.access_log.format)
            if config.access_log.enabled
            else None
        )
        self.metrics = ProxyMetrics(
            self.current,
            client_connections=lambda: (
                len(self._proxy_server.connections) if self._proxy_server else 0
            ),
            access_log_dropped=lambda: self.access_log.dropped if self.access_log else 0,
        )
        self.metrics.prepare(
            ((route.name, route.upstream) for route in config.routes), config.upstreams
        )

    def _observe(self, exchange: Exchange) -> None:
        """Every request ends here, once: metrics, then the access log."""
        self.metrics.record(exchange)
        if self.access_log is not None:
            self.access_log.write(exchange)

    def _on_rejected(self, client: str | None, status: int) -> None:
        """A request aiohttp's parser refused (400/431) still counts and is logged."""
        self._observe(Exchange(time.time(), time.perf_counter(), client, "", "", status=status))

    def current(self) -> Snapshot:
        assert self._snapshot is not None, "ProxyServer.start() was not awaited"
        return self._snapshot

    async def start(self) -> None:
        """Admin first, so /readyz answers 503 while the data plane comes up."""
        config = self.config
        self._admin_runner = web.AppRunner(
            admin_app(lambda: self.state, self.metrics.registry, self.current), access_log=None
        )
        await self._admin_runner.setup()
        await _listen(self._admin_runner, config.admin.host, config.admin.port, "admin")

        if self.access_log is not None:
            self.access_log.start()
        self._snapshot = build_snapshot(config)
        self._snapshot.start()
        server = ProxyHTTPServer(
            Forwarder(self.current, scheme="http", observe=self._observe),
            # A client that goes away cancels its handler, which cancels the upstream request
            # and frees its pool slot (aiohttp's default is to let the handler run on).
            handler_cancellation=True,
            **handler_kwargs(config.listen.keepalive_timeout),
        )
        server.on_rejected = self._on_rejected
        self._proxy_server = server
        self._proxy_runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=self._shutdown_grace
        )
        await self._proxy_runner.setup()
        await _listen(self._proxy_runner, config.listen.host, config.listen.port, "listen")
        self.state = "serving"
        log.info(
            "proxy listening on %s, admin on %s: %d upstreams, %d routes",
            _url(self.proxy_address),
            _url(self.admin_address),
            len(config.upstreams),
            len(config.routes),
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close every pool."""
        self.state = "draining"
        if self._proxy_runner is not None:
            # Closes the listening socket and idle keep-alive connections, waits up to
            # shutdown_timeout for handlers in progress, then cancels what is left.
            await self._proxy_runner.cleanup()
        if self._snapshot is not None:
            await self._snapshot.aclose()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.access_log is not None:
            self.access_log.close()

    @property
    def proxy_address(self) -> tuple[str, int]:
        assert self._proxy_runner is not None
        host, port = self._proxy_runner.addresses[0][:2]
        return host, port

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self._admin_runner is not None
        host, port = self._admin_runner.addresses[0][:2]
        return host, port


async def _listen(runner: web.BaseRunner, host: str, port: int, key: str) -> None:
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
            f"free the port or change {key}.port in the config"
        ) from None


def _url(address: tuple[str, int]) -> str:
    return f"http://{address[0]}:{address[1]}"


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop. A second signal exits at once."""
    server = ProxyServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info(
            "%s: draining (up to %.0f s), then exiting", signal.Signals(signum).name, SHUTDOWN_GRACE
        )
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stopping.wait()
    finally:
        await server.stop()
        log.info("stopped")
