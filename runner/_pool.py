"""The worker pool: warm workers, per-tenant binding, bounded waiting.

* ``pool_size`` warm workers are kept started but unassigned. The first flow
  of a tenant binds one; from then on it serves only that tenant (a worker
  never serves two tenants).
* At most ``max_workers`` processes live at once. When every slot is taken, an
  idle worker of another tenant is retired to make room; otherwise the flow
  waits in a FIFO queue of at most ``max_queue`` flows, for at most
  ``queue_timeout_s``. Past either bound the flow is refused at once
  (:class:`Overloaded`): back-pressure instead of an unbounded queue.
* Warm-worker affinity: among a tenant's idle workers, one that already
  compiled the action (by source hash) is preferred.
* A worker that failed, was killed, or served ``max_executions_per_worker``
  executions is discarded and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable

from ._worker import State, WorkerHandle
from ._errors import Overloaded, PoolClosed

log = logging.getLogger("actionpool.pool")

Key = tuple[str | None, tuple[Any, ...]]   # (tenant or None for unassigned warm workers, worker profile)


class _Expired(Exception):
    """A waiting flow's queue timeout passed."""


def _expire(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class Pool:
    def __init__(self, launch: Callable[[tuple[Any, ...]], Awaitable[WorkerHandle]], *, pool_size: int,
                 max_workers: int, max_queue: int, max_executions: int, default_profile: tuple[Any, ...],
                 spawn_concurrency: int = 2, idle_timeout_s: float = 60.0, min_idle_per_tenant: int = 0) -> None:
        self._launch = launch
        self.pool_size = pool_size
        self.max_workers = max_workers
        self.max_queue = max_queue
        self.max_executions = max_executions
        self.default_profile = default_profile
        self.spawn_concurrency = spawn_concurrency
        self.min_idle_per_tenant = min_idle_per_tenant
        self._tenant_warming: dict[Key, int] = {}
        self.idle_timeout_s = idle_timeout_s
        self._spawning: dict[Key, int] = {}              # spawns in flight on behalf of waiters, by key
        self._last_sweep = time.monotonic()
        self.exec_ema_s = 0.0          # how long a worker is held per acquire (moving average)
        self.spawn_ema_s = 0.05        # how long a new worker takes to say hello (moving average)
        self.reuse_ema = 1.0           # share of releases that give back a reusable worker
        self._held: dict[str | None, dict[WorkerHandle, float]] = {}  # handed-out workers by owner, oldest first
        self._recheck: asyncio.TimerHandle | None = None
        self._in_grow = False          # _grow retiring a worker must not re-enter itself through _on_dead
        self._spawn_failures = 0       # consecutive failed starts
        self.workers: set[WorkerHandle] = set()
        self.idle: dict[Key, list[WorkerHandle]] = {}
        self.starting = 0                                # spawns in flight (they count against max_workers)
        # Waiting flows, FIFO per key; the sequence number orders them across keys.
        self.waiting: dict[Key, deque[tuple[int, asyncio.Future[WorkerHandle]]]] = {}
        self.n_waiting = 0
        self._wseq = 0
        self.closed = False
        self.spawned = 0
        self.discarded = 0
        self.peak_workers = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_spawn_error: str | None = None

    # -- bookkeeping ------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.workers) + self.starting

    def stats(self) -> dict[str, Any]:
        idle = sum(len(v) for v in self.idle.values())
        return {
            "live": len(self.workers), "starting": self.starting, "idle": idle,
            "busy": sum(1 for w in self.workers if w.state is State.BUSY),
            "warm_unassigned": sum(len(v) for k, v in self.idle.items() if k[0] is None),
            "waiting": self.n_waiting, "spawned": self.spawned, "discarded": self.discarded,
            "peak_workers": self.peak_workers,
        }

    def _on_dead(self, w: WorkerHandle) -> None:
        """Called by a handle the moment it dies (killed, crashed, retired)."""
        if w in self.workers:
            self.workers.discard(w)
            self.discarded += 1
            for lst in self.idle.values():
                if w in lst:
                    lst.remove(w)
            if not self.closed:
                self._after_capacity_freed()

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- spawning ------------------------------------------------------------------------
    def _reserve(self) -> None:
        """Count a start against the caps *before* its task runs (so one pass cannot overshoot)."""
        self.starting += 1
        self.peak_workers = max(self.peak_workers, self.total)

    async def _new_worker(self, key: Key) -> WorkerHandle:
        """Start one worker; the caller has reserved its slot with :meth:`_reserve`."""
        t0 = time.monotonic()
        try:
            w = await self._launch(key[1])
            self.spawn_ema_s = 0.8 * self.spawn_ema_s + 0.2 * (time.monotonic() - t0)
        except BaseException as exc:
            self.last_spawn_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.starting -= 1
        self.spawned += 1
        if self.closed:
            w.kill("pool closed")
            raise PoolClosed("pool closed while a worker was starting")
        w.tenant = key[0]
        self.workers.add(w)
        w.on_dead = self._on_dead
        if not w.alive:  # died between hello and now
            self._on_dead(w)
        return w

    async def start(self) -> None:
        for _ in range(self.pool_size):
            self._reserve()
        await asyncio.gather(*(self._warm_one() for _ in range(self.pool_size)))

    async def _warm_one(self, key: Key | None = None) -> None:
        """Start one idle worker for ``key`` (default: unassigned warm); slot already reserved."""
        key = key or (None, self.default_profile)
        try:
            w = await self._new_worker(key)
        except PoolClosed:
            return
        except Exception as exc:
            log.error("could not start a warm worker: %s", exc)
            return
        self._offer(w, key)

    def _keep_tenant_warm(self, key: Key) -> None:
        """Keep ``min_idle_per_tenant`` idle workers bound to a tenant that has flows, capacity allowing."""
        want = self.min_idle_per_tenant
        if not want or self.closed or key[0] is None:
            return
        have = len(self.idle.get(key, ())) + self._tenant_warming.get(key, 0)
        while have < want and self.total < self.max_workers:
            have += 1
            self._tenant_warming[key] = self._tenant_warming.get(key, 0) + 1
            self._reserve()
            self._spawn_task(self._warm_tenant(key))

    async def _warm_tenant(self, key: Key) -> None:
        try:
            await self._warm_one(key)
        finally:
            self._tenant_warming[key] -= 1

    def _replenish(self) -> None:
        """Keep ``pool_size`` unassigned warm workers, capacity allowing."""
        if self.closed:
            return
        key: Key = (None, self.default_profile)
        have = len(self.idle.get(key, ())) + self._warming
        while have < self.pool_size and self.total < self.max_workers and not self.n_waiting:
            have += 1
            self._warming += 1
            self._reserve()
            self._spawn_task(self._warm_then_count())

    _warming = 0

    async def _warm_then_count(self) -> None:
        try:
            await self._warm_one()
        finally:
            self._warming -= 1

    # -- acquire / release -------------------------------------------------------------------
    def _take_idle(self, key: Key, digest: str) -> WorkerHandle | None:
        lst = self.idle.get(key)
        if not lst:
            return None
        for i in range(len(lst) - 1, -1, -1):
            if digest in lst[i].compiled:
                return lst.pop(i)
        return lst.pop()

    def _retire_other_idle(self, key: Key) -> bool:
        """Free a slot by retiring the least recently used idle worker of another key."""
        victim: WorkerHandle | None = None
        for k, lst in self.idle.items():
            if k != key and lst and (victim is None or lst[0].last_used < victim.last_used):
                victim = lst[0]
        if victim is None:
            return False
        victim.kill("retired to make room for another tenant")  # _on_dead removes it
        return True

    async def acquire(self, tenant: str, digest: str, profile: tuple[Any, ...], timeout: float) -> WorkerHandle:
        """A worker bound to ``tenant``: an idle one now, or the first to become free or be started.

        A flow that finds no idle worker waits in the queue while at most
        ``spawn_concurrency`` new workers start on behalf of the waiters;
        whichever comes first (a released worker or a started one) serves the
        oldest waiter. Short actions thus reuse busy workers instead of growing
        the pool, while long (I/O-bound) ones make it grow to ``max_workers``.
        """
        if self.closed:
            raise PoolClosed("pool closed")
        key: Key = (tenant, profile)
        w = self._take_idle(key, digest)
        if w is None and profile == self.default_profile:
            w = self._take_idle((None, profile), digest)
            if w is not None:
                w.tenant = tenant
                self._replenish()
        if w is not None:
            self._sweep()
            self._hold(w)
            self._keep_tenant_warm(key)
            return w
        if self.n_waiting >= self.max_queue:
            raise Overloaded(f"all {self.max_workers} workers busy and {self.max_queue} flows already waiting")
        fut: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
        self._wseq += 1
        entry = (self._wseq, fut)
        self.waiting.setdefault(key, deque()).append(entry)
        self.n_waiting += 1
        self._grow()
        # A plain timer instead of wait_for(shield(...)): no extra task or future per waiting flow.
        timer = fut.get_loop().call_later(timeout, _expire, fut)
        try:
            w = await fut
            self._hold(w)
            return w
        except _Expired:
            if self.total >= self.max_workers:
                raise Overloaded(f"all {self.max_workers} workers busy; none became free within {timeout:.3g}s") from None
            raise Overloaded(f"no worker could be started within {timeout:.3g}s") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), True)  # handed over just as the caller gave up
            raise
        finally:
            timer.cancel()
            # A waiter handed a worker was already popped; only one that gave up is still queued
            # (deque.remove of a missing entry builds a ValueError with the future's repr: ~10 % of
            # the supervisor's CPU per flow).
            handed = fut.done() and not fut.cancelled() and fut.exception() is None
            dq = None if handed else self.waiting.get(key)
            if dq is not None:
                try:
                    dq.remove(entry)
                    self.n_waiting -= 1
                except ValueError:
                    pass
                if not dq:
                    del self.waiting[key]

    def _hold(self, w: WorkerHandle) -> None:
        self._held.setdefault(w.tenant, {})[w] = time.monotonic()

    def _pop_waiter(self, key: Key) -> asyncio.Future[WorkerHandle] | None:
        """The oldest live waiter of ``key`` (dropping ones that gave up), or None."""
        dq = self.waiting.get(key)
        while dq:
            _, fut = dq.popleft()
            self.n_waiting -= 1
            if not fut.done():
                if not dq:
                    del self.waiting[key]
                return fut
        if dq is not None:
            del self.waiting[key]
        return None

    def _grow(self) -> None:
        """Start workers for waiters no spawn in flight will serve, within both caps.

        Per key, the first ``ceil(spawn_time * busy / hold_time) - 1`` waiters
        will be served by releases before a new worker could start; only the
        rest are worth a start. O(number of waiting keys), not of waiters.
        """
        if self.closed or not self.n_waiting or self._in_grow:
            return
        if self.starting >= self.spawn_concurrency:
            # Every start slot is busy (perhaps warming spares); look again when one finishes.
            return
        self._in_grow = True
        try:
            self._grow_pass()
        finally:
            self._in_grow = False

    def _grow_pass(self) -> None:
        now = time.monotonic()
        deferred = False
        for key, dq in list(self.waiting.items()):
            uncovered = len(dq) - self._spawning.get(key, 0)
            if uncovered <= 0:
                continue
            held = self._held.get(key[0])
            if held:
                # How long a hold lasts: the moving average, or longer if the oldest current hold
                # already took longer (a cold pool, or actions that just became slow).
                hold_s = max(self.exec_ema_s, now - next(iter(held.values())))
                # Only releases that give a worker back can serve a waiter (crashing actions give none).
                releasers = len(held) * self.reuse_ema
                if releasers >= 1 and hold_s > 0:
                    served = max(0, math.ceil(self.spawn_ema_s * releasers / hold_s) - 1)
                    if served:
                        deferred = True
                    uncovered -= served
            while uncovered > 0:
                if self.starting >= self.spawn_concurrency:
                    return
                if self.total >= self.max_workers and not self._retire_other_idle(key):
                    return
                uncovered -= 1
                self._spawning[key] = self._spawning.get(key, 0) + 1
                self._reserve()
                self._spawn_task(self._spawn_for_waiters(key))
        if deferred and self._recheck is None:
            # Holds age while flows wait: look again once a start would have been worth it.
            self._recheck = asyncio.get_running_loop().call_later(self.spawn_ema_s, self._recheck_growth)

    def _recheck_growth(self) -> None:
        self._recheck = None
        self._grow()

    async def _spawn_for_waiters(self, key: Key) -> None:
        try:
            w = await self._new_worker(key)
        except BaseException as exc:
            self._spawning[key] -= 1
            self._spawn_failures += 1
            if self._spawn_failures < 3 and isinstance(exc, Exception) and not self.closed:
                self._grow()  # a passing failure: the waiters still have time, try again
                return
            # Starts keep failing: fail the oldest waiter of this key so the error surfaces.
            fut = self._pop_waiter(key)
            if fut is not None:
                fut.set_exception(exc if isinstance(exc, Exception) else PoolClosed("cancelled"))
            return
        self._spawn_failures = 0
        self._spawning[key] -= 1
        self._offer(w, key)

    def _sweep(self) -> None:
        """Retire workers idle for longer than ``idle_timeout_s`` (at most once a second)."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        cutoff = now - self.idle_timeout_s
        for k, lst in list(self.idle.items()):
            keep = self.pool_size if k[0] is None else self.min_idle_per_tenant
            for w in list(lst[: max(0, len(lst) - keep)]):
                if w.last_used < cutoff:
                    w.kill("idle timeout")

    def release(self, w: WorkerHandle, reusable: bool) -> None:
        now = time.monotonic()
        owned = self._held.get(w.tenant)
        held = owned.pop(w, None) if owned is not None else None
        if held is not None:
            self.exec_ema_s = 0.9 * self.exec_ema_s + 0.1 * (now - held)
            if not owned:
                del self._held[w.tenant]
        w.last_used = now
        self.reuse_ema = 0.9 * self.reuse_ema + (0.1 if reusable and w.alive else 0.0)
        if not reusable or not w.alive or w.executions >= self.max_executions or self.closed:
            if w.alive:
                w.kill("retired" if reusable else "not reusable after its execution")
            if self.n_waiting:
                self._grow()  # this hold ended without a worker to hand on
            return
        key: Key = (w.tenant, w.profile or self.default_profile)
        self._offer(w, key)

    def _offer(self, w: WorkerHandle, key: Key) -> None:
        """An idle worker: hand it to a waiter of its key, or make room for another waiter, or park it."""
        if not w.alive:
            return
        fut = self._pop_waiter(key)
        if fut is None and key[0] is None:
            # An unassigned warm worker serves the oldest waiter of any tenant with its profile.
            heads = [(dq[0][0], k) for k, dq in self.waiting.items() if dq and k[1] == key[1]]
            for _, k in sorted(heads):
                fut = self._pop_waiter(k)
                if fut is not None:
                    w.tenant = k[0]
                    break
        if fut is not None:
            fut.set_result(w)
        elif self.n_waiting and self.total >= self.max_workers:
            w.kill("retired to serve a waiting flow of another tenant")  # frees capacity -> _grow
            return
        else:
            self.idle.setdefault(key, []).append(w)
        if self.n_waiting:
            self._grow()  # a start slot or a worker just came free: do the waiters need more?

    def _after_capacity_freed(self) -> None:
        if self._in_grow:
            return  # the _grow that retired this worker uses the slot itself
        self._grow()
        self._replenish()

    # -- shutdown ------------------------------------------------------------------------------
    async def close(self, grace: float) -> None:
        self.closed = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for key in list(self.waiting):
            while (fut := self._pop_waiter(key)) is not None:
                fut.set_exception(PoolClosed("pool closed"))
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self.workers)
        await asyncio.gather(*(w.shutdown(grace) for w in workers), return_exceptions=True)
        self.workers.clear()
        self.idle.clear()
