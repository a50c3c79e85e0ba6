"""A seccomp filter as a plain BPF program: compiled once, loaded with one ``prctl`` per worker.

libseccomp turns the rule set into BPF in about 2-4 ms. Every worker's filter is
the same except for its own pid (the "signal only yourself" rules), so the fork
template compiles the program once with a placeholder pid, remembers where the
placeholder sits, and each worker patches in its pid and loads the result with
``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)``: microseconds.

Where the placeholder sits is found by compiling twice with two different
placeholders and diffing: only the pid comparisons may differ, each a
``BPF_JMP|BPF_JEQ|BPF_K`` whose constant is the placeholder. Anything else
(a libseccomp that lays out the program differently per value) is refused, and
the worker then compiles its own filter as before.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any, Callable

__all__ = ["export", "with_pid_slots", "patch", "load"]

# Above PID_MAX_LIMIT (4,194,304): never a real pid, and not a syscall, ioctl or prctl number.
PLACEHOLDERS = (0x3FFFFF01, 0x3FFFFF02)
_BPF_JEQ_K = 0x15          # BPF_JMP | BPF_JEQ | BPF_K
_INSN = struct.Struct("<HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.restype = ctypes.c_int


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def export(flt: Any) -> bytes:
    """The BPF program of a (pyseccomp) filter, exactly as ``flt.load()`` would install it."""
    r, w = os.pipe()  # a program is a few KiB, well under a pipe's buffer
    try:
        try:
            flt.export_bpf(_Fd(w))
        finally:
            os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    prog = b"".join(chunks)
    if not prog or len(prog) % _INSN.size:
        raise ValueError(f"libseccomp exported {len(prog)} bytes, not a BPF program")
    return prog


def with_pid_slots(build: Callable[[int], bytes]) -> tuple[bytes, tuple[int, ...]]:
    """``(program, slots)``: a program built for a placeholder pid and the instructions holding it."""
    a, b = build(PLACEHOLDERS[0]), build(PLACEHOLDERS[1])
    if len(a) != len(b):
        raise ValueError("the program's layout depends on the pid")
    slots = []
    for i in range(0, len(a), _INSN.size):
        ia, ib = _INSN.unpack_from(a, i), _INSN.unpack_from(b, i)
        if ia == ib:
            if ia[3] in PLACEHOLDERS:
                raise ValueError("a placeholder constant appears outside the pid comparisons")
            continue
        if ia[:3] != ib[:3] or ia[0] != _BPF_JEQ_K or (ia[3], ib[3]) != PLACEHOLDERS:
            raise ValueError(f"instruction {i // _INSN.size} differs in more than the pid")
        slots.append(i // _INSN.size)
    if not slots:
        raise ValueError("no pid comparison found in the program")
    return a, tuple(slots)


def patch(prog: bytes, slots: tuple[int, ...], pid: int) -> bytes:
    """``prog`` with ``pid`` in every pid slot."""
    if not 0 < pid < PLACEHOLDERS[0]:
        raise ValueError(f"pid out of range: {pid}")
    out = bytearray(prog)
    for slot in slots:
        off = slot * _INSN.size
        code, jt, jf, k = _INSN.unpack_from(out, off)
        if code != _BPF_JEQ_K or k != PLACEHOLDERS[0]:
            raise ValueError(f"slot {slot} is not a pid comparison")
        _INSN.pack_into(out, off, code, jt, jf, pid)
    return bytes(out)


def load(prog: bytes) -> None:
    """Install ``prog`` as this thread's seccomp filter (needs no_new_privs or CAP_SYS_ADMIN)."""
    n = len(prog) // _INSN.size
    if n == 0 or n > 4096 or len(prog) % _INSN.size:
        raise ValueError(f"not a loadable BPF program ({len(prog)} bytes)")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(n, ctypes.cast(buf, ctypes.c_void_p))
    r = _libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                    ctypes.c_void_p(ctypes.addressof(fprog)), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_SECCOMP): {os.strerror(e)}")
