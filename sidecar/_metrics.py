"""Prometheus metrics of one sidecar process, through ``prometheus-client``.

Counters and the duration histograms are updated per flow; the pool gauges
(workers live/idle/starting, template restarts, event-loop lag) are read
from ``Runner.stats()`` at scrape time by a custom collector, so a
scrape costs one dict and the flow path nothing. Each app has its own
registry (tests run several in one process).

Tenants are created at runtime, so a label per tenant would grow without
bound (every series is kept for the life of the process and sent on every
scrape). Only the busiest ``server.metrics_top_tenants`` tenants get a label
of their own (:class:`TopTenants`), and within them at most
ACTIONS_PER_TENANT action slugs; everything else is counted under
``tenant="_other"`` / ``slug="_other"`` (a name no tenant or slug can have).

Under ``serve --workers N`` (sidecar/_workers.py) prometheus-client runs in its multiprocess mode:
counters and histograms live in memory-mapped files that ``/metrics`` of any process sums, and the
scrape-time values (pool, store, connections, the list-based latency histograms) are written there by
:class:`_ProcessMirror` every ~1 s and at each scrape.
"""

from __future__ import annotations

import bisect
import re
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import values as _values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..runner import DENIAL_KINDS

disable_created_metrics()  # the *_created samples double the output and nothing here reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Per tenant and per action: 1 ms (a warm Python action) to 10 s (the longest action timeout one would set);
# fewer buckets than the process-wide histogram, as these are multiplied by the labelled tenants and actions.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OTHER = "_other"            # the label of every tenant (or slug) without one of its own: not a valid name
TOP_TENANTS = 20            # default of server.metrics_top_tenants
ACTIONS_PER_TENANT = 16     # action slugs with a label of their own, per labelled tenant (first seen)
WINDOW_S = 60.0             # the busiest tenants are chosen again from each window's flow counts
MAX_COUNTED = 1 << 16       # tenants counted in one window (more: the newest are not ranked until the next)


class TopTenants:
    """Which tenants get a label of their own: the busiest, re-chosen every ``window_s``.

    A tenant's first flow gives it a label while there is room (so a few tenants are all labelled at
    once); when the labels are full, each window's flow counts choose the ``size`` busiest, incumbents
    winning ties, and the tenants that drop out have their series removed (:meth:`Metrics.forget`).
    Counting is one dict increment per flow; choosing is a sort of one window's counts, once a window.
    """

    def __init__(self, size: int = TOP_TENANTS, *, window_s: float = WINDOW_S,
                 actions_per_tenant: int = ACTIONS_PER_TENANT, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = max(1, size)
        self.window_s = window_s
        self.actions_per_tenant = actions_per_tenant
        self.clock = clock
        self.labelled: dict[str, set[str]] = {}   # tenant -> its slugs with labels
        self.counts: dict[str, int] = {}
        self.window_end = clock() + window_s

    def count(self, tenant: str) -> str:
        """One flow of ``tenant``: counted for the ranking; its label."""
        counts = self.counts
        n = counts.get(tenant)
        if n is not None:
            counts[tenant] = n + 1
        elif len(counts) < MAX_COUNTED:
            counts[tenant] = 1
        return self.tenant(tenant)

    def tenant(self, tenant: str) -> str:
        """The label of ``tenant`` (not counted); one of its own while there is room, as for a first flow."""
        if tenant in self.labelled:
            return tenant
        if len(self.labelled) < self.size:
            self.labelled[tenant] = set()
            return tenant
        return OTHER

    def slug(self, tenant_label: str, slug: str) -> str:
        """The label of an action of a tenant whose label is ``tenant_label``."""
        slugs = self.labelled.get(tenant_label)
        if slugs is None:
            return OTHER
        if slug in slugs:
            return slug
        if len(slugs) < self.actions_per_tenant:
            slugs.add(slug)
            return slug
        return OTHER

    def due(self) -> bool:
        return self.clock() >= self.window_end

    def rotate(self) -> list[str]:
        """Choose the busiest of the window that ended; the tenants that lost their label."""
        labelled = self.labelled
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0] not in labelled, kv[0]))
        chosen = [name for name, _ in ranked[:self.size]]
        keep = set(chosen)
        for name in sorted(labelled):   # idle incumbents keep what nobody busier took
            if len(keep) >= self.size:
                break
            keep.add(name)
        lost = sorted(set(labelled) - keep)
        self.labelled = {name: labelled.get(name, set()) for name in sorted(keep)}
        self.counts = {}
        self.window_end = self.clock() + self.window_s
        return lost

    def forget(self, tenant: str) -> None:
        """A deleted tenant: its label (if any) is free again."""
        self.labelled.pop(tenant, None)
        self.counts.pop(tenant, None)


class LatencyHistograms(Collector):
    """Histograms by label values, kept as plain lists and exposed at scrape time.

    The per-tenant and per-action histograms are observed several times per flow; prometheus-client's
    Histogram takes a lock and walks its buckets for each (about 5 us here). On the one event loop that
    serves and scrapes, an observation is a bisect and two additions.
    """

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.bounds = tuple(buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, ...], list[float]] = {}   # label values -> [count per bucket..., +Inf, sum]

    def observe(self, values: tuple[str, ...], seconds: float) -> None:
        s = self.series.get(values)
        if s is None:
            s = self.series[values] = [0] * (len(self.bounds) + 2)
        s[bisect.bisect_left(self.bounds, seconds)] += 1   # le: a value equal to a bound counts in its bucket
        s[-1] += seconds

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        pos = {self.labelnames.index(k): v for k, v in labels.items()}
        for key in [k for k in self.series if all(k[i] == v for i, v in pos.items())]:
            del self.series[key]

    def collect(self) -> Iterator[Any]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, s in sorted(self.series.items()):
            cum, buckets = 0.0, []
            for le, n in zip(self._les, s[:-1]):
                cum += n
                buckets.append((le, cum))
            fam.add_metric(list(values), buckets, s[-1])
        yield fam


def _remove_tenant(metric: Any, tenant: str) -> None:
    """Drop every series of ``metric`` labelled ``tenant`` (prometheus-client >= 0.22 has remove_by_labels)."""
    remove = getattr(metric, "remove_by_labels", None)
    if remove is not None:
        remove({"tenant": tenant})
        return
    for values in list(getattr(metric, "_metrics", {})):
        if values[0] == tenant:
            metric.remove(*values)


class _Bounded:
    """A labelled metric whose first label is a tenant and optional second a slug, mapped by TopTenants."""

    def __init__(self, metric: Any, top: TopTenants, has_slug: bool) -> None:
        self.metric, self.top, self.has_slug = metric, top, has_slug

    def labels(self, tenant: str, *rest: str) -> Any:
        t = self.top.tenant(tenant)
        if self.has_slug and rest:
            rest = (self.top.slug(t, rest[0]), *rest[1:])
        return self.metric.labels(t, *rest)

# Denial kinds whose worker was killed (or died); a failed-open action's kind is in its "failed open: KIND:" log.
KILL_KINDS = frozenset({"timeout", "flow_timeout", "memory_limit", "cpu_limit", "output_limit", "protocol_error",
                        "worker_crash", "worker_lost"})
_FAILED_OPEN = re.compile(r"^failed open: (\w+): ")

# Runner.stats() key -> (metric name, help)
_GAUGES = {
    "live": ("actionpool_workers_live", "Worker processes alive"),
    "idle": ("actionpool_workers_idle", "Workers idle and ready"),
    "starting": ("actionpool_workers_starting", "Workers being started"),
    "busy": ("actionpool_workers_busy", "Workers running an execution"),
    "waiting": ("actionpool_flows_waiting", "Flows waiting for a worker"),
    "flows_in_flight": ("actionpool_flows_in_flight", "Flows begun and not yet answered"),
    "capacity": ("actionpool_workers_max", "Workers allowed at once (runner.max_workers, else the memory budget; "
                 "serve --workers N: each process has 1/N)"),
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

    def __init__(self, store: Callable[[], dict[str, Any]], cache: Callable[[], dict[str, int]] | None,
                 label: Callable[[str], str] = lambda t: t) -> None:
        self._store, self._cache, self._label = store, cache, label

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
            by_label: dict[str, int] = {}
            for tenant, n in self._cache().items():
                key = self._label(tenant)
                by_label[key] = by_label.get(key, 0) + n
            for tenant, n in sorted(by_label.items()):
                g.add_metric([tenant], n)
            yield g


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], store: Callable[[], dict[str, Any]] | None = None,
                 cache: Callable[[], dict[str, int]] | None = None, *, top: TopTenants | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # serve --workers N (sidecar/_workers.py): prometheus-client chose memory-mapped values at import because
        # the parent set PROMETHEUS_MULTIPROC_DIR; /metrics then renders the sums over every process's files.
        self.multiprocess = bool(getattr(_values.ValueClass, "_multiprocess", False))
        self._stats, self._store, self._cache = stats, store, cache
        self.top = top if top is not None else TopTenants()
        self._flows = Counter("actionpool_flows", "Flows answered (tenant: the busiest, others \"_other\")",
                              ["tenant", "trigger", "outcome"], registry=r)
        self.flows = _Bounded(self._flows, self.top, has_slug=False)
        self.tenant_duration = LatencyHistograms("actionpool_tenant_flow_duration_seconds", "Flow duration in the "
                                                 "sidecar, by tenant (the busiest; others \"_other\")", ("tenant",),
                                                 LATENCY_BUCKETS)
        self.action_duration = LatencyHistograms("actionpool_action_duration_seconds", "Action execution time in "
                                                 "its worker, by tenant and slug (the busiest tenants; others "
                                                 "\"_other\")", ("tenant", "slug"), LATENCY_BUCKETS)
        r.register(self.tenant_duration)
        r.register(self.action_duration)
        self.denials = Counter("actionpool_denials", "Denied flows, by denial kind", ["kind"], registry=r)
        self.duration = Histogram("actionpool_flow_duration_seconds", "Flow duration in the sidecar",
                                  buckets=BUCKETS, registry=r)
        self.kills = Counter("actionpool_worker_kills", "Workers killed (or dead) during a flow, by kind", ["kind"],
                             registry=r)
        self._failed_open = Counter("actionpool_actions_failed_open", "Action failures that let the flow go on",
                                    ["tenant", "slug"], registry=r)
        self.failed_open = _Bounded(self._failed_open, self.top, has_slug=True)
        self.rejected = Counter("actionpool_requests_rejected", "Requests refused before a flow ran, by status",
                                ["status"], registry=r)
        self._shadow_runs = Counter("actionpool_shadow_runs", "Shadow runs beside the live version",
                                    ["tenant", "slug", "result"], registry=r)
        self.shadow_runs = _Bounded(self._shadow_runs, self.top, has_slug=True)
        self._by_tenant = (self._flows, self.tenant_duration, self.action_duration, self._failed_open,
                           self._shadow_runs)
        # The flow path's children by label values: prometheus-client's labels() costs a few us a call (it
        # checks and locks), three or more times per flow. As bounded as the label sets themselves.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.connections_closed = Counter("actionpool_connections_closed_by_guard",
                                          "Connections the sidecar closed before or between requests, by reason "
                                          "(sidecar/_http_guard.py)", ["reason"], registry=r)
        self.connections_open = Gauge("actionpool_connections_open", "HTTP connections open", registry=r,
                                      multiprocess_mode="livesum")
        self.connections_max = Gauge("actionpool_connections_max", "Open connections allowed (server.max_connections "
                                     "or the fd budget)", registry=r, multiprocess_mode="livesum")
        self._connection_sources: tuple[Callable[[], int], Callable[[], int]] | None = None
        r.register(_RunnerCollector(stats))
        if store is not None:
            r.register(_StoreCollector(store, cache, self.top.tenant))
        self._mirror: _ProcessMirror | None = None
        self._mp_registry: CollectorRegistry | None = None
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            self._mp_registry = CollectorRegistry()
            MultiProcessCollector(self._mp_registry)
            self._mirror = _ProcessMirror((self.tenant_duration, self.action_duration))

    def watch_connections(self, open_count: Callable[[], int], cap: Callable[[], int]) -> None:
        """Read the connection gauges from the guard's table at scrape time (every ~1 s too with N processes)."""
        if self.multiprocess:   # a set_function value is never written to the shared files
            self._connection_sources = (open_count, cap)
            return
        self.connections_open.set_function(open_count)
        self.connections_max.set_function(cap)

    def forget(self, tenant: str) -> None:
        """Remove every series of ``tenant`` (it lost its label, or was deleted)."""
        if self._mirror is not None:   # N processes: its latest counts reach the shared files before it goes
            for h in self._mirror.histograms:
                h.update()
        for metric in self._by_tenant:
            # prometheus-client cannot remove a series from the shared files: with N processes a tenant's totals
            # stay (frozen) until the processes restart, and go on from there if it gets its label back.
            if not self.multiprocess or isinstance(metric, LatencyHistograms):
                _remove_tenant(metric, tenant)
        for key in [k for k in self._children if k[1] == tenant]:
            del self._children[key]

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric._name, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def forget_tenant(self, tenant: str) -> None:
        """A deleted tenant: its series go and its label is free for another."""
        self.top.forget(tenant)
        self.forget(tenant)

    def flow(self, tenant: str, trigger: str, result: dict[str, Any], seconds: float) -> None:
        top = self.top
        if top.due():
            for lost in top.rotate():
                self.forget(lost)
        label = top.count(tenant)
        self._child(self._flows, label, trigger, result["outcome"]).inc()
        self.tenant_duration.observe((label,), seconds)
        versions = result.get("versions") or {}
        for a in result["actions"]:
            # Actions that ran in a worker: decision blocks and undeployed entries have no version.
            if a["status"] != "skipped" and a["slug"] in versions:
                self.action_duration.observe((label, top.slug(label, a["slug"])), a["duration_ms"] / 1000.0)
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

    def refresh(self) -> None:
        """With N processes: write this process's scrape-time values where the others' scrapes read them."""
        if self._mirror is None:
            return
        if self._connection_sources is not None:
            self.connections_open.set(self._connection_sources[0]())
            self.connections_max.set(self._connection_sources[1]())
        self._mirror.update(self._stats(), self._store() if self._store is not None else None,
                            self._cache() if self._cache is not None else None, self.top.tenant)

    def render(self) -> bytes:
        if self._mp_registry is not None:   # the sums over every process (this one's values written first)
            self.refresh()
            return generate_latest(self._mp_registry)
        return generate_latest(self.registry)


class _ProcessMirror:
    """One process's scrape-time values, written as multiprocess gauges and counters (``serve --workers N``).

    prometheus-client sums memory-mapped counters and histograms over processes, but a custom collector runs
    only in the process that is scraped. So the pool and store values are copied, at each scrape and every
    ~1 s, into gauges whose files a scrape of any process reads: counts summed over live processes
    (``livesum``), lags and the degraded time as the worst one (``livemax``), the store up only while every
    process reaches it (``livemin``); a counter of the Runner or the store grows by its delta. The list-based
    latency histograms write their bucket counts as the histogram values prometheus-client itself would
    write. A dead process's live gauges are dropped by the parent (``mark_process_dead``); its counters stay.
    """

    def __init__(self, histograms: tuple[LatencyHistograms, ...]) -> None:
        self.gauges = {key: Gauge(name, doc, multiprocess_mode="livesum", registry=None)
                       for key, (name, doc) in _GAUGES.items()}
        self.lag = Gauge("actionpool_event_loop_lag_seconds", "Event-loop lag (latest sample; the worst process)",
                         multiprocess_mode="livemax", registry=None)
        self.counters = {
            "discarded": Counter("actionpool_workers_discarded", "Workers gone for any reason (killed, crashed, "
                                 "recycled, retired)", registry=None),
            "template_respawns": Counter("actionpool_template_restarts", "Fork template restarts", registry=None),
        }
        self.store_up = Gauge("actionpool_store_up", "1 while the store (Redis) answers every process; 0: degraded",
                              multiprocess_mode="livemin", registry=None)
        self.store_gauges = {
            "down_seconds": Gauge("actionpool_store_degraded_seconds", "Seconds since the store stopped answering "
                                  "(0 while up; the longest of the processes)", multiprocess_mode="livemax",
                                  registry=None),
            "disagreeing": Gauge("actionpool_store_replicas_disagreeing", "Other replicas whose loaded versions "
                                 "differ from this one's (the most any process sees)", multiprocess_mode="livemax",
                                 registry=None),
        }
        self.store_counters = {key: Counter(name, f"{doc} (summed over the processes)", registry=None)
                               for key, name, doc in (
            ("outages", "actionpool_store_outages", "Times the store became unreachable"),
            ("bad_records", "actionpool_store_bad_records", "Malformed store records skipped"),
            ("history_dropped", "actionpool_store_history_dropped", "Run records not written (store down)"),
            ("history_truncated", "actionpool_store_history_truncated", ("Run records larger than a tenant's "
                                                                         "history_max_bytes, stored as a stub")),
            ("restores", "actionpool_store_restores", ("Times a replica re-wrote its versions into a store that "
                                                       "came back empty")))}
        self.cache = Gauge("actionpool_action_cache_bytes", "Built actions and drafts cached, by tenant (summed)",
                           ["tenant"], multiprocess_mode="livesum", registry=None)
        self.cache_labels: set[str] = set()
        self.last: dict[str, float] = {}
        self.histograms = [_HistogramMirror(h) for h in histograms]

    def _delta(self, counter: Any, key: str, value: Any) -> None:
        if isinstance(value, (int, float)):
            grown = value - self.last.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self.last[key] = value

    def update(self, stats: dict[str, Any], store: dict[str, Any] | None, cache: dict[str, int] | None,
               label: Callable[[str], str]) -> None:
        for key, gauge in self.gauges.items():
            if isinstance(stats.get(key), (int, float)):
                gauge.set(stats[key])
        if isinstance(stats.get("loop_lag_ms"), (int, float)):
            self.lag.set(stats["loop_lag_ms"] / 1000.0)
        for key, counter in self.counters.items():
            self._delta(counter, key, stats.get(key))
        if store is not None:
            self.store_up.set(1 if store["up"] else 0)
            for key, gauge in self.store_gauges.items():
                gauge.set(store[key])
            for key, counter in self.store_counters.items():
                self._delta(counter, "store." + key, store[key])
        if cache is not None:
            by_label: dict[str, int] = {}
            for tenant, n in cache.items():
                by_label[label(tenant)] = by_label.get(label(tenant), 0) + n
            for gone in self.cache_labels - set(by_label):   # a series cannot be removed from the files: 0
                self.cache.labels(gone).set(0)
            for name, n in by_label.items():
                self.cache.labels(name).set(n)
            self.cache_labels |= set(by_label)
        for h in self.histograms:
            h.update()


class _HistogramMirror:
    """A LatencyHistograms' series written as prometheus-client's own histogram values (summed over processes).

    A series that was removed and came back (its tenant lost and regained a label) goes on from the totals
    already written, so the sums never go down.
    """

    def __init__(self, hist: LatencyHistograms) -> None:
        self.hist = hist
        self.series: dict[tuple[str, ...], tuple[list[float], list[float], list[Any]]] = {}  # ref, base, values

    def update(self) -> None:
        h = self.hist
        for key, counts in h.series.items():
            entry = self.series.get(key)
            if entry is None:
                names, vals = (*h.labelnames, "le"), []
                for le in h._les:
                    vals.append(_values.ValueClass("histogram", h.name, h.name + "_bucket", names, (*key, le), h.doc))
                vals.append(_values.ValueClass("histogram", h.name, h.name + "_sum", tuple(h.labelnames), key, h.doc))
                entry = self.series[key] = (counts, [0.0] * len(vals), vals)
            elif entry[0] is not counts:   # a new list: the old one's totals are the base
                entry = self.series[key] = (counts, [v.get() for v in entry[2]], entry[2])
            _, base, vals = entry
            for v, b, n in zip(vals, base, counts):
                v.set(b + n)
