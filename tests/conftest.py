from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.server import ProxyServer
from tests.support import Handler, Load, RawBackend, start_proxy

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


@pytest.fixture
async def loads() -> AsyncIterator[Callable[..., Load]]:
    """Start Loads; each is stopped after the test (again, if the test stopped it: nothing is
    left unclosed when an assertion fails first)."""
    started: list[Load] = []

    def start(url: str, loops: int = 2, connector: aiohttp.BaseConnector | None = None) -> Load:
        started.append(Load(url, loops, connector))
        return started[-1]

    yield start
    for load in started:
        await load.stop()
