"""An open-loop load generator: Poisson arrivals, latency from each flow's scheduled start.

A closed loop (N clients, each waiting for its answer before sending the next) slows its
own arrivals down whenever the system stalls, so a stall delays few measured requests: the
coordinated omission. A gateway's logins do not wait for each other. Here arrivals follow a
schedule fixed before the run (exponential gaps at ``rate``), a flow is started at its
scheduled time however many are still in flight, and its latency runs from that scheduled
time, not from when the generator got round to starting it. A stalled supervisor then shows
in every flow that should have started during the stall.

Pure in its clock and sleep (both injectable), so ``tests/test_bench_open_loop.py`` checks the
schedule and the measurement with a fake clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ._harness import PhaseTimeout


def poisson_offsets(rate_per_s: float, n: int, rng: random.Random) -> list[float]:
    """Arrival times (seconds from the start) of ``n`` flows of a Poisson process at ``rate_per_s``."""
    if rate_per_s <= 0 or n < 0:
        raise ValueError("an open loop needs a positive rate and a non-negative count")
    out: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


@dataclass
class OpenLoopResult:
    latencies: list[float] = field(default_factory=list)   # seconds, scheduled start -> answer, of answered flows
    start_lag: list[float] = field(default_factory=list)   # seconds the generator started each flow late
    results: list[Any] = field(default_factory=list)       # FlowResult or the exception, in schedule order
    elapsed: float = 0.0                                   # first scheduled start -> last answer
    max_in_flight: int = 0


async def open_loop(call: Callable[[int], Awaitable[Any]], offsets: list[float], timeout_s: float, *,
                    max_in_flight: int = 10_000, clock: Callable[[], float] = time.perf_counter,
                    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> OpenLoopResult:
    """Start ``call(i)`` at ``offsets[i]`` after now; bounded by ``timeout_s`` and ``max_in_flight``.

    A flow that would exceed ``max_in_flight`` is not started: it is recorded as an error (the
    system is not keeping up with the rate, which is itself the finding), never delayed.
    """
    n = len(offsets)
    out = OpenLoopResult(results=[None] * n)
    lat: list[float | None] = [None] * n
    tasks: set[asyncio.Future[Any]] = set()
    t0 = clock()
    end = t0 + timeout_s

    async def one(i: int, due: float) -> None:
        try:
            res = await call(i)
        except Exception as exc:  # noqa: BLE001 - counted and reported by the caller
            out.results[i] = exc
            return
        lat[i] = clock() - due   # from the SCHEDULED start: a late start is part of the latency
        out.results[i] = res

    for i, off in enumerate(offsets):
        due = t0 + off
        now = clock()
        if due > now:
            await sleep(due - now)
            now = clock()
        if now >= end:
            break
        if len(tasks) >= max_in_flight:
            out.results[i] = RuntimeError(f"open loop: {max_in_flight} flows already in flight")
            continue
        out.start_lag.append(max(0.0, now - due))
        task = asyncio.ensure_future(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        out.max_in_flight = max(out.max_in_flight, len(tasks))
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, end - clock()))
        if pending:
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=2.0)
            raise PhaseTimeout(f"open loop: {len(pending)} of {n} flows unfinished after {timeout_s:.0f}s")
    unstarted = sum(1 for r in out.results if r is None)
    if unstarted:
        raise PhaseTimeout(f"open loop: {unstarted} of {n} flows not started within {timeout_s:.0f}s")
    out.elapsed = clock() - t0
    out.latencies = [x for x in lat if x is not None]
    return out
