"""OpenTelemetry spans of flows and actions: the optional ``otel`` extra (``pip install actionpool[otel]``).

Off unless ``[tracing] exporter = "otlp"`` (or, with no ``exporter`` key, ``OTEL_TRACES_EXPORTER=otlp``):
then this module imports the SDK, and without tracing nothing here imports it, so a sidecar without the
extra pays nothing. Spans go over OTLP/HTTP to ``[tracing] endpoint`` or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (headers from
``OTEL_EXPORTER_OTLP_HEADERS``, so a collector's credentials stay out of the TOML), batched off the loop.

One span ``actionpool.flow`` per flow (a child of the gateway's W3C ``traceparent`` when it sent one) and
one ``actionpool.action`` child per action that ran, built AFTER the flow from its FlowResult (each
action's start and duration are in its record): the flow and the workers never wait on tracing. Spans
carry identifiers and outcomes only (execution id, tenant, trigger, slug, version, outcome, denial kind),
never the event, a reason an action wrote, or a secret.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from ..runner import ConfigError
from ._config import TracingSpec

# Denials that are the flow's answer, not a failure of it: their spans keep status UNSET.
POLICY_KINDS = frozenset({"denied", "validation_error"})
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def wanted(spec: TracingSpec, env: Mapping[str, str] | None = None) -> bool:
    """Whether the config (or, when it is silent, the standard environment) asks for tracing."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if spec.exporter:
        return spec.exporter == "otlp"
    return env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "otlp"


def start_tracing(spec: TracingSpec, exporter: Any = None) -> "FlowTracer | None":
    """The sidecar's tracer, or None when tracing is off.

    ``exporter``: a SpanExporter to use instead of OTLP (tests: the SDK's InMemorySpanExporter, with
    a synchronous processor so a span is there when the flow's answer is).
    """
    if exporter is None and not wanted(spec):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigError("tracing.exporter: tracing needs the OpenTelemetry SDK: pip install 'actionpool[otel]'"
                          ) from None
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": spec.service_name}
    sampler = ParentBased(TraceIdRatioBased(spec.sample_ratio)) if spec.sample_ratio < 1.0 else None
    provider = TracerProvider(resource=Resource.create(attrs), sampler=sampler, shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("tracing.exporter: otlp needs the OTLP/HTTP exporter: pip install 'actionpool[otel]'"
                              ) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=spec.endpoint)))
    return FlowTracer(provider)


class FlowTracer:
    """Builds the spans of one finished flow (called once per flow, after its answer is decided)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("actionpool.sidecar")
        self._trace, self._kind, self._status, self._code = trace, SpanKind, Status, StatusCode
        # W3C traceparent/tracestate, whatever OTEL_PROPAGATORS says (the gateway's header is the contract).
        self._propagator = TraceContextTextMapPropagator()

    def parent(self, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        """The gateway's span context from ``traceparent`` (None: a new trace)."""
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers
                   if name in _TRACE_HEADERS}
        return self._propagator.extract(carrier) if carrier else None

    def flow(self, headers: Iterable[tuple[bytes, bytes]], *, start_ns: int, run_ns: int, end_ns: int,
             execution_id: str, tenant: str, trigger: str, body: Mapping[str, Any], records: Iterable[Any]) -> None:
        """The flow's span (``start_ns``..``end_ns``) and one child per action that ran.

        ``run_ns``: when the runner began the flow; an action's record gives its start from there.
        """
        base = {"actionpool.execution_id": execution_id, "actionpool.tenant": tenant, "actionpool.trigger": trigger}
        attrs: dict[str, Any] = {**base, "actionpool.outcome": body["outcome"], "actionpool.flow_id": body["flow_id"]}
        denial = body.get("denial")
        if denial is not None:
            attrs["actionpool.denial_kind"] = str(denial.get("kind"))
            if denial.get("action") is not None:
                attrs["actionpool.denied_by"] = str(denial["action"])
        span = self.tracer.start_span("actionpool.flow", context=self.parent(headers), kind=self._kind.SERVER,
                                      attributes=attrs, start_time=start_ns)
        if denial is not None and denial.get("kind") not in POLICY_KINDS:
            span.set_status(self._status(self._code.ERROR, str(denial.get("kind"))))
        if span.is_recording():
            ctx = self._trace.set_span_in_context(span)
            versions = body.get("versions") or {}
            cursor = run_ns
            for rec in records:
                if rec.status == "skipped":
                    continue
                offset = getattr(rec, "started_ms", None)
                begin = run_ns + int(offset * 1e6) if offset is not None else cursor
                finish = begin + int(rec.duration_ms * 1e6)
                cursor = finish
                a = {**base, "actionpool.slug": rec.slug, "actionpool.outcome": rec.status}
                version = versions.get(rec.slug)
                if version is not None:
                    a["actionpool.version"] = version
                child = self.tracer.start_span("actionpool.action", context=ctx, kind=self._kind.INTERNAL,
                                               attributes=a, start_time=begin)
                if rec.status in ("failed", "failed_open"):
                    child.set_status(self._status(self._code.ERROR, rec.status))
                child.end(end_time=max(finish, begin))
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Export what is batched and stop (the sidecar's shutdown)."""
        self.provider.shutdown()
