"""The fork template and the elastic pool, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

from conftest import make_runner, run
from actionpool.runner import Action, Limits, RunnerConfig

PIDS = '''
import os, resource
def on_execute(event, api):
    api.state.set("pid", os.getpid())
    api.state.set("ppid", os.getppid())
    api.state.set("as", resource.getrlimit(resource.RLIMIT_AS)[0])
    api.state.set("env", sorted(os.environ))
'''
SLOW = "import time\ndef on_execute(event, api):\n    time.sleep(event.s or 0.3)\n"


async def test_workers_are_supervisor_children_forked_from_the_template() -> None:
    async with make_runner() as r:
        res = await run(r, PIDS)
        stats = r.stats()
        template = psutil.Process(stats["template_pid"])
        state = res["state"]["a"]
        assert state["ppid"] == os.getpid()  # CLONE_PARENT: waited for and killed like a spawned worker
        assert state["pid"] != stats["template_pid"]
        assert template.ppid() == os.getpid()
        assert stats["template_forks"] >= 1
        # Nothing of the supervisor's environment reaches the worker: the template was spawned scrubbed.
        assert set(state["env"]) <= {"PATH", "LANG", "LC_ALL"}


async def test_template_respawned_after_kill_and_no_flow_lost() -> None:
    async with make_runner(RunnerConfig(pool_size=0, max_workers=4)) as r:
        first = r.stats()["template_pid"]
        os.kill(first, signal.SIGKILL)
        psutil.Process(first).wait(5) if psutil.pid_exists(first) else None
        results = await asyncio.gather(*(run(r, PIDS, tenant=f"t{i}") for i in range(3)))
        stats = r.stats()
    assert all(res["outcome"] == "allow" for res in results), [res["denial"] for res in results]
    assert stats["template_pid"] != first
    assert stats["template_respawns"] >= 1


async def test_workers_forked_after_a_limit_change_get_the_new_limits() -> None:
    async with make_runner(RunnerConfig(pool_size=1, max_workers=4, limits=Limits(memory_mb=64))) as r:
        small = await run(r, PIDS)
        big = await run(r, [Action(slug="a", source=PIDS, limits={"memory_mb": 256})])
    assert big["state"]["a"]["as"] > small["state"]["a"]["as"]
    assert big["state"]["a"]["pid"] != small["state"]["a"]["pid"]


async def test_spawn_without_template_still_works() -> None:
    async with make_runner(RunnerConfig(pool_size=1, max_workers=2, fork_template=False)) as r:
        res = await run(r, PIDS)
        assert "template_pid" not in r.stats()
    assert res["outcome"] == "allow" and res["state"]["a"]["ppid"] == os.getpid()


async def test_pool_grows_for_slow_flows_up_to_max_workers() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=6, max_queue=100, queue_timeout_s=20)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(run(r, SLOW, event={"s": 0.3}) for _ in range(12)))
        stats = r.stats()
    assert all(res["outcome"] == "allow" for res in results)
    assert 2 <= stats["peak_workers"] <= 6


async def test_pool_shrinks_idle_workers_after_idle_timeout() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=6, idle_timeout_s=0.2)
    async with make_runner(cfg) as r:
        await asyncio.gather(*(run(r, SLOW, event={"s": 0.3}, tenant=f"t{i}") for i in range(4)))
        grown = r.stats()["live"]
        deadline = asyncio.get_running_loop().time() + 10
        # The sweep runs on acquire; keep serving one tenant until the others' idle workers retire.
        while r.stats()["live"] >= grown:
            assert asyncio.get_running_loop().time() < deadline, r.stats()
            await run(r, "def on_execute(event, api): pass", tenant="t0")
            await asyncio.sleep(0.05)
    assert grown >= 4


async def test_global_max_respected_and_tenants_kept_apart() -> None:
    cfg = RunnerConfig(pool_size=0, max_workers=3, max_queue=100, queue_timeout_s=20)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(run(r, PIDS.replace("def on_execute(event, api):",
                                                             "import time\ndef on_execute(event, api):\n    time.sleep(0.1)"),
                                             tenant=f"t{i % 4}") for i in range(16)))
        stats = r.stats()
    assert stats["peak_workers"] <= 3
    by_tenant: dict[str, set[int]] = {}
    for res in results:
        assert res["outcome"] == "allow", res["denial"]
        by_tenant.setdefault(res["tenant"], set()).add(res["state"]["a"]["pid"])
    tenants = list(by_tenant)
    for i, a in enumerate(tenants):
        for b in tenants[i + 1:]:
            assert not (by_tenant[a] & by_tenant[b])


async def test_min_idle_per_tenant_keeps_warm_workers_bound_to_the_tenant() -> None:
    cfg = RunnerConfig(pool_size=0, max_workers=6, min_idle_per_tenant=2, worker_binding="tenant")
    async with make_runner(cfg) as r:
        await run(r, "def on_execute(event, api): pass", tenant="acme")
        await run(r, "def on_execute(event, api): pass", tenant="acme")  # binds via idle, triggers warm-up
        deadline = asyncio.get_running_loop().time() + 10
        pool = r._pool  # noqa: SLF001 - the test inspects the idle lists
        while len(pool.idle.get(("acme", pool.default_profile), ())) < 2:
            assert asyncio.get_running_loop().time() < deadline, r.stats()
            await asyncio.sleep(0.02)
        assert all(w.tenant == "acme" for w in pool.idle[("acme", pool.default_profile)])
        assert r.stats()["live"] <= 6


async def test_worker_binding_keeps_actions_of_one_tenant_apart() -> None:
    pid = "import os\ndef on_execute(event, api):\n    api.state.set('pid', os.getpid())\n"
    a = Action(slug="a", source=pid)
    b = Action(slug="b", source=pid + "# another action\n")
    for binding, shared in (("action", False), ("tenant", True)):
        async with make_runner(RunnerConfig(pool_size=0, max_workers=4, worker_binding=binding)) as r:
            first = (await r.run_flow(trigger="post-login", actions=[a], event={}, tenant="t")).state["a"]["pid"]
            second = (await r.run_flow(trigger="post-login", actions=[b], event={}, tenant="t")).state["b"]["pid"]
        assert (first == second) is shared, binding
