"""Stress: a bounded mixed run through ``benchmarks.stress``, and back-pressure under a burst.

The stress run is the same code as ``actionpool stress`` (about 2,000 flows,
32 in flight, 10% hostile; about 12 s on 2 cores). Every flow's answer is
checked against the answer its kind must get, so the assertions below are
about correctness and resources, never about speed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


from conftest import make_runner, wait_for_condition
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig

from actionpool.benchmarks.stress import HOSTILE_KINDS, main as stress_main, run_stress

RSS_GROWTH_BOUND_MB = 64   # supervisor RSS after the run (and close) minus before it
FD_SLACK = 3


async def test_bounded_stress_run() -> None:
    report = await run_stress(executions=2000, concurrency=32, hostile_share=0.1, seed=20240611, progress=False)
    problems = report["problems"]
    assert report["executions"] == 2000
    assert report["unanswered"] == 0, problems
    assert report["wrong_answers"] == 0, problems
    assert report["leaked_processes"] == 0, report["leaked_pids"]
    assert report["zombies"] == 0
    assert report["supervisor_fds_end"] <= report["supervisor_fds_start"] + FD_SLACK, report
    growth = report["supervisor_rss_mb_end"] - report["supervisor_rss_mb_start"]
    assert growth < RSS_GROWTH_BOUND_MB, report
    # The mix really happened: every hostile kind ran and ended in its own denial kind.
    for kind in HOSTILE_KINDS:
        assert report["by_flow_kind"].get(kind.name, 0) > 0, report["by_flow_kind"]
    for denial in ("timeout", "memory_limit", "worker_crash", "protocol_error", "uncaught_error", "output_limit"):
        assert report["by_kind"].get(denial, 0) > 0, report["by_kind"]
    assert "overloaded" not in report["by_kind"]
    # Each hostile flow cost its worker; each kill was replaced.
    assert report["worker_kills"] >= report["hostile"]
    assert report["respawns"] >= report["hostile"]
    assert report["http_requests"] == report["by_flow_kind"]["fetch"]
    assert report["latency_ms_normal"]["n"] == report["executions"] - report["hostile"]
    assert report["ok"] is True


def test_stress_command_line(tmp_path: Any, capsys: Any) -> None:
    """``actionpool stress`` and ``python -m benchmarks.stress`` share ``main``; it writes the JSON report."""
    from actionpool.runner.cli import main as cli_main

    out = tmp_path / "stress.json"
    rc = cli_main(["stress", "--executions", "60", "--concurrency", "8", "--hostile-share", "0.2",
                   "--seed", "3", "--quiet", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    for key in ("executions", "unanswered", "wrong_answers", "by_kind", "worker_kills", "respawns",
                "leaked_processes", "supervisor_rss_mb_start", "supervisor_rss_mb_end", "supervisor_fds_start",
                "supervisor_fds_end", "latency_ms_normal", "throughput_per_s", "duration_s"):
        assert key in report, key
    assert report["executions"] == 60 and report["ok"]
    assert "OK" in capsys.readouterr().out
    assert stress_main(["--executions", "0"]) == 2


# --------------------------------------------------------------------------------------------
# back-pressure


class Gate:
    """A loopback HTTP server whose every answer waits until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.arrived = 0
        self.answered = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> "Gate":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/gate"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.arrived += 1
                await self.opened.wait()
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nopen")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # closing: end normally (asyncio's server callback logs a task that ends cancelled)
        finally:
            self._conns.discard(task)
            writer.close()


SLOW = Action(slug="slow", source=(
    "async def on_execute(event, api):\n"
    "    r = await api.fetch(event.url)\n"
    "    api.state.set('body', r.body)\n"
    "    api.state.set('n', event.n)\n"))


async def test_back_pressure_refuses_the_surplus_at_once() -> None:
    """max_workers=2, max_queue=4, 20 flows at once: 2 run, 4 wait, 14 are refused while the 2 are still stuck."""
    # co_run=1: one flow per worker, so the pool's own queue is what is measured (tests/test_corun.py has the rest).
    cfg = RunnerConfig(pool_size=2, max_workers=2, max_busy_per_tenant=2, max_queue=4, queue_timeout_s=30.0,
                       limits=Limits(action_timeout_s=30.0, flow_timeout_s=40.0, co_run=1),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=30.0))
    async with Gate() as gate, make_runner(cfg) as r:
        finished: list[int] = []
        results: dict[int, dict[str, Any]] = {}

        async def flow(n: int) -> None:
            res = await r.run_flow(trigger="post-login", actions=[SLOW], event={"url": gate.url, "n": n}, tenant="bp")
            results[n] = res.to_dict()
            finished.append(n)

        tasks = [asyncio.ensure_future(flow(n)) for n in range(20)]
        # The surplus is answered while the gate is still shut: the slow flows cannot have finished yet.
        await wait_for_condition(lambda: len(finished) >= 14)
        assert gate.answered == 0 and not gate.opened.is_set()
        early = list(finished)
        assert len(early) == 14
        assert r.stats()["busy"] == 2 and r.stats()["waiting"] == 4
        gate.opened.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    refused = [n for n in finished if results[n]["denial"] and results[n]["denial"]["kind"] == "overloaded"]
    served = [n for n in finished if results[n]["outcome"] == "allow"]
    assert sorted(refused) == sorted(early) and len(refused) == 14
    assert len(served) == 6 and finished[14:] == served  # completion order: every refusal before any slow flow
    for n in refused:
        assert "4 flows already waiting" in results[n]["denial"]["reason"], results[n]["denial"]
        assert results[n]["actions"][0]["status"] == "failed"
    for n in served:
        assert results[n]["state"] == {"slow": {"body": "open", "n": n}}
    assert gate.arrived == gate.answered == 6
    # Refusal is by arrival order: the first 2 ran, the next 4 queued, the rest were turned away.
    assert sorted(served) == list(range(6))


async def test_long_flows_on_a_cold_pool_grow_it_to_max_workers() -> None:
    cfg = RunnerConfig(pool_size=2, max_workers=6, max_busy_per_tenant=6, max_queue=16, queue_timeout_s=2.0,
                       limits=Limits(action_timeout_s=30.0, flow_timeout_s=40.0),
                       fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=30.0))
    async with Gate() as gate, make_runner(cfg) as r:
        done: list[dict[str, Any]] = []

        async def flow(n: int) -> None:
            res = await r.run_flow(trigger="post-login", actions=[SLOW], event={"url": gate.url, "n": n}, tenant="cold")
            done.append(res.to_dict())

        tasks = [asyncio.ensure_future(flow(n)) for n in range(6)]
        try:
            # Either all six reach the gate (the pool grew), or some flow ended first (refused after the wait).
            await wait_for_condition(lambda: gate.arrived == 6 or bool(done))
            assert gate.arrived == 6 and not done, [d["denial"] for d in done]
        finally:
            gate.opened.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert all(d["outcome"] == "allow" for d in done)


async def test_retiring_for_another_tenant_keeps_the_worker_cap() -> None:
    ok = Action(slug="ok", source="def on_execute(event, api):\n    api.state.set('ok', True)\n")
    async with make_runner(RunnerConfig(pool_size=0, max_workers=2, max_busy_per_tenant=2)) as r:
        # Two idle workers bound to tenant a fill the cap ...
        first = await asyncio.gather(*(r.run_flow(trigger="post-login", actions=[ok], event={}, tenant="a")
                                       for _ in range(2)))
        assert all(res.outcome == "allow" for res in first)
        await wait_for_condition(lambda: r.stats()["idle"] == 2 and r.stats()["starting"] == 0)
        # ... so a flow of tenant b needs one of them retired first.
        res = await r.run_flow(trigger="post-login", actions=[ok], event={}, tenant="b")
        assert res.outcome == "allow"
        await wait_for_condition(lambda: r.stats()["starting"] == 0)
        assert r.stats()["live"] <= 2 and r.stats()["peak_workers"] <= 2, r.stats()
