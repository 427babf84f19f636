"""`workers: N`: N worker processes share the client port (SO_REUSEPORT) under a supervisor that
reserves the port, restarts a worker that dies, forwards SIGTERM, reloads every worker, and serves
the admin listener: metrics merged across workers, /pools per worker, readiness of them all.

Each worker keeps its metrics in its own process and serves them on a private abstract Unix
socket; the supervisor merges the expositions when Prometheus scrapes (Merger: totals that never
go down, each gauge aggregated by what it means). Knows nothing of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from proxy.accept import bind_all
from proxy.admin import guarded, healthz, reload_handler
from proxy.advice import supervisor_view, window_seconds
from proxy.config import Config, ConfigError, load_config
from proxy.guard import CHANGE_HEADER, AdminGuard, load_policy
from proxy.loops import run
from proxy.merging import Merged, Merger
from proxy.metrics import admin_unauthorized_family
from proxy.server import cannot_listen, handle_signals, listen_on
from proxy.status import SharedRound, supervisor_routes
from proxy.worker import TOKEN_VARIABLE, unix_path


def loop_time() -> float:
    return asyncio.get_running_loop().time()


log = logging.getLogger("proxy")

RESTART_DELAY = 0.5  # s before a dead worker is started again
MAX_RESTART_DELAY = 30.0  # the back-off for a worker that keeps dying right after it starts
ASK_TIMEOUT = 5.0  # s for a worker to answer a scrape (Prometheus's default timeout is 10 s)
RELOAD_TIMEOUT = 10.0  # s for a worker to apply a reload and answer
CONVERGE_POLL = 0.5  # s between two looks at the workers' watch of a reload (rollback.py)


class Answer(NamedTuple):
    pid: int  # the worker process that answered
    status: int
    text: str


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind, without listening, a SO_REUSEPORT socket on each address of host:port, as the
    workers will: a port taken by another process (or any bind error) fails here, once, with
    the line single-process mode prints, instead of in every worker for ever. Held for the
    supervisor's lifetime, the port stays the proxy's while workers restart. The kernel hands
    connections to listening sockets only, so this one takes none (probed on Linux 6.x).
    No SO_REUSEADDR: with it, another process's SO_REUSEADDR socket could bind beside it."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return bind_all(found, reuse_address=False, reuse_port=True)
    except OSError as exc:
        raise cannot_listen(host, port, "listen", exc) from None


class Supervisor:
    def __init__(self, config: Config, config_path: str, count: int, source: bytes) -> None:
        self.config = config
        self.config_path = config_path
        # The config file's bytes in force, and those a rollback of the reload being verified
        # returns to. After a rollback the file still holds the rolled-back config, so a worker
        # started again (it died) starts from a private copy of the restored one instead
        # (`--start-from`); the next reload that stands makes the file the source again.
        self._in_force = source  # the bytes `config` was read from
        self._rollback_to = self._in_force
        self._restored: Path | None = None
        self.count = count
        self.state = "starting"
        self.restarts = 0
        self.merger = Merger()
        # Abstract sockets: no file, so a read-only root filesystem is fine. Their names are
        # shared by the network namespace (a pod's containers), hence the random part.
        token = secrets.token_hex(4)
        self.sockets = [f"@proxy-{os.getpid()}-{token}-worker-{i}" for i in range(count)]
        # Anything in the network namespace can connect to those sockets: the workers answer
        # only this secret. admin.token_file and allowed_hosts guard the supervisor's listener.
        self.worker_token = secrets.token_urlsafe(32)
        self.guard = AdminGuard(load_policy(config.admin))
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._failed_first: set[int] = set()  # workers whose first process exited with 1
        self._scraping = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._converging: asyncio.Task[None] | None = None  # the last reload's, see _converge
        # The status page's questions to the workers, shared by the pages open at once.
        self._status = SharedRound(lambda: self._ask_all("/status.json"))

    async def _spawn(self, index: int) -> None:
        self._procs[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.worker", "--config", self.config_path,
            "--admin-socket", self.sockets[index],
            *(("--start-from", str(self._restored)) if self._restored is not None else ()),
            env={**os.environ, TOKEN_VARIABLE: self.worker_token},
            # A session of its own: signals sent to the supervisor's process group (Ctrl-C,
            # `timeout`) reach the workers only through the supervisor, once. Twice would mean
            # "exit at once" to a draining worker.
            start_new_session=True,
        )  # fmt: skip
        log.info("worker %d started (pid %d)", index, self._procs[index].pid)
        self._status.forget()

    async def _watch(self, index: int) -> None:
        """Start worker `index` again whenever it dies, until the supervisor stops."""
        delay = RESTART_DELAY
        first = True
        while self.state != "draining":
            started = loop_time()
            code = await self._procs[index].wait()
            if self.state == "draining":
                return
            if first and code == 1:
                self._failed_first.add(index)
            if len(self._failed_first) == self.count:
                # Not one worker could start (each says why above): nothing will change that.
                log.error("every worker exited with 1 at its first start: stopping")
                self._drain()
                return
            first = False
            self.restarts += 1
            # One that dies at once (its port taken, say) is retried less and less often.
            delay = (
                min(delay * 2, MAX_RESTART_DELAY) if loop_time() - started < 5 else RESTART_DELAY
            )
            log.error("worker %d (pid %d) exited with %d; starting it again in %.1f s",
                      index, self._procs[index].pid, code, delay)  # fmt: skip
            await asyncio.sleep(delay)
            if self.state != "draining":
                await self._spawn(index)

    async def _ask(self, index: int, path: str, method: str) -> Answer:
        connector = aiohttp.UnixConnector(path=unix_path(self.sockets[index]))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(
                method,
                f"http://localhost{path}",
                headers={"Authorization": f"Bearer {self.worker_token}", CHANGE_HEADER: "1"},
            ) as response,
        ):
            text = await response.text()
            # Read with no await since the answer came: no restart can come in between.
            return Answer(self._procs[index].pid, response.status, text)

    async def _ask_all(
        self, path: str, method: str = "GET", within: float = ASK_TIMEOUT
    ) -> list[Answer | None]:
        async def one(index: int) -> Answer | None:
            try:
                return await asyncio.wait_for(self._ask(index, path, method), within)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None  # starting, restarting, stopping, or too slow

        return await asyncio.gather(*(one(i) for i in range(self.count)))

    def _signal_all(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def _drain(self) -> None:
        self.state = "draining"
        self._signal_all(signal.SIGTERM)
        self._stopping.set()

    async def reload(self, verify: float | None = None) -> tuple[bool, str]:
        """POST /reload to every worker, for POST /reload here and SIGHUP: applied only if each
        worker applied it; one line per worker says what it did. The workers check the file,
        so the supervisor does not. A worker that is down reads the file when it starts.
        `verify` (POST /reload?verify=) goes to every worker, each watching its own share."""
        verifying = self._converging is not None and not self._converging.done()
        await self._stop_converging()  # each worker goes on watching, with this reload
        query = "" if verify is None else "?" + urlencode({"verify": f"{verify:g}"})
        answers = await self._ask_all("/reload" + query, "POST", RELOAD_TIMEOUT)
        self._status.forget()
        lines = [
            f"worker {i} (pid {a.pid}): {a.text.strip()}"
            if a is not None
            else f"worker {i}: down or not answering, not reloaded"
            for i, a in enumerate(answers)
        ]
        applied = all(a is not None and a.status == 200 for a in answers)
        if applied:
            try:  # the workers read the file; its admin keys guard this listener
                self.guard.policy = load_policy(load_config(self.config_path).admin)
            except ConfigError as exc:  # changed again since the workers read it
                applied = False
                lines.append(f"supervisor: {exc}")
        for line in lines:
            log.log(logging.INFO if applied else logging.ERROR, "reload: %s", line)
        if any(a is not None and a.status == 200 for a in answers):
            if not verifying:  # else a rollback still returns to what the last one replaced
                self._rollback_to = self._in_force
            self._in_force = _read_bytes(self.config_path)
            self._start_from(None)
            self._converging = asyncio.create_task(self._converge())
        return applied, "\n".join(lines)

    async def _converge(self) -> None:
        """While the workers watch a reload (rollback.py), each over the share of the traffic
        the kernel gives it: once one rolls it back, roll it back on the others too, so every
        worker serves the same config. Ends when no worker watches it any more."""
        while True:
            answers = await self._ask_all("/reload/verification")
            states = [
                json.loads(a.text)["state"] if a is not None and a.status == 200 else None
                for a in answers
            ]
            if "rolled_back" in states:
                first = states.index("rolled_back")
                told = answers[first]
                why = f"worker {first} (pid {told.pid if told else 0}) rolled the reload back"
                self._in_force = self._rollback_to
                self._start_from(self._rollback_to)
                path = "/reload/rollback?" + urlencode({"why": why})
                done = await self._ask_all(path, "POST", RELOAD_TIMEOUT)
                self._status.forget()
                for i, answer in enumerate(done):
                    if i != first:
                        said = answer.text.strip() if answer else "down or not answering"
                        log.error("reload rollback: worker %d: %s", i, said)
                return
            if "verifying" not in states:
                return
            await asyncio.sleep(CONVERGE_POLL)

    def _start_from(self, config: bytes | None) -> None:
        """Workers started from now on start from `config` (None: the config file)."""
        if self._restored is not None:
            self._restored.unlink(missing_ok=True)
            self._restored = None
        if config is not None:
            descriptor, name = tempfile.mkstemp(prefix="proxy-restored-", suffix=".yaml")
            with os.fdopen(descriptor, "wb") as file:  # 0600: only this user reads it
                file.write(config)
            self._restored = Path(name)
            log.warning(
                "until the next reload, a worker started again starts from the restored "
                "config (%s), not from %s", name, self.config_path,
            )  # fmt: skip

    async def _stop_converging(self) -> None:
        if self._converging is not None:
            self._converging.cancel()
            await asyncio.gather(self._converging, return_exceptions=True)

    def admin_app(self) -> web.Application:
        async def readyz(request: web.Request) -> web.Response:
            answers = await self._ask_all("/readyz") if self.state == "serving" else []
            ready = bool(answers) and all(a is not None and a.status == 200 for a in answers)
            text = self.state
            if self.state == "serving" and not ready:
                text = "starting"  # a worker is starting, or starting again
            return web.Response(status=200 if ready else 503, text=text + "\n")

        async def metrics(request: web.Request) -> web.Response:
            # One scrape at a time: the Merger must see each worker's answers in order.
            async with self._scraping:
                answers = await self._ask_all("/metrics")
                merged = self.merger.merge([(a.pid, a.text) if a else None for a in answers])
            registry = CollectorRegistry()
            registry.register(Merged(with_own(merged, self._own_metrics())))
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

        async def pools(request: web.Request) -> web.Response:
            answers = await self._ask_all("/pools")
            workers = [
                {"worker": i, "pid": self._procs[i].pid if i in self._procs else None,
                 **(json.loads(a.text) if a is not None else {"upstreams": None})}
                for i, a in enumerate(answers)
            ]  # fmt: skip
            return web.json_response({"workers": workers})

        async def pools_advice(request: web.Request) -> web.Response:
            try:
                seconds = window_seconds(request.query)
            except ValueError as exc:
                return web.Response(status=400, text=f"{exc}\n")
            answers = await self._ask_all(f"/pools/advice?window={seconds}")
            return web.json_response(supervisor_view(seconds, [
                (self._procs[i].pid if i in self._procs else None,
                 json.loads(a.text) if a is not None and a.status == 200 else None)
                for i, a in enumerate(answers)
            ]))  # fmt: skip

        app = web.Application(middlewares=[guarded(self.guard)])
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/pools", pools)
        app.router.add_get("/pools/advice", pools_advice)
        app.router.add_post("/reload", reload_handler(self.reload))
        # The status page over every worker's /status.json, summed (status.py's `merged`).
        app.router.add_routes(supervisor_routes(lambda: self.state, self._status))
        return app

    def _own_metrics(self) -> list[Metric]:
        return [
            GaugeMetricFamily("proxy_workers", "Worker processes configured.", self.count),
            CounterMetricFamily(
                "proxy_worker_restarts", "Workers started again after they died.", self.restarts
            ),
            admin_unauthorized_family(self.guard.unauthorized),
        ]

    async def run(self) -> int:
        listen = self.config.listen
        reserved = reserve_port(listen.host, listen.port)
        runner = web.AppRunner(self.admin_app(), access_log=None)
        try:
            await runner.setup()
            await listen_on(runner, self.config.admin.host, self.config.admin.port, "admin")
            return await self._serve(runner)
        finally:
            for sock in reserved:
                sock.close()

    async def _serve(self, runner: web.AppRunner) -> int:
        def drain(name: str) -> None:
            log.info("%s: the workers drain, then exit", name)
            self._drain()

        def kill_now(name: str) -> None:
            log.warning("second %s: stopping the workers now", name)
            self._signal_all(signal.SIGKILL)
            os._exit(1)

        signals = handle_signals(self.reload, drain, kill_now)
        for index in range(self.count):
            if self.state == "draining":
                break  # a signal came while the workers were starting
            await self._spawn(index)
        watchers = [asyncio.create_task(self._watch(i)) for i in self._procs]
        if self.state == "starting":
            self.state = "serving"
        log.info("supervisor: %d workers on %s:%d, admin on http://%s:%d", self.count,
                 self.config.listen.host, self.config.listen.port, self.config.admin.host,
                 self.config.admin.port)  # fmt: skip

        await self._stopping.wait()
        signals.set()  # a signal from now on stops the workers at once
        await self._stop_converging()
        codes = await asyncio.gather(*(p.wait() for p in self._procs.values()))
        self._start_from(None)  # the private copy goes with the supervisor
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await runner.cleanup()
        log.info("stopped (workers exited with %s)", codes)
        failed = len(self._failed_first) == self.count
        return 0 if not failed and all(code == 0 for code in codes) else 1


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # the workers read it and say why
        return b""


def with_own(merged: list[Metric], own: list[Metric]) -> list[Metric]:
    """The workers' families and the supervisor's own; the samples of a family both have (the
    401s: on this listener, and on the workers' sockets) are added together."""
    families = {metric.name: metric for metric in merged}
    for metric in own:
        found = families.get(metric.name)
        if found is None:
            families[metric.name] = metric
            continue
        summed = Metric(found.name, found.documentation, found.type)
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for sample in (*found.samples, *metric.samples):
            series = (sample.name, tuple(sorted(sample.labels.items())))
            values[series] = values.get(series, 0.0) + sample.value
        for (name, labels), value in values.items():
            summed.add_sample(name, dict(labels), value)
        families[metric.name] = summed
    return list(families.values())


def supervise(config: Config, config_path: str, source: bytes) -> int:
    count = config.workers or os.cpu_count() or 1
    # The supervisor serves no client: it stays on asyncio whatever `event_loop` says, which
    # also keeps it on asyncio's Unix sockets (uvloop cannot connect to the workers' abstract
    # sockets: OSError EINVAL on "\0name", probed with uvloop 0.23).
    return run("asyncio", lambda: Supervisor(config, config_path, count, source).run())
