"""Co-running: several executions of one I/O-bound action share a worker while they await api.fetch.

Real workers, a real local HTTP server that answers after a delay with what it was asked, real
kills. What is pinned here: each execution gets its own replies, state, claims and log lines;
a worker is only joined while its executions wait on a fetch; a kill ends every execution in the
worker, the culprit with its own kind and the others ``worker_lost``; an execution that fails by
itself leaves the others to finish; a cancelled flow does not take the others down; and actions
that never fetch, JavaScript ones and ``co_run=1`` keep one execution per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import time
from typing import Any, AsyncIterator

import pytest

from conftest import TEST_CONFIG, make_runner, wait_for_condition
from actionpool.protocol import FrameDecoder, encode_frame
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig
from actionpool.runner._corun import CoRunners
from actionpool.runner._flow import FlowState
from actionpool.runner._handlers import ExecutionContext
from actionpool.runner._services import Services
from actionpool.runner._spawn import Spawned
from actionpool.runner._triggers import profile
from actionpool.runner._worker import State, WorkerHandle

CFG = dataclasses.replace(TEST_CONFIG, pool_size=1, max_workers=1, max_busy_per_tenant=1,
                          fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=8.0),
                          limits=Limits(action_timeout_s=8.0, flow_timeout_s=20.0))

ECHO = '''
import asyncio
import json

async def on_execute(event, api):
    me = event.user.user_id
    print("start " + me, end="")          # an unfinished line across the await: it stays this execution's
    res = await api.fetch(event.url + "&u=" + me)
    print(" end")
    seen = json.loads(res["body"])["path"]
    if event.user.mode == "spin":
        while True:
            pass
    if event.user.mode == "raise":
        raise RuntimeError("fails by itself: " + me)
    if event.user.mode == "sleep":       # waiting in the worker, not on the supervisor
        await asyncio.sleep(30)
    if event.user.mode == "flood":
        for _ in range(64):
            api.log("info", "x" * 4000)
    api.log("info", "done " + me)
    api.state.set("seen", seen)
    api.session.setCustomClaim("https://example.test/u", me)
'''

SYNC = '''
def on_execute(event, api):
    api.state.set("u", event.user.user_id)
'''


def event(http: Any, user: str, ms: int, mode: str = "ok") -> dict[str, Any]:
    return {"user": {"user_id": user, "mode": mode}, "url": f"{http.url}/echo?ms={ms}"}


async def flow(r: Any, action: Action, ev: dict[str, Any]) -> Any:
    return await r.run_flow(trigger="post-login", actions=[action], event=ev, tenant="t")


def asked(http: Any, user: str) -> bool:
    return any(f"u={user}" in q.path for q in http.requests)


async def start_parked(r: Any, action: Action, http: Any, first: dict[str, Any],
                       others: list[dict[str, Any]]) -> tuple["asyncio.Task[Any]", list["asyncio.Task[Any]"]]:
    """One flow that waits on its fetch, then others that join its worker (max_workers=1: the only one)."""
    lead = asyncio.ensure_future(flow(r, action, first))
    await wait_for_condition(lambda: asked(http, first["user"]["user_id"]))
    rest = [asyncio.ensure_future(flow(r, action, ev)) for ev in others]
    await wait_for_condition(lambda: all(asked(http, ev["user"]["user_id"]) for ev in others))
    return lead, rest


async def run_parked(r: Any, action: Action, http: Any, first: dict[str, Any],
                     others: list[dict[str, Any]]) -> tuple[set[int], Any, list[Any]]:
    """Warm the action, park ``first`` on its fetch with ``others`` joining it; the worker's pid and every result."""
    assert (await flow(r, action, event(http, "warm", 0))).allowed   # the action is seen to reach a fetch
    pid = set(r.worker_pids)
    lead, rest = await start_parked(r, action, http, first, others)
    return pid, await lead, [await t for t in rest]


async def test_flows_awaiting_a_fetch_share_one_worker_and_keep_their_own_results(http_server: Any) -> None:
    action = Action(slug="echo", source=ECHO)
    async with make_runner(CFG) as r:
        warm = await flow(r, action, event(http_server, "warm", 0))   # the action is seen to reach a fetch
        assert warm.allowed, warm.denial
        lead, rest = await start_parked(r, action, http_server, event(http_server, "u0", 600),
                                        [event(http_server, f"u{i}", 400) for i in range(1, 8)])
        # Eight flows were waiting on the upstream at once, with one worker in the pool.
        results = [await lead] + [await t for t in rest]
        assert len(r.worker_pids) == 1
        assert r.stats()["co_runs"] >= 7
    for i, res in enumerate(results):
        me = f"u{i}"
        assert res.allowed, res.denial
        assert res.state["echo"]["seen"].endswith(f"u={me}"), res.state   # its own reply
        assert res.claims["access_token"] == {"https://example.test/u": me}
        lines = [entry["message"] for entry in res.logs]
        assert f"start {me} end" in lines and f"done {me}" in lines, lines
        assert not any(o in line for line in lines for o in (f"u{j}" for j in range(8) if j != i) if o != me), lines


@pytest.mark.parametrize("mode, kind, limits", [
    ("spin", "timeout", Limits(action_timeout_s=1.5, flow_timeout_s=20.0)),
    ("flood", "output_limit", Limits(action_timeout_s=8.0, flow_timeout_s=20.0, max_output_bytes=100_000)),
])
async def test_a_kill_ends_the_culprit_with_its_kind_and_the_others_beside_it_with_worker_lost(
        http_server: Any, mode: str, kind: str, limits: Limits) -> None:
    action = Action(slug="echo", source=ECHO)
    async with make_runner(dataclasses.replace(CFG, limits=limits)) as r:
        # The culprit waits on its fetch while the others join; they get their replies and then wait in
        # the worker (no fetch of theirs in flight) when the culprit goes wrong.
        pid, bad, lost = await run_parked(r, action, http_server, event(http_server, "culprit", 400, mode),
                                          [event(http_server, f"b{i}", 20, "sleep") for i in range(3)])
        assert bad.denial is not None and bad.denial["kind"] == kind, bad.denial
        for res in lost:
            assert res.denial is not None and res.denial["kind"] == "worker_lost", res.denial
            assert kind in res.denial["reason"] and "another execution of this action" in res.denial["reason"]
        after = await flow(r, action, event(http_server, "after", 0))
        assert after.allowed, after.denial
        assert set(r.worker_pids).isdisjoint(pid)       # a fresh worker took the killed one's place


async def test_an_uncaught_error_leaves_the_others_to_finish_then_the_worker_is_discarded(http_server: Any) -> None:
    action = Action(slug="echo", source=ECHO)
    async with make_runner(CFG) as r:
        pid, bad, good = await run_parked(r, action, http_server, event(http_server, "bad", 100, "raise"),
                                          [event(http_server, f"c{i}", 700) for i in range(3)])
        assert bad.denial is not None and bad.denial["kind"] == "uncaught_error"
        assert bad.denial["reason"] == "RuntimeError: fails by itself: bad"
        for i, res in enumerate(good):
            assert res.allowed, res.denial
            assert res.state["echo"]["seen"].endswith(f"u=c{i}")
        await wait_for_condition(lambda: set(r.worker_pids).isdisjoint(pid))   # not reused after the failure
        assert (await flow(r, action, event(http_server, "next", 0))).allowed


async def test_a_cancelled_flow_does_not_take_the_executions_beside_it_down(http_server: Any) -> None:
    action = Action(slug="echo", source=ECHO)
    async with make_runner(CFG) as r:
        assert (await flow(r, action, event(http_server, "warm", 0))).allowed
        lead, rest = await start_parked(r, action, http_server, event(http_server, "gone", 800),
                                        [event(http_server, f"d{i}", 300) for i in range(3)])
        lead.cancel()
        results = [await t for t in rest]
        assert all(res.allowed for res in results), [res.denial for res in results]
        try:
            await lead
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancelled flow was answered")
        assert (await flow(r, action, event(http_server, "next", 0))).allowed


async def test_co_run_1_and_actions_that_never_fetch_keep_one_execution_per_worker(http_server: Any) -> None:
    echo = Action(slug="echo", source=ECHO, limits={"co_run": 1})
    sync = Action(slug="sync", source=SYNC)
    cfg = dataclasses.replace(CFG, max_workers=4, max_busy_per_tenant=4)
    async with make_runner(cfg) as r:
        assert (await flow(r, echo, event(http_server, "warm", 0))).allowed
        got = await asyncio.gather(*(flow(r, echo, event(http_server, f"e{i}", 200)) for i in range(4)),
                                   *(flow(r, sync, {"user": {"user_id": f"s{i}"}}) for i in range(8)))
        assert all(res.allowed for res in got), [res.denial for res in got]
        assert r.stats()["co_runs"] == 0


TASKS = '''
import asyncio

async def on_execute(event, api):
    me = event.user.user_id
    if event.user.mode == "inner":       # the work is in a task of its own, awaited
        async def inner():
            await api.fetch(event.url + "&u=" + me)
            api.state.set("inner", me)
        await asyncio.get_running_loop().create_task(inner())
        return
    async def forever():                 # left behind: ends with this execution, not with another's
        while True:
            await asyncio.sleep(0.01)
    asyncio.ensure_future(forever())
    await api.fetch(event.url + "&u=" + me)
    api.state.set("left", me)
'''


async def test_an_execution_ends_its_own_tasks_never_those_of_the_executions_beside_it(http_server: Any) -> None:
    action = Action(slug="tasks", source=TASKS)
    async with make_runner(CFG) as r:
        assert (await flow(r, action, event(http_server, "warm", 0))).allowed
        lead, rest = await start_parked(r, action, http_server, event(http_server, "inner0", 700, "inner"),
                                        [event(http_server, f"left{i}", 50, "spawn") for i in range(3)])
        short = [await t for t in rest]         # they end first, each cancelling its own forever()
        long = await lead
        assert r.stats()["co_runs"] >= 3
    assert all(res.allowed for res in short) and [res.state["tasks"]["left"] for res in short] == \
        ["left0", "left1", "left2"]
    assert long.allowed and long.state == {"tasks": {"inner": "inner0"}}, long.denial


GIVES_UP = '''
import asyncio

async def on_execute(event, api):
    me = event.user.user_id
    if event.user.mode == "impatient":   # gives up on its fetch: the supervisor is still serving it
        try:
            await asyncio.wait_for(api.fetch(event.url + "&u=" + me), 0.3)
        except asyncio.TimeoutError:
            api.state.set("gave_up", me)
        return
    res = await api.fetch(event.url + "&u=" + me)
    api.state.set("status", res["status"])
'''


async def test_an_execution_that_gives_up_on_a_fetch_is_answered_and_its_worker_is_not_reused(
        http_server: Any) -> None:
    """An answer while one of its own requests is still served (honest here; forged in another's name looks
    the same): every flow is answered as it should be, then that worker is discarded, not reused."""
    action = Action(slug="gives-up", source=GIVES_UP)
    async with make_runner(CFG) as r:
        pid, first, others = await run_parked(r, action, http_server, event(http_server, "waits", 1500, "impatient"),
                                              [event(http_server, f"g{i}", 700) for i in range(2)])
        assert first.allowed and first.state == {"gives-up": {"gave_up": "waits"}}
        assert all(res.allowed and res.state["gives-up"]["status"] == 200 for res in others)
        await wait_for_condition(lambda: set(r.worker_pids).isdisjoint(pid))
        assert (await flow(r, action, event(http_server, "next", 0))).allowed


# -- the supervisor's side of the protocol, on a handle fed frames directly ------------------------


class TwoRuns:
    """A BUSY handle (its worker a harmless stand-in process) with two executions of one action in flight."""

    def __init__(self, services: Services) -> None:
        self.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        for fd in (w1, r2):
            os.close(fd)
        self.handle = WorkerHandle(Spawned(self.proc.pid, r1, w2), max_frame=1 << 20)
        self.handle.state = State.IDLE
        self.handle.co_digest = "d"
        lim = Limits()
        self.flows, self.futures = [], []
        for i in range(2):
            fl = FlowState(tenant="t", trigger="post-login", event={}, actions=[Action(slug="a", source="")],
                           limits=lim, flow_timeout_s=30.0, denial_message="no")
            ctx = ExecutionContext(fl, "a", profile("post-login"), services, time.monotonic() + 30)
            if i == 1:   # the first waits on a fetch (in the supervisor's hands): the second may join
                run0 = self.handle._running
                assert run0 is not None
                run0.fetching, run0.heard = 1, True
                assert self.handle.can_co_run("d", 2) and not self.handle.can_co_run("other", 2)
            self.futures.append(self.handle.execute({}, ctx, 30.0, "timeout", lim.max_output_bytes))
            self.flows.append(fl)
        self.xids = list(self.handle._runs)
        assert not self.handle.can_co_run("d", 2)   # full at its limit

    def feed(self, *frames: list[Any]) -> None:
        self.handle.data_received(b"".join(encode_frame(f) for f in frames))

    async def outcomes(self) -> list[Any]:
        try:
            return [await asyncio.wait_for(f, 5) for f in self.futures]
        finally:
            self.handle.kill("done")
            self.proc.wait(5)


@contextlib.asynccontextmanager
async def two_runs() -> AsyncIterator[TwoRuns]:
    services = Services(RunnerConfig())
    try:
        yield TwoRuns(services)
    finally:
        await services.aclose()


async def test_each_tagged_call_and_answer_reaches_its_own_execution() -> None:
    async with two_runs() as t:
        a, b = t.xids
        t.feed([2, "state.set", ["k", "for-b"], b], [2, "state.set", ["k", "for-a"], a],
               [1, b, None, {"ok": True}], [1, a, None, {"ok": True}])
        first, second = await t.outcomes()
        assert first.error is None and second.error is None
        assert t.flows[0].state == {"a": {"k": "for-a"}} and t.flows[1].state == {"a": {"k": "for-b"}}


async def test_an_untagged_call_while_two_run_is_a_protocol_error_for_both() -> None:
    async with two_runs() as t:
        t.feed([2, "state.set", ["k", 1]])
        outs = await t.outcomes()
        assert [o.error["kind"] for o in outs] == ["protocol_error", "protocol_error"]
        assert "without an execution id while 2 executions run" in outs[0].error["message"]


async def test_a_call_for_an_execution_not_running_here_kills_the_worker() -> None:
    async with two_runs() as t:
        t.feed([2, "state.set", ["k", 1], next(x for x in range(1, 4) if x not in t.xids)])
        outs = await t.outcomes()
        assert {o.error["kind"] for o in outs} == {"protocol_error"}


async def test_the_culprit_gets_its_kind_and_the_other_is_worker_lost() -> None:
    async with two_runs() as t:
        _, b = t.xids
        # b calls after its own answer, in the same read: b broke the rules, a did nothing wrong.
        t.feed([1, b, None, {"ok": True}], [2, "state.set", ["k", 1], b])
        first, second = await t.outcomes()
        assert second.error["kind"] == "protocol_error" and "after the execution's answer" in second.error["message"]
        assert first.error["kind"] == "worker_lost" and "protocol_error" in first.error["message"]
        assert not t.handle.alive


async def test_one_answered_with_an_error_leaves_the_other_running_then_the_worker_goes() -> None:
    async with two_runs() as t:
        a, b = t.xids
        t.feed([1, a, {"kind": "uncaught_error", "type": "ValueError", "message": "x", "traceback": ""}, None])
        assert t.futures[0].done() and not t.futures[1].done() and t.handle.alive and t.handle.draining
        assert not t.handle.can_co_run("d", 16)   # nothing new joins a worker that will be discarded
        t.feed([2, "state.set", ["k", "still"], b], [1, b, None, {"ok": True}])
        first, second = await t.outcomes()
        assert first.error["kind"] == "uncaught_error" and second.error is None
        assert t.flows[1].state == {"a": {"k": "still"}}


async def test_a_join_waiter_goes_to_the_pool_when_no_worker_parks_in_time() -> None:
    """``join_wait`` only waits while room exists; a worker whose executions compute times the waiter out."""
    async with two_runs() as t:
        w = t.handle
        for run in w._runs.values():
            run.fetching, run.heard = 0, True          # both executions compute (heard, no fetch in our hands)
        released: list[Any] = []
        co = CoRunners(lambda h, reusable: released.append((h, reusable)))
        key = ("t", ())
        co.hold(key, w, "d")
        assert await co.join_wait(key, "d", 4, 0.05) is None      # never seen to fetch: no wait at all
        co._parked(w)                                              # now it has been (and is joinable, not free)
        assert co.join(key, "d", 4) is None
        assert await co.join_wait(key, "d", 4, 0.05) is None      # room, but nobody parked in time
        assert co.stats()["co_run_waiting"] == 0 and co.holders(w) == 1 and w.co_pending == 0
        assert await co.join_wait(key, "d", 2, 0.05) is None      # no room at co_run=2: not even queued
        assert co.leave(w) and not released
        for f in t.futures:
            f.cancel()
        t.handle.kill("done")
        t.proc.wait(5)


def test_an_execute_request_read_during_a_blocking_call_is_kept_for_after_it() -> None:
    """The worker's side: a plain api call blocks on the pipe; a new execution arriving then is deferred."""
    from actionpool.protocol import Request, Response
    from actionpool.worker._channel import Channel

    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    try:
        ch = Channel(to_worker_r, from_worker_w, 1 << 20)
        woken: list[bool] = []
        ch.on_message = lambda msg: None
        ch.on_deferred = lambda: woken.append(True)
        execute = Request(99, "execute", [{}])
        os.write(to_worker_w, encode_frame(execute.wire()) + encode_frame(Response(1, None, "v").wire()))
        got = ch.call("cache.get", ["k"], 7)
        assert got == Response(1, None, "v")
        assert list(ch.deferred) == [execute] and woken == [True]
        sent = FrameDecoder().feed(os.read(from_worker_r, 1 << 16))
        assert sent == [[0, 1, "cache.get", ["k"], 7]]              # the call named its execution
    finally:
        for fd in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
            os.close(fd)
