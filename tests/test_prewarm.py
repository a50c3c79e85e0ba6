"""Warm start: ``Runner.prewarm`` starts workers for deployed actions, hottest first, within the memory budget.

Real workers for what prewarm starts (pids, which keys hold an idle worker, that a flow of a
warmed action starts nothing); the pool's fakes (tests/test_pool_policy.py) for the rule that a
prewarm never takes a start slot while a flow waits, where a real start would make it a race.
Nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from conftest import make_runner, wait_for_condition
from test_pool_policy import PROFILE, Clock, make_pool
from actionpool.runner import Action, RunnerClosed, RunnerConfig
from actionpool.runner.hosting import make_decision

SRC = "def on_execute_post_login(event, api):\n    api.state.set('who', %r)\n"
EVENT = {"user": {"user_id": "u1"}}


def _actions(tenant: str, n: int) -> list[Action]:
    return [Action(slug=f"a{i}", source=SRC % f"{tenant}/a{i}") for i in range(n)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_prewarm_starts_the_hottest_first_and_stops_at_the_memory_budget() -> None:
    # max_workers=8, one unassigned spare, one start slot: a prewarm may use 8 - 1 - (1 + 1) = 5 slots.
    cfg = RunnerConfig(pool_size=1, max_workers=8, spawn_concurrency=1)
    by_tenant = {"acme": _actions("acme", 3), "globex": _actions("globex", 3), "initech": _actions("initech", 2)}
    counts = {("globex", "a2"): 900, ("acme", "a1"): 500, ("initech", "a0"): 500, ("acme", "a0"): 10}
    async with make_runner(cfg) as r:
        await wait_for_condition(lambda: r.stats()["warm_unassigned"] == 1)
        before = r.stats()["spawned"]
        rep = await r.prewarm(by_tenant, counts)
        # Counts first, then round-robin over the tenants in their flows' order (first actions, then second...).
        assert rep["warmed"] == [("globex", "a2"), ("initech", "a0"), ("acme", "a1"), ("acme", "a0"), ("globex", "a0")]
        assert rep["stopped"] == "memory budget"
        assert rep["left"] == [("globex", "a1"), ("initech", "a1"), ("acme", "a2")]
        assert rep["failed"] == 0 and rep["skipped"] == 0
        pids = rep["pids"]
        assert len(set(pids)) == 5 and set(pids) <= set(r.worker_pids) and all(_alive(p) for p in pids)
        s = r.stats()
        assert s["spawned"] - before == 5 and s["live"] == 6 and s["idle"] == 6 and s["capacity"] == 8
        # Each warmed action holds one idle worker under the key its flows acquire.
        engine, pool = r._engine, r._pool
        assert engine is not None and pool is not None
        acts = {(t, a.slug): a for t, acts in by_tenant.items() for a in acts}
        for (tenant, slug), pid in zip(rep["warmed"], pids):
            assert [w.pid for w in pool.idle[engine.worker_key(tenant, acts[tenant, slug])]] == [pid]
        for tenant, slug in rep["left"]:
            assert engine.worker_key(tenant, acts[tenant, slug]) not in pool.idle
        # The hottest is evicted last: the coldest warmed worker is the least recently used bound one.
        bound = [w.pid for w, key in pool.ws.oldest_idle() if key[0] is not None]
        assert bound == list(reversed(pids))
        # A flow of a warmed action runs on its worker and starts nothing.
        res = await r.run_flow(trigger="post-login", actions=[acts["globex", "a2"]], event=EVENT, tenant="globex")
        assert res.outcome == "allow" and res.state["a2"]["who"] == "globex/a2"
        assert r.stats()["spawned"] - before == 5
        # A second prewarm finds them warm and has no room left.
        again = await r.prewarm(by_tenant, counts)
        assert again["warmed"] == [] and again["skipped"] == 5 and again["stopped"] == "memory budget"


async def test_prewarm_gives_a_hot_action_workers_for_its_share_of_the_expected_concurrency() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=16, spawn_concurrency=1)
    by_tenant = {"acme": _actions("acme", 2), "globex": _actions("globex", 1)}
    counts = {("acme", "a0"): 60, ("acme", "a1"): 30, ("globex", "a0"): 10}
    async with make_runner(cfg) as r:
        # Shares 0.6, 0.3, 0.1 of 4 flows in flight: ceil -> 3, 2 and 1 workers; every first one before any extra.
        rep = await r.prewarm(by_tenant, counts, concurrency=4)
        assert rep["warmed"] == [("acme", "a0")] * 3 + [("acme", "a1")] * 2 + [("globex", "a0")]
        assert rep["stopped"] == "done" and rep["left"] == [] and rep["failed"] == 0
        engine, pool = r._engine, r._pool
        assert engine is not None and pool is not None
        acts = {(t, a.slug): a for t, acts in by_tenant.items() for a in acts}
        assert [len(pool.idle[engine.worker_key(t, acts[t, s])]) for t, s in counts] == [3, 2, 1]
        assert len(set(rep["pids"])) == 6
        with pytest.raises(Exception, match="concurrency"):
            await r.prewarm(by_tenant, counts, concurrency=0)


async def test_prewarm_skips_decision_blocks_and_shared_workers_and_refuses_bad_input() -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=8, spawn_concurrency=2, worker_binding="tenant")
    async with make_runner(cfg) as r:
        block = make_decision(1, "false", "never")   # a decision block runs in the supervisor: no worker to warm
        rep = await r.prewarm({"acme": [block, *_actions("acme", 3)], "globex": _actions("globex", 1)})
        # worker_binding="tenant": one worker serves every action of a tenant.
        assert rep["warmed"] == [("acme", "a0"), ("globex", "a0")] and rep["skipped"] == 2
        assert rep["stopped"] == "done" and rep["left"] == []
        with pytest.raises(Exception, match="runner.Action"):
            await r.prewarm({"acme": ["not an action"]})  # type: ignore[list-item]
        with pytest.raises(Exception, match="non-empty"):
            await r.prewarm({"": _actions("x", 1)})
    with pytest.raises(RunnerClosed):
        await r.prewarm({"acme": _actions("acme", 1)})


async def test_prewarm_takes_no_start_slot_while_a_flow_waits() -> None:
    """The flow's start goes first; the prewarm's begin only once nobody waits (fake workers, gated launch)."""
    clock = Clock()
    gate = asyncio.Event()
    pool, started = make_pool(clock, max_workers=10, spawn_concurrency=1)
    launches: list[str] = []
    inner = pool._launch

    async def launch(profile: Any) -> Any:
        launches.append("start")
        await gate.wait()
        return await inner(profile)

    pool._launch = launch
    flow = asyncio.ensure_future(pool.acquire("flow-owner", "d", PROFILE, 30.0))
    await wait_for_condition(lambda: len(launches) == 1 and pool.n_waiting == 1)
    warm = asyncio.ensure_future(pool.prewarm([("k1", PROFILE), ("k2", PROFILE), ("k3", PROFILE)]))
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(launches) == 1            # a flow waits and holds the only start slot: the prewarm waits
    gate.set()
    w = await asyncio.wait_for(flow, 10)
    assert w is started[0]               # the flow got the first worker
    got, already, tried, why = await asyncio.wait_for(warm, 10)
    assert [k[0] for k, _ in got] == ["k1", "k2", "k3"] and why == "done" and already == 0 and tried == 3
    assert len(launches) == 4
    pool.release(w, True)
    await pool.close(0)


# -- the sidecar: prewarm during start-up, /readyz not ready until it is done or timed out ----------


def _serve_config(tmp_path: Any, timeout_s: float, tenants: int = 3, per_tenant: int = 4) -> Any:
    from serve_fixtures import write_config

    lines = ["[runner]", "pool_size = 1", "max_workers = 64", "[server]", f"prewarm_timeout_s = {timeout_s}"]
    files = {}
    for t in range(tenants):
        slugs = [f"a{i}" for i in range(per_tenant)]
        for s in slugs:
            files[f"t{t}_{s}.py"] = SRC % f"t{t}/{s}"
            lines += [f"[tenants.t{t}.actions.{s}]", f'file = "actions/t{t}_{s}.py"']
        flow = ", ".join(f'"{s}"' for s in slugs)
        lines += [f"[tenants.t{t}.flows]", f'post-login = [{flow}, {{ if = "false", deny = "never" }}]']
    return write_config(tmp_path, "\n".join(lines) + "\n", files)


async def _ready(app: Any) -> tuple[int, Any]:
    status, body, _ = await app._readyz(None)
    return status, body


async def test_sidecar_is_not_ready_until_its_deployed_actions_are_warm(tmp_path: Any) -> None:
    from actionpool.sidecar._config import load_config
    from actionpool.sidecar._server import Sidecar

    app = Sidecar(load_config(_serve_config(tmp_path, 60), env={}))
    try:
        await app.startup()
        # No await between the end of startup and this check: the prewarm task has not run a step yet.
        status, body = await _ready(app)
        assert (status, body) == (503, {"status": "not ready", "reason": "warming"})
        assert app.started and app.warming
        await wait_for_condition(lambda: not app.warming, timeout=60)
        status, body = await _ready(app)
        assert status == 200 and body["prewarm"] == {"warmed": 12, "left": 0, "failed": 0, "stopped": "done"}
        s = app.runner.stats()
        assert s["idle"] >= 12 and s["waiting"] == 0
    finally:
        await app.shutdown(0)


async def test_sidecar_is_ready_anyway_when_prewarm_times_out(tmp_path: Any) -> None:
    from actionpool.sidecar._config import load_config
    from actionpool.sidecar._server import Sidecar

    # 12 worker starts (two at a time) cannot finish in a millisecond: the bound ends the wait.
    app = Sidecar(load_config(_serve_config(tmp_path, 0.001), env={}))
    try:
        await app.startup()
        assert (await _ready(app))[0] == 503
        await wait_for_condition(lambda: not app.warming, timeout=60)
        status, body = await _ready(app)
        assert status == 200 and body["prewarm"] == {"stopped": "timeout", "timeout_s": 0.001}
    finally:
        await app.shutdown(0)


def test_prewarm_timeout_is_validated_and_zero_turns_it_off(tmp_path: Any) -> None:
    from actionpool.runner import ConfigError
    from actionpool.sidecar._config import load_config

    with pytest.raises(ConfigError, match="server.prewarm_timeout_s"):
        load_config(_serve_config(tmp_path, -1), env={})
    assert load_config(_serve_config(tmp_path, 0), env={}).server.prewarm_timeout_s == 0


def test_serve_answers_ready_after_the_prewarm(tmp_path: Any) -> None:
    import httpx
    from serve_fixtures import start_serve

    s = start_serve(_serve_config(tmp_path, 60, tenants=2, per_tenant=3))   # returns at the first 200 of /readyz
    try:
        body = httpx.get(s.url + "/readyz", timeout=10).json()
        assert body["status"] == "ready" and body["prewarm"]["warmed"] == 6 and body["prewarm"]["stopped"] == "done"
        # Then the warm heap is frozen out of the GC's full passes (runner/_heap.py), right after the prewarm.
        deadline = time.monotonic() + 10
        while "frozen_objects" not in body["prewarm"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.02)   # polling the condition
            body = httpx.get(s.url + "/readyz", timeout=10).json()
        assert body["prewarm"]["frozen_objects"] > 10_000
        with s.client() as c:
            r = c.post("/v1/tenants/t1/flows/post-login", json={"user": {}})
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
    finally:
        assert s.stop() == 0, s.output()[-2000:]
