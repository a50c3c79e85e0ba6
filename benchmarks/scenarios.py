"""actionpool itself, measured on the workloads the baselines stand in for.

    S1  trivial post-login action (state.set, log, setCustomClaim), one client: latency
    S2  the same, 64 flows in flight on 2 workers: throughput (against pebble's)
    S3  a flow of three such actions: latency
    S4  an action awaiting a fetch of a 127.0.0.1 server that answers after 50 ms, N flows at
        once: throughput, peak workers, supervisor RSS and supervisor + workers RSS
    S5  cold start (no idle worker -> finished flow), and a timeout kill -> next flow finished
    S6  RSS/USS of idle warm workers, a pool of 2 and a pool of many
    S7  many tenants (300 x 1-3 actions, Zipf 1.1 traffic), 64 in flight, default config: the
        steady state after a warm-up with the same traffic (throughput against S2's single action)
    S8  the same with a share of flows from one tenant whose action spins until its timeout:
        the normal flows' latency (against S7's)
    S9  right after S7, in the same runner: the first execution of a never-seen action of a new
        tenant, one at a time (a cold start in the steady state, not on a fresh runner)
    S7 open loop  right after S7, in the same runner: S7's mix with Poisson arrivals at half the
        capacity S7 measured, latency from each flow's scheduled start (no coordinated omission)
    S10 warm start: a restarted runner's first flows of S7's mix, with ``Runner.prewarm`` (hottest
        first by run counts of an earlier plan, extra workers for the hottest by their share of the
        64 flows in flight) against without, A/B interleaved

Every await is bounded by the phase deadline; a flow that is denied when it
should be allowed fails its row (with the first denial quoted) but the
figures of the others are still reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, AsyncIterator, NamedTuple

import psutil

from ._harness import (
    Deadline, PhaseTimeout, Recorder, RssSampler, async_closed_loop, descendants, memory_full, raise_nofile_limit,
)
from ._stats import mib, summarize
from .baselines import EVENT

TENANT = "t1"
TRIGGER = "post-login"

SRC_TRIVIAL = '''
def on_execute_post_login(event, api):
    api.state.set("tier", "enterprise")
    api.log("info", "tagged account tier")
    api.session.setCustomClaim("tier", "enterprise")
'''

SRC_TRIVIAL_JS = """
api.state.set('tier', 'enterprise');
api.log('info', 'tagged account tier');
api.session.setCustomClaim('tier', 'enterprise');
"""  # S1's action as a JavaScript bare body (issue 11)

SRC_FETCH = '''
async def on_execute_post_login(event, api):
    res = await api.fetch(%r, {"method": "GET"})
    api.state.set("upstream_status", res["status"])
'''  # %% the upstream's URL

SRC_SPIN = '''
def on_execute_post_login(event, api):
    while True:
        pass
'''

CLOSE_TIMEOUT_S = 20.0


def _api() -> Any:
    """The runner's public API, imported late so a missing runner costs rows, not the harness."""
    from .. import runner

    return runner


def _config(knobs: dict[str, Any], **kw: Any) -> Any:
    rn = _api()
    # --runner KEY=VALUE (A/B of a default, e.g. worker_nice=0 or max_running=16); a scenario's own settings win.
    cfg = rn.RunnerConfig(**{**knobs.get("runner", {}), **kw})
    if knobs.get("sandbox"):
        cfg = dataclasses.replace(cfg, sandbox=dataclasses.replace(cfg.sandbox, mode=knobs["sandbox"]))
    return cfg


@contextlib.asynccontextmanager
async def _runner(cfg: Any, deadline: Deadline) -> AsyncIterator[Any]:
    """A started Runner whose start and close are both bounded (a benchmark must never hang)."""
    r = _api().Runner(cfg)
    try:
        await asyncio.wait_for(r.start(), deadline.left("runner start"))
        yield r
    finally:
        await asyncio.wait_for(r.close(), CLOSE_TIMEOUT_S)


def _leaked(exclude: frozenset[int] = frozenset()) -> int:
    """Descendants still alive shortly after a Runner closed: workers close() failed to reap."""
    left = descendants(exclude)
    _, alive = psutil.wait_procs(left, timeout=2)
    return len(alive)


def _describe_failure(x: Any) -> str:
    if isinstance(x, BaseException):
        return f"{type(x).__name__}: {x}"[:200]
    d = getattr(x, "denial", None) or {}
    return f"denied kind={d.get('kind')!r} reason={str(d.get('reason'))[:160]!r}"


def _fill(row: dict[str, Any], lat: list[float], elapsed: float, results: list[Any], expect: str = "allow") -> None:
    """Summarize a closed loop into ``row``; any flow that did not end in ``expect`` fails the row."""
    bad = [x for x in results if isinstance(x, BaseException) or getattr(x, "outcome", None) != expect]
    if len(bad) < len(results):
        row.update(summarize(lat, elapsed))
    row["extra"]["flows"] = len(results)
    if bad:
        row["extra"]["failed_flows"] = len(bad)
        row["error"] = f"{len(bad)}/{len(results)} flows not {expect}, first: {_describe_failure(bad[0])}"


async def _flows(r: Any, actions: list[Any], n: int, concurrency: int,
                 deadline: Deadline) -> tuple[list[float], float, list[Any]]:
    def one(_: int) -> Any:
        return r.run_flow(trigger=TRIGGER, actions=actions, event=EVENT, tenant=TENANT)

    return await async_closed_loop(one, n, concurrency, deadline.left("flows"))


async def _warm(r: Any, actions: list[Any], deadline: Deadline, n: int = 20) -> dict[str, Any]:
    """Run a few flows before the clock; check once that the api calls really took effect."""
    _, _, results = await _flows(r, actions, n, 2, deadline)
    bad = [x for x in results if isinstance(x, BaseException) or x.outcome != "allow"]
    if bad:
        raise RuntimeError(f"warm-up: {len(bad)}/{n} flows failed, first: {_describe_failure(bad[0])}")
    d = results[-1].to_dict()
    if "enterprise" not in json.dumps(d.get("state")) or "enterprise" not in json.dumps(d.get("claims")):
        raise RuntimeError(f"warm-up: the action's state/claim did not land: state={d.get('state')!r:.120}")
    return d


def _run(coro_fn: Any, knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(knobs, rec, deadline), deadline.left("phase")))


def _trivial(slug: str = "tag") -> Any:
    return _api().Action(slug=slug, source=SRC_TRIVIAL)


# -- S1, S2, S3 ----------------------------------------------------------------------------------


async def _s1(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    with rec.row("s1.latency") as row:
        actions = [_trivial()]
        async with _runner(_config(knobs, pool_size=2, max_workers=2), deadline) as r:
            await _warm(r, actions, deadline)
            _fill(row, *await _flows(r, actions, knobs["iterations"], 1, deadline))
            row["extra"]["stats"] = r.stats()
            row["extra"]["sandbox"] = r.sandbox_report
        row["extra"]["leaked_processes"] = _leaked()
    with rec.row("s1.latency_js") as row:
        actions = [_api().Action(slug="tag", source=SRC_TRIVIAL_JS, language="js")]
        async with _runner(_config(knobs, pool_size=2, max_workers=2), deadline) as r:
            await _warm(r, actions, deadline)
            _fill(row, *await _flows(r, actions, knobs["iterations"], 1, deadline))
        row["extra"]["leaked_processes"] = _leaked()


async def _s2(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    with rec.row("s2.throughput") as row:
        actions = [_trivial()]
        # One tenant against the 2-process baselines: it may hold the whole pool (by default a tenant
        # never holds every worker, so that another tenant is served within a start).
        async with _runner(_config(knobs, pool_size=2, max_workers=2, max_busy_per_tenant=2), deadline) as r:
            await _warm(r, actions, deadline)
            _fill(row, *await _flows(r, actions, knobs["tasks"], knobs["concurrency"], deadline))
            row["extra"]["stats"] = r.stats()
        row["extra"]["leaked_processes"] = _leaked()


async def _s3(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    with rec.row("s3.latency") as row:
        actions = [_trivial("tag-a"), _trivial("tag-b"), _trivial("tag-c")]
        # Three actions are three owners (a worker belongs to one action), so the working set is 3 workers.
        async with _runner(_config(knobs, pool_size=3, max_workers=3), deadline) as r:
            await _warm(r, actions, deadline)
            _fill(row, *await _flows(r, actions, knobs["iterations"], 1, deadline))
            row["extra"]["stats"] = r.stats()
        row["extra"]["leaked_processes"] = _leaked()


def phase_s1(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s1, knobs, rec, deadline)


def phase_s2(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s2, knobs, rec, deadline)


def phase_s3(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s3, knobs, rec, deadline)


# -- S4: I/O-bound flows -------------------------------------------------------------------------


class _Upstream:
    """The delayed HTTP server, in a child process; stopped by closing its stdin."""

    def __init__(self, delay_s: float, deadline: Deadline) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "actionpool.benchmarks._http_server", "--delay", str(delay_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=min(10.0, deadline.left("http server start"))):
            self.stop()
            raise PhaseTimeout("the local HTTP server did not report its port within 10 s")
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"the local HTTP server failed to start: {line!r}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}/score"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


async def _peak_live(r: Any, stop: asyncio.Event, out: dict[str, int]) -> None:
    """Highest ``stats()['live']`` seen while flows run (stats() is a cheap dict build)."""
    while not stop.is_set():
        s = r.stats()
        out["live"] = max(out.get("live", 0), int(s.get("live", 0)) + int(s.get("starting", 0)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.005)


async def _io_round(r: Any, row: dict[str, Any], actions: list[Any], n: int, deadline: Deadline,
                    exclude: frozenset[int], delay_s: float, *, sample_rss: bool = True) -> None:
    """``n`` flows at once, each awaiting one fetch; ``sample_rss=False`` keeps the supervisor's CPU clean.

    The supervisor's process CPU over the round, divided by the fetches, is the row's
    ``supervisor_cpu_us_per_fetch`` (it includes the flow around the fetch: the whole cost of an
    I/O-bound flow to the shared supervisor). The RSS sampler walks /proc on a thread of this
    process, so rows that report CPU run without it.
    """
    spawned_before = int(r.stats().get("spawned", 0))
    co_before = int(r.stats().get("co_runs", 0))
    stop = asyncio.Event()
    peak: dict[str, int] = {}
    poller = asyncio.ensure_future(_peak_live(r, stop, peak))
    rss = RssSampler(0.1, exclude) if sample_rss else contextlib.nullcontext()
    with rss:
        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            result = await _flows(r, actions, n, n, deadline)
        finally:
            cpu = time.process_time() - cpu0
            stop.set()
            await poller
    _fill(row, *result)
    ok = [x for x in result[2] if not isinstance(x, BaseException) and x.outcome == "allow"]
    if ok and ok[0].to_dict()["state"].get("fetch", {}).get("upstream_status") != 200:
        row["error"] = row["error"] or f"upstream status not 200: {ok[0].to_dict()['state']!r:.120}"
    s = r.stats()
    row["extra"].update({
        "upstream_delay_ms": delay_s * 1000,
        "peak_live_workers": peak.get("live", 0),
        "workers_spawned": int(s.get("spawned", 0)) - spawned_before,  # a "warm" round that spawns was not warm
        "co_runs": int(s.get("co_runs", 0)) - co_before,   # flows that joined a busy worker (Limits.co_run)
        "supervisor_cpu_s": round(cpu, 4),
        "supervisor_cpu_us_per_fetch": round(cpu / max(len(ok), 1) * 1e6, 1),
        "stats": s,
    })
    note = (f"peak workers {peak.get('live', 0)} ({row['extra']['workers_spawned']} spawned), "
            f"{row['extra']['co_runs']} of {n} flows co-ran")
    if isinstance(rss, RssSampler):
        row["extra"].update({
            "peak_processes": rss.peak_children,
            "supervisor_rss_mib_peak": round(mib(rss.peak_supervisor), 1),
            "total_rss_mib_peak": round(mib(rss.peak_total), 1),
            "rss_samples": rss.samples,
        })
        note += (f", supervisor RSS {mib(rss.peak_supervisor):.0f} MiB, "
                 f"supervisor+workers RSS {mib(rss.peak_total):.0f} MiB (peaks)")
    else:
        note += f", supervisor CPU {row['extra']['supervisor_cpu_us_per_fetch']:.0f} us per fetch"
    row["note"] = note
    if "p50_ms" in row:
        # Against an ideal runner, every flow would take the upstream's delay and no more.
        row["extra"]["p50_over_upstream_delay"] = row["p50_ms"] / (delay_s * 1000)
        row["extra"]["throughput_over_ideal"] = row["throughput_per_s"] / (n / delay_s)
        row["note"] = f"p50 {row['p50_ms'] / (delay_s * 1000):.1f}x the {delay_s * 1000:.0f} ms upstream; " + row["note"]


async def _aiohttp_floor(row: dict[str, Any], url: str, n: int, deadline: Deadline) -> None:
    """The floor of any Python client here: aiohttp alone, ``n`` concurrent GETs to the same upstream."""
    from .fetch_floor import aiohttp_floor

    got = await asyncio.wait_for(aiohttp_floor(url, n), deadline.left("aiohttp floor"))
    # The same with a connection per request: what api.fetch does to S4's upstream (127.0.0.1 is non-public).
    closing = await asyncio.wait_for(aiohttp_floor(url, n, close=True), deadline.left("aiohttp floor"))
    row.update({"n": n, "throughput_per_s": got["req_per_s"]})
    row["extra"].update({"cpu_s": round(got["cpu_s"], 4), "cpu_us_per_request": round(got["cpu_s"] / n * 1e6, 1),
                         "rounds": got["rounds"], "close_req_per_s": round(closing["req_per_s"], 1),
                         "close_cpu_us_per_request": round(closing["cpu_s"] / n * 1e6, 1)})
    row["note"] = (f"{n} concurrent GETs, keep-alive, no runner: {got['cpu_s']:.3f} s CPU "
                   f"({got['cpu_s'] / n * 1e6:.0f} us per request); Connection: close (S4's path): "
                   f"{closing['req_per_s']:,.0f} req/s, {closing['cpu_s'] / n * 1e6:.0f} us per request; "
                   f"medians of {len(got['rounds'])} rounds")


async def _s4(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    nofile = raise_nofile_limit()
    n = knobs["io_flows"]
    small = min(knobs.get("io_flows_small", 50), n)
    delay = knobs["io_delay_s"]
    upstream: _Upstream | None = None
    try:
        upstream = _Upstream(delay, deadline)
        with rec.row("s4.aiohttp_floor") as row0:
            await _aiohttp_floor(row0, upstream.url, n, deadline)
        with rec.row("s4.io_cold") as row:
            rn = _api()
            exclude = frozenset({upstream.proc.pid})
            actions = [rn.Action(slug="fetch", source=SRC_FETCH % upstream.url)]
            # One tenant has all N flows in flight: its fetch slots and its share of the workers must not be
            # what is measured. The upstream is 127.0.0.1, a non-public address the operator listed, so every
            # fetch is sent "Connection: close" and opens a connection of its own (the floor row keeps them).
            fetch = rn.FetchConfig(allow_hosts=("127.0.0.1",), max_concurrent_per_tenant=max(n, 64))
            cfg = _config(knobs, max_workers=n, max_busy_per_tenant=n, fetch=fetch)
            row["extra"]["nofile_limit"] = nofile[0]
            async with _runner(cfg, deadline) as r:
                await _io_round(r, row, actions, n, deadline, exclude, delay)
                with rec.row("s4.io_warm") as row2:
                    row2["extra"]["nofile_limit"] = nofile[0]
                    await _io_round(r, row2, actions, n, deadline, exclude, delay, sample_rss=False)
                    procs = [psutil.Process(p) for p in r.worker_pids]
                    mem = await asyncio.get_running_loop().run_in_executor(None, memory_full, procs)
                    if mem:
                        uss = sum(m["uss"] for m in mem)
                        row2["extra"]["workers_uss_mib_total_after"] = round(mib(uss), 1)
                        row2["extra"]["supervisor_rss_mib_after"] = round(mib(psutil.Process().memory_info().rss), 1)
                        row2["note"] += f"; workers USS total {mib(uss):.0f} MiB after"
                with rec.row("s4.io_warm_small") as row3:
                    row3["extra"]["io_flows"] = small
                    await _io_round(r, row3, actions, small, deadline, exclude, delay, sample_rss=False)
            row["extra"]["leaked_processes"] = _leaked(exclude)
    finally:
        if upstream is not None:
            upstream.stop()
    for rid in ("s4.aiohttp_floor", "s4.io_cold", "s4.io_warm", "s4.io_warm_small"):
        if not any(r["id"] == rid for r in rec.rows):
            with rec.row(rid) as row:
                row["error"] = "not run: a round before it failed"


def phase_s4(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s4, knobs, rec, deadline)


# -- S5: cold start and replacement after a kill -------------------------------------------------


async def _s5(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    reps = knobs["cold_iterations"]
    with rec.row("s5.cold_start") as row:
        # A fresh Runner with pool_size=0 per sample: the flow itself must spawn its worker.
        # (Runner.start's sandbox probe worker is gone by then and is outside the clock.)
        actions = [_trivial()]
        lat, results, spawned = [], [], []
        t_all = time.perf_counter()
        for _ in range(reps):
            async with _runner(_config(knobs, pool_size=0, max_workers=1), deadline) as r:
                before = r.stats().get("spawned", 0)
                t0 = time.perf_counter()
                res = await asyncio.wait_for(
                    r.run_flow(trigger=TRIGGER, actions=actions, event=EVENT, tenant=TENANT), deadline.left("cold"))
                lat.append(time.perf_counter() - t0)
                results.append(res)
                spawned.append(r.stats().get("spawned", 0) - before)
        _fill(row, lat, time.perf_counter() - t_all, results)
        row.pop("throughput_per_s", None)  # includes runner start/close: not a rate of anything
        row["extra"]["workers_spawned_per_flow"] = spawned
        if any(s != 1 for s in spawned):
            row["error"] = row["error"] or f"expected one spawn per cold flow, saw {spawned}"
        row["extra"]["leaked_processes"] = _leaked()

    kill_lat: list[float] = []
    repl_lat: list[float] = []
    kills: list[Any] = []
    repls: list[Any] = []
    problem: str | None = None
    try:
        rn = _api()
        spin = rn.Action(slug="spin", source=SRC_SPIN, limits={"action_timeout_s": 0.2})
        actions = [_trivial()]
        async with _runner(_config(knobs, pool_size=1, max_workers=1), deadline) as r:
            await _warm(r, actions, deadline, n=3)
            before = dict(r.stats())
            for _ in range(reps):
                t0 = time.perf_counter()
                res = await asyncio.wait_for(r.run_flow(trigger=TRIGGER, actions=[spin], event=EVENT, tenant=TENANT),
                                             deadline.left("timeout kill"))
                t1 = time.perf_counter()
                res2 = await asyncio.wait_for(r.run_flow(trigger=TRIGGER, actions=actions, event=EVENT,
                                                         tenant=TENANT), deadline.left("replacement"))
                t2 = time.perf_counter()
                kill_lat.append(t1 - t0)
                repl_lat.append(t2 - t1)
                kills.append(res)
                repls.append(res2)
            after = dict(r.stats())
    except Exception as exc:  # reported on both rows below
        problem = f"{type(exc).__name__}: {exc}"[:300]
    with rec.row("s5.timeout_kill") as row:
        if kill_lat:
            _fill(row, kill_lat, sum(kill_lat), kills, expect="deny")
            row.pop("throughput_per_s", None)
            kinds = sorted({str((k.denial or {}).get("kind")) for k in kills if not isinstance(k, BaseException)})
            row["extra"]["denial_kinds"] = kinds
            row["extra"]["action_timeout_ms"] = 200
            row["note"] = f"denial kind {', '.join(kinds)}; includes the 200 ms budget"
        row["error"] = row.get("error") or problem
    with rec.row("s5.replacement") as row:
        if repl_lat:
            _fill(row, repl_lat, sum(repl_lat), repls)
            row.pop("throughput_per_s", None)
            row["extra"]["stats_before"] = before
            row["extra"]["stats_after"] = after
            row["note"] = "kill -> replacement spawned -> trivial flow finished (max_workers=1)"
        row["error"] = row.get("error") or problem
        row["extra"]["leaked_processes"] = _leaked()


def phase_s5(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s5, knobs, rec, deadline)


# -- S6: memory of warm workers ------------------------------------------------------------------


async def _wait_idle(r: Any, want: int, deadline: Deadline) -> None:
    """Poll stats() until ``want`` workers are idle (each has said hello)."""
    while int(r.stats().get("idle", 0)) < want:
        if deadline.remaining() <= 0:
            raise PhaseTimeout(f"only {r.stats().get('idle', 0)} of {want} workers idle at the deadline")
        await asyncio.sleep(0.02)


async def _memory_row(row: dict[str, Any], knobs: dict[str, Any], pool: int, deadline: Deadline) -> None:
    t0 = time.perf_counter()
    async with _runner(_config(knobs, pool_size=pool, max_workers=pool), deadline) as r:
        await _wait_idle(r, pool, deadline)
        warm_s = time.perf_counter() - t0
        pids = set(r.worker_pids)
        kids = descendants()
        procs = [p for p in kids if p.pid in pids]
        others = [p for p in kids if p.pid not in pids]  # e.g. a fork template: part of the footprint
        mem = await asyncio.get_running_loop().run_in_executor(None, memory_full, procs)
        other_mem = await asyncio.get_running_loop().run_in_executor(None, memory_full, others)
        sup = psutil.Process().memory_full_info()
    row["extra"]["leaked_processes"] = _leaked()
    if not mem:
        raise RuntimeError(f"no worker memory could be read (pids {sorted(pids)[:5]}...)")
    rss = [m["rss"] for m in mem]
    uss = [m["uss"] for m in mem]
    pss = [m["pss"] for m in mem]
    row["n"] = len(mem)
    total_pss = getattr(sup, "pss", 0) + sum(pss) + sum(m["pss"] for m in other_mem)
    row["extra"].update({
        "workers": len(mem),
        "other_descendants": len(others),
        "other_descendants_rss_mib": round(mib(sum(m["rss"] for m in other_mem)), 1),
        "other_descendants_uss_mib": round(mib(sum(m["uss"] for m in other_mem)), 1),
        "worker_rss_mib_median": round(mib(statistics.median(rss)), 2),
        "worker_rss_mib_max": round(mib(max(rss)), 2),
        "worker_uss_mib_median": round(mib(statistics.median(uss)), 2),
        "worker_uss_mib_max": round(mib(max(uss)), 2),
        "worker_pss_mib_median": round(mib(statistics.median(pss)), 2),
        "workers_rss_mib_total": round(mib(sum(rss)), 1),
        "workers_uss_mib_total": round(mib(sum(uss)), 1),
        "supervisor_rss_mib": round(mib(sup.rss), 1),
        "supervisor_uss_mib": round(mib(sup.uss), 1),
        "total_rss_mib": round(mib(sup.rss + sum(rss) + sum(m["rss"] for m in other_mem)), 1),
        # PSS shares each shared page among its users: the sum is the honest total footprint.
        "total_pss_mib": round(mib(total_pss), 1),
        "start_to_all_idle_s": round(warm_s, 3),
    })
    row["note"] = (f"per worker RSS {mib(statistics.median(rss)):.1f} MiB, USS {mib(statistics.median(uss)):.1f} MiB "
                   f"(median); {len(mem)} workers: RSS {mib(sum(rss)):.0f} MiB, USS {mib(sum(uss)):.0f} MiB; "
                   f"supervisor RSS {mib(sup.rss):.0f} MiB; total PSS {mib(total_pss):.0f} MiB; all warm in {warm_s:.2f}s")


async def _s6(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    raise_nofile_limit()
    with rec.row("s6.memory_idle") as row:
        await _memory_row(row, knobs, 2, deadline)
    with rec.row("s6.memory_many") as row:
        await _memory_row(row, knobs, knobs["warm_workers"], deadline)


def phase_s6(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s6, knobs, rec, deadline)


# -- S7, S8, S9: many tenants, a spinning tenant, a cold start in the steady state ---------------

SRC_TENANT = '''
def on_execute_post_login(event, api):
    api.state.set("who", %r)
    api.session.setCustomClaim("tier", "enterprise")
'''  # %% "tenant/action": every action of the mix has its own source, hence its own workers


class _Done(NamedTuple):
    """What the many-tenant rows keep of a FlowResult: a tuple the collector untracks, not ~6 tracked objects.

    S7 keeps every measured flow's answer until the row is filled; kept whole, 3,000 results added ~18,000
    objects to every full collection of the very process being measured (the harness's own cost on the tail).
    """

    outcome: str
    denial: dict[str, Any] | None


def _mix(knobs: dict[str, Any]) -> Any:
    from ._tenants import TenantMix, parse_range

    return TenantMix(knobs["tenants"], parse_range(knobs["actions_per_tenant"]), knobs["zipf"], seed=7)


def _tenant_actions(mix: Any) -> list[list[Any]]:
    rn = _api()
    return [[rn.Action(slug=f"a{j}", source=SRC_TENANT % f"t{t}/a{j}") for j in range(n)]
            for t, n in enumerate(mix.per_tenant)]


async def _mixed_flows(r: Any, mix: Any, actions: list[list[Any]], n: int, seed: int, concurrency: int,
                       deadline: Deadline, spin: Any = None, spin_share: float = 0.0) -> dict[str, Any]:
    """A closed loop over the mix; flow ``i`` is a spinning one with probability ``spin_share``.

    Returns latencies (seconds) and results split into normal and spinning flows.
    """
    import random

    plan = mix.plan(n, seed)
    rng = random.Random(seed + 1)
    spinning = [spin is not None and rng.random() < spin_share for _ in range(n)]
    lat: dict[int, float] = {}
    res: dict[int, Any] = {}

    async def one(i: int) -> Any:
        t0 = time.perf_counter()
        if spinning[i]:
            got = await r.run_flow(trigger=TRIGGER, actions=[spin], event=EVENT, tenant="spinner")
        else:
            t, a = plan[i]
            got = await r.run_flow(trigger=TRIGGER, actions=[actions[t][a]], event=EVENT, tenant=f"t{t}")
        lat[i] = time.perf_counter() - t0
        out = res[i] = _Done(got.outcome, got.denial)
        return out

    _, elapsed, _ = await async_closed_loop(one, n, concurrency, deadline.left("many-tenant flows"))
    normal = [i for i in range(n) if not spinning[i]]
    return {
        "elapsed": elapsed,
        "normal_lat": [lat[i] for i in normal if i in lat],
        "normal_res": [res.get(i, RuntimeError("no answer")) for i in normal],
        "spin_res": [res.get(i, RuntimeError("no answer")) for i in range(n) if spinning[i]],
    }


async def _warm_mix(r: Any, actions: list[list[Any]], mix: Any, n: int, concurrency: int, deadline: Deadline,
                    freeze: bool = True) -> None:
    """The steady state of a long-running gateway: every action ran once, then the traffic itself ran.

    Then the warm heap is frozen (``freeze``, from ``--no-freeze-heap``), as ``actionpool serve`` does
    once its prewarm is done: without it, a full GC pass of 55-113 ms lands in the measured traffic
    now and then and is the p99 by itself (runner/_heap.py).
    """
    every = [(t, a) for t, acts in enumerate(actions) for a in acts]

    def one(i: int) -> Any:
        t, a = every[i]
        return r.run_flow(trigger=TRIGGER, actions=[a], event=EVENT, tenant=f"t{t}")

    await async_closed_loop(one, len(every), concurrency, deadline.left("many-tenant warm-up"))
    await _mixed_flows(r, mix, actions, n, 100, concurrency, deadline)
    if freeze:
        _freeze()
    await asyncio.sleep(0.2)


def _freeze() -> int:
    """The warm heap out of the GC's full passes, as ``actionpool serve`` does after its prewarm (runner/_heap.py)."""
    from ..runner.hosting import freeze_heap

    return freeze_heap()


def _tenant_row(row: dict[str, Any], out: dict[str, Any], mix: Any, knobs: dict[str, Any], spawned: int) -> None:
    _fill(row, out["normal_lat"], out["elapsed"], out["normal_res"])
    row["extra"].update({"tenants": mix.tenants, "actions": mix.n_actions, "zipf": mix.zipf,
                         "actions_per_tenant": knobs["actions_per_tenant"], "workers_spawned": spawned})
    row["note"] = f"{mix.tenants} tenants, {mix.n_actions} actions, zipf {mix.zipf:g}; {spawned} workers spawned"


async def _s7(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    raise_nofile_limit()
    mix = _mix(knobs)
    actions = _tenant_actions(mix)
    n, conc = knobs["many_tasks"], knobs["concurrency"]
    with rec.row("s7.many_tenants") as row:
        async with _runner(_config(knobs), deadline) as r:
            await _warm_mix(r, actions, mix, n, conc, deadline, knobs.get("freeze_heap", True))
            before = int(r.stats().get("spawned", 0))
            out = await _mixed_flows(r, mix, actions, n, 200, conc, deadline)
            _tenant_row(row, out, mix, knobs, int(r.stats().get("spawned", 0)) - before)
            row["extra"]["stats"] = r.stats()
            with rec.row("s7.open_loop") as row_open:
                if not row.get("throughput_per_s"):
                    raise RuntimeError("no S7 capacity to take half of: the closed loop failed")
                await _open_loop_row(r, row_open, mix, actions, knobs, row["throughput_per_s"], deadline)
            with rec.row("s9.cold_steady") as row9:
                await _cold_steady(r, row9, knobs, deadline)
        row["extra"]["leaked_processes"] = _leaked()


OPEN_LOOP_LOAD = 0.5          # share of S7's measured capacity the open loop offers
OPEN_LOOP_MAX_S = 20.0        # the open loop's schedule never runs longer than this


async def _open_loop_row(r: Any, row: dict[str, Any], mix: Any, actions: list[list[Any]], knobs: dict[str, Any],
                         capacity: float, deadline: Deadline) -> None:
    """S7's mix at half of S7's capacity, Poisson arrivals, latency from the scheduled start (p50/p99/p99.9)."""
    import random

    from ._open_loop import open_loop, poisson_offsets
    from ._stats import percentile

    rate = OPEN_LOOP_LOAD * capacity
    n = max(1, min(int(knobs["open_flows"]), int(rate * OPEN_LOOP_MAX_S)))
    plan = mix.plan(n, 300)
    offsets = poisson_offsets(rate, n, random.Random(301))
    spawned = int(r.stats().get("spawned", 0))
    await asyncio.sleep(0.2)   # S7's last releases settle: the open loop starts from the steady state

    async def one(i: int) -> Any:
        t, a = plan[i]
        got = await r.run_flow(trigger=TRIGGER, actions=[actions[t][a]], event=EVENT, tenant=f"t{t}")
        return _Done(got.outcome, got.denial)

    out = await open_loop(one, offsets, min(deadline.left("open loop"), OPEN_LOOP_MAX_S + 30.0))
    _fill(row, out.latencies, out.elapsed, out.results)
    ms = sorted(x * 1000 for x in out.latencies)
    lag = sorted(x * 1000 for x in out.start_lag)
    spawned = int(r.stats().get("spawned", 0)) - spawned
    if ms:
        row["extra"]["p999_ms"] = percentile(ms, 99.9)
    row["extra"].update({
        "offered_rate_per_s": rate, "capacity_per_s": capacity, "load": OPEN_LOOP_LOAD,
        "generator_start_lag_p99_ms": percentile(lag, 99) if lag else None,
        "max_in_flight": out.max_in_flight, "workers_spawned": spawned, "stats": r.stats(),
    })
    row["concurrency"] = out.max_in_flight
    row["note"] = (f"Poisson at {rate:.0f}/s ({OPEN_LOOP_LOAD:.0%} of S7's {capacity:.0f}/s), from scheduled start"
                   + (f"; p99.9 {row['extra']['p999_ms']:.1f} ms" if ms else "")
                   + f"; peak {out.max_in_flight} in flight, {spawned} workers spawned")


async def _cold_steady(r: Any, row: dict[str, Any], knobs: dict[str, Any], deadline: Deadline) -> None:
    """S9: the first execution of never-seen actions (of new tenants), one at a time, after S7's load."""
    rn = _api()
    await asyncio.sleep(0.5)  # let S7's last releases settle (as between two bursts of real traffic)
    row["extra"]["stats_before"] = r.stats()
    lat, results, spawned = [], [], []
    t_all = time.perf_counter()
    for k in range(knobs["cold_iterations"]):
        action = rn.Action(slug="fresh", source=SRC_TENANT % f"cold/{k}")
        before = int(r.stats().get("spawned", 0))
        t0 = time.perf_counter()
        res = await asyncio.wait_for(r.run_flow(trigger=TRIGGER, actions=[action], event=EVENT, tenant=f"cold{k}"),
                                     deadline.left("cold start in the steady state"))
        lat.append(time.perf_counter() - t0)
        results.append(res)
        spawned.append(int(r.stats().get("spawned", 0)) - before)
        await asyncio.sleep(0.2)  # samples apart: each sees the pool as traffic left it, spares replenished
    _fill(row, lat, time.perf_counter() - t_all, results)
    row.pop("throughput_per_s", None)
    row["extra"]["workers_spawned_per_flow"] = spawned
    row["extra"]["stats_after"] = r.stats()
    s = row["extra"]["stats_before"]
    row["note"] = (f"new tenant's new action after S7; pool then: {s.get('live')} live, {s.get('idle')} idle, "
                   f"{s.get('warm_unassigned')} unassigned")


async def _s8(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    raise_nofile_limit()
    rn = _api()
    mix = _mix(knobs)
    actions = _tenant_actions(mix)
    n, conc = knobs["many_tasks"], knobs["concurrency"]
    spin = rn.Action(slug="spin", source=SRC_SPIN, limits={"action_timeout_s": knobs["spin_timeout_s"]})
    with rec.row("s8.spinning_tenant") as row:
        async with _runner(_config(knobs), deadline) as r:
            await _warm_mix(r, actions, mix, n, conc, deadline, knobs.get("freeze_heap", True))
            before = int(r.stats().get("spawned", 0))
            out = await _mixed_flows(r, mix, actions, n, 200, conc, deadline, spin, knobs["spin_share"])
            _tenant_row(row, out, mix, knobs, int(r.stats().get("spawned", 0)) - before)
            kinds: dict[str, int] = {}
            for x in out["spin_res"]:
                k = "error" if isinstance(x, BaseException) else str((x.denial or {}).get("kind", "allow"))
                kinds[k] = kinds.get(k, 0) + 1
            row["extra"].update({"spin_flows": len(out["spin_res"]), "spin_outcomes": kinds,
                                 "spin_share": knobs["spin_share"], "spin_timeout_s": knobs["spin_timeout_s"],
                                 "stats": r.stats()})
            row["note"] += (f"; normal flows only; {len(out['spin_res'])} spinning flows of one tenant "
                            f"({knobs['spin_timeout_s']:g}s limit): {kinds}")
            if set(kinds) - {"timeout", "overloaded"}:
                row["error"] = row["error"] or f"spinning flows ended unexpectedly: {kinds}"
        row["extra"]["leaked_processes"] = _leaked()


def phase_s7(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s7, knobs, rec, deadline)


def phase_s8(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s8, knobs, rec, deadline)


# -- S10: warm start (a restarted runner's first flows, with and without prewarm) ------------------


async def _restart_round(knobs: dict[str, Any], mix: Any, actions: list[list[Any]], counts: dict[tuple[str, str], int],
                         prewarm: bool, deadline: Deadline) -> dict[str, Any]:
    """A fresh runner (default config), optionally prewarmed, then the first flows of S7's mix, 64 in flight."""
    n, conc = knobs["restart_flows"], knobs["concurrency"]
    out: dict[str, Any] = {}
    async with _runner(_config(knobs), deadline) as r:
        if prewarm:
            by_tenant = {f"t{t}": acts for t, acts in enumerate(actions)}
            t0 = time.perf_counter()
            rep = await asyncio.wait_for(r.prewarm(by_tenant, counts, concurrency=knobs["concurrency"]),
                                         deadline.left("prewarm"))
            out["prewarm_s"] = time.perf_counter() - t0
            out["prewarm"] = {"warmed": len(rep["warmed"]), "left": len(rep["left"]), "stopped": rep["stopped"]}
            if knobs.get("freeze_heap", True):
                out["prewarm"]["frozen_objects"] = _freeze()   # as `actionpool serve` does after its prewarm
        before = int(r.stats().get("spawned", 0))
        flows = await _mixed_flows(r, mix, actions, n, 400, conc, deadline)
        out.update(flows)
        out["spawned"] = int(r.stats().get("spawned", 0)) - before
    out["leaked"] = _leaked()
    return out


async def _s10(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    raise_nofile_limit()
    mix = _mix(knobs)
    actions = _tenant_actions(mix)
    # The run counts a replica recorded before its restart: the same traffic, an earlier stretch of it.
    counts: dict[tuple[str, str], int] = {}
    for t, a in mix.plan(knobs["many_tasks"], 50):
        key = (f"t{t}", actions[t][a].slug)
        counts[key] = counts.get(key, 0) + 1
    rounds: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    problem: str | None = None
    try:
        for k in range(knobs["restart_reps"]):
            # A/B interleaved, the order alternating: the machine's drift lands on both sides.
            for prewarm in ((False, True) if k % 2 == 0 else (True, False)):
                rounds[prewarm].append(await _restart_round(knobs, mix, actions, counts, prewarm, deadline))
    except Exception as exc:  # reported on both rows
        problem = f"{type(exc).__name__}: {exc}"[:300]
    for prewarm, row_id in ((False, "s10.restart_cold"), (True, "s10.restart_prewarm")):
        with rec.row(row_id) as row:
            got = rounds[prewarm]
            if got:
                lat = [x for g in got for x in g["normal_lat"]]
                res = [x for g in got for x in g["normal_res"]]
                _fill(row, lat, sum(g["elapsed"] for g in got), res)
                p99s = [summarize(g["normal_lat"])["p99_ms"] for g in got if g["normal_lat"]]
                row["extra"].update({
                    "rounds": len(got), "p99_ms_per_round": p99s,
                    "p99_ms_median_of_rounds": statistics.median(p99s) if p99s else None,
                    "workers_spawned_per_round": [g["spawned"] for g in got],
                    "leaked_processes": sum(g["leaked"] for g in got),
                    "flows_per_round": knobs["restart_flows"],
                })
                if prewarm:
                    row["extra"]["prewarm"] = [g["prewarm"] for g in got]
                    row["extra"]["prewarm_s"] = [round(g["prewarm_s"], 3) for g in got]
                row["note"] = (f"first {knobs['restart_flows']} flows of a restarted runner, "
                               + (f"prewarmed ({got[0]['prewarm']['warmed']} workers in {got[0]['prewarm_s']:.1f}s, "
                                  "hottest first)" if prewarm else "no prewarm")
                               + f"; workers spawned during the flows {[g['spawned'] for g in got]}"
                               + f"; p99 per round {[round(p, 1) for p in p99s]} ms")
            row["error"] = row.get("error") or problem


def phase_s10(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    _run(_s10, knobs, rec, deadline)
