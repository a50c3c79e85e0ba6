"""OpenTelemetry spans of the sidecar (sidecar/_tracing.py, the ``otel`` extra).

In process: a real ``Sidecar`` (its Runner and worker processes) behind its ASGI lifespan, spans into
the SDK's InMemorySpanExporter. Then a real ``serve`` subprocess exporting over OTLP/HTTP to a loopback
collector, and a subprocess proving that without tracing the SDK is never imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from actionpool.runner import ConfigError  # noqa: E402
from actionpool.sidecar._config import TracingSpec, load_config  # noqa: E402
from actionpool.sidecar._server import Sidecar  # noqa: E402
from actionpool.sidecar._tracing import start_tracing, wanted  # noqa: E402
from net_fixtures import LocalHTTPServer, free_port, http_server  # noqa: E402,F401
from serve_fixtures import start_serve, write_config  # noqa: E402
from test_serve_observe import running  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ACTIONS = {
    "tag.py": """
        def on_execute(event, api):
            api.state.set("tier", "gold")
    """,
    "boom.py": """
        def on_execute(event, api):
            raise RuntimeError("boom")
    """,
}

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [tenants.acme]
    [tenants.acme.actions.tag]
    file = "actions/tag.py"
    [tenants.acme.actions.boom]
    file = "actions/boom.py"
    [tenants.acme.flows]
    post-login = ["tag", { if = "event.request.country == 'XX'", deny = "blocked country" }]
    pre-login = ["tag", "boom"]
    {tracing}
"""

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _app(tmp_path: Path, tracing: str = "") -> Sidecar:
    return Sidecar(load_config(write_config(tmp_path, CONFIG.replace("{tracing}", tracing), ACTIONS)))


async def test_a_span_per_flow_and_per_action_child_of_the_gateway_traceparent(tmp_path: Path) -> None:
    app = _app(tmp_path)
    exporter = InMemorySpanExporter()
    app.tracer = start_tracing(app.config.tracing, exporter)
    async with running(app) as client:
        r = await client.post("/v1/tenants/acme/flows/post-login", json={"request": {"country": "FR"}},
                              headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "Idempotency-Key": "login-1"})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["outcome"] == "allow"
    spans = exporter.get_finished_spans()
    flows = [s for s in spans if s.name == "actionpool.flow"]
    actions = sorted((s for s in spans if s.name == "actionpool.action"), key=lambda s: s.start_time)
    assert len(flows) == 1 and len(spans) == 1 + len(actions)
    flow = flows[0]
    # The gateway's trace goes on: same trace id, the gateway's span is the parent.
    assert flow.context.trace_id == int(TRACE_ID, 16)
    assert flow.parent is not None and flow.parent.span_id == int(PARENT_ID, 16) and flow.parent.is_remote
    assert flow.kind is SpanKind.SERVER
    assert dict(flow.attributes) == {
        "actionpool.execution_id": "login-1", "actionpool.tenant": "acme", "actionpool.trigger": "post-login",
        "actionpool.outcome": "allow", "actionpool.flow_id": body["flow_id"]}
    # One child per entry that ran: the action (with its deployed version) and the decision block.
    assert [a.attributes["actionpool.slug"] for a in actions] == ["tag", "decision-2"]
    for a in actions:
        assert a.parent is not None and a.parent.span_id == flow.context.span_id
        assert a.context.trace_id == flow.context.trace_id
        assert flow.start_time <= a.start_time <= a.end_time <= flow.end_time
        assert a.attributes["actionpool.execution_id"] == "login-1"
        assert a.attributes["actionpool.tenant"] == "acme" and a.attributes["actionpool.trigger"] == "post-login"
    tag, decision = actions
    assert tag.attributes["actionpool.version"] == body["versions"]["tag"]
    assert "actionpool.version" not in decision.attributes
    assert (tag.attributes["actionpool.outcome"], decision.attributes["actionpool.outcome"]) == ("ok", "ok")
    assert tag.status.status_code is StatusCode.UNSET and flow.status.status_code is StatusCode.UNSET
    assert tag.end_time - tag.start_time == pytest.approx(body["actions"][0]["duration_ms"] * 1e6, abs=1e3)
    # Identifiers and outcomes only: nothing of the event, no reason an action wrote.
    allowed = {"actionpool.execution_id", "actionpool.tenant", "actionpool.trigger", "actionpool.slug",
               "actionpool.version", "actionpool.outcome", "actionpool.flow_id", "actionpool.denial_kind",
               "actionpool.denied_by"}
    for s in spans:
        assert set(s.attributes) <= allowed
        assert "FR" not in s.attributes.values()


async def test_without_traceparent_a_new_trace_and_a_denial_is_described(tmp_path: Path) -> None:
    app = _app(tmp_path)
    exporter = InMemorySpanExporter()
    app.tracer = start_tracing(app.config.tracing, exporter)
    async with running(app) as client:
        r = await client.post("/v1/tenants/acme/flows/post-login", json={"request": {"country": "XX"}})
        assert r.status_code == 200, r.text
        body = r.json()
        # A gateway that did not sample its trace: the flow is not recorded either (parent-based sampling).
        r2 = await client.post("/v1/tenants/acme/flows/post-login", json={"request": {"country": "FR"}},
                               headers={"traceparent": f"00-{'1' * 32}-{PARENT_ID}-00"})
        assert r2.status_code == 200, r2.text
        # A malformed traceparent is ignored (a new trace), never an error.
        r3 = await client.post("/v1/tenants/acme/flows/post-login", json={}, headers={"traceparent": "garbage"})
        assert r3.status_code == 200, r3.text
    flows = [s for s in exporter.get_finished_spans() if s.name == "actionpool.flow"]
    assert len(flows) == 2
    denied, fresh = flows
    assert denied.parent is None and fresh.parent is None
    assert denied.context.trace_id != int("1" * 32, 16) and fresh.context.trace_id != denied.context.trace_id
    assert denied.attributes["actionpool.execution_id"] == body["execution_id"]
    assert denied.attributes["actionpool.outcome"] == "deny"
    assert denied.attributes["actionpool.denial_kind"] == "denied"
    assert denied.attributes["actionpool.denied_by"] == "decision-2"
    assert denied.status.status_code is StatusCode.UNSET   # a policy denial is the flow's answer, not an error
    decision = [s for s in exporter.get_finished_spans() if s.name == "actionpool.action"
                and s.parent.span_id == denied.context.span_id and s.attributes["actionpool.slug"] == "decision-2"]
    assert decision and decision[0].attributes["actionpool.outcome"] == "denied"


async def test_a_failed_action_marks_its_span_and_the_flow_as_errors(tmp_path: Path) -> None:
    app = _app(tmp_path)
    exporter = InMemorySpanExporter()
    app.tracer = start_tracing(app.config.tracing, exporter)
    async with running(app) as client:
        r = await client.post("/v1/tenants/acme/flows/pre-login", json={})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["denial"]["kind"] == "uncaught_error", body
    spans = exporter.get_finished_spans()
    flow = next(s for s in spans if s.name == "actionpool.flow")
    by_slug = {s.attributes["actionpool.slug"]: s for s in spans if s.name == "actionpool.action"}
    assert set(by_slug) == {"tag", "boom"}
    assert by_slug["boom"].attributes["actionpool.outcome"] == "failed"
    assert by_slug["boom"].attributes["actionpool.version"] == body["versions"]["boom"]
    assert by_slug["boom"].status.status_code is StatusCode.ERROR
    assert by_slug["tag"].status.status_code is StatusCode.UNSET
    assert flow.status.status_code is StatusCode.ERROR and flow.status.description == "uncaught_error"
    assert flow.attributes["actionpool.trigger"] == "pre-login" and flow.attributes["actionpool.denied_by"] == "boom"
    # The error's message (RuntimeError: boom) is the action's text: it stays out of the span.
    assert all("RuntimeError" not in str(v) for s in spans for v in s.attributes.values())


async def test_no_span_when_tracing_is_off(tmp_path: Path) -> None:
    app = _app(tmp_path)
    assert app.tracer is None
    async with running(app) as client:
        r = await client.post("/v1/tenants/acme/flows/post-login", json={},
                              headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert r.status_code == 200, r.text


def test_without_tracing_opentelemetry_is_never_imported(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG.replace("{tracing}", ""), ACTIONS)
    code = ("import sys\n"
            "from actionpool.sidecar._config import load_config\n"
            "from actionpool.sidecar._server import Sidecar\n"
            f"app = Sidecar(load_config({str(path)!r}))\n"
            "assert app.tracer is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_when_tracing_is_wanted() -> None:
    assert not wanted(TracingSpec(), {})
    assert wanted(TracingSpec(), {"OTEL_TRACES_EXPORTER": "otlp"})
    assert not wanted(TracingSpec(), {"OTEL_TRACES_EXPORTER": "console"})
    assert wanted(TracingSpec(exporter="otlp"), {})
    assert not wanted(TracingSpec(exporter="none"), {"OTEL_TRACES_EXPORTER": "otlp"})   # the config wins
    assert not wanted(TracingSpec(exporter="otlp"), {"OTEL_SDK_DISABLED": "true"})


@pytest.mark.parametrize("table,key", [
    ('exporter = "jaeger"', "tracing.exporter"),
    ('exporter = "otlp"\nendpoint = "grpc://collector:4317"', "tracing.endpoint"),
    ("sample_ratio = 1.5", "tracing.sample_ratio"),
    ("sample_ratio = \"all\"", "tracing.sample_ratio"),
    ("service = \"x\"", "tracing.service"),
])
def test_bad_tracing_config_names_the_key(tmp_path: Path, table: str, key: str) -> None:
    path = write_config(tmp_path, CONFIG.replace("{tracing}", "[tracing]\n" + table), ACTIONS)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_serve_exports_spans_over_otlp_http(tmp_path: Path, http_server: LocalHTTPServer) -> None:  # noqa: F811
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint = f"{http_server.url}/status/200"
    tracing = f'[tracing]\nexporter = "otlp"\nendpoint = "{endpoint}"\nservice_name = "login-sidecar"'
    config = write_config(tmp_path, CONFIG.replace("{tracing}", tracing).replace(
        "[runner]", '[server]\ntoken_env = "AP_TOKEN"\n[runner]'), ACTIONS)
    s = start_serve(config)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={},
                       headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "Idempotency-Key": "otlp-1"})
            assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0, s.output()   # the shutdown flushes the batch
    posts = [q for q in http_server.requests if q.path == "/status/200"]
    assert posts, f"no OTLP export arrived\n{s.output()[-2000:]}"
    assert posts[0].headers["content-type"] == "application/x-protobuf"
    spans, services = [], set()
    for q in posts:
        req = ExportTraceServiceRequest()
        req.ParseFromString(q.body)
        for rs in req.resource_spans:
            services.update(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    assert services == {"login-sidecar"}
    flow = [sp for sp in spans if sp.name == "actionpool.flow"]
    assert len(flow) == 1 and flow[0].trace_id.hex() == TRACE_ID and flow[0].parent_span_id.hex() == PARENT_ID
    attrs = {a.key: a.value.string_value for a in flow[0].attributes}
    assert attrs["actionpool.execution_id"] == "otlp-1" and attrs["actionpool.tenant"] == "acme"
    assert {sp.name for sp in spans} == {"actionpool.flow", "actionpool.action"}


def test_tracing_without_the_extra_refuses_to_start(tmp_path: Path) -> None:
    """``exporter = "otlp"`` with the SDK missing: exit 2 and one line saying what to install."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _Block())\n")
    config = write_config(tmp_path, CONFIG.replace("{tracing}", '[tracing]\nexporter = "otlp"'), ACTIONS)
    out = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(config),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker)})
    assert out.returncode == 2, out.stderr
    assert "pip install 'actionpool[otel]'" in out.stderr and "tracing.exporter" in out.stderr
    assert "ready on" not in out.stderr
