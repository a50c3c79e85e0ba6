"""The management API attacked: what a hostile admin, the flow token or a stranger tried, and what broke.

Each test here failed before its fix (named in the test's docstring). Real ``actionpool serve`` processes,
real worker processes, real sockets; sources built to be adversarial.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from actionpool.runner import _validate
from actionpool.runner.hosting import (
    INLINE_SOURCE_BYTES,
    ValidationBusy,
    validate_source_async,
)
from actionpool.sidecar._diff import MAX_LINE_PAIRS, opcodes, unified
from serve_fixtures import ADMIN, AUTH, Serve, start_serve, write_config

MEMORY = """
    [runner]
    pool_size = 1
    max_workers = 4
    [runner.limits]
    action_timeout_s = 20.0
    [server]
    token_env = "AP_TOKEN"
    admin_token_env = "AP_ADMIN"
"""

HANDLER = "def on_execute_post_login(event, api):\n    pass\n"
# Sleeps until the test has done its deed mid-flight, then puts the secret where history would keep it.
SLOW_SECRET = ("import time\n"
               "def on_execute_post_login(event, api):\n"
               "    time.sleep(3)\n"
               "    api.access_token.set_custom_claim('key', event.secrets.get('KEY', 'none'))\n"
               "    print('key is', event.secrets.get('KEY', 'none'))\n")
VALUE = "sk_live_Rt5yU8iO0pLmN3"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = start_serve(write_config(tmp_path, MEMORY))
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-3000:]


def admin(s: Serve) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers=ADMIN, timeout=120)


def _apply(a: str, diff: str) -> str:
    """``a`` with a unified diff applied (each hunk's context and removals checked against ``a``)."""
    al, out, pos = a.splitlines(keepends=True), [], 0
    lines = diff.splitlines(keepends=True)[2:]
    i = 0
    while i < len(lines):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", lines[i])
        assert m, lines[i]
        start = int(m.group(1)) - (1 if int(m.group(2) or 1) else 0)
        out += al[pos:start]
        pos, i = start, i + 1
        while i < len(lines) and not lines[i].startswith("@@"):
            tag, text = lines[i][0], lines[i][1:]
            if tag in " -":
                assert al[pos] == text
                pos += 1
            if tag in " +":
                out.append(text)
            i += 1
    return "".join(out + al[pos:])


# ------------------------------------------------------------------ CPU on the loop: the diff


def _adversarial(n: int) -> tuple[str, str]:
    """Two sources of short lines that each repeat just under difflib's "popular line" threshold.

    difflib's matcher is quadratic or worse on them: 12,000 lines (100 kB) held the event loop 19 s.
    """
    k = 150
    return (HANDLER + "".join(f"v{i % k} = 1\n" for i in range(n)),
            HANDLER + "".join(f"v{(i * 7) % k} = 1\n" for i in range(n)))


def test_diff_unit_is_a_correct_unified_diff_and_bounded() -> None:
    """Small inputs: a patch that turns a into b, hunks like difflib's; a large middle is shown whole."""
    r = random.Random(7)
    for _ in range(2000):
        a = "".join(r.choice("abcde\n") for _ in range(r.randint(0, 50))) + "\n"
        b = list(a)
        for _ in range(r.randint(0, 5)):
            if b and r.random() < 0.5:
                del b[r.randrange(len(b))]
            else:
                b.insert(r.randint(0, len(b)), r.choice("abxy\n"))
        b2 = "".join(b) + "\n"
        for pairs in (MAX_LINE_PAIRS, 3, 0):
            diff, exact = unified(a, b2, "a", "b", pairs)
            assert (diff == "") == (a == b2)
            if diff:
                assert diff.startswith("--- a\n+++ b\n@@ -")
                assert _apply(a, diff) == b2
    a, b = _adversarial(30_000)
    ops, exact = opcodes(a.splitlines(True), b.splitlines(True))
    assert not exact and [o[0] for o in ops] == ["equal", "replace"]
    diff, exact = unified("x\n" + "same\n" * 10, "y\n" + "same\n" * 10, "a", "b")
    assert exact and diff == "--- a\n+++ b\n@@ -1,4 +1,4 @@\n-x\n+y\n same\n same\n same\n"


def test_a_diff_of_adversarial_sources_is_bounded(serve: Serve) -> None:
    """Before: difflib over the whole sources on the event loop; 30,000 lines took minutes (the test timed out).

    Fixed in sidecar/_diff.py (a bounded middle, on a thread, one at a time): the answer is a correct
    diff marked ``exact: false``, and other calls are answered meanwhile.
    """
    a, b = _adversarial(30_000)
    with admin(serve) as c:
        assert c.put("/v1/tenants/acme", json={}).status_code == 201
        va = c.put("/v1/tenants/acme/actions/big", json={"source": a, "language": "python"}).json()["version"]
        vb = c.put("/v1/tenants/acme/actions/big", json={"source": b, "language": "python"}).json()["version"]
        r = c.get(f"/v1/tenants/acme/actions/big/versions/{va}/diff/{vb}")
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["exact"] is False and _apply(a, got["diff"]) == b
        small = c.put("/v1/tenants/acme/actions/big", json={"source": b + "x = 2\n", "language": "python"})
        r = c.get(f"/v1/tenants/acme/actions/big/versions/{vb}/diff/{small.json()['version']}").json()
        assert r["exact"] is True and r["diff"].endswith(" v143 = 1\n+x = 2\n")


# ------------------------------------------------------------------ deletes racing flows


def _busy(s: Serve, c: httpx.Client) -> None:
    """Wait (bounded) until a worker is running an execution: the flow is in flight, its action running."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"^actionpool_workers_busy ([0-9.]+)$", c.get("/metrics").text, re.MULTILINE)
        if m and float(m.group(1)) >= 1:
            return
        time.sleep(0.02)   # polling a condition with a deadline
    raise AssertionError("the flow never started running")


def _run_in_background(s: Serve, tenant: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=60) as f:
            out["r"] = f.post(f"/v1/tenants/{tenant}/flows/post-login", json={"user": {"user_id": "u1"}})

    t = threading.Thread(target=go)
    t.start()
    return t, out


def _slow_tenant(c: httpx.Client, tenant: str) -> None:
    assert c.put(f"/v1/tenants/{tenant}", json={}).status_code == 201
    assert c.put(f"/v1/tenants/{tenant}/secrets/KEY", json={"value": VALUE}).status_code == 204
    assert c.put(f"/v1/tenants/{tenant}/actions/slow", json={"source": SLOW_SECRET, "language": "python",
                                                              "secrets": ["KEY"]}).status_code == 201
    assert c.put(f"/v1/tenants/{tenant}/flows/post-login", json=["slow"]).status_code == 200


def _recorded(c: httpx.Client, tenant: str, flow_id: str) -> httpx.Response:
    """The run record, once the history thread has written it (bounded poll); the last answer otherwise."""
    deadline = time.monotonic() + 5
    while True:
        r = c.get(f"/v1/tenants/{tenant}/runs/{flow_id}")
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)   # polling a condition with a deadline


def test_a_flow_in_flight_when_its_tenant_is_deleted_and_re_created_leaves_no_history(serve: Serve) -> None:
    """Before: the in-flight flow's run record was written after the delete, into the re-created tenant's
    history, and with the secret in clear (redacted with the new tenant's secrets: none).

    Fixed in sidecar/_server.py (_flow/_record: the tenant's incarnation and secrets captured at start).
    """
    with admin(serve) as c:
        _slow_tenant(c, "gone")
        t, out = _run_in_background(serve, "gone")
        _busy(serve, c)
        assert c.delete("/v1/tenants/gone").status_code == 204
        assert c.put("/v1/tenants/gone", json={}).status_code == 201
        t.join(60)
        r = out["r"]
        assert r.status_code == 200, r.text     # one answer: the flow began before the delete
        # The re-created tenant's history holds nothing of its predecessor's (give the history thread its time:
        # a record that would land is written within this bound).
        got = _recorded(c, "gone", r.json()["flow_id"])
        assert got.status_code == 404, got.text
        assert VALUE not in got.text


def test_a_secret_deleted_while_a_flow_runs_is_still_redacted_from_its_record(serve: Serve) -> None:
    """Before: the record was redacted with the secrets of its write time, so a secret deleted mid-flight
    was stored in clear in run history. Fixed with the values captured when the flow started."""
    with admin(serve) as c:
        _slow_tenant(c, "acme")
        t, out = _run_in_background(serve, "acme")
        _busy(serve, c)
        assert c.delete("/v1/tenants/acme/secrets/KEY").status_code == 204
        t.join(60)
        r = out["r"]
        assert r.status_code == 200 and VALUE in r.text   # the login's answer carries what the action set
        got = _recorded(c, "acme", r.json()["flow_id"])
        assert got.status_code == 200, got.text
        assert VALUE not in got.text and "[redacted]" in got.text


def _head_then_body(s: Serve, method: str, path: str, body: bytes) -> tuple[socket.socket, bytes]:
    """A request whose head is sent now and whose body is sent later (by the caller): a slow upload."""
    host, port = s.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{next(iter(ADMIN))}: {ADMIN['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head)
    return sock, body


def _answer(sock: socket.socket, body: bytes) -> int:
    with sock:
        sock.sendall(body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("method,path,body", [
    ("PUT", "/v1/tenants/race/secrets/KEY", b'{"value": "sk_live_Rt5yU8iO0pLmN3"}'),
    ("PUT", "/v1/tenants/race/flows/post-login", b'["tag"]'),
    ("PUT", "/v1/tenants/race/actions/late",
     b'{"source": "def on_execute(event, api):\\n    pass\\n", "language": "python"}'),
])
def test_a_write_whose_tenant_is_deleted_while_its_body_arrives_is_a_404(serve: Serve, method: str, path: str,
                                                                         body: bytes) -> None:
    """Before: the secret and flow writes answered 500 (the store's UnknownTenant was not mapped), and the
    action deploy wrote versions for a tenant that no longer existed, which a re-created tenant inherited.

    Fixed in sidecar/_server.py (UnknownTenant -> 404 in one place) and sidecar/_manage.py (action_put
    checks the tenant again after reading and validating)."""
    with admin(serve) as c:
        assert c.put("/v1/tenants/race", json={}).status_code == 201
        assert c.put("/v1/tenants/race/actions/tag", json={"source": HANDLER, "language": "python"}).status_code == 201
        sock, rest = _head_then_body(serve, method, path, body)
        assert c.delete("/v1/tenants/race").status_code == 204
        assert _answer(sock, rest) == 404
        assert c.put("/v1/tenants/race", json={}).status_code == 201
        assert c.get("/v1/tenants/race/actions/late").status_code == 404
        assert c.get("/v1/tenants/race/secrets").json() == []
        assert c.get("/v1/tenants/race/flows/post-login").status_code == 404
    assert "Traceback" not in serve.output()


# ------------------------------------------------------------------ replication under a burst; retried writes

REDIS = MEMORY + """
    [store]
    url = "{url}"
"""


def _converges(check: Any, what: str, bound: float = 1.0) -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < bound, f"not seen within {bound} s: {what}"
        time.sleep(0.01)   # polling a condition with a deadline


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_burst_of_writes_reaches_the_other_replica_within_a_second_and_retries_change_nothing(
        tmp_path: Path, redis_url: str) -> None:
    """A burst of 120 writes on one replica: the other serves the last of each within 1 s of it. A write
    retried after a lost reply (the same request again) makes no new version and no second audit entry."""
    cfg = write_config(tmp_path, REDIS.format(url=redis_url))
    ra, rb = start_serve(cfg), start_serve(cfg)
    try:
        with admin(ra) as a, admin(rb) as b:
            assert a.put("/v1/tenants/burst", json={}).status_code == 201
            last: dict[str, Any] = {}
            for i in range(40):
                assert a.put("/v1/tenants/burst", json={"denial_message": f"m{i}"}).status_code == 200
                value = {"value": f"value-{i:04d}-xx"}
                assert a.put(f"/v1/tenants/burst/secrets/S{i % 7}", json=value).status_code == 204
                r = a.put("/v1/tenants/burst/actions/tag", json={"source": HANDLER + f"# {i}\n", "language": "python"})
                assert r.status_code == 201, r.text
                last["version"] = r.json()["version"]
            _converges(lambda: b.get("/v1/tenants/burst").json().get("denial_message") == "m39", "tenant settings")
            _converges(lambda: b.get("/v1/tenants/burst/actions/tag").json().get("current") == last["version"],
                       "the last deploy")
            _converges(lambda: sorted(s["name"] for s in b.get("/v1/tenants/burst/secrets").json())
                       == [f"S{i}" for i in range(7)], "secrets")
            # retries after a lost reply: the same request again
            before = len(a.get("/v1/tenants/burst/audit?limit=1000").json()["entries"])
            again = a.put("/v1/tenants/burst/actions/tag", json={"source": HANDLER + "# 39\n", "language": "python"})
            assert again.status_code == 201 and again.json()["version"] == last["version"]
            f1 = a.put("/v1/tenants/burst/flows/post-login", json=["tag"]).json()["version"]
            assert a.put("/v1/tenants/burst/flows/post-login", json=["tag"]).json()["version"] == f1
            assert len(a.get("/v1/tenants/burst/flows/post-login/versions").json()["versions"]) == 1
            entries = a.get("/v1/tenants/burst/audit?limit=1000").json()["entries"]
            assert len(entries) == before + 1, entries[:3]   # the flow's creation; the repeated deploy: nothing
    finally:
        for s in (ra, rb):
            assert s.stop() == 0, s.output()[-3000:]


# ------------------------------------------------------------------ the validation queue: bounded, per tenant

BIG_PAD = "x = 1\n" * (INLINE_SOURCE_BYTES // 6 + 1)   # over INLINE_SOURCE_BYTES: checked in a child process
# A stand-in checker (a real process on the real pipe protocol) that answers only once the gate file exists.
GATED_CHECKER = ("import json, os, sys, time\n"
                 "sys.stdin.buffer.read()\n"
                 "while not os.path.exists(sys.argv[1]):\n"
                 "    time.sleep(0.01)\n"
                 "sys.stdout.write(json.dumps({'problem': None}))\n")


def _big(i: int, tag: str = "") -> str:
    return f"def on_execute(event, api):\n    pass\n# {tag} {i}\n" + BIG_PAD


async def test_the_validation_queue_admits_a_bounded_number_in_all_and_per_tenant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every large-source check waited for one of the two children however many there were, each
    holding its request body (up to 1 MiB). Now at most QUEUE_PER_TENANT per tenant and QUEUE_MAX in all are
    admitted; the excess is refused at once (ValidationBusy), and the queue serves again when they are done."""
    gate = tmp_path / "open"
    checker = tmp_path / "checker.py"
    checker.write_text(GATED_CHECKER)
    monkeypatch.setattr(_validate, "CHILD_ARGV", (sys.executable, "-I", str(checker), str(gate)))
    assert (_validate.QUEUE_MAX, _validate.QUEUE_PER_TENANT) == (8, 2)

    def check(i: int, tenant: str | None) -> asyncio.Task[Any]:
        return asyncio.create_task(validate_source_async(_big(i, str(tenant)), "python", ["post-login"],
                                                         tenant=tenant))

    async def refused(task: asyncio.Task[Any]) -> ValidationBusy:
        await asyncio.wait([task], timeout=30)   # refused before any child: done while the gate is shut
        assert task.done(), "a check past the caps waited instead of being refused"
        exc = task.exception()
        assert isinstance(exc, ValidationBusy), exc
        return exc

    a = [check(i, "acme") for i in range(5)]
    over = [await refused(t) for t in a[2:]]
    assert all(e.scope == "tenant" and e.retry_after_s >= 1 and "tenant acme" in str(e) for e in over)
    others = [check(0, f"t{i}") for i in range(6)]   # six more tenants: 8 admitted in all
    for _ in range(100):
        if _validate.queue_stats()["admitted"] == 8:
            break
        await asyncio.sleep(0.01)   # polling a condition with a deadline
    assert _validate.queue_stats()["admitted"] == 8 and _validate.queue_stats()["by_tenant"]["acme"] == 2
    full = [await refused(check(1, "late")), await refused(check(2, None))]
    assert all(e.scope == "server" and "validation queue is full" in str(e) for e in full)
    # a small source never queues: checked in-process at once, even now
    assert await validate_source_async("def on_execute(event, api):\n    pass\n", "python", ["post-login"],
                                       tenant="acme") is None
    assert not any(t.done() for t in a[:2] + others)   # the admitted ones wait for the gated children
    gate.touch()
    assert await asyncio.gather(*a[:2], *others) == [None] * 8
    assert _validate.queue_stats()["admitted"] == 0 and _validate.queue_stats()["by_tenant"] == {}
    assert await check(9, "acme") is None   # places come back


def _validation_children(pid: int) -> list[int]:
    """The validation checkers (``python -I -m actionpool.runner._validate``) whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"actionpool.runner._validate" in cmd:
            out.append(int(d.name))
    return out


def test_a_tenant_past_its_validation_places_gets_429_with_retry_after_and_others_still_deploy(serve: Serve) -> None:
    """Before: a third (and a hundredth) large deploy of one tenant waited, body held, behind its first two.
    Now it is answered 429 with Retry-After naming the cause while its first two are checked (their checker
    processes are stopped here, so they are certainly still being checked); another tenant's large deploy is
    admitted and a small deploy is not held up; when the checkers go on, the admitted deploys succeed."""
    results: dict[str, httpx.Response] = {}

    def deploy(tenant: str, slug: str, source: str) -> threading.Thread:
        def run() -> None:
            with admin(serve) as c:
                results[f"{tenant}/{slug}"] = c.put(f"/v1/tenants/{tenant}/actions/{slug}", content=source,
                                                    headers={"Content-Type": "text/x-python"})
        t = threading.Thread(target=run)
        t.start()
        return t

    stopped: list[int] = []
    with admin(serve) as c:
        for tenant in ("acme", "beta"):
            assert c.put(f"/v1/tenants/{tenant}", json={}).status_code == 201
        threads = [deploy("acme", f"big{i}", _big(i, "acme")) for i in range(2)]
        try:
            deadline = time.monotonic() + 60
            while len(stopped) < 2:
                for pid in _validation_children(serve.proc.pid):
                    if pid not in stopped:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                assert time.monotonic() < deadline, "the two checkers did not start"
                time.sleep(0.005)   # polling a condition with a deadline
            r = c.put("/v1/tenants/acme/actions/big2", content=_big(2, "acme"),
                      headers={"Content-Type": "text/x-python"})
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["field"] == "source" and "tenant acme" in r.json()["error"]
            assert "at most 2 at once" in r.json()["error"]
            threads.append(deploy("beta", "big", _big(0, "beta")))   # admitted: waits for a checker, not refused
            assert c.put("/v1/tenants/beta/actions/small", content=HANDLER,
                         headers={"Content-Type": "text/x-python"}).status_code == 201
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:   # killed past CHILD_TIMEOUT_S: its deploy answered already
                    pass
        for t in threads:
            t.join(120)
        assert {k: v.status_code for k, v in results.items()} == {"acme/big0": 201, "acme/big1": 201, "beta/big": 201}
        assert c.get("/v1/tenants/acme/actions/big2").status_code == 404   # the refused deploy changed nothing
        assert c.put("/v1/tenants/acme/actions/big2", content=_big(2, "acme"),
                     headers={"Content-Type": "text/x-python"}).status_code == 201   # places come back
    assert "Traceback" not in serve.output()


def test_a_deploy_with_a_form_or_other_content_type_is_415_and_changes_nothing(tmp_path: Path) -> None:
    """curl -d sends application/x-www-form-urlencoded: a JSON body taken as Python would compile (a dict literal)."""
    s = start_serve(write_config(tmp_path, _ATTACK_415_CONFIG, {"tag.py": _ATTACK_415_TAG}), {})
    try:
        with httpx.Client(base_url=s.url, headers=ADMIN, timeout=30) as c:
            before = c.get("/v1/tenants/acme/actions/tag").json()["current"]
            for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "image/png"):
                r = c.put("/v1/tenants/acme/actions/tag", content=b'{"source": "x = 1", "language": "python"}',
                          headers={"content-type": ctype})
                assert r.status_code == 415, (ctype, r.text)
                assert r.json()["field"] == "content-type" and "application/json" in r.json()["error"]
            assert c.get("/v1/tenants/acme/actions/tag").json()["current"] == before
            r = c.put("/v1/tenants/acme/actions/tag", content=_ATTACK_415_TAG + "\n# v2\n",
                      headers={"content-type": "text/plain"})
            assert r.status_code == 201, r.text
    finally:
        assert s.stop() == 0, s.output()[-2000:]


_ATTACK_415_TAG = "def on_execute_post_login(event, api):\n    api.session.setCustomClaim('t', 1)\n"
_ATTACK_415_CONFIG = """
    [server]
    token_env = "AP_TOKEN"
    admin_token_env = "AP_ADMIN"
    [tenants.acme.actions.tag]
    file = "actions/tag.py"
    [tenants.acme.flows]
    post-login = ["tag"]
"""
