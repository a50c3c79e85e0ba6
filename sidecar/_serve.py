"""``actionpool serve``: the sidecar process (uvicorn around sidecar/_server.py).

SIGTERM drains instead of stopping at once: ``readyz`` answers 503 and new
flows get 503 with ``Retry-After`` (so the load balancer and the gateway move
on to another replica), the flows in flight finish within
``[server] drain_grace_s``, then uvicorn closes its sockets, the lifespan
shutdown closes the runner (no worker left) and the process exits 0. A second
SIGTERM or a SIGINT stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import gc
import dataclasses
import logging
import signal
import time
from typing import Any
from types import FrameType

from ..runner import ConfigError
from ..runner import hosting as policy
from ._config import ServeConfig, ServerSpec, is_loopback, load_config
from ._logs import say, uvicorn_log_config
from ._server import Sidecar
from ._preflight import shown_url, start_problem
from ._workers import WorkerSlot, report_ready, reuseport_socket, share_of

log = logging.getLogger("actionpool.serve")


def tune_gc() -> None:
    """Keep what exists once the sidecar has started out of every later pass of the cyclic GC.

    Every pass of the GC stops the one loop that runs every tenant's flows and kill timers, and a full
    (generation 2) pass walks every tracked object: under 5,000 connections one took 77-204 ms
    (benchmarks/sidecar_attack.py, with a gc.callbacks probe). The modules, the runner and the config (about
    46,000 objects at start) never become garbage, so they are frozen out of those passes. A larger young
    threshold was tried and dropped: young passes then took 20-44 ms each instead of a fraction of one.
    The warm workers the prewarm starts are frozen once it ends (``Sidecar._prewarm``).
    """
    policy.freeze_heap()


def _store_url(url: str | None) -> str:
    """The store's URL for a log line, its password masked (as the start-up errors show it)."""
    return shown_url(url) if url else "memory://"


def _inventory(app: Sidecar) -> tuple[int, int]:
    """(tenants, deployed actions) the sidecar serves: from the store, or the config before the store knew tenants."""
    tenants = getattr(app.store, "tenants", None)
    n_tenants = len(tenants()) if callable(tenants) else len(app.config.tenants)
    return n_tenants, app.store.deployed_count()


def _sandbox(app: Sidecar) -> str:
    """``strict``, ``off``, or ``degraded (missing: landlock)`` from what the first worker reported."""
    sb = app.config.runner.sandbox
    if sb.mode != "degraded":
        return sb.mode
    report = app.runner.sandbox_report
    missing = [r for r in sb.require if not report.get(r)]
    return f"degraded (missing: {', '.join(missing)})" if missing else "degraded (nothing missing)"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(s, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def _process_tag() -> str:
    """`` (process i/N)`` in one of ``serve --workers N``'s processes: its own lines say which one they are."""
    slot = WorkerSlot.from_env()
    return f" (process {slot.index}/{slot.count})" if slot is not None else ""


def ready_line(app: Sidecar, address: str, log_format: str) -> None:
    """The one line that says the sidecar serves: where, what, from which store, how sandboxed."""
    tenants, actions = _inventory(app)
    store, sandbox = _store_url(app.config.store_url), _sandbox(app)
    say(log_format, f"actionpool serve: ready on {address}{_process_tag()} · {tenants} tenant{'s' * (tenants != 1)}, "
                    f"{actions} action{'s' * (actions != 1)} · store {store} · sandbox {sandbox}",
        event="ready", address=address, tenants=tenants, actions=actions, store=store, sandbox=sandbox)


def stop_line(server: Any, log_format: str) -> None:
    """The one line that says the sidecar stopped: on which signal, what the drain did, after how long up."""
    sigs = [signal.Signals(s).name for s in server.stop_signals] or ["exit"]
    parts = [f"actionpool serve: stopped on {' then '.join(sigs)}{_process_tag()}"]
    fields: dict[str, Any] = {"event": "stopped", "signal": sigs[0], "signals": sigs}
    if server.drain_deadline is not None:   # a SIGTERM drain
        at_signal, left = server.inflight_at_signal, server.inflight_left
        waited = (server.drain_ended or time.monotonic()) - server.drain_began
        text = f"drained {at_signal - left} flow{'s' * (at_signal - left != 1)} in {waited:.1f} s"
        if left:
            text += f", {left} cut off (server.drain_grace_s = {server.sidecar.server.drain_grace_s:g} s)"
        parts.append(text)
        fields.update(flows_drained=at_signal - left, flows_cut_off=left, drain_s=round(waited, 3))
    else:
        parts.append(f"{server.inflight_at_signal} flow{'s' * (server.inflight_at_signal != 1)} in flight, "
                     f"not drained")
        fields.update(flows_drained=0, flows_cut_off=server.inflight_at_signal, drain_s=0.0)
    up = time.monotonic() - server.ready_at if server.ready_at is not None else 0.0
    parts.append(f"up {_duration(up)}")
    fields["uptime_s"] = round(up, 3)
    say(log_format, " · ".join(parts), **fields)


def _uvicorn_server() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, with SIGTERM starting a drain rather than an immediate stop."""

        def __init__(self, config: "uvicorn.Config", app: Sidecar, log_format: str = "text") -> None:
            super().__init__(config)
            self.sidecar = app
            self.log_format = log_format
            self.drain_deadline: float | None = None
            self.drain_began = self.drain_ended = 0.0
            self.ready_at: float | None = None
            self.stop_signals: list[int] = []
            self.inflight_at_signal = self.inflight_left = 0

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.stop_signals:
                self.inflight_at_signal = self.sidecar.inflight
            self.stop_signals.append(sig)
            if sig == signal.SIGTERM and self.drain_deadline is None and self.sidecar.started:
                self.sidecar.draining = True
                self.drain_began = time.monotonic()
                self.drain_deadline = self.drain_began + self.sidecar.server.drain_grace_s
                return  # not re-raised after serve(): a drained SIGTERM exits 0
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            tune_gc()
            if self.sidecar.warming:
                # The prewarm's workers (handles, pipes, futures) live as long as the replica: frozen too once it
                # is over, or a full GC pass over them stops the loop for tens of ms mid-traffic (runner/_heap.py).
                self._freeze_later = asyncio.get_running_loop().create_task(self._freeze_when_warm())
            if self.started and not self.should_exit and self.sidecar.started:
                self.ready_at = time.monotonic()
                ready_line(self.sidecar, self._address(), self.log_format)
                report_ready()   # serve --workers N: tell the parent (a no-op alone)

        async def _freeze_when_warm(self) -> None:
            await self.sidecar.warmed.wait()
            tune_gc()
            if self.sidecar.prewarm_report is not None:   # /readyz shows it
                self.sidecar.prewarm_report["frozen_objects"] = gc.get_freeze_count()

        def _address(self) -> str:
            """The address actually bound (``--port 0`` included)."""
            for srv in getattr(self, "servers", ()):
                for sock in srv.sockets or ():
                    host, port = sock.getsockname()[:2]
                    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
            return f"http://{self.config.host}:{self.config.port}"

        async def shutdown(self, sockets: Any = None) -> None:
            guard = getattr(self.sidecar, "guard", None)
            if guard is not None:
                guard.close_gates()
            if self.drain_deadline is not None and not self.drain_ended:
                self.drain_ended, self.inflight_left = time.monotonic(), self.sidecar.inflight
            try:
                await super().shutdown(sockets)
            finally:
                if self.ready_at is not None:
                    stop_line(self, self.log_format)

        async def on_tick(self, counter: int) -> bool:
            if counter % 10 == 0 and self.sidecar.metrics.multiprocess:   # every ~1 s (uvicorn ticks at 0.1 s)
                self.sidecar.metrics.refresh()   # serve --workers N: this process's share of the summed gauges
            if self.drain_deadline is not None and not self.should_exit:
                if self.sidecar.inflight == 0 or time.monotonic() >= self.drain_deadline:
                    self.drain_ended, self.inflight_left = time.monotonic(), self.sidecar.inflight
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


# Connection slots kept from the fd budget when the pool's size is derived from it (see share_fds).
MIN_CONNECTIONS = 1024
WARN_CONNECTIONS = 256   # fewer slots than this: `serve` says so at start, with what to change


def share_fds(cfg: ServeConfig, fd_limit: int | None) -> ServeConfig:
    """Keep descriptors for the gateway's connections when the pool is sized from the fd limit.

    Alone, a Runner sizes its pool to every descriptor above its reserve. In the sidecar the same descriptors
    hold the connections: at a hard limit of 1024 the pool took them all, 16 connection slots were left, and a
    slow tenant's 32 keep-alive flows were refused with the connection closed (benchmarks/sidecar_attack.py
    with ``--sidecar-nofile 1024``). Connections now get ``min(MIN_CONNECTIONS, half of what is above the
    reserve)`` and the pool the rest, within its memory budget; a configured ``runner.max_workers`` is kept.
    """
    if fd_limit is None or cfg.runner.max_workers is not None:
        return cfg
    usable = fd_limit - policy.FD_RESERVE - 16
    by_fds = max(1, (usable - min(MIN_CONNECTIONS, usable // 2)) // policy.FDS_PER_WORKER)
    budget = cfg.runner.worker_memory_budget_mb or policy.default_memory_budget_mb(policy.physical_memory_bytes())
    if budget // policy.WORKER_MEMORY_ESTIMATE_MB <= by_fds:
        return cfg
    return dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, max_workers=by_fds))


def share_budget(cfg: ServeConfig, slot: WorkerSlot | None) -> ServeConfig:
    """One of ``serve --workers N``'s processes: a 1/N share of the host's worker budget (at least 1 of each).

    The memory budget (``worker_memory_budget_mb``, else the runner's default from physical memory),
    ``max_workers``, the executions admitted to the CPU at once (``max_running``, resolved: the host's
    CPUs are shared too; 0, no limit, stays 0) and the queue and per-tenant caps where configured: N
    processes together keep to what one would, and a tenant's share of each process stays what it was
    (derived caps follow the capacity).
    """
    if slot is None or slot.count <= 1:
        return cfg
    r = cfg.runner
    budget = r.worker_memory_budget_mb or policy.default_memory_budget_mb(policy.physical_memory_bytes())
    max_workers = share_of(r.max_workers, slot)
    return dataclasses.replace(cfg, runner=dataclasses.replace(
        r, worker_memory_budget_mb=share_of(int(budget), slot), max_workers=max_workers,
        pool_size=min(r.pool_size, max_workers) if max_workers is not None else r.pool_size,
        max_queue=share_of(r.max_queue, slot), max_busy_per_tenant=share_of(r.max_busy_per_tenant, slot),
        max_queue_per_tenant=share_of(r.max_queue_per_tenant, slot),
        max_running=share_of(r.running_limit(), slot) if r.running_limit() else 0))


def _guarded_protocol(spec: ServerSpec, app: Sidecar, fd_limit: int | None) -> Any:
    """The gated, guarded protocol factory; the connection cap from the fd budget unless the config sets one."""
    from ._http_guard import Guard, connection_budget, gated_protocol

    cap = spec.max_connections
    guard = Guard(max_connections=cap if cap is not None else
                  (lambda: connection_budget(fd_limit, int(app.runner.stats().get("capacity") or 0))),
                  header_timeout_s=spec.header_timeout_s, max_head_bytes=spec.max_head_bytes,
                  max_headers=spec.max_headers, on_close=lambda r: app.metrics.connections_closed.labels(r).inc())
    app.metrics.watch_connections(lambda: guard.open, lambda: guard.max_connections)
    app.guard = guard   # the server's shutdown closes the connections still at the gate (uvicorn does not see them)
    return gated_protocol(guard)


def serve(config_path: str, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "warning",
          log_format: str = "text", sync_config: bool = False) -> int:
    """Run the sidecar until SIGTERM/SIGINT; the process's exit status.

    One line on stderr when it is ready to serve and one when it stopped (sidecar/_logs.py ``say``);
    ``log_format="json"`` turns those and every log line into JSON objects.
    """
    import uvicorn

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        say(log_format, f"actionpool serve: error: {exc}", level=logging.ERROR)
        return 2
    if cfg.server.token is None and not is_loopback(host):
        say(log_format, f"actionpool serve: error: {config_path}: server.token_env: not set, so the sidecar serves "
                        f"loopback only; --host {host} is not a loopback address", level=logging.ERROR)
        return 2
    # Before anything starts: the port and the store, each refused with one line that says what to do. One of
    # `serve --workers N`'s processes skips it: the parent checked both, and its siblings hold the port.
    slot = WorkerSlot.from_env()
    problem = start_problem(host, port, cfg.store_url, config_path) if slot is None else None
    if problem is not None:
        say(log_format, f"actionpool serve: error: {problem[1]}", level=logging.ERROR)
        return problem[0]
    from ._http_guard import connection_budget, raise_fd_limit

    fd_limit = raise_fd_limit()
    cfg = share_fds(share_budget(cfg, slot), fd_limit)
    slots = (connection_budget(fd_limit, cfg.runner.max_workers)
             if cfg.server.max_connections is None and cfg.runner.max_workers is not None else None)
    if fd_limit is not None and slots is not None and slots < WARN_CONNECTIONS:
        say(log_format, f"actionpool serve: warning: the fd limit ({fd_limit}) leaves {slots} connection slots "
                        f"beside {cfg.runner.max_workers} workers; raise the hard RLIMIT_NOFILE (systemd LimitNOFILE=, "
                        f"ulimit -Hn) or lower runner.max_workers", level=logging.WARNING)
    try:
        app = Sidecar(cfg)
    except ConfigError as exc:   # e.g. tracing configured without the otel extra installed
        say(log_format, f"actionpool serve: error: {config_path}: {exc}", level=logging.ERROR)
        return 2
    app.sync_config = sync_config   # applied at start (sidecar/_bootstrap.py)
    # httptools (the serve extra has it: about 0.1 ms less per request than h11 here) under the guard that
    # bounds every connection before the token is read (sidecar/_http_guard.py). The plain asyncio loop: the
    # runner's subprocess and signal handling are tested on it. No limit_concurrency: it answers 503 to every
    # new request once idle strangers fill it; the guard evicts them instead.
    ucfg = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level, access_log=False,
                          log_config=uvicorn_log_config(log_format, log_level) or uvicorn.config.LOGGING_CONFIG,
                          loop="asyncio", http=_guarded_protocol(cfg.server, app, fd_limit), ws="none",
                          timeout_keep_alive=cfg.server.keepalive_timeout_s,  # type: ignore[arg-type]
                          timeout_graceful_shutdown=max(1, int(cfg.server.drain_grace_s) + 1),
                          server_header=False, date_header=False)
    server = _uvicorn_server()(ucfg, app, log_format)
    # One of N: the port is shared with the siblings (SO_REUSEPORT; the kernel spreads connections over them).
    sockets = [reuseport_socket(host, port)] if slot is not None else None
    try:
        asyncio.run(server.serve(sockets=sockets))
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:   # uvicorn: the start failed (3); a config problem met at start is a bad config (2)
        return 2 if isinstance(getattr(app, "start_error", None), ConfigError) else int(exc.code or 3)
    finally:
        for sock in sockets or ():
            sock.close()
    if not app.started:
        return 1
    return 0
