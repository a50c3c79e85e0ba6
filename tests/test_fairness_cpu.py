"""CPU fairness with real workers: spinners are demoted to SCHED_IDLE and restored; cpu_limit bills CPU.

The spinning actions measure their own CPU time (``time.process_time``), not
wall time, so a loaded CI box only makes them take longer, never flips a verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re

import pytest

from actionpool.runner import Action, ConfigError, Limits, RunnerConfig
from actionpool.runner._cpu import demote, process_cpu_ns, restore

from conftest import make_runner

CONFIG = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=30.0, flow_timeout_s=60.0))

# Spins until it has used CPU_MS of CPU or sees itself demoted; reports its class at start and end.
SPIN = '''
import os, time

def on_execute(event, api):
    api.state.set("pid", os.getpid())
    api.state.set("policy_start", os.sched_getscheduler(0))
    t0 = time.process_time()
    demoted_at = None
    while time.process_time() - t0 < event.cpu_ms / 1000:
        if demoted_at is None and os.sched_getscheduler(0) == os.SCHED_IDLE:
            demoted_at = (time.process_time() - t0) * 1000
            if event.stop_when_demoted:
                break
    api.state.set("demoted_at_ms", demoted_at)
    api.state.set("policy_end", os.sched_getscheduler(0))
'''

SHORT = '''
def on_execute(event, api):
    api.state.set("ok", True)
'''


def _autogroup(pid: int | str) -> tuple[str, int] | None:
    """``(group, nice)`` read off ``/proc/<pid>/autogroup``, or None where it is absent or says less.

    The file is ``/autogroup-<id> nice <n>`` on most kernels; some (CI among them) print
    less, or nothing for a task whose group is a cgroup's.
    """
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            m = re.match(r"\s*(\S+)\s+nice\s+(-?\d+)", f.read())
    except OSError:
        return None
    return (m.group(1), int(m.group(2))) if m else None


def _autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s autogroup if it is not ours (None without readable autogroups)."""
    theirs, ours = _autogroup(pid), _autogroup("self")
    if theirs is None or ours is None or theirs[0] == ours[0]:
        return None
    return theirs[1]


async def _flow(r, action: Action, **event) -> dict:
    res = await r.run_flow(trigger="post-login", actions=[action], event={"user": {}, **event}, tenant="t1")
    return res.to_dict()


async def test_spinning_execution_is_demoted_then_restored() -> None:
    spin = Action(slug="spin", source=SPIN)
    async with make_runner(CONFIG) as r:
        d = await _flow(r, spin, cpu_ms=5000, stop_when_demoted=True)
        assert d["outcome"] == "allow", d["denial"]
        st = d["state"]["spin"]
        assert st["policy_start"] == os.SCHED_OTHER
        assert st["policy_end"] == os.SCHED_IDLE
        # Budget 50 ms; demotion comes within a tick or two of it (5000 would mean never).
        assert st["demoted_at_ms"] is not None and st["demoted_at_ms"] < 1000
        # After the execution the worker is back to normal (read from outside), and reused.
        assert os.sched_getscheduler(st["pid"]) == os.SCHED_OTHER
        d2 = await _flow(r, spin, cpu_ms=1, stop_when_demoted=True)
        assert d2["state"]["spin"]["pid"] == st["pid"]
        assert d2["state"]["spin"]["policy_start"] == os.SCHED_OTHER
        assert r._engine.cpu.demotions == 1  # noqa: SLF001 - the governor's counters


async def test_class_seen_from_outside_while_spinning() -> None:
    spin = Action(slug="spin", source=SPIN)
    async with make_runner(CONFIG) as r:
        task = asyncio.ensure_future(_flow(r, spin, cpu_ms=3000, stop_when_demoted=False))
        seen: set[int] = set()
        groups: set[int | None] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not task.done() and loop.time() < deadline:
            for w in list(r._pool.workers):  # noqa: SLF001 - the busy worker's pid
                if w.state.value == "busy":
                    try:
                        seen.add(os.sched_getscheduler(w.pid))
                        groups.add(_autogroup_nice(w.pid))
                    except ProcessLookupError:
                        pass
            if os.SCHED_IDLE in seen and (None in groups or 19 in groups):
                break
            await asyncio.sleep(0.01)
        d = await asyncio.wait_for(task, 60)
        assert os.SCHED_IDLE in seen
        assert d["outcome"] == "allow" and d["state"]["spin"]["policy_end"] == os.SCHED_IDLE
        pid = d["state"]["spin"]["pid"]
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        # A worker in a session (autogroup) of its own: the group's nice is what makes the class count.
        if _autogroup_nice(pid) is not None:
            assert 19 in groups
            assert _autogroup_nice(pid) == 0


async def test_short_executions_are_never_demoted_nor_read_much() -> None:
    short = Action(slug="short", source=SHORT)
    async with make_runner(CONFIG) as r:
        for _ in range(200):
            assert (await _flow(r, short))["outcome"] == "allow"
        cpu = r._engine.cpu  # noqa: SLF001
        assert cpu.demotions == 0
        assert cpu.reads < 50  # most short executions end before the governor's first tick
        assert not cpu._running  # noqa: SLF001 - nothing left behind


async def test_demotion_can_be_turned_off() -> None:
    spin = Action(slug="spin", source=SPIN)
    async with make_runner(dataclasses.replace(CONFIG, cpu_budget_ms=0)) as r:
        assert r._engine.cpu is None  # noqa: SLF001
        d = await _flow(r, spin, cpu_ms=300, stop_when_demoted=True)
        assert d["state"]["spin"]["demoted_at_ms"] is None
        assert d["state"]["spin"]["policy_end"] == os.SCHED_OTHER


async def test_cpu_limit_denies_a_spinner_with_its_own_kind() -> None:
    spin = Action(slug="spin", source=SPIN, limits={"cpu_limit_ms": 200})
    async with make_runner(CONFIG) as r:
        d = await _flow(r, spin, cpu_ms=60_000, stop_when_demoted=False)
        assert d["outcome"] == "deny"
        assert d["denial"]["kind"] == "cpu_limit", d["denial"]
        assert "200 ms of CPU" in d["denial"]["reason"]
        assert d["actions"][0]["status"] == "failed"
        assert r._engine.cpu.cpu_limit_kills == 1  # noqa: SLF001
        # The runner goes on: the next flow gets a fresh worker.
        assert (await _flow(r, Action(slug="short", source=SHORT)))["outcome"] == "allow"


async def test_cpu_limit_counts_cpu_not_wall_time() -> None:
    """An action that waits (sleeps) longer than its CPU limit is not billed for the wait."""
    sleeper = Action(slug="sleeper", source="import time\ndef on_execute(event, api):\n    time.sleep(0.6)\n"
                                            "    api.state.set('ok', True)\n", limits={"cpu_limit_ms": 100})
    async with make_runner(CONFIG) as r:
        d = await _flow(r, sleeper)
        assert d["outcome"] == "allow", d["denial"]
        assert r._engine.cpu.demotions == 0  # noqa: SLF001


async def test_cpu_limit_below_the_demotion_budget_still_applies() -> None:
    spin = Action(slug="spin", source=SPIN, limits={"cpu_limit_ms": 20})
    async with make_runner(dataclasses.replace(CONFIG, cpu_budget_ms=500)) as r:
        d = await _flow(r, spin, cpu_ms=60_000, stop_when_demoted=False)
        assert d["denial"]["kind"] == "cpu_limit", d["denial"]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RunnerConfig(cpu_budget_ms=-1).validate()
    with pytest.raises(ConfigError):
        Limits().merged({"cpu_limit_ms": 0})
    assert Limits().merged({"cpu_limit_ms": 250}).cpu_limit_ms == 250
    assert Limits().cpu_limit_ms is None
    Limits().validate()


def test_demote_and_restore_a_real_process() -> None:
    """The primitives on a plain child process: its CPU clock reads, its class changes and comes back."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert process_cpu_ns(p.pid) > 0
        grouped = _autogroup_nice(p.pid) is not None   # its own session: its own autogroup, where there are any
        demote(p.pid)
        assert os.sched_getscheduler(p.pid) == os.SCHED_IDLE
        assert _autogroup_nice(p.pid) == (19 if grouped else None)
        restore(p.pid)
        assert os.sched_getscheduler(p.pid) == os.SCHED_OTHER
        assert _autogroup_nice(p.pid) == (0 if grouped else None)
    finally:
        p.kill()
        p.wait()
    with pytest.raises(OSError):
        process_cpu_ns(p.pid)
