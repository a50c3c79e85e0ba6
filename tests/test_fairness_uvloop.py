"""The runner under uvloop (the optional ``actionpool[uvloop]`` extra): same answers, same kills."""

from __future__ import annotations


import pytest

from actionpool.runner import Action, Limits, RunnerConfig

from conftest import make_runner

uvloop = pytest.importorskip("uvloop", reason="uvloop not installed (pip install actionpool[uvloop])")

OK = "def on_execute(event, api):\n    api.state.set('ok', True)\n"
SLEEPY = "import time\ndef on_execute(event, api):\n    time.sleep(30)\n"
CRASH = "import os\ndef on_execute(event, api):\n    os._exit(3)\n"
SPIN = '''
import os
def on_execute(event, api):
    while os.sched_getscheduler(0) != os.SCHED_IDLE:
        pass
    api.state.set("demoted", True)
'''


def test_flows_timeouts_crashes_and_demotion_under_uvloop() -> None:
    async def main() -> None:
        import asyncio

        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        cfg = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=1.0))
        async with make_runner(cfg) as r:
            async def flow(src: str, slug: str, **limits: float) -> dict:
                res = await r.run_flow(trigger="post-login", actions=[Action(slug=slug, source=src, limits=limits)],
                                       event={"user": {}}, tenant="t1")
                return res.to_dict()

            for _ in range(20):
                d = await flow(OK, "ok")
                assert d["outcome"] == "allow" and d["state"]["ok"]["ok"] is True
            assert (await flow(SLEEPY, "sleepy"))["denial"]["kind"] == "timeout"
            crash = await flow(CRASH, "crash")
            assert crash["denial"]["kind"] == "worker_crash" and "exit code 3" in crash["denial"]["reason"]
            spun = await flow(SPIN, "spin", action_timeout_s=30.0)
            assert spun["outcome"] == "allow" and spun["state"]["spin"]["demoted"] is True, spun["denial"]
            assert (await flow(OK, "ok"))["outcome"] == "allow"

    uvloop.run(main())
