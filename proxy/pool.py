"""An upstream's connection pool: aiohttp's TCPConnector, told what a proxy needs it to do.

Owns what happens to each upstream connection from its open to its close: which idle one is
reused, which is refused (stray bytes, past the upstream's announced idle timeout, past its
max_requests or max_age), the warm ones opened ahead of demand (min_idle), why each one closed,
and the counts the pool metrics read. The only module that touches aiohttp's private connector
state; internals.py checks every private name it uses at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from proxy.advice import PoolWindow

log = logging.getLogger("proxy")

# Why an upstream connection was closed instead of being reused.
DISCARD_REASONS = ("unsolicited_data",)
# Why an upstream connection closed; each close is counted once, in PoolConnector.closes
# (proxy_upstream_connections_closed_total):
#   idle_timeout    pool.keepalive_timeout ran out while it was idle (or keepalive_timeout 0:
#                   force_close after each response)
#   keepalive_hint  past the idle timeout the upstream announced (Keep-Alive: timeout=N)
#   max_requests    it served pool.max_requests requests
#   max_age         it is older than pool.max_age (±10% jitter per connection)
#   remote          the upstream closed it: FIN on an idle one, or its response said close
#   stale           a reused connection that failed before any byte of the response came
#   error           any other failure mid-exchange, and stray bytes (unsolicited_data)
#   reload          its upstream was replaced by a reload, or its target left (discovery)
#   shutdown        closed at stop
CLOSE_REASONS = ("idle_timeout", "keepalive_hint", "max_requests", "max_age", "remote", "stale",
                 "error", "reload", "shutdown")  # fmt: skip
_STRAY_LOG_EVERY = 60.0  # s between two log lines about stray bytes from one upstream
_WARM_LOG_EVERY = 60.0  # s between two log lines about one target min_idle cannot reach
_JITTER = 0.1  # max_age is drawn per connection from [0.9, 1.1] times max_age


def gone_for(connect_timeout: float) -> float:
    """How long a target that left is remembered (PoolConnector.close_target): past any moment
    a connection to it can still be opened by a request or a warming round that chose it
    before it left. A request waits its turn in the fair queue (up to timeouts.connect), then
    for aiohttp's slot and the connect (up to timeouts.connect again, rounded up to the
    second); a warming round connects within it too."""
    return max(60.0, 3 * connect_timeout + 5)


_NEVER = math.inf


class Acquisition:
    """What the connector saw while getting one attempt its connection. Set per attempt in a
    ContextVar, because it happens deep inside aiohttp's connector, in the request's own task."""

    __slots__ = ("fresh_only", "protocol", "queued", "reused", "waited")

    def __init__(self, fresh_only: bool = False) -> None:
        self.fresh_only = fresh_only  # never an idle pooled connection (a retry after a stale one)
        self.waited = 0.0  # seconds spent waiting for a pool slot
        self.queued = False  # still waiting for a slot when the attempt ended
        # Whether the connection had sat idle in the pool before (served a request, or was
        # opened warm by min_idle); False for one opened for this very attempt.
        self.reused: bool | None = None
        self.protocol: ResponseHandler | None = None


ACQUISITION: ContextVar[Acquisition] = ContextVar("acquisition")


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, deaf while it sits idle in the pool, and the record of its
    connection's life.

    aiohttp keeps parsing bytes that arrive on an idle pooled connection and hands them to the
    next request as its response (AIOHTTP-NOTES §1.13): a backend that writes a second response
    would answer another client's request, and every request after it on that connection would
    get the answer meant for the one before. No byte may arrive while no request is out, so a
    connection that receives one is closed unread, as nginx does.

    The record is plain attributes on the protocol, not a table keyed by it: the protocol lives
    exactly as long as its connection, and an attribute costs the hot path no lookup.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_stray: Callable[[GuardedResponseHandler], None],
        on_lost: Callable[[GuardedResponseHandler, BaseException | None], None],
    ) -> None:
        super().__init__(loop)
        self.target: tuple[str, int | None] = ("?", None)  # (host, port), set once connected
        self.opened = time.monotonic()
        self.expires = _NEVER  # monotonic: max_age (jittered) runs out
        self.retire_at = _NEVER  # monotonic: the upstream's announced idle timeout runs out
        self.served = 0  # requests handed this connection (the one in progress included)
        self.idle_since: float | None = None  # monotonic, while in the pool with no request out
        # It has sat idle in the pool at least once (after a response, or opened warm): its
        # next request may race the upstream closing it (the stale keep-alive race).
        self.pooled = False
        self.answered = False  # a byte of the current request's response has come
        self.close_reason: str | None = None  # one of CLOSE_REASONS, once decided
        self._on_stray = on_stray
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None and data:
            self.close_reason = "error"
            self.close()  # the connector's _get skips a closed connection
            self._on_stray(self)
            return
        self.answered = True
        super().data_received(data)

    def close(self) -> None:
        # aiohttp closes an idle connection unasked only when pool.keepalive_timeout ran out
        # (BaseConnector._cleanup, or _get); every close of ours names its reason first.
        if self.close_reason is None and self.idle_since is not None and self.is_connected():
            self.close_reason = "idle_timeout"
        super().close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._on_lost(self, exc)  # asyncio calls this once per connection
        super().connection_lost(exc)


def take_upgraded(
    response: aiohttp.ClientResponse, protocol: asyncio.BaseProtocol
) -> tuple[asyncio.Transport, bytes]:
    """Take the connection a 101 came on away from aiohttp and give it to `protocol` (tunnel.py):
    out of its connector's count, never pooled, read, timed or closed by aiohttp again, and no
    longer counted in `closed` (its transport reports its close to `protocol`). Returns the
    transport and the bytes that came after the 101 head. Uses `Connection._protocol`,
    `._key`, `._connector`, `BaseConnector._release_acquired`, `ResponseHandler._tail` and
    `._drop_timeout` (internals.py checks them)."""
    connection = response.connection
    assert connection is not None and connection.protocol is not None  # forwardable checked
    handler = connection.protocol
    transport = handler.transport
    assert transport is not None
    connection._connector._release_acquired(connection._key, handler)
    connection._protocol = None  # the response's release() leaves the connection alone
    handler._drop_timeout()  # timeouts.read: a quiet tunnel is not a slow response
    handler.transport = None
    tail, handler._tail = handler._tail, b""
    transport.set_protocol(protocol)
    return transport, tail


def _holds_stray_bytes(protocol: ResponseHandler) -> bool:
    """Whether bytes beyond the last response were parsed or buffered (aiohttp 3.14.5's
    `DataQueue._buffer` holds parsed responses nobody read, `_tail` unparsed bytes)."""
    return bool(protocol._buffer or protocol._tail)


def _said_close(protocol: ResponseHandler) -> bool:
    """Whether the upstream's own response asked for the close (Connection: close, HTTP/1.0,
    or a body delimited by the close): aiohttp's `_should_close` with no error recorded."""
    return protocol._should_close and protocol.exception() is None


def _past_max_age(now: float, key: Any, protocol: GuardedResponseHandler) -> bool:
    return now >= protocol.expires


def key_request(
    url: str, server_hostname: str | None, loop: asyncio.AbstractEventLoop
) -> aiohttp.ClientRequest:
    """A request never sent: what aiohttp's connect() needs to open or take a connection to
    `url`, under the key the session's own requests to it get: the host as written
    (encoded=True, as in the session's URL), ssl=True (the connector's context), the SNI name.
    min_idle's warming and wire.py's requests use it."""
    return aiohttp.ClientRequest(
        "GET", URL(url, encoded=True), loop=loop, ssl=True, server_hostname=server_hostname
    )


class PoolFull(aiohttp.ClientConnectionError):
    """`max_pending` requests already wait for a slot: this one is refused at once."""


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that also counts what the pool metrics need and bounds each connection's
    life (max_requests, max_age), and keeps min_idle connections warm.

    Overrides three private coroutines (`_wait_for_available_connection`, `_get`,
    `_create_connection`), the private `_release` and `_factory`, and the public `connect` and
    `close`, reads and prunes three private attributes (`_acquired`, `_acquired_per_host`,
    `_conns`) and reads `_keepalive_timeout` of aiohttp's BaseConnector, checked against
    aiohttp 3.14.5 (pinned ~=3.14.0); `check_aiohttp()` fails at start-up if they move.
    """

    def __init__(
        self,
        *,
        name: str = "",
        max_pending: int = 0,
        max_requests: int = 0,
        max_age: float = 0.0,
        rng: random.Random | None = None,
        remember_gone: float = 60.0,  # s: gone_for(timeouts.connect)
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.name = name  # the upstream's, for log lines
        self.max_pending = max_pending  # 0 = unbounded
        self.max_requests = max_requests  # 0 = unlimited
        self.max_age = max_age  # s, 0 = unlimited
        self._rng = rng or random.Random()
        self.created = 0  # TCP connections opened since start
        self.waiting = 0  # requests waiting for a free slot now
        self._waiting_for: dict[Any, int] = {}  # the same, by connection key (target)
        self.retired = 0  # idle connections closed before the upstream's announced timeout
        self.discarded = dict.fromkeys(DISCARD_REASONS, 0)  # closed, never reused, by reason
        # Every close, by reason. Not `closed`: aiohttp's BaseConnector.closed is a bool that
        # ClientSession.closed reads (a non-empty dict there makes every request fail).
        self.closes = dict.fromkeys(CLOSE_REASONS, 0)
        self.window = PoolWindow()  # the last 10 minutes of the pool, for its sizing advice
        self._stray_logged = -_STRAY_LOG_EVERY
        self._warm_logged: dict[str, float] = {}
        self._warming: asyncio.Task[None] | None = None
        # Targets that left the upstream (close_target) and did not come back (target_back),
        # with when they left: a connection opened to one after it left (a request that had
        # picked it and waited for a slot, or warming) is marked as it opens (close_reason
        # "reload") and closed at its release, never pooled.
        # Forgotten after `remember_gone` s, when none can be opened any more: with discovery,
        # addresses that never come back (a pod's, say) would otherwise pile up for good.
        self._gone: OrderedDict[tuple[str, int | None], float] = OrderedDict()
        self._remember_gone = remember_gone
        self._departures = 0  # close_target() calls
        self._factory = functools.partial(  # type: ignore[assignment]
            GuardedResponseHandler, loop=self._loop, on_stray=self._discard_stray,
            on_lost=self._count_close,
        )  # fmt: skip

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        if self.max_pending and self.waiting >= self.max_pending:
            self.window.refused()
            raise PoolFull(f"{self.waiting} requests already wait for a connection")
        acquisition = ACQUISITION.get(None) or Acquisition()
        self.waiting += 1
        self.window.queued(self.waiting)
        self._waiting_for[key] = self._waiting_for.get(key, 0) + 1
        acquisition.queued = True
        started = time.monotonic()
        try:
            await super()._wait_for_available_connection(key, traces)
            acquisition.queued = False  # stays True if the connect timeout ends the wait
        finally:
            self.waiting -= 1
            left = self._waiting_for[key] - 1
            if left:
                self._waiting_for[key] = left
            else:
                del self._waiting_for[key]
            waited = time.monotonic() - started
            acquisition.waited += waited
            self.window.waited(waited)

    async def _get(self, key: Any, traces: Any) -> Any:
        # Skip idle connections past the idle timeout their upstream announced (Keep-Alive:
        # timeout=N): reusing one races the upstream closing it, the stale keep-alive 502.
        # Skip those past their max_age too: that is the moment to close them.
        acquisition = ACQUISITION.get(None)
        if acquisition is not None and acquisition.fresh_only:
            return None  # its siblings are likely stale too: open a new connection
        while (connection := await super()._get(key, traces)) is not None:
            protocol = cast(GuardedResponseHandler, connection.protocol)
            protocol.idle_since = None
            if _holds_stray_bytes(protocol):
                protocol.close_reason = "error"
                self._discard_stray(protocol)  # the second line of defence, see _release
                connection.close()
                continue
            deadline = min(protocol.retire_at, protocol.expires)
            if deadline == _NEVER or time.monotonic() < deadline:
                return connection
            if deadline == protocol.retire_at:
                self.retired += 1
                protocol.close_reason = "keepalive_hint"
            else:
                protocol.close_reason = "max_age"
            connection.close()
        return None

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        # Bytes that came in after the response (with it, or while the client was still being
        # written to) make aiohttp close the connection; they are counted here. Bytes that come
        # later, once it is idle, are refused by GuardedResponseHandler. A connection whose
        # life is over (max_requests, max_age, its target gone) closes here, after its response.
        if self.closed or not isinstance(protocol, GuardedResponseHandler):
            super()._release(key, protocol, should_close=should_close)
            return
        now = time.monotonic()
        reason = protocol.close_reason
        if reason is not None:
            # Decided while it was active: close_target(), or _create_connection for one
            # opened to a target as it left.
            should_close = True
        elif _holds_stray_bytes(protocol) and protocol.is_connected():
            self._discard_stray(protocol)
            reason, should_close = "error", True
        elif should_close:  # the response was abandoned or failed (Connection.close())
            reason = self._failure_reason(protocol, None)
        elif protocol.should_close:
            reason = "remote" if _said_close(protocol) else "error"
        elif self.force_close:
            reason = "idle_timeout"  # keepalive_timeout 0: no connection is kept idle
        elif self.max_requests and protocol.served >= self.max_requests:
            reason, should_close = "max_requests", True
        elif now >= protocol.expires:
            reason, should_close = "max_age", True
        protocol.close_reason = reason
        super()._release(key, protocol, should_close=should_close)
        if reason is None and protocol.is_connected():
            protocol.idle_since = now
            protocol.pooled = True

    def _failure_reason(self, protocol: GuardedResponseHandler, exc: BaseException | None) -> str:
        """Why an active connection we did not decide to close ended."""
        if protocol.pooled and not protocol.answered and not protocol.is_connected():
            return "stale"  # taken idle from the pool, and dead before any byte of the response
        if protocol.answered and exc is None and _said_close(protocol):
            return "remote"  # the upstream said close, and closed before aiohttp released it
        return "error"

    def _count_close(self, protocol: GuardedResponseHandler, exc: BaseException | None) -> None:
        """GuardedResponseHandler.connection_lost: count the close once, under the reason set
        by whoever closed it, else inferred from the state it was lost in."""
        reason = protocol.close_reason
        if reason is None:
            if self.closed:
                reason = "shutdown"  # made while the connector closed (aiohttp closes it)
            elif protocol.idle_since is not None:
                reason = "remote"  # the upstream closed an idle connection (FIN or reset)
                self.window.closed_idle(time.monotonic() - protocol.idle_since)
            else:  # the transport is closing by now: is_connected() is False
                reason = self._failure_reason(protocol, exc)
            protocol.close_reason = reason
        self.closes[reason] += 1
        if reason == "stale":
            self.window.went_stale()

    def _discard_stray(self, protocol: GuardedResponseHandler) -> None:
        self.discarded["unsolicited_data"] += 1
        now = time.monotonic()
        if now - self._stray_logged < _STRAY_LOG_EVERY:
            return  # counted; one line a minute is enough to say it goes on
        self._stray_logged = now
        host, port = protocol.target
        log.warning(
            "upstream %s: target %s:%s sent bytes that answer no request; closed that "
            "connection (a buggy backend, or a request smuggled in a body; %d so far, see "
            "proxy_upstream_connections_discarded_total)",
            self.name, host, port, self.discarded["unsolicited_data"],
        )  # fmt: skip

    def retire_after(self, protocol: ResponseHandler, seconds: float) -> None:
        """Do not reuse `protocol` once about `seconds` have passed from now (its response's
        headers): a little before the upstream's idle timer, which starts later, runs out."""
        margin = min(1.0, seconds / 2)  # leave time for the request to reach the upstream
        if isinstance(protocol, GuardedResponseHandler):
            protocol.retire_at = time.monotonic() + seconds - margin
        self.window.announced(seconds)

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        self.created += 1
        if isinstance(protocol, GuardedResponseHandler):
            key = req.connection_key
            protocol.target = (key.host, key.port)
            protocol.opened = time.monotonic()
            if self._gone and protocol.target in self._gone:
                # Opened to a target as it left (a request that had picked it, warming):
                # decided now, since by its release the target may be forgotten.
                protocol.close_reason = "reload"
            if self.max_age:
                jitter = self._rng.uniform(1 - _JITTER, 1 + _JITTER)
                protocol.expires = protocol.opened + self.max_age * jitter
        return protocol

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        if self._waiting_for and req.connection_key in self._waiting_for:
            # Requests already wait for a connection to this target (one may have been woken
            # for a connection just freed and not run yet): queue behind them. aiohttp hands a
            # freed connection to whoever asks first, and a waiter that finds it taken waits
            # again, so under overload a request arriving at the right moment overtakes the
            # whole queue (p99 far above p50; far more so on uvloop).
            wait = asyncio.timeout(timeout.connect) if timeout.connect else contextlib.nullcontext()
            async with wait:
                await self._wait_for_available_connection(req.connection_key, traces)
        connection = await super().connect(req, traces, timeout)
        self.window.took(len(self._acquired))  # in use now, this one included: the peak
        protocol = connection.protocol
        reused = False
        if isinstance(protocol, GuardedResponseHandler):
            reused = protocol.pooled  # a warm one (min_idle) too: it sat idle like any other
            protocol.served += 1
            protocol.answered = False
        acquisition = ACQUISITION.get(None)
        if acquisition is not None:
            acquisition.reused = reused
            acquisition.protocol = protocol
        return connection

    async def close(self, *, abort_ssl: bool = False) -> None:
        """Stop warming; whatever is still open closes as `shutdown` (unless close_all() or
        close_target() named a reason first)."""
        await self.stop_warming()
        self._mark_all("shutdown")
        await super().close(abort_ssl=abort_ssl)

    def _open_protocols(self) -> Iterable[GuardedResponseHandler]:
        """Every open connection, acquired then idle (aiohttp's `_acquired` also holds
        placeholders for connections being made; they are skipped)."""
        for protocol in self._acquired:
            if isinstance(protocol, GuardedResponseHandler) and protocol.is_connected():
                yield protocol
        for idle in self._conns.values():
            for protocol, _ in idle:
                if isinstance(protocol, GuardedResponseHandler) and protocol.is_connected():
                    yield protocol

    def _mark_all(self, reason: str) -> None:
        for protocol in list(self._open_protocols()):
            if protocol.close_reason is None:
                protocol.close_reason = reason

    def _close_idle(
        self, reason: str, which: Callable[[Any, GuardedResponseHandler], bool]
    ) -> None:
        """Close the idle connections `which(key, protocol)` picks, under `reason`, and take
        them out of aiohttp's pool (`_conns`, a deque of (protocol, released at) per key)."""
        for key, idle in list(self._conns.items()):
            kept: deque[tuple[ResponseHandler, float]] = deque()
            for protocol, released in idle:
                if isinstance(protocol, GuardedResponseHandler) and which(key, protocol):
                    if protocol.close_reason is None:
                        protocol.close_reason = reason
                    protocol.close()
                else:
                    kept.append((protocol, released))
            if not kept:
                del self._conns[key]
            elif len(kept) < len(idle):
                idle.clear()  # in place: aiohttp's _get may hold this deque across an await
                idle.extend(kept)

    def close_target(self, host: str, port: int | None) -> None:
        """`host:port` left the upstream: close its idle connections now, and its active ones
        after their response, all counted as `reload`; until target_back(host, port), so are
        those still opened to it (by a request that had picked it, or by warming)."""
        target = (host, port)
        now = time.monotonic()
        # The first to leave first (an OrderedDict's front is O(1) to read and to drop; a
        # dict's front is found again past every deleted slot): forgotten once none can connect.
        while self._gone:
            first, left = next(iter(self._gone.items()))
            if now - left < self._remember_gone:
                break
            del self._gone[first]
        self._gone[target] = now
        self._gone.move_to_end(target)  # the order stays the order they left in
        self._departures += 1  # a warming round in progress asks its list again (_warm)
        self._close_idle("reload", lambda key, _: (key.host, key.port) == target)
        for protocol in self._acquired:
            if isinstance(protocol, GuardedResponseHandler) and protocol.target == target:
                protocol.close_reason = protocol.close_reason or "reload"

    def target_back(self, host: str, port: int | None) -> None:
        """`host:port` is in the upstream again (discovery found it anew) after close_target():
        its new connections are pooled as usual. Connections already marked still close."""
        self._gone.pop((host, port), None)

    async def close_all(self, reason: str) -> None:
        """The upstream closes (`reason`: reload or shutdown): stop warming, close the idle
        connections now and mark the active ones, which close at their release or when the
        session closes the connector, counted once under `reason`."""
        assert reason in CLOSE_REASONS
        await self.stop_warming()
        self._mark_all(reason)
        self._close_idle(reason, lambda key, protocol: True)

    # --- min_idle: connections opened ahead of demand, and the max_age sweep ---

    def start_warming(
        self,
        targets: Callable[[], Iterable[tuple[str, str | None]]],
        min_idle: int,
        interval: float = 1.0,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        """Every `interval` s keep `min_idle` idle connections open to each (target URL,
        server_hostname) `targets()` answers, within pool.limit and limit_per_host (never
        waiting for a slot), and close idle connections past their max_age. Call it too when
        only max_age is set (min_idle 0): the sweep runs in the same task.

        min_idle is ignored, with a warning, when no idle connection outlives the interval
        (keepalive_timeout 0, or not above `interval`): each round would open connections
        that the idle timeout closes before the next one, with no request in between."""
        if min_idle and not self._keeps_warm(interval):
            min_idle = 0
        if not min_idle and not self.max_age:
            return  # nothing to do
        if self._warming is None:
            self._warming = asyncio.get_running_loop().create_task(
                self._warm(targets, min_idle, interval, connect_timeout),
                name=f"pool-warming-{self.name}",
            )

    def _keeps_warm(self, interval: float) -> bool:
        """Whether an idle connection lives past one warming round (aiohttp's
        `_keepalive_timeout`: None means no idle timeout); logs why not."""
        idle_timeout = self._keepalive_timeout
        if self.force_close:
            why = "keep-alive off (pool.keepalive_timeout 0) closes every idle connection"
        elif idle_timeout is not None and idle_timeout <= interval:
            why = (f"pool.keepalive_timeout {idle_timeout:g} s would close each warm "
                   f"connection before the next round ({interval:g} s)")  # fmt: skip
        else:
            return True
        log.warning("upstream %s: pool.min_idle ignored: %s; set pool.keepalive_timeout above "
                    "%g s to keep connections warm", self.name, why, interval)  # fmt: skip
        return False

    async def stop_warming(self) -> None:
        task, self._warming = self._warming, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _warm(
        self,
        targets: Callable[[], Iterable[tuple[str, str | None]]],
        min_idle: int,
        interval: float,
        connect_timeout: float,
    ) -> None:
        # This task's own context: _get never hands it an idle connection.
        ACQUISITION.set(Acquisition(fresh_only=True))
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        while True:
            if self.max_age:
                self._close_idle("max_age", functools.partial(_past_max_age, time.monotonic()))
            departures = self._departures
            wanted = self._warm_targets(targets) if min_idle else []
            for target in wanted:
                if self._departures != departures:
                    # A target left since the list was taken. The round may outlast _gone's
                    # memory of it (targets ahead of it timing out): ask the list again.
                    departures = self._departures
                    if target not in self._warm_targets(targets):
                        continue
                try:
                    await self._fill(*target, min_idle, timeout)
                except Exception as exc:  # connect, TLS, timeout: never the task's end
                    self._warm_failed(target[0], exc)
            await asyncio.sleep(interval)

    def _warm_targets(
        self, targets: Callable[[], Iterable[tuple[str, str | None]]]
    ) -> list[tuple[str, str | None]]:
        try:
            return list(targets())
        except Exception as exc:  # the upstream's own list: logged, never the task's end
            self._warm_failed("its targets", exc)
            return []

    async def _fill(
        self, url: str, server_hostname: str | None, min_idle: int, timeout: aiohttp.ClientTimeout
    ) -> None:
        """Open connections to `url` until it has `min_idle` idle ones or the pool is full."""
        request = key_request(url, server_hostname, self._loop)
        key = request.connection_key
        # At most min_idle opens a round, even if the upstream closes them as fast as they open.
        for _ in range(min_idle):
            if self._gone and (key.host, key.port) in self._gone:
                return  # it left after targets() answered, or while we connected
            idle = sum(1 for protocol, _ in self._conns.get(key, ()) if protocol.is_connected())
            if self.closed or idle >= min_idle:
                return
            if self.limit and len(self._acquired) + self._idle_count() >= self.limit:
                return
            if self.limit_per_host:
                active = len(self._acquired_per_host.get(key, ()))
                if active + idle >= self.limit_per_host:
                    return
            connection = await super().connect(request, [], timeout)  # counts no request
            connection.release()  # into the pool, idle, `served` 0 (closed if its target left)

    def _idle_count(self) -> int:
        return sum(1 for idle in self._conns.values() for p, _ in idle if p.is_connected())

    def _warm_failed(self, url: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warm_logged.get(url, -_WARM_LOG_EVERY) < _WARM_LOG_EVERY:
            return
        self._warm_logged[url] = now
        log.warning("upstream %s: cannot open a warm connection to %s (pool.min_idle): %r",
                    self.name, url, exc)  # fmt: skip

    # --- read at scrape time or by the admin endpoint, never per request ---

    def target_stats(self) -> dict[tuple[str, int | None], tuple[int, int]]:
        """(host, port) -> (active, idle) connections: a reader of aiohttp's private pool
        state (`_acquired`, `_conns`), read at scrape time, never per request."""
        stats: dict[tuple[str, int | None], list[int]] = {}
        for protocol in getattr(self, "_acquired", ()):
            if isinstance(protocol, GuardedResponseHandler):  # not a placeholder
                stats.setdefault(protocol.target, [0, 0])[0] += 1
        for key, idle in getattr(self, "_conns", {}).items():
            alive = sum(1 for protocol, _ in idle if protocol.is_connected())
            stats.setdefault((key.host, key.port), [0, 0])[1] += alive
        return {target: (active, idle) for target, (active, idle) in stats.items()}

    def connections(self) -> list[dict[str, Any]]:
        """One entry per open upstream connection, active then idle (GET /pools?connections=1).
        `requests` counts the one in progress on an active connection."""
        now = time.monotonic()
        entries = []
        for protocol in self._open_protocols():
            host, port = protocol.target
            transport = protocol.transport
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            idle_since = protocol.idle_since
            entries.append({
                "target": f"{host}:{port}",
                "local_port": sockname[1] if isinstance(sockname, tuple) else None,
                "age": round(now - protocol.opened, 3),
                "requests": protocol.served,
                "state": "active" if idle_since is None else "idle",
                "idle_since": None if idle_since is None else round(now - idle_since, 3),
            })  # fmt: skip
        return entries
