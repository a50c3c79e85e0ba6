"""``actionpool serve --workers N``: N sidecar processes behind one port, for hosts with more cores than one.

One supervisor is one Python thread (about 110 µs of CPU per flow), so one process stops at a few thousand
flows/s however many cores the host has. With ``--workers N`` a small parent process starts N ordinary
``serve`` processes. Each one:

* listens on the same address with ``SO_REUSEPORT``, so the kernel spreads new connections over them (no
  accept lock, no proxying parent: the parent never touches a request);
* has its own Runner and pool, with a 1/N share of the worker memory budget and of ``runner.max_workers``;
* is a replica of the shared store: management writes reach every process the way they reach replicas (the
  store's generation counter and pub/sub, within 1 s), which is why N > 1 needs a ``redis://`` store;
* records its metrics in prometheus-client's multiprocess mode (one directory of memory-mapped files, made
  and removed by the parent), so ``/metrics`` on any of them shows the sums over all of them.

The parent (this module) prints one line when all N are ready and one when they have all stopped, forwards
SIGTERM/SIGINT to every process (each drains its flows, ``server.drain_grace_s``), restarts a process that
dies on its own (at most ``MAX_RESTARTS`` within ``RESTART_WINDOW_S``, then it stops everything and exits 1),
and exits 0 after a drained stop. It never imports the server, the runner or prometheus-client itself.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

MAX_WORKERS = 64
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 120.0
STOP_MARGIN_S = 10.0         # beyond the drain grace, before a process that does not stop is killed

# What the parent tells each process (read by sidecar/_serve.py).
ENV_INDEX = "ACTIONPOOL_SERVE_WORKER"        # "i/N"
ENV_READY_FD = "ACTIONPOOL_SERVE_READY_FD"   # the process writes b"ready\n" there once it serves
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class WorkerSlot:
    """This process's place among N (``None`` when it runs alone)."""

    index: int
    count: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "WorkerSlot | None":
        raw = (os.environ if env is None else env).get(ENV_INDEX)
        if not raw:
            return None
        i, _, n = raw.partition("/")
        try:
            slot = cls(int(i), int(n))
        except ValueError:
            return None
        return slot if 0 <= slot.index < slot.count <= MAX_WORKERS else None


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket that N processes can bind at once; the kernel balances connections between them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it every
    # keep-alive response waited for the client's delayed ACK (48 ms a flow instead of 1).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def report_ready() -> None:
    """Tell the parent this process serves (a no-op when it runs alone)."""
    raw = os.environ.pop(ENV_READY_FD, None)
    if raw is None:
        return
    try:
        fd = int(raw)
        os.write(fd, b"ready\n")
        os.close(fd)
    except (ValueError, OSError):
        pass


def share_of(value: float | int | None, slot: WorkerSlot | None) -> Any:
    """A 1/N share of a process-wide budget (at least 1), or the value itself when alone or unset."""
    if value is None or slot is None or slot.count <= 1:
        return value
    share = value / slot.count
    return max(1, int(share)) if isinstance(value, int) else max(1.0, share)


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready: bool = False
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    """The parent of N serve processes; ``run()`` returns the exit status."""

    def __init__(self, argv: list[str], host: str, port: int, count: int, drain_grace_s: float) -> None:
        self.argv = argv          # the child's command line, without the program
        self.host, self.port, self.count = host, port, count
        self.drain_grace_s = drain_grace_s
        self.children = [_Child(i) for i in range(count)]
        self.metrics_dir = tempfile.mkdtemp(prefix="actionpool-metrics-")
        self.stopping: str | None = None
        self.sel = selectors.DefaultSelector()
        self.started_at = time.monotonic()
        self.announced = False

    # -- processes ----------------------------------------------------------------------------------
    def _spawn(self, child: _Child) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        env = dict(os.environ)
        env[ENV_INDEX] = f"{child.index}/{self.count}"
        env[ENV_READY_FD] = str(w)
        env[MULTIPROC_ENV] = self.metrics_dir
        # --sync-config once: the first process's first start. A restart must not undo the management writes
        # made since (the store wins, as it does for a replica that restarts).
        first = child.index == 0 and not child.restarts
        argv = self.argv if first else [a for a in self.argv if a != "--sync-config"]
        child.proc = subprocess.Popen([sys.executable, "-m", "actionpool.runner.cli", *argv], env=env,
                                      pass_fds=(w,), stdin=subprocess.DEVNULL)
        os.close(w)
        child.ready_fd, child.ready = r, False
        self.sel.register(r, selectors.EVENT_READ, child)

    def _forget_pipe(self, child: _Child) -> None:
        if child.ready_fd is not None:
            self.sel.unregister(child.ready_fd)
            os.close(child.ready_fd)
            child.ready_fd = None

    def _signal_all(self, sig: int) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                try:
                    c.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if self.stopping is None:
            self.stopping = signal.Signals(sig).name
            self._signal_all(signal.SIGTERM)  # each process drains its own flows
        elif sig == signal.SIGINT:
            self._signal_all(signal.SIGINT)   # a second Ctrl-C: stop now

    def _mark_dead(self, pid: int) -> None:
        """Drop a dead process's live gauges from the sums (its counters stay: they are totals)."""
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except Exception:  # metrics must never take the supervisor down
            pass

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        try:
            # The first process alone, then the rest: the first applies the config to an empty store (or
            # --sync-config) before any other process reads it, so N processes never write it N times.
            self._spawn(self.children[0])
            status = self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for c in self.children:
                self._forget_pipe(c)
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
            self.sel.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return status

    def _loop(self) -> int:
        stop_deadline: float | None = None
        failure: str | None = None
        while True:
            for key, _ in self.sel.select(timeout=0.1):
                child: _Child = key.data
                try:
                    data = os.read(key.fd, 64)
                except BlockingIOError:
                    continue
                if data.startswith(b"ready"):
                    child.ready = True
                self._forget_pipe(child)
            if self.children[0].ready and self.stopping is None:
                for c in self.children[1:]:
                    if c.proc is None:
                        self._spawn(c)
            if not self.announced and all(c.ready for c in self.children):
                self.announced = True
                print(f"actionpool serve: {self.count} processes ready on http://{self.host}:{self.port} "
                      f"(SO_REUSEPORT; metrics summed over all of them)", file=sys.stderr, flush=True)
            if (not self.announced and self.stopping is None
                    and time.monotonic() - self.started_at > READY_TIMEOUT_S):
                failure = f"not every process was ready within {READY_TIMEOUT_S:g} s"
                self.stopping = "start timeout"
                self._signal_all(signal.SIGTERM)
            if self.stopping is not None and stop_deadline is None:
                stop_deadline = time.monotonic() + self.drain_grace_s + STOP_MARGIN_S
            for c in self.children:
                if c.proc is None or c.proc.poll() is None:
                    continue
                code = c.proc.returncode
                self._mark_dead(c.proc.pid)
                self._forget_pipe(c)
                if self.stopping is not None:
                    continue
                now = time.monotonic()
                c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW_S] + [now]
                if not c.ready and not self.announced:
                    failure = f"process {c.index} exited with status {code} before it was ready"
                elif len(c.restarts) > MAX_RESTARTS:
                    failure = (f"process {c.index} died {len(c.restarts)} times within {RESTART_WINDOW_S:g} s "
                               f"(last status {code})")
                if failure is not None:
                    self.stopping = "a process failed"
                    self._signal_all(signal.SIGTERM)
                    stop_deadline = time.monotonic() + self.drain_grace_s + STOP_MARGIN_S
                    continue
                print(f"actionpool serve: process {c.index} (pid {c.proc.pid}) exited with status {code}; "
                      f"restarting it", file=sys.stderr, flush=True)
                self._spawn(c)
            alive = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
            if self.stopping is not None and not alive:
                break
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                self._signal_all(signal.SIGKILL)
        if failure is not None:
            print(f"actionpool serve: error: {failure}", file=sys.stderr, flush=True)
            return 3 if not self.announced else 1
        codes = [c.proc.returncode for c in self.children if c.proc is not None]
        print(f"actionpool serve: stopped ({self.stopping}; {self.count} processes, exit "
              f"{','.join(str(x) for x in codes)})", file=sys.stderr, flush=True)
        return 0 if all(x in (0, -signal.SIGTERM) for x in codes) else 1


def child_argv(argv: list[str]) -> list[str]:
    """The command line of each process: the parent's, without ``--workers``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def serve_workers(config_path: str, host: str, port: int, count: int, child_argv: list[str]) -> int:
    """Check what can be checked once, then run ``count`` serve processes behind one port."""
    from ..runner import ConfigError
    from ._config import load_config
    from ._preflight import start_problem

    if not 1 <= count <= MAX_WORKERS:
        print(f"actionpool serve: error: --workers {count}: must be 1..{MAX_WORKERS}", file=sys.stderr)
        return 2
    if port == 0:
        print("actionpool serve: error: --workers needs a fixed --port (port 0 would give each process its own)",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        print(f"actionpool serve: error: {exc}", file=sys.stderr)
        return 2
    if cfg.store_url is None:
        print(f"actionpool serve: error: --workers {count} needs a shared store: set [store] url = "
              f"\"redis://...\" in {config_path}. The processes share tenants, versions, secrets and history "
              f"through it as replicas do; with memory:// a deploy would reach only one of them", file=sys.stderr)
        return 2
    problem = start_problem(host, port, cfg.store_url, config_path)
    if problem is not None:
        print(f"actionpool serve: error: {problem[1]}", file=sys.stderr)
        return problem[0]
    return Supervisor(child_argv, host, port, count, cfg.server.drain_grace_s).run()
