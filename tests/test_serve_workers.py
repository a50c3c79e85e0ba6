"""``actionpool serve --workers N``: N real serve processes behind one port (SO_REUSEPORT), on a real Redis.

What a gateway relies on: both processes answer on the one port, a deploy through one is served by every
one within a second (they are replicas of the store), ``/metrics`` on any of them shows the sums over all
of them (prometheus-client's multiprocess mode), SIGTERM drains every process's in-flight flows before the
parent exits 0, and a process that dies is replaced. Which process answered is read from the
``x-actionpool-process`` header (``i/N``), set only in this mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from net_fixtures import free_port
from serve_fixtures import AUTH, TOKEN, stop_process, write_config

pytestmark = pytest.mark.redis

ACTIONS = {
    "slow.py": """
        import time
        def on_execute_post_login(event, api):
            time.sleep(float((event.request or {}).get("sleep") or 0))
            api.session.setCustomClaim("v", "one")
    """,
}

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    drain_grace_s = 20
    [store]
    url = "{url}"
    [tenants.acme.actions.slow]
    file = "actions/slow.py"
    [tenants.acme.flows]
    post-login = ["slow"]
"""

NEW_SLOW = """
def on_execute_post_login(event, api):
    api.session.setCustomClaim("v", "two")
"""


class Group:
    """The parent process of ``serve --workers N`` and its port."""

    def __init__(self, cfg: Path, n: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cfg.parent / f"workers-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(cfg), "--port",
                 str(self.port), "--workers", str(n)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "AP_TOKEN": TOKEN})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "processes ready on" not in self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.05)  # polling a condition with a deadline

    def children(self) -> list[psutil.Process]:
        """The live serve processes (a killed one is a zombie until the parent reaps it: not counted)."""
        out = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "serve" in " ".join(p.cmdline()):
                    out.append(p)
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                pass
        return out

    def stop(self, timeout: float = 60) -> int:
        return stop_process(self.proc, timeout)


@pytest.fixture
def group(tmp_path: Path, redis_url: str) -> Iterator[Group]:
    g = Group(write_config(tmp_path, CONFIG.format(url=redis_url), ACTIONS), 2)
    try:
        g.wait_ready()
        yield g
    finally:
        g.stop()


def fresh(url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request on a new connection: the kernel picks the process per connection."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        return c.request(method, path, **kw)


def by_process(g: Group, tries: int = 64) -> dict[str, httpx.Response]:
    """A flow answered by each process (new connections until both have answered)."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(tries):
        r = fresh(g.url, "POST", "/v1/tenants/acme/flows/post-login", json={"user": {}})
        assert r.status_code == 200, r.text
        seen.setdefault(r.headers["x-actionpool-process"], r)
        if len(seen) == 2:
            break
    return seen


def test_workers_without_a_shared_store_is_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, CONFIG.replace('[store]\n    url = "{url}"', ""), ACTIONS)
    p = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(cfg), "--port",
                        str(free_port()), "--workers", "2"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AP_TOKEN": TOKEN})
    assert p.returncode == 2
    assert "--workers 2 needs a shared store" in p.stderr and "redis://" in p.stderr


def test_both_processes_serve_one_port_and_see_every_deploy_within_a_second(group: Group) -> None:
    seen = by_process(group)
    assert set(seen) == {"0/2", "1/2"}, f"only {sorted(seen)} answered 64 new connections"
    assert {r.json()["claims"]["access_token"]["v"] for r in seen.values()} == {"one"}
    r = fresh(group.url, "PUT", "/v1/tenants/acme/actions/slow", content=NEW_SLOW,
              headers={**AUTH, "content-type": "text/x-python"})
    assert r.status_code == 201, r.text
    new = r.json()["version"]
    t0 = time.monotonic()
    while True:
        answers = by_process(group)
        if set(answers) == {"0/2", "1/2"} and all(a.json()["versions"]["slow"] == new for a in answers.values()):
            break
        assert time.monotonic() - t0 < 1.0 + 2.0, "a process did not serve the deploy within 1 s"  # + request time
    assert {a.json()["claims"]["access_token"]["v"] for a in answers.values()} == {"two"}


def _sample(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_are_summed_over_the_processes(group: Group) -> None:
    seen = by_process(group)
    assert len(seen) == 2
    flows = 0
    for _ in range(20):
        assert fresh(group.url, "POST", "/v1/tenants/acme/flows/post-login", json={"user": {}}).status_code == 200
    # every flow so far, through either process, counted once: by_process's flows and the 20
    texts = [fresh(group.url, "GET", "/metrics").text for _ in range(6)]
    counts = {_sample(t, "actionpool_flows_total{") for t in texts}
    assert len(counts) == 1, f"different processes report different totals: {counts}"
    flows = counts.pop()
    assert flows >= 22
    assert re.search(r"^actionpool_workers_live(\{[^}]*\})? [1-9]", texts[0], re.MULTILINE), texts[0][:2000]
    # The per-tenant latency histogram (kept as lists, written to the shared files every ~1 s and at each
    # scrape): every flow once, whichever process ran it, the same sum on any process's /metrics.
    want = _sample(texts[0], 'actionpool_flows_total{outcome="allow",tenant="acme"')
    assert want == flows
    deadline = time.monotonic() + 10
    while True:
        texts = [fresh(group.url, "GET", "/metrics").text for _ in range(6)]
        got = {_sample(t, 'actionpool_tenant_flow_duration_seconds_count{tenant="acme"}') for t in texts}
        inf = {_sample(t, 'actionpool_tenant_flow_duration_seconds_bucket{le="+Inf",tenant="acme"}') for t in texts}
        if got == inf == {want}:
            break
        assert time.monotonic() < deadline, f"histogram counts {got}, +Inf {inf}; {want} flows"
        time.sleep(0.1)


def test_sigterm_drains_every_process_then_the_parent_exits_0(group: Group) -> None:
    by_process(group)  # warm workers in both
    kids = group.children()
    assert len(kids) == 2
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def slow() -> None:
        r = fresh(group.url, "POST", "/v1/tenants/acme/flows/post-login", json={"request": {"sleep": 2.0}})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while True:  # every slow flow has reached a process (it is in flight) before the signal
        text = fresh(group.url, "GET", "/metrics").text
        if _sample(text, "actionpool_flows_in_flight") >= 6:
            break
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.02)
    group.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert len(results) == 6 and all(r.status_code == 200 and r.json()["outcome"] == "allow" for r in results), \
        [(r.status_code, r.text[:200]) for r in results]
    assert group.proc.wait(60) == 0, group.output()[-3000:]
    assert all(not psutil.pid_exists(k.pid) or k.status() == psutil.STATUS_ZOMBIE for k in kids)
    out = group.output()
    assert "actionpool serve: stopped (SIGTERM; 2 processes" in out


def test_a_process_that_dies_is_replaced(group: Group) -> None:
    kids = group.children()
    assert len(kids) == 2
    kids[0].kill()
    deadline = time.monotonic() + 60
    while True:
        now = group.children()
        if len(now) == 2 and kids[0].pid not in {k.pid for k in now} and set(by_process(group)) == {"0/2", "1/2"}:
            break
        assert time.monotonic() < deadline, group.output()[-3000:]
        time.sleep(0.1)
    assert "restarting it" in group.output()


def test_one_ready_line_for_the_group_and_a_share_of_the_workers_each(group: Group) -> None:
    out = group.output()
    assert out.count("processes ready on") == 1, out
    assert f"actionpool serve: 2 processes ready on http://127.0.0.1:{group.port}" in out
    for i in (0, 1):   # each process's own ready line names it
        assert re.search(rf"^actionpool serve: ready on http://127\.0\.0\.1:{group.port} \(process {i}/2\)",
                         out, re.MULTILINE), out
    # runner.max_workers = 4 is the host's: each process gets 2 (summed over both: 4, not 8)
    deadline = time.monotonic() + 10
    while True:
        text = fresh(group.url, "GET", "/metrics").text
        if _sample(text, "actionpool_workers_max") == 4:
            break
        assert time.monotonic() < deadline, [ln for ln in text.splitlines() if "workers_max" in ln]
        time.sleep(0.1)
    group.stop()
    out = group.output()
    assert out.count("actionpool serve: stopped (") == 1, out   # the group's one stop line
    for i in (0, 1):   # and each process's own stop line names it
        assert re.search(rf"^actionpool serve: stopped on SIGTERM \(process {i}/2\)", out, re.MULTILINE), out


def test_a_process_gets_a_share_of_the_derived_memory_budget() -> None:
    """No budget configured: each of N processes gets 1/N of the runner's default (from physical memory)."""
    from actionpool.runner import hosting
    from actionpool.runner import RunnerConfig
    from actionpool.sidecar._config import ServeConfig, ServerSpec
    from actionpool.sidecar._serve import share_budget
    from actionpool.sidecar._workers import WorkerSlot

    cfg = ServeConfig(Path("serve.toml"), RunnerConfig(), ServerSpec(), "redis://127.0.0.1:1/0", {})
    assert cfg.runner.worker_memory_budget_mb is None and cfg.runner.max_workers is None
    host = hosting.default_memory_budget_mb(hosting.physical_memory_bytes())
    shared = share_budget(cfg, WorkerSlot(1, 4)).runner
    assert shared.worker_memory_budget_mb == max(1, host // 4) and shared.max_workers is None
    assert shared.max_running == max(1, RunnerConfig().running_limit() // 4)   # the host's CPUs are shared too
    assert share_budget(cfg, None) is cfg and share_budget(cfg, WorkerSlot(0, 1)) is cfg
    # a configured max_workers is shared too, and the pool kept within it
    fixed = dataclasses.replace(cfg, runner=RunnerConfig(max_workers=3, pool_size=3, worker_memory_budget_mb=100,
                                                         max_busy_per_tenant=2, max_queue=10))
    shared = share_budget(fixed, WorkerSlot(0, 2)).runner
    assert (shared.max_workers, shared.pool_size, shared.worker_memory_budget_mb) == (1, 1, 50)
    assert (shared.max_busy_per_tenant, shared.max_queue, shared.max_queue_per_tenant) == (1, 5, None)
    off = dataclasses.replace(cfg, runner=RunnerConfig(max_running=0))
    assert share_budget(off, WorkerSlot(0, 2)).runner.max_running == 0      # no limit stays no limit


def test_the_shared_listening_socket_gets_tcp_nodelay_on_its_connections() -> None:
    """asyncio sets TCP_NODELAY only where the socket's proto says TCP; without it a keep-alive answer waits for
    the client's delayed ACK (about 40 ms a flow)."""
    import asyncio
    import socket

    from actionpool.sidecar._workers import reuseport_socket

    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = reuseport_socket("127.0.0.1", free_port())
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        try:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0


_MIRROR_PROCESS = """
import json, os, sys
from actionpool.sidecar._metrics import Metrics
stats, store, flows = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
m = Metrics(lambda: stats, (lambda: store) if store else None, lambda: {"acme": 100})
assert m.multiprocess
result = {"outcome": "allow", "actions": [], "denial": None, "logs": [], "versions": {}}
for _ in range(flows):
    m.flow("acme", "post-login", result, 0.003)
m.forget("acme")                 # the tenant loses its label: its totals stay in the shared files
m.flow("acme", "post-login", result, 0.003) if flows else None   # and it comes back: the sums go on
sys.stdout.write(m.render().decode())
"""


def _mirror_run(tmp_path: Path, stats: dict[str, Any], store: dict[str, Any] | None, flows: int) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", _MIRROR_PROCESS, json.dumps(stats), json.dumps(store), str(flows)],
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    return int(re.search(r"gauge_livesum_(\d+)\.db", " ".join(os.listdir(tmp_path))).group(1)), p.stdout


def test_scrape_time_values_are_combined_over_processes(tmp_path: Path) -> None:
    """Real processes in prometheus-client's multiprocess mode, without a server: each one's pool and store
    values, and its list-based latency histograms, reach every process's /metrics, combined as documented."""
    from prometheus_client import multiprocess

    store = {"up": True, "down_seconds": 0, "outages": 1, "bad_records": 0, "history_dropped": 0,
             "history_truncated": 0, "restores": 0, "disagreeing": 0}
    first, _ = _mirror_run(tmp_path, {"live": 2, "capacity": 4, "loop_lag_ms": 5.0, "discarded": 3}, store, 3)
    _, text = _mirror_run(tmp_path, {"live": 3, "capacity": 4, "loop_lag_ms": 20.0, "discarded": 1},
                          {**store, "up": False, "down_seconds": 7, "outages": 2}, 4)
    assert _sample(text, 'actionpool_flows_total{outcome="allow",tenant="acme"') == 3 + 1 + 4 + 1
    assert _sample(text, 'actionpool_tenant_flow_duration_seconds_count{tenant="acme"}') == 3 + 1 + 4 + 1
    assert _sample(text, 'actionpool_tenant_flow_duration_seconds_bucket{le="0.005",tenant="acme"}') == 9
    assert _sample(text, "actionpool_workers_live ") == 5 and _sample(text, "actionpool_workers_max ") == 8
    assert _sample(text, "actionpool_workers_discarded_total") == 4
    assert _sample(text, "actionpool_event_loop_lag_seconds ") == 0.02            # the worst process
    assert _sample(text, "actionpool_store_up ") == 0                             # one cannot reach Redis
    assert _sample(text, "actionpool_store_degraded_seconds ") == 7
    assert _sample(text, "actionpool_store_outages_total") == 3
    assert _sample(text, 'actionpool_action_cache_bytes{tenant="acme"}') == 200
    multiprocess.mark_process_dead(first, str(tmp_path))   # what the parent does when a process exits
    _, text = _mirror_run(tmp_path, {"live": 0}, None, 0)
    assert _sample(text, "actionpool_workers_live ") == 3                         # the dead one's gauges gone
    assert _sample(text, 'actionpool_flows_total{outcome="allow",tenant="acme"') == 9   # its counters kept
