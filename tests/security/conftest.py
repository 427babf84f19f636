from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.security.wire import RecordingBackend, Reply

RecorderFactory = Callable[[dict[str, Reply] | None], Awaitable[RecordingBackend]]


@pytest.fixture
async def recorder() -> AsyncIterator[RecorderFactory]:
    """Start recording backends on 127.0.0.1:0, with `replies` by request-target; all stopped
    after the test. List `proxy` after this fixture in a test's arguments so it stops first."""
    started: list[RecordingBackend] = []

    async def make(replies: dict[str, Reply] | None = None) -> RecordingBackend:
        backend = await RecordingBackend(dict(replies or {})).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()
