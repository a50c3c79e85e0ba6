"""Worker launch: one configured, sandboxed, hello-checked worker per call.

The ``Launcher`` owns what every worker start shares: the fork template, the
memory cgroups and the read-only working directory. ``Pool`` calls
``launch(profile)`` whenever it needs a worker; nothing here decides *when*.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from ._cgroup import CgroupManager
from ._config import RunnerConfig, SandboxConfig
from ._spawn import WORKER_RFD, WORKER_WFD, spawn_worker
from ._template import Template
from ._worker import WorkerHandle

log = logging.getLogger("actionpool")


def _logs_reach_stderr() -> bool:
    """Does a handler of the ``actionpool`` logger (or an ancestor) already print warnings to stderr?"""
    logger: logging.Logger | None = log
    while logger is not None:
        for h in logger.handlers:
            if (isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)
                    and h.level <= logging.WARNING):
                return logger.isEnabledFor(logging.WARNING)
        logger = logger.parent if logger.propagate else None
    return False


def unprotected_warnings(sb: SandboxConfig, report: dict[str, Any]) -> list[str]:
    """What an operator must hear about: sandbox off, degraded, workers left as root."""
    out: list[str] = []
    if sb.mode == "off":
        out.append("sandbox mode 'off': customer code runs with NO seccomp, Landlock or network namespace; "
                   "it can open sockets, write files and start processes. Use mode 'strict' for untrusted code.")
    elif sb.mode == "degraded":
        missing = [p for p in sb.require if not report.get(p)]
        errors = "; ".join(report.get("errors", [])) or "no detail"
        if missing:
            out.append(f"sandbox mode 'degraded': protections MISSING on this host: {', '.join(missing)} ({errors}). "
                       "Run `actionpool doctor` for what to change; mode 'strict' would refuse to run.")
        else:
            out.append("sandbox mode 'degraded': a protection that fails on this host is skipped instead of "
                       "refused. Use mode 'strict' for untrusted code.")
    if report.get("uid") == 0 and sb.mode != "off":
        why = next((e for e in report.get("errors", []) if e.startswith("uid_drop")), "uid_drop: not applied")
        out.append(f"workers run as uid 0 (root, without capabilities): {why}. "
                   "Run `actionpool doctor` for what to change.")
    elif report.get("uid") == 0:
        out.append("workers run as uid 0 (root) with every capability: sandbox mode is 'off'.")
    return out


class Launcher:
    """Starts workers for one runner: template fork (or spawn), cgroup, configure, hello."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.template: Template | None = None
        self.cgroups: CgroupManager | None = None
        self.workdir: str | None = None
        self.warnings: list[str] = []   # the loud start-up warnings, once per runner (see warn_once)
        self._warned = False

    async def start(self) -> None:
        cfg = self.config
        if cfg.sandbox.cgroups and cfg.sandbox.mode != "off":
            self.cgroups = CgroupManager.detect()
            if self.cgroups is None:
                log.warning("actionpool: no memory cgroups on this host (needs root or a delegated subtree); "
                            "memory is capped by RLIMIT_AS alone, and a caught MemoryError goes unnoticed")
        self.workdir = tempfile.mkdtemp(prefix="actionpool-")
        os.chmod(self.workdir, 0o555)
        if cfg.fork_template:
            sb = cfg.sandbox
            # a UTS namespace always: no worker needs the host's name (uname() says "actionpool")
            opts = {"mode": sb.mode, "network_namespace": sb.network_namespace, "uts_namespace": True,
                    "drop_uid": sb.drop_uid, "drop_gid": sb.drop_gid,
                    # the minimal view's tmpfs root is mounted on the (empty, read-only) workdir, in the
                    # template's own mount namespace: the host never sees it
                    "fs_view": sb.fs_view, "fs_root": self.workdir}
            self.template = Template(cfg.python, cfg.worker_start_timeout_s, opts)
            try:
                await self.template.start()
            except Exception as exc:
                log.warning("actionpool: fork template unavailable (%s); spawning each worker", exc)
                await self.template.close()
                self.template = None

    async def launch(self, wprofile: tuple[Any, ...]) -> WorkerHandle:
        cfg = self.config
        memory_mb, cpu_seconds, max_open_files = wprofile
        sb = cfg.sandbox
        if self.template is not None:
            spawned = await self.template.fork()
        else:
            spawned = spawn_worker(cfg.python)
        w = WorkerHandle(spawned, max_frame=cfg.limits.max_frame_bytes, profile=wprofile)
        memory = memory_mb << 20
        address_space = memory
        if self.cgroups is not None:
            # The worker blocks reading its configuration, so it is in the cgroup before any action code.
            try:
                cg = self.cgroups.create(f"w{spawned.pid}", memory_bytes=memory, pids_max=4)
                cg.add(spawned.pid)
            except OSError as exc:
                w.kill("cgroup setup failed")
                raise RuntimeError(f"cannot put worker in a memory cgroup: {exc}") from exc
            w.memory_check = cg.oom_killed
            w.on_exit.append(lambda: self._remove_cgroup(cg))
            # The cgroup is the cap (uncatchable OOM kill); RLIMIT_AS only stops absurd reservations.
            address_space = memory * sb.address_space_factor + (256 << 20)
        configure = {
            "max_frame": cfg.limits.max_frame_bytes,
            "coalesce": True,
            "sandbox": {
                "mode": sb.mode,
                "require": list(sb.require) if sb.mode == "strict" else [],
                "keep_fds": [WORKER_RFD, WORKER_WFD],
                "memory_bytes": address_space,
                "cpu_seconds": cpu_seconds,
                "max_open_files": max_open_files,
                "file_size": 0,
                "workdir": self.workdir,
                "network_namespace": sb.network_namespace,
                "uts_namespace": True,
                "fs_view": sb.fs_view and self.template is not None,
                "drop_uid": sb.drop_uid,
                "drop_gid": sb.drop_gid,
                # SIGKILL when the supervisor dies, however it dies (set after the last credential change)
                "pdeathsig": signal.SIGKILL,
                "parent_pid": os.getpid(),
            },
        }
        try:
            await w.start(configure, cfg.worker_start_timeout_s)
        except BaseException:
            w.kill("failed to start")
            raise
        if not self._warned:
            self._warned = True
            self.warn_once(w.info.get("sandbox") or {})
        return w

    def warn_once(self, report: dict[str, Any]) -> None:
        """Say loudly, on stderr and in the log, when customer code runs less protected than strict.

        ``logging.warning`` alone is lost when the embedding application configured no handler (or
        sends the log elsewhere), so this writes to ``sys.stderr`` too; once per runner.
        """
        self.warnings = unprotected_warnings(self.config.sandbox, report)
        if not self.warnings:
            return
        handled = log.hasHandlers()  # without any handler, logging's last resort would print a duplicate
        for msg in self.warnings:
            if handled:
                log.warning("%s", msg)
            if not _logs_reach_stderr():
                try:
                    sys.stderr.write(f"actionpool: WARNING: {msg}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass

    def _remove_cgroup(self, cg: Any, attempt: int = 0) -> None:
        """Remove a dead worker's cgroup without blocking the loop: the kernel may need a moment."""
        try:
            if cg.try_remove() or attempt >= 100:
                return
        except OSError as exc:
            log.warning("actionpool: could not remove cgroup: %s", exc)
            return
        asyncio.get_running_loop().call_later(0.02, self._remove_cgroup, cg, attempt + 1)

    async def close(self) -> None:
        if self.template is not None:
            await self.template.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self.cgroups is not None:
            try:
                self.cgroups.cleanup()
            except OSError as exc:
                log.warning("actionpool: could not remove worker cgroups: %s", exc)
            self.cgroups = None

    def stats(self) -> dict[str, Any]:
        out = self.template.stats() if self.template is not None else {}
        if self.cgroups is not None:
            out["cgroups"] = len(self.cgroups.cgroups)   # live workers' cgroups (and ones still being removed)
        return out
