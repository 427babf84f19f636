"""The stale keep-alive race, failures out of N, for this proxy and (with --baseline) another
revision, in one run:

    python bench/stale.py --baseline ef3180c -n 100

Two backends on 127.0.0.1 close connections without saying so: one after 0.2 s idle, one as soon
as a second request arrives on a connection. Each proxy gets N sequential GETs on one client
connection (paced to reuse the pooled connection as it goes stale), N concurrent GETs (batches of
10), and N POSTs each after a GET (a POST must get 502, never a replay). Servers listen on
127.0.0.1 and stop at the end; the run takes about a minute per proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worktree import checkout  # noqa: E402 - bench/worktree.py, beside this script

from tests.support import (  # noqa: E402 - the test suite's raw backends, reused
    RawBackend,
    closes_idle_after,
    closes_on_reuse,
    free_port,
    http_response,
)

OK = http_response(body=b"ok")


async def run_proxy(source: Path, target: str, root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, admin = free_port(), free_port()
    config = root / f"stale-{port}.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"upstreams: {{app: {{targets: ['{target}']}}}}\n"
        "routes: [{match: {path_prefix: /}, upstream: app}]\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(config)],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        stdout=subprocess.DEVNULL,  # the access log
        stderr=subprocess.DEVNULL,
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                    if response.status == 200:
                        return proc, port
            await asyncio.sleep(0.05)
    proc.kill()  # never leave a proxy behind
    proc.wait()
    raise SystemExit(f"stale: the proxy from {source} did not become ready on {admin}")


async def measure(port: int, n: int, pace: bool) -> dict[str, int]:
    base = f"http://127.0.0.1:{port}"
    failures = {"sequential GET": 0, "concurrent GET": 0, "GET after 5 concurrent": 0}
    one = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=one) as session:
        for _ in range(n):
            try:
                async with session.get(base + "/") as response:
                    await response.read()
                    failures["sequential GET"] += response.status != 200
            except aiohttp.ClientError:
                failures["sequential GET"] += 1
            if pace:
                await asyncio.sleep(random.uniform(0.18, 0.22))
    fresh = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=fresh) as session:

        async def get() -> int:
            try:
                async with session.get(base + "/") as response:
                    await response.read()
                    return int(response.status != 200)
            except aiohttp.ClientError:
                return 1

        for _ in range(n // 10):
            failures["concurrent GET"] += sum(await asyncio.gather(*(get() for _ in range(10))))
            await asyncio.sleep(0.21 if pace else 0)
        # Five idle connections go stale together; one GET then meets them one after another.
        for _ in range(n):
            await asyncio.gather(*(get() for _ in range(5)))
            if pace:
                await asyncio.sleep(0.21)
            failures["GET after 5 concurrent"] += await get()
    return failures


async def main() -> int:
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # backend tasks cancelled at stop
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="requests per measure (default 100)")
    parser.add_argument("--baseline", metavar="REV", help="also measure git revision REV")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="proxy-stale-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        sources = [("this proxy", REPO)]
        if args.baseline:
            baseline = stack.enter_context(checkout(args.baseline, root / "baseline"))
            sources.append((f"baseline {args.baseline}", baseline))
        rows = []
        for fault, handler, pace in (
            ("closes idle after 0.2 s", closes_idle_after(0.2, OK), True),
            ("closes on reuse", closes_on_reuse(OK), False),
        ):
            for name, source in sources:
                print(f"{name}: backend {fault}...", file=sys.stderr, flush=True)
                backend = await RawBackend(handler).start()
                proc, port = await run_proxy(source, backend.url, root)
                try:
                    failures = await measure(port, args.n, pace)
                    posts = await post_after_get(port, args.n, backend)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                    await backend.stop()
                rows.append((fault, name, failures, posts))
    n = args.n
    print(
        "\n| backend | proxy | sequential GET failed | concurrent GET failed "
        "| GET after 5 concurrent failed | POST after GET: 502 / replayed |"
    )
    print("|---|---|---|---|---|---|")
    for fault, name, failures, (bad_gateway, replayed) in rows:
        print(
            f"| {fault} | {name} | {failures['sequential GET']}/{n} | "
            f"{failures['concurrent GET']}/{n // 10 * 10} | "
            f"{failures['GET after 5 concurrent']}/{n} | {bad_gateway}/{n} / {replayed} |"
        )
    return 0


async def post_after_get(port: int, n: int, backend: RawBackend) -> tuple[int, int]:
    """(POSTs answered 502, POSTs the backend received more than once) for n GET+POST pairs."""
    base = f"http://127.0.0.1:{port}"
    bad_gateway = 0
    one = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=one) as session:
        for i in range(n):
            async with session.get(base + "/") as response:
                await response.read()
            async with session.post(base + f"/post/{i}", data=b"x") as response:
                await response.read()
                bad_gateway += response.status == 502
    seen = [r.target for r in backend.requests if r.method == "POST"]
    return bad_gateway, len(seen) - len(set(seen))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
