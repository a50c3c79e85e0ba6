"""The pool's policy on a fake clock: sizes, caps, fair hand-over, LRU eviction, per-key cleanup.

No processes here: the rules are pure functions (``runner/_pool_policy.py``) and the pool runs on
fake workers started by a fake launcher, with a clock the test moves. Real workers are in
``tests/test_pool_fairness.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actionpool.runner import _pool_policy as policy
from actionpool.runner._errors import Overloaded
from actionpool.runner._pool import Pool
from actionpool.runner._worker import State

PROFILE = (128, 30, 64)


# -- pure rules -------------------------------------------------------------------------------------


def test_capacity_comes_from_the_memory_budget_within_the_fd_limit() -> None:
    assert policy.capacity(1024, 6.0, None) == 170
    assert policy.capacity(6144, 6.0, 1024) == (1024 - policy.FD_RESERVE) // policy.FDS_PER_WORKER
    assert policy.capacity(1, 6.0, None) == 1   # never zero
    assert policy.default_memory_budget_mb(24 << 30) == 6144
    assert policy.default_memory_budget_mb(512 << 20) == 256


def test_tenant_cap_keeps_a_quarter_back_and_at_least_one_slot() -> None:
    # A pool of 2..7 keeps one slot from any one tenant (a pool of 4 full of one tenant's slow
    # flows refused every other tenant `overloaded`); only a pool of one cannot.
    assert [policy.default_tenant_cap(n) for n in (0, 1, 2, 4, 7)] == [0, 1, 1, 3, 6]
    # Waiting holds no worker: a short queue is not split.
    assert [policy.default_queue_cap(n) for n in (1, 4, 7, 8, 1000)] == [1, 4, 7, 6, 750]
    assert policy.default_tenant_cap(8) == 6
    assert policy.default_tenant_cap(1000) == 750


def test_refuse_reason() -> None:
    assert policy.refuse_reason(0, 3, 0, 10) is None
    assert "10 flows already waiting" in (policy.refuse_reason(0, 3, 10, 10) or "")
    assert "this tenant" in (policy.refuse_reason(3, 3, 5, 10) or "")


def test_growth_counts_waiters_that_releases_will_serve() -> None:
    # 4 busy workers held 10 ms each, a start takes 50 ms: 20 releases before a start -> 19 served.
    assert policy.releases_before_start(4, 0.010, 0.050, 1.0) == 19
    # Slow holds (I/O): no release expected in time, every waiter is worth a start.
    assert policy.releases_before_start(4, 1.0, 0.050, 1.0) == 0
    # Crashing actions give no worker back.
    assert policy.releases_before_start(4, 0.010, 0.050, 0.0) == 0
    assert policy.starts_wanted(waiting=10, spawning=2, served_by_releases=5) == 3
    assert policy.starts_wanted(waiting=1, spawning=2, served_by_releases=0) == 0


def test_fair_pick_prefers_the_least_loaded_then_the_least_recently_served() -> None:
    busy = {"a": 3, "b": 0, "c": 0}
    assert policy.fair_pick(["a", "b", "c"], lambda t: True, busy.get) == "b"
    assert policy.fair_pick(["c", "b", "a"], lambda t: True, busy.get) == "c"
    assert policy.fair_pick(["a", "b", "c"], lambda t: t == "a", busy.get) == "a"
    assert policy.fair_pick([], lambda t: True, busy.get) is None


def test_retirement_and_sweep_period() -> None:
    assert policy.retire_due(10.0, 70.0, 60.0) and not policy.retire_due(10.1, 70.0, 60.0)
    assert policy.sweep_period(60.0) == 5.0 and policy.sweep_period(0.01) == 0.05


# -- the pool on fake workers and a fake clock ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """What the pool reads and calls on a WorkerHandle, without a process."""

    n = 0

    def __init__(self, clock: Clock) -> None:
        FakeWorker.n += 1
        self.pid = FakeWorker.n
        self.state = State.IDLE
        self.tenant: Any = None
        self.profile = PROFILE
        self.compiled: set[str] = set()
        self.executions = 0
        self.last_used = clock()
        self.on_dead: Any = None
        self.death_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    def kill(self, reason: str) -> None:
        if self.state is not State.DEAD:
            self.state = State.DEAD
            self.death_reason = reason
            if self.on_dead is not None:
                self.on_dead(self)

    async def shutdown(self, grace: float) -> None:
        self.kill("shut down")


def make_pool(clock: Clock, **kw: Any) -> tuple[Pool, list[FakeWorker]]:
    started: list[FakeWorker] = []

    async def launch(profile: Any) -> FakeWorker:
        await asyncio.sleep(0)
        w = FakeWorker(clock)
        started.append(w)
        return w

    opts: dict[str, Any] = dict(pool_size=0, max_workers=4, max_queue=100, max_executions=1000,
                                default_profile=PROFILE, spawn_concurrency=4, idle_timeout_s=60.0)
    opts.update(kw)
    return Pool(launch, clock=clock, **opts), started  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def state_entries(pool: Pool) -> int:
    return sum(pool.stats()["state"].values())


async def test_lru_eviction_retires_the_least_recently_used_idle_worker_of_any_key() -> None:
    clock = Clock()
    pool, _ = make_pool(clock, max_workers=3)
    by_owner = {}
    for owner in ("a", "b", "c"):
        clock.now += 1
        w = await pool.acquire(owner, "d", PROFILE, 1.0)
        pool.release(w, True)
        by_owner[owner] = w
    clock.now += 1
    again = await pool.acquire("a", "d", PROFILE, 1.0)   # a is now the most recently used
    assert again is by_owner["a"]
    pool.release(again, True)
    w = await pool.acquire("d", "d", PROFILE, 1.0)        # full: b (least recently used) makes room
    assert not by_owner["b"].alive and "evicted" in (by_owner["b"].death_reason or "")
    assert by_owner["a"].alive and by_owner["c"].alive
    assert pool.stats()["live"] == 3 and pool.stats()["peak_workers"] == 3
    pool.release(w, True)
    await pool.close(0)


async def test_per_key_state_is_deleted_when_a_key_empties() -> None:
    clock = Clock()
    pool, _ = make_pool(clock, max_workers=1000, idle_timeout_s=60.0)
    for i in range(200):
        w = await pool.acquire(f"owner{i}", "d", PROFILE, 1.0, tenant=f"t{i % 7}")
        pool.release(w, True)
    s = pool.stats()
    assert s["idle"] == 200 and s["state"]["idle_keys"] == 200
    assert s["state"]["waiting_keys"] == s["state"]["held_keys"] == s["state"]["busy_tenants"] == 0
    clock.now += 61
    assert pool.sweep() == 200
    assert pool.stats()["live"] == 0 and state_entries(pool) == 0 and pool.idle == {}
    # A waiter that gave up leaves nothing behind either.
    pool2, _ = make_pool(clock, max_workers=1)
    held = await pool2.acquire("x", "d", PROFILE, 1.0)
    with pytest.raises(Overloaded):
        await pool2.acquire("y", "d", PROFILE, 0.01)
    pool2.release(held, False)
    await settle()
    assert state_entries(pool2) == 0, pool2.stats()
    await pool.close(0)
    await pool2.close(0)


async def test_idle_retirement_keeps_the_young_and_the_warm_spares() -> None:
    clock = Clock()
    pool, _ = make_pool(clock, pool_size=2, max_workers=10, idle_timeout_s=60.0)
    await pool.start()
    old = await pool.acquire("old", "d", PROFILE, 1.0)     # takes a spare; it is replaced soon after
    await settle()
    pool.release(old, True)
    clock.now += 30
    young = await pool.acquire("young", "d", PROFILE, 1.0)
    await settle()
    pool.release(young, True)                              # a quiet moment: the spares are topped up
    await settle()
    clock.now += 31                                        # old: 61 s idle; young: 31 s
    pool.sweep()
    assert not old.alive and young.alive
    assert pool.stats()["warm_unassigned"] == 2            # spares are kept whatever their age
    await pool.close(0)


def test_starving_waiters_go_oldest_first() -> None:
    heads = [("young", 99.9), ("old", 90.0), ("older", 80.0), ("edge", 99.5)]
    assert policy.starving(heads, now=100.0, after_s=0.5) == ["older", "old", "edge"]
    assert policy.starving(heads, now=100.0, after_s=30.0) == []
    assert policy.starving([("a", 1.0), ("b", 1.0)], now=5.0, after_s=1.0) == ["a", "b"]   # ties keep their order


async def test_tenant_caps_on_busy_workers_and_on_queued_flows() -> None:
    clock = Clock()
    pool, _ = make_pool(clock, max_workers=10, max_busy_per_tenant=2, max_queue_per_tenant=1)
    a1 = await pool.acquire("a", "d", PROFILE, 5.0, tenant="A")
    a2 = await pool.acquire("a2", "d", PROFILE, 5.0, tenant="A")
    third = asyncio.ensure_future(pool.acquire("a3", "d", PROFILE, 5.0, tenant="A"))
    await settle()
    assert not third.done() and pool.stats()["starting"] == 0   # at its cap: nothing started for it
    with pytest.raises(Overloaded, match="this tenant"):
        await pool.acquire("a4", "d", PROFILE, 5.0, tenant="A")   # its queue cap
    b = await pool.acquire("b", "d", PROFILE, 5.0, tenant="B")    # another tenant is not held up
    pool.release(a1, True)                                        # A has room again: its waiter gets a worker
    await settle()
    assert third.done() and third.result().tenant == "a3"
    for w in (a2, b, third.result()):
        pool.release(w, True)
    await pool.close(0)


async def test_freed_capacity_goes_to_the_waiting_tenant_with_the_least_not_to_the_same_tenant() -> None:
    clock = Clock()
    pool, started = make_pool(clock, max_workers=2, max_busy_per_tenant=2)
    a1 = await pool.acquire("a", "d", PROFILE, 5.0, tenant="A")
    a2 = await pool.acquire("a", "d", PROFILE, 5.0, tenant="A")
    a_next = [asyncio.ensure_future(pool.acquire("a", "d", PROFILE, 5.0, tenant="A")) for _ in range(3)]
    await settle()
    b_wait = asyncio.ensure_future(pool.acquire("b", "d", PROFILE, 5.0, tenant="B"))
    await settle()
    assert not b_wait.done()
    pool.release(a1, True)        # A's own waiters queued first, but B holds nothing: B's turn
    await settle()
    assert not a1.alive and "another tenant" in (a1.death_reason or "")
    assert b_wait.done() and b_wait.result().tenant == "b"
    assert not any(f.done() for f in a_next)
    pool.release(a2, True)        # now A (1 busy... 0 after this release) vs nobody else waiting: A
    await settle()
    assert sum(f.done() for f in a_next) == 1
    assert pool.stats()["peak_workers"] <= 2
    for f in a_next:
        if f.done():
            pool.release(f.result(), True)
    pool.release(b_wait.result(), True)
    await settle()
    assert all(f.done() for f in a_next)
    for f in a_next:
        pool.release(f.result(), True)
    await pool.close(0)


async def test_start_slots_go_to_the_tenant_holding_the_least() -> None:
    clock = Clock()
    gate = asyncio.Event()

    async def launch(profile: Any) -> FakeWorker:
        await gate.wait()
        return FakeWorker(clock)

    pool = Pool(launch, pool_size=0, max_workers=100, max_queue=100, max_executions=1000,  # type: ignore[arg-type]
                default_profile=PROFILE, spawn_concurrency=1, clock=clock)
    done: list[str] = []

    async def flow(owner: str, tenant: str) -> Any:
        w = await pool.acquire(owner, "d", PROFILE, 5.0, tenant=tenant)
        done.append(owner)
        return w

    futs = [asyncio.ensure_future(flow(f"a{i}", "A")) for i in range(4)]
    await settle()
    futs += [asyncio.ensure_future(flow("b", "B")), asyncio.ensure_future(flow("c", "C"))]
    await settle()
    assert list(pool.ws.spawning) == [("a0", PROFILE)]   # one slot, taken before B and C arrived
    gate.set()
    await asyncio.wait_for(asyncio.gather(*futs), 5)
    # A holds a0 from then on: the next slots go to B and C (holding none) before A's other keys.
    assert done[:3] == ["a0", "b", "c"], done
    for f in futs:
        pool.release(f.result(), True)
    s = pool.stats()["state"]
    assert s["waiting_keys"] == s["held_keys"] == s["spawning_keys"] == s["spawning_tenants"] == 0
    await pool.close(0)


def _gated_pool(clock: Clock, **kw: Any) -> tuple[Pool, asyncio.Event]:
    """A pool whose starts finish only when the test opens the gate (one start slot by default)."""
    gate = asyncio.Event()

    async def launch(profile: Any) -> FakeWorker:
        await gate.wait()
        gate.clear()
        return FakeWorker(clock)

    opts: dict[str, Any] = dict(pool_size=0, max_workers=100, max_queue=100, max_executions=1000,
                                default_profile=PROFILE, spawn_concurrency=1)
    opts.update(kw)
    return Pool(launch, clock=clock, **opts), gate  # type: ignore[arg-type]


async def _open(gate: asyncio.Event) -> None:
    gate.set()
    await settle()


async def test_a_hot_key_does_not_take_every_start_slot_of_its_tenant() -> None:
    """Within one tenant, the key with the fewest workers gets the next start, not the one with most waiters."""
    clock = Clock()
    pool, gate = _gated_pool(clock, fair_wait_s=60.0)
    hot = [asyncio.ensure_future(pool.acquire("hot", "d", PROFILE, 30.0, tenant="A")) for _ in range(5)]
    await settle()
    cold = asyncio.ensure_future(pool.acquire("cold", "d", PROFILE, 30.0, tenant="A"))
    await settle()
    assert dict(pool.ws.spawning) == {("hot", PROFILE): 1}
    await _open(gate)      # hot's first worker: hot now has one, cold none, so cold's start is next
    assert sum(f.done() for f in hot) == 1 and dict(pool.ws.spawning) == {("cold", PROFILE): 1}
    await _open(gate)
    assert cold.done() and cold.result().tenant == "cold"
    pool.release(cold.result(), True)
    released: set[int] = set()
    for _ in range(20):    # the other hot flows: served by releases and further starts
        for i, f in enumerate(hot):
            if f.done() and i not in released:
                released.add(i)
                pool.release(f.result(), True)
        if len(released) == len(hot):
            break
        await _open(gate)
    assert len(released) == len(hot)
    await pool.close(0)


async def test_a_waiter_past_fair_wait_goes_first_whatever_its_tenants_share() -> None:
    """Fair order puts the busy tenant last; once its flow has waited fair_wait_s it gets the next slot."""
    clock = Clock()
    pool, gate = _gated_pool(clock, fair_wait_s=0.5)
    busy = await _acquire_started(pool, gate, "big0", "BIG")   # BIG holds a worker: last in fair order
    big = asyncio.ensure_future(pool.acquire("big1", "d", PROFILE, 30.0, tenant="BIG"))
    await settle()
    assert dict(pool.ws.spawning) == {("big1", PROFILE): 1}   # nobody else waits: BIG's flow starts
    small = [asyncio.ensure_future(pool.acquire(f"s{i}", "d", PROFILE, 30.0, tenant=f"S{i}")) for i in range(3)]
    big2 = asyncio.ensure_future(pool.acquire("big2", "d", PROFILE, 30.0, tenant="BIG"))
    await settle()
    await _open(gate)      # big1 served; the slot goes to S0 (holds nothing; big2 has waited 0 s)
    assert big.done() and dict(pool.ws.spawning) == {("s0", PROFILE): 1}
    clock.now += 1.0       # big2 has now waited past fair_wait_s; S1 and S2 arrived at the same time, but hold less
    await _open(gate)
    assert small[0].done() and dict(pool.ws.spawning) == {("s1", PROFILE): 1}, pool.ws.spawning
    # S1, S2 and big2 all waited 1 s: the oldest (S1 and S2 were queued before big2) go first, big2 next,
    # not after every later small tenant.
    later = asyncio.ensure_future(pool.acquire("s9", "d", PROFILE, 30.0, tenant="S9"))
    await settle()
    await _open(gate)
    assert dict(pool.ws.spawning) == {("s2", PROFILE): 1}
    await _open(gate)
    assert dict(pool.ws.spawning) == {("big2", PROFILE): 1}, "the starving flow of BIG precedes the young S9"
    await _open(gate)
    await _open(gate)
    assert big2.done() and later.done()
    for f in (big, big2, later, *small):
        pool.release(f.result(), True)
    pool.release(busy, True)
    await pool.close(0)


async def _acquire_started(pool: Pool, gate: asyncio.Event, owner: str, tenant: str) -> Any:
    fut = asyncio.ensure_future(pool.acquire(owner, "d", PROFILE, 30.0, tenant=tenant))
    await settle()
    await _open(gate)
    return fut.result()


async def test_a_small_pool_full_of_one_tenant_still_starts_a_worker_for_another() -> None:
    """pool_size=1, max_workers=4, A keeps 8 flows in flight: B, holding nothing, gets a worker at once.

    The root cause of B's ``overloaded`` was the default cap: all of a pool under 8, so A's slow flows
    held every slot and B waited for one of them to finish. Now one slot is always kept from any one
    tenant, and B's start evicts A's idle spare if that is what fills the pool.
    """
    clock = Clock()
    pool, _ = make_pool(clock, pool_size=1, max_workers=4)
    await pool.start()
    assert pool.max_busy_per_tenant == 3
    a = [asyncio.ensure_future(pool.acquire("a", "d", PROFILE, 30.0, tenant="A")) for _ in range(8)]
    await settle()
    assert sum(f.done() for f in a) == 3 and pool.stats()["waiting"] == 5   # A at its cap, the rest queued
    b = asyncio.ensure_future(pool.acquire("b", "d", PROFILE, 30.0, tenant="B"))
    await settle()
    assert b.done() and b.result().tenant == "b"        # a start's time on the fake launcher: no release needed
    assert pool.stats()["live"] <= 4
    assert sum(f.done() for f in a) == 3                # B's worker was not taken out of A's share either
    pool.release(b.result(), True)
    released: set[Any] = set()
    for _ in range(4):                                  # A's flows are all served as its workers come back
        for f in a:
            if f.done() and f not in released:
                released.add(f)
                pool.release(f.result(), True)
        await settle()
    assert all(f.done() for f in a) and len(released) == 8
    await pool.close(0)
