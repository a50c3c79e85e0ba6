"""Co-running under attack: a hostile tenant's executions against the siblings sharing their worker.

Real workers, real kills, a real local HTTP upstream. The upstream here is a gate (``/hold?k=KEY``
answers only once the test releases KEY), so "the culprit acts while its siblings wait on their
fetches" is an order the test sets, not a race. What every attack must leave true (docs/design.md
"Workers during an await", docs/security.md "Known limits"): every flow gets exactly one answer with
a clear denial kind, none waits past its own time limit, another tenant's fetch flows keep
succeeding during and after, the next flow of the attacked action is served (by a fresh worker when
the old one was killed), the runner's books go back to zero, and no worker is left behind (conftest).
Nothing of one flow (state, claims, log lines) reaches another's result unless the action's own code
put it there (a forged call or answer in a sibling's name is that: the same trust domain).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from actionpool.runner import Action, FetchConfig, Limits
from conftest import TEST_CONFIG, make_runner, wait_for_condition

pytestmark = pytest.mark.timeout(40)

# Two workers: tenant "t" may hold one (its co-runners share it), the other tenant gets the other.
CFG = dataclasses.replace(TEST_CONFIG, pool_size=1, max_workers=2, max_busy_per_tenant=1,
                          fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=15.0),
                          limits=Limits(action_timeout_s=6.0, flow_timeout_s=20.0))


# -- the upstream: a gate the test opens ------------------------------------------------------


class Gate:
    """A real HTTP server on 127.0.0.1: ``/hold?k=KEY`` answers ``{"k": KEY}`` once KEY is released."""

    def __init__(self) -> None:
        self.seen: list[str] = []       # keys asked for, in order
        self.answered: list[str] = []   # keys whose answer was written
        self._open: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                q = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
                key = q.get("k", "")
                with gate._lock:
                    gate.seen.append(key)
                ev = gate._event(key)
                while not ev.is_set() and not gate.stop.is_set():   # bounded by the teardown's stop
                    ev.wait(0.05)
                body = json.dumps({"k": key}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    with gate._lock:
                        gate.answered.append(key)
                except (BrokenPipeError, ConnectionResetError):   # the supervisor gave up on it: expected
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 256

            def handle_error(self, request: object, client_address: object) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _event(self, key: str) -> threading.Event:
        with self._lock:
            return self._open.setdefault(key, threading.Event())

    def release(self, *keys: str) -> None:
        for k in keys:
            self._event(k).set()

    def asked(self, *keys: str) -> bool:
        with self._lock:
            return all(k in self.seen for k in keys)

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for k in self.seen if k.startswith(prefix))


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    g.thread.start()
    try:
        yield g
    finally:
        g.stop.set()
        g.server.shutdown()
        g.server.server_close()
        g.thread.join(timeout=5)


# -- the actions --------------------------------------------------------------------------------

# Every execution marks its flow (state, claim, log line) with its user before it waits on the gate;
# the mode says what it does once its fetch returns. A culprit finds its siblings' execution ids the
# way hostile code would: through the garbage collector (docs/security.md: not a boundary).
HOSTILE = '''
import asyncio, gc, os, struct, time

def frame(value):
    import msgpack
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body

def xids(api):
    mine = api._ex
    others = sorted(o.channel.xid for o in gc.get_objects()
                    if type(o).__name__ == "Execution" and o.active and o is not mine and hasattr(o.channel, "xid"))
    return mine.channel.xid, others

async def on_execute(event, api):
    me = event.user.user_id
    mode = event.user.mode
    api.state.set("me", me)
    api.state.set("pid", os.getpid())
    api.session.setCustomClaim("https://example.test/u", me)
    api.log("info", "secret of " + me)
    await api.fetch(event.url + "/hold?k=" + me)
    if mode == "nap":                # not waiting on a fetch for a while (none may join), then parks again
        await asyncio.sleep(float(event.user.get("nap") or 2.5))
        await api.fetch(event.url + "/hold?k=" + me + "-2")
    if mode in ("ok", "nap"):
        api.state.set("after", me)
        return
    x, others = xids(api)
    assert others, "no sibling found"
    if mode == "answer_for_siblings":
        for o in others:
            os.write(4, frame([1, o, None, {"ok": True}]))
    elif mode == "call_as_sibling":
        for o in others:
            os.write(4, frame([2, "state.set", ["planted", "by " + me], o]))
    elif mode == "unknown_xid":
        ghost = next(i for i in range(1, 100) if i != x and i not in others)
        os.write(4, frame([0, 4000000000, "cache.get", ["k"], ghost]))
    elif mode == "untagged":
        os.write(4, frame([2, "state.set", ["k", "untagged"]]))
    elif mode == "second_answer":
        os.write(4, frame([1, x, None, {"ok": True}]) * 2)
    elif mode == "garbage":
        os.write(4, struct.pack(">I", 3) + b"\\xc1\\xc1\\xc1")
    elif mode == "huge_header":
        os.write(4, b"\\xff\\xff\\xff\\xff")
    elif mode == "half_frame":       # the siblings' frames would be read as the rest of this one
        await api.fetch(event.url + "/hold?k=" + me + "-go")   # says when (the test waits for it)
        os.write(4, struct.pack(">I", 300) + b"\\x94\\x02")
        await asyncio.sleep(30)
    elif mode == "close_pipe":
        os.close(4)
        await asyncio.sleep(30)
    elif mode == "exit":
        os._exit(3)
    elif mode == "cancel_siblings":
        for t in asyncio.all_tasks():
            if t is not asyncio.current_task():
                t.cancel()
        await asyncio.sleep(0)
    elif mode in ("spin", "block"):  # a marker fetch says when (below), then the loop stops
        await api.fetch(event.url + "/hold?k=" + me + "-go")
    if mode == "spin":
        while True:
            pass
    elif mode == "block":            # a synchronous sleep: the loop the siblings share stops too
        time.sleep(60)
    elif mode == "log_flood":
        for _ in range(2000):
            api.log("info", "x" * 4000)
    elif mode == "call_flood":
        for i in range(5000):
            api.state.set("n", i)
    elif mode == "memory":
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
    api.state.set("after", me)
'''

OTHER = '''
async def on_execute(event, api):
    res = await api.fetch(event.url + "/hold?k=" + event.user.user_id)
    api.state.set("got", res["body"])
'''


def ev(gate: Gate, user: str, mode: str = "ok", **more: Any) -> dict[str, Any]:
    return {"user": {"user_id": user, "mode": mode, **more}, "url": gate.url}


async def flow(r: Any, action: Action, event: dict[str, Any], tenant: str = "t") -> Any:
    return await r.run_flow(trigger="post-login", actions=[action], event=event, tenant=tenant)


async def warm(r: Any, gate: Gate, action: Action) -> int:
    """One flow that reaches its fetch: the action is known to be I/O-bound, so others may join it.

    Returns the pid of the worker it ran in: the one the next flows of the action share.
    """
    gate.release("warm")
    res = await flow(r, action, ev(gate, "warm"))
    assert res.allowed, res.denial
    return int(res.state["hostile"]["pid"])


async def parked(r: Any, gate: Gate, action: Action, lead: tuple[str, str],
                 others: list[tuple[str, str]]) -> tuple[asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """The lead waits on the gate, then the others join its worker and wait on the gate too."""
    first = asyncio.ensure_future(flow(r, action, ev(gate, *lead)))
    await wait_for_condition(lambda: gate.asked(lead[0]))
    joined = r.stats()["co_runs"]
    rest = [asyncio.ensure_future(flow(r, action, ev(gate, *o))) for o in others]
    await wait_for_condition(lambda: gate.asked(*(o[0] for o in others)))
    assert r.stats()["co_runs"] - joined == len(others)     # they share the lead's worker
    return first, rest


def kind(res: Any) -> str:
    return "allowed" if res.allowed else res.denial["kind"]


def own_only(res: Any, me: str, everyone: list[str]) -> None:
    """Nothing of another flow in ``res``: its claims and log lines name ``me`` only."""
    blob = json.dumps({"claims": res.claims, "logs": res.logs, "state": res.state})
    for other in everyone:
        if other != me:
            assert f'"{other}"' not in blob and f"of {other}" not in blob, (me, other, blob)


async def other_tenant_ok(r: Any, gate: Gate, name: str) -> None:
    """Another tenant's fetch flow, served while the attack goes on."""
    gate.release(name)
    res = await asyncio.wait_for(flow(r, Action(slug="other", source=OTHER), ev(gate, name), tenant="t2"), 15)
    assert res.allowed, res.denial
    assert json.loads(res.state["other"]["got"]) == {"k": name}


async def settled(r: Any) -> None:
    """The books go back to zero: no flow in flight, no worker held, nobody waiting to join."""
    def zero() -> bool:
        s = r.stats()
        return (s["flows_in_flight"], s["busy"], s["waiting"], s["co_run_waiting"]) == (0, 0, 0, 0)

    await wait_for_condition(zero, timeout=15)


async def next_flow_ok(r: Any, gate: Gate, action: Action, name: str) -> None:
    gate.release(name)
    res = await flow(r, action, ev(gate, name))
    assert res.allowed, res.denial
    assert res.state["hostile"]["me"] == name and res.state["hostile"]["after"] == name, res.state
    own_only(res, name, [name, "culprit", "s0", "s1", "s2"])


async def replaced(r: Any, *results: Any) -> None:
    """The worker those flows ran in is gone (killed or discarded): a fresh one serves what comes next."""
    pids = {x.state["hostile"]["pid"] for x in results}
    assert len(pids) == 1, pids      # they shared one worker
    await wait_for_condition(lambda: pids.isdisjoint(r.worker_pids))


SIBS = ["s0", "s1", "s2"]

# mode -> (the culprit's kind, its siblings' kind)
FORGERIES = {
    # In a sibling's name (docs/security.md: the same trust domain): accepted as the sibling's.
    "answer_for_siblings": ("allowed", "allowed"),
    "call_as_sibling": ("allowed", "allowed"),
    # Naming no execution in flight, or none while several run: nothing says whose, all lose it.
    "unknown_xid": ("protocol_error", "protocol_error"),
    "untagged": ("protocol_error", "protocol_error"),
    "garbage": ("protocol_error", "protocol_error"),
    "huge_header": ("protocol_error", "protocol_error"),
    "close_pipe": ("protocol_error", "protocol_error"),
    # The culprit is known: its own kind, the others worker_lost.
    "second_answer": ("protocol_error", "worker_lost"),
    # A crash names nobody.
    "exit": ("worker_crash", "worker_crash"),
    # The siblings' tasks cancelled from inside: each sibling fails by itself, the culprit finishes.
    "cancel_siblings": ("allowed", "uncaught_error"),
}


@pytest.mark.parametrize("mode", list(FORGERIES))
async def test_a_co_runner_forging_frames_gets_every_flow_one_clear_answer(gate: Gate, mode: str) -> None:
    action = Action(slug="hostile", source=HOSTILE)
    async with make_runner(CFG) as r:
        await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("culprit", mode), [(s, "ok") for s in SIBS])
        await other_tenant_ok(r, gate, "o-during")
        gate.release("culprit")
        await wait_for_condition(lead.done, timeout=15)    # the culprit has acted before its siblings move
        gate.release(*SIBS)
        bad = await lead
        sibs = [await t for t in rest]
        want_bad, want_sib = FORGERIES[mode]
        assert kind(bad) == want_bad, bad.denial
        assert [kind(s) for s in sibs] == [want_sib] * 3, [s.denial for s in sibs]
        everyone = ["culprit", *SIBS]
        for name, res in zip(everyone, [bad, *sibs]):
            if mode != "call_as_sibling":
                own_only(res, name, everyone)
            assert res.state["hostile"]["me"] == name
        if want_sib == "worker_lost":
            assert all(want_bad in s.denial["reason"] and "another execution of this action" in s.denial["reason"]
                       for s in sibs)
        if mode == "answer_for_siblings":   # the forged answer is the one they got: they never went on
            assert all("after" not in s.state["hostile"] for s in sibs)
        if mode == "call_as_sibling":       # the planted call went to the execution it named, not the culprit's
            assert all(s.state["hostile"]["planted"] == "by culprit" for s in sibs)
            assert "planted" not in bad.state["hostile"]
        await other_tenant_ok(r, gate, "o-after")
        await next_flow_ok(r, gate, action, "next")
        # A forged answer leaves the named execution running unseen: that worker is discarded, never reused.
        if want_bad != "allowed" or want_sib != "allowed" or mode == "answer_for_siblings":
            await replaced(r, bad, *sibs)
        await settled(r)


async def test_a_half_frame_swallowing_the_siblings_frames_ends_within_the_time_limit(gate: Gate) -> None:
    """The culprit's frame header claims the siblings' next bytes: they are garbage or never complete."""
    action = Action(slug="hostile", source=HOSTILE)
    cfg = dataclasses.replace(CFG, limits=Limits(action_timeout_s=3.0, flow_timeout_s=20.0))
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("culprit", "half_frame"), [(s, "ok") for s in SIBS])
        gate.release("culprit", "culprit-go")
        await wait_for_condition(lambda: "culprit-go" in gate.answered)
        gate.release(*SIBS)
        got = [await lead] + [await t for t in rest]
        kinds = [kind(x) for x in got]
        assert all(k in ("protocol_error", "worker_lost", "timeout") for k in kinds), kinds
        await other_tenant_ok(r, gate, "o-after")
        await next_flow_ok(r, gate, action, "next")
        await settled(r)


# -- a co-runner that holds the CPU or floods ----------------------------------------------------


@pytest.mark.parametrize("mode, limits, culprit_kinds", [
    # The loop the siblings share stops: the first timer to fire names its execution (the supervisor
    # cannot tell which one computes); every flow is answered within the action's time limit.
    ("spin", Limits(action_timeout_s=2.0, flow_timeout_s=20.0), {"timeout", "worker_lost"}),
    ("block", Limits(action_timeout_s=2.0, flow_timeout_s=20.0), {"timeout", "worker_lost"}),
    # Per-execution limits hit the execution that broke them.
    ("log_flood", Limits(action_timeout_s=6.0, flow_timeout_s=20.0, max_output_bytes=200_000), {"output_limit"}),
    ("call_flood", Limits(action_timeout_s=6.0, flow_timeout_s=20.0), {"output_limit"}),
])
async def test_a_joiner_that_computes_or_floods_ends_every_flow_in_its_worker_with_a_clear_kind(
        gate: Gate, mode: str, limits: Limits, culprit_kinds: set[str]) -> None:
    """The culprit joins last (not the lead): the siblings beside it are bounded by their own limits."""
    action = Action(slug="hostile", source=HOSTILE)
    async with make_runner(dataclasses.replace(CFG, limits=limits)) as r:
        await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("s0", "ok"), [("s1", "ok"), ("culprit", mode)])
        if mode in ("spin", "block"):
            # The culprit's marker fetch is answered, then it stops the loop; only then do the
            # siblings' replies come, to a worker that no longer reads them.
            gate.release("culprit", "culprit-go")
            await wait_for_condition(lambda: "culprit-go" in gate.answered)
            gate.release("s0", "s1")
            await other_tenant_ok(r, gate, "o-during")
            culprit = await rest[1]
        else:
            gate.release("culprit")           # it floods while s0 and s1 still wait on the gate
            await other_tenant_ok(r, gate, "o-during")
            culprit = await rest[1]
            gate.release("s0", "s1")
        sibs = [await lead, await rest[0]]
        assert kind(culprit) in culprit_kinds, culprit.denial
        kinds = sorted(kind(s) for s in sibs)
        if culprit_kinds == {"output_limit"}:
            assert kinds == ["worker_lost", "worker_lost"], [s.denial for s in sibs]
        else:
            # The first timer to fire names its execution (the lead's: it started first), the others
            # are lost with it; a sibling whose reply the worker read before it stopped may finish.
            every = [kind(x) for x in [culprit, *sibs]]
            killed = sorted(k for k in every if k != "allowed")
            assert killed == ["timeout"] + ["worker_lost"] * (len(killed) - 1), every
            assert kind(culprit) != "allowed"
        for name, res in zip(["culprit", "s0", "s1"], [culprit, *sibs]):
            own_only(res, name, ["culprit", "s0", "s1"])
        await other_tenant_ok(r, gate, "o-after")
        await next_flow_ok(r, gate, action, "next")
        await replaced(r, culprit, *sibs)
        await settled(r)


async def test_a_joiner_over_the_shared_memory_cap_ends_with_memory_limit_then_a_fresh_worker_serves(
        gate: Gate) -> None:
    action = Action(slug="hostile", source=HOSTILE)
    cfg = dataclasses.replace(CFG, limits=Limits(action_timeout_s=10.0, flow_timeout_s=20.0, memory_mb=96))
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("s0", "ok"), [("s1", "ok"), ("culprit", "memory")])
        gate.release("culprit")
        culprit = await rest[1]
        assert kind(culprit) == "memory_limit", culprit.denial
        gate.release("s0", "s1")
        sibs = [await lead, await rest[0]]
        # A caught MemoryError fails the culprit alone (the others finish); an OOM kill names nobody.
        assert all(kind(s) in ("allowed", "memory_limit", "worker_lost") for s in sibs), [s.denial for s in sibs]
        for name, res in zip(["s0", "s1"], sibs):
            own_only(res, name, ["culprit", "s0", "s1"])
        await other_tenant_ok(r, gate, "o-after")
        await next_flow_ok(r, gate, action, "next")
        await replaced(r, culprit, *sibs)
        await settled(r)


# -- from outside: the caller cancels, the process is killed -------------------------------------


async def test_a_cancellation_storm_leaks_no_worker_holder_or_join_waiter(gate: Gate) -> None:
    action = Action(slug="hostile", source=HOSTILE)
    cfg = dataclasses.replace(CFG, limits=Limits(action_timeout_s=4.0, flow_timeout_s=20.0, co_run=4))
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("c0", "ok"), [("c1", "ok"), ("c2", "ok"), ("c3", "ok")])
        # More flows than the worker takes: they queue for the tenant's only worker slot.
        queued = [asyncio.ensure_future(flow(r, action, ev(gate, f"q{i}"))) for i in range(8)]
        await wait_for_condition(lambda: r.stats()["waiting"] + r.stats()["co_run_waiting"] >= 1)
        for t in [lead, *rest, *queued]:
            t.cancel()
        for t in [lead, *rest, *queued]:
            with pytest.raises(asyncio.CancelledError):
                await t
        await other_tenant_ok(r, gate, "o-during")
        gate.release("c0", "c1", "c2", "c3", *(f"q{i}" for i in range(8)))
        await settled(r)
        await next_flow_ok(r, gate, action, "next")
        # And again, cancelled while parked with nothing released: their own timers end them.
        lead, rest = await parked(r, gate, action, ("d0", "ok"), [("d1", "ok"), ("d2", "ok")])
        for t in [lead, *rest]:
            t.cancel()
        await asyncio.gather(lead, *rest, return_exceptions=True)
        await settled(r)
        await next_flow_ok(r, gate, action, "next2")
        await settled(r)


async def test_a_co_running_worker_killed_from_outside_ends_all_its_flows_with_worker_crash(gate: Gate) -> None:
    action = Action(slug="hostile", source=HOSTILE)
    async with make_runner(CFG) as r:
        pid = await warm(r, gate, action)
        lead, rest = await parked(r, gate, action, ("k0", "ok"), [("k1", "ok"), ("k2", "ok"), ("k3", "ok")])
        assert pid in r.worker_pids
        os.kill(pid, signal.SIGKILL)      # that worker only (the other tenant's spare stays)
        got = [await lead] + [await t for t in rest]
        assert [kind(x) for x in got] == ["worker_crash"] * 4, [x.denial for x in got]
        assert all("SIGKILL" in x.denial["reason"] for x in got), [x.denial for x in got]
        await other_tenant_ok(r, gate, "o-after")
        await next_flow_ok(r, gate, action, "next")
        await replaced(r, *got)
        await settled(r)


FANOUT = '''
import asyncio

async def on_execute(event, api):
    me = event.user.user_id
    await asyncio.gather(*(api.fetch(event.url + "/hold?k=" + me + "-" + str(i)) for i in range(8)))
    api.state.set("after", me)
'''


async def test_a_tenant_saturating_its_fetch_slots_leaves_another_tenants_fetches_alone(gate: Gate) -> None:
    """Co-runners of tenant t fill its fetch slots and queue: tenant t2's fetches are served meanwhile."""
    action = Action(slug="fan", source=FANOUT)
    fetch = FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=15.0, max_concurrent_per_tenant=8,
                        max_queued_per_tenant=64)
    async with make_runner(dataclasses.replace(CFG, fetch=fetch)) as r:
        gate.release(*(f"warm-{i}" for i in range(8)))
        assert (await flow(r, action, ev(gate, "warm"))).allowed
        flows = [asyncio.ensure_future(flow(r, action, ev(gate, "f0")))]
        await wait_for_condition(lambda: gate.count("f0-") == 8)      # t's 8 slots are all held
        flows += [asyncio.ensure_future(flow(r, action, ev(gate, f"f{i}"))) for i in range(1, 4)]
        await wait_for_condition(lambda: r.stats()["co_runs"] >= 3)   # they joined; their fetches queue
        assert gate.count("f") == 8
        for i in range(3):
            await other_tenant_ok(r, gate, f"o{i}")
        gate.release(*(f"f{i}-{j}" for i in range(4) for j in range(8)))
        got = [await t for t in flows]
        assert all(x.allowed for x in got), [x.denial for x in got]
        assert [x.state["fan"]["after"] for x in got] == ["f0", "f1", "f2", "f3"]
        await settled(r)


async def test_a_flow_cancelled_just_as_it_is_handed_a_busy_worker_does_not_keep_that_worker_held(
        gate: Gate) -> None:
    """Cancellation (a caller timing out, a client hanging up) can land in the loop pass of the hand-over.

    The timing is pinned by cancelling the joiners from inside the hand-over itself
    (``CoRunners._parked``), right after it gave them the worker: the window a caller's cancellation
    can land in on its own, under load, made deterministic.
    """
    action = Action(slug="hostile", source=HOSTILE)
    cfg = dataclasses.replace(CFG, co_run_wait_ms=15_000.0, queue_timeout_s=3.0)
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        lead = asyncio.ensure_future(flow(r, action, ev(gate, "lead", "nap", nap=3.0)))
        await wait_for_condition(lambda: gate.asked("lead"))
        co = r._engine.co
        (w,) = list(co._holders)
        gate.release("lead")
        await wait_for_condition(lambda: w._running is not None and w._running.fetching == 0)   # napping
        joiners = [asyncio.ensure_future(flow(r, action, ev(gate, f"j{i}"))) for i in range(2)]
        await wait_for_condition(lambda: r.stats()["co_run_waiting"] == 2)    # waiting for the lead to park
        parked_once = co._parked

        def hand_over_then_cancel(handle: Any) -> None:
            parked_once(handle)
            for t in joiners:
                t.cancel()

        co._parked = hand_over_then_cancel
        w.on_park = hand_over_then_cancel
        await wait_for_condition(lambda: all(t.done() for t in joiners))   # the lead parked on its 2nd fetch
        assert all(t.cancelled() for t in joiners)
        gate.release("lead-2")
        res = await lead
        assert res.allowed, res.denial
        gate.release("next")
        nxt = await flow(r, action, ev(gate, "next"))     # the tenant's next flow gets a worker
        assert nxt.allowed, (nxt.denial, r.stats()["busy"], co.holders(w))
        await settled(r)                                  # and the books are back to zero


async def test_joiners_queued_against_two_workers_room_never_put_one_worker_over_co_run(gate: Gate) -> None:
    action = Action(slug="hostile", source=HOSTILE, limits={"co_run": 2})
    cfg = dataclasses.replace(CFG, max_workers=3, max_busy_per_tenant=2, co_run_wait_ms=15_000.0)
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        co = r._engine.co
        pairs = []
        for w in ("a", "b"):  # two workers of the action, each full (co_run=2): a0+a1, b0+b1
            lead, (second,) = await parked(r, gate, action, (f"{w}0", "nap"), [(f"{w}1", "ok")])
            pairs.append((lead, second))
        handles = list(co._holders)
        assert len(handles) == 2 and all(h.running == 2 for h in handles)
        gate.release("a1", "b1")
        for _, second in pairs:
            res = await second
            assert res.allowed, res.denial
        gate.release("a0", "b0")   # each lead now naps: one execution per worker, not waiting on a fetch
        await wait_for_condition(lambda: all(h.running == 1 and h._running is not None and h._running.fetching == 0
                                             for h in handles))
        joiners = [asyncio.ensure_future(flow(r, action, ev(gate, f"w{i}"))) for i in range(2)]
        await wait_for_condition(lambda: r.stats()["co_run_waiting"] == 2)   # room: one in each worker
        peak = 0

        def seen() -> bool:
            nonlocal peak
            peak = max([peak] + [h.running for h in handles])
            return gate.asked("w0", "w1")

        await wait_for_condition(seen)          # a lead parked again and the joiners were handed a worker
        gate.release("a0-2", "b0-2", "w0", "w1")
        got = [await lead for lead, _ in pairs] + [await t for t in joiners]
        assert all(x.allowed for x in got), [x.denial for x in got]
        await settled(r)
        assert peak <= 2, f"a worker ran {peak} executions with co_run=2"


async def test_only_flows_of_the_same_tenant_and_action_identity_ever_join(gate: Gate) -> None:
    """Same source, another tenant or other secrets: another worker, never a co-runner of the parked one."""
    action = Action(slug="hostile", source=HOSTILE)
    other_secrets = Action(slug="hostile", source=HOSTILE, secrets={"K": "other"})
    cfg = dataclasses.replace(CFG, max_workers=3, max_busy_per_tenant=2)
    async with make_runner(cfg) as r:
        pid = await warm(r, gate, action)
        lead = asyncio.ensure_future(flow(r, action, ev(gate, "lead")))
        await wait_for_condition(lambda: gate.asked("lead"))
        outsiders = [asyncio.ensure_future(flow(r, action, ev(gate, "t2-user"), tenant="t2")),
                     asyncio.ensure_future(flow(r, other_secrets, ev(gate, "secret-user")))]
        await wait_for_condition(lambda: gate.asked("t2-user", "secret-user"))
        assert r.stats()["co_runs"] == 0
        gate.release("lead", "t2-user", "secret-user")
        got = [await lead] + [await t for t in outsiders]
        assert all(x.allowed for x in got), [x.denial for x in got]
        assert got[0].state["hostile"]["pid"] == pid
        assert len({x.state["hostile"]["pid"] for x in got}) == 3
        for name, res in zip(["lead", "t2-user", "secret-user"], got):
            own_only(res, name, ["lead", "t2-user", "secret-user"])
        await settled(r)


BUSY_BEHIND_A_FETCH = '''
import asyncio

async def on_execute(event, api):
    me = event.user.user_id
    api.state.set("me", me)
    if event.user.mode == "decoy":   # a fetch left in flight makes the worker look parked; then it computes
        await api.fetch(event.url + "/hold?k=" + me)
        asyncio.ensure_future(api.fetch(event.url + "/hold?k=" + me + "-decoy"))
        await asyncio.sleep(0)
        while True:
            pass
    await api.fetch(event.url + "/hold?k=" + me)
    api.state.set("after", me)
'''


async def test_joiners_drawn_to_a_worker_that_computes_behind_a_decoy_fetch_are_answered_in_its_time_limit(
        gate: Gate) -> None:
    """The supervisor sees a fetch in its hands and lets others join; the loop is taken: all end at the limit."""
    action = Action(slug="decoy", source=BUSY_BEHIND_A_FETCH)
    cfg = dataclasses.replace(CFG, limits=Limits(action_timeout_s=2.5, flow_timeout_s=20.0))
    async with make_runner(cfg) as r:
        gate.release("warm")
        assert (await flow(r, action, ev(gate, "warm"))).allowed
        culprit = asyncio.ensure_future(flow(r, action, ev(gate, "culprit", "decoy")))
        await wait_for_condition(lambda: gate.asked("culprit"))
        gate.release("culprit")
        await wait_for_condition(lambda: gate.asked("culprit-decoy"))    # it computes from here on
        joined = r.stats()["co_runs"]
        drawn = [asyncio.ensure_future(flow(r, action, ev(gate, f"j{i}"))) for i in range(3)]
        await other_tenant_ok(r, gate, "o-during")
        got = [await culprit] + [await t for t in drawn]
        kinds = [kind(x) for x in got]
        # They joined (the decoy stays in the supervisor's hands) a worker whose loop never reads their
        # requests: lost with it at the culprit's limit (its decoy fetch is cut there too), never hung.
        assert r.stats()["co_runs"] - joined == 3
        assert kinds[0] in ("timeout", "http_fetch_timeout") and kinds[1:] == ["worker_lost"] * 3, kinds
        assert got[0].state.get("decoy") == {"me": "culprit"} and all(not x.state for x in got[1:]), got
        await other_tenant_ok(r, gate, "o-after")
        await settled(r)


async def test_flows_cancelled_while_waiting_to_join_leave_no_waiter_behind(gate: Gate) -> None:
    action = Action(slug="hostile", source=HOSTILE)
    cfg = dataclasses.replace(CFG, co_run_wait_ms=15_000.0)
    async with make_runner(cfg) as r:
        await warm(r, gate, action)
        lead = asyncio.ensure_future(flow(r, action, ev(gate, "lead", "nap", nap=3.0)))
        await wait_for_condition(lambda: gate.asked("lead"))
        (w,) = list(r._engine.co._holders)
        gate.release("lead")
        await wait_for_condition(lambda: w._running is not None and w._running.fetching == 0)   # napping
        waiters = [asyncio.ensure_future(flow(r, action, ev(gate, f"j{i}"))) for i in range(5)]
        await wait_for_condition(lambda: r.stats()["co_run_waiting"] == 5)
        for t in waiters:
            t.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert all(t.cancelled() for t in waiters)
        assert r.stats()["co_run_waiting"] == 0
        await wait_for_condition(lambda: gate.asked("lead-2"))   # it parks again: nobody is handed the worker
        assert r.stats()["co_runs"] == 0 and r._engine.co.holders(w) == 1
        gate.release("lead-2")
        assert (await lead).allowed
        await settled(r)
        await next_flow_ok(r, gate, action, "next")
        await settled(r)
