"""The pool's worker side: live workers, idle ones in LRU order across keys, starts in flight.

It owns everything about processes and nothing about flows (that is ``_pool_tasks``). Every
per-key entry is deleted when it empties, so its size is O(live workers + starts), whatever
number of keys was ever seen.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator

from ._pool_policy import retire_due
from ._worker import WorkerHandle

Key = tuple[Any, tuple[Any, ...]]   # (owner or None for unassigned warm workers, worker profile)


class WorkerSide:
    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.clock = clock
        self.live: set[WorkerHandle] = set()
        self.idle: dict[Key, list[WorkerHandle]] = {}        # per key, most recently parked last
        self._lru: OrderedDict[WorkerHandle, Key] = OrderedDict()  # every idle worker, least recently used first
        self.starting = 0                                    # starts in flight (they count against capacity)
        self.spawning: dict[Key, int] = {}                   # starts in flight on behalf of a key's waiters
        self.spawned = 0
        self.discarded = 0
        self.peak = 0

    # -- counts -----------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.live) + self.starting

    @property
    def n_idle(self) -> int:
        return len(self._lru)

    def full(self) -> bool:
        return self.total >= self.capacity

    # -- starts -------------------------------------------------------------------------------------
    def reserve(self, key: Key | None = None) -> None:
        """Count a start against the caps before its task runs (one pass cannot overshoot)."""
        self.starting += 1
        if key is not None:
            self.spawning[key] = self.spawning.get(key, 0) + 1
        self.peak = max(self.peak, self.total)

    def unreserve(self, key: Key | None = None) -> None:
        self.starting -= 1
        if key is not None:
            n = self.spawning[key] - 1
            if n:
                self.spawning[key] = n
            else:
                del self.spawning[key]

    def adopt(self, w: WorkerHandle) -> None:
        self.spawned += 1
        self.live.add(w)

    # -- idle workers ----------------------------------------------------------------------------------
    def park(self, w: WorkerHandle, key: Key) -> None:
        self.idle.setdefault(key, []).append(w)
        self._lru[w] = key

    def take(self, key: Key, digest: str) -> WorkerHandle | None:
        """An idle worker of ``key``, preferring one that already compiled ``digest``."""
        lst = self.idle.get(key)
        if not lst:
            return None
        w = lst[-1]
        if digest not in w.compiled:
            for cand in reversed(lst):
                if digest in cand.compiled:
                    w = cand
                    break
        self._unpark(w, key)
        return w

    def _unpark(self, w: WorkerHandle, key: Key) -> None:
        lst = self.idle[key]
        lst.remove(w)
        if not lst:
            del self.idle[key]
        del self._lru[w]

    def touch(self, w: WorkerHandle, now: float) -> None:
        """Mark an idle worker as just used: the most recent in the LRU, its idle timer restarted."""
        w.last_used = now
        if w in self._lru:
            self._lru.move_to_end(w)

    def count(self, key: Key) -> int:
        """Idle workers of ``key`` and starts in flight for it (busy ones are the task side's)."""
        return len(self.idle.get(key, ())) + self.spawning.get(key, 0)

    def forget(self, w: WorkerHandle) -> bool:
        """A worker died: drop it from every structure. True when it was one of ours."""
        if w not in self.live:
            return False
        self.live.discard(w)
        self.discarded += 1
        key = self._lru.get(w)
        if key is not None:
            self._unpark(w, key)
        return True

    def oldest_idle(self) -> Iterator[tuple[WorkerHandle, Key]]:
        return iter(list(self._lru.items()))

    def evict_lru(self, spare: Key | None, keep_unassigned: int) -> bool:
        """Retire the least recently used idle worker not of key ``spare`` to free a slot.

        Unassigned warm workers go last (up to ``keep_unassigned`` of them are kept while any
        bound idle worker can go instead). The kill reaches ``forget`` through the handle's
        ``on_dead``.
        """
        fallback: WorkerHandle | None = None
        for w, key in self._lru.items():
            if key == spare:
                continue
            if key[0] is None and len(self.idle.get(key, ())) <= keep_unassigned:
                fallback = fallback or w
                continue
            w.kill("evicted: least recently used idle worker, its slot went to another action")
            return True
        if fallback is not None:
            fallback.kill("evicted: least recently used idle worker, its slot went to another action")
            return True
        return False

    def retire_idle(self, now: float, idle_timeout_s: float, keep: Callable[[Key], int]) -> int:
        """Kill idle workers unused for ``idle_timeout_s``, oldest first; a key keeps ``keep(key)``."""
        due = []
        for w, key in self._lru.items():
            if not retire_due(w.last_used, now, idle_timeout_s):
                break  # LRU order: every later one is younger
            due.append((w, key))
        n = 0
        for w, key in due:
            if len(self.idle.get(key, ())) > keep(key):
                w.kill("idle timeout")
                n += 1
        return n

    def state_sizes(self) -> dict[str, int]:
        """How many per-key entries exist: with no traffic and no idle workers, all zero."""
        return {"idle_keys": len(self.idle), "spawning_keys": len(self.spawning)}
