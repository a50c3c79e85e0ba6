"""The open-loop generator (benchmarks/_open_loop.py): Poisson schedule, latency from the scheduled start.

A fake clock drives it: sleeping advances the clock by exactly what was asked, and a flow's
"work" advances it too, so every figure is exact and nothing depends on the machine.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from actionpool.benchmarks._open_loop import open_loop, poisson_offsets


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        """Let every ready task run first (they may move the clock), then arrive at the target time."""
        self.slept.append(s)
        target = self.now + s
        for _ in range(10):
            await asyncio.sleep(0)
        self.now = max(self.now, target)


def test_poisson_offsets_have_exponential_gaps_at_the_rate() -> None:
    rate, n = 500.0, 20_000
    offs = poisson_offsets(rate, n, random.Random(3))
    gaps = [b - a for a, b in zip([0.0, *offs], offs)]
    assert all(g > 0 for g in gaps)
    mean = sum(gaps) / n
    assert mean == pytest.approx(1 / rate, rel=0.03)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / n)
    assert sd / mean == pytest.approx(1.0, rel=0.05)       # exponential: the coefficient of variation is 1
    # Memoryless: P(gap > mean) = e^-1 (a fixed-interval schedule would give 0 or 1).
    assert sum(g > 1 / rate for g in gaps) / n == pytest.approx(math.exp(-1), abs=0.02)
    assert poisson_offsets(rate, 50, random.Random(3)) == offs[:50]   # seeded
    with pytest.raises(ValueError):
        poisson_offsets(0, 10, random.Random(1))


async def test_flows_start_on_schedule_and_latency_is_their_service_time() -> None:
    clock = FakeClock()
    offsets = [0.010, 0.020, 0.020, 0.050]
    started: list[float] = []

    async def call(i: int) -> str:
        started.append(clock.now)
        await asyncio.sleep(0)
        return f"ok{i}"

    out = await open_loop(call, offsets, 10.0, clock=clock, sleep=clock.sleep)
    assert started == [100.010, 100.020, 100.020, 100.050]
    assert out.results == ["ok0", "ok1", "ok2", "ok3"]
    assert out.latencies == [0.0, 0.0, 0.0, 0.0]
    assert out.start_lag == [0.0, 0.0, 0.0, 0.0]


async def test_latency_counts_from_the_scheduled_start_when_the_system_stalls() -> None:
    """The first flow stalls the (single-threaded) system for 100 ms: the flows due meanwhile
    start late, and their latency includes the wait, as a login arriving then would see it."""
    clock = FakeClock()
    offsets = [0.0, 0.010, 0.020, 0.030, 0.200]

    async def call(i: int) -> int:
        await asyncio.sleep(0)
        if i == 0:
            clock.now += 0.100   # a blocking stall of the loop: nothing else runs meanwhile
        else:
            clock.now += 0.001   # 1 ms of service
        return i

    out = await open_loop(call, offsets, 10.0, clock=clock, sleep=clock.sleep)
    assert out.results == [0, 1, 2, 3, 4]
    lat = dict(zip(out.results, out.latencies))
    assert lat[0] == pytest.approx(0.100)
    # Flow 1 was due at +10 ms, started after the stall (+100 ms) and took 1 ms: 91 ms, not 1 ms.
    assert lat[1] == pytest.approx(0.091, abs=1e-9)
    assert lat[2] == pytest.approx(0.082, abs=1e-9)   # started at +101 ms (after flow 1's 1 ms)
    assert lat[3] == pytest.approx(0.073, abs=1e-9)
    assert lat[4] == pytest.approx(0.001)              # the system had caught up by then
    assert max(out.start_lag) == pytest.approx(0.090)  # the generator itself reports how late it started flows


async def test_bounded_in_flight_and_time() -> None:
    clock = FakeClock()
    gate = asyncio.Event()

    async def call(i: int) -> int:
        await gate.wait()
        return i

    async def release_later() -> None:
        for _ in range(50):
            await asyncio.sleep(0)
        gate.set()

    rel = asyncio.ensure_future(release_later())
    out = await open_loop(call, [0.001 * k for k in range(1, 6)], 10.0, max_in_flight=3, clock=clock,
                          sleep=clock.sleep)
    await rel
    assert out.max_in_flight == 3
    errors = [r for r in out.results if isinstance(r, Exception)]
    assert len(errors) == 2 and "already in flight" in str(errors[0])
    assert len(out.latencies) == 3


async def test_a_flow_that_never_answers_fails_within_the_timeout() -> None:
    from actionpool.benchmarks._harness import PhaseTimeout

    async def call(i: int) -> None:
        await asyncio.Event().wait()

    with pytest.raises(PhaseTimeout):
        await open_loop(call, [0.0, 0.001], 0.2)
