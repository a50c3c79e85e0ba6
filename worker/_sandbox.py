"""The OS sandbox a worker applies to itself before any untrusted code runs.

The worker calls :func:`apply` once, single-threaded, after it imported what it
needs and created its asyncio loop. From then on the process can read code and
a few system files, write only to descriptors it already holds (its pipes to
the supervisor), create no process, thread, socket or file, and signal nobody
but itself. Each layer stands on its own so a hole in one is caught by another:

    fds        close every inherited descriptor, 0/1/2 -> /dev/null
    netns      a fresh network namespace: only a downed loopback exists
    utsns      a UTS namespace of its own: uname()/gethostname() say "actionpool", not the host's name
    uid_drop   setgroups/setresgid/setresuid to an unprivileged id (when root)
    caps       no capabilities left (root that cannot drop keeps uid 0 only)
    no_new_privs  PR_SET_NO_NEW_PRIVS: nothing can ever regain privileges
    landlock   read-only access to the interpreter and a few system files
    rlimits    address space, CPU, files, file size 0, no core, no processes
    pdeathsig  SIGKILL when the supervisor dies (set after the last credential change)
    seccomp    a syscall allowlist; sockets, exec, fork, ptrace... get EPERM

A fork template calls :func:`prepare` once: it enters the network and UTS namespaces,
builds the Landlock ruleset and compiles the seccomp program for all its
children, which then only load them (``report["prepared"]`` says which).

Spec keys (all optional): mode ("strict" | "degraded" | "off"), require, keep_fds,
memory_bytes, cpu_seconds, max_open_files, file_size (0), workdir, read_paths,
network_namespace, uts_namespace, fs_view, drop_uid, drop_gid, pdeathsig, parent_pid,
and two knobs for tests and troubleshooting:
landlock_max_abi (use at most this ABI; 0 = behave as on a kernel without Landlock)
and skip (do not apply these of netns/utsns/landlock/seccomp; refused when required).
Unknown keys are an error, so a typo cannot silently weaken the sandbox.

Every name above is a key of the returned report (a bool), so the supervisor
can check ``report[name]`` for each required protection. The policy (which
protections are required, which limits) is the supervisor's: it arrives in
``spec``. This module decides nothing beyond how to apply it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import os
import resource
import signal
import socket
import stat
import sys
from typing import Any, Callable

from . import _bpf, _fsview

try:  # loads libseccomp through ctypes; find_library() spawns ldconfig, so import now, never after apply()
    import pyseccomp as _seccomp
    _SECCOMP_IMPORT_ERROR = ""
except Exception as _exc:  # pragma: no cover - depends on the host
    _seccomp = None  # type: ignore[assignment]
    _SECCOMP_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

__all__ = ["SandboxError", "PROTECTIONS", "apply", "host_capabilities", "loop_fds"]


class SandboxError(Exception):
    """A protection required by the spec could not be applied (strict mode), or the spec is invalid."""


# Order of application, and the names `require` may use.
PROTECTIONS = ("fds", "netns", "utsns", "fs_view", "uid_drop", "caps", "no_new_privs", "landlock", "rlimits",
               "pdeathsig", "seccomp")
_DEFAULT_REQUIRE = ("fds", "no_new_privs", "rlimits", "landlock", "seccomp")
_SPEC_KEYS = frozenset({
    "mode", "require", "keep_fds", "memory_bytes", "cpu_seconds", "max_open_files", "file_size",
    "workdir", "read_paths", "network_namespace", "uts_namespace", "drop_uid", "drop_gid", "landlock_max_abi", "skip",
    "scan_loops", "fs_view", "pdeathsig", "parent_pid",
})
_SKIPPABLE = ("netns", "utsns", "landlock", "seccomp")
_NPROC = 1  # RLIMIT_NPROC: counts every process of the real uid, so 1 means "create none"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.unshare.restype = ctypes.c_int

_applied = False

# --------------------------------------------------------------------------------------------
# Landlock UAPI (include/uapi/linux/landlock.h). The syscall numbers come from the generic
# table and are the same on x86_64 and aarch64.
_NR_LANDLOCK_CREATE_RULESET = 444
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_MAX_KNOWN_ABI = 7

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ABI1 = (1 << 13) - 1          # EXECUTE .. MAKE_SYM
_FS_REFER = 1 << 13               # ABI 2
_FS_TRUNCATE = 1 << 14            # ABI 3
_FS_IOCTL_DEV = 1 << 15           # ABI 5
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP = 1 << 0            # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_READ_DIR_RIGHTS = _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE
_READ_FILE_RIGHTS = _FS_READ_FILE | _FS_EXECUTE
_SYSTEM_READ_PATHS = (
    "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/share/zoneinfo",
    "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom",
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),   # ABI 4
                ("scoped", ctypes.c_uint64)]               # ABI 6


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_kernel_abi() -> int:
    abi = _libc.syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def _handled_fs(abi: int) -> int:
    fs = _FS_ABI1
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    if abi >= 5:
        fs |= _FS_IOCTL_DEV
    return fs


# --------------------------------------------------------------------------------------------
# Capabilities and prctl
_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3
_PR_SET_NAME, _PR_GET_NAME = 15, 16
_PR_GET_SECCOMP = 21
_PR_CAPBSET_READ, _PR_CAPBSET_DROP = 23, 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_PR_SET_VMA = 0x53564D41
# SECBIT_NOROOT(+LOCKED) | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE(+LOCKED)
_SECUREBITS_NO_ROOT = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)
_CAP_VERSION_3 = 0x20080522
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUTS = 0x04000000
# What uname().nodename / gethostname() and the NIS domain name say inside a worker's UTS namespace
# (the kernel's own default domain name). The kernel release and version are not namespaced.
UTS_HOSTNAME = "actionpool"
UTS_DOMAINNAME = "(none)"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    r = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")
    return int(r)


def _capget() -> tuple[int, int, int]:
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capget: {os.strerror(e)}")
    eff = data[0].effective | (data[1].effective << 32)
    prm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, prm, inh


def _capset_zero() -> None:
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def _drop_bounding_set() -> None:
    """Needs CAP_SETPCAP, i.e. call it while still privileged."""
    for cap in range(_cap_last() + 1):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: the kernel does not know this cap
                raise


# --------------------------------------------------------------------------------------------
# seccomp policy (names resolved by libseccomp for the native architecture; names a given
# architecture lacks, e.g. "open" or "epoll_wait" on aarch64, are skipped)
#
# Default action: EPERM, so a syscall nobody thought of is refused. Only clone3 answers
# ENOSYS: glibc then falls back to clone(), which is refused with EPERM (no thread, no process).
_ALLOW = (
    # descriptors the process already holds, and read-only file access (Landlock decides what opens)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "close", "close_range", "dup", "dup2", "dup3",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents", "getdents64",
    "getcwd", "chdir", "fchdir", "umask",
    # memory (MemoryError under RLIMIT_AS comes from mmap/brk failing with ENOMEM)
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    # identity and resource *queries* about itself
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "getpgrp", "getpgid", "getsid", "getrlimit", "getrusage", "times", "sysinfo", "uname",
    "getrandom", "getcpu", "sched_getaffinity", "sched_yield", "sched_getparam", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "getpriority",
    # its own signal handling
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "sigaltstack", "restart_syscall", "alarm", "setitimer", "getitimer", "pause",
    "futex", "exit", "exit_group",
    # the asyncio loop (epoll + its self-pipe socketpair) and the pipes to the supervisor
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2",
    "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername",
)
# Documented for readers and checked by the tests: none of these may ever be allowed.
DENIED = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "clone", "clone3", "ptrace", "process_vm_readv", "process_vm_writev",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount", "fsconfig",
    "move_mount", "open_tree", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "personality", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setfsuid", "setfsgid", "setgroups", "capset", "setrlimit", "setpriority",
    "sched_setaffinity", "sched_setscheduler", "sched_setparam", "ioprio_set", "name_to_handle_at",
    "open_by_handle_at", "memfd_create", "mknod", "mknodat", "mkdir", "mkdirat", "rmdir", "unlink",
    "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod",
    "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "truncate", "ftruncate", "utimensat",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp",
    "set_mempolicy", "mbind", "migrate_pages", "move_pages", "process_madvise", "process_mrelease",
    "kcmp", "modify_ldt", "iopl", "ioperm", "acct", "quotactl", "syslog", "vhangup", "pipe", "pipe2",
    "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create", "inotify_init", "inotify_init1",
    "fanotify_init", "wait4", "waitid", "get_robust_list", "lookup_dcookie", "nfsservctl",
    "creat", "openat2",  # openat2 hides its flags in a struct the filter cannot read
)
_ENOSYS = ("clone3",)

_MASK32 = 0xFFFFFFFF  # pid_t / int / unsigned int arguments: the kernel looks at the low 32 bits only
# ioctl: terminal probes done by io.open()/isatty(), non-blocking and close-on-exec toggles
_IOCTL_ALLOW = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)  # TCGETS TIOCGWINSZ FIONREAD FIONBIO FIONCLEX FIOCLEX
# fcntl: no F_SETOWN/F_SETSIG (SIGIO to another process), no leases, no notify
_FCNTL_ALLOW = (0, 1, 2, 3, 4, 1030, 1032, 1034)  # DUPFD GETFD SETFD GETFL SETFL DUPFD_CLOEXEC GETPIPE_SZ GET_SEALS
# open/openat: read-only opens only (O_WRONLY|O_RDWR|O_CREAT|O_TRUNC, same values on x86_64 and aarch64)
_OPEN_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000
_PRCTL_ALLOW = (_PR_GET_DUMPABLE, _PR_SET_NAME, _PR_GET_NAME, _PR_GET_SECCOMP, _PR_CAPBSET_READ,
                _PR_GET_NO_NEW_PRIVS, _PR_SET_VMA)


def _build_seccomp(pid: int) -> tuple[Any, list[str]]:
    """The filter object (not loaded yet) and the names this architecture lacks."""
    sc = _seccomp
    assert sc is not None
    flt = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # i386/x32 entry points: no way around the table
    skipped: list[str] = []

    def nr(name: str) -> int | None:
        n = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
        if n < 0:
            skipped.append(name)
            return None
        return n

    def rule(action: int, name: str, *args: Any) -> None:
        n = nr(name)
        if n is not None:
            flt.add_rule(action, n, *args)

    def masked(i: int, value: int) -> Any:
        return sc.Arg(i, sc.MASKED_EQ, _MASK32, value & _MASK32)

    for name in _ALLOW:
        rule(sc.ALLOW, name)
    for name in _ENOSYS:
        rule(sc.ERRNO(errno.ENOSYS), name)
    # signals: only to itself (pid compared with the pid at filter time)
    rule(sc.ALLOW, "kill", masked(0, pid))
    rule(sc.ALLOW, "tkill", masked(0, pid))
    rule(sc.ALLOW, "tgkill", masked(0, pid), masked(1, pid))
    rule(sc.ALLOW, "rt_sigqueueinfo", masked(0, pid))
    rule(sc.ALLOW, "rt_tgsigqueueinfo", masked(0, pid), masked(1, pid))
    # getrlimit() is prlimit64(0, res, NULL, &old) in glibc: reading yes, setting never
    rule(sc.ALLOW, "prlimit64", masked(0, 0), sc.Arg(2, sc.EQ, 0))
    rule(sc.ALLOW, "prlimit64", masked(0, pid), sc.Arg(2, sc.EQ, 0))
    # no write-mode open at all: Landlock forbids writes too, this is the second wall
    rule(sc.ALLOW, "open", sc.Arg(1, sc.MASKED_EQ, _OPEN_WRITE_FLAGS, 0))
    rule(sc.ALLOW, "openat", sc.Arg(2, sc.MASKED_EQ, _OPEN_WRITE_FLAGS, 0))
    for cmd in _IOCTL_ALLOW:
        rule(sc.ALLOW, "ioctl", masked(1, cmd))
    for cmd in _FCNTL_ALLOW:
        rule(sc.ALLOW, "fcntl", masked(1, cmd))
    for opt in _PRCTL_ALLOW:
        rule(sc.ALLOW, "prctl", masked(0, opt))
    return flt, skipped


def _seccomp_kernel_ok() -> bool:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            acts = f.read().split()
        return "errno" in acts and "allow" in acts
    except OSError:
        try:
            _prctl(_PR_GET_SECCOMP)
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# host probes (side-effect free, for `actionpool doctor`)

def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def _userns_possible() -> bool:
    if _read_int("/proc/sys/user/max_user_namespaces", 1) <= 0:
        return False
    if os.geteuid() == 0:
        return True
    if _read_int("/proc/sys/kernel/unprivileged_userns_clone", 1) == 0:  # Debian knob
        return False
    return _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", 0) != 1  # Ubuntu knob


def _netns_possible() -> bool:
    if not os.path.exists("/proc/self/ns/net") or _read_int("/proc/sys/user/max_net_namespaces", 1) <= 0:
        return False
    return os.geteuid() == 0 or _userns_possible()


def _utsns_possible() -> bool:
    return os.path.exists("/proc/self/ns/uts") and (os.geteuid() == 0 or _userns_possible())


def _unescape_mount(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _cgroup_dir(mountpoint: str, mount_root: str, cgroup_path: str) -> str | None:
    """Directory of ``cgroup_path`` (as in /proc/self/cgroup) inside a mount of that hierarchy."""
    rel = os.path.relpath(cgroup_path, mount_root)
    if rel.startswith(".."):
        return None  # our cgroup is outside what this mount shows
    return mountpoint if rel == "." else os.path.join(mountpoint, rel)


def _cgroup_kind() -> str | None:
    """'v2' or 'v1' when our own memory cgroup is writable (same rule as runner/_cgroup.py)."""
    try:
        with open("/proc/self/cgroup") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    v2_path = next((p for h, c, p in own if h == "0" and c == ""), None)
    v1_path = next((p for h, c, p in own if "memory" in c.split(",")), None)
    found: dict[str, bool] = {}
    for fields in mounts:
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, root, mnt = fields[sep + 1], _unescape_mount(fields[3]), _unescape_mount(fields[4])
        if fstype == "cgroup2" and v2_path is not None:
            d = _cgroup_dir(mnt, root, v2_path)
            try:
                with open(os.path.join(d or "/nonexistent", "cgroup.controllers")) as f:
                    if "memory" in f.read().split() and os.access(d or "/", os.W_OK):
                        found["v2"] = True
            except OSError:
                pass
        elif fstype == "cgroup" and "memory" in fields[-1].split(",") and v1_path is not None:
            d = _cgroup_dir(mnt, root, v1_path)
            if d is not None and os.access(d, os.W_OK):
                found["v1"] = True
    return "v2" if "v2" in found else "v1" if "v1" in found else None


def host_capabilities() -> dict[str, Any]:
    """Which protections this host could give a worker (cheap, no side effects)."""
    return {
        "seccomp": _seccomp is not None and _seccomp_kernel_ok(),
        "landlock_abi": _landlock_kernel_abi(),
        "user_namespaces": _userns_possible(),
        "net_namespaces": _netns_possible(),
        "uts_namespaces": _utsns_possible(),
        "root": os.geteuid() == 0,
        "cgroup": _cgroup_kind(),
    }


# --------------------------------------------------------------------------------------------
# helpers of apply()

def loop_fds(loop: Any) -> list[int]:
    """Descriptors an asyncio selector loop owns (epoll fd, self-pipe socketpair, registered fds)."""
    fds: set[int] = set()
    selector = getattr(loop, "_selector", None)
    if selector is not None:
        try:
            fds.add(selector.fileno())
            fds.update(key.fd for key in selector.get_map().values())
        except (AttributeError, RuntimeError, ValueError):
            pass
    for name in ("_ssock", "_csock"):
        sock = getattr(loop, name, None)
        if sock is not None:
            try:
                fds.add(sock.fileno())
            except (OSError, ValueError):
                pass
    return sorted(fd for fd in fds if fd >= 0)


def _live_loop_fds() -> list[int]:
    """fds of every open event loop in this process: the caller may not know it must keep them."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return []
    fds: list[int] = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and not obj.is_closed():
            fds.extend(loop_fds(obj))
    return fds


def _close_fds(keep: set[int]) -> None:
    """Close every fd >= 3 not in ``keep`` (close_range: one syscall per gap), 0/1/2 not kept -> /dev/null."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(max(soft, hard, 1024), 1 << 20)  # bounds the loop of a libc without close_range
    lo = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)
    os.closerange(lo, top)
    if not {0, 1, 2} <= keep:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            if fd not in keep:
                os.dup2(null, fd, inheritable=False)
        if null > 2:
            os.close(null)
    try:
        leftover = [int(x) for x in os.listdir("/proc/self/fd") if int(x) >= 3]
    except OSError:  # no /proc (the minimal filesystem view): close_range is all-or-nothing anyway
        return
    # the listdir fd itself is already closed when the list comes back; fstat tells what is really open
    still_open = []
    for fd in leftover:
        if fd in keep:
            continue
        try:
            os.fstat(fd)
            still_open.append(fd)
        except OSError:
            pass
    if still_open:
        raise OSError(errno.EBADF, f"descriptors still open: {still_open}")


def _reachable_as(path: str, uid: int, gid: int) -> bool:
    """Could uid/gid (no supplementary groups) open ``path`` for reading? Mode bits only (no ACLs)."""
    try:
        real = os.path.realpath(path)
        parts = real.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i]) or "/"
            st = os.stat(p)
            last = i == len(parts)
            need = (4 | (1 if stat.S_ISDIR(st.st_mode) else 0)) if last else 1
            if st.st_uid == uid:
                bits = (st.st_mode >> 6) & 7
            elif st.st_gid == gid:
                bits = (st.st_mode >> 3) & 7
            else:
                bits = st.st_mode & 7
            if bits & need != need:
                return False
        return True
    except OSError:
        return False


def _code_paths() -> list[str]:
    """Where the interpreter may still import from: prefixes, sys.path, imported packages."""
    paths: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.append(p)
    for p in sys.path:
        if p and os.path.isabs(p):  # "" or a relative entry would mean the current directory: never granted
            paths.append(p)
    for mod in list(sys.modules.values()):
        for p in getattr(mod, "__path__", None) or ():
            if isinstance(p, str):
                paths.append(p)
    out: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if not isinstance(p, str) or not p:
            continue
        rp = os.path.realpath(p)
        if rp not in seen and os.path.exists(rp):
            seen.add(rp)
            out.append(rp)
    return out


_CODE_PATHS: list[str] = []
# What the fork template did once for all its children (see prepare()); empty in a spawned worker.
_PREPARED: dict[str, Any] = {}
_PREPARE_ERRORS: dict[str, str] = {}
_PREPARED_FD_MIN = 100


def prepare(opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Do once, in the fork template, what is the same for every worker it forks.

    Children inherit the result: the network namespace the template entered (one
    namespace for all, instead of one unshare per worker under a global kernel lock),
    a Landlock ruleset fd for the default read paths, and the compiled seccomp
    program with its pid slots. ``apply`` in a child uses each piece when the child's
    spec asks for exactly that, and reports which ones in ``report["prepared"]``.
    Nothing here is a secret or per-tenant: the same for every worker of a runner.
    Returns what was prepared and what failed (for the template's log).
    """
    global _CODE_PATHS
    opts = opts or {}
    out: dict[str, Any] = {"errors": []}
    _CODE_PATHS = _code_paths()
    if opts.get("mode", "degraded") == "off":
        return out
    if opts.get("network_namespace", True):
        try:
            before = os.stat("/proc/self/ns/net").st_ino
            _unshare_net()
            _PREPARED["netns"] = (before, os.stat("/proc/self/ns/net").st_ino)
        except Exception as exc:
            out["errors"].append(f"netns: {type(exc).__name__}: {exc}")
    if opts.get("uts_namespace", True):
        try:  # after the network namespace: its user namespace (unprivileged supervisor) also owns this one
            before = os.stat("/proc/self/ns/uts").st_ino
            _unshare_uts()
            _PREPARED["utsns"] = (before, os.stat("/proc/self/ns/uts").st_ino)
        except Exception as exc:
            out["errors"].append(f"utsns: {type(exc).__name__}: {exc}")
    if opts.get("fs_view") and opts.get("fs_root"):
        try:
            _PREPARED["fs_view"] = _fsview.enter(_CODE_PATHS + list(_SYSTEM_READ_PATHS), str(opts["fs_root"]))
        except Exception as exc:
            _PREPARE_ERRORS["fs_view"] = f"{type(exc).__name__}: {exc}"
            out["errors"].append(f"fs_view: {_PREPARE_ERRORS['fs_view']}")
    abi = min(_landlock_kernel_abi(), _LANDLOCK_MAX_KNOWN_ABI)
    if abi >= 1:
        try:
            paths = list(dict.fromkeys(_CODE_PATHS + list(_SYSTEM_READ_PATHS)))
            fd, granted, problems = _create_landlock_ruleset(abi, paths)
            # far above the numbers a child dup2()s its pipes to (3 and 4)
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _PREPARED_FD_MIN)
            os.close(fd)
            _PREPARED["landlock"] = (high, abi, granted, problems)
        except Exception as exc:
            out["errors"].append(f"landlock: {type(exc).__name__}: {exc}")
    if _seccomp is not None and _seccomp_kernel_ok():
        try:
            skipped: list[str] = []

            def build(pid: int) -> bytes:
                flt, sk = _build_seccomp(pid)
                skipped[:] = sk
                return _bpf.export(flt)

            prog, slots = _bpf.with_pid_slots(build)
            _PREPARED["seccomp"] = (prog, slots, list(skipped))
        except Exception as exc:
            out["errors"].append(f"seccomp: {type(exc).__name__}: {exc}")
    uid, gid = opts.get("drop_uid"), opts.get("drop_gid")
    if os.geteuid() == 0 and isinstance(uid, int):
        gid = gid if isinstance(gid, int) else uid
        _PREPARED["unreachable"] = ((uid, gid), [p for p in _stdlib_paths() if not _reachable_as(p, uid, gid)])
    out["prepared"] = sorted(_PREPARED)
    return out


def _stdlib_paths() -> list[str]:
    """What a dropped uid must be able to read for lazy imports to keep working."""
    out = [os.path.dirname(os.__file__)]
    out += [p for p in sys.path if p and os.path.isdir(p)]
    return out


def _create_landlock_ruleset(abi: int, read_paths: list[str]) -> tuple[int, list[str], list[str]]:
    """Ruleset fd with one read-only rule per existing path. Returns (fd, granted, rule_errors)."""
    attr = _RulesetAttr()
    attr.handled_access_fs = _handled_fs(abi)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP  # no rule added: no TCP bind/connect
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    fd = int(_libc.syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                           ctypes.c_size_t(size), ctypes.c_uint32(0)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"landlock_create_ruleset: {os.strerror(e)}")
    granted: list[str] = []
    problems: list[str] = []
    handled = attr.handled_access_fs
    for path in read_paths:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # paths that do not exist on this host are simply not granted
        try:
            is_dir = stat.S_ISDIR(os.fstat(pfd).st_mode)
            rule = _PathBeneathAttr()
            rule.allowed_access = (_READ_DIR_RIGHTS if is_dir else _READ_FILE_RIGHTS) & handled
            rule.parent_fd = pfd
            r = _libc.syscall(ctypes.c_long(_NR_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                              ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
            if r != 0:
                e = ctypes.get_errno()
                problems.append(f"{path}: {os.strerror(e)}")
            else:
                granted.append(path)
        finally:
            os.close(pfd)
    return fd, granted, problems


def _landlock_restrict(ruleset_fd: int) -> None:
    try:
        r = _libc.syscall(ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
        if r != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_restrict_self: {os.strerror(e)}")
    finally:
        os.close(ruleset_fd)
    # proof, not trust: "/" is outside every rule, so listing it must now fail
    try:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return
    os.close(fd)
    raise OSError(errno.EPERM, "landlock_restrict_self returned 0 but / is still readable")


def _unshare_net() -> None:
    before = os.stat("/proc/self/ns/net").st_ino
    _unshare_owned(_CLONE_NEWNET, privileged=os.geteuid() == 0)
    if os.stat("/proc/self/ns/net").st_ino == before:
        raise OSError(errno.EPERM, "network namespace unchanged after unshare")


def _unshare_owned(flags: int, privileged: bool) -> None:
    """unshare(flags), inside a new user namespace (owning the new ones) unless ``privileged``."""
    uid, gid = os.getuid(), os.getgid()
    if not privileged:
        flags |= _CLONE_NEWUSER
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare: {os.strerror(e)}")
    if flags & _CLONE_NEWUSER:
        for path, data in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(data)


def _unshare_uts() -> None:
    """A UTS namespace of its own with a neutral host and domain name: uname() tells the action nothing of the host.

    Privileged enough when root, or when the network namespace's user namespace (whose every
    capability this process still holds) came first; otherwise a user namespace of its own owns it.
    """
    before = os.stat("/proc/self/ns/uts").st_ino
    if _libc.unshare(ctypes.c_int(_CLONE_NEWUTS)) != 0:
        e = ctypes.get_errno()
        if e != errno.EPERM or os.geteuid() == 0:
            raise OSError(e, f"unshare: {os.strerror(e)}")
        _unshare_owned(_CLONE_NEWUTS, privileged=False)
    if os.stat("/proc/self/ns/uts").st_ino == before:
        raise OSError(errno.EPERM, "UTS namespace unchanged after unshare")
    socket.sethostname(UTS_HOSTNAME)
    name = UTS_DOMAINNAME.encode()
    if _libc.setdomainname(name, ctypes.c_size_t(len(name))) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setdomainname: {os.strerror(e)}")
    if os.uname().nodename != UTS_HOSTNAME or socket.gethostname() != UTS_HOSTNAME:
        raise OSError(errno.EPERM, f"host name is {os.uname().nodename!r} after sethostname")


def _set_rlimits(limits: dict[int, tuple[int, int]]) -> None:
    for res, (soft, hard) in limits.items():
        resource.setrlimit(res, (soft, hard))
    for res, want in limits.items():
        if resource.getrlimit(res) != want:
            raise OSError(errno.EPERM, f"rlimit {res} is {resource.getrlimit(res)}, wanted {want}")


# --------------------------------------------------------------------------------------------
# spec

def _opt_int(spec: dict[str, Any], key: str, default: int | None, minimum: int = 0) -> int | None:
    v = spec.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SandboxError(f"sandbox spec: {key} must be an integer >= {minimum} or null, got {v!r}")
    return v


def _parse(spec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SandboxError(f"sandbox spec must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SandboxError(f"sandbox spec: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    mode = spec.get("mode", "strict")
    if mode not in ("strict", "degraded", "off"):
        raise SandboxError(f"sandbox spec: mode must be strict, degraded or off, got {mode!r}")
    require = spec.get("require", list(_DEFAULT_REQUIRE))
    if not isinstance(require, (list, tuple)) or not all(isinstance(r, str) for r in require):
        raise SandboxError("sandbox spec: require must be a list of protection names")
    bad = [r for r in require if r not in PROTECTIONS]
    if bad:
        raise SandboxError(f"sandbox spec: unknown protection(s) in require: {', '.join(bad)} "
                           f"(known: {', '.join(PROTECTIONS)})")
    keep = spec.get("keep_fds", [])
    if not isinstance(keep, (list, tuple)) or not all(type(fd) is int and fd >= 0 for fd in keep):
        raise SandboxError("sandbox spec: keep_fds must be a list of non-negative integers")
    read_paths = spec.get("read_paths", [])
    if not isinstance(read_paths, (list, tuple)) or not all(isinstance(p, str) and p for p in read_paths):
        raise SandboxError("sandbox spec: read_paths must be a list of non-empty strings")
    workdir = spec.get("workdir")
    if workdir is not None and not isinstance(workdir, str):
        raise SandboxError("sandbox spec: workdir must be a string or null")
    skip = spec.get("skip", [])
    if not isinstance(skip, (list, tuple)) or not all(x in _SKIPPABLE for x in skip):
        raise SandboxError(f"sandbox spec: skip may only list {', '.join(_SKIPPABLE)}, got {skip!r}")
    netns = spec.get("network_namespace", False)
    if not isinstance(netns, bool):
        raise SandboxError("sandbox spec: network_namespace must be a bool")
    utsns = spec.get("uts_namespace", False)
    if not isinstance(utsns, bool):
        raise SandboxError("sandbox spec: uts_namespace must be a bool")
    fs_view = spec.get("fs_view", False)
    if not isinstance(fs_view, bool):
        raise SandboxError("sandbox spec: fs_view must be a bool")
    pdeathsig = spec.get("pdeathsig", 0)
    if type(pdeathsig) is not int or not 0 <= pdeathsig < signal.NSIG:
        raise SandboxError(f"sandbox spec: pdeathsig must be a signal number or 0, got {pdeathsig!r}")
    return {
        "mode": mode,
        "require": list(require) if mode == "strict" else [],
        "keep_fds": set(keep),
        "memory_bytes": _opt_int(spec, "memory_bytes", None, 1 << 20),
        "cpu_seconds": _opt_int(spec, "cpu_seconds", None, 1),
        "max_open_files": _opt_int(spec, "max_open_files", None, 4),
        "file_size": _opt_int(spec, "file_size", 0),
        "workdir": workdir,
        "read_paths": list(read_paths),
        "network_namespace": netns,
        "uts_namespace": utsns,
        "drop_uid": _opt_int(spec, "drop_uid", None),
        "drop_gid": _opt_int(spec, "drop_gid", None),
        # Testing/pinning knob: use at most this Landlock ABI; 0 behaves like a kernel without Landlock.
        "landlock_max_abi": _opt_int(spec, "landlock_max_abi", None),
        # Debugging/testing knob: do not apply these layers (reported in errors; refused if required).
        "skip": set(skip),
        "scan_loops": bool(spec.get("scan_loops", True)),
        "fs_view": fs_view,
        "pdeathsig": pdeathsig,
        "parent_pid": _opt_int(spec, "parent_pid", None, 1),
    }


def _rlimit_table(s: dict[str, Any]) -> dict[int, tuple[int, int]]:
    lim: dict[int, tuple[int, int]] = {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_FSIZE: (s["file_size"], s["file_size"]),
        resource.RLIMIT_NPROC: (_NPROC, _NPROC),
    }
    if s["memory_bytes"] is not None:
        lim[resource.RLIMIT_AS] = (s["memory_bytes"], s["memory_bytes"])
    if s["cpu_seconds"] is not None:  # SIGXCPU at the soft limit, SIGKILL one second later
        lim[resource.RLIMIT_CPU] = (s["cpu_seconds"], s["cpu_seconds"] + 1)
    if s["max_open_files"] is not None:
        lim[resource.RLIMIT_NOFILE] = (s["max_open_files"], s["max_open_files"])
    return lim


# --------------------------------------------------------------------------------------------

def apply(spec: dict) -> dict:  # type: ignore[type-arg]
    """Sandbox the calling (single-threaded) process; returns a report of plain JSON values.

    In "degraded" mode a protection that fails is recorded in ``errors`` and skipped; in
    "strict" mode a failure of a protection listed in ``require`` raises :class:`SandboxError`
    (the process is then partly sandboxed and must exit). "off" applies fd hygiene and rlimits.
    """
    global _applied
    s = _parse(spec)
    if _applied:
        raise SandboxError("the sandbox is already applied in this process")
    mode, require = s["mode"], s["require"]
    strict = mode == "strict"
    kernel_abi = _landlock_kernel_abi()
    abi = min(kernel_abi, _LANDLOCK_MAX_KNOWN_ABI)
    if s["landlock_max_abi"] is not None:
        abi = min(abi, s["landlock_max_abi"])
    report: dict[str, Any] = {name: False for name in PROTECTIONS}
    report.update({
        "mode": mode, "fds_closed": False, "landlock_abi": 0, "landlock_kernel_abi": kernel_abi,
        "uid": os.geteuid(), "gid": os.getegid(), "kept_fds": [], "read_paths": [], "rlimits_set": {},
        "seccomp_skipped": [], "errors": [], "warnings": [], "prepared": [],
    })

    def fail(name: str, msg: str) -> None:
        report["errors"].append(f"{name}: {msg}")
        if strict and name in require:
            raise SandboxError(f"required protection {name!r} unavailable: {msg}")

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            out = fn()
        except SandboxError:
            raise
        except Exception as exc:
            fail(name, f"{type(exc).__name__}: {exc}")
            return None
        report[name] = True
        return out

    # -- preflight: in strict mode refuse before touching anything when a requirement cannot hold
    is_root = os.geteuid() == 0
    drop_ok = True
    if is_root and s["drop_uid"] is not None:
        gid = s["drop_gid"] if s["drop_gid"] is not None else s["drop_uid"]
        cached = _PREPARED.get("unreachable")
        if cached is not None and cached[0] == (s["drop_uid"], gid):
            blocked = cached[1]
        else:
            blocked = [p for p in _stdlib_paths() if not _reachable_as(p, s["drop_uid"], gid)]
        if blocked:
            drop_ok = False
            drop_why = (f"uid {s['drop_uid']} could not read the interpreter's files ({blocked[0]}); "
                        "install Python where that uid can read it. Staying uid 0 without capabilities")
    for name in sorted(s["skip"]):
        if name in require:
            raise SandboxError(f"required protection {name!r} unavailable: skipped by spec")
    if strict:
        checks = {
            "netns": (s["network_namespace"], "spec.network_namespace is false"),
            "seccomp": (_seccomp is not None and _seccomp_kernel_ok(),
                        f"seccomp filters unavailable ({_SECCOMP_IMPORT_ERROR or 'kernel'})"),
            "landlock": (abi >= 1, f"Landlock ABI {abi} (kernel {kernel_abi}, spec cap {s['landlock_max_abi']})"),
            "uid_drop": (not is_root or (s["drop_uid"] is not None and drop_ok),
                         "running as root and " + ("spec.drop_uid is null" if s["drop_uid"] is None
                                                   else "the drop would break the interpreter")),
        }
        checks["fs_view"] = (s["fs_view"] and "fs_view" in _PREPARED,
                             "spec.fs_view is false" if not s["fs_view"] else _fs_view_unavailable())
        checks["pdeathsig"] = (s["pdeathsig"] != 0, "spec.pdeathsig is 0")
        if s["network_namespace"]:
            checks["netns"] = ("netns" in _PREPARED or _netns_possible(), "this host cannot create a network namespace")
        checks["utsns"] = (s["uts_namespace"] and ("utsns" in _PREPARED or _utsns_possible()),
                           "spec.uts_namespace is false" if not s["uts_namespace"]
                           else "this host cannot create a UTS namespace")
        for name in require:
            ok, why = checks.get(name, (True, ""))
            if not ok:
                raise SandboxError(f"required protection {name!r} unavailable: {why}")

    _applied = True
    sandboxing = mode != "off"

    # 1. descriptors: only what the caller keeps (plus its event loops), 0/1/2 on /dev/null
    # The gc scan for event loops costs milliseconds; a caller that passes loop_fds() itself skips it.
    keep = set(s["keep_fds"]) | (set(_live_loop_fds()) if s["scan_loops"] else set())
    # The template's Landlock ruleset, when this child can use it as is (no extra paths, no ABI cap).
    shared_ruleset = _PREPARED.get("landlock") if sandboxing_mode(mode) else None
    if shared_ruleset is not None and (s["read_paths"] or "landlock" in s["skip"]
                                       or (s["landlock_max_abi"] is not None and s["landlock_max_abi"] < shared_ruleset[1])):
        shared_ruleset = None
    if shared_ruleset is not None:
        keep.add(shared_ruleset[0])
    report["kept_fds"] = sorted(keep)
    step("fds", lambda: _close_fds(keep))
    report["fds_closed"] = report["fds"]
    # before chdir: "" on sys.path means the start directory
    code_paths = (_CODE_PATHS or _code_paths()) if sandboxing else []
    if sandboxing and "fs_view" in _PREPARED:
        # the template pivoted into the minimal view: the host workdir is not in it, "/" is read-only and empty
        report["fs_view"] = True
        report["prepared"].append("fs_view")
        s["workdir"] = "/"
    elif sandboxing and s["fs_view"]:
        fail("fs_view", _fs_view_unavailable())
    if s["workdir"] is not None:
        try:
            os.chdir(s["workdir"])
        except OSError as exc:
            raise SandboxError(f"cannot chdir to workdir {s['workdir']!r}: {exc}") from None

    ruleset_fd = -1
    flt = None
    if sandboxing:
        # 2. prepared while privileged: the Landlock ruleset (opening paths as root) and the filter
        if "landlock" in s["skip"]:
            fail("landlock", "skipped by spec")
        elif shared_ruleset is not None:
            ruleset_fd, abi, granted, problems = shared_ruleset
            report["read_paths"] = list(granted)
            report["warnings"] += [f"landlock rule {p}" for p in problems]
            report["prepared"].append("landlock")
        elif abi >= 1:
            paths = code_paths + list(_SYSTEM_READ_PATHS) + [os.path.realpath(p) for p in s["read_paths"]]
            built = step("landlock", lambda: _create_landlock_ruleset(abi, list(dict.fromkeys(paths))))
            report["landlock"] = False  # true only once restrict_self succeeded
            if built is not None:
                ruleset_fd, report["read_paths"], problems = built
                report["warnings"] += [f"landlock rule {p}" for p in problems]
        else:
            fail("landlock", f"not available (ABI {abi}, kernel ABI {kernel_abi})")
        if "seccomp" in s["skip"]:
            fail("seccomp", "skipped by spec")
        elif _seccomp is None:
            fail("seccomp", f"pyseccomp/libseccomp unavailable: {_SECCOMP_IMPORT_ERROR}")
        elif not _seccomp_kernel_ok():
            fail("seccomp", "the kernel offers no seccomp filters")
        elif "seccomp" in _PREPARED:
            prog, slots, skipped = _PREPARED["seccomp"]
            flt = step("seccomp", lambda: _bpf.patch(prog, slots, os.getpid()))
            report["seccomp"] = False
            report["seccomp_skipped"] = list(skipped)
            report["prepared"].append("seccomp")
        else:
            def compile_filter() -> bytes:
                built, report["seccomp_skipped"] = _build_seccomp(os.getpid())
                return _bpf.export(built)
            flt = step("seccomp", compile_filter)
            report["seccomp"] = False

        # 3. network namespace, while privileged
        if "netns" in s["skip"]:
            fail("netns", "skipped by spec")
        elif "netns" in _PREPARED:
            # the template entered one empty namespace for all its children; a fork cannot leave it
            report["netns"] = True
            report["prepared"].append("netns")
        elif s["network_namespace"]:
            step("netns", _unshare_net)
        # ... and the UTS namespace (after netns: a user namespace made for it also owns this one)
        if "utsns" in s["skip"]:
            fail("utsns", "skipped by spec")
        elif "utsns" in _PREPARED:
            report["utsns"] = True
            report["prepared"].append("utsns")
        elif s["uts_namespace"]:
            step("utsns", _unshare_uts)

        # 4. identity: drop to the unprivileged uid, or at least drop every capability
        def drop_identity() -> None:
            uid, gid = s["drop_uid"], s["drop_gid"] if s["drop_gid"] is not None else s["drop_uid"]
            _drop_bounding_set()
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
                raise OSError(errno.EPERM, "ids did not change")
            try:
                os.setuid(0)
            except PermissionError:
                return
            raise OSError(errno.EPERM, "setuid(0) still succeeds after the drop")

        def drop_caps() -> None:
            eff, prm, inh = _capget()
            if eff or prm or inh:
                if os.geteuid() == 0:  # root that stays root: exec can never grant caps again
                    _prctl(_PR_SET_SECUREBITS, _SECUREBITS_NO_ROOT)
                    _drop_bounding_set()
                try:
                    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
                except OSError:
                    pass
                _capset_zero()
            if any(_capget()):
                raise OSError(errno.EPERM, f"capabilities remain: {_capget()}")

        if is_root:
            if s["drop_uid"] is None:
                fail("uid_drop", "running as root and spec.drop_uid is null")
            elif not drop_ok:
                fail("uid_drop", drop_why)
            else:
                step("uid_drop", drop_identity)
        else:
            report["uid_drop"] = True  # never was root
        step("caps", drop_caps)

        # 5. no_new_privs: required for unprivileged Landlock and seccomp, and nothing may regain privileges
        def nnp() -> None:
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
            if _prctl(_PR_GET_NO_NEW_PRIVS) != 1:
                raise OSError(errno.EPERM, "PR_GET_NO_NEW_PRIVS is not 1")
        step("no_new_privs", nnp)

        # 6. Landlock
        if ruleset_fd >= 0:
            if step("landlock", lambda: _landlock_restrict(ruleset_fd) or True) is not None:
                report["landlock_abi"] = abi

    # 7. rlimits (before seccomp: afterwards setrlimit itself is refused)
    limits = _rlimit_table(s)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over RLIMIT_FSIZE gets EFBIG instead of a kill
    step("rlimits", lambda: _set_rlimits(limits))
    report["rlimits_set"] = {resource_name(r): list(v) for r, v in limits.items()}

    # 8. parent-death signal: after every credential change (a uid change clears it), before
    # seccomp (which refuses prctl(PR_SET_PDEATHSIG)), in every mode: a worker never outlives its supervisor.
    if s["pdeathsig"]:
        step("pdeathsig", lambda: _set_pdeathsig(s["pdeathsig"], s["parent_pid"]))
        if not report["pdeathsig"]:
            raise SandboxError("cannot tie the worker's life to its supervisor: " + report["errors"][-1])

    # 9. seccomp, last: it forbids everything used above
    if flt is not None:
        def load() -> None:
            _bpf.load(flt)
            if _prctl(_PR_GET_SECCOMP) != 2:
                raise OSError(errno.EPERM, "PR_GET_SECCOMP is not 2 after loading the filter")
        step("seccomp", load)

    report["uid"] = os.geteuid()
    report["gid"] = os.getegid()
    return report


def _fs_view_unavailable() -> str:
    why = _PREPARE_ERRORS.get("fs_view")
    return f"the fork template could not build it: {why}" if why else \
        "only a fork template can give its workers a minimal filesystem view"


def sandboxing_mode(mode: str) -> bool:
    return mode != "off"


def _set_pdeathsig(sig: int, parent_pid: int | None) -> None:
    """SIGKILL (or ``sig``) when the parent thread exits; refuse if the parent is already gone."""
    _prctl(_PR_SET_PDEATHSIG, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        # The parent died before the prctl (we were reparented): the signal will never come.
        raise OSError(errno.ESRCH, f"parent {parent_pid} is gone (now {os.getppid()})")


def resource_name(res: int) -> str:
    for name in ("AS", "CPU", "NOFILE", "FSIZE", "CORE", "NPROC"):
        if getattr(resource, "RLIMIT_" + name) == res:
            return name
    return str(res)
