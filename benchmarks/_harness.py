"""Measurement plumbing shared by baselines and scenarios.

Rules every phase follows, enforced here: every wait has a deadline (a
benchmark must never hang), a failing row records its error and lets the next
row run, and rows reach disk as soon as they finish so a phase killed by the
parent's hard timeout still reports what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

import psutil

from ._stats import summarize


class PhaseTimeout(Exception):
    """A phase ran past its deadline; the row is reported as failed, the run goes on."""


class Deadline:
    """A point in monotonic time that every blocking call of a phase is bounded by."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def left(self, what: str) -> float:
        """Seconds left, at least a sliver; raises once the deadline has passed."""
        r = self.remaining()
        if r <= 0:
            raise PhaseTimeout(f"{what}: phase deadline of {self.seconds:.0f}s passed")
        return r

    def check(self, what: str) -> None:
        self.left(what)


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


class Recorder:
    """Collects a phase's rows and rewrites them to ``path`` after each one."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def row(self, row_id: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Yield a row dict to fill; an exception becomes the row's error, not the phase's."""
        row: dict[str, Any] = {"id": row_id, "error": None, "extra": {}, **fields}
        try:
            yield row
        except Exception as exc:  # the row failed; record why and keep measuring
            row["error"] = error_text(exc)
        except BaseException as exc:  # cancelled or interrupted: still say so, then propagate
            row["error"] = f"interrupted ({type(exc).__name__}) at the phase deadline"
            raise
        finally:
            self.rows.append(row)
            self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.rows, fh, default=str)
        os.replace(tmp, self.path)


# -- closed loops --------------------------------------------------------------------------------


def timed_loop(call: Callable[[], Any], n: int, deadline: Deadline, what: str) -> dict[str, Any]:
    """One client, ``n`` calls back to back: the per-call latency distribution."""
    lat = [0.0] * n
    clock = time.perf_counter
    t_start = clock()
    for i in range(n):
        if i & 63 == 0:
            deadline.check(what)
        t0 = clock()
        call()
        lat[i] = clock() - t0
    return summarize(lat, clock() - t_start)


def futures_closed_loop(submit: Callable[[], Any], total: int, concurrency: int, deadline: Deadline,
                        what: str, check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Keep ``concurrency`` futures in flight until ``total`` have completed.

    ``submit()`` returns a ``concurrent.futures.Future``; latency is submit to
    done-callback. A failed future fails the row (``check`` may reject a result too).
    """
    slots = threading.Semaphore(concurrency)
    lat = [0.0] * total
    failures: list[str] = []
    lock = threading.Lock()
    remaining = [total]
    finished = threading.Event()
    clock = time.perf_counter

    def on_done(fut: Any, i: int, t0: float) -> None:
        lat[i] = clock() - t0
        try:
            if fut.cancelled():
                raise RuntimeError("future cancelled")
            exc = fut.exception()
            if exc is not None:
                raise exc
            if check is not None:
                check(fut.result())
        except BaseException as exc:  # noqa: BLE001 - recorded, reported in the row
            with lock:
                failures.append(error_text(exc))
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()

    t_start = clock()
    for i in range(total):
        if not slots.acquire(timeout=deadline.left(what)):
            raise PhaseTimeout(f"{what}: no submission slot freed before the deadline")
        t0 = clock()
        fut = submit()
        fut.add_done_callback(lambda f, i=i, t0=t0: on_done(f, i, t0))
    if not finished.wait(deadline.left(what)):
        raise PhaseTimeout(f"{what}: {remaining[0]} of {total} submissions still pending at the deadline")
    elapsed = clock() - t_start
    if failures:
        raise RuntimeError(f"{len(failures)}/{total} submissions failed, first: {failures[0]}")
    return summarize(lat, elapsed)


async def async_closed_loop(call: Callable[[int], Awaitable[Any]], total: int, concurrency: int,
                            timeout_s: float) -> tuple[list[float], float, list[Any]]:
    """``concurrency`` clients share ``total`` awaits; returns (latencies, elapsed, results).

    Exceptions are returned in ``results`` (not raised) so one bad flow does
    not hide the figures of the others; the caller decides what fails the row.
    """
    lat: list[float] = []
    results: list[Any] = []
    todo = iter(range(total))
    clock = time.perf_counter

    async def client() -> None:
        for i in todo:
            t0 = clock()
            try:
                res = await call(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported by the caller
                results.append(exc)
                continue
            lat.append(clock() - t0)
            results.append(res)

    t_start = clock()
    tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    elapsed = clock() - t_start
    if pending:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=2.0)
        raise PhaseTimeout(f"{total - len(results)} of {total} flows unfinished after {timeout_s:.0f}s")
    for t in done:
        t.result()
    return lat, elapsed, results


# -- processes and memory ------------------------------------------------------------------------


def descendants(exclude: frozenset[int] = frozenset()) -> list[psutil.Process]:
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [k for k in kids if k.pid not in exclude]


def rss_of(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def kill_leftovers(exclude: frozenset[int] = frozenset()) -> int:
    """SIGKILL this process's remaining descendants (by pid); return how many there were.

    Only processes this phase started are touched. A non-zero count after a
    runner closed is worth reporting: it means close() leaked workers.
    """
    kids = descendants(exclude)
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()
    psutil.wait_procs(kids, timeout=3)
    return len(kids)


class RssSampler:
    """Samples supervisor RSS and supervisor + descendants RSS on a thread; keeps the peaks.

    A thread and not the event loop, so a slow /proc walk over hundreds of
    workers delays no flow; the interval keeps its CPU share small.
    """

    def __init__(self, interval_s: float = 0.1, exclude: frozenset[int] = frozenset()) -> None:
        self.interval_s = interval_s
        self.exclude = exclude
        self.peak_supervisor = 0
        self.peak_total = 0
        self.peak_children = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.sample(me)
            self._stop.wait(self.interval_s)

    def sample(self, me: psutil.Process | None = None) -> None:
        me = me or psutil.Process()
        sup = me.memory_info().rss
        kids = descendants(self.exclude)
        total = sup + rss_of(kids)
        self.peak_supervisor = max(self.peak_supervisor, sup)
        self.peak_total = max(self.peak_total, total)
        self.peak_children = max(self.peak_children, len(kids))
        self.samples += 1

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


def memory_full(procs: list[psutil.Process]) -> list[dict[str, int]]:
    """rss/uss/pss per process (reads smaps: slow, so only at a quiet moment)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            out.append({"pid": p.pid, "rss": m.rss, "uss": m.uss, "pss": getattr(m, "pss", 0)})
    return out


def raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft fd limit to the hard one: hundreds of workers mean thousands of pipe fds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
