"""A tiny HTTP/1.1 server on 127.0.0.1 that answers every request after a fixed delay.

Scenario 4's upstream: an I/O-bound action awaits it, so what is measured is
how many flows the runner keeps in flight while they wait, not the server.
It runs in its own process (its CPU and memory are not the supervisor's) and
exits when its stdin closes, so it cannot outlive the phase that started it.

    python -m benchmarks._http_server --delay 0.05     # prints the port, then serves
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

BODY = b'{"ok":true,"score":7}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
MAX_HEAD = 64 << 10


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:  # keep-alive: the supervisor's HTTP client reuses connections
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(delay)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _main(delay: float, port: int) -> None:
    server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, delay), "127.0.0.1", port,
                                        backlog=4096, limit=MAX_HEAD)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:  # parent gone (or done) -> EOF on stdin -> stop serving
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            if not stdin_closed.done():
                stdin_closed.set_result(None)

    loop.add_reader(fd, on_stdin)
    async with server:
        await stdin_closed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(_main(args.delay, args.port))


if __name__ == "__main__":
    main()
