"""The composition root: listeners, the snapshot in force, reloads, signals, and shutdown.

Owns the proxy's lifecycle; per-request logic lives in forward.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TextIO

from aiohttp import web
from multidict import CIMultiDict

from proxy import advice, status, tracing
from proxy.accept import GuardedListener, GuardedSite
from proxy.accesslog import AccessLog
from proxy.admin import admin_app, verification_routes
from proxy.certificates import POLL_INTERVAL, ListenerCertificates
from proxy.config import Config, ConfigError, load_config
from proxy.deadlines import Deadlines
from proxy.exchange import Exchange
from proxy.forward import Forwarder
from proxy.guard import AdminGuard, load_policy
from proxy.internals import AiohttpMoved, check_aiohttp
from proxy.listener import ProxyHTTPServer, handler_kwargs
from proxy.metrics import ProxyMetrics
from proxy.ratelimit import worker_count
from proxy.recent import Recent
from proxy.reload import ReloadOutcome, describe_changes
from proxy.rollback import InForce, Verification, describe_watch
from proxy.snapshot import (
    Snapshot,
    build_snapshot,
    files_differ,
    rebuilt_for_tls,
    upstream_tls,
)
from proxy.upstream import Upstream

log = logging.getLogger("proxy")


class StartupError(Exception):
    """The proxy could not start (a port in use, say); the message says what to do."""


def config_hash(config: Config, path: str | Path | None) -> str:
    """The first 16 hex digits of the config file's SHA-256 (of the parsed config without one)."""
    data = Path(path).read_bytes() if path is not None else repr(config).encode()
    return hashlib.sha256(data).hexdigest()[:16]


class ProxyServer:
    """The data-plane listener and the admin listener around the snapshot in force."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        shutdown_grace: float | None = None,
        access_log_stream: TextIO | None = None,
        admin_socket: str | None = None,
        admin_token: str | None = None,
        reuse_port: bool = False,
        certificate_poll: float = POLL_INTERVAL,
        split_random: random.Random | None = None,
        started_from: str | None = None,  # read instead of config_path at start (worker.py)
    ) -> None:
        self.config = config
        # Draws the upstream of each `split` request (routing.py); a seeded one makes tests
        # repeatable. One per server, kept across reloads.
        self._split_random = split_random if split_random is not None else random.Random()
        # As a worker (workers.py): the admin app on a private Unix socket for the supervisor,
        # asked with `admin_token`, and the client port shared with the other workers.
        self._admin_socket = admin_socket
        self._admin_token = admin_token
        self.admin_guard = AdminGuard(load_policy(config.admin, admin_token))
        self._reuse_port = reuse_port
        self.config_path = config_path
        self.state = "starting"
        self._shutdown_grace = config.shutdown.grace if shutdown_grace is None else shutdown_grace
        self._snapshot: Snapshot | None = None
        self._proxy_server: ProxyHTTPServer | None = None
        self._listener: GuardedListener | None = None
        self._proxy_runner: web.BaseRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        # listen.tls: the certificates chosen by SNI, and the task re-reading their files.
        self._certificates: ListenerCertificates | None = None
        self._certificate_poll = certificate_poll
        self._watching: asyncio.Task[None] | None = None
        self.access_log = (
            AccessLog(access_log_stream or sys.stdout, config.access_log.format)
            if config.access_log.enabled
            else None
        )
        self.metrics = ProxyMetrics(
            self.current,
            client_connections=lambda: (
                self._proxy_server.open_connections if self._proxy_server else 0
            ),
            client_timeouts=lambda: (
                self._proxy_server.client_timeouts if self._proxy_server else {}
            ),
            accept_paused=lambda: self._listener.paused if self._listener else {},
            proxy_protocol_errors=lambda: (
                self._listener.proxy_protocol_errors if self._listener else {}
            ),
            access_log_dropped=lambda: self.access_log.dropped if self.access_log else 0,
            admin_unauthorized=lambda: self.admin_guard.unauthorized,
            certificate_expiry=self._certificate_expiry,
            pool_advice=lambda: advice.gauge_values(self._snapshot, worker_count(self.config)),
        )
        self._prepare_metrics(config, config_hash(config, started_from or config_path))
        self.recent = Recent()  # the last minute by route, upstream and target (recent.py)
        self.last_reload: ReloadOutcome | None = None
        # The last reload's watch (rollback.py): it may roll the reload back until the next one.
        self._verification: Verification | None = None

    def _admin_routes(self) -> list[web.RouteDef]:
        """The admin pages beyond admin.py's own."""
        return [
            *status.routes(status.Sources(
                self.current, self.recent, lambda: self.state,
                lambda: self.metrics.config_hash, lambda: self.last_reload,
            )),
            web.get("/pools/advice", advice.advice_handler(
                self.current, lambda: worker_count(self.config))),
        ]  # fmt: skip

    def _prepare_metrics(
        self, config: Config, digest: str | None = None, reloaded: bool = True
    ) -> None:
        self.metrics.prepare(
            # Every upstream a route can send to (a split's all), "" for a redirect's.
            ((r.name, u) for r in config.routes for u in r.upstreams or ("",)),
            config.upstreams,
            limited=(r.name for r in config.routes if r.rate_limit is not None),
            redirects=((r.name, r.redirect.status) for r in config.routes if r.redirect),
        )  # fmt: skip
        self.metrics.config_hash = digest or config_hash(config, self.config_path)
        if reloaded:  # a rollback is no successful reload
            self.metrics.last_reload_success = time.time()

    def _certificate_expiry(self) -> dict[str, float]:
        """When each certificate in use expires, by its key: the listener's and the upstreams'
        client certificates."""
        expiry = self._certificates.expiry if self._certificates is not None else {}
        for upstream in self._snapshot.upstreams.values() if self._snapshot else ():
            if upstream.client_certificate is not None:
                expiry[upstream.client_certificate.path] = upstream.client_certificate.not_after
        return expiry

    def _certificates_failed(self) -> None:
        self.metrics.reloads["failure"] += 1

    def current(self) -> Snapshot:
        assert self._snapshot is not None, "ProxyServer.start() was not awaited"
        return self._snapshot

    def _observe(self, exchange: Exchange) -> None:
        """Every request ends here, once: metrics, the last minute's outcomes, then the
        access log."""
        self.metrics.record(exchange)
        self.recent.record(exchange)
        if self.access_log is not None:
            self.access_log.write(exchange)

    def _on_rejected(self, client: str | None, status: int) -> None:
        """A request aiohttp's parser refused (400/414/431) still counts and is logged, and its
        answer carries a request ID like every other (set for the task that answers it)."""
        exchange = Exchange(time.time(), time.perf_counter(), client, "", "", status=status)
        if self._snapshot is not None and self._snapshot.request_id.header:
            exchange.identity = tracing.identify(
                _NO_HEADERS, self._snapshot.request_id.header, False, False
            )
            tracing.CURRENT.set(exchange.identity)
        self._observe(exchange)

    async def start(self) -> None:
        """Admin first, so /readyz answers 503 while the data plane comes up."""
        try:
            await check_aiohttp()
        except AiohttpMoved as exc:
            raise StartupError(str(exc)) from None
        config = self.config
        self._admin_runner = web.AppRunner(
            admin_app(
                lambda: self.state,
                self.metrics.registry,
                self.current,
                self.reload,
                self.admin_guard,
                [*self._admin_routes(), *self._worker_routes()],
            ),
            access_log=None,
        )
        await self._admin_runner.setup()
        if self._admin_socket is not None:
            await web.UnixSite(self._admin_runner, self._admin_socket).start()
        else:
            await listen_on(self._admin_runner, config.admin.host, config.admin.port, "admin")

        if config.listen.tls is not None:
            try:
                self._certificates = ListenerCertificates(
                    config.listen.tls,
                    on_failure=self._certificates_failed,
                    poll_interval=self._certificate_poll,
                )
            except ConfigError as exc:  # a file changed since `--check` passed
                raise StartupError(str(exc)) from None
        tls = self._certificates.context if self._certificates is not None else None
        if self.access_log is not None:
            self.access_log.start()
        self._snapshot = await build_snapshot(config, rng=self._split_random)
        self._snapshot.start()
        listen = config.listen
        server = ProxyHTTPServer(
            Forwarder(
                self.current,
                scheme="https" if tls else "http",
                observe=self._observe,
                max_body=listen.limits.max_body,
                allow_underscores=listen.allow_underscores_in_headers,
                trusted_proxies=listen.trusted_proxies,
            ),
            deadlines=Deadlines(
                header=listen.timeouts.header,
                body=listen.timeouts.body,
                send=listen.timeouts.send,
                keepalive=listen.keepalive_timeout > 0,
            ),
            on_rejected=self._on_rejected,
            # A client that goes away cancels its handler, which cancels the upstream request
            # and frees its pool slot (aiohttp's default is to let the handler run on).
            handler_cancellation=True,
            **handler_kwargs(
                listen.keepalive_timeout,
                listen.limits.max_request_line,
                listen.limits.max_header,
                listen.limits.max_headers,
            ),
        )
        self._proxy_server = server
        self._proxy_runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=self._shutdown_grace
        )
        await self._proxy_runner.setup()
        site = GuardedSite(
            self._proxy_runner, listen.host, listen.port, ssl_context=tls,
            reuse_port=self._reuse_port, max_connections=listen.limits.max_connections,
            handshake_timeout=listen.timeouts.header, proxy_protocol=listen.proxy_protocol,
        )  # fmt: skip
        await start_site(site, self._proxy_runner, listen.host, listen.port, "listen")
        self._listener = site.listener
        if self._certificates is not None:
            self._watching = asyncio.create_task(self._certificates.watch())
        self.state = "serving"
        log.info(
            "proxy listening on %s://%s:%d, admin on %s: %d upstreams, %d routes",
            "https" if tls else "http", *self.proxy_address,
            # An abstract socket's name starts with NUL: shown as "@", as ss(8) does.
            (self._admin_socket or "").replace("\0", "@")
            or "http://{}:{}".format(*self.admin_address),
            len(config.upstreams), len(config.routes),
        )  # fmt: skip

    async def reload(self, verify: float | None = None) -> tuple[bool, str]:
        """Re-read the config file and apply it, or keep the running one if it is invalid.

        Upstreams whose settings did not change keep their sessions and warm connections; the
        others are replaced, and the replaced ones close once their requests in flight finish
        (bounded by shutdown.grace). Requests in flight finish on the snapshot they started
        with: only new requests see the new one. Returns (applied, what happened).

        The listener's certificates, keys and client_ca are read again (and listen.tls's other
        keys applied) for new handshakes; connections already open keep theirs. Turning
        listen.tls on or off, like the rest of `listen`, takes a restart.

        For `verify` seconds (POST /reload?verify=, else the new file's reload.verify) the
        routes and upstreams it adds or changes are watched, and it may be rolled back
        (rollback.py). A newer reload ends the watch: it is watched against what it replaces.
        """
        async with self._reload_lock:
            if self.config_path is None:
                return False, "no config file to reload"
            try:
                new = load_config(self.config_path)
                admin_policy = load_policy(new.admin, self._admin_token)  # the token file again
                listening = self._certificates
                tls = (new.listen.tls or listening.tls) if listening is not None else None
                certificates = listening.load(tls) if listening and tls else None
                snapshot = await build_snapshot(new, keep=self._snapshot, rng=self._split_random)
            except ConfigError as exc:
                self.metrics.reloads["failure"] += 1
                log.error("reload rejected, still serving the previous config: %s", exc)
                self.last_reload = ReloadOutcome("failure", time.time(), str(exc))
                return False, str(exc)
            # A reload that is still watched goes on being watched, with this one (rollback.py).
            running = self._verification
            if running is not None:
                await running.stop()
                running = running if running.watching else None
            previous = self._in_force()
            reloaded = InForce(
                new, admin_policy, (tls, certificates) if tls and certificates else None,
                config_hash(new, self.config_path), upstream_tls(snapshot),
            )  # fmt: skip
            changes, reread = self._apply(reloaded, snapshot)
            message = "; ".join(changes)
            self.metrics.reloads["success"] += 1
            seconds = new.reload.verify if verify is None else verify
            verification = Verification(
                previous, new, seconds, self.recent, self._verdict, follows=running,
                reread=reread,
            )  # fmt: skip
            self._verification = verification
            watch = describe_watch(  # None when there is nothing to verify
                verification.previous.config, new,
                verification.seconds_left if running else seconds, verification.reread,
            )  # fmt: skip
            if watch is not None:
                message += "; " + watch
            if verification.due and (seconds > 0 or running is not None):
                verification.start()
            log.info("config reloaded: %s", message)
            self.last_reload = ReloadOutcome("success", time.time(), message)
            return True, message

    def _in_force(self) -> InForce:
        listening = self._certificates
        return InForce(
            self.config, self.admin_guard.policy,
            (listening.tls, listening.current) if listening is not None else None,
            self.metrics.config_hash, upstream_tls(self.current()),
        )  # fmt: skip

    def _apply(
        self, state: InForce, snapshot: Snapshot, reloaded: bool = True
    ) -> tuple[list[str], list[str]]:
        """Swap in `snapshot`, built from `state`, and retire the upstreams it replaced: the
        step a reload and a rollback (not `reloaded`) share. Returns what changed, and the
        upstreams built again for their TLS files alone (their connections are new too)."""
        old = self.current()
        rebuilt = rebuilt_for_tls(old, snapshot)
        why = "its TLS files changed" if reloaded else "its TLS from before the reload"
        for name, upstream in snapshot.upstreams.items():
            if old.upstreams.get(name) is not upstream:
                upstream.start()
        self._snapshot = snapshot  # the swap: new requests see the new table from here
        self.admin_guard.policy = state.policy
        if self._certificates is not None and state.certificates is not None:
            self._certificates.use(*state.certificates)  # the next handshakes' certificates
        for name, upstream in old.upstreams.items():
            if snapshot.upstreams.get(name) is not upstream:
                task = asyncio.create_task(self._retire(upstream))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        changes = describe_changes(
            self.config, state.config, [f"upstream {name} rebuilt: {why}" for name in rebuilt]
        )
        self.config = state.config
        self._prepare_metrics(state.config, state.config_hash, reloaded)
        return changes, rebuilt

    async def _verdict(self, verification: Verification, why: str | None) -> None:
        """The end of a reload's watch: verified, or `why` it fails, which rolls it back."""
        if why is None:
            log.info("reload verified: %s", verification.summary())
            if self.last_reload is not None and self.last_reload.result == "success":
                verified = self.last_reload.message + "; verified"
                self.last_reload = ReloadOutcome("success", self.last_reload.time, verified)
            return
        async with self._reload_lock:
            if self._verification is verification:  # else a newer reload came meanwhile
                await self._roll_back(verification, why)

    async def roll_back(self, why: str) -> tuple[bool, str]:
        """Roll the last reload back now, verified or not, if no newer reload came: the
        supervisor's way to make every worker follow one that rolled back (workers.py)."""
        async with self._reload_lock:
            verification = self._verification
            if verification is None or verification.state == "rolled_back":
                return False, "no reload to roll back"
            await verification.stop()
            return await self._roll_back(verification, why)

    async def _roll_back(self, verification: Verification, why: str) -> tuple[bool, str]:
        """Restore the config the reload replaced, as a reload would (unchanged upstreams keep
        their warm pools). The file still holds the rolled-back config: the log says so.

        The admin guard and the listener's certificates stay as the reload read them from their
        files: they are not what the verification watched, and a token rotated in the same
        reload must not come back (certificates.py re-reads its files on its own)."""
        current = self._in_force()
        config = dataclasses.replace(
            verification.previous.config, admin=self.config.admin, listen=self.config.listen
        )
        before = verification.previous.upstream_tls
        previous = InForce(
            config, current.policy, current.certificates, verification.previous.config_hash,
            before,
        )  # fmt: skip
        try:
            snapshot = await build_snapshot(config, self._snapshot, self._split_random, before)
        except ConfigError as exc:  # a certificate file of the old config is gone, say
            log.error("reload not rolled back (%s): %s; still serving it", why, exc)
            verification.state = "rollback_failed"
            self.last_reload = ReloadOutcome("failure", time.time(), f"rollback failed: {exc}")
            return False, str(exc)
        changes, _ = self._apply(previous, snapshot, reloaded=False)
        restored = "; ".join(changes)
        verification.state = "rolled_back"
        self.metrics.reloads["rolled_back"] += 1
        message = (
            f"{why}; restored: {restored}; the config file still holds the rolled-back "
            "config: fix it before the next reload"
        )
        if stale := files_differ(snapshot):  # a reload would read those again
            message += f" (and the TLS files of upstream {', '.join(stale)})"
        log.error("reload rolled back: %s", message)
        self.last_reload = ReloadOutcome("rolled_back", time.time(), message)
        return True, message

    def _worker_routes(self) -> list[web.RouteDef]:
        """As a worker, what the supervisor asks of the last reload's watch (workers.py)."""
        if self._admin_socket is None:
            return []
        return verification_routes(lambda: self._verification, self.roll_back)

    async def _retire(self, upstream: Upstream) -> None:
        """Close a replaced upstream once its requests in flight (tunnels included) are done,
        or time is up."""
        await _drained([upstream], self._shutdown_grace)
        await upstream.aclose("reload")

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests and tunnels finish (bounded), then close
        every pool."""
        self.state = "draining"
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + self._shutdown_grace
        if self._verification is not None:
            await self._verification.stop()  # draining: nothing more to roll back
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self._proxy_runner is not None:
            # Closes the listening socket and idle keep-alive connections, waits up to
            # shutdown_timeout for handlers in progress, then cancels what is left.
            await self._proxy_runner.cleanup()
        if self._snapshot is not None:
            # Tunnels left aiohttp (tunnel.py): they get what is left of the grace, and are
            # closed with the pools.
            await _drained(self._snapshot.upstreams.values(), grace_ends - loop.time())
        if self._retiring:
            await asyncio.gather(*self._retiring)
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


async def listen_on(runner: web.BaseRunner, host: str, port: int, key: str) -> None:
    await start_site(web.TCPSite(runner, host, port), runner, host, port, key)


async def start_site(
    site: web.BaseSite, runner: web.BaseRunner, host: str, port: int, key: str
) -> None:
    """Start `site`; a port that cannot be bound is a StartupError naming the key to change."""
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise cannot_listen(host, port, key, exc) from None


def cannot_listen(host: str, port: int, key: str, exc: OSError) -> StartupError:
    """The one-line error for a port that cannot be bound, naming the key to change."""
    return StartupError(
        f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
        f"free the port or change {key}.port in the config"
    )


def handle_signals(
    reload: Callable[[], Awaitable[object]],
    first_stop: Callable[[str], None],
    second_stop: Callable[[str], None],
) -> asyncio.Event:
    """SIGTERM or SIGINT: `first_stop(name)`, then the returned event is set; another one:
    `second_stop(name)`, which exits. SIGHUP: `reload()`, in a task kept until it is done."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    reloads: set[asyncio.Task[object]] = set()

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            second_stop(name)
            return
        first_stop(name)
        stopping.set()

    def on_reload() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    return stopping


GC_YOUNG = 10_000  # net container allocations between young collections (CPython: 700)


async def serve(
    config: Config,
    config_path: str | Path | None = None,
    *,
    admin_socket: str | None = None,
    admin_token: str | None = None,
    reuse_port: bool = False,
    started_from: str | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop; SIGHUP reloads the config file.

    Drain: /readyz turns 503 at once; after shutdown.delay the listener closes; requests in
    flight get shutdown.grace to finish; pools close last. A second signal exits at once.
    """
    server = ProxyServer(
        config, config_path=config_path, admin_socket=admin_socket, admin_token=admin_token,
        reuse_port=reuse_port, started_from=started_from,
    )  # fmt: skip
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    # What start-up built (modules, config, routing table, pools) lives as long as the process:
    # out of the collector's generations, a full collection under load no longer walks it
    # again each time, a pause every request in flight waits out. p99 at 50 clients 18 ms
    # against 36, CPU per request 0.83-0.98 (bench/run.py --baseline). Here, not in start():
    # the process's decision, not that of every ProxyServer a test makes.
    gc.freeze()
    # A young-generation collection walks every container object allocated since the last
    # one and still alive: under load, the state of the requests in flight. Its cost does not
    # depend on how often it runs, so at CPython's default (every 700 net allocations, a few
    # requests) it was 4-5% of the event loop's CPU (bench/profile.py --native:
    # gc_collect_main); every GC_YOUNG it is out of the profile. Cycles wait that much longer
    # to be freed: a few MiB at most.
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])

    def drain(name: str) -> None:
        server.state = "draining"  # /readyz: 503 from now on
        log.info(
            "%s: draining (listener closes in %.0f s; requests get %.0f s), then exiting",
            name, config.shutdown.delay, config.shutdown.grace,
        )  # fmt: skip

    def exit_now(name: str) -> None:
        log.warning("second %s: exiting now", name)
        os._exit(1)

    stopping = handle_signals(server.reload, drain, exit_now)
    try:
        await stopping.wait()
        # Load balancers keep sending until they notice /readyz: keep serving meanwhile.
        await asyncio.sleep(config.shutdown.delay)
    finally:
        await server.stop()
        log.info("stopped")


_NO_HEADERS: CIMultiDict[str] = CIMultiDict()


async def _drained(upstreams: Iterable[Upstream], seconds: float) -> None:
    """Wait until no request (nor tunnel) is in flight on any of `upstreams`, or `seconds`."""
    busy = []
    for upstream in upstreams:
        upstream.drained = asyncio.Event()
        if upstream.in_flight:
            busy.append(upstream.drained)
    if busy and seconds > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                for event in busy:
                    await event.wait()
