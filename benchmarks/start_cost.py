"""Per-worker start cost, measured on the real launch path.

    python -m actionpool.benchmarks.start_cost [-n 200] [--no-template] [--mode degraded]

Two numbers, each the median (and p90) of ``n`` starts, one at a time:

- ``fork``: the template's fork request to the pid reply (no configure, no sandbox), only with the template;
- ``fork_to_hello``: ``Launcher.launch()`` without memory cgroups: fork (or spawn), configure, the sandbox, hello;
- ``launch``: ``Launcher.launch()`` end to end, the per-worker memory cgroup included.

Every started worker is shut down before the next start, so the numbers are a cold start each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

from ..runner._config import RunnerConfig, SandboxConfig
from ..runner._launch import Launcher


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1e3, 3), "p90_ms": round(xs[int(len(xs) * 0.9)] * 1e3, 3),
            "n": len(xs)}


async def measure(n: int, template: bool, mode: str, cgroups: bool = True) -> dict[str, object]:
    cfg = RunnerConfig(fork_template=template, sandbox=SandboxConfig(mode=mode, cgroups=cgroups))  # type: ignore[arg-type]
    launcher = Launcher(cfg)
    await launcher.start()
    profile = (cfg.limits.memory_mb, cfg.limits.cpu_seconds, cfg.limits.max_open_files)
    forks: list[float] = []
    launches: list[float] = []
    report: dict[str, object] = {}
    try:
        for _ in range(5):  # warm-up: page cache, the cgroup stock
            w = await launcher.launch(profile)
            await w.shutdown(1.0)
        if launcher.template is not None:
            for _ in range(n):
                t0 = time.perf_counter()
                spawned = await launcher.template.fork()
                forks.append(time.perf_counter() - t0)
                os.kill(spawned.pid, signal.SIGKILL)
                os.waitpid(spawned.pid, 0)
                os.close(spawned.rfd)
                os.close(spawned.wfd)
        for _ in range(n):
            t0 = time.perf_counter()
            w = await launcher.launch(profile)
            launches.append(time.perf_counter() - t0)
            report = w.info.get("sandbox") or {}
            await w.shutdown(1.0)
    finally:
        await launcher.close()
    out: dict[str, object] = {"template": template, "mode": mode, "launch": _summary(launches)}
    if forks:
        out["fork"] = _summary(forks)
    out["protections"] = {k: report.get(k) for k in
                          ("fds", "netns", "uid_drop", "caps", "no_new_privs", "landlock", "rlimits", "seccomp",
                           "pdeathsig", "fs_view") if k in report}
    out["prepared"] = report.get("prepared")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actionpool.benchmarks.start_cost", description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--no-template", action="store_true")
    p.add_argument("--mode", default="degraded", choices=("strict", "degraded", "off"))
    args = p.parse_args(argv)
    out = asyncio.run(measure(args.n, not args.no_template, args.mode))
    out["fork_to_hello"] = asyncio.run(measure(args.n, not args.no_template, args.mode, cgroups=False))["launch"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
