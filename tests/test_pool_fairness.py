"""The pool with real workers: per-key state goes when a key empties; one tenant cannot starve another.

The policy itself is tested on a fake clock in ``tests/test_pool_policy.py``; these run real
subprocesses and check what a user sees. No speed is asserted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import make_runner, wait_for_condition
from test_stress import SLOW, Gate
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig


def action(i: int) -> Action:
    return Action(slug=f"a{i}", source=f"def on_execute(event, api):\n    api.state.set('i', {i})\n")


async def test_emptied_keys_leave_no_state_behind() -> None:
    """40 distinct actions of 8 tenants run once; once their workers retire, the pool keeps nothing of them."""
    cfg = RunnerConfig(pool_size=1, idle_timeout_s=0.3)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(r.run_flow(trigger="post-login", actions=[action(i)], event={},
                                                    tenant=f"t{i % 8}") for i in range(40)))
        assert all(res.outcome == "allow" for res in results), [res.denial for res in results]
        grown = r.stats()
        assert grown["state"]["idle_keys"] > 1
        # The timer retires them; no flow needs to come along.
        await wait_for_condition(lambda: r.stats()["live"] <= cfg.pool_size and r.stats()["starting"] == 0)
        # Each retired worker's cgroup is removed and forgotten (where this host gives cgroups).
        await wait_for_condition(lambda: r.stats().get("cgroups", 0) <= r.stats()["live"])
        s = r.stats()
    assert s["state"] == {"idle_keys": 1 if s["warm_unassigned"] else 0, "spawning_keys": 0, "waiting_keys": 0,
                          "waiting_tenants": 0, "held_keys": 0, "busy_tenants": 0, "spawning_tenants": 0,
                          "warming_keys": 0}, s


async def test_a_tenant_flooding_slow_flows_does_not_starve_another() -> None:
    """Tenant A keeps 40 slow flows in flight on an 8-worker pool; tenant B's flows all succeed meanwhile."""
    # co_run=1: A's slow flows each hold a worker (co-running them would need fewer: tests/test_corun.py).
    # max_running=0: all 40 reach the pool in one pass, so its caps give exact counts (the FIFO would let them
    # in 16 at a time, and the queue drains into new workers meanwhile: tests/test_admission.py).
    cfg = RunnerConfig(pool_size=0, max_workers=8, max_queue=40, queue_timeout_s=60.0, max_running=0,
                       limits=Limits(action_timeout_s=60.0, flow_timeout_s=60.0, co_run=1),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=60.0))
    quick = Action(slug="quick", source="def on_execute(event, api):\n    api.state.set('ok', event.n)\n")
    async with Gate() as gate, make_runner(cfg) as r:
        a_tasks = [asyncio.ensure_future(r.run_flow(trigger="post-login", actions=[SLOW],
                                                    event={"url": gate.url, "n": n}, tenant="A"))
                   for n in range(40)]
        # A may queue 30 (three quarters of max_queue; the other 10 are refused) and hold 6 of the 8
        # workers (a quarter is kept back for other tenants): 6 reach the gate, 24 wait.
        await wait_for_condition(lambda: gate.arrived == 6 and r.stats()["waiting"] == 24)
        assert r.stats()["max_busy_per_tenant"] == 6
        b: list[Any] = []
        for n in range(10):
            b.append(await asyncio.wait_for(r.run_flow(trigger="post-login", actions=[quick], event={"n": n},
                                                       tenant="B"), 30))
        assert gate.answered == 0   # every one of B's flows finished while A's were all still stuck
        gate.opened.set()
        a = await asyncio.wait_for(asyncio.gather(*a_tasks), 60)
    assert [res.outcome for res in b] == ["allow"] * 10, [res.denial for res in b]
    assert [res.state["quick"]["ok"] for res in b] == list(range(10))
    refused = [res for res in a if res.denial and res.denial["kind"] == "overloaded"]
    assert len(refused) == 10 and all("this tenant" in res.denial["reason"] for res in refused)
    assert sum(res.outcome == "allow" for res in a) == 30
