"""`workers: N`: N worker processes share the client port (SO_REUSEPORT) under a supervisor that
restarts a worker that dies, forwards SIGHUP and SIGTERM, and serves the admin listener: metrics
merged across workers, /pools per worker, readiness of them all.

Each worker keeps its metrics in its own process and serves them on a private Unix socket; the
supervisor merges the expositions when Prometheus scrapes, with each gauge aggregated by what it
means. Knows nothing of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.admin import healthz, reload_handler
from proxy.config import Config, ConfigError, load_config
from proxy.server import handle_signals, listen_on


def loop_time() -> float:
    return asyncio.get_running_loop().time()


log = logging.getLogger("proxy")

# Gauges that are not summed across workers. Counters and histograms are always summed.
GAUGE_AGGREGATION = {
    "proxy_upstream_pool_limit": max,  # each worker's pool has this limit
    "proxy_upstream_pool_limit_per_host": max,
    "proxy_upstream_target_up": min,  # up only while every worker's checks say so
    "proxy_upstream_panic": max,
    "proxy_build_info": max,
    "proxy_config_hash": max,
    "proxy_config_last_reload_success_timestamp_seconds": min,  # the oldest config in force
}
# Counted by every worker for the same event: one reload of the file is one reload.
SAME_EVENT_COUNTERS = {"proxy_config_reloads_total"}
RESTART_DELAY = 0.5  # s before a dead worker is started again
MAX_RESTART_DELAY = 30.0  # the back-off for a worker that keeps dying right after it starts


def merge(expositions: Iterable[str]) -> list[Metric]:
    """Metric families of several workers' expositions, merged into one."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation,
                                                    family.type))  # fmt: skip
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples.setdefault(key, []).append(sample.value)
    for name, metric in families.items():
        for (sample_name, labels), found in values[name].items():
            how = GAUGE_AGGREGATION.get(name, sum) if metric.type == "gauge" else sum
            if sample_name in SAME_EVENT_COUNTERS:
                how = max
            metric.add_sample(sample_name, dict(labels), how(found))
    return list(families.values())


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


class Supervisor:
    def __init__(self, config: Config, config_path: str, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.state = "starting"
        self.restarts = 0
        self._dir = tempfile.mkdtemp(prefix="proxy-workers-")
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    def socket(self, index: int) -> str:
        return os.path.join(self._dir, f"worker-{index}.sock")

    async def _spawn(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket(index))
        self._procs[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.worker", "--config", self.config_path,
            "--admin-socket", self.socket(index),
            # A session of its own: signals sent to the supervisor's process group (Ctrl-C,
            # `timeout`) reach the workers only through the supervisor, once. Twice would mean
            # "exit at once" to a draining worker.
            start_new_session=True,
        )  # fmt: skip
        log.info("worker %d started (pid %d)", index, self._procs[index].pid)

    async def _watch(self, index: int) -> None:
        """Start worker `index` again whenever it dies, until the supervisor stops."""
        delay = RESTART_DELAY
        while self.state != "draining":
            started = loop_time()
            code = await self._procs[index].wait()
            if self.state == "draining":
                return
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

    async def _ask(self, index: int, path: str, accept: str = "") -> tuple[int, str]:
        connector = aiohttp.UnixConnector(path=self.socket(index))
        async with aiohttp.ClientSession(connector=connector) as session:
            headers = {"Accept": accept} if accept else {}
            async with session.get(f"http://worker{path}", headers=headers) as response:
                return response.status, await response.text()

    async def _ask_all(self, path: str) -> list[tuple[int, str] | None]:
        async def one(index: int) -> tuple[int, str] | None:
            try:
                return await asyncio.wait_for(self._ask(index, path), 5)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None  # starting, restarting or stopping

        return await asyncio.gather(*(one(i) for i in range(self.count)))

    def _signal_all(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    async def reload(self) -> tuple[bool, str]:
        """Have every worker reload the file (SIGHUP; each applies or rejects it, and counts
        it), and check it here too, to answer POST /reload with the result."""
        self._signal_all(signal.SIGHUP)
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected, still serving the previous config: %s", exc)
            return False, str(exc)
        return True, f"reload sent to {self.count} workers"

    def admin_app(self) -> web.Application:
        async def readyz(request: web.Request) -> web.Response:
            answers = await self._ask_all("/readyz") if self.state == "serving" else []
            ready = bool(answers) and all(a is not None and a[0] == 200 for a in answers)
            text = self.state
            if self.state == "serving" and not ready:
                text = "starting"  # a worker is starting, or starting again
            return web.Response(status=200 if ready else 503, text=text + "\n")

        async def metrics(request: web.Request) -> web.Response:
            texts = [a[1] for a in await self._ask_all("/metrics") if a is not None]
            registry = CollectorRegistry()
            registry.register(_Merged([*merge(texts), *self._own_metrics()]))
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

        async def pools(request: web.Request) -> web.Response:
            answers = await self._ask_all("/pools")
            workers = [
                {"worker": i, "pid": self._procs[i].pid if i in self._procs else None,
                 **(json.loads(a[1]) if a is not None else {"upstreams": None})}
                for i, a in enumerate(answers)
            ]  # fmt: skip
            return web.json_response({"workers": workers})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/pools", pools)
        app.router.add_post("/reload", reload_handler(self.reload))
        return app

    def _own_metrics(self) -> list[Metric]:
        return [
            GaugeMetricFamily("proxy_workers", "Worker processes configured.", self.count),
            CounterMetricFamily(
                "proxy_worker_restarts", "Workers started again after they died.", self.restarts
            ),
        ]

    async def run(self) -> int:
        runner = web.AppRunner(self.admin_app(), access_log=None)
        await runner.setup()
        await listen_on(runner, self.config.admin.host, self.config.admin.port, "admin")
        for index in range(self.count):
            await self._spawn(index)
        watchers = [asyncio.create_task(self._watch(i)) for i in range(self.count)]
        self.state = "serving"
        log.info("supervisor: %d workers on %s:%d, admin on http://%s:%d", self.count,
                 self.config.listen.host, self.config.listen.port, self.config.admin.host,
                 self.config.admin.port)  # fmt: skip

        def drain(name: str) -> None:
            self.state = "draining"
            log.info("%s: the workers drain, then exit", name)
            self._signal_all(signal.SIGTERM)

        def kill_now(name: str) -> None:
            log.warning("second %s: stopping the workers now", name)
            self._signal_all(signal.SIGKILL)
            os._exit(1)

        await handle_signals(self.reload, drain, kill_now).wait()
        codes = await asyncio.gather(*(p.wait() for p in self._procs.values()))
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await runner.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)
        log.info("stopped (workers exited with %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1


def supervise(config: Config, config_path: str) -> int:
    count = config.workers or os.cpu_count() or 1
    return asyncio.run(Supervisor(config, config_path, count).run())
