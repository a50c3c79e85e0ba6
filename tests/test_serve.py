"""``actionpool serve`` as a gateway sees it: real sidecar processes on loopback, real workers.

Each test starts its own ``python -m actionpool.runner.cli serve`` and stops it
with SIGTERM (the leak check then proves no worker is left).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from actionpool.runner._errors import ConfigError
from actionpool.sidecar._serve import serve
from actionpool.sidecar._config import load_config
from serve_fixtures import AUTH, Serve, start_serve, write_config

pytestmark = pytest.mark.timeout(120)

ACTIONS = {
    "check_country.py": """
        def on_execute_post_login(event, api):
            api.state.set("country_blocked", (event.request or {}).get("country") in ("XX", "YY"))
    """,
    "tag_tier.py": """
        def on_execute_post_login(event, api):
            api.session.setCustomClaim("tier", "gold")
            api.state.set("execution_id", event.execution_id)
            api.log("info", "key=" + event.secrets.API_KEY)
    """,
    "slow.py": """
        import time
        def on_execute(event, api):
            time.sleep(float((event.request or {}).get("sleep") or 0))
            api.session.setCustomClaim("slow", "v1")
    """,
    "hang.py": """
        def on_execute(event, api):
            while True:
                pass
    """,
}

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 8
    [runner.limits]
    action_timeout_s = 3.0
    [server]
    token_env = "AP_TOKEN"
    max_body_bytes = 65536
    drain_grace_s = 20
    {server_extra}
    {store}
    [tenants.acme]
    denial_message = "Nope."
    redact = ["user.email"]
    [tenants.acme.secrets]
    API_KEY = {{ env = "ACME_API_KEY" }}
    [tenants.acme.actions.check-country]
    secrets = ["API_KEY"]
    file = "actions/check_country.py"
    [tenants.acme.actions.tag-tier]
    secrets = ["API_KEY"]
    file = "actions/tag_tier.py"
    [tenants.acme.actions.slow]
    secrets = ["API_KEY"]
    file = "actions/slow.py"
    [tenants.acme.actions.hang-open]
    secrets = ["API_KEY"]
    file = "actions/hang.py"
    failure = "open"
    limits = {{ action_timeout_s = 0.5 }}
    [tenants.acme.actions.hang-closed]
    secrets = ["API_KEY"]
    file = "actions/hang.py"
    limits = {{ action_timeout_s = 0.5 }}
    [tenants.acme.flows]
    post-login = ["check-country", {{ if = "step.check-country.country_blocked == true", deny = "country-blocked" }}, "tag-tier"]
    pre-login = ["slow"]
    pre-user-registration = ["hang-open", "slow"]
    issue-tokens = ["hang-closed"]
    post-user-registration = [{{ if = "step.nobody.flag", deny = "never" }}]
    [tenants.beta.flows]
    pre-login = ["ghost"]
"""

SECRET = "s3cret-value-991"
ENV = {"ACME_API_KEY": SECRET}


def config(tmp_path: Path, *, server_extra: str = "", store: str = "") -> Path:
    return write_config(tmp_path, CONFIG.format(server_extra=server_extra, store=store), ACTIONS)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Serve]:
    s = start_serve(config(tmp_path), ENV)
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-2000:]


def flow(c: httpx.Client, trigger: str, event: dict[str, Any] | None = None, tenant: str = "acme",
         **kw: Any) -> httpx.Response:
    return c.post(f"/v1/tenants/{tenant}/flows/{trigger}", json=event if event is not None else {"user": {}}, **kw)


def wait_in_flight(c: httpx.Client, n: int, timeout: float = 10.0) -> None:
    """Poll /metrics until ``n`` flows are in flight (begun in the Runner, not yet answered)."""
    deadline = time.monotonic() + timeout
    needle = f"actionpool_flows_in_flight {float(n)}"
    while needle not in c.get("/metrics").text:
        assert time.monotonic() < deadline, f"never saw {n} flow(s) in flight"
        time.sleep(0.01)


# ------------------------------------------------------------------ config


def test_config_errors_name_the_file_the_key_and_the_reason(tmp_path: Path) -> None:
    good = config(tmp_path)
    load_config(good, env={**ENV, "AP_TOKEN": "x"})
    cases = [
        ("API_KEY = { env = \"ACME_API_KEY\" }", "API_KEY = \"inline\"", "tenants.acme.secrets.API_KEY",
         "never the value itself"),
        ("API_KEY = { env = \"ACME_API_KEY\" }", "API_KEY = { env = \"UNSET_VAR_X\" }",
         "tenants.acme.secrets.API_KEY.env", "not set"),
        ("pool_size = 1", "pool_sise = 1", "runner.pool_sise", "unknown key"),
        ("pool_size = 1", "pool_size = \"one\"", "runner.pool_size", "wrong type"),
        ("action_timeout_s = 3.0", "action_timeout_s = -1", "runner", "action_timeout_s"),
        ("failure = \"open\"", "failure = \"maybe\"", "tenants.acme.actions.hang-open.failure", "open"),
        ("pre-login = [\"slow\"]", "pre-logon = [\"slow\"]", "tenants.acme.flows.pre-logon", "unknown trigger"),
        ("file = \"actions/slow.py\"", "file = \"actions/none.py\"", "tenants.acme.actions.slow.file",
         "no such file"),
        ("\"step.check-country.country_blocked == true\"", "\"step.check-country.country_blocked ==\"",
         "tenants.acme.flows.post-login[1].if", "not a valid CEL expression"),
        ("\"step.check-country.country_blocked == true\"", "\"[1,2].exists(x, x == 2)\"",
         "tenants.acme.flows.post-login[1].if", "not allowed"),
        ("deny = \"country-blocked\"", "deny = 3", "tenants.acme.flows.post-login[1].deny", "reason"),
    ]
    text = good.read_text()
    for old, new, key, reason in cases:
        assert old in text, old
        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError) as info:
            load_config(bad, env={**ENV, "AP_TOKEN": "x"})
        msg = str(info.value)
        assert msg.startswith(f"{bad}: {key}"), msg
        assert reason in msg, msg
    with pytest.raises(ConfigError, match="server.token_env: environment variable AP_TOKEN is not set"):
        load_config(good, env=ENV)


def test_without_a_token_only_loopback_is_served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[tenants.acme]\n")
    assert serve(str(path), "0.0.0.0", 1) == 2
    assert "loopback" in capsys.readouterr().err
    s = start_serve(path)
    try:  # no token configured: loopback peers need none
        r = httpx.post(s.url + "/v1/tenants/acme/flows/post-login", json={})
        assert r.status_code == 200 and r.json()["outcome"] == "allow"
    finally:
        assert s.stop() == 0


# ------------------------------------------------------------------ flows


def test_auth_and_every_error_status(sidecar: Serve) -> None:
    url = sidecar.url + "/v1/tenants/acme/flows/post-login"
    assert httpx.post(url, json={}).status_code == 401
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(sidecar.url + "/metrics").status_code == 401
    assert httpx.get(sidecar.url + "/healthz").status_code == 200
    with sidecar.client() as c:
        r = flow(c, "post-login", tenant="nobody")
        assert r.status_code == 404 and r.json()["field"] == "tenant"
        r = flow(c, "post-logon")
        assert r.status_code == 400 and r.json()["field"] == "trigger"
        r = c.post("/v1/tenants/acme/flows/post-login", content=b"{not json")
        assert r.status_code == 400 and r.json()["field"] == "body"
        r = c.post("/v1/tenants/acme/flows/post-login", json=[1, 2])
        assert r.status_code == 400 and r.json()["field"] == "event"
        deep: Any = {}
        node = deep
        for _ in range(80):
            node["x"] = {}
            node = node["x"]
        r = c.post("/v1/tenants/acme/flows/post-login", json={"user": deep})
        assert r.status_code == 400 and r.json()["field"].startswith("event['user']['x']"), r.json()
        r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"blob": "x" * 70000}})
        assert r.status_code == 413
        r = flow(c, "post-login", headers={"Idempotency-Key": "bad key with spaces"})
        assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key"
        # a known tenant with no flow for the trigger: allow
        r = flow(c, "post-login", tenant="beta")
        assert r.status_code == 200 and r.json()["outcome"] == "allow" and r.json()["actions"] == []
        r = flow(c, "post-login", {"user": {}, "request": {"country": "FR"}})
        assert r.status_code == 200 and r.json()["outcome"] == "allow"


def test_overloaded_is_503_with_retry_after(tmp_path: Path) -> None:
    s = start_serve(config(tmp_path, server_extra="max_inflight = 1"), ENV)
    try:
        answers: list[httpx.Response] = []

        def slow() -> None:
            with s.client() as c:
                answers.append(flow(c, "pre-login", {"request": {"sleep": 1.5}}))

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in answers)
        assert 200 in statuses and 503 in statuses, [r.text[:300] for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
            else:
                assert r.json()["outcome"] == "allow", r.text[:500]
    finally:
        assert s.stop() == 0


def test_decision_blocks_with_hyphenated_slugs_and_metrics(sidecar: Serve) -> None:
    with sidecar.client() as c:
        r = flow(c, "post-login", {"user": {}, "request": {"country": "XX"}}).json()
        assert r["outcome"] == "deny"
        assert r["denial"]["kind"] == "denied" and r["denial"]["reason"] == "country-blocked"
        assert r["denial"]["user_message"] == "Nope."
        assert [a["status"] for a in r["actions"]] == ["ok", "denied", "skipped"]
        r = flow(c, "post-login", {"user": {}, "request": {"country": "FR"}}).json()
        assert r["outcome"] == "allow" and r["claims"]["access_token"] == {"tier": "gold"}
        # a block that cannot be evaluated (no such step) fails closed
        r = flow(c, "post-user-registration").json()
        assert r["outcome"] == "deny" and r["denial"]["kind"] == "decision_error"
        text = c.get("/metrics").text
    for needle in ('actionpool_flows_total{outcome="deny",tenant="acme",trigger="post-login"} 1.0',
                   'actionpool_denials_total{kind="denied"} 1.0', 'actionpool_denials_total{kind="decision_error"} 1.0',
                   "actionpool_flow_duration_seconds_bucket", "actionpool_workers_live", "actionpool_workers_idle",
                   "actionpool_workers_starting", "actionpool_worker_kills_total", "actionpool_template_restarts_total",
                   "actionpool_event_loop_lag_seconds", "actionpool_flows_in_flight 0.0"):
        assert needle in text, needle


def test_failure_policy_open_and_closed(sidecar: Serve) -> None:
    with sidecar.client() as c:
        r = flow(c, "issue-tokens").json()
        assert r["outcome"] == "deny" and r["denial"]["kind"] == "timeout"
        # hang-open times out but fails open: the flow goes on to the next action
        r = flow(c, "pre-user-registration").json()
        assert r["outcome"] == "allow", r
        assert [a["status"] for a in r["actions"]] == ["failed_open", "ok"]
        assert any("failed open: timeout" in e["message"] for e in r["logs"])
        # an action named by a flow but never deployed: denied before anything runs
        r = flow(c, "pre-login", tenant="beta").json()
        assert r["denial"]["kind"] == "not_deployed" and r["denial"]["action"] == "ghost"
        metrics = c.get("/metrics").text
        assert 'actionpool_actions_failed_open_total{slug="hang-open",tenant="acme"} 1.0' in metrics
        assert 'actionpool_denials_total{kind="timeout"} 1.0' in metrics
        assert 'actionpool_worker_kills_total{kind="timeout"} 2.0' in metrics  # the closed one and the open one


def test_execution_id_and_run_history_redacted(sidecar: Serve) -> None:
    with sidecar.client() as c:
        event = {"user": {"email": "ada@example.com"}, "request": {"country": "FR"}, "note": SECRET}
        r1 = flow(c, "post-login", event, headers={"Idempotency-Key": "login-42"}).json()
        r2 = flow(c, "post-login", event, headers={"Idempotency-Key": "login-42"}).json()
        assert r1["execution_id"] == r2["execution_id"] == "login-42"
        assert r1["state"]["tag-tier"]["execution_id"] == "login-42"  # the action saw it as event.execution_id
        assert r1["flow_id"] != r2["flow_id"]
        r3 = flow(c, "post-login", event).json()
        assert r3["execution_id"] not in ("login-42", "")
        deadline = time.monotonic() + 10
        while (run := c.get(f"/v1/tenants/acme/runs/{r1['flow_id']}")).status_code == 404:
            assert time.monotonic() < deadline
            time.sleep(0.02)  # the history write is off the answer's path
        rec = run.json()
        assert rec["event"]["user"]["email"] == "[redacted]" and rec["event"]["note"] == "[redacted]"
        assert SECRET not in run.text
        assert rec["result"]["logs"][0]["message"] == "key=[redacted]"
        assert rec["versions"] == r1["versions"] and rec["execution_id"] == "login-42"
        assert c.get(f"/v1/tenants/beta/runs/{r1['flow_id']}").status_code == 404


# ------------------------------------------------------------------ actions


NEW_SLOW = "def on_execute(event, api):\n    api.session.setCustomClaim('slow', 'v2')\n"


def test_deploy_rollback_versions_and_in_flight_flows(sidecar: Serve) -> None:
    with sidecar.client() as c:
        before = flow(c, "pre-login").json()
        v1 = before["versions"]["slow"]
        assert before["claims"]["access_token"] == {}  # pre-login discards claims; the log says which version ran
        results: list[dict[str, Any]] = []
        t = threading.Thread(target=lambda: results.append(flow(c, "pre-login", {"request": {"sleep": 1.5}}).json()))
        t.start()
        wait_in_flight(c, 1)  # the slow flow began on v1
        r = c.put("/v1/tenants/acme/actions/slow", content=NEW_SLOW)
        assert r.status_code == 201
        v2 = r.json()["version"]
        assert r.json() == {"slug": "slow", "version": v2} and v2 != v1
        assert c.put("/v1/tenants/acme/actions/slow", content=NEW_SLOW).json()["version"] == v2  # content-addressed
        after = flow(c, "pre-login").json()
        assert after["versions"]["slow"] == v2
        t.join()
        assert results[0]["versions"]["slow"] == v1 and results[0]["outcome"] == "allow"
        listing = c.get("/v1/tenants/acme/actions/slow").json()
        assert listing["current"] == v2
        assert {v["version"] for v in listing["versions"]} == {v1, v2}
        assert all(v["deployed_at"] for v in listing["versions"])
        r = c.post("/v1/tenants/acme/actions/slow/rollback")
        assert r.status_code == 200 and r.json()["version"] == v1
        assert flow(c, "pre-login").json()["versions"]["slow"] == v1
        assert c.post("/v1/tenants/acme/actions/slow/rollback").status_code == 409
        assert c.put("/v1/tenants/acme/actions/new-slug", content=NEW_SLOW).status_code == 201  # a new slug deploys
        assert c.put("/v1/tenants/nobody/actions/slow", content=NEW_SLOW).status_code == 404    # an unknown tenant
        assert c.put("/v1/tenants/acme/actions/slow", content=b"\xff\xfe").status_code == 400


def test_draft_runs_and_shadow_deploys_change_no_result(sidecar: Serve) -> None:
    with sidecar.client() as c:
        current = c.get("/v1/tenants/acme/actions/tag-tier").json()["current"]
        draft = "def on_execute_post_login(event, api):\n    api.deny('draft-says-no')\n"
        r = c.post("/v1/tenants/acme/actions/tag-tier/test",
                   json={"trigger": "post-login", "event": {"user": {}}, "source": draft})
        assert r.status_code == 200
        assert r.json()["outcome"] == "deny" and r.json()["denial"]["reason"] == "draft-says-no"
        assert c.get("/v1/tenants/acme/actions/tag-tier").json()["current"] == current
        r = c.post("/v1/tenants/acme/actions/tag-tier/test", json={"trigger": "post-login", "event": {"user": {}}})
        assert r.json()["outcome"] == "allow" and r.json()["versions"] == {"tag-tier": current}
        assert c.post("/v1/tenants/acme/actions/tag-tier/test", json={"trigger": "nope"}).json()["field"] == "trigger"

        # shadow deploy: the new version runs beside the live one; only the listing and metrics see it
        shadow = "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('tier', 'platinum')\n"
        r = c.put("/v1/tenants/acme/actions/tag-tier?shadow=1", content=shadow)
        assert r.status_code == 201 and r.json()["shadow"] is True
        for _ in range(3):
            live = flow(c, "post-login", {"request": {"country": "FR"}}).json()
            assert live["claims"]["access_token"] == {"tier": "gold"}  # the live version answers
        deadline = time.monotonic() + 20
        while not (listing := c.get("/v1/tenants/acme/actions/tag-tier").json())["shadow_disagreements"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)  # shadow runs finish after the answer
        d = listing["shadow_disagreements"][0]
        assert listing["shadow"] == r.json()["version"]
        assert d["differences"]["claims"]["shadow"]["access_token"] == {"tier": "platinum"}
        assert 'actionpool_shadow_runs_total{result="disagree",slug="tag-tier",tenant="acme"}' in c.get("/metrics").text


# ------------------------------------------------------------------ lifecycle


def test_sigterm_drains_in_flight_flows_then_exits_0(tmp_path: Path) -> None:
    s = start_serve(config(tmp_path), ENV)
    try:
        with s.client() as c:
            flow(c, "pre-login")  # a warm worker exists
            workers = {p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)}
            assert workers
            results: list[httpx.Response] = []
            t = threading.Thread(target=lambda: results.append(flow(c, "pre-login", {"request": {"sleep": 2.0}})))
            t.start()
            wait_in_flight(c, 1)
            s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            with httpx.Client(base_url=s.url, headers=AUTH, timeout=10) as c2:
                while (ready := c2.get("/readyz")).status_code != 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert ready.json()["reason"] == "draining"
                r = flow(c2, "post-login")
                assert r.status_code == 503 and "retry-after" in r.headers
            t.join()
            assert results[0].status_code == 200 and results[0].json()["outcome"] == "allow"
        assert s.proc.wait(30) == 0
        assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    finally:
        s.stop()


# ------------------------------------------------------------------ replicas


REPLICA_STORE = '[store]\nurl = "{url}"'


@pytest.mark.redis
def test_two_replicas_on_one_redis_share_deploys_within_a_second(tmp_path: Path, redis_url: str) -> None:
    cfg = config(tmp_path, store=REPLICA_STORE.format(url=redis_url))
    a = start_serve(cfg, ENV)
    b = None
    try:
        b = start_serve(cfg, ENV)
        with a.client() as ca, b.client() as cb:
            v1 = flow(cb, "pre-login").json()["versions"]["slow"]
            assert flow(ca, "pre-login").json()["versions"]["slow"] == v1
            for via, other in ((ca, cb), (cb, ca)):
                r = via.put("/v1/tenants/acme/actions/slow", content=NEW_SLOW + f"# {time.monotonic()}\n")
                new = r.json()["version"]
                t0 = time.monotonic()
                while flow(other, "pre-login").json()["versions"]["slow"] != new:
                    time.sleep(0.01)  # polling until the other replica serves it
                    assert time.monotonic() - t0 < 1.0, "the other replica did not serve the deploy within 1 s"
            r = ca.post("/v1/tenants/acme/actions/slow/rollback")
            back = r.json()["version"]
            t0 = time.monotonic()
            while flow(cb, "pre-login").json()["versions"]["slow"] != back:
                time.sleep(0.01)
                assert time.monotonic() - t0 < 1.0, "the other replica did not serve the rollback within 1 s"
            history = cb.get("/v1/tenants/acme/actions/slow").json()["history"]
            assert [h["op"] for h in history][-1] == "rollback"
    finally:
        if b is not None:
            assert b.stop() == 0
        assert a.stop() == 0
