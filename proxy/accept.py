"""The client listener's accept loop: at most `max_connections` client connections, no busy
loop when the process runs out of file descriptors, and a deadline on each TLS handshake.

asyncio's own accept loop takes every connection the kernel offers, and at EMFILE it retries
on every event-loop turn, logging a traceback each time (AIOHTTP-NOTES §1.15): one client with
a thousand half-open connections pins the CPU and fills the disk. Here the proxy accepts only
while it is below the mark; beyond it, or out of descriptors, it stops asking and new clients
wait in the kernel's backlog until a connection closes. Only public asyncio calls are used
(`sock_accept`, `connect_accepted_socket`). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from typing import Any

from aiohttp import web

from proxy.listener import ProxyHTTPServer

log = logging.getLogger("proxy")

# accept() failures that mean "the process or the system is out of something": wait for it
# to come back rather than retry at once.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_REASONS = ("max_connections", "fd_limit")
_LOG_EVERY = 60.0  # s between two log lines about running out of descriptors
_RESOURCE_RETRY = 1.0  # s: descriptors freed elsewhere (upstream sockets) are not announced


class GuardedListener:
    """The listening sockets and their accept loops; what `BaseSite` calls its server."""

    def __init__(
        self,
        server: ProxyHTTPServer,
        sockets: list[socket.socket],
        *,
        tls: ssl.SSLContext | None,
        max_connections: int,
        handshake_timeout: float,
    ) -> None:
        self.sockets = sockets
        self._server = server
        self._tls = tls
        self._max = max_connections
        self._handshake_timeout = handshake_timeout
        self._handshakes: set[asyncio.Task[None]] = set()
        self._last_log = -_LOG_EVERY
        self._unlogged = 0
        self.paused = dict.fromkeys(PAUSE_REASONS, 0)
        self._loops = [asyncio.create_task(self._accept(sock)) for sock in sockets]

    def _open(self) -> int:
        return self._server.open_connections + len(self._handshakes)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._open() >= self._max:
                self.paused["max_connections"] += 1
                while self._open() >= self._max:
                    await self._server.connection_closed()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            task = asyncio.create_task(self._connect(loop, conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        # One that failed (a TLS handshake timed out, say) never became a connection whose
        # close would wake an accept loop paused at the mark.
        self._server.connection_ended()

    async def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in _OUT_OF_RESOURCES:
            # ECONNABORTED and the like: that one client is gone, the next may be fine.
            log.debug("accept failed: %r", exc)
            return
        self.paused["fd_limit"] += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            log.error(
                "cannot accept client connections: %s (%d times since the last such line); "
                "not accepting until a connection closes. Raise the file descriptor limit "
                "(ulimit -n, LimitNOFILE) or lower listen.limits.max_connections",
                exc.strerror or exc, self._unlogged,
            )  # fmt: skip
            self._last_log, self._unlogged = now, 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.connection_closed(), _RESOURCE_RETRY)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(
                self._server,
                conn,
                ssl=self._tls,
                # listen.timeouts.header bounds the handshake too: a TLS client that sends
                # nothing would otherwise hold its connection for 60 s.
                ssl_handshake_timeout=self._handshake_timeout if self._tls else None,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # asyncio closed the socket already; a timed-out handshake is a header timeout.
            if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
                self._server.client_timeouts["header"] += 1
            log.debug("client connection failed before HTTP: %r", exc)
            conn.close()

    async def aclose(self) -> None:
        """Stop accepting: the accept loops end (and unregister their sockets) before the
        sockets close, so no descriptor number is reused under a live registration."""
        tasks = [*self._loops, *self._handshakes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with the accept loop above instead of asyncio's."""

    __slots__ = ("_handshake_timeout", "_host", "_max_connections", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool,
        max_connections: int,
        handshake_timeout: float,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.aclose()
        await super().stop()

    @property
    def listener(self) -> GuardedListener | None:
        return self._server  # type: ignore[return-value]

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, ProxyHTTPServer)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets = bind_all(infos, reuse_address=True, reuse_port=self._reuse_port)
        try:
            for sock in sockets:
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        self._server = GuardedListener(  # type: ignore[assignment]
            server,
            sockets,
            tls=self._ssl_context,
            max_connections=self._max_connections,
            handshake_timeout=self._handshake_timeout,
        )


def bind_all(
    infos: list[tuple[Any, ...]], *, reuse_address: bool, reuse_port: bool
) -> list[socket.socket]:
    """A TCP socket bound to each distinct address of `infos` (getaddrinfo's answer), as asyncio
    binds them (IPv6 sockets v6-only); all closed again if one cannot be bound."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
