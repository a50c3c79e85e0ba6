"""The sidecar under attack: one tenant's latency while others (and strangers) push on ``actionpool serve``.

    python -m actionpool.benchmarks.sidecar_attack [--quick] [--json FILE] [--connections 5000] [--flows N]

One real ``actionpool serve`` subprocess (a token, three tenants, default ``[server]`` settings) on a
loopback port, and two phases measured the same way:

* quiet: the ``measured`` tenant's flows alone (a tier tag and a claim), N flows on keep-alive
  connections opened before the run and N flows each on a NEW connection, paced over the phase;
* attack: the same flows while a separate attacker process holds ``--connections`` unauthenticated
  connections open (idle ones that never send a byte, slowloris ones that send a header line about
  every second and never finish; those the server closes are reopened so the pressure is held),
  the ``slow`` tenant keeps ``--slow-inflight`` flows of ~1 s in flight, and the ``hoarder``
  tenant fills its run history with ~2 MB records.

Reported against the quiet run: the measured tenant's p50/p99/max and errors (connect refused,
timeouts, 503s and every other failure counted, never hidden), the sidecar's RSS and open fds
(psutil on the serve pid, its workers separately) and how many attack connections the server
closed; then the issue's targets: attack p99 <= 2x quiet p99, sidecar RSS growth < 50 MB, fd
peak below the sidecar's RLIMIT_NOFILE with no EMFILE. Not a timed test: it prints numbers and
asserts none. Everything it starts is stopped at the end (the attacker, the sidecar and its
workers), and it only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from ._harness import error_text, kill_leftovers, raise_nofile_limit
from ._stats import percentile, ratio, summarize
from .scenarios import SRC_TRIVIAL
from .sidecar_load import TOKEN, LeanConnection, spawn_sidecar

TRIGGER = "post-login"
TOKEN_ENV = "AP_ATTACK_TOKEN"
MEASURED, SLOW, HOARDER = "measured", "slow", "hoarder"
RESULTS = Path(__file__).parent / "results" / "sidecar-attack.json"
SCHEMA = 1

TARGET_P99_RATIO = 2.0       # attack p99 / quiet p99
TARGET_RSS_GROWTH_MB = 50.0  # sidecar process RSS, attack peak minus the quiet phase's end

SRC_SLOW = '''
import time

def on_execute_post_login(event, api):
    time.sleep(%r)
    api.state.set("slept", True)
'''  # %% the nap in seconds: within the default 5 s action timeout

# ~2 MB recorded per run: 100 log lines of 4,000 bytes (the default entry cap and message cap), an
# app_metadata value and a state value of 800 kB each (under the 1 MiB frame and 4 MiB output caps).
SRC_HOARDER = '''
def on_execute_post_login(event, api):
    tag = str(event.execution_id)
    line = (tag + "|") * (4000 // (len(tag) + 1))
    for i in range(100):
        api.log("info", line)
    api.user.setAppMetadata("hoard", tag + "m" * 800000)
    api.state.set("hoard", tag + "s" * 800000)
'''

EVENT = {"user": {"user_id": "u-1", "email": "a@example.com", "app_metadata": {}},
         "request": {"ip": "127.0.0.1", "geo": {"country": "FR"}}}


# -- HTTP: requests and their failures ------------------------------------------------------------


def flow_request(tenant: str, token: str | None = TOKEN, *, close: bool = False) -> bytes:
    """One complete POST of the flow endpoint (bytes ready to write on a connection)."""
    body = json.dumps(EVENT).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    conn = "Connection: close\r\n" if close else ""
    return (f"POST /v1/tenants/{tenant}/flows/{TRIGGER} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{conn}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def failure_kind(exc: BaseException, connecting: bool) -> str:
    """A short, stable name for why a request got no answer (the error tally's key)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "connect_timeout" if connecting else "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)):
        return "connect_reset" if connecting else "closed_by_server"
    if isinstance(exc, OSError) and exc.errno is not None:
        return ("connect_" if connecting else "") + errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


@dataclass
class Tally:
    """Latencies of answered flows and every failure by kind, for one client mode and phase."""

    latencies: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)  # time.monotonic() at each answered flow's start
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    reopened: int = 0  # keep-alive connections found closed by the server between flows

    def ok(self, started: float, seconds: float) -> None:
        self.started.append(started)
        self.latencies.append(seconds)

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail}"[:300])

    def report(self, planned: int, elapsed: float, origin: float) -> dict[str, Any]:
        out: dict[str, Any] = {"planned": planned, "answered": len(self.latencies),
                               "errors": dict(sorted(self.errors.items())), "error_examples": self.examples}
        out["failed"] = sum(self.errors.values())
        if self.latencies:
            out.update(summarize(self.latencies, elapsed))
            # When the slowest flows started (s from the phase's start): lined up with the attacker's timeline.
            worst = sorted(zip(self.latencies, self.started), reverse=True)[:10]
            out["slowest"] = [[round(t - origin, 2), round(lat * 1000, 1)] for lat, t in worst]
        if self.reopened:
            out["keepalive_reopened"] = self.reopened
        return out


def check_answer(status: int, payload: bytes) -> str | None:
    """None for the measured tenant's expected answer (200, allow), else the failure kind."""
    if status == 200 and b'"outcome":"allow"' in payload:
        return None
    return f"status_{status}" if status != 200 else "wrong_answer"


# -- the measured tenant's clients ----------------------------------------------------------------


async def paced(n: int, interval: float, deadline: float, one: Callable[[], Awaitable[None]],
                tally: Tally) -> None:
    """``n`` calls of ``one``, the i-th started no earlier than i * ``interval`` from now.

    A call that runs late delays the next one (the latency recorded is the call's own); calls
    not started by ``deadline`` are counted as ``not_run`` rather than silently dropped.
    """
    t0 = time.monotonic()
    for i in range(n):
        wait = t0 + i * interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.monotonic() >= deadline:
            for _ in range(n - i):
                tally.fail("not_run", "the phase deadline passed before this flow started")
            return
        await one()


class KeepAliveClient:
    """One pre-opened keep-alive connection running the measured tenant's flows, one at a time."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.conn: LeanConnection | None = None
        self.request = flow_request(MEASURED)

    async def open(self) -> None:
        self.conn = await asyncio.wait_for(LeanConnection.open(self.url), self.timeout_s)

    async def flow(self, tally: Tally) -> None:
        clock = time.perf_counter
        t0, started = clock(), time.monotonic()
        connecting = False
        try:
            if self.conn is None or self.conn.reader.at_eof():
                if self.conn is not None:  # the server closed it while idle: what a client pool would do
                    tally.reopened += 1
                    await self.close()
                connecting = True
                t0 = clock()
                await self.open()
                connecting = False
            assert self.conn is not None
            status, payload = await asyncio.wait_for(self.conn.post(self.request), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - counted, never hidden
            tally.fail(failure_kind(exc, connecting), error_text(exc))
            await self.close()
            return
        elapsed = clock() - t0
        kind = check_answer(status, payload)
        if kind is None:
            tally.ok(started, elapsed)
        else:
            tally.fail(kind, payload[:200].decode(errors="replace"))
            if status != 200:
                await self.close()  # a 503 may come with Connection: close

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.wait_closed(), 2)


async def fresh_flow(url: str, timeout_s: float, tally: Tally, request: bytes) -> None:
    """One measured flow on a connection opened for it (connect time included), then closed."""
    clock = time.perf_counter
    t0, started = clock(), time.monotonic()
    conn: LeanConnection | None = None
    try:
        conn = await asyncio.wait_for(LeanConnection.open(url), timeout_s)
    except Exception as exc:  # noqa: BLE001
        tally.fail(failure_kind(exc, True), error_text(exc))
        return
    try:
        status, payload = await asyncio.wait_for(conn.post(request), timeout_s)
    except Exception as exc:  # noqa: BLE001
        tally.fail(failure_kind(exc, False), error_text(exc))
        return
    finally:
        conn.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.writer.wait_closed(), 2)
    elapsed = clock() - t0
    kind = check_answer(status, payload)
    if kind is None:
        tally.ok(started, elapsed)
    else:
        tally.fail(kind, payload[:200].decode(errors="replace"))


async def measure(url: str, keepalive: list[KeepAliveClient], flows: int, seconds: float,
                  timeout_s: float) -> dict[str, Any]:
    """``flows`` flows over the keep-alive clients and ``flows`` on new connections, paced over ``seconds``."""
    deadline = time.monotonic() + seconds * 3 + timeout_s + 10
    ka, fresh = Tally(), Tally()
    per_client = [flows // len(keepalive) + (1 if i < flows % len(keepalive) else 0) for i in range(len(keepalive))]
    request = flow_request(MEASURED, close=True)
    origin = time.monotonic()
    t0 = time.perf_counter()
    await asyncio.gather(
        *(paced(n, seconds / max(n, 1), deadline, lambda c=c: c.flow(ka), ka)
          for c, n in zip(keepalive, per_client)),
        paced(flows, seconds / max(flows, 1), deadline, lambda: fresh_flow(url, timeout_s, fresh, request), fresh),
    )
    elapsed = time.perf_counter() - t0
    both = Tally(ka.latencies + fresh.latencies, ka.started + fresh.started)
    for t in (ka, fresh):
        for k, v in t.errors.items():
            both.errors[k] = both.errors.get(k, 0) + v
        both.examples += t.examples
    both.examples = both.examples[:5]
    return {"keepalive": ka.report(flows, elapsed, origin), "new_connection": fresh.report(flows, elapsed, origin),
            "all": both.report(2 * flows, elapsed, origin), "seconds": elapsed, "origin": origin,
            "keepalive_connections": len(keepalive)}


# -- the sidecar's footprint ----------------------------------------------------------------------


class SidecarSampler:
    """Samples the serve process (RSS, open fds) and its workers (RSS, count) on a thread.

    Peaks are kept per phase (``phase`` is set by the run); a thread, so a slow /proc walk delays
    no flow of the measuring event loop.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.phase = "start"
        self.phases: dict[str, dict[str, Any]] = {}
        self.timeline: list[list[Any]] = []
        self.last: dict[str, Any] = {}
        self.errors = 0
        self.workers_seen: set[tuple[int, float]] = set()  # (pid, create time): checked for leftovers at the end
        self._phase_start = self._cpu_mark()
        self._t0 = time.monotonic()
        self._next_point = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sidecar-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> dict[str, Any]:
        try:
            with self.proc.oneshot():
                rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
            kids = self.proc.children(recursive=True)
        except psutil.Error:
            self.errors += 1
            return self.last
        kids_rss = 0
        for k in kids:
            with contextlib.suppress(psutil.Error):
                kids_rss += k.memory_info().rss
                if len(self.workers_seen) < 100_000:
                    self.workers_seen.add((k.pid, k.create_time()))
        s = {"rss_mb": rss / 2**20, "fds": fds, "workers": len(kids), "workers_rss_mb": kids_rss / 2**20}
        with self._lock:
            self.last = s
            peak = self.phases.setdefault(self.phase, {"samples": 0, **{f"peak_{k}": v for k, v in s.items()}})
            peak["samples"] += 1
            for k, v in s.items():
                peak[f"peak_{k}"] = max(peak[f"peak_{k}"], v)
            peak.update({f"last_{k}": v for k, v in s.items()})
            t = time.monotonic() - self._t0
            if t >= self._next_point:  # the timeline at 1 s resolution: enough to see a trend
                self._next_point = t + 1.0
                self.timeline.append([round(t, 1), self.phase, round(s["rss_mb"], 1), fds, len(kids),
                                      round(s["workers_rss_mb"], 1)])
        return s

    def _cpu_mark(self) -> tuple[float, float, float, float]:
        """(wall, sidecar CPU s, machine busy s, machine total s): what a phase's CPU figures are deltas of."""
        try:
            t = self.proc.cpu_times()
            own = t.user + t.system
        except psutil.Error:
            own = float("nan")
        m = psutil.cpu_times()
        total = sum(m)
        return time.monotonic(), own, total - m.idle - getattr(m, "iowait", 0.0), total

    def set_phase(self, phase: str) -> dict[str, Any]:
        """Close the current phase (a fresh sample, its CPU use) and start the next one."""
        s = self.sample()
        mark = self._cpu_mark()
        w0, own0, busy0, total0 = self._phase_start
        with self._lock:
            peak = self.phases.setdefault(self.phase, {"samples": 0})
            peak["wall_s"] = round(mark[0] - w0, 2)
            peak["sidecar_cpu_s"] = round(mark[1] - own0, 2)  # the serve process only (not its workers)
            peak["machine_busy_pct"] = round(100 * (mark[2] - busy0) / max(mark[3] - total0, 1e-9), 1)
            self.phase = phase
            self._phase_start = mark
        return s

    def __enter__(self) -> "SidecarSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- the attacker (a separate process, so its work is not the measuring loop's) --------------------


class Held(asyncio.Protocol):
    """One unauthenticated connection held open: idle (never a byte) or slowloris (a head never finished)."""

    def __init__(self, flood: "Flood", kind: str) -> None:
        self.flood, self.kind = flood, kind
        self.transport: asyncio.Transport | None = None
        self.opened_at = 0.0
        self.lines = 0
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.opened_at = time.monotonic()
        self.flood.open[self.kind] += 1
        self.flood.live.add(self)
        if self.kind == "slowloris":
            transport.write(f"POST /v1/tenants/{MEASURED}/flows/{TRIGGER} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())

    def tick(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.lines += 1
            self.transport.write(f"X-Slow-{self.lines}: {random.getrandbits(32):08x}\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if not self.answered:  # what the server said before hanging up (408, 400, 431, 503...)
            self.answered = True
            status = data[9:12].decode(errors="replace") if data.startswith(b"HTTP/1.") else "other"
            key = f"{self.kind}:{status}"
            self.flood.answers[key] = self.flood.answers.get(key, 0) + 1

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.flood.open[self.kind] -= 1
        self.flood.live.discard(self)
        if self.flood.stopping:
            return
        lived = time.monotonic() - self.opened_at
        self.flood.closed[self.kind] += 1
        lifetimes = self.flood.lifetimes[self.kind]
        if len(lifetimes) < 20000:
            lifetimes.append(lived)
        self.flood.reopen(self.kind, lived)


class Flood:
    """``n`` unauthenticated connections kept open; each one the server closes is opened again."""

    def __init__(self, host: str, port: int, n: int, slowloris_share: float) -> None:
        self.host, self.port = host, port
        self.n_slow = round(n * slowloris_share)
        self.n_idle = n - self.n_slow
        self.open = {"idle": 0, "slowloris": 0}
        self.closed = {"idle": 0, "slowloris": 0}
        self.lifetimes: dict[str, list[float]] = {"idle": [], "slowloris": []}
        self.answers: dict[str, int] = {}
        self.connect_errors: dict[str, int] = {}
        self.connects = 0
        self.reopens = 0
        self.live: set[Held] = set()
        self.stopping = False
        self.gate = asyncio.Semaphore(256)  # connects in progress at once
        self.tasks: set[asyncio.Task[None]] = set()

    async def connect(self, kind: str, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self.stopping:
            async with self.gate:
                if self.stopping:
                    return
                try:
                    await asyncio.wait_for(loop.create_connection(lambda: Held(self, kind), self.host, self.port), 5)
                    self.connects += 1
                    return
                except Exception as exc:  # noqa: BLE001 - counted; the slot is retried
                    key = failure_kind(exc, True)
                    self.connect_errors[key] = self.connect_errors.get(key, 0) + 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reopen(self, kind: str, lived: float) -> None:
        """Hold the pressure: open another connection of the same kind (later if it died young)."""
        self.reopens += 1
        self.spawn(self.connect(kind, 0.05 if lived > 1.0 else 0.5 + random.random()))

    async def start(self) -> None:
        """Open every connection once (failures retried with backoff); returns when all were tried."""
        kinds = ["idle"] * self.n_idle + ["slowloris"] * self.n_slow
        random.shuffle(kinds)
        await asyncio.gather(*(self.connect(k) for k in kinds))

    async def slowloris_ticker(self) -> None:
        """About one header line per slowloris connection per second, spread over the second."""
        slices = 20
        while not self.stopping:
            conns = [h for h in self.live if h.kind == "slowloris"]
            for i in range(slices):
                for h in conns[i::slices]:
                    h.tick()
                await asyncio.sleep(1.0 / slices)
                if self.stopping:
                    return

    def status(self) -> dict[str, Any]:
        return {"open": dict(self.open), "open_total": sum(self.open.values()), "closed_by_server": dict(self.closed),
                "server_answers": dict(sorted(self.answers.items())), "connect_errors": dict(self.connect_errors),
                "connects": self.connects, "reopens": self.reopens}

    def final(self) -> dict[str, Any]:
        out = self.status()
        life = {}
        for kind, xs in self.lifetimes.items():
            if xs:
                s = sorted(xs)
                life[kind] = {"n": len(s), "p50_s": percentile(s, 50), "p99_s": percentile(s, 99), "max_s": s[-1]}
        out["lifetime_of_server_closed"] = life
        return out

    async def stop(self) -> None:
        self.stopping = True
        for h in list(self.live):
            if h.transport is not None:
                h.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


@dataclass
class Background:
    """A tenant's flows kept in flight by ``concurrency`` keep-alive clients; outcomes tallied."""

    name: str
    url: str
    concurrency: int
    rate: float = 0.0  # flows per second over all clients; 0: as fast as answers come
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    bytes_read: int = 0
    stopping: bool = False

    async def client(self) -> None:
        request = flow_request(self.name)
        conn: LeanConnection | None = None
        interval = self.concurrency / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic() + random.random() * interval
        while not self.stopping:
            if interval:  # paced: a late flow shifts the schedule rather than bursting to catch up
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic()) + interval
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(LeanConnection.open(self.url), 10)
                status, payload = await asyncio.wait_for(conn.post(request), 30)
                key = str(status) if status != 200 or b'"outcome":"allow"' in payload else "200-not-allow"
                self.bytes_read += len(payload)
                if status == 200:
                    self.latencies.append(time.perf_counter() - t0)
                else:
                    conn.writer.close()
                    conn = None
                    await asyncio.sleep(0.2)  # a refusal: back off like a client would
            except Exception as exc:  # noqa: BLE001 - counted
                key = failure_kind(exc, conn is None)
                if conn is not None:
                    conn.writer.close()
                conn = None
                await asyncio.sleep(0.2)
            self.statuses[key] = self.statuses.get(key, 0) + 1
        if conn is not None:
            conn.writer.close()

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": self.concurrency, "rate_per_s": self.rate or None, "flows": self.done, "statuses": dict(self.statuses),
                               "bytes_read": self.bytes_read}
        if self.latencies:
            s = sorted(self.latencies)
            out["p50_ms"] = percentile(s, 50) * 1000
            out["max_ms"] = s[-1] * 1000
        return out


async def attacker(spec: dict[str, Any]) -> None:
    """The attacker process: flood + slow tenant + hoarder until stdin says stop (or closes).

    Speaks JSON lines on stdout: ``status`` every half second, ``ready`` once every connection
    was tried and both tenants answered once, ``final`` after everything it opened is closed.
    """
    raise_nofile_limit()
    if spec.get("nice"):
        # Stands for an attacker on other machines: its own CPU then competes with the sidecar only for
        # what the kernel leaves it (on a real host it is not the sidecar's CPU at all).
        os.nice(int(spec["nice"]))
    host, port = spec["url"].split("//", 1)[1].split(":")
    flood = Flood(host, int(port), spec["connections"], spec["slowloris_share"])
    slow = Background(SLOW, spec["url"], spec["slow_inflight"])
    hoard = Background(HOARDER, spec["url"], spec["hoarder_concurrency"], spec["hoarder_rate"])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(kind: str, **body: Any) -> None:
        sys.stdout.write(json.dumps({"type": kind, **body}) + "\n")
        sys.stdout.flush()

    def snapshot() -> dict[str, Any]:
        return {"flood": flood.status(), "slow": slow.status(), "hoarder": hoard.status()}

    async def watch_stdin() -> None:
        await reader.readline()  # "stop", or EOF when the parent went away
        stop.set()

    async def report() -> None:
        while not stop.is_set():
            emit("status", **snapshot())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    t0 = time.monotonic()
    aux = [asyncio.ensure_future(c) for c in (watch_stdin(), report())]
    work = [asyncio.ensure_future(slow.client()) for _ in range(slow.concurrency)]
    work += [asyncio.ensure_future(hoard.client()) for _ in range(hoard.concurrency)]
    opening = asyncio.ensure_future(flood.start())
    await asyncio.wait([opening, aux[0]], return_when=asyncio.FIRST_COMPLETED)
    ticker = asyncio.ensure_future(flood.slowloris_ticker())
    opened_in = time.monotonic() - t0
    while (not stop.is_set() and ((slow.concurrency and not slow.done) or (hoard.concurrency and not hoard.done))
           and time.monotonic() - t0 < 60):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    emit("ready", opened_in_s=opened_in, **snapshot())
    await stop.wait()
    flood_final = flood.final()
    slow.stopping = hoard.stopping = True
    opening.cancel()
    ticker.cancel()
    await flood.stop()
    for t in work:
        t.cancel()
    await asyncio.wait(work + [opening, ticker], timeout=5)
    for t in aux:
        t.cancel()
    cpu = psutil.Process().cpu_times()
    emit("final", flood=flood_final, slow=slow.status(), hoarder=hoard.status(),
         fds_at_exit=psutil.Process().num_fds(), cpu_s=round(cpu.user + cpu.system, 2),
         wall_s=round(time.monotonic() - t0, 1))


class AttackerProcess:
    """The parent's handle on the attacker: start it, follow its status lines, stop it, always."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.status: dict[str, Any] = {}
        self.ready: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.open_seen: list[int] = []  # open attack connections, per status line during the measurement
        self.timeline: list[tuple[float, int, int]] = []  # (monotonic, open, closed by the server so far)
        self.recording = False
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, timeout_s: float) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actionpool.benchmarks.sidecar_attack", "--attacker", json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 22)
        self._reader = asyncio.ensure_future(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the attacker was not ready within {timeout_s:.0f}s: {self.status}") from None
        if self.ready is None:
            raise RuntimeError(f"the attacker exited before it was ready (status {self.proc.returncode})")
        return self.ready

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            kind = msg.pop("type")
            if kind == "status":
                self.status = msg
                flood = msg["flood"]
                self.timeline.append((time.monotonic(), flood["open_total"], sum(flood["closed_by_server"].values())))
                if self.recording:
                    self.open_seen.append(msg["flood"]["open_total"])
            elif kind == "ready":
                self.ready = self.status = msg
                self._ready.set()
            elif kind == "final":
                self.final = msg
        self._ready.set()

    async def wait_for(self, what: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
        """Poll the attacker's latest status until ``what`` holds or ``timeout_s`` passes."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.status and what(self.status):
                return True
            if self.proc is None or self.proc.returncode is not None:
                return False
            await asyncio.sleep(0.1)
        return False

    async def stop(self, timeout_s: float = 20) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return self.final


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Knobs:
    connections: int
    flows: int
    phase_seconds: float
    keepalive_connections: int
    slow_inflight: int
    slow_seconds: float
    hoarder_concurrency: int
    hoarder_rate: float
    hoarder_runs: int
    slowloris_share: float
    flow_timeout_s: float
    server_options: dict[str, str]
    sidecar_nofile: int | None
    attacker_nice: int = 0


def write_config(tmp: Path, knobs: Knobs) -> Path:
    """The sidecar's config: the token, three tenants, default [server] settings plus any given."""
    actions = tmp / "actions"
    actions.mkdir()
    (actions / "tag.py").write_text(SRC_TRIVIAL)
    (actions / "nap.py").write_text(SRC_SLOW % knobs.slow_seconds)
    (actions / "hoard.py").write_text(SRC_HOARDER)
    extra = "".join(f"{k} = {v}\n" for k, v in knobs.server_options.items())
    cfg = tmp / "serve.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        token_env = "{TOKEN_ENV}"
    """) + extra + textwrap.dedent(f"""
        [tenants.{MEASURED}.actions.tag]
        file = "actions/tag.py"
        [tenants.{MEASURED}.flows]
        {TRIGGER} = ["tag"]
        [tenants.{SLOW}.actions.nap]
        file = "actions/nap.py"
        [tenants.{SLOW}.flows]
        {TRIGGER} = ["nap"]
        [tenants.{HOARDER}.actions.hoard]
        file = "actions/hoard.py"
        [tenants.{HOARDER}.flows]
        {TRIGGER} = ["hoard"]
    """))
    return cfg


def _history_size(server_options: dict[str, str]) -> int:
    with contextlib.suppress(ValueError):
        return int(server_options.get("history_size", "100"))
    return 100


async def run_phases(url: str, sampler: SidecarSampler, knobs: Knobs, verbose: bool) -> dict[str, Any]:
    """Warm-up, the quiet phase, then the attack phase; every figure of both."""
    out: dict[str, Any] = {}

    def say(msg: str) -> None:
        if verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    keepalive = [KeepAliveClient(url, knobs.flow_timeout_s) for _ in range(knobs.keepalive_connections)]
    for c in keepalive:
        await c.open()
    attack: AttackerProcess | None = None
    try:
        say("warm-up")
        warm = await measure(url, keepalive, 40, 1.0, knobs.flow_timeout_s)
        if warm["all"]["failed"]:
            raise RuntimeError(f"the warm-up failed: {warm['all']['error_examples']}")
        sampler.set_phase("quiet")
        say(f"quiet: {knobs.flows} + {knobs.flows} flows over {knobs.phase_seconds:.0f}s")
        out["quiet"] = await measure(url, keepalive, knobs.flows, knobs.phase_seconds, knobs.flow_timeout_s)
        out["quiet"]["sidecar"] = sampler.set_phase("ramp")

        spec = {"url": url, "connections": knobs.connections, "slowloris_share": knobs.slowloris_share,
                "nice": knobs.attacker_nice,
                "slow_inflight": knobs.slow_inflight, "hoarder_concurrency": knobs.hoarder_concurrency,
                "hoarder_rate": knobs.hoarder_rate}
        attack = AttackerProcess(spec)
        say(f"attack: opening {knobs.connections} connections, {knobs.slow_inflight} slow flows, hoarder")
        ready = await attack.start(timeout_s=90)
        out["attack_setup"] = {"opened_in_s": ready["opened_in_s"], "flood": ready["flood"]}
        sampler.set_phase("attack")
        attack.recording = True
        say(f"attack: {ready['flood']['open_total']} open; measuring")
        out["attack"] = await measure(url, keepalive, knobs.flows, knobs.phase_seconds, knobs.flow_timeout_s)
        attack.recording = False
        out["attack"]["sidecar"] = sampler.set_phase("hold")
        out["attack"]["attack_open_during_measurement"] = (
            {"min": min(attack.open_seen), "max": max(attack.open_seen)} if attack.open_seen else None)
        origin = out["attack"]["origin"]  # [s from the measurement's start, open, closed by the server so far]
        out["attack"]["attacker_timeline"] = [[round(t - origin, 1), o, c] for t, o, c in attack.timeline]
        # Hold the attack until the hoarder has filled the history (bounded; the report says how far it got).
        if knobs.hoarder_concurrency:
            say(f"attack: waiting for {knobs.hoarder_runs} hoarder runs")
            out["hoarder_reached_target"] = await attack.wait_for(
                lambda s: s["hoarder"]["flows"] >= knobs.hoarder_runs, timeout_s=max(30.0, knobs.phase_seconds * 2))
    finally:
        say("stopping the attacker")
        sampler.set_phase("stop")
        final = await attack.stop() if attack is not None else None
        for c in keepalive:
            await c.close()
    out["attacker"] = final
    # After the attack: the sidecar's fds should come back near the quiet level (polled, bounded).
    quiet_fds = out["quiet"]["sidecar"].get("fds", 0)
    end = time.monotonic() + 10
    while time.monotonic() < end and sampler.sample().get("fds", 0) > quiet_fds + 16:
        await asyncio.sleep(0.1)
    out["after"] = sampler.sample()
    return out


def sidecar_log_findings(log: Path) -> dict[str, Any]:
    """What the sidecar's own output says about fds and errors (EMFILE is exhaustion, whatever the peak)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = text.splitlines()
    emfile = [ln for ln in lines if "Too many open files" in ln or "EMFILE" in ln]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "Traceback", "CRITICAL")) or " ERROR " in ln]
    raised = [ln for ln in lines if ln and not ln.startswith((" ", "Traceback", "handle:")) and ":" in ln
              and ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return {"lines": len(lines), "emfile_lines": len(emfile), "error_lines": len(errors),
            "first_emfile": emfile[0][:300] if emfile else None, "first_error": errors[0][:300] if errors else None,
            "exceptions": {k: raised.count(k) for k in sorted(set(raised))[:10]}, "tail": lines[-15:]}


def targets(res: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it was met (None: not measured)."""
    rows = []
    for mode in ("all", "keepalive", "new_connection"):
        q, a = res["quiet"][mode].get("p99_ms"), res["attack"][mode].get("p99_ms")
        r = ratio(a, q)
        rows.append({"id": f"p99_ratio.{mode}", "what": f"measured p99 under attack / quiet ({mode})",
                     "value": r, "target": f"<= {TARGET_P99_RATIO:g}x",
                     "met": None if r is None else r <= TARGET_P99_RATIO})
    failed = res["attack"]["all"]["failed"]
    rows.append({"id": "measured_errors", "what": "measured flows under attack without a 200 allow",
                 "value": failed, "target": "0", "met": failed == 0})
    quiet_rss = res["quiet"]["sidecar"].get("rss_mb")
    peak_rss = attack_peaks(res["sidecar"]["phases"]).get("rss_mb")
    growth = None if quiet_rss is None or peak_rss is None else peak_rss - quiet_rss
    rows.append({"id": "rss_growth_mb", "what": "sidecar RSS: attack peak - quiet", "value": growth,
                 "target": f"< {TARGET_RSS_GROWTH_MB:g} MB", "met": None if growth is None else growth < TARGET_RSS_GROWTH_MB})
    peak_fds = max((p.get("peak_fds", 0) for p in res["sidecar"]["phases"].values()), default=0)
    emfile = res["sidecar"]["log"]["emfile_lines"]
    rows.append({"id": "fds_peak", "what": f"sidecar fds peak (of RLIMIT_NOFILE {limit}); EMFILE lines {emfile}",
                 "value": peak_fds, "target": f"< {limit}, no EMFILE",
                 "met": peak_fds < limit and emfile == 0})
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render(res: dict[str, Any]) -> str:
    """The console table: the measured tenant quiet vs attack, the sidecar's footprint, the targets."""
    lines = [f"{'measured tenant':<26}{'n ok':>7}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}  errors"]
    for phase in ("quiet", "attack"):
        for mode in ("keepalive", "new_connection", "all"):
            m = res[phase][mode]
            lines.append(f"{phase + ' ' + mode:<26}{m['answered']:>7,}{m['failed']:>8,}{_fmt(m.get('p50_ms'), 3):>10}"
                         f"{_fmt(m.get('p99_ms'), 3):>10}{_fmt(m.get('max_ms'), 1):>10}  {m['errors'] or ''}")
    lines.append("")
    lines.append(f"{'sidecar':<26}{'rss MB':>10}{'fds':>8}{'workers':>9}{'wrk rss MB':>12}{'cpu s/wall':>13}{'machine busy':>14}")
    phases = res["sidecar"]["phases"]
    for label, s, ph in (("quiet (end)", res["quiet"]["sidecar"], phases.get("quiet", {})),
                         ("attack (peak)", attack_peaks(phases), phases.get("attack", {})),
                         ("after the attack", res["after"], {})):
        cpu = f"{ph['sidecar_cpu_s']:.1f}/{ph['wall_s']:.0f}s" if "wall_s" in ph else "-"
        busy = f"{ph['machine_busy_pct']:.0f} %" if "machine_busy_pct" in ph else "-"
        lines.append(f"{label:<26}{_fmt(s.get('rss_mb'), 1):>10}{_fmt(s.get('fds')):>8}{_fmt(s.get('workers')):>9}"
                     f"{_fmt(s.get('workers_rss_mb'), 1):>12}{cpu:>13}{busy:>14}")
    atk = res.get("attacker") or {}
    fl = atk.get("flood") or {}
    lines.append("")
    lines.append(f"attack connections: {res['knobs']['connections']:,} asked, "
                 f"{_fmt((res['attack'].get('attack_open_during_measurement') or {}).get('min'))}-"
                 f"{_fmt((res['attack'].get('attack_open_during_measurement') or {}).get('max'))} open while measuring; "
                 f"closed by the server {fl.get('closed_by_server')}; its answers {fl.get('server_answers')}; "
                 f"connect errors {fl.get('connect_errors')}; reopened {fl.get('reopens')}")
    for name in ("slow", "hoarder"):
        b = atk.get(name) or {}
        lines.append(f"{name} tenant: {b.get('flows')} flows ({b.get('concurrency')} in flight), statuses "
                     f"{b.get('statuses')}, p50 {_fmt(b.get('p50_ms'), 1)} ms, {_fmt(b.get('bytes_read', 0) / 2**20, 0)} MiB read")
    lg = res["sidecar"]["log"]
    lines.append(f"sidecar log: {lg['lines']} lines, {lg['error_lines']} errors, {lg['emfile_lines']} EMFILE; "
                 f"exit status {res['sidecar'].get('exit_code')}"
                 + (f"; first error: {lg['first_error']}" if lg["first_error"] else "")
                 + (f"; exceptions: {lg['exceptions']}" if lg["exceptions"] else ""))
    lines.append("")
    lines.append(f"{'target':<58}{'value':>12}  {'target':<22}verdict")
    for t in res["targets"]:
        v = t["value"]
        shown = f"{v:.2f}x" if t["id"].startswith("p99_ratio") and v is not None else _fmt(v, 1)
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"{t['what']:<58}{shown:>12}  {t['target']:<22}{verdict}")
    return "\n".join(lines)


ATTACK_PHASES = ("ramp", "attack", "hold")  # from the first attack connection to the attacker's stop


def attack_peaks(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each figure's peak over the attack's phases (opening the connections included)."""
    out: dict[str, Any] = {}
    for name in ATTACK_PHASES:
        for k, v in phases.get(name, {}).items():
            if k.startswith("peak_"):
                out[k[5:]] = max(out.get(k[5:], v), v)
    return out


def run(knobs: Knobs, preset: str, verbose: bool) -> dict[str, Any]:
    """Start the sidecar, run both phases, stop everything; the report (raises only on a harness failure)."""
    me = psutil.Process()
    fds_before = me.num_fds()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sidecar-attack-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = write_config(tmp, knobs)
        log = tmp / "serve.log"
        popen: dict[str, Any] = {}
        if knobs.sidecar_nofile is not None:
            n = knobs.sidecar_nofile
            # Soft and hard: the sidecar lifts its soft limit to the hard one by itself.
            popen["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        with open(log, "wb") as log_fh:
            # The sidecar keeps the fd limit this process was given; ours is raised only after, for the clients.
            try:
                proc, url = spawn_sidecar(cfg, {TOKEN_ENV: TOKEN}, stdout=log_fh, stderr=subprocess.STDOUT, **popen)
            except RuntimeError as exc:
                tail = " | ".join(sidecar_log_findings(log)["tail"][-5:])
                raise RuntimeError(f"{exc}: {tail}") from None
        ours = raise_nofile_limit()
        res: dict[str, Any] = {"schema": SCHEMA}
        sampler: SidecarSampler | None = None
        try:
            limit = psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            with SidecarSampler(proc.pid) as sampler:
                res.update(asyncio.run(run_phases(url, sampler, knobs, verbose)))
            res["sidecar"] = {"pid": proc.pid, "nofile_limit": limit, "phases": sampler.phases,
                              "timeline": sampler.timeline, "sample_errors": sampler.errors}
        finally:
            exit_code = stop_sidecar(proc)
            leftovers = kill_leftovers()
            survivors = kill_survivors(sampler.workers_seen) if sampler is not None else []
        port = int(url.rsplit(":", 1)[1])
        res["sidecar"]["exit_code"] = exit_code
        res["sidecar"]["log"] = sidecar_log_findings(log)
    res["cleanup"] = {"leftover_processes_killed": leftovers, "sidecar_workers_outliving_it": survivors,
                      "port_still_open": _port_open(port),
                      "benchmark_fds_before": fds_before, "benchmark_fds_after": me.num_fds()}
    res["knobs"] = {**knobs.__dict__, "server_options": knobs.server_options}
    res["meta"] = {"preset": preset, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                   "duration_s": round(time.time() - started, 1), "cpus": os.cpu_count(),
                   "python": platform.python_version(), "commit": _commit(),
                   "benchmark_nofile": list(ours), "loadavg_at_end": list(os.getloadavg())}
    res["targets"] = targets(res, res["sidecar"]["nofile_limit"])
    return res


def kill_survivors(seen: set[tuple[int, float]], grace_s: float = 5.0) -> list[str]:
    """SIGKILL every process the sidecar started that is still there ``grace_s`` after it exited.

    Same pid and start time, so a recycled pid is never touched; a zombie is not counted (its
    parent is gone and init reaps it). The survivors' descriptions, for the report.
    """
    def alive() -> list[psutil.Process]:
        out = []
        for pid, created in seen:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    end = time.monotonic() + grace_s
    left = alive()
    while left and time.monotonic() < end:  # a worker may still be on its way out
        time.sleep(0.1)
        left = alive()
    found = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            found.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    psutil.wait_procs(left, timeout=3)
    return found


def stop_sidecar(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (the drain), then SIGKILL if it has not exited within 30 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip() or None
    return f"{head}+dirty" if head and dirty.stdout.strip() else head


def _server_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a TOML value), got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidecar_attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer connections and flows: a smoke run (~40 s)")
    p.add_argument("--json", metavar="FILE", help=f"the report as JSON (full runs default to {RESULTS.name} "
                                                  "in benchmarks/results/)")
    p.add_argument("--connections", type=int, help="unauthenticated connections held open (5000; quick 1000)")
    p.add_argument("--flows", type=int, help="measured flows per client mode per phase (500; quick 100)")
    p.add_argument("--phase-seconds", type=float, help="each phase's flows are paced over this long (30; quick 5)")
    p.add_argument("--slow-inflight", type=int, help="slow tenant's flows kept in flight (32; quick 8; 0: none)")
    p.add_argument("--slow-seconds", type=float, default=1.0, help="the slow action's nap (1.0)")
    p.add_argument("--hoarder-concurrency", type=int, default=2, help="hoarder clients (0: no hoarder)")
    p.add_argument("--hoarder-rate", type=float, default=10.0, help="hoarder flows per second, ~2 MB each "
                                                                     "(10; 0: as fast as the sidecar answers)")
    p.add_argument("--hoarder-runs", type=int, help="hoarder flows to reach before the end (history_size + 20; "
                                                    "quick 20)")
    p.add_argument("--slowloris-share", type=float, default=0.5, help="share of attack connections that trickle "
                                                                      "a head (the rest are idle)")
    p.add_argument("--keepalive-connections", type=int, default=2)
    p.add_argument("--flow-timeout", type=float, default=15.0, help="a measured flow without an answer by then "
                                                                     "is counted as a timeout")
    p.add_argument("--server-option", action="append", type=_server_option, default=[], metavar="KEY=VALUE",
                   help="an extra [server] key for the sidecar's config (repeatable), e.g. history_size=50")
    p.add_argument("--sidecar-nofile", type=int, help="the sidecar's RLIMIT_NOFILE, soft and hard (default: "
                                                       "inherited)")
    p.add_argument("--attacker-nice", type=int, default=0, metavar="N",
                   help="run the attacker process (flood, slow tenant, hoarder) at this nice value (0; 19 "
                        "stands for an attacker whose CPU is on other machines, as it would be in production)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--attacker", help=argparse.SUPPRESS)  # internal: run as the attacker process
    args = p.parse_args(argv)
    if args.attacker:
        asyncio.run(attacker(json.loads(args.attacker)))
        return 0
    quick = args.quick
    server_options = dict(args.server_option)

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    knobs = Knobs(
        connections=pick(args.connections, 5000, 1000), flows=pick(args.flows, 500, 100),
        phase_seconds=pick(args.phase_seconds, 30.0, 5.0), keepalive_connections=args.keepalive_connections,
        slow_inflight=pick(args.slow_inflight, 32, 8), slow_seconds=args.slow_seconds,
        hoarder_concurrency=args.hoarder_concurrency, hoarder_rate=args.hoarder_rate,
        hoarder_runs=pick(args.hoarder_runs, _history_size(server_options) + 20, 20),
        slowloris_share=args.slowloris_share, flow_timeout_s=args.flow_timeout, server_options=server_options,
        sidecar_nofile=args.sidecar_nofile, attacker_nice=args.attacker_nice)
    if not 0 <= knobs.attacker_nice <= 19:
        p.error("--attacker-nice must be within 0..19")
    for name in ("connections", "flows", "keepalive_connections", "slow_inflight", "hoarder_concurrency",
                 "hoarder_rate"):
        if getattr(knobs, name) < (1 if name in ("flows", "keepalive_connections") else 0):
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(knobs, name)}")
    if not 0 <= knobs.slowloris_share <= 1:
        p.error("--slowloris-share must be within 0..1")
    try:
        res = run(knobs, "quick" if quick else "full", args.verbose)
    except Exception as exc:  # noqa: BLE001 - the harness failed: say why, exit 1
        print(f"sidecar_attack: error: {error_text(exc)}", file=sys.stderr)
        return 1
    print(render(res))
    out = args.json or (None if quick else str(RESULTS))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1, default=str))
        print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
