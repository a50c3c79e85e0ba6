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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..runner import DENIAL_KINDS

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


class _StoreCollector(Collector):
    """The store's health, bad records and replica agreement, and the action cache's bytes (scrape time)."""

    def __init__(self, store: Callable[[], dict[str, Any]], cache: Callable[[], dict[str, int]] | None) -> None:
        self._store, self._cache = store, cache

    def collect(self) -> Iterator[Any]:
        s = self._store()
        yield GaugeMetricFamily("actionpool_store_up", "1 while the store (Redis) answers; 0: degraded, serving the "
                                "loaded versions", value=1 if s["up"] else 0)
        yield GaugeMetricFamily("actionpool_store_degraded_seconds", "Seconds since the store stopped answering "
                                "(0 while up)", value=s["down_seconds"])
        yield CounterMetricFamily("actionpool_store_outages", "Times the store became unreachable",
                                  value=s["outages"])
        yield CounterMetricFamily("actionpool_store_bad_records", "Malformed store records skipped",
                                  value=s["bad_records"])
        yield CounterMetricFamily("actionpool_store_history_dropped", "Run records not written (store down)",
                                  value=s["history_dropped"])
        yield CounterMetricFamily("actionpool_store_history_truncated", "Run records larger than a tenant's "
                                  "history_max_bytes, stored as a marked stub", value=s["history_truncated"])
        yield CounterMetricFamily("actionpool_store_restores", "Times this replica re-wrote its versions into a "
                                  "store that came back empty", value=s["restores"])
        yield GaugeMetricFamily("actionpool_store_replicas_disagreeing", "Other replicas whose loaded versions "
                                "differ from this one's (two checks in a row)", value=s["disagreeing"])
        if self._cache is not None:
            g = GaugeMetricFamily("actionpool_action_cache_bytes", "Built actions and drafts cached, by tenant",
                                  labels=["tenant"])
            for tenant, n in sorted(self._cache().items()):
                g.add_metric([tenant], n)
            yield g


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], store: Callable[[], dict[str, Any]] | None = None,
                 cache: Callable[[], dict[str, int]] | None = None) -> None:
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
        self.connections_closed = Counter("actionpool_connections_closed_by_guard",
                                          "Connections the sidecar closed before or between requests, by reason "
                                          "(sidecar/_http_guard.py)", ["reason"], registry=r)
        self.connections_open = Gauge("actionpool_connections_open", "HTTP connections open", registry=r)
        self.connections_max = Gauge("actionpool_connections_max", "Open connections allowed (server.max_connections "
                                     "or the fd budget)", registry=r)
        r.register(_RunnerCollector(stats))
        if store is not None:
            r.register(_StoreCollector(store, cache))

    def watch_connections(self, open_count: Callable[[], int], cap: Callable[[], int]) -> None:
        """Read the connection gauges from the guard's table at scrape time."""
        self.connections_open.set_function(open_count)
        self.connections_max.set_function(cap)

    def flow(self, tenant: str, trigger: str, result: dict[str, Any], seconds: float) -> None:
        self.flows.labels(tenant, trigger, result["outcome"]).inc()
        denial = result["denial"]
        if denial is not None:
            # A label value is kept for the life of the process and shown on /metrics: only the known kinds
            # (runner/_errors.py DenialKind), never a string a worker running tenant code might have sent.
            self.denials.labels(str(denial["kind"]) if denial["kind"] in DENIAL_KINDS else "other").inc()
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
