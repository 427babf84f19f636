"""The client listener's accept loop: at most `max_connections` client connections, no busy
loop when the process runs out of file descriptors, a deadline on each TLS handshake, and the
PROXY protocol header taken off each connection first when listen.proxy_protocol is on.

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
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web

from proxy import proxyproto
from proxy.listener import ProxyHTTPServer

log = logging.getLogger("proxy")

# accept() failures that mean "the process or the system is out of something": wait for it
# to come back rather than retry at once.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_REASONS = ("max_connections", "fd_limit")
# Connections closed for want of a valid PROXY protocol header: the bytes were not one, the
# header was not complete by listen.timeouts.header, the client left before completing it.
PROXY_PROTOCOL_ERRORS = ("malformed", "timeout", "closed")
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
        proxy_protocol: bool = False,
    ) -> None:
        self.sockets = sockets
        self._server = server
        self._tls = tls
        self._max = max_connections
        self._handshake_timeout = handshake_timeout
        self._proxy_protocol = proxy_protocol
        self._handshakes: set[asyncio.Task[None]] = set()
        self._last_log = -_LOG_EVERY
        self._unlogged = 0
        self.paused = dict.fromkeys(PAUSE_REASONS, 0)
        self.proxy_protocol_errors = dict.fromkeys(PROXY_PROTOCOL_ERRORS, 0)
        self._proxy_last_log = -_LOG_EVERY
        self._proxy_unlogged = 0
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
        factory: Callable[[], asyncio.BaseProtocol] = self._server
        if self._proxy_protocol:
            header = await self._proxy_header(loop, conn)
            if header is None:
                return
            factory = partial(self._server, header.source)
        try:
            await loop.connect_accepted_socket(
                factory,
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

    async def _proxy_header(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket
    ) -> proxyproto.ProxyHeader | None:
        """The connection's PROXY protocol header; None if there was no valid one by the
        header deadline, and the connection is closed, counted and (once a minute) logged."""
        try:
            async with asyncio.timeout(self._handshake_timeout):
                return await read_proxy_header(loop, conn)
        except proxyproto.ProxyProtocolError as exc:
            reason, detail = "malformed", str(exc)
        except TimeoutError:
            reason, detail = "timeout", "incomplete at listen.timeouts.header"
            self._server.client_timeouts["header"] += 1
        except (OSError, EOFError) as exc:
            reason, detail = "closed", f"closed before a complete header ({exc!r})"
        except BaseException:  # cancelled (the listener closes): the socket is ours to close
            conn.close()
            raise
        with contextlib.suppress(OSError):
            detail += f" from {conn.getpeername()[0]}"
        conn.close()
        self.proxy_protocol_errors[reason] += 1
        self._proxy_unlogged += 1
        now = time.monotonic()
        if now - self._proxy_last_log >= _LOG_EVERY:
            log.warning(
                "closed %d client connection(s) without a valid PROXY protocol header since "
                "the last such line (listen.proxy_protocol is on); the last: %s",
                self._proxy_unlogged, detail,
            )  # fmt: skip
            self._proxy_last_log, self._proxy_unlogged = now, 0
        return None

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


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> proxyproto.ProxyHeader:
    """Take the PROXY protocol header off the front of `sock` (non-blocking), and not one byte
    more: the TLS or HTTP bytes after it stay in the kernel for asyncio's transport. Raises
    ProxyProtocolError, or EOFError if the peer closes first; the caller bounds the time."""
    taken = b""
    wanted = proxyproto.parse(taken)
    while not isinstance(wanted, proxyproto.ProxyHeader):
        # Look without taking, then take only what parse() says is header. An incomplete
        # header is taken whole, so the next wait for readability waits for new bytes.
        while True:
            try:
                seen = sock.recv(wanted, socket.MSG_PEEK)
                break
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
        if not seen:
            raise EOFError("the peer closed the connection")
        wanted = proxyproto.parse(taken + seen)
        size = (
            wanted.length - len(taken) if isinstance(wanted, proxyproto.ProxyHeader) else len(seen)
        )
        taken += sock.recv(size)  # already there: this returns at once, all of it
    return wanted


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with the accept loop above instead of asyncio's."""

    __slots__ = (
        "_handshake_timeout", "_host", "_max_connections", "_port", "_proxy_protocol", "_reuse_port"
    )  # fmt: skip

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
        proxy_protocol: bool = False,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._proxy_protocol = proxy_protocol

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
            proxy_protocol=self._proxy_protocol,
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
