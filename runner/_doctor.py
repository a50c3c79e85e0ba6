"""``actionpool doctor``: which protections this host gives a worker, for real.

It does not guess from kernel versions: it starts one worker with the default
sandbox and prints the report that worker sent in its hello, next to the host
capabilities and whether memory cgroups can be created. Exit status 1 when a
protection the default config requires is missing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ..worker._sandbox import host_capabilities

from ._cgroup import CgroupManager
from ._config import RunnerConfig, SandboxConfig
from ._runner import Runner

ROWS = (
    ("no_new_privs", "PR_SET_NO_NEW_PRIVS: no privilege gain through exec"),
    ("rlimits", "rlimits: address space, CPU, files, file size 0, no core dumps, no new processes"),
    ("seccomp", "seccomp-bpf: no sockets, exec, fork/threads, ptrace, foreign signals, mount/ns/keys/bpf"),
    ("landlock", "Landlock: read-only code paths, no writes, no TCP (ABI>=4), scoped signals (ABI>=6)"),
    ("netns", "network namespace: no interface but a downed loopback"),
    ("uid_drop", "unprivileged uid/gid"),
    ("fds_closed", "every inherited descriptor closed but the two pipes"),
)


async def _probe() -> dict[str, Any]:
    cfg = RunnerConfig(pool_size=0, sandbox=SandboxConfig(mode="degraded"))
    async with Runner(cfg) as r:
        return dict(r.sandbox_report)


def doctor(as_json: bool = False) -> int:
    caps = host_capabilities()
    mgr = CgroupManager.detect()
    cgroup = mgr.version if mgr is not None else None
    if mgr is not None:
        mgr.cleanup()
    try:
        report = asyncio.run(_probe())
    except Exception as exc:
        report = {"errors": [f"worker did not start: {type(exc).__name__}: {exc}"]}
    required = SandboxConfig().require
    missing = [name for name in required if not report.get(name)]
    out = {"host": caps, "cgroup": cgroup, "worker": report, "required": list(required), "missing": missing}
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print("actionpool doctor: protections a worker applies on this host\n")
        for key, what in ROWS:
            mark = "yes" if report.get(key) else "NO "
            need = " (required)" if key in required else ""
            print(f"  [{mark}] {what}{need}")
        print(f"  [{'yes' if cgroup else 'NO '}] memory cgroup per worker ({cgroup or 'unavailable: RLIMIT_AS only'})")
        print(f"\n  Landlock ABI {report.get('landlock_abi', caps.get('landlock_abi'))}, "
              f"worker uid {report.get('uid')}, supervisor root: {caps.get('root')}")
        for err in report.get("errors", []):
            print(f"  note: {err}")
        print("\nall required protections active" if not missing else f"\nMISSING required: {', '.join(missing)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(doctor("--json" in sys.argv))
