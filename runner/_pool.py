"""The worker pool: warm workers bound to one owner each, sized for a working set, fair between tenants.

* Capacity (``max_workers``) comes from a memory budget: ``worker_memory_budget_mb`` (default a
  quarter of the machine) over what an idle worker costs, within the fd limit. A working set of
  hundreds of actions then keeps one warm worker each instead of churning through a few.
* ``pool_size`` warm workers are kept started but unassigned; the first flow of an owner (an
  action of a tenant, or a tenant) binds one. A worker never serves two owners.
* Idle workers live in one LRU across keys: when the pool is full and a flow needs a new worker,
  the least recently used idle worker of another key is retired. Idle workers unused for
  ``idle_timeout_s`` retire on a timer.
* A flow that finds no idle worker waits in a FIFO per key, bounded by ``max_queue`` (all flows)
  and ``max_queue_per_tenant``, for at most ``queue_timeout_s``; past a bound it is refused at once
  (:class:`Overloaded`). A tenant holds at most ``max_busy_per_tenant`` workers at once (by
  default never all of them, even in a small pool), so another tenant's flows always find
  capacity: a slot no single tenant can fill, started for them (evicting an idle worker) within a
  start. Start slots and capacity freed while tenants wait go round-robin over the waiting
  tenants, not first to the same tenant's next waiter; within a tenant, to the key holding the
  fewest workers. A flow that has waited ``fair_wait_s`` gets the
  next start slot, oldest first, so no flow starves behind a stream of lighter tenants' flows.
* A worker that failed, was killed, or served ``max_executions`` executions is discarded.

The state is split like pebble's pool: ``WorkerSide`` (processes) and ``TaskSide`` (flows) each
own theirs and delete per-key entries when they empty; the rules are pure functions in
``_pool_policy``. This class only wires them to asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, Awaitable, Callable

from . import _pool_policy as policy
from ._cpu import set_worker_batch, set_worker_nice
from ._errors import Overloaded, PoolClosed
from ._pool_tasks import TaskSide
from ._pool_workers import Key, WorkerSide
from ._worker import WorkerHandle

log = logging.getLogger("actionpool.pool")

__all__ = ["Pool", "Key"]


REFILL_DELAY_S = 0.01   # a spare taken by a flow is replaced this much later (see Pool._take_spare)
CLOSE_STARTS_S = 2.0    # close() lets starts in flight finish this long before it cancels them


class _Expired(Exception):
    """A waiting flow's queue timeout passed."""


def _expire(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def _fd_limit(wanted_workers: int) -> int | None:
    """The soft fd limit, raised toward the hard one when the budget wants more workers than it allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = policy.FD_RESERVE + policy.FDS_PER_WORKER * wanted_workers
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        return None if soft == resource.RLIM_INFINITY else soft
    except (ValueError, OSError):
        return None


class Pool:
    def __init__(self, launch: Callable[[tuple[Any, ...]], Awaitable[WorkerHandle]], *, pool_size: int,
                 max_workers: int, max_queue: int, max_executions: int, default_profile: tuple[Any, ...],
                 spawn_concurrency: int = 2, idle_timeout_s: float = 60.0, min_idle_per_tenant: int = 0,
                 max_busy_per_tenant: int | None = None, max_queue_per_tenant: int | None = None,
                 fair_wait_s: float = 0.5, worker_nice: int = 0, worker_batch: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._launch = launch
        self._clock = clock
        self.ws = WorkerSide(max_workers, clock)
        self.ts = TaskSide(clock)
        self.pool_size = pool_size
        self.max_queue = max_queue
        self.max_executions = max_executions
        self.default_profile = default_profile
        self.spawn_concurrency = spawn_concurrency
        self.idle_timeout_s = idle_timeout_s
        self.fair_wait_s = fair_wait_s
        self.worker_nice = worker_nice
        self.worker_batch = worker_batch
        self.min_idle_per_tenant = min_idle_per_tenant
        self.max_busy_per_tenant = max_busy_per_tenant or policy.default_tenant_cap(max_workers)
        self.max_queue_per_tenant = (max_queue_per_tenant if max_queue_per_tenant is not None
                                     else policy.default_queue_cap(max_queue))
        self.exec_ema_s = 0.0          # how long a worker is held per acquire (moving average)
        self.spawn_ema_s = 0.05        # how long a new worker takes to say hello (moving average)
        self.reuse_ema = 1.0           # share of releases that give back a reusable worker
        self._spawning_by_tenant: dict[str, int] = {}   # starts in flight for a tenant's waiters
        self._tenant_warming: dict[Key, int] = {}       # min_idle_per_tenant starts in flight, by key
        self._warming = 0                               # unassigned warm starts in flight
        self._recheck: asyncio.TimerHandle | None = None
        self._refill: asyncio.TimerHandle | None = None   # replacing a spare just taken (see _take_spare)
        self._sweeper: asyncio.TimerHandle | None = None
        self._in_grow = False          # _grow retiring a worker must not re-enter itself through _on_dead
        self._spawn_failures = 0       # consecutive failed starts
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_spawn_error: str | None = None
        self._retiring: set[WorkerHandle] = set()   # busy workers of a forgotten tenant: killed when released

    @classmethod
    def from_config(cls, launch: Callable[[tuple[Any, ...]], Awaitable[WorkerHandle]], cfg: Any) -> "Pool":
        """A pool sized from a ``RunnerConfig``: capacity and per-tenant caps derived where unset."""
        budget = cfg.worker_memory_budget_mb or policy.default_memory_budget_mb(policy.physical_memory_bytes())
        if cfg.max_workers is not None:
            capacity = cfg.max_workers
        else:
            want = int(budget // policy.WORKER_MEMORY_ESTIMATE_MB)
            capacity = policy.capacity(budget, policy.WORKER_MEMORY_ESTIMATE_MB, _fd_limit(want))
        limits = cfg.limits
        return cls(launch, pool_size=min(cfg.pool_size, capacity), max_workers=capacity, max_queue=cfg.max_queue,
                   max_executions=cfg.max_executions_per_worker,
                   spawn_concurrency=cfg.spawn_concurrency,
                   idle_timeout_s=cfg.idle_timeout_s, min_idle_per_tenant=cfg.min_idle_per_tenant,
                   max_busy_per_tenant=cfg.max_busy_per_tenant, max_queue_per_tenant=cfg.max_queue_per_tenant,
                   fair_wait_s=cfg.fair_wait_s, worker_nice=cfg.worker_nice, worker_batch=cfg.worker_batch,
                   default_profile=(limits.memory_mb, limits.cpu_seconds, limits.max_open_files))

    # -- views (tests and stats read these) ----------------------------------------------------------
    @property
    def max_workers(self) -> int:
        return self.ws.capacity

    @property
    def workers(self) -> set[WorkerHandle]:
        return self.ws.live

    @property
    def idle(self) -> dict[Key, list[WorkerHandle]]:
        return self.ws.idle

    @property
    def total(self) -> int:
        return self.ws.total

    @property
    def starting(self) -> int:
        return self.ws.starting

    @property
    def n_waiting(self) -> int:
        return self.ts.n_waiting

    @property
    def spawned(self) -> int:
        return self.ws.spawned

    @property
    def discarded(self) -> int:
        return self.ws.discarded

    def stats(self) -> dict[str, Any]:
        spare: Key = (None, self.default_profile)
        return {
            "live": len(self.ws.live), "starting": self.ws.starting, "idle": self.ws.n_idle,
            "busy": len(self.ts.held),
            "warm_unassigned": len(self.ws.idle.get(spare, ())),
            "waiting": self.ts.n_waiting, "spawned": self.ws.spawned, "discarded": self.ws.discarded,
            "peak_workers": self.ws.peak, "capacity": self.ws.capacity,
            "max_busy_per_tenant": self.max_busy_per_tenant, "max_queue_per_tenant": self.max_queue_per_tenant,
            # Per-key and per-tenant entries: they follow live workers and waiting flows, not history.
            "state": {**self.ws.state_sizes(), **self.ts.state_sizes(),
                      "spawning_tenants": len(self._spawning_by_tenant), "warming_keys": len(self._tenant_warming)},
        }

    def _on_dead(self, w: WorkerHandle) -> None:
        """Called by a handle the moment it dies (killed, crashed, retired)."""
        self._retiring.discard(w)
        if self.ws.forget(w) and not self.closed:
            self._after_capacity_freed()

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- starting workers -----------------------------------------------------------------------------
    async def _new_worker(self, key: Key, for_waiters: bool) -> WorkerHandle:
        """Start one worker; the caller reserved its slot (``ws.reserve``)."""
        t0 = self._clock()
        try:
            w = await self._launch(key[1])
            self.spawn_ema_s = 0.8 * self.spawn_ema_s + 0.2 * (self._clock() - t0)
        except BaseException as exc:
            self.last_spawn_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.ws.unreserve(key if for_waiters else None)
        if self.closed:
            await w.shutdown(1.0)   # gone, pipes closed, before close() returns (a bare kill left its pipes open)
            raise PoolClosed("pool closed while a worker was starting")
        w.tenant = key[0]
        set_worker_nice(w.pid, self.worker_nice)
        if self.worker_batch:
            set_worker_batch(w.pid)
        self.ws.adopt(w)
        w.on_dead = self._on_dead
        if not w.alive:  # died between hello and now
            self._on_dead(w)
        return w

    async def start(self) -> None:
        for _ in range(self.pool_size):
            self.ws.reserve()
        await asyncio.gather(*(self._warm_one() for _ in range(self.pool_size)))
        self._schedule_sweep()

    async def _warm_one(self, key: Key | None = None) -> None:
        """Start one idle worker for ``key`` (default: unassigned warm); slot already reserved."""
        key = key or (None, self.default_profile)
        try:
            w = await self._new_worker(key, False)
        except PoolClosed:
            return
        except Exception as exc:
            log.error("could not start a warm worker: %s", exc)
            return
        self._offer(w, key)

    def _keep_tenant_warm(self, key: Key) -> None:
        """Keep ``min_idle_per_tenant`` idle workers bound to an owner that has flows, capacity allowing."""
        want = self.min_idle_per_tenant
        if not want or self.closed or key[0] is None:
            return
        have = len(self.ws.idle.get(key, ())) + self._tenant_warming.get(key, 0)
        while have < want and not self.ws.full():
            have += 1
            self._tenant_warming[key] = self._tenant_warming.get(key, 0) + 1
            self.ws.reserve()
            self._spawn_task(self._warm_tenant(key))

    async def _warm_tenant(self, key: Key) -> None:
        try:
            await self._warm_one(key)
        finally:
            n = self._tenant_warming[key] - 1
            if n:
                self._tenant_warming[key] = n
            else:
                del self._tenant_warming[key]

    def _replenish(self) -> None:
        """Keep ``pool_size`` unassigned warm workers, capacity allowing."""
        if self.closed:
            return
        have = len(self.ws.idle.get((None, self.default_profile), ())) + self._warming
        while have < self.pool_size and not self.ws.full() and not self.ts.n_waiting:
            have += 1
            self._warming += 1
            self.ws.reserve()
            self._spawn_task(self._warm_then_count())

    async def _warm_then_count(self) -> None:
        try:
            await self._warm_one()
        finally:
            self._warming -= 1

    # -- warm start -----------------------------------------------------------------------------------
    def prewarm_room(self) -> int:
        """Workers a prewarm may still start: the memory budget less what is kept for flows (see prewarm)."""
        return self.ws.capacity - self.ws.total - (self.pool_size + self.spawn_concurrency)

    async def prewarm(self, keys: list[Key]) -> tuple[list[tuple[Key, WorkerHandle]], int, int, str]:
        """Start one idle worker for each of ``keys``, in order, without delaying flows.

        A key listed n times asks for n workers (a hot action's flows overlap).
        Returns the workers started (with their keys), how many keys were already warm, how many
        keys it went through (the rest were not tried), and why it stopped ("done", "memory
        budget", "closed"). Flows go first: a start begins only while no flow waits for a worker and a start
        slot is free, so a prewarm running beside traffic only takes what traffic leaves. It never
        evicts and stops where the memory budget would be used up, keeping ``pool_size +
        spawn_concurrency`` slots free for unassigned spares and for the starts of actions nobody
        predicted (a full pool would make every new action wait for an eviction). A key that
        already has an idle, busy or starting worker is skipped. At the end, the warmed workers
        are ordered in the LRU so the first keys (the hottest) are evicted last.
        """
        mine: set[asyncio.Future[tuple[Key, WorkerHandle] | None]] = set()
        started: list[tuple[Key, WorkerHandle]] = []
        already = 0
        tried = 0
        why = "done"
        wanted: dict[Key, int] = {}   # a key listed n times asks for n workers
        for key in keys:
            wanted[key] = wanted.get(key, 0) + 1
            if self.closed:
                why = "closed"
                break
            while not self.closed and (self.ts.n_waiting or self.ws.starting >= self.spawn_concurrency):
                if mine and self.ws.starting >= self.spawn_concurrency:
                    await asyncio.wait(mine, return_when=asyncio.FIRST_COMPLETED)
                else:  # flows are waiting or hold every slot: look again after about one start
                    await asyncio.sleep(min(0.05, max(0.002, self.spawn_ema_s)))
                started.extend(self._collect(mine))
            if self.closed:
                why = "closed"
                break
            if self.ws.count(key) + self.ts.held_count(key) >= wanted[key]:  # traffic may have started one meanwhile
                already += 1
                tried += 1
                continue
            if self.prewarm_room() <= 0:
                why = "memory budget"
                break
            tried += 1
            self.ws.reserve(key)
            fut = asyncio.ensure_future(self._prewarm_one(key))
            self._tasks.add(fut)
            fut.add_done_callback(self._tasks.discard)
            mine.add(fut)
        if mine:
            await asyncio.wait(mine)
            started.extend(self._collect(mine))
        if self.closed and why == "done":
            why = "closed"
        pos: dict[Key, int] = {}
        for i, k in enumerate(keys):
            pos.setdefault(k, i)
        started.sort(key=lambda kw: pos[kw[0]])   # in the order asked (starts in parallel finish in any order)
        now = self._clock()
        for _, w in reversed(started):  # the hottest last: the most recently used, the last evicted
            self.ws.touch(w, now)
        return started, already, tried, why

    @staticmethod
    def _collect(mine: set["asyncio.Future[tuple[Key, WorkerHandle] | None]"]) -> list[tuple[Key, WorkerHandle]]:
        out = []
        for f in [f for f in mine if f.done()]:
            mine.discard(f)
            got = None if f.cancelled() else f.result()
            if got is not None:
                out.append(got)
        return out

    async def _prewarm_one(self, key: Key) -> tuple[Key, WorkerHandle] | None:
        """One prewarm start (slot reserved for ``key``): the worker is parked idle, or serves a waiter of its key."""
        try:
            w = await self._new_worker(key, True)
        except PoolClosed:
            return None
        except Exception as exc:
            log.warning("prewarm: could not start a worker: %s", exc)
            return None
        self._offer(w, key)
        return key, w

    # -- acquire / release --------------------------------------------------------------------------
    def _tenant_room(self, tenant: str) -> int:
        """Workers ``tenant`` may still be handed or have started for it (its concurrency cap)."""
        return self.max_busy_per_tenant - self.ts.busy(tenant) - self._spawning_by_tenant.get(tenant, 0)

    def _take_spare(self, key: Key) -> WorkerHandle | None:
        if key[1] != self.default_profile:
            return None
        w = self.ws.take((None, key[1]), "")
        if w is not None:
            w.tenant = key[0]
            # Replace it once this flow had the CPU: a start (fork, sandbox, hello: ~5 ms of CPU over
            # three processes) begun now lands on the cores exactly while the spare's first flow runs.
            if self._refill is None and not self.closed:
                self._refill = asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._refill_now)
        return w

    def _refill_now(self) -> None:
        self._refill = None
        self._replenish()

    def _hand(self, fut: "asyncio.Future[WorkerHandle]", w: WorkerHandle, key: Key, tenant: str) -> None:
        w.tenant = key[0]
        self.ts.hold(w, key, tenant)
        self.ts.served(tenant)
        fut.set_result(w)

    async def acquire(self, owner: str, digest: str, profile: tuple[Any, ...], timeout: float,
                      tenant: str | None = None) -> WorkerHandle:
        """A worker bound to ``owner``: an idle one now, or the first to be freed or started for it.

        ``tenant`` is whom the caps and the round-robin count it against (default: the owner).
        A flow that finds no idle worker waits in its key's queue while new workers start on
        behalf of the waiters (see ``_grow``); whichever comes first serves the oldest waiter.
        """
        if self.closed:
            raise PoolClosed("pool closed")
        tenant = owner if tenant is None else tenant
        key: Key = (owner, profile)
        if self._tenant_room(tenant) > 0 and not self.ts.waiting(key):
            w = self.ws.take(key, digest) or self._take_spare(key)
            if w is not None:
                self.ts.hold(w, key, tenant)
                self._keep_tenant_warm(key)
                return w
        why = policy.refuse_reason(self.ts.waiting_by_tenant.get(tenant, 0), self.max_queue_per_tenant,
                                   self.ts.n_waiting, self.max_queue)
        if why is not None:
            raise Overloaded(f"no idle worker and {why}")
        fut: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
        entry = self.ts.enqueue(key, tenant, fut)
        self._grow()
        # A plain timer instead of wait_for(shield(...)): no extra task or future per waiting flow.
        timer = fut.get_loop().call_later(timeout, _expire, fut)
        try:
            return await fut  # held for this flow by _hand
        except _Expired:
            if self._tenant_room(tenant) <= 0:
                raise Overloaded(f"this tenant already holds its cap of {self.max_busy_per_tenant} workers; "
                                 f"none became free within {timeout:.3g}s") from None
            if self.ws.full() and not self.ws.n_idle:
                raise Overloaded(f"all {self.ws.capacity} workers busy; none became free within {timeout:.3g}s") from None
            raise Overloaded(f"no worker could be started within {timeout:.3g}s ({self.ts.n_waiting} flows waiting "
                             f"for {self.spawn_concurrency} start slots)") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), True)  # handed over just as the caller gave up
            raise
        finally:
            timer.cancel()
            # A waiter handed a worker was already popped; only one that gave up is still queued (and
            # deque.remove of a missing entry builds a ValueError with the future's repr: costly).
            if not (fut.done() and not fut.cancelled() and fut.exception() is None):
                self.ts.remove(key, entry)

    def release(self, w: WorkerHandle, reusable: bool) -> None:
        now = self._clock()
        rec = self.ts.unhold(w)
        if rec is not None:
            key = rec[0]
            self.exec_ema_s = 0.9 * self.exec_ema_s + 0.1 * (now - rec[2])
        else:
            key = (w.tenant, w.profile or self.default_profile)
        w.last_used = now
        self.reuse_ema = 0.9 * self.reuse_ema + (0.1 if reusable and w.alive else 0.0)
        if self._retiring and w in self._retiring:
            w.kill("retired: its tenant was forgotten")  # -> _on_dead -> _grow
            return
        if not reusable or not w.alive or w.executions >= self.max_executions or self.closed:
            if w.alive:
                w.kill("retired" if reusable else "not reusable after its execution")  # -> _on_dead -> _grow
            elif self.ts.n_waiting:
                self._grow()  # this hold ended without a worker to hand on, but the tenant's cap has room
            return
        self._offer_released(w, key)

    def _offer_released(self, w: WorkerHandle, key: Key) -> None:
        """A worker given back by a flow: in a pool full of busy workers, it goes round-robin.

        With no idle worker to evict, a released worker is the only capacity that frees up. When
        another waiting tenant holds fewer workers (its turn), this one is retired and its slot
        starts a worker for that tenant instead of serving the same tenant's next waiter.
        """
        if self.ws.full() and not self.ws.n_idle and self.ts.waiting(key):
            tenant = self.ts.tenant_of(key)
            if tenant is not None and self._tenant_room(tenant) > 0 and self._yield_to_blocked(tenant):
                w.kill("retired: its slot went to a waiting flow of another tenant")  # -> _on_dead -> _grow
                return
        self._offer(w, key)

    def _offer(self, w: WorkerHandle, key: Key) -> None:
        """An idle worker (released or just started): hand it to a waiter of its key, or park it in the LRU."""
        if not w.alive:
            return
        if key[0] is None:
            if self._offer_spare(w, key):
                return
        elif self.ts.waiting(key):
            tenant = self.ts.tenant_of(key)
            assert tenant is not None
            if self._tenant_room(tenant) > 0:
                fut = self.ts.pop(key)
                if fut is not None:
                    self._hand(fut, w, key, tenant)
                    if self.ts.n_waiting:
                        self._grow()
                    return
        self.ws.park(w, key)
        if self.ts.n_waiting:
            self._grow()  # a start slot or a worker just came free: do the waiters need more?
        else:
            self._replenish()  # a quiet moment: have unassigned spares ready for the next new action

    def _offer_spare(self, w: WorkerHandle, key: Key) -> bool:
        """An unassigned warm worker serves the next waiting tenant (round-robin) with its profile."""
        for tenant, k in self.ts.fair_keys():
            if k[1] == key[1] and self._tenant_room(tenant) > 0:
                fut = self.ts.pop(k)
                if fut is not None:
                    self._hand(fut, w, k, tenant)
                    if self.ts.n_waiting:
                        self._grow()
                    return True
        return False

    def _blocked(self, tenant: str) -> bool:
        """``tenant`` waits for capacity: a waiting key nothing of its own will serve (no worker, no start)."""
        if self._tenant_room(tenant) <= 0:
            return False
        for key in self.ts.rotation.get(tenant, ()):
            if not self.ts.held_count(key) and not self.ws.spawning.get(key) and not self.ws.idle.get(key):
                return True
        return False

    def _yield_to_blocked(self, tenant: str) -> bool:
        """In a full pool: should ``tenant``'s freed worker go to another tenant's waiter instead (its turn)?"""
        pick = policy.fair_pick(self.ts.rotation, lambda t: t == tenant or self._blocked(t), self.ts.busy)
        return pick is not None and pick != tenant

    # -- growth ---------------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Serve waiters from idle workers and start workers for the rest, round-robin over tenants."""
        if self.closed or not self.ts.n_waiting or self._in_grow:
            return
        self._in_grow = True
        try:
            self._grow_pass()
        finally:
            self._in_grow = False

    def _grow_pass(self) -> None:
        now = self._clock()
        deferred = False
        wants: list[tuple[str, Key, int]] = []
        for tenant, key in self.ts.fair_keys():
            # Idle workers of a key with waiters: its tenant was at its cap; it may have room now.
            while self.ts.waiting(key) and self._tenant_room(tenant) > 0:
                w = self.ws.take(key, "") or self._take_spare(key)
                if w is None:
                    break
                fut = self.ts.pop(key)
                if fut is None:
                    self.ws.park(w, key)
                    break
                self._hand(fut, w, key, tenant)
            waiting = self.ts.waiting(key)
            if not waiting:
                continue
            served = 0
            oldest = self.ts.oldest_hold(key)
            if oldest is not None:
                # How long a hold lasts: the moving average, or longer if the oldest current hold already
                # took longer (a cold pool, or actions that just became slow).
                hold_s = max(self.exec_ema_s, now - oldest)
                served = policy.releases_before_start(self.ts.held_count(key), hold_s, self.spawn_ema_s,
                                                      self.reuse_ema)
                deferred = deferred or served > 0
            want = policy.starts_wanted(waiting, self.ws.spawning.get(key, 0), served)
            if want:
                wants.append((tenant, key, want))
        # Start slots: one per tenant per round, the tenant holding the least first (ties: the least
        # recently served), so one tenant's many waiting keys cannot take every slot.
        per_tenant: dict[str, list[list[Any]]] = {}
        for tenant, key, want in wants:
            per_tenant.setdefault(tenant, []).append([key, want, tenant])
        # Before that, waiters that have waited fair_wait_s: oldest first (anti-starvation).
        heads = [(e, since) for todo in per_tenant.values() for e in todo
                 if (since := self.ts.head_since(e[0])) is not None]
        for e in policy.starving(heads, now, self.fair_wait_s):
            if self._tenant_room(e[2]) <= 0:
                continue
            if not self._start_one(e):
                return self._maybe_recheck(deferred)
        order = sorted(per_tenant, key=lambda t: self.ts.busy(t) + self._spawning_by_tenant.get(t, 0))
        progress = True
        while progress:
            progress = False
            for tenant in order:
                # Within the tenant, the key with the fewest workers (held or starting) first: a hot key
                # with many waiters must not take every slot while its other keys have no worker at all.
                pick = policy.fair_pick(per_tenant[tenant], lambda e: e[1] > 0, self._workers_of)
                if pick is None or self._tenant_room(tenant) <= 0:
                    continue
                if not self._start_one(pick):
                    return self._maybe_recheck(deferred)
                progress = True
        self._maybe_recheck(deferred)

    def _start_one(self, entry: list[Any]) -> bool:
        """Start a worker for ``entry`` = [key, starts still wanted, tenant]; False when no slot is free."""
        key, want, tenant = entry
        if want <= 0:
            return True
        if self.ws.starting >= self.spawn_concurrency:
            return False
        if self.ws.full() and not self.ws.evict_lru(key, self.pool_size):
            return False
        entry[1] -= 1
        self._start_for(key, tenant)
        return True

    def _workers_of(self, entry: list[Any]) -> int:
        key = entry[0]
        return self.ts.held_count(key) + self.ws.spawning.get(key, 0)

    def _maybe_recheck(self, deferred: bool) -> None:
        if deferred and self._recheck is None and not self.closed:
            # Holds age while flows wait: look again once a start would have been worth it.
            self._recheck = asyncio.get_running_loop().call_later(self.spawn_ema_s, self._recheck_growth)

    def _recheck_growth(self) -> None:
        self._recheck = None
        self._grow()

    def _start_for(self, key: Key, tenant: str) -> None:
        self.ws.reserve(key)
        self._spawning_by_tenant[tenant] = self._spawning_by_tenant.get(tenant, 0) + 1
        self.ts.served(tenant)
        self._spawn_task(self._spawn_for_waiters(key, tenant))

    async def _spawn_for_waiters(self, key: Key, tenant: str) -> None:
        try:
            w = await self._new_worker(key, True)
        except BaseException as exc:
            self._untrack_spawn(tenant)
            self._spawn_failures += 1
            if self._spawn_failures < 3 and isinstance(exc, Exception) and not self.closed:
                self._grow()  # a passing failure: the waiters still have time, try again
                return
            # Starts keep failing: fail the oldest waiter of this key so the error surfaces.
            fut = self.ts.pop(key)
            if fut is not None:
                fut.set_exception(exc if isinstance(exc, Exception) else PoolClosed("cancelled"))
            return
        self._untrack_spawn(tenant)
        self._spawn_failures = 0
        self._offer(w, key)

    def _untrack_spawn(self, tenant: str) -> None:
        n = self._spawning_by_tenant[tenant] - 1
        if n:
            self._spawning_by_tenant[tenant] = n
        else:
            del self._spawning_by_tenant[tenant]

    def _after_capacity_freed(self) -> None:
        if self._in_grow:
            return  # the _grow that retired this worker uses the slot itself
        self._grow()
        self._replenish()

    def retire_tenant(self, tenant: str, owns: Callable[[Any], bool]) -> list[WorkerHandle]:
        """Kill ``tenant``'s idle workers (those whose owner ``owns``) now; its busy ones when they are released.

        A busy worker finishes its execution and is then never reused. Returns every worker
        concerned (killed now or marked), so the caller can wait for their exit.
        """
        idle = [w for w, key in self.ws.oldest_idle() if key[0] is not None and owns(key[0])]
        for w in idle:
            w.kill("retired: its tenant was forgotten")  # -> _on_dead -> forget
        busy = [w for w, (_key, t, _since) in self.ts.held.items() if t == tenant and w.alive]
        self._retiring.update(busy)
        return idle + busy

    # -- idle retirement ------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Retire idle workers unused for ``idle_timeout_s`` (beyond the warm ones each key keeps)."""
        spare: Key = (None, self.default_profile)
        return self.ws.retire_idle(self._clock(), self.idle_timeout_s,
                                   lambda k: self.pool_size if k == spare else self.min_idle_per_tenant)

    def _schedule_sweep(self) -> None:
        if not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(policy.sweep_period(self.idle_timeout_s),
                                                                  self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweeper = None
        try:
            self.sweep()
            self._replenish()
        finally:
            self._schedule_sweep()

    # -- shutdown ---------------------------------------------------------------------------------------
    async def close(self, grace: float) -> None:
        self.closed = True
        for handle in (self._recheck, self._sweeper, self._refill):
            if handle is not None:
                handle.cancel()
        self._recheck = self._sweeper = self._refill = None
        for _, key in list(self.ts.fair_keys()):
            while (fut := self.ts.pop(key)) is not None:
                fut.set_exception(PoolClosed("pool closed"))
        if self._tasks:
            # Starts in flight end on their own (each is bounded, and stops its worker once it sees the pool
            # closed): a start cancelled mid-launch left its worker's pipe transports for the GC to find.
            await asyncio.wait(list(self._tasks), timeout=CLOSE_STARTS_S)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self.ws.live)
        await asyncio.gather(*(w.shutdown(grace) for w in workers), return_exceptions=True)
        self.ws.live.clear()
        self.ws.idle.clear()
