"""Admission of executions to the CPU: at most N begun and still young, the rest wait in one FIFO.

With more runnable workers than cores, the kernel's fair scheduler gives each its slice in turn, so
an execution that needs 0.3 ms of CPU takes a whole scheduling round of wall time (bench S7, 64
flows in flight on 2 cores: 15-30 ms per execution of a trivial action), and which flow finishes
first is the scheduler's lottery, not arrival order. Admitting ``limit`` executions at a time and
queueing the rest first-come-first-served keeps the runnable set near the cores, so each
execution runs in about its own CPU time and waits are shared evenly over all flows.

A token lives at most ``hold_s``: an execution still running by then (awaiting a fetch, or long
on the CPU, which the CPU governor demotes anyway) stops counting, so I/O-bound actions and
spinners never block admission for longer than that. A waiter's wait is bounded by its place in
the queue times ``hold_s / limit``, and the queue is bounded by the flows the runner admits.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Token:
    """One admitted execution; ``leave()`` (idempotent) when it ends. Expires by itself after ``hold_s``."""

    __slots__ = ("_gate", "_timer")

    def __init__(self, gate: "Admission") -> None:
        self._gate: Admission | None = gate
        self._timer = asyncio.get_running_loop().call_later(gate.hold_s, self._expire)

    def leave(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            self._timer.cancel()
            gate._next()

    def _expire(self) -> None:
        if self._gate is not None:
            self._gate.expired += 1
        self.leave()


class Admission:
    def __init__(self, limit: int, hold_s: float) -> None:
        self.limit = limit
        self.hold_s = hold_s
        self.active = 0        # tokens alive
        self.admitted = 0      # ever, for stats
        self.queued = 0        # admissions that had to wait, for stats
        self.expired = 0       # tokens that outlived hold_s (executions long on the CPU, or stuck), for stats
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self) -> Token:
        """A token now if fewer than ``limit`` are alive and nobody waits, else in FIFO order."""
        self.admitted += 1
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return Token(self)
        self.queued += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._next()   # the slot was handed to us just as we gave up: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return Token(self)     # the slot was passed to us: ``active`` already counts it

    def _next(self) -> None:
        """A token ended: hand its slot to the oldest waiter still waiting, else free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1

    def stats(self) -> dict[str, int]:
        return {"admission_active": self.active, "admission_waiting": len(self._waiters),
                "admission_queued": self.queued, "admission_expired": self.expired}
