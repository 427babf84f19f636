"""The reference for bench/run.py: a minimal pooled aiohttp reverse proxy, and nothing else.

    python bench/minimal.py --port 8080 --upstream http://127.0.0.1:8081 [--pool-limit 100]
                            [--loop asyncio|uvloop]

What a competent 30-line aiohttp proxy does: aiohttp's own low-level server (the one the proxy
under test uses), ONE ClientSession whose TCPConnector pools and keeps upstream connections
alive, the request forwarded (method, path and query, headers minus hop-by-hop with the client's
Host, the body streamed) and the response streamed back (status, headers minus hop-by-hop),
with no decompression, no metrics, no logs, aiohttp's default client timeout. Keep-alive both
ways. Independent of the `proxy` package on purpose: it is what the proxy is compared against.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import ClientSession, TCPConnector, web
from multidict import CIMultiDictProxy

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
    "expect",  # answered here (aiohttp's low-level server does not), never forwarded
}  # fmt: skip


def end_to_end(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    items = list(headers.items())
    drop = HOP_BY_HOP | {
        t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",")
    }
    return [(k, v) for k, v in items if k.lower() not in drop]


async def serve(port: int, upstream: str, pool_limit: int) -> None:
    session = ClientSession(
        upstream, connector=TCPConnector(limit=pool_limit), auto_decompress=False
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with session.request(
            request.method,
            request.raw_path,  # path and query, as the client sent them
            headers=end_to_end(request.headers),  # Host included: the client's
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status,
                reason=upstream_response.reason,
                headers=end_to_end(upstream_response.headers),
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT")
    parser.add_argument("--pool-limit", type=int, default=100, help="TCPConnector(limit=...)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            sys.exit("bench/minimal.py: --loop uvloop needs uvloop (pip install uvloop)")
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port, args.upstream, args.pool_limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
