"""Fire-and-forget api calls are deterministic: the execution ends once every call it started is answered.

An async handler that starts ``api.fetch`` without awaiting it and returns used to race its own end:
the supervisor judged the request or cancelled it depending on how the pipe was read (4 of 16 runs
denied, 12 allowed). Now the worker (Python and JS alike) waits for its own calls in flight before it
answers, so a request to a host off the allowlist denies every time, and one to an allowed host is made
every time. Run many times in a row on one warm worker, with real workers and a real HTTP server.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from conftest import TEST_CONFIG, make_runner
from net_fixtures import free_port
from actionpool.runner import Action, FetchConfig, Limits

RUNS = 20
CFG = dataclasses.replace(TEST_CONFIG, pool_size=1, max_workers=2,
                          fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=5.0),
                          limits=Limits(action_timeout_s=10.0, flow_timeout_s=20.0))

PY = '''
import asyncio

async def on_execute(event, api):
    asyncio.ensure_future(api.fetch(event.url))
    api.state.set("returned", True)
'''
PY_TASKS = '''
import asyncio

async def on_execute(event, api):
    async def later():
        await api.fetch(event.url)
    asyncio.get_running_loop().create_task(later())
'''
JS = '''
exports.onExecutePostLogin = async (event, api) => {
  api.fetch(event.url);
  api.state.set("returned", true);
};
'''
JS_SYNC = '''
exports.onExecutePostLogin = (event, api) => {
  api.fetch(event.url).then(() => {}, () => {});
};
'''


def action(source: str) -> Action:
    return Action(slug="ff", source=source, language="js" if "exports." in source else "python")


async def outcomes(source: str, url: str) -> list[tuple[str, str | None]]:
    async with make_runner(CFG) as r:
        out = []
        for _ in range(RUNS):
            res = await r.run_flow(trigger="post-login", actions=[action(source)], event={"user": {}, "url": url},
                                   tenant="t")
            out.append((res.outcome, res.denial["kind"] if res.denial else None))
    return out


async def test_a_fire_and_forget_fetch_to_a_denied_host_denies_every_time() -> None:
    for source in (PY, PY_TASKS, JS, JS_SYNC):
        got = await outcomes(source, "http://localhost:9/off-the-allowlist")
        assert got == [("deny", "http_fetch_denied")] * RUNS, (source, got)


async def test_a_fire_and_forget_fetch_to_an_allowed_host_is_made_every_time(http_server: Any) -> None:
    for source in (PY, JS):
        before = len(http_server.requests)
        got = await outcomes(source, f"{http_server.url}/json")
        assert got == [("allow", None)] * RUNS, (source, got)
        # every request reached the server before its flow answered (not one was cancelled on the way)
        assert len(http_server.requests) - before == RUNS


async def test_an_unawaited_fetch_that_fails_is_not_the_actions_failure() -> None:
    """A transport error of a call nobody awaited is catchable, so not a denial; deterministically so."""
    for source in (PY, JS):
        got = await outcomes(source, f"http://127.0.0.1:{free_port()}/refused")
        assert got == [("allow", None)] * RUNS, (source, got)
    # Nor does its error turn up later in another execution's logs ("Task exception was never retrieved").
    async with make_runner(CFG) as r:
        logs = []
        for _ in range(RUNS):
            res = await r.run_flow(trigger="post-login", actions=[action(PY)], tenant="t",
                                   event={"user": {}, "url": f"http://127.0.0.1:{free_port()}/refused"})
            logs += [e["message"] for e in res.logs]
    assert logs == [], logs


async def test_a_slow_unawaited_fetch_holds_the_execution_to_its_time_limit(http_server: Any) -> None:
    """Waiting for calls in flight is bounded: the fetch's own timeout, within the action's time."""
    cfg = dataclasses.replace(CFG, fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=0.3))
    for source in (PY, JS):
        async with make_runner(cfg) as r:
            res = await r.run_flow(trigger="post-login", actions=[action(source)],
                                   event={"user": {}, "url": f"{http_server.url}/slow?ms=5000"}, tenant="t")
        assert res.denial is not None and res.denial["kind"] == "http_fetch_timeout", res.denial
