"""CPU fairness and supervisor cost, measured quickly (issue 12; not part of ``actionpool bench``).

    python -m actionpool.benchmarks.fairness spin   [--budget-ms 50|0] [--demote idle|nice] ...
    python -m actionpool.benchmarks.fairness cost   [--flows 20000] [--concurrency 64] [--uvloop]

``spin``: normal tenants (one trivial action each) run a closed loop at
``--concurrency`` while one hostile tenant keeps ``--spinners`` flows in flight
whose action spins until its ``--spin-timeout-s``. Reports the normal flows'
throughput and p50/p99, and the spinners' share of flows. Run it with
``--budget-ms 0`` (no demotion) and with the default to see what demotion buys.

``cost``: S2-like (one hot trivial action, 2 workers, concurrency 64); reports
flows/s and the supervisor's own CPU time per flow (process CPU time of this
process divided by flows; the workers are other processes), optionally
under uvloop, optionally with a cProfile dump of the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from ._stats import summarize
from .baselines import EVENT
from .scenarios import SRC_SPIN, SRC_TRIVIAL

TRIGGER = "post-login"

SRC_SLEEP = '''
import time
def on_execute_post_login(event, api):
    time.sleep(3600)
'''  # holds a worker like a spinner, without the CPU: separates slot effects from CPU effects


def _api() -> Any:
    from .. import runner

    return runner


def _use_nice() -> None:
    """Demote with nice 19 instead of SCHED_IDLE (for comparison only)."""
    from ..runner import _cpu

    def demote(pid: int) -> None:
        for tid in _cpu._tasks(pid):
            os.setpriority(os.PRIO_PROCESS, tid, 19)

    def restore(pid: int) -> None:
        for tid in _cpu._tasks(pid):
            os.setpriority(os.PRIO_PROCESS, tid, 0)

    _cpu.demote, _cpu.restore = demote, restore


async def _spin(args: argparse.Namespace) -> dict[str, Any]:
    rn = _api()
    limits = rn.Limits(action_timeout_s=args.spin_timeout_s, flow_timeout_s=args.spin_timeout_s + 10)
    cfg = rn.RunnerConfig(pool_size=2, max_workers=args.max_workers, cpu_budget_ms=args.budget_ms, limits=limits,
                          queue_timeout_s=30.0, max_queue=10_000)
    normal = [rn.Action(slug="tag", source=SRC_TRIVIAL) for _ in range(args.tenants)]
    spinner = rn.Action(slug="spin", source=SRC_SPIN if args.hog == "spin" else SRC_SLEEP)
    stop_at = 0.0
    lat: list[float] = []
    counts = {"normal": 0, "spin": 0, "normal_failed": 0}

    async with rn.Runner(cfg) as r:
        async def normal_client(i: int) -> None:
            k = i
            while time.monotonic() < stop_at:
                k += 1
                t0 = time.perf_counter()
                res = await r.run_flow(trigger=TRIGGER, actions=[normal[k % args.tenants]], event=EVENT,
                                       tenant=f"n{k % args.tenants}")
                if time.monotonic() >= stop_at:
                    break
                lat.append(time.perf_counter() - t0)
                counts["normal"] += 1
                if not res.allowed:
                    counts["normal_failed"] += 1

        async def spin_client() -> None:
            while time.monotonic() < stop_at:
                await r.run_flow(trigger=TRIGGER, actions=[spinner], event=EVENT, tenant="hostile")
                counts["spin"] += 1

        # Warm every normal tenant's worker first (not timed).
        stop_at = time.monotonic() + 2.0
        await asyncio.gather(*(normal_client(i) for i in range(args.concurrency)))
        lat.clear()
        counts.update(normal=0, spin=0, normal_failed=0)
        stop_at = time.monotonic() + args.seconds
        t0, c0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(normal_client(i) for i in range(args.concurrency - args.spinners)),
                             *(spin_client() for _ in range(args.spinners)))
        elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
        gov = r._engine.cpu  # noqa: SLF001 - the governor's counters
        stats = dict(r.stats(), **(gov.stats() if gov else {}))
    s = summarize(lat, args.seconds)  # normal flows finished inside the window (not the spinners' drain)
    return {"mode": "spin", "budget_ms": args.budget_ms, "demote": args.demote, "spinners": args.spinners,
            "concurrency": args.concurrency, "normal_flows_per_s": round(s["throughput_per_s"], 1),
            "normal_p50_ms": round(s["p50_ms"], 2), "normal_p99_ms": round(s["p99_ms"], 2),
            "supervisor_cpu_share": round(cpu / elapsed, 3), "spin_share": round(counts["spin"] / max(1, counts["spin"] + counts["normal"]), 4),
            **counts, "stats": {k: stats.get(k) for k in ("spawned", "discarded", "cpu_demotions", "cpu_reads")}}


async def _cost(args: argparse.Namespace) -> dict[str, Any]:
    rn = _api()
    cfg = rn.RunnerConfig(pool_size=2, max_workers=2, max_busy_per_tenant=2, cpu_budget_ms=args.budget_ms)
    action = rn.Action(slug="tag", source=SRC_TRIVIAL)
    async with rn.Runner(cfg) as r:
        lat: list[float] = []

        async def client(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                res = await r.run_flow(trigger=TRIGGER, actions=[action], event=EVENT, tenant="t1")
                lat.append(time.perf_counter() - t)
                assert res.allowed, res.denial

        await asyncio.gather(*(client(50) for _ in range(8)))  # warm
        per = args.flows // args.concurrency
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        lat.clear()
        c0, t0, o0 = time.process_time(), time.perf_counter(), os.times()
        await asyncio.gather(*(client(per) for _ in range(args.concurrency)))
        cpu, wall, o1 = time.process_time() - c0, time.perf_counter() - t0, os.times()
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
    n = per * args.concurrency
    return {"mode": "cost", "uvloop": args.uvloop, "flows": n, "flows_per_s": round(n / wall, 1),
            "p50_ms": round(summarize(lat)["p50_ms"], 3), "p99_ms": round(summarize(lat)["p99_ms"], 3),
            "supervisor_cpu_us_per_flow": round(cpu / n * 1e6, 1),
            "user_us_per_flow": round((o1.user - o0.user) / n * 1e6, 1),
            "sys_us_per_flow": round((o1.system - o0.system) / n * 1e6, 1), "supervisor_cpu_share": round(cpu / wall, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m actionpool.benchmarks.fairness")
    ap.add_argument("what", choices=("spin", "cost"))
    ap.add_argument("--budget-ms", type=float, default=50.0, help="RunnerConfig.cpu_budget_ms (0: no demotion)")
    ap.add_argument("--demote", choices=("idle", "nice"), default="idle")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--spinners", type=int, default=4, help="hostile flows in flight at once")
    ap.add_argument("--hog", choices=("spin", "sleep"), default="spin", help="what the hostile action does")
    ap.add_argument("--spin-timeout-s", type=float, default=1.0)
    ap.add_argument("--max-workers", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="cost: write a cProfile of the timed part")
    args = ap.parse_args(argv)
    if args.demote == "nice":
        _use_nice()
    coro = _spin(args) if args.what == "spin" else _cost(args)
    if args.uvloop:
        import uvloop

        out = uvloop.run(coro)
    else:
        out = asyncio.run(coro)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
