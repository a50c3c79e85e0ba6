"""A minimal filesystem view: the interpreter, its libraries and the package, nothing else.

Landlock already refuses to *open* anything outside the granted paths, but it does
not govern ``stat``, ``readlink`` or path lookup: an action could still learn that
``/etc/shadow`` exists, its size, owner and mtime, or list host pids by probing
``/proc/<pid>``. The fork template therefore enters, once, a private mount
namespace whose root is an empty read-only tmpfs holding read-only bind mounts of
exactly the needed paths, and pivots into it; every worker it forks shares that
view. There is no ``/proc`` in it at all (stricter than a pid namespace with its own
``/proc``, and free): host pids are not even names.

Needs CAP_SYS_ADMIN (root, or the user namespace the template entered for its
network namespace). Linux only.
"""

from __future__ import annotations

import ctypes
import os
import stat

__all__ = ["enter", "plan"]

_CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
_ST_RELATIME = 4096
_MNT_DETACH = 2
_NR_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {src or fstype} on {target}")


def _kept_flags(path: str) -> int:
    """Flags of the mount holding ``path`` that a read-only remount must keep (locked in a user namespace)."""
    f = os.statvfs(path).f_flag
    out = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    if f & _ST_RELATIME:
        out |= MS_RELATIME
    return out


def plan(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``(binds, symlinks)``: the real paths to bind (none beneath another) and the symlinks on the way."""
    real: list[str] = []
    links: dict[str, str] = {}
    for p in paths:
        if not p or not os.path.isabs(p) or not os.path.exists(p):
            continue
        real.append(os.path.realpath(p))
        # Symlinks among p's components (/lib -> usr/lib, /etc/localtime -> ...): recreated in the view,
        # at the real location of their parent, so a lookup by the usual name still resolves.
        parts = os.path.normpath(p).split("/")[1:]
        for i in range(1, len(parts) + 1):
            q = "/" + "/".join(parts[:i])
            if os.path.islink(q):
                at = os.path.join(os.path.realpath(os.path.dirname(q)), os.path.basename(q))
                links.setdefault(at, os.readlink(q))
    binds: list[str] = []
    for r in sorted(set(real), key=lambda x: (x.count("/"), x)):
        if not any(r == b or r.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(r)
    return binds, sorted(links.items())


def enter(paths: list[str], staging: str) -> list[str]:
    """Unshare a mount namespace and pivot into a view of only ``paths``; returns what was bound.

    ``staging`` is an existing empty directory (the runner's read-only workdir): the new
    root's tmpfs is mounted on it inside the new namespace only, so the host sees nothing.
    The process's working directory is ``/`` afterwards.
    """
    if _NR_PIVOT_ROOT is None:
        raise OSError(f"pivot_root number unknown on {os.uname().machine}")
    binds, links = plan(paths)
    _check(_libc.unshare(ctypes.c_int(_CLONE_NEWNS)), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=256k,nr_inodes=4096")
    for src in binds:
        dst = staging + src
        st = os.stat(src)
        if stat.S_ISDIR(st.st_mode):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "x"):
                pass
        _mount(src, dst, None, MS_BIND | MS_REC)
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _kept_flags(src)
        if stat.S_ISCHR(st.st_mode):  # /dev/null, /dev/urandom: a device node needs dev access
            flags &= ~MS_NODEV
        else:
            flags |= MS_NODEV
        _mount(None, dst, None, flags)
    for at, target in links:
        dst = staging + at
        if os.path.lexists(dst):
            continue
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(target, dst)
        except OSError:
            pass  # inside a read-only bind: the real symlink is already there
    os.chdir(staging)
    # pivot_root(".", "."): the old root ends up stacked under the new one; detach it.
    _check(int(_libc.syscall(ctypes.c_long(_NR_PIVOT_ROOT), b".", b".")), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "umount2(old root)")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.exists("/proc") or os.path.exists(staging):
        raise OSError("the old root is still visible after pivot_root")
    return binds
