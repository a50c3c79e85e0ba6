"""Load generator for ``actionpool serve``: what the HTTP hop costs over the in-process API.

    python -m actionpool.benchmarks.sidecar_load [--quick] [--json FILE] [--history] [--workers N [--repeat R]]

Two measurements of the same workload, one after the other on this machine:

* in-process: ``Runner.run_flow`` of the S1 action (state.set, log, setCustomClaim),
  the way benchmarks/scenarios.py runs S1 and S2 (pool_size = max_workers = 2);
* through the sidecar: a real ``actionpool serve`` subprocess on a loopback
  port with the same runner settings, driven by an async client with
  keep-alive (one connection per concurrent client): httpx, and a minimal
  HTTP/1.1 client on asyncio streams. httpx's own per-request work (about
  0.5-1 ms of CPU here) is larger than the sidecar's, so the lean client is the
  one that shows what the sidecar adds; a gateway's HTTP client (Go, Java,
  Envoy) is closer to it than to httpx.

S1 is one client, sequential flows: the p50 difference is what the sidecar adds
to a login. S2 is 64 flows in flight: throughput, sidecar against in-process.
The client shares the machine's cores with the sidecar, so on a 2-core box the
S2 ratio is a lower bound. Not a timed test: it prints numbers, it asserts none.

``--workers N``: S2 through ``serve --workers 1`` and then ``serve --workers N`` (README "Every core"),
both on a private redis-server started here on a free loopback port (N processes share the store), with
the same host budget (``max_workers = 2 N``: each of the N processes gets 2, as the single one gets 2N),
and the sidecar CPU per flow: user + system time of the serve processes (not their action workers),
summed over the processes, over the S2 run. The two are alternated ``--repeat`` times (medians reported):
the load generator, and anything else on the host, runs on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from .scenarios import EVENT, SRC_TRIVIAL, TENANT, TRIGGER

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _closed_loop(one: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> tuple[list[float], float]:
    """``n`` calls of ``one`` by ``concurrency`` workers; per-call latencies (s) and the wall time."""
    latencies: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def _summary(lat: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100)
    return {"n": len(lat), "p50_ms": statistics.median(lat) * 1000, "p99_ms": q[98] * 1000,
            "throughput_per_s": len(lat) / wall}


async def in_process(n1: int, n2: int, concurrency: int) -> dict[str, Any]:
    from ..runner import Action, Runner, RunnerConfig

    actions = [Action(slug="tag", source=SRC_TRIVIAL)]
    async with Runner(RunnerConfig(pool_size=2, max_workers=2, max_busy_per_tenant=2)) as r:  # one tenant: all of it
        async def one() -> None:
            res = await r.run_flow(trigger=TRIGGER, actions=actions, event=EVENT, tenant=TENANT)
            assert res.outcome == "allow", res.denial

        await _closed_loop(one, 50, 2)
        s1 = _summary(*await _closed_loop(one, n1, 1))
        s2 = _summary(*await _closed_loop(one, n2, concurrency))
    return {"s1": s1, "s2": s2}


def _start_sidecar(tmp: Path, history: bool) -> tuple[subprocess.Popen[bytes], str]:
    (tmp / "tag.py").write_text(SRC_TRIVIAL)
    (tmp / "serve.toml").write_text(textwrap.dedent(f"""
        [runner]
        pool_size = 2
        max_workers = 2
        max_busy_per_tenant = 2
        [server]
        token_env = "AP_BENCH_TOKEN"
        history_size = {100 if history else 0}
        [tenants.{TENANT}.actions.tag]
        file = "tag.py"
        [tenants.{TENANT}.flows]
        {TRIGGER} = ["tag"]
    """))
    return spawn_sidecar(tmp / "serve.toml", {"AP_BENCH_TOKEN": TOKEN})


def spawn_sidecar(config: Path, env: dict[str, str], *, timeout_s: float = 60.0, args: tuple[str, ...] = (),
                  **popen: Any) -> tuple[subprocess.Popen[bytes], str]:
    """``actionpool serve --config config`` on a free loopback port, once ``/readyz`` answers 200.

    ``env`` is added to this process's environment; ``popen`` goes to ``subprocess.Popen``
    (``stdout``/``stderr`` to keep the sidecar's log, ``preexec_fn``...). Also used by
    benchmarks/sidecar_attack.py. ``args``: more options of ``serve`` (``--workers N``).
    """
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config",
                             str(config), "--port", str(port), *args],
                            env={**os.environ, **env}, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"actionpool serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"actionpool serve did not become ready within {timeout_s:.0f} s")


class LeanConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: POST a body, read one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.process: bytes | None = None   # serve --workers N: which process this connection reached

    @classmethod
    async def open(cls, url: str) -> "LeanConnection":
        host, port = url.split("//", 1)[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif self.process is None and line[:21].lower() == b"x-actionpool-process:":
                self.process = line[21:].strip()
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def through_sidecar_lean(url: str, n1: int, n2: int, concurrency: int,
                               before_s2: Callable[[], None] | None = None) -> dict[str, Any]:
    body = json.dumps(EVENT).encode()
    request = (f"POST /v1/tenants/{TENANT}/flows/{TRIGGER} HTTP/1.1\r\nHost: bench\r\n"
               f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    conns = [await LeanConnection.open(url) for _ in range(concurrency)]
    free = list(conns)

    async def one() -> None:
        conn = free.pop()
        try:
            status, payload = await conn.post(request)
        finally:
            free.append(conn)
        assert status == 200 and b'"outcome":"allow"' in payload, payload[:200]

    try:
        await _closed_loop(one, 50, 2)
        s1 = _summary(*await _closed_loop(one, n1, 1))
        if before_s2 is not None:
            before_s2()
        s2 = _summary(*await _closed_loop(one, n2, concurrency))
    finally:
        for c in conns:
            await c.close()
    return {"s1": s1, "s2": s2}


async def through_sidecar(url: str, n1: int, n2: int, concurrency: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits,
                                 timeout=30) as c:
        path = f"/v1/tenants/{TENANT}/flows/{TRIGGER}"
        body = json.dumps(EVENT).encode()
        headers = {"content-type": "application/json"}

        async def one() -> None:
            r = await c.post(path, content=body, headers=headers)
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text[:200]

        await _closed_loop(one, 50, 2)
        s1 = _summary(*await _closed_loop(one, n1, 1))
        s2 = _summary(*await _closed_loop(one, n2, concurrency))
    return {"s1": s1, "s2": s2}


def _private_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of this run alone on a free loopback port, no persistence (as tests/test_serve_outage.py)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("--workers needs a redis-server on PATH (apt-get install -y redis-server)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"redis-server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)


def _serve_processes(proc: subprocess.Popen[bytes]) -> list[Any]:
    """The supervisor processes of a sidecar: the one ``serve``, or the parent of N and its N children."""
    import psutil

    top = psutil.Process(proc.pid)
    return [top, *(c for c in top.children() if "serve" in " ".join(c.cmdline()))]


def _cpu_s(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def _wait_every_process(url: str, count: int, timeout_s: float = 120.0) -> None:
    """Until each of ``count`` processes has answered a flow on a new connection (all N ready)."""
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout_s
    body = json.dumps(EVENT).encode()
    request = (f"POST /v1/tenants/{TENANT}/flows/{TRIGGER} HTTP/1.1\r\nHost: bench\r\n"
               f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {count} serve processes answered within {timeout_s:.0f} s")
        conn = await LeanConnection.open(url)
        try:
            status, _ = await conn.post(request)
            if status == 200 and conn.process is not None:
                seen.add(conn.process)
        finally:
            await conn.close()


def _measure_workers(tmp: Path, count: int, n1: int, n2: int, concurrency: int) -> dict[str, Any]:
    """One S1 + S2 run through ``serve --workers count``; the sidecar's and this client's CPU over S2."""
    import psutil

    with open(tmp / "serve.log", "ab") as log:
        proc, url = spawn_sidecar(tmp / "serve.toml", {"AP_BENCH_TOKEN": TOKEN}, args=("--workers", str(count)),
                                  stderr=log)
    try:
        if count > 1:
            asyncio.run(_wait_every_process(url, count))
        procs, me = _serve_processes(proc), psutil.Process()
        mark: list[float] = []
        row = asyncio.run(through_sidecar_lean(url, n1, n2, concurrency,
                                               before_s2=lambda: mark.extend((_cpu_s(procs), _cpu_s([me])))))
        row["cpu_us_per_flow"] = (_cpu_s(procs) - mark[0]) / n2 * 1e6   # over S2 alone
        row["client_cpu_us_per_flow"] = (_cpu_s([me]) - mark[1]) / n2 * 1e6
        row["processes"] = count
    finally:
        proc.send_signal(signal.SIGTERM)
        row_exit = proc.wait(60)
    row["exit"] = row_exit
    return row


def workers_compare(n: int, n1: int, n2: int, concurrency: int, repeat: int) -> dict[str, Any]:
    """S2 through ``serve --workers 1`` and ``--workers n``, alternated ``repeat`` times on one private Redis."""
    out: dict[str, Any] = {"cores": os.cpu_count(), "concurrency": concurrency, "runs": {1: [], n: []}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        redis_proc, redis_url = _private_redis(tmp)
        try:
            (tmp / "tag.py").write_text(SRC_TRIVIAL)
            (tmp / "serve.toml").write_text(textwrap.dedent(f"""
                [runner]
                pool_size = {2 * n}
                max_workers = {2 * n}
                max_busy_per_tenant = {2 * n}
                [server]
                token_env = "AP_BENCH_TOKEN"
                history_size = 0
                [store]
                url = "{redis_url}"
                [tenants.{TENANT}.actions.tag]
                file = "tag.py"
                [tenants.{TENANT}.flows]
                {TRIGGER} = ["tag"]
            """))
            for _ in range(repeat):   # alternated: a neighbour's load falls on both alike
                for count in (1, n):
                    out["runs"][count].append(_measure_workers(tmp, count, n1, n2, concurrency))
        except BaseException:
            print((tmp / "serve.log").read_text()[-4000:], file=sys.stderr)   # the sidecars' own lines
            raise
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
    for count in (1, n):
        runs = out["runs"][count]
        out[f"workers_{count}"] = row = {
            "s2_flows_per_s": statistics.median(r["s2"]["throughput_per_s"] for r in runs),
            "s2_p50_ms": statistics.median(r["s2"]["p50_ms"] for r in runs),
            "s2_p99_ms": statistics.median(r["s2"]["p99_ms"] for r in runs),
            "s1_p50_ms": statistics.median(r["s1"]["p50_ms"] for r in runs),
            "cpu_us_per_flow": statistics.median(r["cpu_us_per_flow"] for r in runs),
            "client_cpu_us_per_flow": statistics.median(r["client_cpu_us_per_flow"] for r in runs),
            "each_s2_flows_per_s": [round(r["s2"]["throughput_per_s"]) for r in runs],
        }
        print(f"serve --workers {count}: S2 {row['s2_flows_per_s']:.0f} flows/s (median of {len(runs)}: "
              f"{row['each_s2_flows_per_s']}; p50 {row['s2_p50_ms']:.2f} ms, p99 {row['s2_p99_ms']:.2f} ms), S1 p50 "
              f"{row['s1_p50_ms']:.3f} ms; sidecar CPU {row['cpu_us_per_flow']:.0f} us/flow summed over its "
              f"{count + (count > 1)} process(es); the load generator {row['client_cpu_us_per_flow']:.0f} us/flow")
    out["runs"] = {str(k): v for k, v in out["runs"].items()}
    out["s2_ratio"] = out[f"workers_{n}"]["s2_flows_per_s"] / out["workers_1"]["s2_flows_per_s"]
    print(f"--workers {n} / --workers 1: S2 {out['s2_ratio']:.2f}x. This machine has {out['cores']} cores, shared "
          f"by the load generator and the sidecar processes: real scaling needs more cores than this one has")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidecar_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer flows (a smoke run, not final figures)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--history", action="store_true", help="keep run history on (default off: the bare hop)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--workers", type=int, metavar="N", help="compare S2 through serve --workers N with "
                   "--workers 1 (a private redis-server is started for the shared store)")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="with --workers: alternate the two R times "
                   "and report the medians (default 3)")
    args = p.parse_args(argv)
    n1, n2 = (300, 2000) if args.quick else (2000, 20000)
    if args.workers is not None:
        if args.workers < 2:
            p.error("--workers: N >= 2 (it is compared with --workers 1)")
        result = workers_compare(args.workers, n1, n2, args.concurrency, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    out: dict[str, Any] = {"in_process": asyncio.run(in_process(n1, n2, args.concurrency))}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start_sidecar(Path(tmp), args.history)
        try:
            out["sidecar_lean"] = asyncio.run(through_sidecar_lean(url, n1, n2, args.concurrency))
            out["sidecar_httpx"] = asyncio.run(through_sidecar(url, n1, n2, args.concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)
            out["sidecar_exit"] = proc.wait(30)
    ip = out["in_process"]
    print(f"in-process: S1 p50 {ip['s1']['p50_ms']:.3f} ms (p99 {ip['s1']['p99_ms']:.3f}), "
          f"S2 {ip['s2']['throughput_per_s']:.0f} flows/s")
    for name in ("sidecar_lean", "sidecar_httpx"):
        sc = out[name]
        out[name]["s1_added_p50_ms"] = added = sc["s1"]["p50_ms"] - ip["s1"]["p50_ms"]
        out[name]["s2_throughput_ratio"] = ratio = sc["s2"]["throughput_per_s"] / ip["s2"]["throughput_per_s"]
        print(f"{name}: S1 p50 {sc['s1']['p50_ms']:.3f} ms (p99 {sc['s1']['p99_ms']:.3f}) -> added {added:.3f} ms "
              f"(target <= 0.3); S2 {sc['s2']['throughput_per_s']:.0f} flows/s -> {ratio:.2f}x in-process "
              "(target >= 0.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
