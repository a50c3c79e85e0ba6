"""Every tunable of the runner, in one place.

``RunnerConfig`` is frozen; derive a variant with ``dataclasses.replace``.
Per-action overrides of limits come from ``Action(limits=...)`` and are merged
with :meth:`Limits.merged`. ``validate()`` raises :class:`ConfigError` naming
the bad field, so a typo fails at start-up and not on the first login.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import ConfigError

# Executions admitted to the CPU per usable CPU with max_running=None (the default): 16 on 2 cores is what
# was measured (docs/design.md, "Admission to the CPU").
RUNNING_PER_CPU = 8

SandboxMode = Literal["strict", "degraded", "off"]
WorkerBinding = Literal["action", "tenant"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of one action execution (and of the worker that runs it)."""

    action_timeout_s: float = 5.0       # wall clock per action; expiry kills the worker
    flow_timeout_s: float = 20.0        # wall clock for the whole flow
    memory_mb: int = 128                # memory cap per worker
    cpu_seconds: int = 30               # RLIMIT_CPU per worker (cumulative across executions)
    max_open_files: int = 64            # RLIMIT_NOFILE
    max_log_entries: int = 100          # api.log/print/console entries per execution
    max_log_message_bytes: int = 4096   # the reference's truncation point
    max_frame_bytes: int = 1 << 20      # one msgpack frame in either direction
    max_output_bytes: int = 4 << 20     # all bytes a worker may send during one execution
    max_calls: int = 1000               # api calls per execution
    cpu_limit_ms: float | None = None   # CPU time per execution (denial.kind cpu_limit); None: wall clock only
    max_queued_reply_bytes: int = 2 << 20  # replies queued to a worker that does not read its pipe
    supervisor_cpu_ms: int = 500        # supervisor CPU time one execution's messages and api calls may use
    max_values: int = 200_000           # values (objects, arrays, items) in one execution's api arguments
    # Executions of this action one worker may run at once, each joining only while all those in it
    # await api.fetch (Python actions; not with cpu_limit_ms). 1: one at a time, as a process per
    # execution in flight. A kill then ends all of them (the others get worker_lost): docs/design.md.
    co_run: int = 16

    def merged(self, overrides: dict[str, Any] | None) -> "Limits":
        if not overrides:
            return self
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        out = dataclasses.replace(self, **overrides)
        out.validate()
        return out

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "cpu_limit_ms":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"limits.{f.name} must be a positive number, got {v!r}")
        if self.memory_mb < 32:
            raise ConfigError("limits.memory_mb must be at least 32 (the interpreter itself needs it)")
        if type(self.co_run) is not int or not 1 <= self.co_run <= 256:
            raise ConfigError(f"limits.co_run must be a whole number from 1 to 256, got {self.co_run!r}")
        if self.max_log_message_bytes > self.max_frame_bytes:
            raise ConfigError("limits.max_log_message_bytes cannot exceed limits.max_frame_bytes")
        if self.max_queued_reply_bytes < self.max_frame_bytes + 4:
            raise ConfigError("limits.max_queued_reply_bytes must hold at least one frame (max_frame_bytes + 4)")


@dataclass(frozen=True)
class FetchConfig:
    """Outbound HTTP done by the supervisor on behalf of actions."""

    allow_hosts: tuple[str, ...] = ()                    # for every tenant: exact hosts or "*.example.com"
    tenant_allow_hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    timeout_s: float = 5.0
    max_response_bytes: int = 1 << 20
    max_request_bytes: int = 256 << 10
    max_redirects: int = 5
    max_response_header_lines: int = 256     # per response head (aiohttp's max_headers)
    max_response_head_bytes: int = 64 << 10
    max_concurrent_per_execution: int = 16
    # Capacity per tenant, so one tenant's slow hosts or DNS never take another's (runner/_fetch_capacity.py).
    max_concurrent_per_tenant: int = 64      # fetches in flight (= that tenant's connection pool size)
    max_queued_per_tenant: int = 1024        # fetches (or lookups) waiting beyond that; more fail at once
    max_keepalive_per_tenant: int = 16       # idle connections a tenant's pool keeps open
    max_dns_per_tenant: int = 4              # DNS lookups in flight (each holds one resolver thread)
    dns_threads: int = 16                    # the resolver's own thread pool (not asyncio's default executor)
    dns_cache_s: float = 10.0                # a tenant reuses an answer this long (re-vetted on every use)
    max_dns_answers_per_tenant: int = 64     # answers kept per tenant (LRU)
    max_tenant_pools: int = 256              # per-tenant pools kept (LRU); idle ones beyond are closed
    pool_idle_s: float = 30.0                # a tenant's pool unused this long is closed
    # Offline mode ("METHOD URL" -> {status, headers, body}): answers from here, never the network.
    stub: dict[str, Any] | None = None
    # Values replaced by "[redacted]" in a request's "METHOD URL" before it is looked up in the stub:
    # a stub built from redacted run history (``actionpool replay``) matches requests carrying the real ones.
    stub_redact: tuple[str, ...] = ()

    def hosts_for(self, tenant: str) -> tuple[str, ...]:
        return self.allow_hosts + tuple(self.tenant_allow_hosts.get(tenant, ()))


@dataclass(frozen=True)
class SandboxConfig:
    """Which OS protections a worker applies, and which ones are required.

    ``strict`` (the default): the runner refuses to start unless every protection in
    ``require`` is available. ``degraded``: apply what the host offers, warn
    loudly about the rest. ``off``: rlimits only (tests of the bare pipeline).
    """

    mode: SandboxMode = "strict"    # safe by default: refuse to run untrusted code without the required protections
    require: tuple[str, ...] = ("seccomp", "landlock", "no_new_privs", "rlimits")
    network_namespace: bool = True
    fs_view: bool = True            # fork template: a minimal filesystem view (no host paths, no /proc) where the host allows
    drop_uid: int = 65534           # applied when the supervisor runs as root
    drop_gid: int = 65534
    cgroups: bool = True            # a memory cgroup per worker where the host allows (root or delegation)
    address_space_factor: int = 4   # with a cgroup, RLIMIT_AS = memory * factor + 256 MiB (a guard, not the cap)


@dataclass(frozen=True)
class RunnerConfig:
    """Tunables of one :class:`runner.Runner`."""

    pool_size: int = 2                       # warm idle workers kept ready
    max_workers: int | None = None           # cap on live workers; None: worker_memory_budget_mb / ~6 MiB
    worker_memory_budget_mb: int | None = None  # memory for workers when max_workers is None; None: 1/4 of RAM
    max_busy_per_tenant: int | None = None   # workers one tenant holds at once; None: 3/4 of max_workers, never all (if >= 2)
    max_queue_per_tenant: int | None = None  # flows of one tenant waiting; None: 3/4 of max_queue (all if < 8)
    max_executions_per_worker: int = 1000    # recycle a worker after this many executions; 1 = a fresh process each
    # "action": a worker serves one action of one tenant (tenant, slug, source and secrets; no action ever
    # sees another's module globals or secrets). "tenant": any action of its tenant, which then share
    # module state and can read each other's secrets (fewer workers; the tenant is one trust domain).
    worker_binding: WorkerBinding = "action"
    max_queue: int = 1000                    # flows waiting for a worker before new ones are refused
    queue_timeout_s: float = 10.0            # how long a flow may wait for a worker
    fair_wait_s: float = 0.5                 # a flow waiting this long gets the next start slot, whatever its tenant's share
    spawn_concurrency: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) or 2)  # workers starting at once: one per usable CPU
    idle_timeout_s: float = 60.0             # idle workers beyond pool_size are retired after this
    min_idle_per_tenant: int = 0             # idle workers kept bound to each tenant that has flows
    worker_start_timeout_s: float = 10.0     # spawn to hello
    kill_grace_s: float = 2.0                # close(): in-flight flows get this long before SIGKILL
    denial_message: str = "Access denied."   # what the user sees when an action gives none
    cache_url: str = "memory://"
    limits: Limits = field(default_factory=Limits)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    python: str | None = None                # interpreter for workers; default sys.executable
    fork_template: bool = True               # fork workers from a clean template (fast); False: spawn each
    # An execution past this much CPU time runs under SCHED_IDLE until it ends, so short executions of
    # other tenants preempt it (runner/_cpu.py). 0: never demote.
    cpu_budget_ms: float = 50.0
    # Workers' scheduling groups run this much nicer than the supervisor (0-18; a demoted spinner's goes to 19),
    # which every flow waits on, so it preempts them; they also yield to every other process (docs/design.md).
    worker_nice: int = 0
    # Workers run SCHED_BATCH: woken by an execute request, a worker does not preempt the supervisor (which
    # every flow waits on) but waits for a free CPU, keeping its full share against other processes.
    worker_batch: bool = False
    # Executions admitted to the CPU at once, the rest first-come-first-served (runner/_admission.py); a token
    # ends at the execution's first request (a fetch) or after running_hold_ms, so I/O-bound and long
    # executions never block admission. None (default): 8 per usable CPU (RUNNING_PER_CPU); 0: no limit.
    max_running: int | None = None
    running_hold_ms: float = 5.0
    # How long a flow of an action with Limits.co_run > 1 may wait for a busy worker of it to park on a fetch
    # and take it (runner/_corun.py) before it takes a worker of the pool instead.
    co_run_wait_ms: float = 50.0

    def running_limit(self) -> int:
        """``max_running`` resolved: executions admitted at once (0: no limit)."""
        if self.max_running is not None:
            return self.max_running
        return RUNNING_PER_CPU * (len(os.sched_getaffinity(0)) or 2)

    def validate(self) -> "RunnerConfig":
        self.limits.validate()
        for name in ("pool_size", "max_queue", "min_idle_per_tenant"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        nice = self.worker_nice
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 18:
            raise ConfigError(f"worker_nice must be an integer from 0 to 18, got {self.worker_nice!r}")
        if type(self.worker_batch) is not bool:
            raise ConfigError(f"worker_batch must be true or false, got {self.worker_batch!r}")
        m = self.max_running
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ConfigError(f"max_running must be a non-negative integer or None, got {m!r}")
        h = self.running_hold_ms
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or not 0 < h <= 1000:
            raise ConfigError(f"running_hold_ms must be a number of milliseconds in (0, 1000], got {h!r}")
        for name in ("max_executions_per_worker", "spawn_concurrency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_workers", "worker_memory_budget_mb", "max_busy_per_tenant", "max_queue_per_tenant"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if self.max_workers is not None and self.pool_size > self.max_workers:
            raise ConfigError("pool_size cannot exceed max_workers")
        for name in ("queue_timeout_s", "worker_start_timeout_s", "kill_grace_s", "idle_timeout_s", "cpu_budget_ms",
                     "fair_wait_s", "co_run_wait_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {v!r}")
        if self.worker_binding not in ("action", "tenant"):
            raise ConfigError(f"worker_binding must be 'action' or 'tenant', got {self.worker_binding!r}")
        if self.sandbox.mode not in ("strict", "degraded", "off"):
            raise ConfigError(f"sandbox.mode must be strict, degraded or off, got {self.sandbox.mode!r}")
        if not isinstance(self.denial_message, str) or not self.denial_message:
            raise ConfigError("denial_message must be a non-empty string")
        if not (self.cache_url.startswith("memory://") or self.cache_url.startswith("redis://")):
            raise ConfigError(f"cache_url must be memory:// or redis://host:port/db, got {self.cache_url!r}")
        f = self.fetch
        if not (0 < f.timeout_s <= 60) or f.max_response_bytes <= 0 or f.max_request_bytes <= 0:
            raise ConfigError("fetch limits must be positive (timeout at most 60 s)")
        for name in ("max_response_header_lines", "max_response_head_bytes",
                     "max_concurrent_per_execution", "max_concurrent_per_tenant", "max_queued_per_tenant",
                     "max_keepalive_per_tenant", "max_dns_per_tenant", "dns_threads", "max_dns_answers_per_tenant",
                     "max_tenant_pools"):
            v = getattr(f, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"fetch.{name} must be a positive integer, got {v!r}")
        for name in ("pool_idle_s", "dns_cache_s"):
            v = getattr(f, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"fetch.{name} must be a non-negative number, got {v!r}")
        if f.stub is not None:
            from ._fetch_stub import compile_stub

            compile_stub(f.stub)
        if not isinstance(f.stub_redact, tuple) or not all(isinstance(v, str) and v for v in f.stub_redact):
            raise ConfigError("fetch.stub_redact must be a tuple of non-empty strings")
        return self
