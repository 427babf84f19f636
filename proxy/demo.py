"""`python -m proxy.demo [--config FILE]`: the proxy in front of small demo backends.

Starts one echo backend on every loopback target the config names, then serves the proxy in the
same process, so `curl localhost:8080/api/hello` answers at once. For trying the proxy out only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.parse

from aiohttp import web

from proxy.config import Config, ConfigError, Target, load_config
from proxy.loops import loop_factory, run
from proxy.server import StartupError, serve


def echo_app(name: str) -> web.Application:
    """Answers with what it received; `.../events` streams five server-sent events."""

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/events"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for i in range(5):
                    await response.write(f"data: tick {i} from {name}\n\n".encode())
                    await asyncio.sleep(1)
                await response.write_eof()
            except ConnectionResetError:  # the client stopped listening
                pass
            return response
        body = await request.read()
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "target": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_bytes": len(body),
            },
            dumps=lambda obj: json.dumps(obj, indent=2) + "\n",
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def demo_backends(config: Config) -> list[tuple[str, int]]:
    """The loopback (host, port) pairs the config's targets point at, in order."""
    found: list[tuple[str, int]] = []
    for upstream in config.upstreams.values():
        for target in upstream.targets:
            if not isinstance(target, Target):
                continue  # dns and srv targets: not the demo's to start
            url = urllib.parse.urlsplit(target.url)
            host, port = url.hostname, url.port
            local = url.scheme == "http" and host in ("127.0.0.1", "localhost")
            if local and host and port and (host, port) not in found:
                found.append((host, port))
    return found


async def run_demo(config: Config, config_path: str) -> None:
    runners = []
    try:
        for host, port in demo_backends(config):
            runner = web.AppRunner(echo_app(f"{host}:{port}"), access_log=None)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise StartupError(
                    f"demo backend cannot listen on {host}:{port} ({exc.strerror}): free the port"
                ) from None
            logging.info("demo backend listening on http://%s:%d", host, port)
        listen = config.listen
        logging.info(
            "try: curl -i http://%s:%d/api/hello",
            "127.0.0.1" if listen.host == "0.0.0.0" else listen.host,
            listen.port,
        )
        await serve(config, config_path)  # SIGHUP and POST /reload read it again
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo", description=__doc__)
    parser.add_argument("--config", default="config.yaml", metavar="FILE")
    parser.add_argument(
        "--backend", type=int, metavar="PORT",
        help="serve only one echo backend, on 0.0.0.0:PORT (deploy/docker-compose.yml uses it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.backend is not None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        web.run_app(echo_app(f"backend:{args.backend}"), host="0.0.0.0", port=args.backend,
                    access_log=None, print=None)  # fmt: skip
        return 0
    try:
        config = load_config(args.config)
        loop_factory(config.event_loop)  # event_loop: uvloop is installed
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(config.event_loop, lambda: run_demo(config, args.config))
    except StartupError as exc:
        print(f"proxy demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
