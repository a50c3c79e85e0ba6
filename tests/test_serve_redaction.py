"""Run history never holds what it promises to redact, and never grows past its per-record cap.

Real ``actionpool serve`` processes on loopback with real workers: an action
copies the tenant's secret and the event's redact-path values (an e-mail, an
IP) into every part of the result, as values and as object keys; the stored
run (``GET /v1/tenants/{t}/runs/{flow_id}``) must hold none of them, while
the answer to the gateway keeps them. The pure parts of runner/_history.py
(the redaction rules, the linear pattern, the truncation) are checked
directly below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from actionpool.runner._errors import ConfigError
from actionpool.runner._history import (MIN_SECRET_CHARS, REDACTED, Redactor, build_record, flow_redactor,
                                        truncate)
from actionpool.sidecar._config import load_config
from serve_fixtures import start_serve, write_config

pytestmark = pytest.mark.timeout(120)

SECRET = "k9-Secret-Value-3141"
EMAIL = "ada.lovelace@example.com"
IP = "127.0.0.77"
ENV = {"RED_API_KEY": SECRET}

COPY_EVERYWHERE = """
    def on_execute_post_login(event, api):
        key, email, ip = event.secrets.API_KEY, event.user.email, event.request.ip
        api.state.set(key, "a secret as a state key")
        api.state.set("copy", {"email": email, "ip": ip, email: ip, "nested": [{ip: "x"}]})
        api.user.setAppMetadata({key: email, "last_ip": ip})
        api.user.setUserMetadata({"contact": "write to " + email})
        api.session.setCustomClaim(key, "a secret as a claim name")
        api.session.setCustomClaim("email", email)
        api.idToken.setCustomClaim("seen_from_" + ip, True)
        api.log("info", f"login of {email} from {ip} with key {key}")
"""

REGISTER = """
    def on_execute(event, api):
        key, email, ip = event.secrets.API_KEY, event.user.email, event.request.ip
        api.user.setUserId("auth0|" + email)
        api.state.set(key, ip)
        if event.request.get("deny"):
            api.access.deny(f"blocked {email} at {ip} (key {key})", "Nope.")
"""

BIG = """
    def on_execute_post_login(event, api):
        api.state.set("blob", "x" * 200000)
        api.state.set("many", list(range(5000)))
        for i in range(50):
            api.log("info", "line %d " % i + "y" * 3000)
        api.session.setCustomClaim("tier", "gold")
"""

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    {server_extra}
    [tenants.red]
    redact = ["user.email", "request.ip"]
    [tenants.red.secrets]
    API_KEY = {{ env = "RED_API_KEY" }}
    [tenants.red.actions.copy-everywhere]
    secrets = ["API_KEY"]
    file = "actions/copy_everywhere.py"
    [tenants.red.actions.register]
    secrets = ["API_KEY"]
    file = "actions/register.py"
    [tenants.red.flows]
    post-login = ["copy-everywhere"]
    pre-user-registration = ["register"]
    [tenants.bigco.flows]
    post-login = ["big"]
    [tenants.bigco.actions.big]
    file = "actions/big.py"
"""


def config(tmp_path: Path, server_extra: str = "") -> Path:
    return write_config(tmp_path, CONFIG.format(server_extra=server_extra),
                        {"copy_everywhere.py": COPY_EVERYWHERE, "register.py": REGISTER, "big.py": BIG})


def recorded(c: httpx.Client, tenant: str, flow_id: str) -> httpx.Response:
    """The stored run, once the background history write has landed (polled with a deadline)."""
    deadline = time.monotonic() + 15
    while (run := c.get(f"/v1/tenants/{tenant}/runs/{flow_id}")).status_code == 404:
        assert time.monotonic() < deadline, "the run was never recorded"
        time.sleep(0.02)
    assert run.status_code == 200, run.text
    return run


def test_secret_keys_and_redact_path_values_never_reach_the_stored_run(tmp_path: Path) -> None:
    s = start_serve(config(tmp_path), ENV)
    try:
        with s.client() as c:
            event = {"user": {"email": EMAIL}, "request": {"ip": IP}}
            login = c.post("/v1/tenants/red/flows/post-login", json=event)
            signup = c.post("/v1/tenants/red/flows/pre-user-registration",
                            json={**event, "request": {"ip": IP, "deny": 1}})
            assert login.status_code == signup.status_code == 200
            # the gateway's answer is not history: it keeps the real values
            assert login.json()["claims"]["id_token"] == {f"seen_from_{IP}": True}
            assert signup.json()["outcome"] == "deny" and EMAIL in signup.json()["denial"]["reason"]
            runs = {}
            for answer in (login.json(), signup.json()):
                run = recorded(c, "red", answer["flow_id"])
                for needle in (SECRET, EMAIL, IP):
                    assert needle not in run.text, f"{needle} in the stored run: {run.text[:2000]}"
                runs[answer["trigger"]] = rec = run.json()
                assert rec["event"]["user"]["email"] == REDACTED and rec["event"]["request"]["ip"] == REDACTED
                assert rec.get("truncated") is None
            res = runs["post-login"]["result"]
            state = res["state"]["copy-everywhere"]
            assert state[REDACTED] == "a secret as a state key"  # the secret as a key
            assert state["copy"]["email"] == state["copy"]["ip"] == REDACTED
            assert REDACTED in state["copy"] and state["copy"]["nested"] == [{REDACTED: "x"}]
            assert res["app_metadata"] == {REDACTED: REDACTED, "last_ip": REDACTED}
            assert res["user_metadata"] == {"contact": f"write to {REDACTED}"}
            assert res["claims"]["access_token"] == {REDACTED: "a secret as a claim name", "email": REDACTED}
            assert res["claims"]["id_token"] == {f"seen_from_{REDACTED}": True}
            assert res["logs"][0]["message"] == f"login of {REDACTED} from {REDACTED} with key {REDACTED}"
            res = runs["pre-user-registration"]["result"]
            assert res["user_id"] == f"auth0|{REDACTED}"
            assert res["state"]["register"] == {REDACTED: REDACTED}
            assert res["denial"]["reason"] == f"blocked {REDACTED} at {REDACTED} (key {REDACTED})"

            # a shadow version's disagreement is kept for the listing: redacted the same way
            shadow = ("def on_execute_post_login(event, api):\n"
                      "    api.session.setCustomClaim(event.secrets.API_KEY, 'shadow ' + event.user.email)\n")
            assert c.put("/v1/tenants/red/actions/copy-everywhere?shadow=1", content=shadow).status_code == 201
            assert c.post("/v1/tenants/red/flows/post-login", json=event).json()["outcome"] == "allow"
            deadline = time.monotonic() + 20
            while not (listing := c.get("/v1/tenants/red/actions/copy-everywhere")).json()["shadow_disagreements"]:
                assert time.monotonic() < deadline, "no shadow disagreement recorded"
                time.sleep(0.05)  # shadow runs finish after the answer
            for needle in (SECRET, EMAIL, IP):
                assert needle not in listing.text, listing.text[:2000]
            claims = listing.json()["shadow_disagreements"][0]["differences"]["claims"]
            assert claims["shadow"]["access_token"] == {REDACTED: f"shadow {REDACTED}"}
    finally:
        assert s.stop() == 0, s.output()[-2000:]


def test_an_oversized_record_is_stored_truncated_marked_and_bounded(tmp_path: Path) -> None:
    cap = 16384
    s = start_serve(config(tmp_path, f"history_record_max_bytes = {cap}"), ENV)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/bigco/flows/post-login", json={"user": {}, "note": "n" * 30000})
            assert r.status_code == 200 and r.json()["outcome"] == "allow"
            assert len(r.json()["state"]["big"]["blob"]) == 200000  # the answer itself is whole
            run = recorded(c, "bigco", r.json()["flow_id"])
            assert len(run.content) <= cap, len(run.content)
            rec = run.json()  # still valid JSON
            assert rec["truncated"] is True and rec["original_bytes"] > cap
            assert "…[truncated " in run.text
            # what names the run and its decision comes first and survives the cut
            assert rec["flow_id"] == r.json()["flow_id"] and rec["result"]["outcome"] == "allow"
            assert rec["result"]["claims"]["access_token"] == {"tier": "gold"}
            blob = rec["result"]["state"]["big"].get("blob", "")
            assert len(blob) < 200000
    finally:
        assert s.stop() == 0, s.output()[-2000:]


def test_a_secret_too_short_to_redact_is_a_config_error_at_load(tmp_path: Path) -> None:
    path = config(tmp_path)
    short = "x" * (MIN_SECRET_CHARS - 1)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"RED_API_KEY": short, "AP_TOKEN": "t"})
    assert str(info.value).startswith(f"{path}: tenants.red.secrets.API_KEY: is {len(short)} characters long")
    load_config(path, env={"RED_API_KEY": "x" * MIN_SECRET_CHARS, "AP_TOKEN": "t"})
    # the real process refuses to start, naming the key, and never prints the value
    env = {**os.environ, "RED_API_KEY": short, "AP_TOKEN": "t"}
    p = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(path), "--port", "1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "tenants.red.secrets.API_KEY" in p.stderr and short not in p.stderr
    with pytest.raises(ConfigError, match="server.history_record_max_bytes: must be at least"):
        load_config(config(tmp_path, "history_record_max_bytes = 100"), env={**ENV, "AP_TOKEN": "t"})


# ------------------------------------------------------------------ the rules, directly


def test_path_values_exact_at_any_length_substring_from_the_minimum() -> None:
    event = {"user": {"email": "a@b.co", "nickname": "al", "age": 37, "name": {"first": "Ada", "last": "Byron"}},
             "request": {"ip": "::1"}}
    red = flow_redactor(("longsecret-1",), ("user.email", "user.nickname", "request.ip", "user.name"), event)
    out = red({"nick": "al", "al": 1, "log": "hi al, mail a@b.co from ::1", "ip": "::1", "ada": "Ada Byron",
               "first": "Ada", "k": "x longsecret-1 y", "calm": "calm", "age": 37})
    assert out == {"nick": REDACTED, REDACTED: 1,                   # equal: at any length
                   "log": f"hi al, mail {REDACTED} from ::1",       # inside text: only values of 5+ characters
                   "ip": REDACTED, "ada": f"Ada {REDACTED}", "first": REDACTED,
                   "k": f"x {REDACTED} y", "calm": "calm", "age": 37}
    # a redact path that is absent or not a value redacts nothing; keys redacted to the same text stay apart
    assert flow_redactor((), ("user.missing", "user.email.x"), event)({"a@b.co": 1}) == {"a@b.co": 1}
    assert Redactor(("secret-a-1", "secret-b-2"))({"secret-a-1": 1, "secret-b-2": 2}) == \
        {REDACTED: 1, f"{REDACTED}#2": 2}


def test_overlapping_secrets_longest_first_and_many_secrets_stay_linear() -> None:
    red = Redactor(("password1", "password123", "word1234"))
    assert red.text("x password123 y password1 z word1234") == f"x {REDACTED} y {REDACTED} z {REDACTED}"
    # overlapping in the text: the union goes (one at a time left "345678", six characters of the second)
    assert Redactor(("abcdefgh12", "gh12345678")).text("x abcdefgh12345678 y") == f"x {REDACTED} y"
    assert red.text("password1234") == REDACTED  # "password1" and "word1234" overlap
    many = Redactor(tuple(f"tenant-secret-{i:05d}" for i in range(20000)))
    # shares a prefix with every secret at every position ("." last: a long text *ending* in a secret's
    # prefix is taken for one cut mid-secret, and its tail is redacted; see test_a_secret_cut_before_redaction...)
    hostile = "tenant-secret-0" * 50000 + "."
    t0 = time.process_time()
    assert many.text(hostile) == hostile
    assert many.text("..tenant-secret-12345..") == f"..{REDACTED}.."
    # a plain alternation would try 20,000 words at 750,000 positions; the trie touches a few per position
    assert time.process_time() - t0 < 5.0


def test_build_record_redacts_fetches_and_truncate_always_fits() -> None:
    body: dict[str, Any] = {"flow_id": "f1", "trigger": "post-login", "execution_id": "e1", "versions": {},
                            "actions": [], "outcome": "allow", "denial": None, "logs": []}
    fetches = [{"method": "POST", "url": "http://127.0.0.1:9/x?key=longsecret-1", "status": 200,
                "headers": {}, "body": "hello a@b.co"}]
    rec = build_record(tenant="t", paths=("user.email",), secrets=("longsecret-1",), event={"user": {"email": "a@b.co"}},
                       body=body, seconds=0.001, recorded_at=1.0, fetches=fetches, max_bytes=1 << 20)
    assert rec["fetches"][0]["url"] == f"http://127.0.0.1:9/x?key={REDACTED}"
    assert rec["fetches"][0]["body"] == f"hello {REDACTED}"
    deep: Any = "leaf"
    for _ in range(60):  # 120 levels: beyond anything an event (64) or an api value (32) can reach
        deep = {"k" * 30: [deep, "v" * 100]}
    for record in ({"flow_id": "f", "result": {"outcome": "deny", "logs": ["z" * 100000] * 20}},
                   {"flow_id": "f", "result": {"outcome": "deny"}, "event": deep},
                   {"flow_id": "f", "result": {"outcome": "allow"}, "event": {str(i): i for i in range(50000)}}):
        for cap in (4096, 10000, 65536):
            out = truncate(record, cap)
            data = orjson.dumps(out)
            assert len(data) <= cap, (cap, len(data))
            assert out.get("truncated") is (True if len(orjson.dumps(record)) > cap else None)
            assert out["result"]["outcome"] == record["result"]["outcome"]
    small = {"flow_id": "f", "result": {"outcome": "allow"}}
    assert truncate(small, 4096) is small


ODD_SECRET = "p@ss/w+rd=\"Q7\"\\z-2718"   # changes when URL-encoded or JSON-escaped

CUT_AND_ENCODE = """
    import base64
    import json
    from urllib.parse import quote, quote_plus

    def on_execute_post_login(event, api):
        key = event.secrets.API_KEY
        basic = base64.b64encode(("svc-user:" + key).encode()).decode()
        api.log("info", "a" * (4096 - 9) + key)                 # cut at 4096 bytes before history sees it
        api.log("info", "url https://127.0.0.1/x?k=" + quote(key, safe="") + "&p=" + quote_plus(key))
        api.log("info", "json " + json.dumps({"key": key}))
        api.user.setAppMetadata({"phone": event.user.phone, "ratio": event.user.ratio, "n": 5551234567 + 1})
        api.log("info", "auth Basic " + basic)
"""


def test_a_secret_cut_before_redaction_encoded_or_copied_as_a_number_never_reaches_the_stored_run(
        tmp_path: Path) -> None:
    """Probes that leaked: a log line cut at max_log_message_bytes mid-secret left the secret's first part;
    a URL-encoded or JSON-escaped secret was not recognised; a numeric redact-path value copied into the
    result as a number stayed."""
    cfg = write_config(tmp_path, """
        [runner]
        pool_size = 1
        max_workers = 2
        [server]
        token_env = "AP_TOKEN"
        [tenants.odd]
        redact = ["user.phone", "user.ratio"]
        [tenants.odd.secrets]
        API_KEY = { env = "ODD_API_KEY" }
        [tenants.odd.actions.cut]
        secrets = ["API_KEY"]
        file = "actions/cut.py"
        [tenants.odd.flows]
        post-login = ["cut"]
    """, {"cut.py": CUT_AND_ENCODE})
    s = start_serve(cfg, {"ODD_API_KEY": ODD_SECRET})
    try:
        with s.client() as c:
            answer = c.post("/v1/tenants/odd/flows/post-login", json={"user": {"phone": 5551234567, "ratio": 0.125}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["outcome"] == "allow", answer.text
            run = recorded(c, "odd", answer.json()["flow_id"])
            from urllib.parse import quote
            text = run.text
            for needle in (ODD_SECRET[:8], quote(ODD_SECRET, safe=""), quote(ODD_SECRET, safe="")[:12],
                           orjson.dumps(ODD_SECRET).decode()[1:12], "5551234567", "0.125"):
                assert needle not in text, f"{needle!r} in the stored run: {text[-1500:]}"
            res = run.json()["result"]
            assert res["app_metadata"] == {"phone": REDACTED, "ratio": REDACTED, "n": 5551234568}
            first = res["logs"][0]["message"]
            assert first.endswith(REDACTED) and first.startswith("a" * 4000)
            assert res["logs"][1]["message"] == f"url https://127.0.0.1/x?k={REDACTED}&p={REDACTED}"
            assert res["logs"][2]["message"] == f'json {{"key": "{REDACTED}"}}'
            import base64
            basic = base64.b64encode(("svc-user:" + ODD_SECRET).encode()).decode()
            assert basic not in text and basic[12:30] not in text and REDACTED in res["logs"][3]["message"]
            # the /test answer (a debugging surface like replay's report) is redacted the same way
            draft = "def on_execute_post_login(event, api):\n    api.log('info', 'key ' + event.secrets.API_KEY)\n"
            t = c.post("/v1/tenants/odd/actions/cut/test",
                       json={"trigger": "post-login", "event": {"user": {"phone": 5551234567}}, "source": draft})
            assert t.status_code == 200, t.text
            assert ODD_SECRET[:8] not in t.text and t.json()["logs"][0]["message"] == f"key {REDACTED}"
    finally:
        s.stop()


def test_encoded_forms_are_matched_in_any_mix_and_stay_linear_in_the_number_of_secrets() -> None:
    from urllib.parse import quote, quote_plus

    secret = 'p@ss/w+rd="Q7"\\é-2718'
    red = Redactor((secret,), ("a+b@example.com",))
    for form in (quote(secret, safe=""), quote(secret, safe="").replace("%2F", "%2f"), quote_plus(secret),
                 quote(secret, safe="/+=@"), orjson.dumps({"k": secret}).decode(), json_ascii(secret)):
        assert secret[:6] not in red.text(f"x {form} y") and red.text(f"x {form} y").count(REDACTED) == 1, form
    assert red.text("/u/a%2Bb%40example.com?x") == f"/u/{REDACTED}?x"
    # a trie over the characters' forms: 2,000 secrets with reserved characters cost what 20 do
    many = Redactor(tuple(f"tok/{i:05d}+abcdefgh" for i in range(2000)))
    t0 = time.process_time()
    assert many.text("tok/0" * 200000 + ".") == "tok/0" * 200000 + "."
    assert many.text("x tok%2F01234%2Babcdefgh y") == f"x {REDACTED} y"
    assert time.process_time() - t0 < 5.0


def json_ascii(s: str) -> str:
    import json

    return json.dumps({"k": s})  # ensure_ascii: \u00e9, \" and \\
