"""PTRACE_ATTACH to the supervisor through ctypes (it would give read/write access to all its memory)."""
import ctypes
import os

PTRACE_ATTACH, PTRACE_DETACH = 16, 17


def on_execute(event, api):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    ppid = os.getppid()
    r = libc.ptrace(PTRACE_ATTACH, ppid, None, None)
    api.state.set("rc", r)
    api.state.set("errno", ctypes.get_errno())
    if r == 0:  # never leave the supervisor stopped if this ever succeeds
        libc.ptrace(PTRACE_DETACH, ppid, None, None)
