"""Log lines written before a kill appear in the result: timeout, memory and output kills.

The worker writes each log line to its pipe as it is logged (other
notifications are still coalesced); the supervisor reads whatever is left in
the pipe before it gives the verdict of a killed execution, and salvages the
log lines of the chunk that broke the output budget. Each action logs, waits
a few milliseconds, then gets itself killed.
"""

from __future__ import annotations

import pytest

from actionpool import Limits, RunnerConfig

from conftest import make_runner, run

BEFORE = (
    "import logging, time\n"
    "def on_execute(event, api):\n"
    "    api.log('info', 'first line')\n"
    "    print('printed line')\n"
    "    console.warn('console', 'line')\n"
    "    logging.getLogger('x').error('logging line')\n"
    "    time.sleep(0.01)\n"
)
EXPECTED = [
    {"action": "a", "level": "info", "message": "first line"},
    {"action": "a", "level": "info", "message": "printed line"},
    {"action": "a", "level": "warn", "message": "console line"},
    {"action": "a", "level": "error", "message": "logging line"},
]


SPIN = "    while True:\n        pass\n"
KILLS = {
    # denial kind: (how the action gets itself killed, the limits that kill it)
    "timeout": (SPIN, Limits(action_timeout_s=1.0)),
    "flow_timeout": (SPIN, Limits(action_timeout_s=10.0, flow_timeout_s=1.0)),
    "memory_limit": ("    hog = []\n    while True:\n        hog.append(bytearray(1 << 20))\n",
                     Limits(memory_mb=64, action_timeout_s=20.0)),
    "output_limit": ("    while True:\n        api.state.set('k', 'x' * 60000)\n", Limits(max_output_bytes=100_000)),
}


@pytest.mark.parametrize("kind", list(KILLS))
async def test_logs_before_a_kill_are_kept(kind: str) -> None:
    tail, limits = KILLS[kind]
    async with make_runner(RunnerConfig(pool_size=1, limits=limits)) as r:
        res = await run(r, BEFORE + tail)
    assert res["denial"]["kind"] == kind, res["denial"]
    assert res["logs"] == EXPECTED


async def test_a_line_logged_right_before_the_flood_is_kept() -> None:
    """No pause at all: the log line and the flood may arrive in one read; the line is salvaged."""
    src = ("def on_execute(event, api):\n    api.log('info', 'last words')\n"
           "    while True:\n        api.state.set('k', 'x' * 60000)\n")
    cfg = RunnerConfig(pool_size=1, limits=Limits(max_output_bytes=100_000))
    async with make_runner(cfg) as r:
        res = await run(r, src)
    assert res["denial"]["kind"] == "output_limit"
    assert res["logs"] == [{"action": "a", "level": "info", "message": "last words"}]


async def test_log_budget_still_applies_after_a_kill() -> None:
    src = ("def on_execute(event, api):\n    for i in range(50):\n        api.log('info', str(i))\n"
           "    while True:\n        pass\n")
    cfg = RunnerConfig(pool_size=1, limits=Limits(action_timeout_s=1.0, max_log_entries=10))
    async with make_runner(cfg) as r:
        res = await run(r, src)
    assert res["denial"]["kind"] in ("timeout", "output_limit")
    assert [e["message"] for e in res["logs"]] == [str(i) for i in range(10)]
