"""The reference for bench/run.py: a minimal pooled aiohttp reverse proxy, and nothing else.

    python bench/minimal.py --port 8080 --upstream http://127.0.0.1:8081 [--pool-limit 100]
                            [--loop asyncio|uvloop] [--client session|raw]

What a competent 30-line aiohttp proxy does: aiohttp's own low-level server (the one the proxy
under test uses), ONE ClientSession whose TCPConnector pools and keeps upstream connections
alive, the request forwarded (method, path and query, headers minus hop-by-hop with the client's
Host, the body streamed) and the response streamed back (status, headers minus hop-by-hop),
with no decompression, no metrics, no logs, aiohttp's default client timeout. Keep-alive both
ways. Independent of the `proxy` package on purpose: it is what the proxy is compared against.

`--client raw` (bench target `minimal-raw`, issue 13's experiment): the same pool, but a request
without a body is written below ClientSession._request: the connection taken from the
TCPConnector directly, the request head written on it as bytes, the response read by aiohttp's
own ResponseHandler (its C parser), the connection released at the body's end. How much of a
proxy's CPU the client machinery above that costs; not a proxy to run (no timeouts, no errors
handled: a failed upstream leaves the client without an answer).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDictProxy
from yarl import URL

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


class RawTarget:
    """What TCPConnector.connect reads of a ClientRequest, for one plain-HTTP upstream."""

    def __init__(self, upstream: str) -> None:
        self.url = URL(upstream)
        self.host, self.port = self.url.raw_host, self.url.port
        self.ssl, self.server_hostname = True, None  # True: aiohttp's "default verification"
        self.proxy = self.proxy_auth = self.proxy_headers = None
        assert self.host is not None and self.url.scheme == "http"
        self.connection_key = ConnectionKey(self.host, self.port, False, True, None, None, None)

    def is_ssl(self) -> bool:
        return False


async def forward_raw(
    request: web.BaseRequest, connector: TCPConnector, target: RawTarget
) -> web.StreamResponse:
    """One request without a body, below ClientSession._request (see the module's doc)."""
    connection = await connector.connect(target, [], NO_TIMEOUT)  # type: ignore[arg-type]
    protocol = connection.protocol
    assert protocol is not None and protocol.transport is not None
    protocol.set_response_params(skip_payload=request.method == "HEAD", auto_decompress=False)
    lines = [f"{request.method} {request.raw_path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in end_to_end(request.headers)]
    protocol.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    message, payload = await protocol.read()
    payload.on_eof(connection.release)  # back to the pool (closed if the response said so)
    response = web.StreamResponse(
        status=message.code, reason=message.reason, headers=end_to_end(message.headers)
    )
    await response.prepare(request)
    async for chunk in payload.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


NO_TIMEOUT = ClientTimeout()


async def serve(port: int, upstream: str, pool_limit: int, client: str) -> None:
    connector = TCPConnector(limit=pool_limit)
    session = ClientSession(upstream, connector=connector, auto_decompress=False)
    raw = RawTarget(upstream) if client == "raw" else None

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if raw is not None and not request.body_exists:
            return await forward_raw(request, connector, raw)
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
    parser.add_argument("--client", choices=["session", "raw"], default="session")
    args = parser.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            sys.exit("bench/minimal.py: --loop uvloop needs uvloop (pip install uvloop)")
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port, args.upstream, args.pool_limit, args.client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
