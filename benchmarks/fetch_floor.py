"""The floor of scenario 4's outbound HTTP: a Python client alone, N concurrent GETs to the 50 ms local server.

    python -m actionpool.benchmarks.fetch_floor [--requests 500] [--rounds 3]

aiohttp is the floor row of ``actionpool bench --only 4`` (``s4.aiohttp_floor``): the fastest Python client
measured here, and the one under ``api.fetch`` (runner/_fetch_client.py). The CLI also prints httpx's
``AsyncClient`` with the same pool size, for the record of why fetch left it (docs/design.md, "The fetch
client"); its rounds are capped in time, since its pool is quadratic in the requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

HTTPX_ROUND_S = 30.0  # one httpx round may take minutes at 500 in flight: cut it and say so


async def aiohttp_round(url: str, n: int, session: Any) -> tuple[float, float]:
    """(requests per second, CPU seconds of this process) for ``n`` concurrent GETs on ``session``."""

    async def one() -> None:
        async with session.get(url) as resp:
            await resp.read()

    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t), time.process_time() - cpu


async def aiohttp_floor(url: str, n: int, rounds: int = 3, *, close: bool = False) -> dict[str, Any]:
    """One warm-up round, then ``rounds`` measured: the median req/s and CPU, and every round's figures.

    ``close``: a new connection per request (``Connection: close``), as api.fetch does to a non-public
    address such as the bench's 127.0.0.1 upstream.
    """
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(n, 100), force_close=close)
    async with aiohttp.ClientSession(connector=connector) as session:
        await aiohttp_round(url, n, session)  # connections opened, nothing measured
        figures = [await aiohttp_round(url, n, session) for _ in range(rounds)]
    return {
        "req_per_s": statistics.median(f[0] for f in figures),
        "cpu_s": statistics.median(f[1] for f in figures),
        "rounds": [{"req_per_s": round(f[0], 1), "cpu_s": round(f[1], 4)} for f in figures],
    }


async def httpx_floor(url: str, n: int) -> dict[str, Any]:
    """The same with httpx (keep-alive, pool of ``n``); one warm-up and one measured round, each time-capped."""
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        out: dict[str, Any] = {}
        for label in ("warm-up", "measured"):
            t, cpu = time.perf_counter(), time.process_time()
            try:
                await asyncio.wait_for(asyncio.gather(*(client.get(url) for _ in range(n))), HTTPX_ROUND_S)
            except asyncio.TimeoutError:
                out = {"req_per_s": None, "cpu_s": time.process_time() - cpu,
                       "note": f"{label} round did not finish within {HTTPX_ROUND_S:.0f} s"}
                break
            out = {"req_per_s": n / (time.perf_counter() - t), "cpu_s": time.process_time() - cpu}
    return out


async def _run(n: int, rounds: int, with_httpx: bool) -> None:
    srv = subprocess.Popen([sys.executable, "-m", "actionpool.benchmarks._http_server", "--delay", "0.05"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None
        url = f"http://127.0.0.1:{int(srv.stdout.readline())}/"
        for close in (False, True):
            a = await aiohttp_floor(url, n, rounds, close=close)
            print(f"aiohttp  {n} concurrent GETs{' (close)' if close else '        '}: {a['req_per_s']:,.0f} req/s, "
                  f"{a['cpu_s']:.3f} s CPU ({a['cpu_s'] / n * 1e6:.0f} us per request; median of {rounds})")
        if with_httpx:
            h = await httpx_floor(url, n)
            rate = f"{h['req_per_s']:,.0f} req/s" if h["req_per_s"] else h["note"]
            print(f"httpx    {n} concurrent GETs: {rate}, {h['cpu_s']:.2f} s CPU")
    finally:
        if srv.stdin is not None:
            srv.stdin.close()
        srv.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actionpool.benchmarks.fetch_floor")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-httpx", action="store_true", help="skip the httpx row")
    args = p.parse_args(argv)
    asyncio.run(_run(max(1, args.requests), max(1, args.rounds), not args.no_httpx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
