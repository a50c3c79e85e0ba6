"""Memory (and pids) cgroups for workers, managed by the supervisor.

RLIMIT_AS inside the worker turns most oversized allocations into a catchable
MemoryError; the cgroup is the backstop the worker cannot argue with: it
counts resident memory the kernel charges to the process (page cache and
kernel memory included) and the kernel OOM-kills the worker when it is
exceeded. The supervisor reads the ``oom_kill`` counter afterwards, so a
worker that died of SIGKILL can be told apart as "out of memory".

Layout: every cgroup is created *below the supervisor's own cgroup*, so the
workers stay inside whatever limits the supervisor itself is under:

    <own cgroup>/<root_name>/m<pid>-<n>/<name>        one manager dir per CgroupManager

cgroup v1 (memory + optional pids hierarchies) and v2 (one hierarchy, the
``memory`` and ``pids`` controllers enabled down to our directories) are both
supported. Everything needs root (or a delegated subtree); ``detect()``
returns None when the host does not allow it, and the runner then relies on
RLIMIT_AS alone.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Callable
from dataclasses import dataclass

from ._errors import CgroupError

__all__ = ["Cgroup", "CgroupManager", "CgroupError"]

_serial = itertools.count(1)
_REMOVE_WAIT_S = 2.0  # rmdir answers EBUSY until the kernel finished tearing down the dead tasks


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    # One write() per value: cgroup files act on each write call.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _cgroup_dir(mountpoint: str, mount_root: str, cgroup_path: str) -> str | None:
    rel = os.path.relpath(cgroup_path, mount_root)
    if rel.startswith(".."):
        return None
    return mountpoint if rel == "." else os.path.join(mountpoint, rel)


@dataclass(frozen=True)
class _Bases:
    version: str
    memory: str          # our own cgroup directory in the memory hierarchy (v2: the only one)
    pids: str | None     # v1 only: our own directory in the pids hierarchy, when mounted


def _find_bases() -> _Bases | None:
    try:
        own = [line.rstrip("\n").split(":", 2) for line in _read("/proc/self/cgroup").splitlines()
               if line.count(":") >= 2]
        mounts = [line.split() for line in _read("/proc/self/mountinfo").splitlines()]
    except OSError:
        return None
    v2_path = next((p for h, c, p in own if h == "0" and c == ""), None)
    v1 = {c: p for _, cs, p in own for c in cs.split(",") if c}
    v2_dir = v1_mem = v1_pids = None
    for fields in mounts:
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, root, mnt = fields[sep + 1], _unescape(fields[3]), _unescape(fields[4])
        opts = fields[-1].split(",")
        if fstype == "cgroup2" and v2_path is not None and v2_dir is None:
            d = _cgroup_dir(mnt, root, v2_path)
            try:
                if d and "memory" in _read(os.path.join(d, "cgroup.controllers")).split():
                    v2_dir = d
            except OSError:
                pass
        elif fstype == "cgroup":
            if "memory" in opts and "memory" in v1 and v1_mem is None:
                v1_mem = _cgroup_dir(mnt, root, v1["memory"])
            if "pids" in opts and "pids" in v1 and v1_pids is None:
                v1_pids = _cgroup_dir(mnt, root, v1["pids"])
    if v2_dir is not None and os.access(v2_dir, os.W_OK):
        return _Bases("v2", v2_dir, None)
    if v1_mem is not None and os.access(v1_mem, os.W_OK):
        pids = v1_pids if v1_pids is not None and os.access(v1_pids, os.W_OK) else None
        return _Bases("v1", v1_mem, pids)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmdir_tree(path: str) -> None:
    """rmdir a cgroup directory and its sub-cgroups, deepest first (cgroupfs has no rm -r)."""
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class Cgroup:
    """One worker's cgroup. Reusable for the next worker after :meth:`reset`."""

    def __init__(self, name: str, version: str, memory_dir: str, pids_dir: str | None) -> None:
        self.name = name
        self.version = version
        self.memory_dir = memory_dir
        self.pids_dir = pids_dir  # v1 with a pids hierarchy; v2 keeps pids in memory_dir
        self._oom_base = 0
        self._peak_fd: int | None = None  # v2: memory.peak reset is per open file (Linux 6.12+)
        self.removed = False
        self.on_removed: Callable[["Cgroup"], None] | None = None  # the manager forgets it

    def _gone(self) -> None:
        self.removed = True
        if self.on_removed is not None:
            self.on_removed(self)
            self.on_removed = None

    @property
    def dirs(self) -> list[str]:
        return [d for d in (self.memory_dir, self.pids_dir) if d is not None]

    def _m(self, name: str) -> str:
        return os.path.join(self.memory_dir, name)

    def add(self, pid: int) -> None:
        """Move ``pid`` in. Charges made before the move stay behind, so add before running anything."""
        for d in self.dirs:
            try:
                _write(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as exc:
                raise CgroupError(exc.errno, f"cannot move pid {pid} into {d}: {exc.strerror}") from None

    def procs(self) -> list[int]:
        try:
            return [int(x) for x in _read(self._m("cgroup.procs")).split()]
        except OSError:
            return []

    def _oom_count(self) -> int:
        try:
            if self.version == "v1":
                return _kv(_read(self._m("memory.oom_control"))).get("oom_kill", 0)
            return _kv(_read(self._m("memory.events"))).get("oom_kill", 0)
        except OSError:
            return 0

    def oom_killed(self) -> bool:
        """Did the kernel OOM-kill a process of this cgroup since it was created (or last reset)?"""
        return self._oom_count() > self._oom_base

    def peak_bytes(self) -> int:
        """Highest memory usage since creation (or last reset); 0 when the kernel does not tell."""
        try:
            if self.version == "v1":
                return int(_read(self._m("memory.max_usage_in_bytes")))
            if self._peak_fd is not None:
                return int(os.pread(self._peak_fd, 64, 0).decode())
            return int(_read(self._m("memory.peak")))
        except (OSError, ValueError):
            return 0

    def reset(self) -> None:
        """Forget the peak, failure and OOM counts, to reuse this cgroup for a new worker."""
        self._oom_base = self._oom_count()
        if self.version == "v1":
            for f in ("memory.max_usage_in_bytes", "memory.failcnt",
                      "memory.memsw.max_usage_in_bytes", "memory.memsw.failcnt"):
                try:
                    _write(self._m(f), "0")
                except OSError:
                    pass
            return
        try:  # v2: writing to memory.peak resets it for reads through that same open file
            fd = os.open(self._m("memory.peak"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, b"reset\n")
        except OSError:
            os.close(fd)
            return
        if self._peak_fd is not None:
            os.close(self._peak_fd)
        self._peak_fd = fd

    def try_remove(self) -> bool:
        """One non-blocking attempt: True once every directory is gone, False while the kernel is busy."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        for d in self.dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise CgroupError(exc.errno, f"cannot remove cgroup {d}: {exc.strerror}") from None
        self._gone()
        return True

    def remove(self) -> None:
        """rmdir (after the processes died); retries briefly while the kernel reaps them."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        deadline = time.monotonic() + _REMOVE_WAIT_S
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(exc.errno, f"cannot remove cgroup {d}: {exc.strerror}") from None
                    time.sleep(0.01)
        self._gone()

    def __repr__(self) -> str:
        return f"Cgroup({self.name!r}, {self.version}, {self.memory_dir!r})"


class CgroupManager:
    """Creates and cleans up the per-worker cgroups of one supervisor."""

    def __init__(self, bases: _Bases, root_name: str) -> None:
        self.version = bases.version
        self._bases = bases
        self.root_name = root_name
        tag = f"m{os.getpid()}-{next(_serial)}"
        self._roots = [os.path.join(b, root_name) for b in (bases.memory, bases.pids) if b is not None]
        self._dirs = [os.path.join(r, tag) for r in self._roots]  # [memory(, pids v1)]
        # Only the cgroups not yet removed: a removed one forgets itself, so this is O(live workers)
        # however many workers a long-lived supervisor started.
        self._cgroups: dict[Cgroup, None] = {}
        self._made = False

    @classmethod
    def detect(cls, root_name: str = "actionpool") -> "CgroupManager | None":
        """A manager when this process may create memory cgroups here, else None (never raises)."""
        if not root_name or "/" in root_name or root_name in (".", ".."):
            raise ValueError(f"bad cgroup root name {root_name!r}")
        bases = _find_bases()
        if bases is None:
            return None
        mgr = cls(bases, root_name)
        try:
            mgr._prepare()
        except OSError:
            mgr.cleanup()
            return None
        mgr._sweep_stale()
        return mgr

    def _enable_v2_controllers(self, d: str) -> None:
        available = _read(os.path.join(d, "cgroup.controllers")).split()
        want = [c for c in ("memory", "pids") if c in available]
        have = _read(os.path.join(d, "cgroup.subtree_control")).split()
        missing = [c for c in want if c not in have]
        if missing:
            # EBUSY here means `d` holds processes itself (the "no internal processes" rule):
            # run the supervisor in a delegated cgroup leaf, see docs/security.md.
            _write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in missing))
        if "memory" not in _read(os.path.join(d, "cgroup.subtree_control")).split():
            raise CgroupError(errno.EOPNOTSUPP, f"memory controller not enabled below {d}")

    def _prepare(self) -> None:
        """Create <root_name>/<manager dir> (and enable controllers on v2)."""
        if self.version == "v2":
            self._enable_v2_controllers(self._bases.memory)
        for root, mine in zip(self._roots, self._dirs):
            os.makedirs(root, exist_ok=True)
            if self.version == "v2":
                self._enable_v2_controllers(root)
            os.mkdir(mine)
            if self.version == "v2":
                self._enable_v2_controllers(mine)
        self._made = True

    def _sweep_stale(self) -> None:
        """Remove empty manager dirs left by supervisors that died without cleanup()."""
        for root in self._roots:
            try:
                entries = os.listdir(root)
            except OSError:
                continue
            for entry in entries:
                if not entry.startswith("m") or "-" not in entry:
                    continue
                try:
                    pid = int(entry[1:].split("-", 1)[0])
                except ValueError:
                    continue
                if not _pid_alive(pid):
                    _rmdir_tree(os.path.join(root, entry))  # rmdir fails harmlessly where processes remain

    def create(self, name: str, memory_bytes: int, pids_max: int = 16) -> Cgroup:
        """A new cgroup limited to ``memory_bytes`` of memory (no swap) and ``pids_max`` tasks."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive integer, got {memory_bytes!r}")
        if isinstance(pids_max, bool) or not isinstance(pids_max, int) or pids_max <= 0:
            raise ValueError(f"pids_max must be a positive integer, got {pids_max!r}")
        if not self._made:
            self._prepare()
        mem_dir = os.path.join(self._dirs[0], name)
        pids_dir = os.path.join(self._dirs[1], name) if len(self._dirs) > 1 else None
        try:
            os.mkdir(mem_dir)
        except OSError as exc:
            raise CgroupError(exc.errno, f"cannot create cgroup {mem_dir}: {exc.strerror}") from None
        cg = Cgroup(name, self.version, mem_dir, None)
        self._cgroups[cg] = None
        cg.on_removed = self._forget
        try:
            if pids_dir is not None:
                os.mkdir(pids_dir)
                cg.pids_dir = pids_dir
            if self.version == "v1":
                _write(os.path.join(mem_dir, "memory.limit_in_bytes"), str(memory_bytes))
                memsw = os.path.join(mem_dir, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):  # memory+swap: swapping does not extend the limit
                    _write(memsw, str(memory_bytes))
                if pids_dir is not None:
                    _write(os.path.join(pids_dir, "pids.max"), str(pids_max))
            else:
                _write(os.path.join(mem_dir, "memory.max"), str(memory_bytes))
                for f, v in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if os.path.exists(os.path.join(mem_dir, f)):
                        _write(os.path.join(mem_dir, f), v)
                if os.path.exists(os.path.join(mem_dir, "pids.max")):
                    _write(os.path.join(mem_dir, "pids.max"), str(pids_max))
        except OSError as exc:
            try:
                cg.remove()
            except OSError:
                pass
            self._forget(cg)
            raise CgroupError(exc.errno, f"cannot configure cgroup {mem_dir}: {exc.strerror}") from None
        return cg

    def _forget(self, cg: Cgroup) -> None:
        self._cgroups.pop(cg, None)

    @property
    def cgroups(self) -> list[Cgroup]:
        return list(self._cgroups)

    def cleanup(self) -> None:
        """Remove every cgroup this manager created, its own directory, and <root_name> if empty."""
        errors: list[str] = []
        for cg in list(self._cgroups):
            try:
                cg.remove()
            except OSError as exc:
                errors.append(str(exc))
        for d in self._dirs + self._roots:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if d in self._dirs:  # the shared root may legitimately hold other supervisors' dirs
                    errors.append(f"cannot remove {d}: {exc.strerror}")
        self._made = False
        if errors:
            raise CgroupError(errno.EBUSY, "; ".join(errors))

    def __repr__(self) -> str:
        return f"CgroupManager({self.version}, {self._dirs!r})"
