"""``actionpool doctor``: which protections this host gives a worker, for real.

It does not guess from kernel versions: it starts one worker with the default
sandbox and prints the report that worker sent in its hello, next to the host
capabilities and whether memory cgroups can be created. Exit status 1 when a
protection the default config requires is missing.

Given the sidecar's store (``--store redis://...`` or ``--config serve.toml``
with ``[store] url``), the CLI adds the sidecar's own check of that Redis
(``actionpool.sidecar._doctor``: does it persist anything?), printed here as a
warning, not a failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ..worker._sandbox import host_capabilities

from ._cgroup import CgroupManager
from ._config import RunnerConfig, SandboxConfig
from ._launch import Launcher

ROWS = (
    ("no_new_privs", "PR_SET_NO_NEW_PRIVS: no privilege gain through exec"),
    ("rlimits", "rlimits: address space, CPU, files, file size 0, no core dumps, no new processes"),
    ("seccomp", "seccomp-bpf: no sockets, exec, fork/threads, ptrace, foreign signals, mount/ns/keys/bpf"),
    ("landlock", "Landlock: read-only code paths, no writes, no TCP (ABI>=4), scoped signals (ABI>=6)"),
    ("netns", "network namespace: no interface but a downed loopback"),
    ("fs_view", "minimal filesystem view: only the interpreter, its libraries and the package; no /proc"),
    ("uid_drop", "unprivileged uid/gid"),
    ("pdeathsig", "parent-death signal: a worker dies with its supervisor"),
    ("fds_closed", "every inherited descriptor closed but the two pipes"),
)


def fix_for(name: str, caps: dict[str, Any], sandbox: SandboxConfig) -> str:
    """Exactly what to change on this host (or in the config) to get protection ``name``."""
    userns = ("allow unprivileged user namespaces (sysctl user.max_user_namespaces=15000; on Debian "
              "kernel.unprivileged_userns_clone=1; on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)")
    fixes = {
        "seccomp": ("install libseccomp (apt-get install libseccomp2) and the pyseccomp package "
                    "(pip install pyseccomp), on a kernel built with CONFIG_SECCOMP_FILTER=y"
                    if caps.get("seccomp") is False else "see the error below"),
        "landlock": ("boot a kernel >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= boot "
                     "parameter (cat /sys/kernel/security/lsm lists the active ones)"),
        "netns": ("set SandboxConfig(network_namespace=True)" if not sandbox.network_namespace else
                  "run the supervisor as root, or " + userns),
        "fs_view": ("keep RunnerConfig(fork_template=True) and SandboxConfig(fs_view=True), and run the supervisor "
                    "as root or " + userns),
        "uid_drop": (f"install Python where uid {sandbox.drop_uid} can read it (e.g. /usr/local or /opt, not under "
                     "/root), or run the supervisor as an unprivileged user" if sandbox.drop_uid is not None else
                     "set SandboxConfig(drop_uid=65534, drop_gid=65534)"),
        "pdeathsig": "the kernel refused prctl(PR_SET_PDEATHSIG); see the error below",
        "no_new_privs": "the kernel refused PR_SET_NO_NEW_PRIVS (Linux >= 3.5 needed); see the error below",
        "rlimits": "a hard rlimit of the supervisor is below the worker's limits: raise it (ulimit -H) or lower Limits",
        "fds": "see the error below",
        "fds_closed": "see the error below",
        "caps": "see the error below",
    }
    return fixes.get(name, "see the error below")


async def _probe() -> dict[str, Any]:
    """Start one worker as a runner would (template, cgroup, sandbox) and return its hello report."""
    cfg = RunnerConfig(pool_size=0, sandbox=SandboxConfig(mode="degraded", fs_view=True))
    launcher = Launcher(cfg)
    launcher._warned = True  # doctor prints its own table, not the runner's start-up warnings
    try:
        await launcher.start()
        w = await launcher.launch((cfg.limits.memory_mb, cfg.limits.cpu_seconds, cfg.limits.max_open_files))
        await w.shutdown(cfg.kill_grace_s)
        return dict(w.info.get("sandbox") or {})
    finally:
        await launcher.close()


def doctor(as_json: bool = False, store: dict[str, Any] | None = None) -> int:
    """Print the report; ``store`` is the sidecar's store check (``actionpool.sidecar``), shown as it is."""
    caps = host_capabilities()
    mgr = CgroupManager.detect()
    cgroup = mgr.version if mgr is not None else None
    if mgr is not None:
        mgr.cleanup()
    try:
        report = asyncio.run(_probe())
    except Exception as exc:
        report = {"errors": [f"worker did not start: {type(exc).__name__}: {exc}"]}
    sandbox = SandboxConfig()
    required = sandbox.require
    missing = [name for name in required if not report.get(name)]
    fixes = {key: fix_for(key, caps, sandbox) for key, _ in ROWS if not report.get(key)}
    if not cgroup:
        fixes["cgroup"] = ("run the supervisor as root, or in a delegated cgroup v2 subtree (a leaf) where it may "
                           "enable the memory controller (systemd: Delegate=yes)")
    out = {"host": caps, "cgroup": cgroup, "worker": report, "required": list(required), "missing": missing,
           "fixes": fixes, "default_mode": sandbox.mode}
    if store is not None:
        out["store"] = store
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print("actionpool doctor: protections a worker applies on this host\n")
        for key, what in ROWS:
            mark = "yes" if report.get(key) else "NO "
            need = " (required)" if key in required else ""
            print(f"  [{mark}] {what}{need}")
            if key in fixes:
                print(f"          fix: {fixes[key]}")
        print(f"  [{'yes' if cgroup else 'NO '}] memory cgroup per worker ({cgroup or 'unavailable: RLIMIT_AS only'})")
        if "cgroup" in fixes:
            print(f"          fix: {fixes['cgroup']}")
        print(f"\n  Landlock ABI {report.get('landlock_abi', caps.get('landlock_abi'))}, "
              f"worker uid {report.get('uid')}, supervisor root: {caps.get('root')}")
        for err in report.get("errors", []):
            print(f"  note: {err}")
        if "store" in out:
            st = out["store"]
            where = str(st["url"]).split("@")[-1]
            if "warning" in st:
                print(f"\n  WARNING store {where}: {st['warning']}")
            else:
                print(f"\n  [yes] store {where}: reachable, persists to disk (RDB snapshots or AOF)")
        if missing:
            print(f"\nMISSING required: {', '.join(missing)}: the default sandbox mode '{sandbox.mode}' refuses to run "
                  "actions here; fix the above, or run with mode 'degraded' knowing what is missing")
        else:
            print("\nall required protections active")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(doctor("--json" in sys.argv))
