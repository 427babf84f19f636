from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.server import ProxyServer
from tests.support import Handler, RawBackend, start_proxy

BackendFactory = Callable[[Handler], Awaitable[RawBackend]]
ProxyFactory = Callable[[dict[str, Any]], Awaitable[ProxyServer]]


@pytest.fixture
async def backend() -> AsyncIterator[BackendFactory]:
    """Start raw backends on 127.0.0.1:0; all are stopped after the test."""
    backends: list[RawBackend] = []

    async def make(handler: Handler) -> RawBackend:
        started = await RawBackend(handler).start()
        backends.append(started)
        return started

    yield make
    for started in backends:
        await started.stop()


@pytest.fixture
async def proxy(backend: BackendFactory) -> AsyncIterator[ProxyFactory]:
    """Start the real ProxyServer (its production factory) on 127.0.0.1:0; stopped after the
    test, before the backends (hence the dependency on `backend`)."""
    servers: list[ProxyServer] = []

    async def make(config: dict[str, Any]) -> ProxyServer:
        server = await start_proxy(config)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()
