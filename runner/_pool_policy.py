"""The pool's decisions as pure functions: sizes, caps, admission, growth, fair choice, retirement.

Nothing here touches a process, a future or the clock: every input is an argument, so each rule
is unit-tested on its own with made-up numbers (``tests/test_pool_policy.py``). ``Pool`` only
applies what these return.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

# What an idle worker costs, for sizing only: 3.6 MiB USS measured (bench S6), rounded up for
# the pages an action's imports and globals dirty once it ran.
WORKER_MEMORY_ESTIMATE_MB = 6.0
FDS_PER_WORKER = 4          # supervisor side: two pipe ends, a pidfd, one spare (a cgroup file while starting)
FD_RESERVE = 256            # descriptors kept for everything else (sockets of fetch, redis, logs)


def physical_memory_bytes() -> int:
    """MemTotal of this machine (sysconf), or 1 GiB when the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def default_memory_budget_mb(total_bytes: int) -> int:
    """A quarter of the machine's memory for idle and busy workers' own pages (at least 256 MiB)."""
    return max(256, (total_bytes >> 20) // 4)


def capacity(budget_mb: float, per_worker_mb: float, fd_limit: int | None) -> int:
    """How many workers may live at once: what the memory budget pays for, within the fd limit."""
    by_memory = int(budget_mb // per_worker_mb)
    if fd_limit is not None and fd_limit > 0:
        by_memory = min(by_memory, (fd_limit - FD_RESERVE) // FDS_PER_WORKER)
    return max(1, by_memory)


def default_tenant_cap(total: int) -> int:
    """Most of a resource one tenant may hold: three quarters of it, and never all of it (from 2 up).

    What is kept back (a quarter, at least one) is what another tenant's flows can always get,
    however many slow flows one tenant has in flight: a busy worker cannot be taken back, so a
    tenant holding every slot would make the others wait for its slowest flows (in a pool of 4,
    for up to ``queue_timeout_s``, then ``overloaded``). With a slot always free of it, another
    tenant's flow gets a worker within a start (an idle worker of the busy tenant is evicted for
    it). Only a pool of one cannot keep anything back.
    """
    return total if total < 2 else total - max(1, total // 4)


def default_queue_cap(total: int) -> int:
    """Flows of one tenant that may wait: all of a short queue (under 8), three quarters of a longer one.

    Waiting costs no worker, so a short queue is not split; the busy cap above is what keeps
    a slot free for other tenants.
    """
    return total if total < 8 else total - total // 4


def refuse_reason(tenant_waiting: int, tenant_queue_cap: int, total_waiting: int, max_queue: int) -> str | None:
    """Why a flow that found no idle worker may not wait, or None when it may."""
    if total_waiting >= max_queue:
        return f"{max_queue} flows already waiting"
    if tenant_waiting >= tenant_queue_cap:
        return f"{tenant_waiting} flows of this tenant already waiting (its cap)"
    return None


def releases_before_start(held: int, hold_s: float, spawn_s: float, reuse: float) -> int:
    """How many waiters of one key will be served by releases before a new worker could start.

    ``held`` workers of the key are busy, each for about ``hold_s``; a start takes ``spawn_s``;
    a share ``reuse`` of releases gives a reusable worker back. In ``spawn_s`` about
    ``spawn_s * held * reuse / hold_s`` releases happen; the first waiter is not counted
    (starting for it is never wrong), so short actions reuse the workers the CPU keeps busy and
    slow ones make the pool grow.
    """
    releasers = held * reuse
    if releasers < 1 or hold_s <= 0:
        return 0
    return max(0, math.ceil(spawn_s * releasers / hold_s) - 1)


def starts_wanted(waiting: int, spawning: int, served_by_releases: int) -> int:
    """Starts a key needs: its waiters that neither an in-flight start nor a release will serve."""
    return max(0, waiting - spawning - served_by_releases)


def fair_pick(order: Iterable[T], eligible: Callable[[T], bool], load: Callable[[T], int]) -> T | None:
    """The eligible entry holding the least (``load``); ties go to the first in ``order``.

    Max-min fairness for one freed worker: the tenant with the fewest workers right now gets it,
    and among equals the one served least recently.
    """
    best: T | None = None
    best_load = 0
    for item in order:
        if eligible(item):
            n = load(item)
            if best is None or n < best_load:
                best, best_load = item, n
    return best


def starving(heads: Iterable[tuple[T, float]], now: float, after_s: float) -> list[T]:
    """Entries whose oldest waiter began to wait ``after_s`` ago or earlier, oldest first.

    Fair order (the tenant holding the least, then the least recently served) decides who goes
    first while flows are served promptly. When starts are the bottleneck, that order alone
    lets a busy tenant's flows (and a key whose worker dies after every execution) wait behind a
    stream of light tenants' flows until their timeout; a waiter this old goes first instead.
    A flood cannot use this to take every worker: the per-tenant caps still hold.
    """
    due = [(since, i, item) for i, (item, since) in enumerate(heads) if now - since >= after_s]
    due.sort(key=lambda d: (d[0], d[1]))
    return [item for _, _, item in due]


def retire_due(last_used: float, now: float, idle_timeout_s: float) -> bool:
    return now - last_used >= idle_timeout_s


def sweep_period(idle_timeout_s: float) -> float:
    """How often the idle-retirement timer runs: a quarter of the timeout, between 50 ms and 5 s."""
    return min(5.0, max(0.05, idle_timeout_s / 4))
