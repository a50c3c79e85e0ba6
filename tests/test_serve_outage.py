"""The sidecar when its Redis fails (issue 16, class 7): real ``serve`` processes, a real redis-server killed.

Each test that kills Redis starts its own redis-server on a free loopback port
(``private_redis``: with or without persistence), so the session's shared one
is never touched. A small TCP proxy between a sidecar and Redis can swallow
one reply, which is how a committed write whose answer was lost is made.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import redis

from actionpool.sidecar._store import version_of
from net_fixtures import _redis_ping, free_port
from serve_fixtures import Serve, start_serve, write_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis]

P = "actionpool:serve:"
V1 = """
def on_execute_post_login(event, api):
    api.session.setCustomClaim("v", "1")
"""
V2 = V1.replace('"1"', '"2"')
V3 = V1.replace('"1"', '"3"')

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 6
    [server]
    token_env = "AP_TOKEN"
    retry_after_s = 2
    [store]
    url = "{url}"
    [tenants.acme]
    [tenants.acme.actions.tag]
    file = "actions/tag.py"
    [tenants.acme.flows]
    post-login = ["tag"]
    [tenants.beta]
    [tenants.beta.actions.tag]
    file = "actions/tag.py"
    [tenants.beta.flows]
    post-login = ["tag"]
"""


def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``cond`` until it returns a true value (synchronisation with a deadline, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.05)


class PrivateRedis:
    """A redis-server of this test alone, on a fixed loopback port, that can be killed and started again."""

    def __init__(self, workdir: Path, persist: bool) -> None:
        self.workdir, self.persist = workdir, persist
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None
        keep = (["--save", "", "--appendonly", "yes", "--appendfsync", "always"] if self.persist
                else ["--save", "", "--appendonly", "no"])
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.workdir), "--daemonize", "no", *keep],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.proc.poll() is not None or _redis_ping(self.port), 15, "redis-server ready")
        assert self.proc.poll() is None, (self.workdir / f"redis-{self.port}.log").read_text()[-500:]

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what persistence already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> "redis.Redis[str]":
        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH (install it: apt-get install -y redis-server)")
    made: list[PrivateRedis] = []

    def make(persist: bool) -> PrivateRedis:
        d = tmp_path / f"redis{len(made)}"
        d.mkdir()
        r = PrivateRedis(d, persist)
        made.append(r)
        r.start()
        return r

    yield make
    for r in made:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.terminate()
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.kill()


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, swallows the first reply containing a marker and cuts the link.

    The command reached Redis and ran; only its answer is lost: an ambiguous failure for the client.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.marker: bytes | None = None
        self.dropped = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes) -> None:
        with self._lock:
            self.marker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if replies:
                    with self._lock:
                        hit = self.marker is not None and self.marker in data
                        if hit:
                            self.marker, self.dropped = None, self.dropped + 1
                    if hit:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def _config(tmp_path: Path, url: str, name: str = "serve.toml") -> Path:
    return write_config(tmp_path, CONFIG.format(url=url), {"tag.py": V1}, name=name)


def _flow(c: httpx.Client, tenant: str = "acme") -> dict:
    r = c.post(f"/v1/tenants/{tenant}/flows/post-login", json={"user": {"user_id": "u1"}})
    assert r.status_code == 200, r.text
    return r.json()


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in /metrics")


def _ready(s: Serve) -> tuple[int, dict]:
    """/readyz's status and body, without the start-up prewarm's summary (tests/test_prewarm.py checks that)."""
    r = httpx.get(s.url + "/readyz", timeout=10)
    body = r.json()
    body.pop("prewarm", None)
    return r.status_code, body


def test_flows_and_readiness_survive_an_outage_and_management_answers_503(tmp_path: Path,
                                                                          private_redis: Callable[..., PrivateRedis]
                                                                          ) -> None:
    rds = private_redis(persist=True)
    s = start_serve(_config(tmp_path, rds.url))
    try:
        with s.client() as c:
            r = c.put("/v1/tenants/acme/actions/tag", content=V2)
            assert r.status_code == 201
            v2 = r.json()["version"]
            assert _flow(c)["versions"] == {"tag": v2}
            assert _ready(s) == (200, {"status": "ready", "store": "ok"})

            rds.kill()
            wait_until(lambda: _ready(s)[1].get("store") == "degraded", what="readyz degraded")
            status, body = _ready(s)
            assert status == 200 and body["status"] == "ready"  # a load balancer keeps this replica
            for _ in range(5):  # flows keep the loaded version
                out = _flow(c)
                assert out["outcome"] == "allow" and out["versions"] == {"tag": v2}
            for method, path, kw in (("PUT", "/v1/tenants/acme/actions/tag", {"content": V3}),
                                     ("GET", "/v1/tenants/acme/actions/tag", {}),
                                     ("POST", "/v1/tenants/acme/actions/tag/rollback", {}),
                                     ("GET", "/v1/tenants/acme/runs/nope", {})):
                r = c.request(method, path, **kw)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.json()["error"].startswith("store unavailable: ") and r.headers["retry-after"] == "2"
            assert _metric(c, "actionpool_store_up") == 0
            assert _metric(c, "actionpool_store_degraded_seconds") > 0

            rds.start()  # back, with its append-only file
            r = c.get("/v1/tenants/acme/actions/tag")  # the first request on the stale pool: no 500
            assert r.status_code == 200 and r.json()["current"] == v2
            r = c.put("/v1/tenants/acme/actions/tag", content=V3)
            assert r.status_code == 201
            assert _flow(c)["versions"] == {"tag": r.json()["version"]}
            wait_until(lambda: _ready(s) == (200, {"status": "ready", "store": "ok"}), what="readyz ok")
            assert _metric(c, "actionpool_store_up") == 1
            assert _metric(c, "actionpool_store_outages_total") == 1
    finally:
        assert s.stop() == 0
    out = s.output()
    assert out.count("Redis unreachable") == 1 and out.count("reachable again") == 1, out[-3000:]
    assert "Traceback" not in out and "internal error" not in out and "unhandled" not in out
    assert "has no persistence" not in out  # this Redis keeps an append-only file


def test_a_write_whose_reply_was_lost_is_reported_done_and_not_done_twice(
        tmp_path: Path, private_redis: Callable[..., PrivateRedis]) -> None:
    rds = private_redis(persist=False)
    proxy = ReplyDropper(rds.port)
    s = start_serve(_config(tmp_path, proxy.url))
    try:
        stack = P + "action:acme:tag:stack"
        with s.client() as c, rds.client() as r:
            assert r.llen(stack) == 1  # the seeded file
            proxy.arm(b"$6\r\npushed\r\n")  # the deploy script's answer: it ran, the sidecar never hears it
            resp = c.put("/v1/tenants/acme/actions/tag", content=V2)
            assert proxy.dropped == 1
            assert resp.status_code == 201 and resp.json()["version"] == version_of(V2)  # committed: reported so
            assert r.llen(stack) == 2  # pushed once, though the script was sent twice
            deploys = [json.loads(e) for e in r.lrange(P + "action:acme:tag:log", 0, -1)]
            assert [e["op"] for e in deploys].count("deploy") == 2  # the seed and this one
            assert _flow(c)["versions"] == {"tag": version_of(V2)}

            proxy.arm(b"$19\r\nto:")  # the same for a rollback: popped once
            resp = c.post("/v1/tenants/acme/actions/tag/rollback")
            assert proxy.dropped == 2
            assert resp.status_code == 200 and resp.json()["version"] == version_of(V1)
            assert r.llen(stack) == 1
            assert _flow(c)["versions"] == {"tag": version_of(V1)}
    finally:
        assert s.stop() == 0
        proxy.close()
    assert "Traceback" not in s.output()


def test_a_malformed_record_is_skipped_counted_and_disagreeing_replicas_are_reported(
        tmp_path: Path, redis_url: str) -> None:
    cfg = _config(tmp_path, redis_url)
    a = start_serve(cfg)
    b: Serve | None = None
    try:
        with a.client() as ca, redis.Redis.from_url(redis_url, decode_responses=True) as r:
            v1 = version_of(V1)
            assert _flow(ca, "beta")["versions"] == {"tag": v1}
            r.lset(P + "action:beta:tag:stack", -1, "{not json")  # one tenant's version record goes bad
            r.incr(P + "gen")
            wait_until(lambda: _metric(ca, "actionpool_store_bad_records_total") >= 1, what="bad record counted")
            assert _flow(ca, "beta")["versions"] == {"tag": v1}  # the running replica keeps what it had
            assert _flow(ca, "acme")["versions"] == {"tag": v1}

            b = start_serve(cfg, timeout=60)  # a new replica starts in spite of it
            with b.client() as cb:
                assert _flow(cb, "acme")["versions"] == {"tag": v1}  # and serves the other tenants
                out = _flow(cb, "beta")
                assert out["outcome"] == "deny" and out["denial"]["kind"] == "not_deployed"
                assert _metric(cb, "actionpool_store_bad_records_total") >= 1
                # a has beta's version, b has none: both see a peer that disagrees
                for s in (a, b):
                    wait_until(lambda s=s: _ready(s)[1].get("disagreeing_replicas"), what="disagreement reported")
                    status, body = _ready(s)
                    assert status == 200 and len(body["disagreeing_replicas"]) == 1
                assert _metric(cb, "actionpool_store_replicas_disagreeing") == 1
                # a new deploy of beta repairs the record; the replicas agree again
                assert ca.put("/v1/tenants/beta/actions/tag", content=V2).status_code == 201
                wait_until(lambda: _flow(cb, "beta")["versions"] == {"tag": version_of(V2)}, what="b reloads")
                for s in (a, b):
                    wait_until(lambda s=s: "disagreeing_replicas" not in _ready(s)[1], what="agreement")
    finally:
        for s in (a, b):
            if s is not None:
                assert s.stop() == 0
    for s in (a, b):
        assert s is not None
        out = s.output()
        # logs stay quiet: one line for the bad key, no failing version check 4 times a second
        assert out.count("malformed record") == 1, out[-3000:]
        assert "version check failed" not in out and "Traceback" not in out


def test_a_redis_restarted_empty_is_detected_and_refilled_by_the_replicas(
        tmp_path: Path, private_redis: Callable[..., PrivateRedis]) -> None:
    rds = private_redis(persist=False)
    cfg = _config(tmp_path, rds.url)
    a, b = start_serve(cfg), start_serve(cfg)
    c3: Serve | None = None
    try:
        v2 = version_of(V2)
        with a.client() as ca, b.client() as cb, rds.client() as r:
            assert ca.put("/v1/tenants/acme/actions/tag", content=V2).status_code == 201
            wait_until(lambda: _flow(cb)["versions"] == {"tag": v2}, what="b serves v2")

            rds.kill()
            rds.start()  # no persistence: it comes back empty
            wait_until(lambda: r.llen(P + "action:acme:tag:stack") == 1, what="the replicas re-wrote the store")
            assert json.loads(r.lindex(P + "action:acme:tag:stack", -1))["version"] == v2
            assert _flow(ca)["versions"] == {"tag": v2} and _flow(cb)["versions"] == {"tag": v2}

            c3 = start_serve(cfg)  # a replica started afterwards serves what the fleet served: no not_deployed,
            with c3.client() as cc:  # and the config's file (v1) is not seeded over the API's v2
                assert _flow(cc)["versions"] == {"tag": v2}
                assert _flow(cc, "beta")["versions"] == {"tag": version_of(V1)}
            assert _metric(ca, "actionpool_store_restores_total") + _metric(cb, "actionpool_store_restores_total") >= 1
    finally:
        for s in (a, b, c3):
            if s is not None:
                assert s.stop() == 0
    logs = a.output() + b.output()
    assert "came back EMPTY" in logs
    # the start-up warning about a Redis without persistence: one line per replica
    assert a.output().count("has no persistence") == 1 and b.output().count("has no persistence") == 1


def test_doctor_warns_about_a_store_without_persistence(private_redis: Callable[..., PrivateRedis]) -> None:
    for persist in (False, True):
        rds = private_redis(persist=persist)
        out = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "doctor", "--json", "--store", rds.url],
                             capture_output=True, text=True, timeout=120)
        store = json.loads(out.stdout)["store"]
        assert store["reachable"] is True and store["persistent"] is persist
        assert ("warning" in store) is (not persist)
        if not persist:
            assert "no persistence" in store["warning"]


def test_outage_logs_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from actionpool.sidecar._store import OUTAGE_LOG_S, _Health

    now = [1000.0]
    h = _Health(clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="actionpool.serve"):
        for _ in range(400):  # 100 s of a failure every 0.25 s (the version check's pace)
            h.failed(ConnectionError("refused"), now[0])
            now[0] += 0.25
        assert not h.up and h.down_seconds() >= 99
        h.failed(ConnectionError("late"), started=now[0] - 1)
        h.ok()
        h.failed(ConnectionError("begun before the recovery"), started=now[0] - 0.1)  # says nothing
        assert h.up
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable (" in m for m in lines) == 1
    assert sum("still unreachable" in m for m in lines) == int(100 // OUTAGE_LOG_S)
    assert sum("reachable again" in m for m in lines) == 1 and h.outages == 1


async def test_every_kind_of_bad_record_is_skipped_and_counted_at_start(redis_url: str) -> None:
    from actionpool.sidecar._store import RedisStore

    good = RedisStore(redis_url, 10)
    await good.start()
    for t in ("acme", "beta"):
        await good.put_tenant(t, {}, author="admin")
    await good.deploy("acme", "ok", V1)
    for slug in ("nojson", "noversion", "nosource", "wrongtype", "listmeta"):
        await good.deploy("beta", slug, V1)
    await good.close()
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        base = P + "action:beta:"
        r.rpush(base + "nojson:stack", "{")
        r.rpush(base + "noversion:stack", json.dumps({"at": 1.0}))
        r.rpush(base + "nosource:stack", json.dumps({"version": "0" * 16, "at": 1.0}))
        r.delete(base + "wrongtype:stack")
        r.set(base + "wrongtype:stack", "a string where a list belongs")
        r.rpush(base + "listmeta:stack", "[1, 2]")
        r.sadd(P + "actions", "no-colon-here")
        r.incr(P + "gen")
    store = RedisStore(redis_url, 10)
    await store.start()  # a new replica starts in spite of all of them
    try:
        assert store.current("acme", "ok") is not None
        assert all(store.current("beta", s) is None for s in ("nojson", "noversion", "nosource", "wrongtype"))
        assert store.bad_records == 6
    finally:
        await store.close()


CACHED = """
def on_execute_post_login(event, api):
    seen = api.cache.get("seen:" + event.user.user_id)   # raises ApiError(cache_unavailable) while Redis is down
    api.cache.set("seen:" + event.user.user_id, "1")
    api.session.setCustomClaim("seen_before", bool(seen))
"""

FAILURE_CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 6
    [server]
    token_env = "AP_TOKEN"
    [store]
    url = "{url}"
    [tenants.open]
    [tenants.open.actions.cached]
    file = "actions/cached.py"
    failure = "open"
    [tenants.open.flows]
    post-login = ["cached"]
    [tenants.closed]
    [tenants.closed.actions.cached]
    file = "actions/cached.py"
    [tenants.closed.flows]
    post-login = ["cached"]
"""


def test_a_redis_outage_fails_open_only_where_the_action_says_so(tmp_path: Path,
                                                                  private_redis: Callable[..., PrivateRedis]) -> None:
    """The issue's case: a cache outage left uncaught. ``failure = "open"`` lets the login through (the action
    is marked ``failed_open`` with the kind ``cache_unavailable``), the default stays closed and says why."""
    r = private_redis(persist=False)
    s = start_serve(write_config(tmp_path, FAILURE_CONFIG.format(url=r.url), {"cached.py": CACHED}))
    try:
        with s.client() as c:
            for tenant in ("open", "closed"):
                assert _flow(c, tenant)["outcome"] == "allow"
            r.kill()
            opened = _flow(c, "open")
            assert opened["outcome"] == "allow", opened["denial"]
            assert [a["status"] for a in opened["actions"]] == ["failed_open"]
            assert any("cache_unavailable" in e["message"] for e in opened["logs"]), opened["logs"]
            closed = _flow(c, "closed")
            assert closed["outcome"] == "deny"
            assert closed["denial"]["kind"] == "cache_unavailable", closed["denial"]
            assert _metric(c, 'actionpool_actions_failed_open_total{slug="cached",tenant="open"}') >= 1
    finally:
        assert s.stop() == 0, s.output()[-2000:]


def test_malformed_keys_of_every_kind_block_no_start_no_tenant_and_are_no_outage(
        tmp_path: Path, private_redis: Callable[..., PrivateRedis]) -> None:
    """Probes that failed: a ``gen`` or ``actions`` key of the wrong type (or ``gen = "abc"``), or a wrong-typed
    ``seeded:`` key, made every start fail; a wrong-typed ``replicas``/``slugs:``/``srcs:``/stack/log key was
    taken for an outage (store down, readiness degraded, every tenant's history dropped) and failed that
    tenant's deploys for good; a ``runs:`` entry not "size:flow_id" failed every later history write."""
    rds = private_redis(persist=False)
    with rds.client() as r:
        r.hset(P + "gen", "not", "a counter")
        r.set(P + "actions", "not a set")
        r.hset(P + "seeded:acme:tag", "not", "a string")
        r.set(P + "replicas", "not a sorted set")
        r.rpush(P + "runs:beta", *["garbage-without-size"] * 120)   # more than history_size: evicted next write
        r.set(P + "runbytes:beta", "many")
    s = start_serve(_config(tmp_path, rds.url), timeout=60)       # starts in spite of all of it
    try:
        with s.client() as c, rds.client() as r:
            assert _flow(c, "acme")["versions"] == {"tag": version_of(V1)}
            for key, bad in ((P + "slugs:acme", "set"), (P + "srcs:acme", "hash"),
                             (P + "action:acme:tag:log", "list")):
                r.delete(key)
                r.set(key, f"not a {bad}")
            r.delete(P + "action:beta:tag:shadow")
            r.rpush(P + "action:beta:tag:shadow", "not a string")
            # each tenant's own broken keys are replaced on its next write; nobody sees an outage
            assert c.put("/v1/tenants/acme/actions/tag", content=V2).status_code == 201
            assert c.put("/v1/tenants/beta/actions/tag?shadow=1", content=V3).status_code == 201
            assert c.get("/v1/tenants/acme/actions/tag").status_code == 200
            assert c.post("/v1/tenants/acme/actions/tag/rollback").json()["version"] == version_of(V1)
            assert _flow(c, "acme")["versions"] == {"tag": version_of(V1)}
            # a rollback that meets a broken key is checked before it pops: repaired, it pops once, not twice
            assert c.put("/v1/tenants/acme/actions/tag", content=V2).status_code == 201
            assert c.put("/v1/tenants/acme/actions/tag", content=V3).status_code == 201
            r.delete(P + "action:acme:tag:log")
            r.set(P + "action:acme:tag:log", "not a list")
            r.set(P + "gen", "not a number")
            assert c.post("/v1/tenants/acme/actions/tag/rollback").json()["version"] == version_of(V2)
            assert r.lrange(P + "action:acme:tag:stack", 0, -1)[-1].count(version_of(V2)) == 1
            flow_id = _flow(c, "beta")["flow_id"]
            wait_until(lambda: c.get(f"/v1/tenants/beta/runs/{flow_id}").status_code == 200, what="run recorded")
            assert r.type(P + "gen") == "string" and r.type(P + "actions") == "set"
            assert r.smembers(P + "actions") == {"acme:tag", "beta:tag"}
            assert _ready(s) == (200, {"status": "ready", "store": "ok"})
            assert _metric(c, "actionpool_store_outages_total") == 0
            assert _metric(c, "actionpool_store_up") == 1
            assert _metric(c, "actionpool_store_bad_records_total") >= 5
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.output(), s.output()[-3000:]
