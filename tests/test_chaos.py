"""Chaos: workers SIGKILLed from outside while flows run, and graceful shutdown with flows in flight.

What must hold however the kills interleave with the flows: every flow gets
exactly one answer; a flow whose worker was killed under it is denied
``worker_crash`` (and no other flow is disturbed: every other answer is the
exact one its kind must get); the pool heals; nothing outlives ``close()``.
The killer paces itself on completed flows, never on the clock.

The last two tests pin down, deterministically, two interleavings the chaos
run found (a worker dying at hand-over, a worker dying while it starts).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import random
import signal
import time
from typing import Any

import psutil
import pytest

from conftest import children, make_runner, wait_for_condition, wait_gone
from actionpool.runner import Action, FetchConfig, Limits, RunnerClosed, RunnerConfig, SandboxUnavailable

from actionpool.benchmarks.stress import NORMAL_KINDS, Kind, LocalServer, event_for, mismatches
from test_stress import Gate

FLOW_BOUND_S = 30.0
CONCURRENCY = 16

# Holds its worker for 20..180 ms, so a kill has busy workers to hit.
SLOW = Kind("slow", False, (Action(slug="slow", source=(
    "import time\n"
    "def on_execute(event, api):\n"
    "    time.sleep(0.02 + (event.payload.n % 5) * 0.04)\n"
    "    api.state.set('n', event.payload.n)\n")),),
    lambda i: {"outcome": "allow", "denial": None, "state": {"slow": {"n": i}}})
MIX = NORMAL_KINDS + (SLOW, SLOW, SLOW)

CONFIG = RunnerConfig(pool_size=4, max_workers=CONCURRENCY + 4, max_queue=256, queue_timeout_s=30.0,
                      limits=Limits(action_timeout_s=10.0, memory_mb=96),
                      fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=10.0))

FLOW: contextvars.ContextVar[int] = contextvars.ContextVar("chaos_flow")


def killpg_led_by(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (workers and the template each lead their own session)."""
    pgid = os.getpgid(pid)
    if pgid == pid and pgid != os.getpgrp():   # never a group this test process belongs to
        os.killpg(pgid, signal.SIGKILL)


class Chaos:
    """Drives flows, records which worker served which flow, and kills workers on the side."""

    def __init__(self, runner: Any, url: str, seed: int) -> None:
        self.r = runner
        self.url = url
        self.rng = random.Random(seed)
        self.served: dict[int, list[int]] = {}      # flow -> pids of the workers it was handed
        self.results: dict[int, dict[str, Any]] = {}
        self.kinds: dict[int, Kind] = {}
        self.inflight: set[int] = set()
        self.killed: set[int] = set()
        self.seen_pids: set[int] = set()
        self.template_kills = 0
        pool = runner._pool  # noqa: SLF001 - the test needs to know which worker served which flow
        acquire = pool.acquire

        async def recording(*args: Any, **kwargs: Any) -> Any:
            w = await acquire(*args, **kwargs)
            self.served.setdefault(FLOW.get(), []).append(w.pid)
            self.seen_pids.add(w.pid)
            return w

        pool.acquire = recording
        # A flow of an I/O-bound action may instead join a busy worker of it (co-running, runner/_corun.py).
        co = runner._engine.co  # noqa: SLF001
        join, join_wait = co.join, co.join_wait

        def joined(w: Any) -> Any:
            if w is not None:
                self.served.setdefault(FLOW.get(), []).append(w.pid)
                self.seen_pids.add(w.pid)
            return w

        co.join = lambda *a, **k: joined(join(*a, **k))

        async def waited(*args: Any, **kwargs: Any) -> Any:
            return joined(await join_wait(*args, **kwargs))

        co.join_wait = waited

    async def flow(self, i: int, kind: Kind) -> None:
        FLOW.set(i)
        self.kinds[i] = kind
        self.inflight.add(i)
        try:
            res = await asyncio.wait_for(
                self.r.run_flow(trigger="post-login", actions=kind.actions, event=event_for(i, self.url),
                                tenant=f"chaos-{i % 3}"), FLOW_BOUND_S)
            self.results[i] = res.to_dict()
        finally:
            self.inflight.discard(i)

    async def run_flows(self, first: int, n: int, mix: tuple[Kind, ...]) -> None:
        nxt = first

        async def client() -> None:
            nonlocal nxt
            while nxt < first + n:
                i = nxt
                nxt += 1
                await self.flow(i, mix[self.rng.randrange(len(mix))])

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))

    def kill_round(self, round_no: int) -> None:
        """Kill 1-3 workers: by pid (psutil) or by process group (os.killpg); now and then the fork template."""
        pids = self.r.worker_pids
        busy = [p for i in self.inflight for p in self.served.get(i, [])[-1:] if p in pids]
        victims: list[int] = []
        if busy:
            victims.append(self.rng.choice(busy))       # the worker of a flow still in flight
        for _ in range(self.rng.randrange(0, 3)):
            if pids:
                victims.append(self.rng.choice(pids))   # any worker, idle or busy
        for pid in dict.fromkeys(victims):
            self.killed.add(pid)
            try:
                if round_no % 2:
                    killpg_led_by(pid)
                else:
                    psutil.Process(pid).kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        template = self.r.stats().get("template_pid")
        if round_no % 10 == 5 and template:
            # The template's whole group: that includes a child it is forking that has not yet left the group.
            self.template_kills += 1
            try:
                killpg_led_by(template)
            except ProcessLookupError:
                pass

    async def killer(self, rounds: int, every: int, done: "asyncio.Future[None]") -> int:
        """A kill round each time ``every`` more flows have finished; returns the rounds made."""
        made = 0
        while made < rounds and not done.done():
            mark = len(self.results) + every
            while len(self.results) < mark and not done.done():
                await asyncio.sleep(0.002)  # polling a condition: completed flows
            if done.done():
                break
            self.kill_round(made)
            made += 1
        return made


async def test_external_kills_while_flows_run() -> None:
    before = children()
    server = LocalServer().start()
    try:
        async with make_runner(CONFIG) as r:
            chaos = Chaos(r, server.url, seed=7)
            flows = asyncio.ensure_future(chaos.run_flows(0, 1500, MIX))
            rounds = await chaos.killer(rounds=100, every=12, done=flows)
            await flows
            assert rounds == 100

            # Every flow answered; the ones a kill hit say so, the others are exactly right.
            assert len(chaos.results) == 1500
            hit = 0
            for i, got in chaos.results.items():
                wrong = mismatches(chaos.kinds[i].expect(i), got)
                if not wrong:
                    continue
                d = got["denial"] or {}
                assert d.get("kind") == "worker_crash", (i, chaos.kinds[i].name, wrong)
                if d["reason"].startswith("worker could not start"):
                    # the worker being started for it was killed with the template's group, before its hello
                    assert chaos.template_kills and "before its hello" in d["reason"], (i, d)
                else:
                    assert "SIGKILL(-9)" in d["reason"], (i, d)
                    assert set(chaos.served.get(i, [])) & chaos.killed, (i, d, chaos.served.get(i))
                hit += 1
            assert hit >= 1, "the chaos never hit a busy worker"

            # The pool heals: back to at least pool_size live workers.
            deadline = time.monotonic() + 20
            while r.stats()["live"] < CONFIG.pool_size:
                assert time.monotonic() < deadline, r.stats()
                await asyncio.sleep(0.01)
            stats = r.stats()
            assert stats["discarded"] >= len(chaos.killed & chaos.seen_pids)
            assert stats["template_respawns"] >= 1 and chaos.template_kills >= 1

            # Later flows all succeed, on the healed pool.
            chaos.results.clear()
            await chaos.run_flows(10_000, 96, MIX)
            assert len(chaos.results) == 96
            for i, got in chaos.results.items():
                assert not mismatches(chaos.kinds[i].expect(i), got), (i, got)
            assert not set(r.worker_pids) & chaos.killed
            seen = chaos.seen_pids | set(r.worker_pids)
        assert wait_gone(seen) == set()
        assert wait_gone(children() - before) == set()
    finally:
        server.stop()


LONG = Action(slug="long", source="import time\ndef on_execute(event, api):\n    time.sleep(60)\n")
SHORT = Action(slug="short", source=(
    "async def on_execute(event, api):\n"
    "    r = await api.fetch(event.url)\n"
    "    api.state.set('body', r.body)\n"
    "    api.state.set('n', event.n)\n"))


async def test_graceful_close_with_flows_in_flight() -> None:
    """close(grace): short flows finish with their real answer, long ones are killed and denied, nothing is left."""
    # pool_size == max_workers: six warm workers, so six flows are running at once from the start.
    cfg = RunnerConfig(pool_size=6, max_workers=6, max_busy_per_tenant=6, max_queue=8, queue_timeout_s=30.0,
                       limits=Limits(action_timeout_s=120.0, flow_timeout_s=120.0),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=30.0))
    before = children()
    async with Gate() as gate:
        r = make_runner(cfg)
        await r.start()
        results: dict[str, dict[str, Any]] = {}

        async def flow(name: str, action: Action, n: int) -> None:
            res = await r.run_flow(trigger="post-login", actions=[action], event={"url": gate.url, "n": n},
                                   tenant="shutdown")
            results[name] = res.to_dict()

        tasks = [asyncio.ensure_future(flow(f"short{n}", SHORT, n)) for n in range(3)]
        tasks += [asyncio.ensure_future(flow(f"long{n}", LONG, n)) for n in range(3)]
        await wait_for_condition(lambda: gate.arrived == 3 and r.stats()["busy"] == 6)
        tasks.append(asyncio.ensure_future(flow("queued", LONG, 9)))   # no worker left: it waits
        await wait_for_condition(lambda: r.stats()["waiting"] == 1)
        pids = set(r.worker_pids) | {r.stats()["template_pid"]}

        closing = asyncio.ensure_future(r.close(grace=2.0))
        await asyncio.sleep(0)  # one loop step: close() has begun (it marks the runner closed at once)
        with pytest.raises(RunnerClosed):
            await r.run_flow(trigger="post-login", actions=[SHORT], event={}, tenant="shutdown")
        gate.opened.set()
        await asyncio.wait_for(closing, 30)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    for n in range(3):
        res = results[f"short{n}"]
        assert res["outcome"] == "allow", res["denial"]
        assert res["state"] == {"short": {"body": "open", "n": n}}
    for name in ("long0", "long1", "long2", "queued"):
        d = results[name]["denial"]
        assert d is not None and d["kind"] == "shutdown", (name, d)
    assert all("runner closed while the action ran" in results[f"long{n}"]["denial"]["reason"] for n in range(3))
    assert results["queued"]["denial"]["reason"].startswith("the runner closed")  # before or while it ran
    assert r.stats()["live"] == 0
    assert wait_gone(pids) == set()
    assert wait_gone(children() - before) == set()


# --------------------------------------------------------------------------------------------
# interleavings the chaos run found, forced deterministically

OK = Action(slug="ok", source="def on_execute(event, api):\n    api.state.set('ok', True)\n")
HOLD = Action(slug="hold", source="import time\ndef on_execute(event, api):\n    time.sleep(0.2)\n")


async def test_worker_dying_at_handoff_is_replaced() -> None:
    """A worker handed to a waiting flow dies before that flow resumes: the flow gets another worker.

    (Before the fix, run_flow raised AssertionError("State.DEAD") out of WorkerHandle.execute.)
    """
    async with make_runner(RunnerConfig(pool_size=1, max_workers=1)) as r:
        pool = r._pool  # noqa: SLF001 - the interleaving is forced at the hand-over
        a = asyncio.ensure_future(r.run_flow(trigger="post-login", actions=[HOLD], event={}, tenant="t"))
        await wait_for_condition(lambda: r.stats()["busy"] == 1)
        b = asyncio.ensure_future(r.run_flow(trigger="post-login", actions=[OK], event={}, tenant="t"))
        await wait_for_condition(lambda: r.stats()["waiting"] == 1)
        offer = pool._offer  # noqa: SLF001
        handed: list[Any] = []

        def offer_then_die(w: Any, key: Any) -> None:
            offer(w, key)          # hands w to flow b, which resumes in a later loop iteration
            pool._offer = offer    # noqa: SLF001
            handed.append(w)
            # what an OOM kill or external SIGKILL noticed in the same iteration does to the handle:
            w.kill("died right after the hand-over")

        pool._offer = offer_then_die  # noqa: SLF001
        assert (await a).outcome == "allow"
        res = (await asyncio.wait_for(b, 10)).to_dict()
        assert handed and not handed[0].alive
    assert res["outcome"] == "allow" and res["state"] == {"ok": {"ok": True}}, res["denial"]


async def test_worker_dying_while_starting() -> None:
    """A worker that exits before its hello (pidfd fires while the pipes connect) is a clean start failure.

    (Before the fix: 'ValueError: I/O operation on closed file', and a half-built pipe transport
    raising in __del__.)
    """
    # /bin/true as the worker interpreter: a process that exits at once, before any hello.
    r = make_runner(RunnerConfig(pool_size=0, python="/bin/true", fork_template=False))
    try:
        # strict (the default) reports a worker that cannot start as SandboxUnavailable, with the cause
        with pytest.raises((RuntimeError, SandboxUnavailable), match="before its hello"):
            await r.start()
    finally:
        await r.close()
    gc.collect()  # a half-built transport would raise in __del__ here (filterwarnings=error fails the test)
