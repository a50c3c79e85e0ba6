"""Limits enforced by killing the worker: timeouts, crashes, floods. Every flow still gets one answer."""

from __future__ import annotations

import asyncio

import psutil

from conftest import make_runner, run
from actionpool.runner import Action, Limits, RunnerConfig

OK = "def on_execute(event, api):\n    api.state.set('ok', True)\n"


async def test_action_timeout_kills_worker_and_denies() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=0.3))
    async with make_runner(cfg) as r:
        res = await run(r, "def on_execute(event, api):\n    while True:\n        pass\n")
        after = await run(r, OK)
    assert res["denial"]["kind"] == "timeout"
    assert res["actions"][0]["status"] == "failed"
    assert after["outcome"] == "allow"


async def test_flow_timeout_across_actions() -> None:
    slow = "import time\ndef on_execute(event, api):\n    time.sleep(0.25)\n"
    cfg = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=5, flow_timeout_s=0.6))
    async with make_runner(cfg) as r:
        res = await run(r, [slow, slow, slow, slow])
    assert res["denial"]["kind"] == "flow_timeout"
    statuses = [a["status"] for a in res["actions"]]
    assert statuses[:2] == ["ok", "ok"] and "skipped" in statuses


async def test_per_action_limit_override() -> None:
    loop = Action(slug="spin", source="def on_execute(event, api):\n    while True: pass\n",
                  limits={"action_timeout_s": 0.2})
    async with make_runner() as r:
        res = (await r.run_flow(trigger="post-login", actions=[loop], event={}, tenant="t")).to_dict()
    assert res["denial"]["kind"] == "timeout" and "0.2s" in res["denial"]["reason"]


async def test_sys_exit_and_os_exit_are_worker_crashes() -> None:
    async with make_runner() as r:
        sys_exit = await run(r, "import sys\ndef on_execute(event, api):\n    sys.exit(0)\n")
        os_exit = await run(r, "import os\ndef on_execute(event, api):\n    os._exit(7)\n")
        after = await run(r, OK)
    assert sys_exit["denial"]["kind"] == "worker_crash" and "exit code 0" in sys_exit["denial"]["reason"]
    assert os_exit["denial"]["kind"] == "worker_crash" and "exit code 7" in os_exit["denial"]["reason"]
    assert after["outcome"] == "allow"


async def test_signal_death_is_named() -> None:
    src = "import os, signal\ndef on_execute(event, api):\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    async with make_runner() as r:
        res = await run(r, src)
    assert res["denial"]["kind"] == "worker_crash"
    assert "SIGSEGV(-11)" in res["denial"]["reason"]


async def test_external_sigkill_mid_execution() -> None:
    src = "import time\ndef on_execute(event, api):\n    time.sleep(30)\n"
    async with make_runner() as r:
        task = asyncio.ensure_future(run(r, src))
        deadline = asyncio.get_running_loop().time() + 10
        while r.stats()["busy"] == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        busy = [w for w in r._pool.workers if w.state.value == "busy"]  # noqa: SLF001
        psutil.Process(busy[0].pid).kill()
        res = await task
        after = await run(r, OK)
    assert res["denial"]["kind"] == "worker_crash" and "SIGKILL(-9)" in res["denial"]["reason"]
    assert after["outcome"] == "allow"


async def test_log_flood_is_bounded() -> None:
    src = "def on_execute(event, api):\n    while True:\n        api.log('info', 'x' * 100)\n"
    async with make_runner() as r:
        res = await run(r, src)
        after = await run(r, OK)
    assert res["denial"]["kind"] == "output_limit"
    assert len(res["logs"]) <= Limits().max_log_entries
    assert after["outcome"] == "allow"


async def test_oversized_single_value_is_an_error_inside_the_action() -> None:
    src = '''
def on_execute(event, api):
    try:
        api.state.set("big", "x" * (2 << 20))
    except Exception as exc:
        api.state.set("error", type(exc).__name__)
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert res["outcome"] == "allow" and res["state"]["a"]["error"] == "ValueError"   # too large to send: a ValueError


async def test_concurrent_flows_each_get_their_own_answer() -> None:
    src = "def on_execute(event, api):\n    api.state.set('n', event.n)\n"
    async with make_runner(RunnerConfig(pool_size=2, max_workers=4)) as r:
        results = await asyncio.gather(*(run(r, src, event={"n": i}, tenant=f"t{i % 3}") for i in range(60)))
    assert [res["state"]["a"]["n"] for res in results] == list(range(60))


async def test_overloaded_when_queue_is_full() -> None:
    slow = "import time\ndef on_execute(event, api):\n    time.sleep(0.5)\n"
    cfg = RunnerConfig(pool_size=1, max_workers=1, max_queue=1, queue_timeout_s=5)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(*(run(r, slow) for _ in range(4)))
    kinds = sorted((res["denial"] or {}).get("kind", "allow") for res in results)
    assert kinds == ["allow", "allow", "overloaded", "overloaded"]


async def test_queue_timeout_is_overloaded() -> None:
    slow = "import time\ndef on_execute(event, api):\n    time.sleep(1.0)\n"
    cfg = RunnerConfig(pool_size=1, max_workers=1, max_queue=10, queue_timeout_s=0.1)
    async with make_runner(cfg) as r:
        results = await asyncio.gather(run(r, slow), run(r, slow))
    kinds = sorted((res["denial"] or {}).get("kind", "allow") for res in results)
    assert kinds == ["allow", "overloaded"]


async def test_tenants_never_share_a_worker() -> None:
    src = "import os\nPID = os.getpid()\ndef on_execute(event, api):\n    api.state.set('pid', PID)\n"
    async with make_runner(RunnerConfig(pool_size=1, max_workers=2)) as r:
        pids = {}
        for i in range(6):
            t = f"tenant{i % 3}"
            res = await run(r, src, tenant=t)
            pids.setdefault(t, set()).add(res["state"]["a"]["pid"])
    all_sets = list(pids.values())
    for i, a in enumerate(all_sets):
        for b in all_sets[i + 1:]:
            assert not (a & b), pids


async def test_close_answers_in_flight_flows() -> None:
    slow = "import time\ndef on_execute(event, api):\n    time.sleep(30)\n"
    r = make_runner()
    await r.start()
    task = asyncio.ensure_future(run(r, slow))
    deadline = asyncio.get_running_loop().time() + 10
    while r.stats()["busy"] == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await r.close(grace=0.2)
    res = await asyncio.wait_for(task, 5)
    assert res["outcome"] == "deny" and res["denial"]["kind"] == "shutdown"
