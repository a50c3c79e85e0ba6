"""Workers' scheduling groups run below the supervisor's (``RunnerConfig.worker_nice``).

Each worker is a session of its own, so with autogroups it is a scheduling group that the kernel
weighs as an equal of the supervisor's; at ``worker_nice`` the supervisor, whom every flow waits on,
preempts them. Read from outside, off ``/proc/<pid>/autogroup``; skipped where the kernel has none.
"""

from __future__ import annotations

import os

import pytest

from actionpool.runner import Action, ConfigError, RunnerConfig
from conftest import make_runner, wait_for_condition

SRC = "def on_execute(event, api):\n    api.state.set('ok', True)\n"


def _group(pid: int | str) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            parts = f.read().split()
    except OSError:
        return None
    return (parts[0], int(parts[2])) if len(parts) >= 3 and parts[1] == "nice" else None


@pytest.mark.parametrize("nice", [10, 0])
async def test_new_workers_groups_run_at_worker_nice(nice: int) -> None:
    if _group("self") is None:
        pytest.skip("no readable autogroups on this kernel")
    async with make_runner(RunnerConfig(pool_size=2, max_workers=4, worker_nice=nice)) as r:
        res = await r.run_flow(trigger="post-login", actions=[Action(slug="a", source=SRC)], event={}, tenant="t")
        assert res.outcome == "allow"
        # The spare the flow took is replaced: read every worker once none is starting.
        await wait_for_condition(lambda: r.stats()["starting"] == 0 and r.stats()["warm_unassigned"] == 2)
        ours = _group("self")
        groups = [_group(p) for p in r.worker_pids]
        assert len(groups) >= 2 and all(g is not None for g in groups)
        assert ours is not None and all(g[0] != ours[0] for g in groups if g)   # each worker: a group of its own
        # Relative to the supervisor's own (which a test run under `nice` has raised).
        assert {g[1] for g in groups if g} == {min(18, ours[1] + nice)}
        assert {os.getpriority(os.PRIO_PROCESS, p) for p in r.worker_pids} == {min(18, os.nice(0) + nice)}
        assert _group("self") == ours   # the supervisor's own group is left alone


def test_worker_nice_is_validated() -> None:
    for bad in (-1, 19, True, 2.5):
        with pytest.raises(ConfigError, match="worker_nice"):
            RunnerConfig(worker_nice=bad).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [True, False])
async def test_workers_run_sched_batch_when_asked_and_go_back_to_it_after_a_demotion(batch: bool) -> None:
    """``worker_batch``: a woken worker does not preempt the supervisor; a demoted spinner comes back to batch."""
    spin = "import time\ndef on_execute(event, api):\n    t = time.monotonic()\n    while time.monotonic() - t < 0.3:\n        pass\n"
    cfg = RunnerConfig(pool_size=1, max_workers=1, worker_batch=batch, cpu_budget_ms=20.0)
    async with make_runner(cfg) as r:
        res = await r.run_flow(trigger="post-login", actions=[Action(slug="s", source=spin)], event={}, tenant="t")
        assert res.outcome == "allow"
        assert r.stats()["cpu_demotions"] >= 1      # it ran SCHED_IDLE for a while, then was restored
        [pid] = r.worker_pids
        want = os.SCHED_BATCH if batch else os.SCHED_OTHER
        assert {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")} == {want}


def test_worker_batch_is_validated() -> None:
    with pytest.raises(ConfigError, match="worker_batch"):
        RunnerConfig(worker_batch=1).validate()  # type: ignore[arg-type]
