"""A small pool and one slow tenant, with real workers: another tenant is still served within a start.

``pool_size=1, max_workers=4``: tenant A keeps 8 slow flows in flight (each waits on a local HTTP
server that answers only when the test opens it). A may hold 3 of the 4 workers (one slot is always
kept from any one tenant; ``tests/test_pool_policy.py`` has the rule on a fake clock), so B's flows
get a worker by a start, not by waiting for A's flows, and are never refused ``overloaded``. No speed
is asserted: B's flows all finish while every one of A's is still held at the gate.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import make_runner, wait_for_condition
from test_stress import SLOW, Gate
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig


async def test_one_slow_tenant_cannot_hold_every_worker_of_a_small_pool() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=4, queue_timeout_s=20.0,
                       limits=Limits(action_timeout_s=60.0, flow_timeout_s=60.0),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=60.0))
    quick = Action(slug="quick", source="def on_execute(event, api):\n    api.state.set('ok', event.n)\n")
    async with Gate() as gate, make_runner(cfg) as r:
        assert r.stats()["max_busy_per_tenant"] == 3
        a_tasks = [asyncio.ensure_future(r.run_flow(trigger="post-login", actions=[SLOW],
                                                    event={"url": gate.url, "n": n}, tenant="A"))
                   for n in range(8)]
        await wait_for_condition(lambda: gate.arrived == 3 and r.stats()["waiting"] == 5)
        b: list[Any] = []
        for n in range(4):
            b.append(await asyncio.wait_for(r.run_flow(trigger="post-login", actions=[quick], event={"n": n},
                                                       tenant="B"), 30))
        assert gate.answered == 0 and gate.arrived == 3   # all of B's flows finished while A's were stuck
        assert r.stats()["peak_workers"] <= 4
        gate.opened.set()
        a = await asyncio.wait_for(asyncio.gather(*a_tasks), 60)
    assert [res.outcome for res in b] == ["allow"] * 4, [res.denial for res in b]
    assert [res.state["quick"]["ok"] for res in b] == list(range(4))
    assert [res.outcome for res in a] == ["allow"] * 8, [res.denial for res in a]   # A loses nothing, it waits
