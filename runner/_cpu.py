"""CPU fairness: demote executions that spin, and (optionally) bill CPU time.

Every tenant shares the machine's CPUs. An execution that has used more than
``RunnerConfig.cpu_budget_ms`` of CPU time is moved to ``SCHED_IDLE``: it then
runs only when no normal task wants the CPU, so short executions of every
other tenant preempt it at once instead of queueing behind it. When the
execution ends, its worker goes back to ``SCHED_OTHER`` (or is discarded if
that fails). ``Limits.cpu_limit_ms`` additionally ends an execution that used
more CPU than that with ``denial.kind`` ``cpu_limit``.

Cost model (the supervisor is shared, so short executions must not pay):

* starting and ending an execution is a dict insert and pop;
* one timer per governor (not per execution) ticks every ``budget / 2`` while
  anything runs. The first tick an execution lives through reads its worker's
  CPU clock once as an anchor; most short executions finish before any tick;
* later reads happen only when the execution could have crossed the budget by
  then (CPU time grows no faster than wall time), backing off for executions
  that wait on I/O, so a long fetch costs a handful of reads.

CPU time comes from the kernel's per-process CPU clock
(``clock_gettime(MAKE_PROCESS_CPUCLOCK(pid))``): one syscall, all threads
summed, nanosecond resolution, no file to open. Precision: the execution's
CPU use is known to within the anchor's age (at most one tick), so demotion
happens between ``budget - tick`` and ``budget + tick`` of CPU; ``cpu_limit``
uses the lower bound and so never ends an execution early.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from ._worker import State

if TYPE_CHECKING:
    from ._worker import WorkerHandle

log = logging.getLogger("actionpool.cpu")

_CPUCLOCK_SCHED = 2     # linux/posix-timers.h: CPUCLOCK_SCHED, the precise sum of runtime
_MAX_BACKOFF_S = 1.0    # an execution waiting on I/O is looked at least this often


def process_cpu_ns(pid: int) -> int:
    """Total CPU time of process ``pid`` (all its threads) in ns; OSError once it is gone."""
    return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED)


def _tasks(pid: int) -> list[int]:
    """Every thread of ``pid``: a scheduling class is per thread."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _own_autogroup(pid: int) -> str | None:
    """The path of ``pid``'s autogroup file if that group is not the supervisor's, else None.

    Workers start their own session (``setsid``), and with ``CONFIG_SCHED_AUTOGROUP``
    every session is a scheduling group of its own that competes with the
    supervisor's group as an equal, whatever the policy of the task inside it. A
    scheduling class then only orders a worker against itself; the group's nice
    value is what orders it against everyone else.
    """
    path = f"/proc/{pid}/autogroup"
    try:
        with open(path) as f:
            theirs = f.read().split()[0]
        with open("/proc/self/autogroup") as f:
            ours = f.read().split()[0]
    except (OSError, IndexError):
        return None  # no autogroups on this kernel (or the worker is gone)
    return path if theirs != ours else None


def _set_autogroup_nice(path: str | None, nice: int) -> None:
    if path is not None:
        try:
            with open(path, "w") as f:
                f.write(str(nice))
        except OSError:
            pass


def _set_class(pid: int, policy: int, autogroup_nice: int) -> None:
    for tid in _tasks(pid):
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            pass
    _set_autogroup_nice(_own_autogroup(pid), autogroup_nice)


def demote(pid: int) -> None:
    """Move every thread of ``pid`` to SCHED_IDLE (threads it starts later inherit it), its autogroup to nice 19."""
    _set_class(pid, os.SCHED_IDLE, 19)


def restore(pid: int, autogroup_nice: int = 0, batch: bool = False) -> None:
    """Back to SCHED_OTHER (SCHED_BATCH with ``batch``). Raises PermissionError without CAP_SYS_NICE
    (leaving SCHED_IDLE needs it)."""
    _set_class(pid, os.SCHED_BATCH if batch else os.SCHED_OTHER, autogroup_nice)


def set_worker_batch(pid: int) -> None:
    """Every thread of a new worker to SCHED_BATCH (``RunnerConfig.worker_batch``).

    A batch task is not allowed to preempt the running task when it wakes (the kernel's fair
    class skips wakeup preemption for it): a worker woken by the supervisor's execute request
    waits for a free CPU or the next tick instead of taking the supervisor's CPU in the middle of
    its write, while keeping its full share (nice 0) against other processes on the host.
    """
    for tid in _tasks(pid):
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except (ProcessLookupError, PermissionError):
            pass


def set_worker_nice(pid: int, nice: int) -> None:
    """A new worker's scheduling group below the supervisor's (``RunnerConfig.worker_nice``).

    Each worker is a session, hence (with autogroups) a scheduling group that competes with the
    supervisor's as an equal: with 50 runnable workers the supervisor, which every flow waits
    on, got about a fiftieth of the CPU and its loop ran 30-180 ms late (bench S7). A group
    at nice 10 weighs about a tenth of one at 0, so the supervisor runs when it has work, and
    workers still get every cycle it leaves (the scheduler is work-conserving). Where autogroups do
    not apply (a container's own CPU cgroup, or a kernel without them) every task competes on its own
    nice value, so the worker's task gets the same value.
    Both are relative to the supervisor's own (a supervisor started under ``nice`` keeps its lead).
    """
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(18, os.getpriority(os.PRIO_PROCESS, 0) + nice))
        except OSError:
            pass   # gone already, or not ours to change: it then competes as an equal, as before
        _set_autogroup_nice(_own_autogroup(pid), worker_group_nice(nice))


def worker_group_nice(nice: int) -> int:
    """The autogroup nice of a worker: ``nice`` above the supervisor's group, below a demoted one's 19."""
    return min(18, _autogroup_nice_of_self() + nice) if nice else 0


def _autogroup_nice_of_self() -> int:
    try:
        with open("/proc/self/autogroup") as f:
            parts = f.read().split()
        return int(parts[2]) if len(parts) >= 3 and parts[1] == "nice" else 0
    except (OSError, ValueError):
        return 0


class _Watch:
    """One execution that lived through a tick: its CPU anchor and what was done to it."""

    __slots__ = ("started", "anchor_ns", "slack_ns", "next_check", "demoted", "limit_ns", "last_used", "last_check")

    def __init__(self, started: float, anchor_ns: int, slack_ns: int, limit_ns: int) -> None:
        self.started = started
        self.anchor_ns = anchor_ns    # the worker's CPU clock when first seen
        self.slack_ns = slack_ns      # CPU the execution may have used before that (<= its age then)
        self.next_check = 0.0
        self.demoted = False
        self.limit_ns = limit_ns      # 0: no cpu_limit
        self.last_used = 0            # CPU used at the previous read, and when that was
        self.last_check = 0.0


class CpuGovernor:
    """Watches running executions' CPU time; demotes spinners, enforces ``cpu_limit``."""

    def __init__(self, budget_ms: float, worker_nice: int = 0, worker_batch: bool = False) -> None:
        self.worker_nice = worker_nice   # where a demoted worker's group goes back to
        self.worker_batch = worker_batch  # and its class: SCHED_BATCH or SCHED_OTHER
        self.budget_ns = int(budget_ms * 1e6)
        self.period_s = max(budget_ms / 2000.0, 0.002)
        # Running executions: the start time (monotonic) until the first tick anchors them, then a _Watch.
        self._running: dict["WorkerHandle", float | _Watch] = {}
        self._limits: dict["WorkerHandle", float] = {}   # only executions with a cpu_limit
        self._timer: asyncio.TimerHandle | None = None
        self.demotions = 0
        self.cpu_limit_kills = 0
        self.reads = 0

    # -- called by the engine around each execution -------------------------------------
    def begin(self, w: "WorkerHandle", started: float, cpu_limit_ms: float | None) -> None:
        self._running[w] = started
        if cpu_limit_ms:
            self._limits[w] = cpu_limit_ms
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def end(self, w: "WorkerHandle") -> None:
        """The execution is over (answered, failed or cancelled): undo a demotion before reuse."""
        st = self._running.pop(w, None)
        if self._limits:
            self._limits.pop(w, None)
        if type(st) is _Watch and st.demoted and w.alive:
            try:
                restore(w.pid, worker_group_nice(self.worker_nice), self.worker_batch)
            except OSError as exc:  # no CAP_SYS_NICE: an unprivileged supervisor cannot undo SCHED_IDLE
                w.kill(f"could not restore its CPU priority ({exc.strerror}); discarded")

    def stats(self) -> dict[str, int]:
        return {"cpu_demotions": self.demotions, "cpu_limit_kills": self.cpu_limit_kills, "cpu_reads": self.reads}

    # -- the shared timer ---------------------------------------------------------------------
    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        for w, st in list(self._running.items()):
            if type(st) is not _Watch:
                st = self._anchor(w, st, now)
                if st is None:
                    continue
            if st.next_check <= now:
                self._check(w, st, now)
        if self._running:
            self._timer = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def _anchor(self, w: "WorkerHandle", started: float, now: float) -> _Watch | None:
        try:
            cpu = process_cpu_ns(w.pid)
        except OSError:
            self._running.pop(w, None)
            return None
        self.reads += 1
        limit_ms = self._limits.get(w)
        st = _Watch(started, cpu, int((now - started) * 1e9), int(limit_ms * 1e6) if limit_ms else 0)
        self._running[w] = st
        st.last_check = now
        st.next_check = now + self._delay(st, 0, now)
        return st

    def _check(self, w: "WorkerHandle", st: _Watch, now: float) -> None:
        if not w.alive or w.state is not State.BUSY:
            st.next_check = float("inf")  # answered; end() comes once the engine resumes
            return
        try:
            used = process_cpu_ns(w.pid) - st.anchor_ns   # a lower bound of the execution's CPU time
        except OSError:
            st.next_check = float("inf")
            return
        self.reads += 1
        if st.limit_ns and used >= st.limit_ns:
            self.cpu_limit_kills += 1
            w.fail_execution("cpu_limit", f"action used more than its {st.limit_ns / 1e6:g} ms of CPU time; "
                                          "worker killed")
            st.next_check = float("inf")
            return
        if not st.demoted and used + st.slack_ns >= self.budget_ns:
            try:
                demote(w.pid)
                st.demoted = True
                self.demotions += 1
            except OSError as exc:
                log.warning("actionpool: could not demote worker %d: %s", w.pid, exc)
        st.next_check = now + self._delay(st, used, now)
        st.last_used, st.last_check = used, now

    def _delay(self, st: _Watch, used: int, now: float) -> float:
        """When the next read could show something new: CPU grows no faster than wall time.

        An execution that used (almost) no CPU since the last read is waiting on I/O; it is
        looked at less and less often (a quarter of its age, at most every second).
        """
        if st.demoted and not st.limit_ns:
            return float("inf")
        need = st.limit_ns - used if st.limit_ns else self.budget_ns
        if not st.demoted:
            need = min(need, self.budget_ns - used - st.slack_ns)
        delay = max(need / 1e9, self.period_s * 0.5)
        interval = now - st.last_check
        if interval > 0 and (used - st.last_used) < interval * 1e8:   # under 10 % of a CPU: waiting
            delay = max(delay, min((now - st.started) / 4, _MAX_BACKOFF_S))
        return delay
