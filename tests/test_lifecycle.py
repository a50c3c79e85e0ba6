"""The runner's life cycle: one start however many callers race for it, one close that answers every flow.

Real workers and a real fork template; processes are counted with psutil,
not inferred from the runner's own bookkeeping.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psutil
import pytest

from actionpool import Action, DenialKind, RunnerClosed, RunnerConfig
from actionpool.runner import _launch

from conftest import children, make_runner, run, wait_gone

SPIN = "def on_execute(event, api):\n    api.log('info', 'spinning')\n    while True:\n        pass\n"
OK = "def on_execute(event, api):\n    api.state.set('ok', True)\n"


@pytest.fixture
def launcher_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a Launcher (and so a fork template) was started."""
    starts: list[int] = []
    real = _launch.Launcher.start

    async def counting(self: Any) -> None:
        starts.append(1)
        await real(self)

    monkeypatch.setattr(_launch.Launcher, "start", counting)
    return starts


async def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_concurrent_first_flows_start_the_runner_once(launcher_starts: list[int]) -> None:
    before = children()
    r = make_runner(RunnerConfig(pool_size=1, max_workers=8, worker_binding="tenant"))
    results = await asyncio.gather(*(run(r, OK, tenant="t") for _ in range(3)))
    assert [res["outcome"] for res in results] == ["allow"] * 3
    assert launcher_starts == [1]
    await wait_until(lambda: r.stats()["starting"] == 0)  # workers the waiting flows asked for are up
    stats = r.stats()
    mine = {pid for pid in children() - before if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
    # Exactly one template; every other child process is one of the pool's workers.
    assert stats["template_pid"] in mine
    assert mine == set(r.worker_pids) | {stats["template_pid"]}, (mine, r.worker_pids, stats["template_pid"])
    await r.close()
    assert wait_gone(mine) == set()


async def test_concurrent_start_calls_share_one_start(launcher_starts: list[int]) -> None:
    r = make_runner()
    await asyncio.gather(r.start(), r.start(), r.start())
    await r.start()  # started: returns at once
    assert launcher_starts == [1]
    await r.close()


async def test_a_cancelled_first_caller_does_not_abandon_the_start(launcher_starts: list[int]) -> None:
    before = children()
    r = make_runner()
    first = asyncio.ensure_future(r.start())
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    res = await run(r, OK)  # the shielded start went on; this caller joins it
    assert res["outcome"] == "allow" and launcher_starts == [1]
    await r.close()
    assert wait_gone(children() - before) == set()


async def test_a_failed_start_fails_every_caller_and_leaves_nothing(tmp_path: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    before = children()
    r = make_runner(RunnerConfig(pool_size=1, fork_template=False, python=str(tmp_path / "no-such-python")))
    outcomes = await asyncio.gather(*(run(r, OK) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert len({type(o) for o in outcomes}) == 1
    assert "did not answer" not in caplog.text  # the failed start does not wait for the flows waiting on it
    await r.close()
    assert wait_gone(children() - before) == set()


async def test_close_denies_a_running_flow_as_shutdown() -> None:
    before = children()
    r = make_runner()
    await r.start()
    task = asyncio.ensure_future(run(r, SPIN))
    await wait_until(lambda: r.stats()["busy"] == 1)
    await r.close(grace=0.1)
    res = await asyncio.wait_for(task, 5)
    assert res["outcome"] == "deny"
    assert res["denial"]["kind"] == DenialKind.SHUTDOWN == "shutdown"
    assert res["denial"]["reason"] == "the runner closed while the action ran; worker stopped"
    assert "SIGKILL" not in res["denial"]["reason"]
    assert res["actions"][0]["status"] == "failed"
    assert wait_gone(children() - before) == set()


async def test_close_denies_a_waiting_flow_as_shutdown() -> None:
    r = make_runner(RunnerConfig(pool_size=1, max_workers=1, worker_binding="tenant", queue_timeout_s=30.0))
    await r.start()
    running = asyncio.ensure_future(run(r, SPIN, tenant="t"))
    await wait_until(lambda: r.stats()["busy"] == 1)
    waiting = asyncio.ensure_future(run(r, OK, tenant="t"))
    await wait_until(lambda: r.stats()["waiting"] == 1)
    await r.close(grace=0.1)
    first, second = await asyncio.wait_for(asyncio.gather(running, waiting), 5)
    assert first["denial"]["kind"] == "shutdown"
    assert second["denial"] == {"action": "a", "kind": "shutdown", "reason": "the runner closed before the action started",
                                "user_message": "Access denied.", "error_code": None}


async def test_close_lets_flows_finish_within_the_grace() -> None:
    r = make_runner()
    await r.start()
    sleepy = "import time\ndef on_execute(event, api):\n    time.sleep(0.3)\n    api.state.set('done', True)\n"
    task = asyncio.ensure_future(run(r, sleepy))
    await wait_until(lambda: r.stats()["busy"] == 1)
    await r.close(grace=10.0)
    res = await task
    assert res["outcome"] == "allow" and res["state"] == {"a": {"done": True}}


async def test_close_is_idempotent_and_concurrent_closes_all_wait() -> None:
    before = children()
    r = make_runner()
    await r.start()
    task = asyncio.ensure_future(run(r, SPIN))
    await wait_until(lambda: r.stats()["busy"] == 1)
    await asyncio.gather(r.close(grace=0.1), r.close(grace=0.1), r.close())
    assert task.done() and task.result()["denial"]["kind"] == "shutdown"
    await r.close()
    assert wait_gone(children() - before) == set()
    with pytest.raises(RunnerClosed):
        await r.run_flow(trigger="post-login", actions=[Action(slug="a", source=OK)], event={})
    with pytest.raises(RunnerClosed):
        await r.start()


async def test_close_before_start_and_close_during_start(launcher_starts: list[int]) -> None:
    before = children()
    never = make_runner()
    await never.close()
    assert launcher_starts == []
    r = make_runner()
    starting = asyncio.ensure_future(r.start())
    await asyncio.sleep(0)
    await r.close()  # waits for the start, then tears it down
    await starting
    assert r.stats()["live"] == 0
    assert wait_gone(children() - before) == set()
