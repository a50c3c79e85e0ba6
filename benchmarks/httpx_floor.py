"""The floor of scenario 4's outbound HTTP: httpx alone, N concurrent GETs to the 50 ms local server.

    python -m benchmarks.httpx_floor [--requests 500]

Prints requests per second and CPU seconds with and without keep-alive. actionpool's fetch runs on the
same httpx client in the supervisor, so scenario 4 cannot beat this figure on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import httpx


async def _run(n: int) -> None:
    srv = subprocess.Popen([sys.executable, "-m", "actionpool.benchmarks._http_server", "--delay", "0.05"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None
        url = f"http://127.0.0.1:{int(srv.stdout.readline())}/"
        for close in (True, False):
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
            async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
                headers = {"connection": "close"} if close else {}
                await asyncio.gather(*(client.get(url, headers=headers) for _ in range(n)))  # warm-up
                t, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*(client.get(url, headers=headers) for _ in range(n)))
                wall = time.perf_counter() - t
                print(f"{'close    ' if close else 'keepalive'} {n} concurrent GETs: {n / wall:,.0f} req/s, "
                      f"{time.process_time() - cpu:.2f} s CPU")
    finally:
        if srv.stdin is not None:
            srv.stdin.close()
        srv.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.httpx_floor")
    p.add_argument("--requests", type=int, default=500)
    args = p.parse_args(argv)
    asyncio.run(_run(args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
