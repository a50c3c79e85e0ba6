"""The management API end to end: real ``actionpool serve`` processes, real worker processes, a real redis-server.

A tenant is onboarded, given actions and flows, run, changed and deleted, all without a restart; two replicas
on one Redis see every change within a second; bad deploys and flows answer 422 and change nothing; the flow
token cannot manage; a secret's value never leaves the sidecar; the config bootstraps an empty store, drift
is reported and ``--sync-config`` makes the store equal to the config.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_fixtures import ADMIN, AUTH, Serve, start_serve, write_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis]

BASE = """
    [runner]
    pool_size = 1
    max_workers = 6
    [runner.limits]
    action_timeout_s = 3.0
    [server]
    token_env = "AP_TOKEN"
    admin_token_env = "AP_ADMIN"
    [store]
    url = "{url}"
"""

TAG = "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('tier', 'gold')\n" \
      "    api.state.set('seen', True)\n"
TAG_V2 = "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('tier', 'platinum')\n" \
         "    api.state.set('seen', True)\n"
GATE = "def on_execute_post_login(event, api):\n    if (event.user.email or '').endswith('@blocked.example'):\n" \
       "        api.access.deny('blocked-domain')\n"
SECRET = "sk_live_Zq81xWv0MmT4pQ"      # the value that must never leave the sidecar
OTHER = "other-secret-Hy7vN2kK0"


def admin(s: Serve) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers=ADMIN, timeout=30)


def flow_token(s: Serve) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers=AUTH, timeout=30)


def run(c: httpx.Client, tenant: str, trigger: str = "post-login", event: dict[str, Any] | None = None) -> httpx.Response:
    return c.post(f"/v1/tenants/{tenant}/flows/{trigger}", json=event or {"user": {"email": "ada@example.com"}})


def within_1s(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until true; fail if it is not within one second (the replication contract)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < 1.0, f"not seen within 1 s: {what}"
        time.sleep(0.01)   # polling a condition with a deadline


def deploy(c: httpx.Client, tenant: str, slug: str, source: str, **kw: Any) -> httpx.Response:
    return c.put(f"/v1/tenants/{tenant}/actions/{slug}", json={"source": source, "language": "python", **kw})


@pytest.fixture
def one(tmp_path: Path, redis_url: str) -> Iterator[Serve]:
    s = start_serve(write_config(tmp_path, BASE.format(url=redis_url)))
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-3000:]


def test_onboard_deploy_bind_run_reorder_roll_back_and_delete_without_a_restart(one: Serve, redis_url: str) -> None:
    pid = one.proc.pid
    with admin(one) as a, flow_token(one) as f:
        r = a.put("/v1/tenants/shop", json={"denial_message": "No entry.", "allow_hosts": []})
        assert r.status_code == 201, r.text
        assert a.put("/v1/tenants/shop", json={"denial_message": "Still no entry."}).status_code == 200
        got = a.get("/v1/tenants/shop").json()
        assert got["denial_message"] == "Still no entry." and got["allow_hosts"] == [] and got["failure"] == "closed"
        assert "shop" in [t["name"] for t in a.get("/v1/tenants").json()["tenants"]]
        assert run(f, "shop").json()["actions"] == []      # a tenant without a flow: allowed, nothing runs

        v1 = deploy(a, "shop", "tag", TAG, message="first").json()["version"]
        assert deploy(a, "shop", "gate", GATE).status_code == 201
        r = a.put("/v1/tenants/shop/flows/post-login", json=["tag", "gate"])
        assert r.status_code == 200, r.text
        f1 = r.json()["version"]
        out = run(f, "shop").json()
        assert out["outcome"] == "allow" and out["claims"]["access_token"] == {"tier": "gold"}
        assert [x["slug"] for x in out["actions"]] == ["tag", "gate"] and out["versions"]["tag"] == v1
        out = run(f, "shop", event={"user": {"email": "x@blocked.example"}}).json()
        assert out["outcome"] == "deny" and out["denial"]["reason"] == "blocked-domain"
        assert out["denial"]["user_message"] == "Still no entry."

        f2 = a.put("/v1/tenants/shop/flows/post-login", json=["gate", "tag"]).json()["version"]   # reorder
        assert f2 != f1 and [x["slug"] for x in run(f, "shop").json()["actions"]] == ["gate", "tag"]
        got = a.get("/v1/tenants/shop/flows/post-login").json()
        assert got["flow"] == ["gate", "tag"] and got["version"] == f2
        versions = a.get("/v1/tenants/shop/flows/post-login/versions").json()["versions"]
        assert {v["version"] for v in versions} >= {f1, f2} and [v["version"] for v in versions if v["current"]] == [f2]
        r = a.post("/v1/tenants/shop/flows/post-login/rollback")
        assert r.status_code == 200 and r.json()["version"] == f1
        assert [x["slug"] for x in run(f, "shop").json()["actions"]] == ["tag", "gate"]
        assert a.put("/v1/tenants/shop/flows/post-login", json=["gate", "tag"]).json()["version"] == f2
        r = a.post("/v1/tenants/shop/flows/post-login/rollback", json={"version": f1})   # to a kept version
        assert r.status_code == 200 and r.json()["version"] == f1
        assert [x["slug"] for x in run(f, "shop").json()["actions"]] == ["tag", "gate"]
        r = a.post("/v1/tenants/shop/flows/post-login/rollback", json={"version": "0" * 16})
        assert r.status_code == 404 and r.json()["field"] == "version"

        # versions carry author (the header), message and time; diff; rollback to a chosen version
        r = a.put("/v1/tenants/shop/actions/tag", json={"source": TAG_V2, "language": "python", "message": "more"},
                  headers={"X-Actionpool-Author": "alice"})
        v2 = r.json()["version"]
        assert r.status_code == 201 and v2 != v1 and run(f, "shop").json()["versions"]["tag"] == v2
        described = a.get("/v1/tenants/shop/actions/tag").json()
        assert described["current"] == v2
        mine = [v for v in described["versions"] if v["version"] == v2][0]
        assert mine["author"] == "admin:alice" and mine["message"] == "more", mine
        diff = a.get(f"/v1/tenants/shop/actions/tag/versions/{v1}/diff/{v2}").json()["diff"]
        assert "-    api.session.setCustomClaim('tier', 'gold')" in diff
        assert "+    api.session.setCustomClaim('tier', 'platinum')" in diff
        assert a.get(f"/v1/tenants/shop/actions/tag/versions/{v1}/diff/{'f' * 16}").status_code == 404
        r = a.post("/v1/tenants/shop/actions/tag/rollback", json={"version": v1})
        assert r.status_code == 200 and r.json()["version"] == v1
        assert run(f, "shop").json()["claims"]["access_token"] == {"tier": "gold"}

        audit = a.get("/v1/tenants/shop/audit").json()["entries"]
        ops = {(e["kind"], e["op"]) for e in audit}
        assert {("tenant", "create"), ("tenant", "update"), ("action", "deploy"), ("action", "rollback"),
                ("flow", "rollback")} <= ops, ops
        assert any(e["who"] == "admin:alice" and e["kind"] == "action" and e["new"] == v2 for e in audit)

        flow_id = run(f, "shop").json()["flow_id"]
        t0 = time.monotonic()
        while a.get(f"/v1/tenants/shop/runs/{flow_id}").status_code != 200:   # history is written after the answer
            assert time.monotonic() - t0 < 10, "the run was not recorded"
            time.sleep(0.02)
        assert a.delete("/v1/tenants/shop").status_code == 204
        # its actions, versions, flows, secrets and run history are gone from Redis; only its audit trail stays
        left = sorted(k for k, _ in _redis_values(redis_url) if "shop" in k or flow_id in k)
        assert left == ["actionpool:serve:audit:shop"], left
        r = run(f, "shop")
        assert r.status_code == 404 and r.json()["field"] == "tenant"
        assert a.get("/v1/tenants/shop").status_code == 404
        assert a.get("/v1/tenants/shop/actions/tag").status_code == 404
        assert "shop" not in [t["name"] for t in a.get("/v1/tenants").json()["tenants"]]
        # re-created: a fresh tenant (no actions, no flows), its audit trail kept
        assert a.put("/v1/tenants/shop", json={}).status_code == 201
        assert run(f, "shop").json()["actions"] == []
        assert any(e["op"] == "delete" and e["kind"] == "tenant" for e in a.get("/v1/tenants/shop/audit").json()[
            "entries"])
    assert one.proc.poll() is None and one.proc.pid == pid   # all of it without a restart


def test_two_replicas_on_one_redis_see_every_change_within_a_second(tmp_path: Path, redis_url: str) -> None:
    cfg = write_config(tmp_path, BASE.format(url=redis_url))
    a = start_serve(cfg)
    b = None
    try:
        b = start_serve(cfg)
        with admin(a) as ca, admin(b) as cb, flow_token(b) as fb:
            assert ca.put("/v1/tenants/duo", json={"denial_message": "one"}).status_code == 201
            within_1s(lambda: cb.get("/v1/tenants/duo").status_code == 200, "tenant created")
            ca.put("/v1/tenants/duo", json={"denial_message": "two"})
            within_1s(lambda: cb.get("/v1/tenants/duo").json()["denial_message"] == "two", "tenant updated")
            v1 = deploy(ca, "duo", "tag", TAG).json()["version"]
            within_1s(lambda: cb.get("/v1/tenants/duo/actions/tag").json().get("current") == v1, "deploy")
            fv = ca.put("/v1/tenants/duo/flows/post-login", json=["tag"]).json()["version"]
            within_1s(lambda: run(fb, "duo").json().get("versions") == {"tag": v1}, "flow put (served)")
            v2 = deploy(ca, "duo", "tag", TAG_V2).json()["version"]
            within_1s(lambda: run(fb, "duo").json()["versions"] == {"tag": v2}, "second deploy (served)")
            ca.post("/v1/tenants/duo/actions/tag/rollback")
            within_1s(lambda: run(fb, "duo").json()["versions"] == {"tag": v1}, "action rollback (served)")
            deploy(ca, "duo", "gate", GATE)
            f2 = ca.put("/v1/tenants/duo/flows/post-login", json=["gate", "tag"]).json()["version"]
            within_1s(lambda: cb.get("/v1/tenants/duo/flows/post-login").json()["version"] == f2, "flow reorder")
            ca.post("/v1/tenants/duo/flows/post-login/rollback")
            within_1s(lambda: cb.get("/v1/tenants/duo/flows/post-login").json()["version"] == fv, "flow rollback")
            assert ca.put("/v1/tenants/duo/secrets/API_KEY", json={"value": SECRET}).status_code == 204
            within_1s(lambda: [s["name"] for s in cb.get("/v1/tenants/duo/secrets").json()] == ["API_KEY"], "secret")
            assert ca.delete("/v1/tenants/duo/secrets/API_KEY").status_code == 204
            within_1s(lambda: cb.get("/v1/tenants/duo/secrets").json() == [], "secret deleted")
            # the other way round too, and a delete stops the tenant's flows on every replica
            assert cb.put("/v1/tenants/duo", json={"denial_message": "three"}).status_code == 200
            within_1s(lambda: ca.get("/v1/tenants/duo").json()["denial_message"] == "three", "update via b")
            assert ca.delete("/v1/tenants/duo").status_code == 204
            within_1s(lambda: run(fb, "duo").status_code == 404, "tenant deleted")
    finally:
        if b is not None:
            assert b.stop() == 0, b.output()[-3000:]
        assert a.stop() == 0, a.output()[-3000:]


def test_a_bad_deploy_answers_422_with_line_and_column_and_changes_nothing(one: Serve) -> None:
    with admin(one) as a, flow_token(one) as f:
        a.put("/v1/tenants/shop", json={})
        v1 = deploy(a, "shop", "tag", TAG).json()["version"]
        a.put("/v1/tenants/shop/flows/post-login", json=["tag"])
        before = a.get("/v1/tenants/shop/actions/tag").json()

        r = deploy(a, "shop", "tag", "def on_execute_post_login(event, api):\n    x = (1,\n")
        assert r.status_code == 422 and set(r.json()) >= {"error", "line", "column"}, r.text
        assert isinstance(r.json()["line"], int) and r.json()["line"] >= 2
        r = deploy(a, "shop", "tag", "def on_execute_pre_login(event, api):\n    pass\n")   # no post-login handler
        assert r.status_code == 422 and re.search(r"post.login", r.json()["error"]), r.text
        r = a.put("/v1/tenants/shop/actions/tag", content="api.state.set('x', ;\n",
                  headers={"Content-Type": "application/javascript"})
        assert r.status_code == 422 and r.json()["line"] == 1 and isinstance(r.json()["column"], int), r.text

        after = a.get("/v1/tenants/shop/actions/tag").json()
        assert after["current"] == v1 and after["versions"] == before["versions"]
        assert run(f, "shop").json()["versions"] == {"tag": v1}

        # flows: an unknown slug, bad CEL, a skip_to backwards, a bad shape: 422, the flow unchanged
        fv = a.get("/v1/tenants/shop/flows/post-login").json()["version"]
        for bad in (["tag", "ghost"], ["tag", {"if": "event.user.(", "deny": "x"}],
                    ["tag", {"if": "true", "skip_to": "tag"}], ["tag", 7], {"no": "list"}):
            r = a.put("/v1/tenants/shop/flows/post-login", json=bad)
            assert r.status_code == 422 and r.json()["error"], (bad, r.text)
        assert a.get("/v1/tenants/shop/flows/post-login").json()["version"] == fv
        # tenant settings: 422 naming the key, limits within the operator's caps
        for body, field in (({"failure": "maybe"}, "failure"), ({"allow_hosts": "x"}, "allow_hosts"),
                            ({"limits": {"action_timeout_s": 30}}, "limits.action_timeout_s"),
                            ({"limits": {"nope": 1}}, "limits.nope"), ({"colour": "red"}, "colour")):
            r = a.put("/v1/tenants/shop", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        assert a.put("/v1/tenants/shop", json={"limits": {"action_timeout_s": 1.5}}).status_code == 200
        # an unknown tenant on any tenant route: 404
        assert deploy(a, "nobody", "tag", TAG).status_code == 404
        assert a.put("/v1/tenants/nobody/flows/post-login", json=[]).status_code == 404
        assert a.put("/v1/tenants/nobody/secrets/API_KEY", json={"value": SECRET}).status_code == 404


def test_the_flow_token_cannot_manage(one: Serve) -> None:
    from actionpool.sidecar._routes import ROUTES

    sample = {"tenant": "shop", "slug": "tag", "trigger": "post-login", "name": "API_KEY", "a": "0" * 16,
              "b": "1" * 16, "flow_id": "abc"}
    with admin(one) as a, flow_token(one) as f:
        assert a.put("/v1/tenants/shop", json={}).status_code == 201
        managed = [r for r in ROUTES if r.role == "admin"]
        assert len(managed) >= 18
        for route in managed:
            path = route.path.format(**sample)
            r = f.request(route.method, path, json={} if route.method in ("PUT", "POST") else None)
            assert r.status_code == 403 and "may not manage" in r.json()["error"], (route.method, path, r.text)
            assert httpx.request(route.method, one.url + path).status_code == 401
        assert a.get("/v1/tenants/shop").json()["denial_message"] is None   # nothing changed
        assert run(a, "shop").status_code == 200   # the admin token may call flows
        assert run(f, "shop").status_code == 200


FETCHER = """
async def on_execute_post_login(event, api):
    res = await api.fetch("{url}/json")
    api.state.set("status", res["status"])
"""
SLEEPER = "import time\ndef on_execute_pre_login(event, api):\n    time.sleep(1.5)\n"


def test_tenant_settings_apply_at_once_allow_hosts_limits_and_failure(one: Serve, http_server: Any) -> None:
    with admin(one) as a, flow_token(one) as f:
        a.put("/v1/tenants/net", json={})
        deploy(a, "net", "fetcher", FETCHER.format(url=http_server.url))
        a.put("/v1/tenants/net/flows/post-login", json=["fetcher"])
        assert run(f, "net").json()["outcome"] == "deny" and http_server.requests == []   # not on its allowlist
        assert a.put("/v1/tenants/net", json={"allow_hosts": ["127.0.0.1"]}).status_code == 200
        out = run(f, "net").json()
        assert out["outcome"] == "allow" and out["state"]["fetcher"] == {"status": 200}, out
        a.put("/v1/tenants/net", json={"allow_hosts": []})
        sent = len(http_server.requests)
        assert run(f, "net").json()["outcome"] == "deny" and len(http_server.requests) == sent
        # the tenant's limits (within the operator's cap of 3 s) and its default failure policy
        deploy(a, "net", "sleeper", SLEEPER)
        a.put("/v1/tenants/net/flows/pre-login", json=["sleeper"])
        assert run(f, "net", "pre-login").json()["outcome"] == "allow"     # 1.5 s is within the 3 s cap
        a.put("/v1/tenants/net", json={"limits": {"action_timeout_s": 0.5}})
        out = run(f, "net", "pre-login").json()
        assert out["outcome"] == "deny" and out["denial"]["kind"] == "timeout", out
        a.put("/v1/tenants/net", json={"limits": {"action_timeout_s": 0.5}, "failure": "open"})
        out = run(f, "net", "pre-login").json()
        assert out["outcome"] == "allow" and out["actions"][0]["status"] == "failed_open", out
        # an action's own failure policy wins over the tenant's default
        deploy(a, "net", "sleeper", SLEEPER, failure="closed")
        assert run(f, "net", "pre-login").json()["outcome"] == "deny"


LEAKY = """
def on_execute_post_login(event, api):
    key = event.secrets.API_KEY
    api.state.set("names", sorted(event.secrets.keys()))
    api.state.set("reversed", key[::-1])
    api.log("info", "calling with key=" + key)
"""


def _redis_values(url: str) -> Iterator[tuple[str, bytes]]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=500):
            kind = client.type(key).decode()
            if kind == "string":
                yield key.decode(), client.get(key) or b""
            elif kind == "list":
                yield key.decode(), b"\n".join(client.lrange(key, 0, -1))
            elif kind == "hash":
                yield key.decode(), b"\n".join(k + b"=" + v for k, v in client.hgetall(key).items())
            elif kind == "set":
                yield key.decode(), b"\n".join(client.smembers(key))
            elif kind == "zset":
                yield key.decode(), b"\n".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
            else:
                yield key.decode(), client.dump(key) or b""
    finally:
        client.close()


def test_a_secret_never_appears_in_a_response_log_history_or_redis_value(one: Serve, redis_url: str) -> None:
    answers: list[str] = []
    with admin(one) as a, flow_token(one) as f:
        def keep(r: httpx.Response) -> httpx.Response:
            answers.append(r.text)
            return r

        keep(a.put("/v1/tenants/vault", json={"redact": ["user.email"]}))
        assert keep(a.put("/v1/tenants/vault/secrets/API_KEY", json={"value": SECRET})).status_code == 204
        assert keep(a.put("/v1/tenants/vault/secrets/OTHER_KEY", json={"value": OTHER})).status_code == 204
        r = keep(a.put("/v1/tenants/vault/secrets/SHORT", json={"value": "tiny"}))
        assert r.status_code == 422 and "tiny" not in r.text
        r = keep(deploy(a, "vault", "leaky", LEAKY, secrets=["API_KEY", "NOT_SET"]))
        assert r.status_code == 201 and r.json()["missing_secrets"] == ["NOT_SET"], r.text
        keep(a.put("/v1/tenants/vault/flows/post-login", json=["leaky"]))
        out = run(f, "vault").json()
        # the action sees exactly what it declared (and that exists): not OTHER_KEY, not the unset name
        assert out["state"]["leaky"] == {"names": ["API_KEY"], "reversed": SECRET[::-1]}, out
        # (the flow's own answer carries what the action chose to log: the gateway's business, not a leak)
        listing = keep(a.get("/v1/tenants/vault/secrets")).json()
        assert sorted(s["name"] for s in listing) == ["API_KEY", "OTHER_KEY"] and all("updated_at" in s for s in listing)
        run_id = out["flow_id"]

        def recorded() -> bool:
            return a.get(f"/v1/tenants/vault/runs/{run_id}").status_code == 200
        t0 = time.monotonic()
        while not recorded():
            assert time.monotonic() - t0 < 10, "the run was not recorded"
            time.sleep(0.05)
        history = keep(a.get(f"/v1/tenants/vault/runs/{run_id}"))
        assert "calling with key=" in history.text
        draft = keep(a.post("/v1/tenants/vault/actions/leaky/test", json={"trigger": "post-login", "event": {}}))
        assert draft.status_code == 200 and "calling with key=" in draft.text
        for path in ("/v1/tenants/vault", "/v1/tenants/vault/actions/leaky", "/v1/tenants/vault/audit",
                     "/v1/tenants/vault/flows/post-login", "/v1/drift", "/v1/tenants", "/openapi.json"):
            keep(a.get(path))
        keep(a.put("/v1/tenants/vault/secrets/API_KEY", json={"value": SECRET + "-2"}))   # rotated: the next run
        assert run(f, "vault").json()["state"]["leaky"]["reversed"] == (SECRET + "-2")[::-1]   # gets the new value
        keep(a.delete("/v1/tenants/vault/secrets/OTHER_KEY"))
        keep(a.delete("/v1/tenants/vault/secrets/API_KEY"))   # deleted: the action no longer receives it
        assert run(f, "vault").json()["actions"][0]["status"] != "ok"
        metrics = a.get("/metrics").text
    for text in (*answers, metrics):
        assert SECRET not in text and OTHER not in text and SECRET[:12] not in text
    for key, value in _redis_values(redis_url):
        for s in (SECRET, OTHER, SECRET + "-2"):
            assert s.encode() not in value and s.encode() not in key.encode(), key
    one.stop()
    log = one.output()
    assert SECRET not in log and OTHER not in log


JS_TIER = "const domain = event.user?.email?.split('@')[1] ?? '';\n" \
          "api.state.set('tier', domain === 'corp.example' ? 'enterprise' : 'self-serve');\n"
PY_ROUTE = "def on_execute_post_login(event, api):\n" \
           "    api.session.setCustomClaim('corporate', event.step['js-tier']['tier'] == 'enterprise')\n"


def test_a_js_and_a_python_action_deployed_through_the_api_run_in_one_flow(one: Serve) -> None:
    with admin(one) as a, flow_token(one) as f:
        a.put("/v1/tenants/mix", json={})
        # JavaScript by Content-Type, to a slug no config file names (it ran as Python before: the bug)
        r = a.put("/v1/tenants/mix/actions/js-tier", content=JS_TIER, headers={"Content-Type": "application/javascript"})
        assert r.status_code == 201, r.text
        r = a.put("/v1/tenants/mix/actions/py-route", content=PY_ROUTE, headers={"Content-Type": "text/x-python"})
        assert r.status_code == 201, r.text
        assert a.put("/v1/tenants/mix/flows/post-login", json=["js-tier", "py-route"]).status_code == 200
        out = run(f, "mix", event={"user": {"email": "ada@corp.example"}}).json()
        assert out["outcome"] == "allow", out
        assert out["state"]["js-tier"] == {"tier": "enterprise"} and out["claims"]["access_token"] == {"corporate": True}
        listing = a.get("/v1/tenants/mix/actions/js-tier").json()
        assert [v.get("language") for v in listing["versions"]] == ["javascript"], listing
        # the JSON body says the language too; a raw redeploy without a Content-Type keeps the slug's language
        r = a.put("/v1/tenants/mix/actions/js-tier", json={"source": JS_TIER.replace("self-serve", "self"),
                                                             "language": "javascript"})
        assert r.status_code == 201
        r = a.put("/v1/tenants/mix/actions/js-tier", content=JS_TIER + "// again\n")
        assert r.status_code == 201
        assert run(f, "mix", event={"user": {"email": "bo@x.example"}}).json()["state"]["js-tier"] == {"tier": "self-serve"}


GATE_ACTIONS = {
    "first": "def on_execute_post_login(event, api):\n    api.state.set('ran', True)\n",
    "middle": "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('middle', True)\n",
    "last": "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('last', True)\n",
}


def test_skip_to_and_allow_blocks_route_a_flow(one: Serve) -> None:
    with admin(one) as a, flow_token(one) as f:
        a.put("/v1/tenants/route", json={})
        for slug, src in GATE_ACTIONS.items():
            assert deploy(a, "route", slug, src).status_code == 201
        flow = ["first",
                {"if": "event.user.email.endsWith('@vip.example')", "skip_to": "last"},
                {"if": "event.user.email.endsWith('@trusted.example')", "allow": True},
                "middle",
                {"if": "event.user.email.endsWith('@evil.example')", "deny": "evil", "message": "Go away."},
                "last"]
        r = a.put("/v1/tenants/route/flows/post-login", json=flow)
        assert r.status_code == 200, r.text

        def statuses(email: str) -> tuple[dict[str, Any], dict[str, str]]:
            out = run(f, "route", event={"user": {"email": email}}).json()
            return out, {x["slug"]: x["status"] for x in out["actions"]}

        out, st = statuses("a@vip.example")     # skip_to: middle and the blocks in between are skipped
        assert out["outcome"] == "allow" and out["claims"]["access_token"] == {"last": True}, out
        assert st["middle"] == "skipped" and st["last"] == "ok"
        out, st = statuses("a@trusted.example")   # allow: ends the flow allowed, the rest skipped
        assert out["outcome"] == "allow" and out["claims"]["access_token"] == {} and st["last"] == "skipped", out
        out, st = statuses("a@evil.example")
        assert out["outcome"] == "deny" and out["denial"]["reason"] == "evil", out
        out, st = statuses("a@plain.example")
        assert out["claims"]["access_token"] == {"middle": True, "last": True}


SEED = "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('from', 'config')\n"
CONFIGURED = BASE + """
    [tenants.boot]
    denial_message = "From the config."
    [tenants.boot.secrets]
    API_KEY = {{ env = "BOOT_KEY" }}
    [tenants.boot.actions.seeded]
    file = "actions/seeded.py"
    secrets = ["API_KEY"]
    [tenants.boot.flows]
    post-login = ["seeded"]
"""


def test_config_bootstraps_an_empty_store_then_drift_is_reported_and_sync_config_applies_it(
        tmp_path: Path, redis_url: str) -> None:
    cfg = write_config(tmp_path, CONFIGURED.format(url=redis_url), {"seeded.py": SEED})
    env = {"BOOT_KEY": SECRET}
    s = start_serve(cfg, env)
    try:
        with admin(s) as a, flow_token(s) as f:
            assert run(f, "boot").json()["claims"]["access_token"] == {"from": "config"}
            assert a.get("/v1/tenants/boot").json()["denial_message"] == "From the config."
            assert a.get("/v1/drift").json()["drift"] == []
            audit = a.get("/v1/tenants/boot/audit").json()["entries"]
            assert audit and all(e["who"] == "config" and e["op"] == "sync" for e in audit), audit
            # runtime changes: the store now differs from the config
            a.put("/v1/tenants/boot", json={"denial_message": "Changed at runtime."})
            deploy(a, "boot", "seeded", SEED.replace("'config'", "'api'"), secrets=["API_KEY"])
            a.put("/v1/tenants/extra", json={})
            deploy(a, "boot", "api-only", SEED.replace("'config'", "'api-only'"))
    finally:
        assert s.stop() == 0, s.output()[-3000:]

    s = start_serve(cfg, env)   # the store is not empty: it wins, and the differences are drift
    try:
        with admin(s) as a, flow_token(s) as f:
            assert run(f, "boot").json()["claims"]["access_token"] == {"from": "api"}
            drift = a.get("/v1/drift").json()["drift"]
            kinds = {(d["tenant"], d["kind"], d["key"]) for d in drift}
            assert {("boot", "tenant", "denial_message"), ("boot", "action", "seeded"), ("boot", "action", "api-only"),
                    ("extra", "tenant", "extra")} <= kinds, drift
            assert SECRET not in str(drift)
    finally:
        assert s.stop() == 0
    log = s.output()
    assert re.search(r"drift: tenant boot: setting denial_message", log), log[-3000:]
    assert re.search(r"drift: tenant boot: action seeded", log) and SECRET not in log

    s = start_serve(cfg, env, args=("--sync-config",))   # the config wins for the tenants it names
    try:
        with admin(s) as a, flow_token(s) as f:
            assert run(f, "boot").json()["claims"]["access_token"] == {"from": "config"}
            assert a.get("/v1/tenants/boot").json()["denial_message"] == "From the config."
            drift = a.get("/v1/drift").json()["drift"]
            assert sorted((d["tenant"], d["kind"], d["key"]) for d in drift) == [
                ("boot", "action", "api-only"), ("extra", "tenant", "extra")], drift   # store-only: kept, reported
            assert a.get("/v1/tenants/extra").status_code == 200
            audit = a.get("/v1/tenants/boot/audit").json()["entries"]
            assert any(e["op"] == "sync" and e["kind"] == "action" for e in audit[:5]), audit
    finally:
        assert s.stop() == 0


def test_a_config_action_that_does_not_validate_stops_the_start(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, """
        [server]
        token_env = "AP_TOKEN"
        [tenants.t.actions.bad]
        file = "actions/bad.py"
        [tenants.t.flows]
        post-login = ["bad"]
    """, {"bad.py": "def on_execute_post_login(event, api)\n    pass\n"})
    with pytest.raises(AssertionError) as info:
        start_serve(cfg, timeout=60)
    text = str(info.value)
    assert "tenants.t.actions.bad.file" in text and "line 1" in text, text[-2000:]
