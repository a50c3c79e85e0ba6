"""Unpredictable ids without a syscall each: ``os.urandom`` read 4 KiB at a time.

Flow ids and execute request ids must be unguessable (a worker that could
predict the next request id could forge its answer blind), but asking the
kernel for 4 or 16 bytes twice per flow is a measurable share of the
supervisor's per-flow cost. The bytes are the kernel's either way; a forked
child starts with an empty buffer so it never repeats its parent's ids.
"""

from __future__ import annotations

import os

_REFILL = 4096


class _Pool:
    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.buf):
            self.buf = os.urandom(_REFILL)
            pos, end = 0, n
        self.pos = end
        return self.buf[pos:end]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.__init__)


def random_hex(n_bytes: int = 16) -> str:
    """``n_bytes`` random bytes as hex (a flow id)."""
    return _pool.take(n_bytes).hex()


def random_u32() -> int:
    """A random 32-bit integer (an execute request id)."""
    return int.from_bytes(_pool.take(4), "little")
