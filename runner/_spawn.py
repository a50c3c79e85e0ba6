"""Starting worker processes: a clean interpreter, a scrubbed environment.

Workers are started with ``posix_spawn`` (vfork+exec: nothing of the
supervisor's memory, secrets or threads is inherited), in a new session so the
whole process group can be killed at once, with stdin/stdout/stderr on
``/dev/null`` and exactly two pipe ends at fds 3 (requests in) and 4 (replies out).
Every other descriptor of the supervisor is close-on-exec (PEP 446).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

WORKER_RFD = 3
WORKER_WFD = 4

# The ``actionpool`` package's own directory. The worker runs with -I -S (no site,
# no user site, no PYTHON* variables, no cwd on the path), so the editable-install
# finder of site-packages is not there: the bootstrap registers the package from
# this directory explicitly, and the directory itself is never put on sys.path
# (its subpackages must not be importable under a second, top-level name).
PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Third-party modules a worker imports (the protocol's codec, the sandbox's libseccomp binding, the JS engine, the
# JSON codec actions get fast paths from). Their sys.path entries are the only non-stdlib ones it gets.
WORKER_MODULES = ("msgpack", "orjson", "pyseccomp", "_quickjs")


def _entry_holding(location: str, entries: list[str]) -> str | None:
    """The longest sys.path entry that ``location`` (a module file or package dir) lies beneath."""
    loc = os.path.realpath(location)
    best = None
    for entry in entries:
        real = os.path.realpath(entry)
        if (loc == real or loc.startswith(real.rstrip("/") + "/")) and (best is None or len(real) > len(best[1])):
            best = (entry, real)
    return best[0] if best else None


def _site_paths() -> list[str]:
    """The worker's sys.path: computed from what it needs, never from the supervisor's cwd or extras.

    The standard library (its zip, its directory, lib-dynload) and the entries that hold
    ``WORKER_MODULES``. ``python -m actionpool.runner.cli`` run from a directory puts that
    directory first on the supervisor's sys.path; it must not reach the worker's (the sandbox
    grants read access to every entry of the worker's path).
    """
    pkg = os.path.realpath(PKG_DIR)
    entries = [p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p) and os.path.realpath(p) != pkg]
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    needed: set[str] = set()
    for p in entries:
        real = os.path.realpath(p)
        if real == stdlib or os.path.dirname(real) == stdlib and os.path.basename(real) == "lib-dynload":
            needed.add(p)
        elif real.endswith(".zip") and os.path.dirname(real) == os.path.dirname(stdlib):
            needed.add(p)  # pythonXY.zip next to the stdlib directory
    for mod in (*WORKER_MODULES, "_json", "_socket"):  # two extension modules: where lib-dynload really is
        spec = importlib.util.find_spec(mod)
        where = spec.origin if spec is not None and spec.has_location and spec.origin else None
        entry = _entry_holding(where, entries) if where else None
        if entry is not None:
            needed.add(entry)
    return [p for p in entries if p in needed]


def register_code(pkg_dir: str = PKG_DIR) -> str:
    """Python source that makes ``actionpool`` importable from ``pkg_dir`` in a ``-I -S`` interpreter."""
    return (
        "import sys, importlib.util as _u;"
        f"_s = _u.spec_from_file_location('actionpool', {pkg_dir + '/__init__.py'!r}, submodule_search_locations=[{pkg_dir!r}]);"
        "_m = _u.module_from_spec(_s); sys.modules['actionpool'] = _m; _s.loader.exec_module(_m);"
    )


def _bootstrap(entry: str, nargs: int) -> str:
    """``python -c`` code: set sys.path from argv, register ``actionpool``, call ``entry``'s main."""
    return (
        "import sys;"
        f"sys.path[:] = sys.argv[{nargs + 1}].split('\\x1f');"
        + register_code()
        + f"from {entry} import main;"
        f"main(sys.argv[1:{nargs + 1}])"
    )


_BOOTSTRAP = _bootstrap("actionpool.worker.__main__", 2)
_TEMPLATE_BOOTSTRAP = _bootstrap("actionpool.worker._template", 2)

WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


@dataclass
class Spawned:
    pid: int
    rfd: int  # supervisor reads the worker's messages here
    wfd: int  # supervisor writes requests here


def _paths() -> str:
    return "\x1f".join(_site_paths())


def _spawn(python: str | None, code: str, args: list[str], fds: dict[int, int]) -> int:
    """posix_spawn a clean interpreter running ``code`` with ``fds`` (target -> source) in place."""
    exe = python or sys.executable
    argv = [exe, "-I", "-S", "-B", "-X", "utf8", "-c", code, *args]
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        *((os.POSIX_SPAWN_DUP2, src, target) for target, src in fds.items()),
    ]
    return os.posix_spawn(exe, argv, WORKER_ENV, file_actions=actions, setsid=True)


def worker_pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """``((worker_rfd, worker_wfd), (supervisor_rfd, supervisor_wfd))`` for one new worker."""
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    return (to_worker_r, from_worker_w), (from_worker_r, to_worker_w)


def spawn_worker(python: str | None = None) -> Spawned:
    """Start one worker process from scratch; returns its pid and the supervisor's pipe ends."""
    (wr, ww), (sr, sw) = worker_pipes()
    try:
        pid = _spawn(python, _BOOTSTRAP, [str(WORKER_RFD), str(WORKER_WFD), _paths()],
                     {WORKER_RFD: wr, WORKER_WFD: ww})
    except BaseException:
        for fd in (wr, ww, sr, sw):
            os.close(fd)
        raise
    os.close(wr)
    os.close(ww)
    return Spawned(pid, sr, sw)


TEMPLATE_FD = 3


def spawn_template(python: str | None, ctl_fd: int, opts: dict[str, Any] | None = None) -> int:
    """Start the fork template with its end of the control socket at fd 3; returns its pid.

    ``opts`` are the runner's sandbox settings the template prepares once for all its
    children (see ``worker._sandbox.prepare``); never anything of a tenant.
    """
    args = dict(opts or {}, supervisor=os.getpid())
    return _spawn(python, _TEMPLATE_BOOTSTRAP, [str(TEMPLATE_FD), json.dumps(args), _paths()], {TEMPLATE_FD: ctl_fd})
