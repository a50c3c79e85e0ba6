"""FIFO admission of executions to the CPU (runner/_admission.py, ``RunnerConfig.max_running``).

The gate's rules on the event loop alone (order, limit, hand-over, cancellation, expiry); then real
flows through a runner with a limit of one, which must all be answered.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from actionpool.runner import Action, ConfigError, RunnerConfig
from actionpool.runner._admission import Admission
from conftest import make_runner, wait_for_condition


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_at_most_limit_tokens_and_waiters_go_first_come_first_served() -> None:
    gate = Admission(2, hold_s=60.0)
    a, b = await gate.enter(), await gate.enter()
    order: list[int] = []

    async def wait(i: int) -> None:
        tok = await gate.enter()
        order.append(i)
        tok.leave()

    waiters = [asyncio.ensure_future(wait(i)) for i in range(4)]
    await settle()
    assert gate.active == 2 and gate.waiting == 4 and order == []
    a.leave()
    a.leave()                           # idempotent: one slot, handed on once
    await settle()
    assert order == [0, 1, 2, 3]        # each waiter left at once, handing the slot to the next
    assert gate.active == 1 and gate.waiting == 0
    b.leave()
    assert gate.active == 0
    await asyncio.gather(*waiters)
    assert gate.stats() == {"admission_active": 0, "admission_waiting": 0, "admission_queued": 4,
                            "admission_expired": 0}


async def test_a_cancelled_waiter_gives_up_its_place_or_passes_its_slot_on() -> None:
    gate = Admission(1, hold_s=60.0)
    first = await gate.enter()
    gone = asyncio.ensure_future(gate.enter())
    nxt = asyncio.ensure_future(gate.enter())
    await settle()
    gone.cancel()                       # still waiting: it just leaves the queue
    await settle()
    assert gate.waiting == 1
    first.leave()
    tok = await asyncio.wait_for(nxt, 5)
    # Handed a slot and cancelled before it ran: the slot goes on, it is not lost.
    late = asyncio.ensure_future(gate.enter())
    await settle()
    tok.leave()                         # sets late's future ...
    late.cancel()                       # ... which is cancelled before it resumes
    await settle()
    assert gate.active == 0 and gate.waiting == 0
    assert (await gate.enter()) is not None and gate.active == 1


async def test_a_token_expires_by_itself_so_a_long_execution_never_blocks_admission() -> None:
    gate = Admission(1, hold_s=0.02)
    await gate.enter()                  # never left: an execution awaiting the network
    tok = await asyncio.wait_for(gate.enter(), 5)   # admitted once the first token expired
    tok.leave()
    await wait_for_condition(lambda: gate.active == 0, timeout=5)
    assert gate.expired == 1


async def test_flows_under_a_limit_of_one_are_all_answered_right() -> None:
    src = "def on_execute(event, api):\n    api.state.set('n', event.n)\n"
    cfg = RunnerConfig(pool_size=2, max_workers=8, max_running=1)
    async with make_runner(cfg) as r:
        acts = [Action(slug=f"a{i}", source=src) for i in range(4)]
        res = await asyncio.wait_for(asyncio.gather(*(
            r.run_flow(trigger="post-login", actions=[acts[n % 4]], event={"n": n}, tenant=f"t{n % 3}")
            for n in range(40))), 60)
        assert [x.outcome for x in res] == ["allow"] * 40
        assert [x.state[f"a{n % 4}"]["n"] for n, x in enumerate(res)] == list(range(40))
        s = r.stats()
        assert s["admission_active"] == 0 and s["admission_waiting"] == 0 and s["admission_queued"] > 0


async def test_an_execution_awaiting_a_fetch_gives_its_admission_back() -> None:
    """One token, held 30 s at most: only the fetch request can free it for the next flow (no timing involved)."""
    from actionpool.runner import FetchConfig, Limits
    from test_stress import SLOW, Gate

    cfg = RunnerConfig(pool_size=2, max_workers=8, max_running=1, running_hold_ms=1000,
                       limits=Limits(action_timeout_s=30.0, flow_timeout_s=40.0),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=30.0))
    quick = Action(slug="quick", source="def on_execute(event, api):\n    api.state.set('ok', 1)\n")
    async with Gate() as gate, make_runner(cfg) as r:
        slow = [asyncio.ensure_future(r.run_flow(trigger="post-login", actions=[SLOW], event={"url": gate.url, "n": n},
                                                 tenant="a")) for n in range(3)]
        await wait_for_condition(lambda: gate.arrived == 3)    # all three admitted in turn, each now awaiting
        s = r.stats()
        assert s["admission_active"] == 0 and s["admission_expired"] == 0   # freed by their fetch, not by time
        res = await asyncio.wait_for(r.run_flow(trigger="post-login", actions=[quick], event={}, tenant="b"), 30)
        assert res.outcome == "allow" and gate.answered == 0
        gate.opened.set()
        done = await asyncio.wait_for(asyncio.gather(*slow), 60)
    assert [d.outcome for d in done] == ["allow"] * 3


def test_admission_settings_are_validated() -> None:
    for kw in ({"max_running": -1}, {"max_running": True}, {"running_hold_ms": 0}, {"running_hold_ms": 5000}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            RunnerConfig(**kw).validate()  # type: ignore[arg-type]
    assert RunnerConfig().running_limit() == 8 * (len(os.sched_getaffinity(0)) or 2)   # on: 8 per usable CPU
    assert RunnerConfig(max_running=0).running_limit() == 0                           # 0: off
