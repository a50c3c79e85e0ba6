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
import dataclasses
import gc
import logging
import signal
import sys
import time
from typing import Any
from types import FrameType

from ..runner import ConfigError
from ..runner import hosting as policy
from ._config import ServeConfig, ServerSpec, is_loopback, load_config
from ._server import Sidecar
from ._preflight import start_problem

log = logging.getLogger("actionpool.serve")


def tune_gc() -> None:
    """Keep what exists once the sidecar has started out of every later pass of the cyclic GC.

    Every pass of the GC stops the one loop that runs every tenant's flows and kill timers, and a full
    (generation 2) pass walks every tracked object: under 5,000 connections one took 77-204 ms
    (benchmarks/sidecar_attack.py, with a gc.callbacks probe). The modules, the runner and the config (about
    46,000 objects at start) never become garbage, so they are frozen out of those passes. A larger young
    threshold was tried and dropped: young passes then took 20-44 ms each instead of a fraction of one.
    """
    gc.collect()
    gc.freeze()


def _uvicorn_server() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, with SIGTERM starting a drain rather than an immediate stop."""

        def __init__(self, config: "uvicorn.Config", app: Sidecar) -> None:
            super().__init__(config)
            self.sidecar = app
            self.drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and self.drain_deadline is None and self.sidecar.started:
                self.sidecar.draining = True
                self.drain_deadline = time.monotonic() + self.sidecar.server.drain_grace_s
                return  # not re-raised after serve(): a drained SIGTERM exits 0
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            tune_gc()

        async def shutdown(self, sockets: Any = None) -> None:
            guard = getattr(self.sidecar, "guard", None)
            if guard is not None:
                guard.close_gates()
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                if self.sidecar.inflight == 0 or time.monotonic() >= self.drain_deadline:
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


def serve(config_path: str, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "warning") -> int:
    """Run the sidecar until SIGTERM/SIGINT; the process's exit status."""
    import uvicorn

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        print(f"actionpool serve: error: {exc}", file=sys.stderr)
        return 2
    if cfg.server.token is None and not is_loopback(host):
        print(f"actionpool serve: error: {config_path}: server.token_env: not set, so the sidecar serves loopback "
              f"only; --host {host} is not a loopback address", file=sys.stderr)
        return 2
    # Before anything starts: the port and the store, each refused with one line that says what to do.
    problem = start_problem(host, port, cfg.store_url, config_path)
    if problem is not None:
        print(f"actionpool serve: error: {problem[1]}", file=sys.stderr)
        return problem[0]
    from ._http_guard import connection_budget, raise_fd_limit

    fd_limit = raise_fd_limit()
    cfg = share_fds(cfg, fd_limit)
    slots = (connection_budget(fd_limit, cfg.runner.max_workers)
             if cfg.server.max_connections is None and cfg.runner.max_workers is not None else None)
    if fd_limit is not None and slots is not None and slots < WARN_CONNECTIONS:
        print(f"actionpool serve: warning: the fd limit ({fd_limit}) leaves {slots} connection slots beside "
              f"{cfg.runner.max_workers} workers; raise the hard RLIMIT_NOFILE (systemd LimitNOFILE=, ulimit -Hn) "
              f"or lower runner.max_workers", file=sys.stderr)
    app = Sidecar(cfg)
    # httptools (the serve extra has it: about 0.1 ms less per request than h11 here) under the guard that
    # bounds every connection before the token is read (sidecar/_http_guard.py). The plain asyncio loop: the
    # runner's subprocess and signal handling are tested on it. No limit_concurrency: it answers 503 to every
    # new request once idle strangers fill it; the guard evicts them instead.
    ucfg = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level, access_log=False,
                          loop="asyncio", http=_guarded_protocol(cfg.server, app, fd_limit), ws="none",
                          timeout_keep_alive=cfg.server.keepalive_timeout_s,  # type: ignore[arg-type]
                          timeout_graceful_shutdown=max(1, int(cfg.server.drain_grace_s) + 1),
                          server_header=False, date_header=False)
    server = _uvicorn_server()(ucfg, app)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        return 130
    if not app.started:
        return 1
    print("actionpool serve: stopped", file=sys.stderr)
    return 0
