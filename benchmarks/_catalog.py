"""What a run measures: phases, their rows, the ratios between rows, and the knobs.

One table, so the parent knows which rows a phase owes even when the phase's
process dies before reporting them (they then appear with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RowSpec:
    id: str
    title: str
    kind: str            # "latency" (1 client), "load" (N concurrent), "once" (one-off events), "memory"
    concurrency: int | str = 1


@dataclass(frozen=True)
class Phase:
    name: str            # selector for --only, e.g. "ppe" or "1"
    group: str           # "baselines" | "scenarios"
    target: str          # "module:function" run in the phase child
    rows: tuple[RowSpec, ...]
    aliases: tuple[str, ...] = field(default=())


C = "concurrency"  # knob name; the row specs below name the knob, the report fills the number

PHASES: tuple[Phase, ...] = (
    Phase("direct", "baselines", "actionpool.benchmarks.baselines:phase_direct", (
        RowSpec("direct.latency", "direct in-process call (the floor)", "latency"),
    )),
    Phase("ppe", "baselines", "actionpool.benchmarks.baselines:phase_ppe", (
        RowSpec("ppe.latency", "ProcessPoolExecutor(2) round trip", "latency"),
        RowSpec("ppe.throughput", "ProcessPoolExecutor(2), 64 in flight", "load", C),
    )),
    Phase("pebble", "baselines", "actionpool.benchmarks.baselines:phase_pebble", (
        RowSpec("pebble.latency", "pebble.ProcessPool(2) + timeout", "latency"),
        RowSpec("pebble.throughput", "pebble.ProcessPool(2) + timeout, 64 in flight", "load", C),
    )),
    Phase("subprocess", "baselines", "actionpool.benchmarks.baselines:phase_subprocess", (
        RowSpec("subprocess.latency", "fresh python subprocess per call (codejail way)", "latency"),
        RowSpec("subprocess.throughput", "fresh python subprocess per call, 64 in flight", "load", C),
    ), aliases=("codejail",)),
    Phase("pipe", "baselines", "actionpool.benchmarks.baselines:phase_pipe", (
        RowSpec("pipe.latency", "raw os.pipe echo RTT, 64 B (physical limit)", "latency"),
        RowSpec("pipe.throughput", "raw os.pipe echo, 64 messages in flight", "load", C),
    )),
    Phase("1", "scenarios", "actionpool.benchmarks.scenarios:phase_s1", (
        RowSpec("s1.latency", "S1 trivial post-login action (3 api calls), 1 client", "latency"),
        RowSpec("s1.latency_js", "S1 the same action in JavaScript, 1 client", "latency"),
    ), aliases=("s1",)),
    Phase("2", "scenarios", "actionpool.benchmarks.scenarios:phase_s2", (
        RowSpec("s2.throughput", "S2 trivial action, 64 concurrent flows, 2 workers", "load", C),
    ), aliases=("s2",)),
    Phase("3", "scenarios", "actionpool.benchmarks.scenarios:phase_s3", (
        RowSpec("s3.latency", "S3 flow of three actions, 1 client", "latency"),
    ), aliases=("s3",)),
    Phase("4", "scenarios", "actionpool.benchmarks.scenarios:phase_s4", (
        RowSpec("s4.io_cold", "S4 fetch of a 50 ms server, N flows at once, cold pool", "load", "io_flows"),
        RowSpec("s4.io_warm", "S4 same again, workers already spawned", "load", "io_flows"),
        RowSpec("s4.io_warm_small", "S4 warm, fewer flows at once (50)", "load", "io_flows_small"),
        RowSpec("s4.aiohttp_floor", "S4 floor: aiohttp alone, N concurrent GETs, no runner", "load", "io_flows"),
    ), aliases=("s4",)),
    Phase("5", "scenarios", "actionpool.benchmarks.scenarios:phase_s5", (
        RowSpec("s5.cold_start", "S5 cold start: no idle worker -> finished flow", "once"),
        RowSpec("s5.timeout_kill", "S5 flow of a spinning action (timeout 0.2 s)", "once"),
        RowSpec("s5.replacement", "S5 timeout kill -> next flow finished", "once"),
    ), aliases=("s5",)),
    Phase("6", "scenarios", "actionpool.benchmarks.scenarios:phase_s6", (
        RowSpec("s6.memory_idle", "S6 memory of idle warm workers (pool of 2)", "memory"),
        RowSpec("s6.memory_many", "S6 memory of many warm workers", "memory", "warm_workers"),
    ), aliases=("s6",)),
    Phase("7", "scenarios", "actionpool.benchmarks.scenarios:phase_s7", (
        RowSpec("s7.many_tenants", "S7 many tenants x actions, Zipf traffic, steady state", "load", C),
        RowSpec("s7.open_loop", "S7 open loop: Poisson arrivals at 50% of S7's capacity", "load", "open_flows"),
        RowSpec("s9.cold_steady", "S9 first flow of a never-seen action, right after S7", "once"),
    ), aliases=("s7", "s9", "9")),
    Phase("8", "scenarios", "actionpool.benchmarks.scenarios:phase_s8", (
        RowSpec("s8.spinning_tenant", "S8 S7 + one tenant's spinning flows: normal flows", "load", C),
    ), aliases=("s8",)),
    Phase("10", "scenarios", "actionpool.benchmarks.scenarios:phase_s10", (
        RowSpec("s10.restart_cold", "S10 restarted runner, first flows of S7's mix, no prewarm", "load", C),
        RowSpec("s10.restart_prewarm", "S10 the same after Runner.prewarm (hottest first)", "load", C),
    ), aliases=("s10", "warm")),
)

ROWS: dict[str, RowSpec] = {r.id: r for p in PHASES for r in p.rows}


@dataclass(frozen=True)
class RatioSpec:
    """``row.metric / ref.ref_metric``, shown on ``row``'s line of the table as "<value>x <label>"."""

    key: str
    row: str
    metric: str
    ref: str
    ref_metric: str
    label: str


RATIOS: tuple[RatioSpec, ...] = (
    # baselines against the physical limit
    RatioSpec("ppe_p50_vs_pipe_p50", "ppe.latency", "p50_ms", "pipe.latency", "p50_ms", "pipe p50"),
    RatioSpec("pebble_p50_vs_pipe_p50", "pebble.latency", "p50_ms", "pipe.latency", "p50_ms", "pipe p50"),
    RatioSpec("subprocess_p50_vs_pipe_p50", "subprocess.latency", "p50_ms", "pipe.latency", "p50_ms", "pipe p50"),
    RatioSpec("ppe_tput_vs_pipe_tput", "ppe.throughput", "throughput_per_s", "pipe.throughput",
              "throughput_per_s", "pipe tput"),
    RatioSpec("pebble_tput_vs_ppe_tput", "pebble.throughput", "throughput_per_s", "ppe.throughput",
              "throughput_per_s", "ppe tput"),
    RatioSpec("subprocess_tput_vs_ppe_tput", "subprocess.throughput", "throughput_per_s", "ppe.throughput",
              "throughput_per_s", "ppe tput"),
    # scenario 1: single-client latency
    RatioSpec("s1_p50_vs_ppe_p50", "s1.latency", "p50_ms", "ppe.latency", "p50_ms", "ppe p50"),
    RatioSpec("s1_p50_vs_pebble_p50", "s1.latency", "p50_ms", "pebble.latency", "p50_ms", "pebble p50"),
    RatioSpec("s1_p50_vs_pipe_p50", "s1.latency", "p50_ms", "pipe.latency", "p50_ms", "pipe RTT"),
    RatioSpec("s1_p50_vs_subprocess_p50", "s1.latency", "p50_ms", "subprocess.latency", "p50_ms", "subprocess p50"),
    RatioSpec("s1_p99_vs_ppe_p99", "s1.latency", "p99_ms", "ppe.latency", "p99_ms", "ppe p99"),
    # scenario 2: throughput
    RatioSpec("s2_tput_vs_pebble_tput", "s2.throughput", "throughput_per_s", "pebble.throughput",
              "throughput_per_s", "pebble tput"),
    RatioSpec("s2_tput_vs_ppe_tput", "s2.throughput", "throughput_per_s", "ppe.throughput",
              "throughput_per_s", "ppe tput"),
    RatioSpec("s2_tput_vs_subprocess_tput", "s2.throughput", "throughput_per_s", "subprocess.throughput",
              "throughput_per_s", "subprocess tput"),
    # scenario 3: cost of two more actions in the same flow
    RatioSpec("s3_p50_vs_s1_p50", "s3.latency", "p50_ms", "s1.latency", "p50_ms", "S1 p50"),
    # scenario 4: I/O-bound flows against the fastest Python client alone (the floor)
    RatioSpec("s4_warm_tput_vs_aiohttp_tput", "s4.io_warm", "throughput_per_s", "s4.aiohttp_floor",
              "throughput_per_s", "aiohttp floor"),
    # ... and against aiohttp opening a connection per request, as api.fetch must to S4's 127.0.0.1 upstream
    RatioSpec("s4_warm_tput_vs_aiohttp_close_tput", "s4.io_warm", "throughput_per_s", "s4.aiohttp_floor",
              "extra.close_req_per_s", "aiohttp floor with Connection: close"),
    # scenario 5: a cold worker against a cold interpreter
    RatioSpec("s5_cold_p50_vs_subprocess_p50", "s5.cold_start", "p50_ms", "subprocess.latency", "p50_ms",
              "subprocess p50"),
    RatioSpec("s5_replacement_p50_vs_cold_p50", "s5.replacement", "p50_ms", "s5.cold_start", "p50_ms",
              "cold start p50"),
    # scenarios 7-9: many tenants against one hot action; a spinning tenant against none; cold in the steady state
    RatioSpec("s7_tput_vs_s2_tput", "s7.many_tenants", "throughput_per_s", "s2.throughput", "throughput_per_s",
              "S2 tput"),
    RatioSpec("s7_p99_vs_s2_p99", "s7.many_tenants", "p99_ms", "s2.throughput", "p99_ms", "S2 p99"),
    RatioSpec("s8_p50_vs_s7_p50", "s8.spinning_tenant", "p50_ms", "s7.many_tenants", "p50_ms", "S7 p50"),
    RatioSpec("s8_p99_vs_s7_p99", "s8.spinning_tenant", "p99_ms", "s7.many_tenants", "p99_ms", "S7 p99"),
    RatioSpec("s7_open_p99_vs_s7_p99", "s7.open_loop", "p99_ms", "s7.many_tenants", "p99_ms", "S7 closed-loop p99"),
    RatioSpec("s10_prewarm_p99_vs_s7_p99", "s10.restart_prewarm", "p99_ms", "s7.many_tenants", "p99_ms",
              "steady-state p99"),
    RatioSpec("s10_cold_p99_vs_s7_p99", "s10.restart_cold", "p99_ms", "s7.many_tenants", "p99_ms",
              "steady-state p99"),
    RatioSpec("s9_p50_vs_s5_cold_p50", "s9.cold_steady", "p50_ms", "s5.cold_start", "p50_ms", "fresh-runner cold p50"),
)

# The many-tenants workload of S7-S9 (also `actionpool stress --tenants/--actions-per-tenant/--zipf`).
TENANT_KNOBS: dict[str, Any] = {
    "tenants": 300,                 # S7-S9: tenants of the mix
    "actions_per_tenant": "1-3",    # each tenant has N or LOW-HIGH actions (seeded)
    "zipf": 1.1,                    # tenant of rank k gets traffic ~ 1/k**s
    "spin_share": 0.05,             # S8: share of flows from the one spinning tenant
    "spin_timeout_s": 1.0,          # S8: the spinning action's own time limit
}


# Run sizes. --quick must finish the whole run (baselines + scenarios) in under a minute on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "iterations": 300,            # single-client calls for ppe/pebble/pipe/S1/S3 (direct: 10x)
        "tasks": 256,                 # total submissions of a 64-in-flight throughput row
        "subprocess_iterations": 10,  # a fresh interpreter per call is ~100x slower: fewer
        "subprocess_tasks": 64,
        "concurrency": 64,
        "io_flows": 100,              # S4
        "io_flows_small": 50,         # S4 warm_small (at most io_flows)
        "io_delay_s": 0.05,
        "cold_iterations": 5,         # S5
        "warm_workers": 50,           # S6
        "many_tasks": 600,            # S7, S8: measured flows (after as many warm-up flows)
        "open_flows": 600,            # S7 open loop: scheduled flows (at most 20 s of schedule)
        "restart_flows": 300,         # S10: first flows of a restarted runner, per round
        "restart_reps": 1,            # S10: rounds of each (with and without prewarm), interleaved
        **TENANT_KNOBS,
        "phase_timeout_s": 45.0,
    },
    "full": {
        "iterations": 2000,
        "tasks": 2048,
        "subprocess_iterations": 50,
        "subprocess_tasks": 128,
        "concurrency": 64,
        "io_flows": 500,
        "io_flows_small": 50,
        "io_delay_s": 0.05,
        "cold_iterations": 20,
        "warm_workers": 200,
        "many_tasks": 3000,
        "open_flows": 3000,
        "restart_flows": 1000,
        "restart_reps": 2,
        **TENANT_KNOBS,
        "phase_timeout_s": 240.0,
    },
}
