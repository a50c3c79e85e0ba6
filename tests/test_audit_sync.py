"""The audit stream and the synchronous facade."""

from __future__ import annotations

import logging

import orjson
import pytest

from conftest import TEST_CONFIG, run
from actionpool.runner import Action, LoggingAuditSink, MemoryAuditSink, Runner, SyncRunner


async def test_audit_events_for_logs_denials_and_failures() -> None:
    sink = MemoryAuditSink()
    src = "def on_execute(event, api):\n    api.log('warn', 'score 91')\n    api.deny('risk-too-high')\n"
    async with Runner(TEST_CONFIG, audit=sink) as r:
        denied = await run(r, src, tenant="acme")
        failed = await run(r, "def on_execute(event, api):\n    raise ValueError('bad')\n", tenant="acme")
    by_flow = {}
    for e in sink.events:
        by_flow.setdefault(e["flow_id"], []).append(e)
    d = by_flow[denied["flow_id"]]
    assert d[0] == {"type": "custom_action.test_run", "tenant": "acme", "trigger": "post-login",
                    "flow_id": denied["flow_id"], "action": "a", "level": "warn", "message": "score 91"}
    assert d[1]["type"] == "custom_action.denied" and d[1]["reason"] == "risk-too-high" and d[1]["kind"] == "denied"
    assert d[2]["type"] == "custom_action.flow_completed" and d[2]["outcome"] == "deny"
    f = by_flow[failed["flow_id"]]
    assert f[0]["type"] == "custom_action.failed" and f[0]["kind"] == "uncaught_error"


async def test_logging_sink_writes_json_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="actionpool.audit")
    async with Runner(TEST_CONFIG, audit=LoggingAuditSink()) as r:
        await run(r, "def on_execute(event, api):\n    api.log('info', 'hello')\n")
    lines = [orjson.loads(rec.getMessage()) for rec in caplog.records if rec.name == "actionpool.audit"]
    assert [e["type"] for e in lines] == ["custom_action.test_run", "custom_action.flow_completed"]
    assert lines[0]["message"] == "hello"


def test_sync_runner_for_scripts() -> None:
    with SyncRunner(TEST_CONFIG, audit=MemoryAuditSink()) as r:
        res = r.run_flow(trigger="post-login", tenant="t",
                         actions=[Action(slug="s", source="def on_execute(event, api):\n    api.state.set('x', 1)\n")],
                         event={"user": {}})
        assert r.stats()["flows"] == 1
    assert res.allowed and res.state == {"s": {"x": 1}}
