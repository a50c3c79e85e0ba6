"""``actionpool replay``: no repeated side effects, no secret in its output, redaction never a difference.

A real ``actionpool serve`` on a real redis-server records a flow whose
action POSTs to a real local HTTP server (with the tenant's secret in the
query and the user's e-mail in the body); the sidecar is stopped and the
replay CLI runs as a real subprocess against the same Redis. The HTTP server
counts the requests it sees, so "the POST was not sent again" is a fact, not
an inference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from net_fixtures import LocalHTTPServer
from serve_fixtures import SECRETS_KEY, start_serve, write_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis]

SECRET = "rp-Secret-Value-2718"
EMAIL = "grace.hopper@example.com"
ENV = {"RP_API_KEY": SECRET}

SCORE = """
    import json

    async def on_execute_post_login(event, api):
        key = event.secrets.API_KEY
        res = await api.fetch("{url}/echo?key=" + key, {{"method": "POST",
                              "headers": {{"content-type": "application/json"}},
                              "body": json.dumps({{"email": event.user.email}})}})
        echo = json.loads(res["body"])
        api.state.set("status", res["status"])
        api.state.set("method", echo["method"])
        api.state.set("sent", json.loads(echo["body"]) if echo["body"].startswith("{{") else echo["body"])
        api.session.setCustomClaim("email", event.user.email)
        api.state.set("key_used", key)  # recorded redacted; replayed with the real key: never a difference
        api.state.set(key, event.user.email)
        api.log("info", "scored with key " + key + " for " + event.user.email)
"""

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    [store]
    url = "{redis}"
    [tenants.acme]
    allow_hosts = ["127.0.0.1"]
    redact = ["user.email"]
    [tenants.acme.secrets]
    API_KEY = {{ env = "RP_API_KEY" }}
    [tenants.acme.actions.score]
    secrets = ["API_KEY"]
    file = "actions/score.py"
    [tenants.acme.flows]
    post-login = ["score"]
"""


def record_one_flow(tmp_path: Path, redis_url: str, server: LocalHTTPServer) -> tuple[Path, dict[str, Any]]:
    """Serve, run one post-login flow (one POST to ``server``), wait for its history record, stop."""
    cfg = write_config(tmp_path, CONFIG.format(redis=redis_url), {"score.py": SCORE.format(url=server.url)})
    s = start_serve(cfg, ENV)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"email": EMAIL}})
            answer = r.json()
            assert r.status_code == 200 and answer["outcome"] == "allow", answer
            assert answer["state"]["score"]["method"] == "POST"
            deadline = time.monotonic() + 15
            while (run := c.get(f"/v1/tenants/acme/runs/{answer['flow_id']}")).status_code == 404:
                assert time.monotonic() < deadline, "the run was never recorded"
                time.sleep(0.02)  # polling the background history write, with a deadline
    finally:
        assert s.stop() == 0, s.output()[-2000:]
    assert [q.method for q in server.requests] == ["POST"]
    assert SECRET not in run.text and EMAIL not in run.text
    fetches = run.json()["fetches"]
    assert len(fetches) == 1 and fetches[0]["method"] == "POST" and fetches[0]["status"] == 200
    assert fetches[0]["url"] == f"{server.url}/echo?key=[redacted]"
    assert EMAIL not in fetches[0]["body"] and "[redacted]" in fetches[0]["body"]
    return cfg, answer


def replay(cfg: Path, flow_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, "AP_TOKEN": "x", "ACTIONPOOL_SECRETS_KEY": SECRETS_KEY}  # the key serve wrote with
    cli = [sys.executable, "-m", "actionpool.runner.cli", "replay", flow_id, "--config", str(cfg), *extra]
    return subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)


def report(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for text in (p.stdout, p.stderr):
        assert SECRET not in text and EMAIL not in text, text
    return json.loads(p.stdout)


def test_replay_answers_fetches_from_the_recording_and_sends_nothing(tmp_path: Path, redis_url: str,
                                                                     http_server: LocalHTTPServer) -> None:
    cfg, answer = record_one_flow(tmp_path, redis_url, http_server)
    p = replay(cfg, answer["flow_id"])
    assert p.returncode == 0, p.stdout + p.stderr
    out = report(p)
    assert out["same"] is True and out["differences"] == {}
    assert out["fetches"] == {"answered_from": "recording", "recorded": 1, "replayed": 1, "unanswered": [],
                              "not_replayable": []}
    assert len(http_server.requests) == 1  # the POST was not sent again

    # a draft that fetches what the run never fetched: http_fetch_error, reported; still nothing sent
    draft = tmp_path / "score.py"
    draft.write_text(
        "async def on_execute_post_login(event, api):\n"
        f"    await api.fetch('{http_server.url}/json?key=' + event.secrets.API_KEY)\n")
    p = replay(cfg, answer["flow_id"], "--source", str(draft))
    assert p.returncode == 4, p.stdout + p.stderr
    out = report(p)
    (miss,) = out["fetches"]["unanswered"]
    assert miss["error"] == "http_fetch_error" and miss["url"] == f"{http_server.url}/json?key=[redacted]"
    assert out["differences"]["outcome"] == {"recorded": "allow", "replayed": "deny"}
    assert len(http_server.requests) == 1


def test_replay_output_never_holds_a_secret(tmp_path: Path, redis_url: str, http_server: LocalHTTPServer) -> None:
    cfg, answer = record_one_flow(tmp_path, redis_url, http_server)
    draft = tmp_path / "leaky.py"
    draft.write_text(
        "def on_execute_post_login(event, api):\n"
        "    api.session.setCustomClaim(event.secrets.API_KEY, event.secrets.API_KEY)\n"
        "    api.deny('draft says no to key ' + event.secrets.API_KEY)\n")
    p = replay(cfg, answer["flow_id"], "--source", str(draft), "--slug", "score")
    assert p.returncode == 4, p.stdout + p.stderr
    out = report(p)
    diff = out["differences"]
    assert diff["outcome"] == {"recorded": "allow", "replayed": "deny"}
    assert diff["denial"]["replayed"]["reason"] == "draft says no to key [redacted]"
    assert diff["claims"]["replayed"]["access_token"] == {"[redacted]": "[redacted]"}
    assert diff["claims"]["recorded"]["access_token"] == {"email": "[redacted]"}


def test_replay_with_live_fetch_sends_the_request(tmp_path: Path, redis_url: str,
                                                  http_server: LocalHTTPServer) -> None:
    cfg, answer = record_one_flow(tmp_path, redis_url, http_server)
    p = replay(cfg, answer["flow_id"], "--live-fetch")
    assert p.returncode == 0, p.stdout + p.stderr
    out = report(p)
    assert out["same"] is True and out["fetches"]["answered_from"] == "live"
    assert [q.method for q in http_server.requests] == ["POST", "POST"]
    again = http_server.requests[1]
    assert again.path == f"/echo?key={SECRET}"  # the real secret went to the real server, as on the first run
    # the replayed event was the recorded one: its redacted e-mail is what the action sent
    assert json.loads(again.body) == {"email": "[redacted]"}


def test_replay_with_a_fetch_stub_file(tmp_path: Path, redis_url: str, http_server: LocalHTTPServer) -> None:
    cfg, answer = record_one_flow(tmp_path, redis_url, http_server)
    stub = tmp_path / "stub.json"
    body = json.dumps({"method": "STUBBED", "body": "{}"})
    stub.write_text(json.dumps({f"POST {http_server.url}/echo?key={SECRET}": {"status": 202, "body": body}}))
    p = replay(cfg, answer["flow_id"], "--fetch-stub", str(stub))
    assert p.returncode == 4, p.stdout + p.stderr
    out = report(p)
    assert out["fetches"]["answered_from"] == "stub" and out["fetches"]["unanswered"] == []
    state = out["differences"]["state"]
    assert state["replayed"]["score"]["status"] == 202 and state["replayed"]["score"]["method"] == "STUBBED"
    assert state["recorded"]["score"]["status"] == 200 and state["recorded"]["score"]["method"] == "POST"
    assert len(http_server.requests) == 1
    # the two fetch modes exclude each other; a broken stub file is bad input (exit 2), naming the file
    p = replay(cfg, answer["flow_id"], "--fetch-stub", str(stub), "--live-fetch")
    assert p.returncode == 2
    stub.write_text("{not json")
    p = replay(cfg, answer["flow_id"], "--fetch-stub", str(stub))
    assert p.returncode == 2 and "stub.json" in p.stderr


TWICE = """
    import json

    async def on_execute_post_login(event, api):
        seen = []
        for n in (1, 2):  # the same request line twice, different bodies and so different answers
            res = await api.fetch("{url}/echo?key=" + event.secrets.API_KEY, {{"method": "POST", "body": str(n)}})
            seen.append(json.loads(res["body"])["body"])
        got = await api.fetch("{url}/echo?key=" + event.secrets.API_KEY)  # GET, same URL: its own entry
        hop = await api.fetch("{url}/redirect?to=/json")                    # followed: one recorded answer
        await api.fetch("{url}/big?bytes=70000")                            # recorded cut at 64 KiB: flagged
        api.state.set("seen", seen + [json.loads(got["body"])["method"], hop["status"], hop["body"]])
"""


def test_replay_answers_a_repeated_request_in_the_recorded_order(tmp_path: Path, redis_url: str,
                                                                  http_server: LocalHTTPServer) -> None:
    """Probe that failed: a run that POSTed the same URL twice and got two answers was replayed with the first
    answer for both calls, so a faithful replay reported a difference (exit 4)."""
    cfg = write_config(tmp_path, CONFIG.format(redis=redis_url).replace("actions/score.py", "actions/twice.py"),
                       {"twice.py": TWICE.format(url=http_server.url)})
    s = start_serve(cfg, ENV)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"email": EMAIL}})
            answer = r.json()
            assert r.status_code == 200 and answer["outcome"] == "allow", answer
            assert answer["state"]["score"]["seen"][:4] == ["1", "2", "GET", 200]
            deadline = time.monotonic() + 15
            while c.get(f"/v1/tenants/acme/runs/{answer['flow_id']}").status_code == 404:
                assert time.monotonic() < deadline, "the run was never recorded"
                time.sleep(0.02)  # polling the background history write, with a deadline
    finally:
        assert s.stop() == 0, s.output()[-2000:]
    sent = len(http_server.requests)
    p = replay(cfg, answer["flow_id"])
    assert p.returncode == 0, p.stdout + p.stderr
    out = report(p)
    assert out["same"] is True and out["differences"] == {}
    assert out["fetches"]["recorded"] == out["fetches"]["replayed"] == 5
    assert out["fetches"]["bodies_truncated"] == [f"GET {http_server.url}/big?bytes=70000"]
    assert out["fetches"]["unanswered"] == [] and out["fetches"]["not_replayable"] == []
    assert len(http_server.requests) == sent  # nothing sent again


ODD_SECRET = 'rp "Secret/Val+ue=27[18]'   # httpx sends it as rp%20%22Secret/Val+ue=27[18]
ENCODED = """
    import json
    from urllib.parse import quote

    async def on_execute_post_login(event, api):
        key = event.secrets.API_KEY
        a = await api.fetch("{url}/echo?k=" + quote(key, safe=""))       # encodeURIComponent-style
        b = await api.fetch("{url}/echo?raw=" + key)                       # encoded by the HTTP client
        c = await api.fetch("{url}/echo?mail=" + quote(event.user.email, safe=""))
        api.state.set("paths", [json.loads(x["body"])["path"] for x in (a, b, c)])
"""


def test_encoded_secrets_and_values_in_fetch_urls_are_redacted_and_still_replay(
        tmp_path: Path, redis_url: str, http_server: LocalHTTPServer) -> None:
    """Probes that failed: a secret percent-encoded in a fetch URL (by the action or by httpx, which encodes
    only some characters) and echoed by the upstream was stored raw in the recorded body; an e-mail (a redact
    path) percent-encoded in a URL too; and once redacted, a replay whose event holds "[redacted]" sent it
    encoded (%5Bredacted%5D), so the recorded answer was not found."""
    cfg = write_config(tmp_path, CONFIG.format(redis=redis_url).replace("actions/score.py", "actions/enc.py"),
                       {"enc.py": ENCODED.format(url=http_server.url)})
    email = "a+b@example.com"
    s = start_serve(cfg, {"RP_API_KEY": ODD_SECRET})
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"email": email}})
            answer = r.json()
            assert r.status_code == 200 and answer["outcome"] == "allow", answer
            deadline = time.monotonic() + 15
            while (run := c.get(f"/v1/tenants/acme/runs/{answer['flow_id']}")).status_code == 404:
                assert time.monotonic() < deadline, "the run was never recorded"
                time.sleep(0.02)  # polling the background history write, with a deadline
    finally:
        assert s.stop() == 0, s.output()[-2000:]
    wire = [q.path.split("=", 1)[1] for q in http_server.requests]   # what really went out, encoded
    assert wire[1] != ODD_SECRET and "%20" in wire[1]
    for needle in (ODD_SECRET, *wire, email, "Secret/Val", "a%2Bb%40"):
        assert needle not in run.text, f"{needle!r} in the stored run: {run.text[:3000]}"
    assert run.json()["result"]["state"]["score"]["paths"] == ["/echo?k=[redacted]", "/echo?raw=[redacted]",
                                                               "/echo?mail=[redacted]"]
    sent = len(http_server.requests)
    env = {**os.environ, "RP_API_KEY": ODD_SECRET, "AP_TOKEN": "x", "ACTIONPOOL_SECRETS_KEY": SECRETS_KEY}
    p = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "replay", answer["flow_id"], "--config",
                        str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["same"] is True and out["fetches"]["unanswered"] == [], out
    assert len(http_server.requests) == sent
    for needle in (ODD_SECRET, *wire, email):
        assert needle not in p.stdout + p.stderr
