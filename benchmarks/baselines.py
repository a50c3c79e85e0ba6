"""The peers: the same trivial function run the ways actionpool could have been built.

Each baseline runs ``trivial(event)`` (a small dict in, ``{"ok": True}`` out):
in-process (the floor), through ``concurrent.futures.ProcessPoolExecutor``,
through ``pebble.ProcessPool`` with a per-task timeout (the closest peer: it
can kill a runaway task), in a fresh interpreter per call (how codejail does
it), and as a bare 64-byte echo over ``os.pipe`` to a child process (no
serialisation, no dispatch: the physical limit of any pipe-based design).

Every phase: a single-client latency row (one call at a time) and, except the
direct call, a throughput row with 64 submissions in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from ._harness import Deadline, PhaseTimeout, Recorder, futures_closed_loop, timed_loop
from ._stats import summarize

EVENT: dict[str, Any] = {
    "user": {"user_id": "u-1", "email": "ada@example.com", "app_metadata": {"tier": "free"}},
    "request": {"ip": "127.0.0.1", "geo": {"country": "DE"}},
}
OK = {"ok": True}
TASK_TIMEOUT_S = 5.0  # per-task timeout given to pebble; also the bound on any single wait


def trivial(event: dict[str, Any]) -> dict[str, Any]:
    """The work every baseline runs: nothing, so what is measured is the machinery around it."""
    return {"ok": True}


def _check_ok(result: Any) -> None:
    if result != OK:
        raise RuntimeError(f"unexpected result {result!r:.80}")


# -- direct call ---------------------------------------------------------------------------------


def phase_direct(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    with rec.row("direct.latency") as row:
        n = knobs["iterations"] * 10
        call = functools.partial(trivial, EVENT)
        timed_loop(call, min(n, 1000), deadline, "direct warm-up")
        row.update(timed_loop(call, n, deadline, "direct call"))


# -- ProcessPoolExecutor -------------------------------------------------------------------------


def _warm(submit: Any, n: int, deadline: Deadline) -> None:
    """Start every worker and fault in the code paths before the clock runs."""
    futs = [submit() for _ in range(n)]
    for f in futs:
        _check_ok(f.result(timeout=deadline.left("warm-up")))


def phase_ppe(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    ex = concurrent.futures.ProcessPoolExecutor(max_workers=2)
    try:
        submit = functools.partial(ex.submit, trivial, EVENT)
        _warm(submit, 20, deadline)
        with rec.row("ppe.latency") as row:
            def call() -> None:
                _check_ok(submit().result(timeout=min(TASK_TIMEOUT_S, deadline.left("ppe call"))))
            row.update(timed_loop(call, knobs["iterations"], deadline, "ppe latency"))
            row["extra"]["start_method"] = ex._mp_context.get_start_method()  # type: ignore[attr-defined]
        with rec.row("ppe.throughput") as row:
            row.update(futures_closed_loop(submit, knobs["tasks"], knobs["concurrency"], deadline,
                                           "ppe throughput", _check_ok))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# -- pebble --------------------------------------------------------------------------------------


def phase_pebble(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    import pebble

    pool = pebble.ProcessPool(max_workers=2)
    try:
        def submit() -> Any:
            return pool.schedule(trivial, args=(EVENT,), timeout=TASK_TIMEOUT_S)

        _warm(submit, 20, deadline)
        with rec.row("pebble.latency") as row:
            def call() -> None:
                _check_ok(submit().result(timeout=min(TASK_TIMEOUT_S * 2, deadline.left("pebble call"))))
            row.update(timed_loop(call, knobs["iterations"], deadline, "pebble latency"))
            row["extra"]["pebble_version"] = getattr(pebble, "__version__", "?")
        with rec.row("pebble.throughput") as row:
            row.update(futures_closed_loop(submit, knobs["tasks"], knobs["concurrency"], deadline,
                                           "pebble throughput", _check_ok))
    finally:
        pool.close()
        pool.join(timeout=5)
        if pool.active:
            pool.stop()
            pool.join(timeout=5)


# -- a fresh interpreter per call (codejail) -----------------------------------------------------

# What codejail's jailed child does, minus the jail: read JSON, run the code, write JSON.
CHILD_CODE = (
    "import json, sys\n"
    "def f(event):\n"
    "    return {'ok': True}\n"
    "json.dump(f(json.load(sys.stdin)), sys.stdout)\n"
)
EVENT_JSON = json.dumps(EVENT).encode()


def _run_fresh_interpreter(deadline: Deadline) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD_CODE], input=EVENT_JSON, capture_output=True,
                          timeout=min(TASK_TIMEOUT_S * 4, deadline.left("subprocess call")))
    if proc.returncode != 0:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
    out = json.loads(proc.stdout)
    _check_ok(out)
    return out


def phase_subprocess(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    call = functools.partial(_run_fresh_interpreter, deadline)
    call()  # page the interpreter's files into the cache before the clock runs
    with rec.row("subprocess.latency") as row:
        row.update(timed_loop(call, knobs["subprocess_iterations"], deadline, "subprocess latency"))
        row["extra"]["python"] = sys.executable
    with rec.row("subprocess.throughput") as row:
        # Threads only wait on their child, so 64 threads is 64 interpreters starting at once.
        with concurrent.futures.ThreadPoolExecutor(max_workers=knobs["concurrency"]) as tpe:
            row.update(futures_closed_loop(functools.partial(tpe.submit, call), knobs["subprocess_tasks"],
                                           knobs["concurrency"], deadline, "subprocess throughput",
                                           _check_ok))


# -- raw pipe round trip -------------------------------------------------------------------------

ECHO_CODE = (
    "import os\n"
    "while True:\n"
    "    b = os.read(0, 65536)\n"
    "    if not b:\n"
    "        break\n"
    "    os.write(1, b)\n"
)
MSG = b"x" * 64


class _EchoChild:
    """A child process echoing whatever arrives on one os.pipe back on another.

    Reads in the measured loop are plain blocking ``os.read`` (a select per
    message would inflate the very figure we want); a timer that kills the
    child at the deadline turns a hang into EOF instead.
    """

    def __init__(self, deadline: Deadline) -> None:
        to_child_r, self.w = os.pipe()
        self.r, from_child_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_CODE], stdin=to_child_r, stdout=from_child_w,
                                     close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self.timer = threading.Timer(max(deadline.remaining(), 0.1), self.proc.kill)
        self.timer.daemon = True
        self.timer.start()

    def read(self, n: int) -> bytes:
        data = os.read(self.r, n)
        if not data:
            raise PhaseTimeout("echo child closed the pipe (killed at the phase deadline?)")
        return data

    def round_trip(self) -> None:
        os.write(self.w, MSG)
        got = 0
        while got < 64:
            got += len(self.read(64 - got))

    def close(self) -> None:
        self.timer.cancel()
        os.close(self.w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        os.close(self.r)


def _pipe_window(echo: _EchoChild, total: int, window: int, deadline: Deadline) -> dict[str, Any]:
    """Keep ``window`` 64-byte messages in flight; latency of each is write to its echo's last byte."""
    clock = time.perf_counter
    sent_at: collections.deque[float] = collections.deque()
    lat: list[float] = []
    sent = 0
    pending = 0  # bytes received that do not yet complete a message
    t_start = clock()
    while len(lat) < total:
        deadline.check("pipe throughput")
        while sent < total and len(sent_at) < window:
            sent_at.append(clock())
            os.write(echo.w, MSG)
            sent += 1
        pending += len(echo.read(64 * window))
        now = clock()
        while pending >= 64:
            pending -= 64
            lat.append(now - sent_at.popleft())
    return summarize(lat, clock() - t_start)


def phase_pipe(knobs: dict[str, Any], rec: Recorder, deadline: Deadline) -> None:
    echo = _EchoChild(deadline)
    try:
        for _ in range(200):
            echo.round_trip()
        with rec.row("pipe.latency") as row:
            row.update(timed_loop(echo.round_trip, knobs["iterations"] * 10, deadline, "pipe latency"))
            row["extra"]["message_bytes"] = 64
        with rec.row("pipe.throughput") as row:
            row.update(_pipe_window(echo, knobs["tasks"] * 10, knobs["concurrency"], deadline))
            row["extra"]["message_bytes"] = 64
    finally:
        echo.close()
