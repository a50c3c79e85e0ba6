"""Fetch capacity, partitioned per tenant and bounded overall.

One tenant's slow hosts, slow DNS or flood of fetches must never take
capacity another tenant needs. Each tenant gets its own connection pool, a cap
on fetches in flight (with a bounded queue behind it) and a cap on DNS
lookups in flight. DNS runs on a small thread pool of its own, not asyncio's
default executor, and a tenant's lookup keeps its slot until the thread is
really free (a cancelled ``getaddrinfo`` still occupies its thread).

The per-tenant state itself is bounded: an LRU of at most
``FetchConfig.max_tenant_pools`` entries; entries idle for
``FetchConfig.pool_idle_s`` are closed, so 100,000 tenants never mean
100,000 pools.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ._config import FetchConfig
from ._errors import FetchError

__all__ = ["TenantCapacity", "CapacityTable", "Resolver", "BlockingResolver", "system_getaddrinfo"]

Resolver = Callable[[str], Awaitable[list[str]]]
MEMO_ENTRIES = 32  # per tenant: verdicts on URLs (at most MEMO_URL_CHARS long) and address sets
BlockingResolver = Callable[[str], list[str]]


def system_getaddrinfo(host: str) -> list[str]:
    """The system resolver (honours /etc/hosts and resolv.conf); blocking, run on the DNS threads."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Gate:
    """A counting gate with a bounded queue: over ``queued`` waiters fails at once instead of piling up."""

    def __init__(self, slots: int, queued: int, what: str) -> None:
        self._sem = asyncio.Semaphore(slots)
        self._queued = queued
        self._waiting = 0
        self._what = what

    @property
    def busy(self) -> bool:
        return self._sem.locked() or self._waiting > 0

    async def acquire(self) -> None:
        if self._sem.locked():
            if self._waiting >= self._queued:
                raise FetchError(f"api.fetch: too many {self._what} in flight for this tenant; try again later")
            self._waiting += 1
            try:
                await self._sem.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._sem.acquire()

    def release(self) -> None:
        self._sem.release()


class TenantCapacity:
    """One tenant's share: its connection pool, its fetch slots, its DNS slots and answers."""

    def __init__(self, pool: Any, config: FetchConfig) -> None:
        self.pool = pool
        self.fetches = _Gate(config.max_concurrent_per_tenant, config.max_queued_per_tenant, "fetches")
        self.lookups = _Gate(config.max_dns_per_tenant, config.max_queued_per_tenant, "DNS lookups")
        self.active = 0          # fetches holding this entry (never closed while > 0)
        self.forgotten = False   # its tenant was forgotten: the last fetch holding it closes its pool
        self.dns_threads = 0     # DNS threads this tenant occupies right now
        self.last_used = time.monotonic()
        # Recent answers (host -> (expiry, addresses)), LRU-capped, and lookups in flight: a
        # burst of fetches to one host costs one lookup. Addresses are vetted on every use.
        self.answers: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self.pending: dict[str, asyncio.Task[list[str]]] = {}
        # The policy's verdicts on this tenant's recent URLs and address sets (pure functions of their
        # key, so a hit is the same answer, ~100 us cheaper): kept per tenant, like everything here.
        self.memo: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def remembered(self, key: tuple[Any, ...]) -> Any:
        """A verdict stored by :meth:`remember`, or None."""
        hit = self.memo.get(key)
        if hit is not None:
            self.memo.move_to_end(key)
        return hit

    def remember(self, key: tuple[Any, ...], value: Any) -> None:
        self.memo[key] = value
        if len(self.memo) > MEMO_ENTRIES:
            self.memo.popitem(last=False)


class CapacityTable:
    """The LRU of :class:`TenantCapacity`, plus the DNS thread pool they share with per-tenant caps."""

    def __init__(self, config: FetchConfig, make_pool: Callable[[], Any], *,
                 resolver: Resolver | None = None, blocking_resolver: BlockingResolver | None = None) -> None:
        self._config = config
        self._make_pool = make_pool
        self._resolver = resolver
        self._blocking = blocking_resolver or system_getaddrinfo
        self._entries: OrderedDict[str, TenantCapacity] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._dns: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, tenant: str) -> TenantCapacity | None:
        """``tenant``'s entry if it has one (never creates one: a denied fetch costs no pool)."""
        return self._entries.get(tenant)

    @asynccontextmanager
    async def use(self, tenant: str) -> AsyncIterator[TenantCapacity]:
        """Hold one of ``tenant``'s fetch slots (waiting in its bounded queue) for the block."""
        cap = await self.acquire(tenant)
        try:
            yield cap
        finally:
            self.release(cap)

    async def acquire(self, tenant: str) -> TenantCapacity:
        """One of ``tenant``'s fetch slots; pair with :meth:`release` (what :meth:`use` does, without a
        generator-based context manager on every fetch: the Fetcher's hot path calls these directly)."""
        cap = self._entry(tenant)
        cap.active += 1
        try:
            await cap.fetches.acquire()
        except BaseException:
            self._leave(cap)
            raise
        return cap

    def release(self, cap: TenantCapacity) -> None:
        cap.fetches.release()
        self._leave(cap)

    def _leave(self, cap: TenantCapacity) -> None:
        cap.active -= 1
        cap.last_used = time.monotonic()
        if cap.forgotten and cap.active == 0:
            self._close(cap)

    async def resolve(self, cap: TenantCapacity, host: str) -> list[str]:
        """``host``'s addresses: a recent answer, a lookup already in flight, or a new lookup."""
        now = time.monotonic()
        hit = cap.answers.get(host)
        if hit is not None and hit[0] > now:
            cap.answers.move_to_end(host)
            return list(hit[1])
        task = cap.pending.get(host)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(cap, host))
            cap.pending[host] = task
            task.add_done_callback(lambda t: self._looked_up(cap, host, t))
        # Shielded: a fetch whose budget ends stops waiting, the shared lookup goes on for the others.
        return list(await asyncio.shield(task))

    def _looked_up(self, cap: TenantCapacity, host: str, task: asyncio.Task[list[str]]) -> None:
        cap.pending.pop(host, None)
        if task.cancelled() or task.exception() is not None:  # retrieved: no "never retrieved" warning
            return
        cap.answers[host] = (time.monotonic() + self._config.dns_cache_s, task.result())
        cap.answers.move_to_end(host)
        while len(cap.answers) > self._config.max_dns_answers_per_tenant:
            cap.answers.popitem(last=False)

    async def _lookup(self, cap: TenantCapacity, host: str) -> list[str]:
        """Resolve under the tenant's DNS cap; the slot is held until the lookup really ends."""
        await cap.lookups.acquire()
        if self._resolver is not None:
            try:
                return await self._resolver(host)
            finally:
                cap.lookups.release()
        if self._dns is None:
            self._dns = concurrent.futures.ThreadPoolExecutor(self._config.dns_threads,
                                                              thread_name_prefix="actionpool-dns")
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future[list[str]]) -> None:
            try:
                loop.call_soon_threadsafe(_release_thread, cap)
            except RuntimeError:  # the loop is closed: nothing left to release for
                pass

        cap.dns_threads += 1
        try:
            cf = self._dns.submit(self._blocking, host)
        except RuntimeError:  # the executor was shut down (closing)
            _release_thread(cap)
            raise FetchError("api.fetch: the fetcher is closing") from None
        cf.add_done_callback(done)
        return await asyncio.wrap_future(cf)

    def _entry(self, tenant: str) -> TenantCapacity:
        now = time.monotonic()
        cap = self._entries.get(tenant)
        if cap is not None:
            self._entries.move_to_end(tenant)
        else:
            cap = TenantCapacity(self._make_pool(), self._config)
            self._entries[tenant] = cap
        cap.last_used = now
        self._trim(now, keep=tenant)
        return cap

    def _trim(self, now: float, keep: str) -> None:
        """Close idle entries past their idle time, then the least recently used idle ones over the cap.

        ``keep`` (the entry about to be used, at the tail) is never closed.
        """
        idle_before = now - self._config.pool_idle_s
        while self._entries:
            tenant, cap = next(iter(self._entries.items()))
            if tenant == keep or not self._idle(cap) or cap.last_used > idle_before:
                break
            self._evict(tenant)
        if len(self._entries) > self._config.max_tenant_pools:
            # Busy entries are skipped (their fetches keep their pool); the table may exceed the
            # cap by the number of tenants with fetches in flight, itself bounded by the workers.
            for tenant in [t for t, c in self._entries.items() if t != keep and self._idle(c)]:
                if len(self._entries) <= self._config.max_tenant_pools:
                    break
                self._evict(tenant)

    @staticmethod
    def _idle(cap: TenantCapacity) -> bool:
        return (cap.active == 0 and cap.dns_threads == 0 and not cap.pending
                and not cap.fetches.busy and not cap.lookups.busy)

    def _evict(self, tenant: str) -> None:
        self._close(self._entries.pop(tenant))

    def _close(self, cap: TenantCapacity) -> None:
        task = asyncio.get_running_loop().create_task(cap.pool.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def forget(self, tenant: str) -> None:
        """Drop ``tenant``'s entry (pool, DNS answers) now; fetches still in flight close its pool when done.

        A later fetch of the same tenant name gets a new entry: nothing carries over.
        """
        cap = self._entries.pop(tenant, None)
        if cap is None:
            return
        if cap.active == 0:
            for task in list(cap.pending.values()):  # lookups left by fetches that gave up: nobody reads them
                task.cancel()
            self._close(cap)
        else:
            cap.forgotten = True

    async def aclose(self) -> None:
        entries = list(self._entries.values())
        self._entries.clear()
        for cap in entries:
            for task in list(cap.pending.values()):
                task.cancel()
        await asyncio.gather(*(c.pool.aclose() for c in entries), *self._closing, return_exceptions=True)
        if self._dns is not None:
            self._dns.shutdown(wait=False, cancel_futures=True)
            self._dns = None


def _release_thread(cap: TenantCapacity) -> None:
    cap.dns_threads -= 1
    cap.lookups.release()
