"""Prometheus metrics of one sidecar process, through ``prometheus-client``.

Counters and the duration histogram are updated per flow; the pool gauges
(workers live/idle/starting, template restarts, event-loop lag) are read
from ``Runner.stats()`` at scrape time by a custom collector, so a
scrape costs one dict and the flow path nothing. Each app has its own
registry (tests run several in one process).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created samples double the output and nothing here reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Denial kinds whose worker was killed (or died); a failed-open action's kind is in its "failed open: KIND:" log.
KILL_KINDS = frozenset({"timeout", "flow_timeout", "memory_limit", "cpu_limit", "output_limit", "protocol_error",
                        "worker_crash"})
_FAILED_OPEN = re.compile(r"^failed open: (\w+): ")

# Runner.stats() key -> (metric name, help)
_GAUGES = {
    "live": ("actionpool_workers_live", "Worker processes alive"),
    "idle": ("actionpool_workers_idle", "Workers idle and ready"),
    "starting": ("actionpool_workers_starting", "Workers being started"),
    "busy": ("actionpool_workers_busy", "Workers running an execution"),
    "waiting": ("actionpool_flows_waiting", "Flows waiting for a worker"),
    "flows_in_flight": ("actionpool_flows_in_flight", "Flows begun and not yet answered"),
}


class _RunnerCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        for key, (name, doc) in _GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(name, doc, value=s[key])
        if "discarded" in s:
            yield CounterMetricFamily("actionpool_workers_discarded", "Workers gone for any reason (killed, crashed, "
                                      "recycled, retired)", value=s["discarded"])
        if "template_respawns" in s:
            yield CounterMetricFamily("actionpool_template_restarts", "Fork template restarts",
                                      value=s["template_respawns"])
        if isinstance(s.get("loop_lag_ms"), (int, float)):   # the Runner's own watcher (runner/_lag.py)
            yield GaugeMetricFamily("actionpool_event_loop_lag_seconds", "Event-loop lag (latest sample)",
                                    value=s["loop_lag_ms"] / 1000.0)


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.flows = Counter("actionpool_flows", "Flows answered", ["tenant", "trigger", "outcome"], registry=r)
        self.denials = Counter("actionpool_denials", "Denied flows, by denial kind", ["kind"], registry=r)
        self.duration = Histogram("actionpool_flow_duration_seconds", "Flow duration in the sidecar",
                                  buckets=BUCKETS, registry=r)
        self.kills = Counter("actionpool_worker_kills", "Workers killed (or dead) during a flow, by kind", ["kind"],
                             registry=r)
        self.failed_open = Counter("actionpool_actions_failed_open", "Action failures that let the flow go on",
                                   ["tenant", "slug"], registry=r)
        self.rejected = Counter("actionpool_requests_rejected", "Requests refused before a flow ran, by status",
                                ["status"], registry=r)
        self.shadow_runs = Counter("actionpool_shadow_runs", "Shadow runs beside the live version",
                                   ["tenant", "slug", "result"], registry=r)
        r.register(_RunnerCollector(stats))

    def flow(self, tenant: str, trigger: str, result: dict[str, Any], seconds: float) -> None:
        self.flows.labels(tenant, trigger, result["outcome"]).inc()
        denial = result["denial"]
        if denial is not None:
            self.denials.labels(str(denial["kind"])).inc()
            if denial["kind"] in KILL_KINDS:
                self.kills.labels(str(denial["kind"])).inc()
        opened = {a["slug"] for a in result["actions"] if a["status"] == "failed_open"}
        for slug in opened:
            self.failed_open.labels(tenant, slug).inc()
        if opened:
            for entry in result["logs"]:
                m = _FAILED_OPEN.match(entry["message"]) if entry["action"] in opened else None
                if m is not None and m.group(1) in KILL_KINDS:
                    self.kills.labels(m.group(1)).inc()
        self.duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
