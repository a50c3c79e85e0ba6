"""``actionpool serve`` observable like the services around it: its start and stop lines, JSON logs that
name the flow they are about, and per-tenant / per-action latency histograms of bounded cardinality.

Real ``serve`` subprocesses (tests/serve_fixtures.py) for what an operator reads; the metrics' bounds
and the log context deep inside a flow in process, with a real Runner and its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actionpool.sidecar._config import load_config
from actionpool.sidecar._logs import JsonFormatter
from actionpool.sidecar._metrics import OTHER, Metrics, TopTenants
from actionpool.sidecar._serve import _store_url
from actionpool.sidecar._server import Sidecar
from serve_fixtures import start_serve, write_config

pytestmark = pytest.mark.timeout(120)

SECRET = "sk-live-0bservable-9f8e7d"
EMAIL = "marker.person@example.org"

ACTIONS = {
    "tag.py": """
        def on_execute(event, api):
            api.state.set("tier", "gold")
            api.log("info", "key=" + str(event.secrets.API_KEY) + " email=" + str((event.user or {}).get("email")))
    """,
    "slow.py": """
        import time
        def on_execute(event, api):
            time.sleep(float((event.request or {}).get("sleep") or 0))
    """,
}

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    drain_grace_s = 30
    [tenants.acme]
    [tenants.acme.secrets]
    API_KEY = { env = "ACME_API_KEY" }
    [tenants.acme.actions.tag]
    secrets = ["API_KEY"]
    file = "actions/tag.py"
    [tenants.acme.actions.slow]
    file = "actions/slow.py"
    [tenants.acme.flows]
    post-login = ["tag", "slow"]
    [tenants.beta]
    [tenants.beta.actions.tag]
    file = "actions/tag.py"
    [tenants.beta.flows]
    post-login = ["tag"]
"""

ENV = {"ACME_API_KEY": SECRET}


@contextlib.asynccontextmanager
async def running(app: Sidecar) -> AsyncIterator[httpx.AsyncClient]:
    """The app through its ASGI lifespan (startup, then shutdown), and a client that calls it in process."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    msg = await outbox.get()
    assert msg["type"] == "lifespan.startup.complete", msg
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar", timeout=30) as client:
            yield client
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await task


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_serve_says_when_it_is_ready_and_when_it_stopped(tmp_path: Path) -> None:
    s = start_serve(write_config(tmp_path, CONFIG, ACTIONS), env=ENV)
    port = s.url.rsplit(":", 1)[1]
    answer: dict[str, Any] = {}

    def slow_flow() -> None:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"request": {"sleep": 3}})
            answer["status"], answer["body"] = r.status_code, r.json()

    try:
        ready = _lines(s.output(), "actionpool serve: ready")
        assert ready == [f"actionpool serve: ready on http://127.0.0.1:{port} · 2 tenants, 3 actions · "
                         f"store memory:// · sandbox strict"], s.output()
        with s.client() as c:
            r = c.post("/v1/tenants/beta/flows/post-login", json={})
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
            fams = _families(c.get("/metrics").text)
        # Per tenant and per action, with the busiest tenants' own labels.
        flows = {s_.labels["tenant"]: s_.value for s_ in fams["actionpool_tenant_flow_duration_seconds"].samples
                 if s_.name.endswith("_count")}
        assert flows == {"beta": 1.0}
        acts = {(s_.labels["tenant"], s_.labels["slug"]): s_.value
                for s_ in fams["actionpool_action_duration_seconds"].samples if s_.name.endswith("_count")}
        assert acts == {("beta", "tag"): 1.0}
        buckets = [float(s_.labels["le"]) for s_ in fams["actionpool_action_duration_seconds"].samples
                   if s_.name.endswith("_bucket")]
        assert min(buckets) == 0.001 and max(b for b in buckets if b != float("inf")) == 10.0

        t = threading.Thread(target=slow_flow)
        t.start()
        deadline = time.monotonic() + 30
        with s.client() as c:
            while time.monotonic() < deadline:   # polling a condition: the slow flow is in flight
                g = _families(c.get("/metrics").text)["actionpool_flows_in_flight"].samples[0].value
                if g >= 1:
                    break
                time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert answer["status"] == 200, answer   # drained: the flow in flight was answered
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
    out = s.output()
    stopped = _lines(out, "actionpool serve: stopped")
    assert len(stopped) == 1, out
    assert re.fullmatch(r"actionpool serve: stopped on SIGTERM · drained 1 flow in \d+\.\d s · "
                        r"up (\d+\.\d s|\d+m\d\ds)", stopped[0]), stopped
    assert len(_lines(out, "actionpool serve: ready")) == 1
    assert SECRET not in out


def test_json_logs_one_object_per_line_naming_the_flow(tmp_path: Path) -> None:
    s = start_serve(write_config(tmp_path, CONFIG, ACTIONS), env=ENV, args=("--log-format", "json",
                                                                            "--log-level", "info"))
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"user_id": "u1", "email": EMAIL}},
                       headers={"Idempotency-Key": "login-json-1"})
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
            r = c.post("/v1/tenants/beta/flows/post-login", json={}, headers={"Idempotency-Key": "login-json-2"})
            assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0
    out = s.output()
    records = []
    for line in out.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)   # every line: one JSON object
        assert {"ts", "level", "logger", "msg"} <= set(rec), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec
        records.append(rec)
    ready = [r for r in records if r.get("event") == "ready"]
    assert len(ready) == 1 and ready[0]["msg"].startswith("actionpool serve: ready on http://127.0.0.1:")
    assert (ready[0]["tenants"], ready[0]["actions"], ready[0]["store"]) == (2, 3, "memory://")
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM" and stopped[0]["flows_cut_off"] == 0
    assert any(r["logger"].startswith("uvicorn") for r in records), "uvicorn's lines go through the formatter"
    flows = {r["execution_id"]: r for r in records if r["logger"] == "actionpool.flow"}
    assert set(flows) == {"login-json-1", "login-json-2"}
    assert (flows["login-json-1"]["tenant"], flows["login-json-1"]["trigger"]) == ("acme", "post-login")
    assert flows["login-json-1"]["outcome"] == "allow" and flows["login-json-2"]["tenant"] == "beta"
    # Never a secret, never the event: the action logged both; neither reaches the process's log.
    assert SECRET not in out and EMAIL not in out


@pytest.mark.redis
def test_the_ready_line_names_the_redis_store_and_a_cut_off_drain(tmp_path: Path, redis_url: str) -> None:
    config = """
        [runner]
        pool_size = 1
        max_workers = 2
        [runner.limits]
        action_timeout_s = 30.0
        flow_timeout_s = 30.0
        [server]
        token_env = "AP_TOKEN"
        drain_grace_s = 1
        [store]
        url = "%s"
        [tenants.beta]
        [tenants.beta.actions.slow]
        file = "actions/slow.py"
        [tenants.beta.flows]
        pre-login = ["slow"]
    """ % redis_url
    s = start_serve(write_config(tmp_path, config, ACTIONS), args=("--log-format", "json"))
    answer: dict[str, Any] = {}

    def slow_flow() -> None:
        with s.client() as c:
            try:
                answer["status"] = c.post("/v1/tenants/beta/flows/pre-login", json={"request": {"sleep": 20}}
                                          ).status_code
            except httpx.HTTPError as exc:   # the drain's grace ran out: the connection is closed
                answer["error"] = type(exc).__name__

    t = threading.Thread(target=slow_flow)
    try:
        t.start()
        deadline = time.monotonic() + 30
        with s.client() as c:
            while time.monotonic() < deadline:   # polling a condition: the slow flow is in flight
                if _families(c.get("/metrics").text)["actionpool_flows_in_flight"].samples[0].value >= 1:
                    break
                time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(60)
        t.join(60)
    finally:
        s.stop()
    records = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
    ready = [r for r in records if r.get("event") == "ready"]
    assert len(ready) == 1, s.output()
    assert ready[0]["store"] == redis_url and f"store {redis_url} ·" in ready[0]["msg"]
    assert (ready[0]["tenants"], ready[0]["actions"]) == (1, 1)
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1, s.output()
    assert (stopped[0]["flows_drained"], stopped[0]["flows_cut_off"]) == (0, 1), stopped
    assert "1 cut off (server.drain_grace_s = 1 s)" in stopped[0]["msg"]


FETCHING = '''
async def on_execute(event, api):
    res = await api.fetch("https://risk.example.test/score")
    api.state.set("status", res.status)
'''


async def test_a_line_logged_deep_inside_a_flow_names_that_flow(tmp_path: Path) -> None:
    """The fetch service's own debug line, logged from a task the worker's reader started, names the flow
    whose action asked, also when the worker was started by an earlier flow (its reader runs in no flow)."""
    config = """
        [runner]
        pool_size = 1
        max_workers = 2
        [runner.fetch]
        allow_hosts = ["risk.example.test"]
        [tenants.acme]
        [tenants.acme.actions.fetching]
        file = "actions/fetching.py"
        [tenants.acme.flows]
        post-login = ["fetching"]
    """
    cfg = load_config(write_config(tmp_path, config, {"fetching.py": FETCHING}))
    stub = {"GET https://risk.example.test/score": {"status": 200, "body": "{}"}}
    cfg = dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, fetch=dataclasses.replace(
        cfg.runner.fetch, stub=stub)))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("actionpool.fetch")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        async with running(Sidecar(cfg)) as client:
            for key in ("deep-1", "deep-2", "deep-3"):
                r = await client.post("/v1/tenants/acme/flows/post-login", json={}, headers={"Idempotency-Key": key})
                assert r.status_code == 200 and r.json()["state"]["fetching"]["status"] == 200, r.text
        logging.getLogger("actionpool").debug("outside any flow")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    fetches = [r for r in lines if r["msg"].startswith("fetch GET https://risk.example.test/score")]
    assert [(r.get("execution_id"), r.get("tenant"), r.get("trigger")) for r in fetches] == [
        ("deep-1", "acme", "post-login"), ("deep-2", "acme", "post-login"), ("deep-3", "acme", "post-login")]


def test_the_store_url_is_shown_without_its_password() -> None:
    assert _store_url(None) == "memory://"
    assert _store_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert _store_url("redis://:hunter2-pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert _store_url("redis://app:hunter2-pw@cache.internal/3") == "redis://app:***@cache.internal/3"
    assert "hunter2" not in _store_url("redis://u:hunter2@[::1]:6380/1")


def _label_sets(m: Metrics, name: str) -> set[tuple[tuple[str, str], ...]]:
    out = set()
    for fam in text_string_to_metric_families(m.render().decode()):
        if fam.name == name:
            for s in fam.samples:
                out.add(tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")))
    return out


def _result(slugs: list[str], outcome: str = "allow") -> dict[str, Any]:
    return {"outcome": outcome, "denial": None, "logs": [], "versions": {s: "v1" for s in slugs},
            "actions": [{"slug": s, "status": "ok", "duration_ms": 2.0} for s in slugs] +
                       [{"slug": "decision-9", "status": "ok", "duration_ms": 0.0}]}


def test_a_thousand_tenants_do_not_make_a_thousand_label_sets() -> None:
    m = Metrics(lambda: {}, top=TopTenants(20))
    for i in range(1000):
        for _ in range(2):
            m.flow(f"tenant-{i}", "post-login", _result([f"a{j}" for j in range(30)]), 0.003)
    tenants = _label_sets(m, "actionpool_tenant_flow_duration_seconds")
    assert len({dict(t)["tenant"] for t in tenants}) == 21          # 20 of their own, and "_other"
    assert (("tenant", OTHER),) in tenants
    actions = _label_sets(m, "actionpool_action_duration_seconds")
    assert len(actions) <= 20 * (16 + 1) + 1                         # 16 slugs a tenant, the rest "_other"
    assert not any(dict(a)["slug"] == "decision-9" for a in actions)  # decision blocks run no worker
    assert len(_label_sets(m, "actionpool_flows")) <= 21
    counts = {s.labels["tenant"]: s.value for s in _families(m.render().decode())[
        "actionpool_tenant_flow_duration_seconds"].samples if s.name.endswith("_count")}
    assert sum(counts.values()) == 2000 and counts[OTHER] == 2 * 980   # nothing lost, only grouped
    m.failed_open.labels("tenant-999", "a1").inc()                   # a counter of a tenant with no label
    m.shadow_runs.labels("tenant-0", "a1", "agree").inc()
    assert _label_sets(m, "actionpool_actions_failed_open") == {(("slug", OTHER), ("tenant", OTHER))}
    assert _label_sets(m, "actionpool_shadow_runs") == {(("result", "agree"), ("slug", "a1"), ("tenant", "tenant-0"))}


def test_the_busiest_tenants_take_the_labels_and_the_idle_lose_theirs() -> None:
    now = [0.0]
    top = TopTenants(3, window_s=60.0, clock=lambda: now[0])
    m = Metrics(lambda: {}, top=top)
    for name in ("a", "b", "c", "d"):   # the first three fill the labels; d is "_other"
        m.flow(name, "post-login", _result(["x"]), 0.01)
    assert {dict(t)["tenant"] for t in _label_sets(m, "actionpool_tenant_flow_duration_seconds")} == {
        "a", "b", "c", OTHER}
    for _ in range(50):
        m.flow("d", "post-login", _result(["x"]), 0.01)   # d becomes the busiest...
    for name in ("a", "b"):
        m.flow(name, "post-login", _result(["x"]), 0.01)
    now[0] = 61.0                                          # ...and the next window's first flow re-chooses
    m.flow("a", "post-login", _result(["x"]), 0.01)
    assert set(top.labelled) == {"a", "b", "d"}
    labels = {dict(t)["tenant"] for t in _label_sets(m, "actionpool_tenant_flow_duration_seconds")}
    assert labels == {"a", "b", OTHER}                     # c's series are gone; d's start from now
    m.flow("d", "post-login", _result(["x"]), 0.01)
    assert "d" in {dict(t)["tenant"] for t in _label_sets(m, "actionpool_action_duration_seconds")}
    m.forget_tenant("d")                                   # a deleted tenant frees its label at once
    assert "d" not in top.labelled
    assert "d" not in {dict(t)["tenant"] for t in _label_sets(m, "actionpool_flows")}
