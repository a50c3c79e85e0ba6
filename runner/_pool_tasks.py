"""The pool's task side: waiting flows, handed-out workers, and who is served next.

It owns everything about flows and nothing about processes (that is ``_pool_workers``):
waiters FIFO per key, counts per tenant for the caps, hold times for the growth estimate, and
the round-robin order of tenants. Every per-key and per-tenant entry is deleted when it
empties, so its size is O(waiting flows + handed-out workers).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator

from ._pool_workers import Key
from ._worker import WorkerHandle

Waiter = tuple[int, "asyncio.Future[WorkerHandle]", float]   # (sequence, future, when it began to wait)


class _Queue:
    __slots__ = ("tenant", "entries")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.entries: deque[Waiter] = deque()


class TaskSide:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.queues: dict[Key, _Queue] = {}
        self.n_waiting = 0
        self.waiting_by_tenant: dict[str, int] = {}
        self._seq = 0
        # Tenants that have waiting flows, least recently served first: the round-robin order.
        self.rotation: OrderedDict[str, dict[Key, None]] = OrderedDict()
        # Handed-out workers: which key and tenant, since when.
        self.held: dict[WorkerHandle, tuple[Key, str, float]] = {}
        self.held_by_key: dict[Key, dict[WorkerHandle, float]] = {}
        self.busy_by_tenant: dict[str, int] = {}

    # -- waiting -------------------------------------------------------------------------------------
    def enqueue(self, key: Key, tenant: str, fut: "asyncio.Future[WorkerHandle]") -> Waiter:
        self._seq += 1
        entry = (self._seq, fut, self.clock())
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = _Queue(tenant)
            self.rotation.setdefault(tenant, {})[key] = None
        q.entries.append(entry)
        self.n_waiting += 1
        self.waiting_by_tenant[tenant] = self.waiting_by_tenant.get(tenant, 0) + 1
        return entry

    def _dec(self, key: Key, q: _Queue) -> None:
        self.n_waiting -= 1
        n = self.waiting_by_tenant[q.tenant] - 1
        if n:
            self.waiting_by_tenant[q.tenant] = n
        else:
            del self.waiting_by_tenant[q.tenant]
        if not q.entries:
            del self.queues[key]
            keys = self.rotation.get(q.tenant)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self.rotation[q.tenant]

    def remove(self, key: Key, entry: Waiter) -> None:
        """A waiter gave up (timeout, cancel) or was served: drop it if it is still queued."""
        q = self.queues.get(key)
        if q is None:
            return
        try:
            q.entries.remove(entry)
        except ValueError:
            return
        self._dec(key, q)

    def pop(self, key: Key) -> "asyncio.Future[WorkerHandle] | None":
        """The oldest live waiter of ``key`` (dropping ones that gave up), or None."""
        q = self.queues.get(key)
        while q is not None and q.entries:
            fut = q.entries.popleft()[1]
            self._dec(key, q)
            if not fut.done():
                return fut
            q = self.queues.get(key)
        return None

    def waiting(self, key: Key) -> int:
        q = self.queues.get(key)
        return len(q.entries) if q is not None else 0

    def tenant_of(self, key: Key) -> str | None:
        q = self.queues.get(key)
        return q.tenant if q is not None else None

    def served(self, tenant: str) -> None:
        """``tenant`` just got capacity: it goes to the back of the round-robin order."""
        if tenant in self.rotation:
            self.rotation.move_to_end(tenant)

    def fair_keys(self) -> Iterator[tuple[str, Key]]:
        """Waiting keys, tenants in round-robin order (each tenant's keys oldest first)."""
        for tenant, keys in list(self.rotation.items()):
            for key in list(keys):
                yield tenant, key

    def head_since(self, key: Key) -> float | None:
        """When the oldest waiter of ``key`` began to wait (None: nobody waits)."""
        q = self.queues.get(key)
        return q.entries[0][2] if q is not None and q.entries else None

    # -- handed-out workers -------------------------------------------------------------------------
    def hold(self, w: WorkerHandle, key: Key, tenant: str) -> None:
        now = self.clock()
        self.held[w] = (key, tenant, now)
        self.held_by_key.setdefault(key, {})[w] = now
        self.busy_by_tenant[tenant] = self.busy_by_tenant.get(tenant, 0) + 1

    def unhold(self, w: WorkerHandle) -> tuple[Key, str, float] | None:
        rec = self.held.pop(w, None)
        if rec is None:
            return None
        key, tenant, _ = rec
        by_key = self.held_by_key[key]
        del by_key[w]
        if not by_key:
            del self.held_by_key[key]
        n = self.busy_by_tenant[tenant] - 1
        if n:
            self.busy_by_tenant[tenant] = n
        else:
            del self.busy_by_tenant[tenant]
        return rec

    def busy(self, tenant: str) -> int:
        return self.busy_by_tenant.get(tenant, 0)

    def oldest_hold(self, key: Key) -> float | None:
        holds = self.held_by_key.get(key)
        return next(iter(holds.values())) if holds else None

    def held_count(self, key: Key) -> int:
        holds = self.held_by_key.get(key)
        return len(holds) if holds else 0

    def state_sizes(self) -> dict[str, Any]:
        return {"waiting_keys": len(self.queues), "waiting_tenants": len(self.waiting_by_tenant),
                "held_keys": len(self.held_by_key), "busy_tenants": len(self.busy_by_tenant)}
