"""The fork template: a clean interpreter that forks ready-to-sandbox workers on request.

Started once by the supervisor (``runner/_template.py``) as a fresh
``python -I -S``. It imports everything a worker needs, freezes the GC so the
children share those pages copy-on-write, then waits on a Unix seqpacket
socket. Each request carries the two pipe ends of a new worker (SCM_RIGHTS);
the template forks with ``CLONE_PARENT`` so the child is the *supervisor's*
child (the supervisor waits for it, kills its process group, reads its exit
status exactly as for a spawned worker), and answers with the child's pid.

The template never receives configuration, events, secrets or action code:
those reach each child over its own pipe after the fork, and the child
applies the sandbox before any of it runs. Nothing here decides policy.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import signal
import socket
import sys

import msgpack

from . import _channel, _proxy, _event, _js, _runtime, _sandbox  # noqa: F401  (imported to be shared COW)
from .__main__ import main as worker_main

CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "arm64": 220}.get(platform.machine())
_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the clone call
_libc.syscall.restype = ctypes.c_long
_pyapi = ctypes.pythonapi
_PR_SET_PDEATHSIG = 1
_libc.prctl.restype = ctypes.c_int


def die_with_parent(parent: int) -> None:
    """SIGKILL when the supervisor's thread that started us exits; exit now if it already has."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(70)
    if os.getppid() != parent:  # it died before the prctl: the signal will never come
        os._exit(70)


def _fork_sibling() -> int:
    """fork(), except the child's parent is our parent (the supervisor).

    This is what ``os.fork`` does (the CPython before/after-fork hooks keep the
    interpreter consistent), with ``CLONE_PARENT`` added to the clone flags.
    """
    if _SYS_CLONE is None:
        raise OSError(f"clone number unknown on {platform.machine()}")
    _pyapi.PyOS_BeforeFork()
    pid = _libc.syscall(_SYS_CLONE, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def _become_worker(sock: socket.socket, rfd: int, wfd: int, supervisor: int) -> None:
    """In the child: own session, pipes at fds 3 and 4, then the ordinary worker life."""
    try:
        # CLONE_PARENT: our parent is the supervisor (the same thread that started the template).
        # The sandbox sets it again after its last credential change; this covers the time before.
        die_with_parent(supervisor)
        os.setsid()
        high_r = os.dup(rfd) if rfd < 10 else rfd
        high_w = os.dup(wfd) if wfd < 10 else wfd
        sock.close()
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)
        for fd in {rfd, wfd, high_r, high_w} - {3, 4}:
            try:
                os.close(fd)
            except OSError:
                pass
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        gc.unfreeze()
        worker_main(["3", "4"])
    except SystemExit as exc:  # sys.exit() in an action: keep its code, as a spawned worker would
        code = exc.code
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
    finally:
        os._exit(70)


def serve(ctl_fd: int, opts: dict) -> None:  # type: ignore[type-arg]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = os.getppid()
    if opts.get("supervisor") != supervisor:
        os._exit(70)  # the supervisor died while we started
    sock = socket.socket(fileno=ctl_fd)
    sock.setblocking(True)
    prepared = _sandbox.prepare(opts)
    die_with_parent(supervisor)  # after prepare(): entering a user namespace clears the setting
    gc.collect()
    gc.freeze()  # keep the GC from touching (and so copying) the shared pages in every child
    sock.send(msgpack.packb(["ready", os.getpid(), prepared]))
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 256, 2)
        except OSError:
            return
        if not data:
            return  # the supervisor is gone
        try:
            seq = msgpack.unpackb(data)[0]
            if len(fds) != 2 or type(seq) is not int:
                raise ValueError("a fork request carries a sequence number and two descriptors")
            pid = _fork_sibling()
            if pid == 0:
                _become_worker(sock, fds[0], fds[1], supervisor)
            reply = [seq, pid, None]
        except Exception as exc:  # report, keep serving
            reply = [seq if "seq" in locals() else -1, 0, f"{type(exc).__name__}: {exc}"]
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(msgpack.packb(reply))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        serve(int(argv[0]), json.loads(argv[1]))
    finally:
        os._exit(0)
