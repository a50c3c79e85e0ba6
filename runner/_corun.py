"""Co-running: several executions of one I/O-bound action in one worker.

A flow that awaits ``api.fetch`` holds its worker for the whole round trip, so N
flows waiting on an upstream would need N processes. Instead, a flow of an action
with ``Limits.co_run > 1`` first looks here for a busy worker of the same key
(tenant, action, limits) whose executions all wait on a fetch in the supervisor's
hands (``WorkerHandle.can_co_run``), and joins it. When none can take it now but
one will (the action was seen to reach a fetch, and a busy worker of it has room),
the flow waits a moment for that worker's executions to park (``join_wait``);
only then does it take a worker from the pool. The pool sees one hold per worker:
the worker goes back to it when the last execution on it ends.

What it costs is the kill contract, stated in docs/design.md ("Workers during an
await"): a timeout, memory kill or crash ends every execution in the worker (the
others are denied ``worker_lost``), all of them of the same action of the same
tenant. An execution that fails on its own (uncaught error) leaves the others to
finish; the worker is discarded after the last (``WorkerHandle.draining``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ._worker import WorkerHandle

Key = tuple[str, tuple[Any, ...]]
MAX_IO_BOUND = 4096   # actions remembered as reaching a fetch (LRU): what a join may wait for


class _Waiter:
    __slots__ = ("digest", "future", "limit")

    def __init__(self, future: asyncio.Future[WorkerHandle | None], digest: str, limit: int) -> None:
        self.future = future
        self.digest = digest
        self.limit = limit


class CoRunners:
    """The busy workers that may take another execution, who waits to join them, and how many flows hold each."""

    def __init__(self, release: Callable[[WorkerHandle, bool], None]) -> None:
        self._release = release   # one flow is done with a worker (the engine's ``_left``)
        # Busy workers of actions seen to reach a fetch, by pool key (a dict as an ordered set).
        self._open: dict[Key, dict[WorkerHandle, None]] = {}
        self._holders: dict[WorkerHandle, tuple[Key, int]] = {}
        self._waiters: dict[Key, deque[_Waiter]] = {}
        self._io_bound: OrderedDict[str, None] = OrderedDict()   # digests seen waiting on a fetch
        self.joined = 0        # executions that ran beside another in its worker (stats: co_runs)
        self.join_waits = 0    # of those, the ones that waited for a worker to park first

    # -- joining ---------------------------------------------------------------------------
    def join(self, key: Key, digest: str, limit: int) -> WorkerHandle | None:
        """A busy worker of ``key`` that takes one more execution of ``digest`` now, held for it; else None."""
        if digest not in self._io_bound or self._waiters.get(key):   # waiters first, in order
            return None
        ws = self._open.get(key)
        if ws:
            for w in ws:
                if w.can_co_run(digest, limit):
                    self._add_holder(w)
                    return w
        return None

    async def join_wait(self, key: Key, digest: str, limit: int, timeout: float) -> WorkerHandle | None:
        """Wait up to ``timeout`` for a busy worker of ``key`` to take this execution; None: use the pool.

        Only for actions seen to reach a fetch, and only while the busy workers' room exceeds the
        flows already waiting, so a CPU-bound action never waits here and the wait is short: it
        ends at the next fetch any of them sends.
        """
        if digest not in self._io_bound:
            return None
        q = self._waiters.get(key)
        room = sum(w.co_room(digest, limit) for w in self._open.get(key, ()))
        if room <= (len(q) if q else 0):
            return None
        w = self.join(key, digest, limit) if not q else None
        if w is not None:
            return w
        fut: asyncio.Future[WorkerHandle | None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, digest, limit)
        self._waiters.setdefault(key, deque()).append(waiter)
        timer = fut.get_loop().call_later(timeout, _expire, fut)
        try:
            got = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and (w := fut.result()) is not None:
                # Handed a worker in the same pass the caller gave up: its hold goes back at once.
                w.co_pending -= 1
                self._release(w, True)
            raise
        finally:
            timer.cancel()
            if not fut.done() or fut.cancelled() or fut.result() is None:
                q = self._waiters.get(key)
                if q is not None and waiter in q:
                    q.remove(waiter)
                    if not q:
                        del self._waiters[key]
        if got is not None:
            got.co_pending -= 1   # its execute request is sent before anything else runs (the engine)
            self.join_waits += 1
        return got

    def _parked(self, w: WorkerHandle) -> None:
        """``w`` sent a fetch: remember its action as I/O-bound, and let waiters of its key join it."""
        digest = w.co_digest
        got = self._holders.get(w)
        if digest is None or got is None:
            return
        io = self._io_bound
        if digest in io:
            io.move_to_end(digest)
        else:
            io[digest] = None
            if len(io) > MAX_IO_BOUND:
                io.popitem(last=False)
        self._open.setdefault(got[0], {})[w] = None   # joinable from now on (idempotent)
        q = self._waiters.get(got[0])
        while q:
            first = q[0]
            if first.future.done():   # gave up (timed out or cancelled): not served
                q.popleft()
                continue
            if not w.can_co_run(first.digest, first.limit):
                break
            q.popleft()
            self._add_holder(w)
            w.co_pending += 1   # counted against its room until the joiner's execute request is sent
            first.future.set_result(w)
        if q is not None and not q:
            del self._waiters[got[0]]

    def _add_holder(self, w: WorkerHandle) -> None:
        k, n = self._holders[w]
        self._holders[w] = (k, n + 1)
        self.joined += 1

    # -- holding -----------------------------------------------------------------------------
    def hold(self, key: Key, w: WorkerHandle, digest: str | None) -> None:
        """``w`` came from the pool for one flow; with ``digest``, others of that action may join it."""
        w.co_digest = digest
        self._holders[w] = (key, 1)
        if digest is not None:
            w.on_park = self._parked
            if digest in self._io_bound:   # else its first fetch opens it (_parked): a plain def never costs this
                self._open.setdefault(key, {})[w] = None

    def leave(self, w: WorkerHandle) -> bool:
        """One flow is done with ``w``; True when it was the last (the caller gives ``w`` back to the pool)."""
        got = self._holders.get(w)
        if got is None:
            return True
        key, n = got
        if n > 1:
            self._holders[w] = (key, n - 1)
            return False
        del self._holders[w]
        w.co_digest = None
        w.on_park = None
        ws = self._open.get(key)
        if ws is not None:
            ws.pop(w, None)
            if not ws:
                del self._open[key]
        # Flows waiting to join when no worker of their key is busy any more: off to the pool (it has this one).
        q = self._waiters.get(key)
        if q and key not in self._open:
            for waiter in q:
                if not waiter.future.done():
                    waiter.future.set_result(None)
            del self._waiters[key]
        return True

    def holders(self, w: WorkerHandle) -> int:
        got = self._holders.get(w)
        return 0 if got is None else got[1]

    def stats(self) -> dict[str, int]:
        return {"co_runs": self.joined, "co_run_join_waits": self.join_waits,
                "co_run_waiting": sum(len(q) for q in self._waiters.values())}


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)
