"""How late the supervisor's event loop runs: a periodic timer measures its own lateness.

Every tenant's messages, kill timers, fetches and flows share one asyncio loop.
Anything that holds it (a slow handler, a quadratic decoder, a blocking call)
delays all of them, and kill timers fire late, so actions overrun their limits.
``LagMonitor`` schedules a callback every ``interval_s`` and records how much
later than planned it ran; ``Runner.stats()`` reports the latest lag, the
maximum and the 99th percentile over the last ``window_s`` seconds, so a
freeze is visible in metrics instead of only in complaints.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class LagMonitor:
    """A self-rescheduling timer on the running loop; cheap (one callback per interval)."""

    def __init__(self, interval_s: float = 0.05, window_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[float] = deque(maxlen=max(1, int(window_s / interval_s)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.current = 0.0   # seconds: how late the last tick ran

    def start(self) -> None:
        """Start on the running loop (idempotent)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.current = max(0.0, now - self._due)
        self._samples.append(self.current)
        self._schedule(now)

    def stats(self) -> dict[str, Any]:
        """``loop_lag_ms`` (latest), ``loop_lag_max_ms`` and ``loop_lag_p99_ms`` over the window."""
        samples = sorted(self._samples)
        if not samples:
            return {"loop_lag_ms": 0.0, "loop_lag_max_ms": 0.0, "loop_lag_p99_ms": 0.0}
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        return {"loop_lag_ms": round(self.current * 1000, 3), "loop_lag_max_ms": round(samples[-1] * 1000, 3),
                "loop_lag_p99_ms": round(p99 * 1000, 3)}
