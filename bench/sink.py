"""`python bench/sink.py PORT [DELAY]`: an HTTP/1.1 backend on 127.0.0.1 that reads every byte of
each request body (Content-Length or chunked) and then answers 200. The 1 GiB upload goes here,
because nginx's `return 200` answers before reading the body and the client stops sending.
With DELAY (seconds), each answer waits that long first: a slow backend, where the pool is the
bottleneck rather than the proxy's CPU (bench/run.py's proxy-slow and proxy-shed)."""

from __future__ import annotations

import asyncio
import functools
import sys


async def serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float = 0.0
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            }
            received = 0
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    received += len(await reader.readexactly(size + 2)) - 2
                await reader.readuntil(b"\r\n")
            else:
                left = int(headers.get(b"content-length", b"0"))
                while left:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                    received += len(chunk)
            if delay:
                await asyncio.sleep(delay)
            body = f"{received}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, delay: float) -> None:
    server = await asyncio.start_server(functools.partial(serve, delay=delay), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0))
