"""The store's control-plane catalog (issue 17): tenants, flows, secrets, audit, versions with metadata.

Every behaviour test runs twice through the same code: on MemoryStore and on a
RedisStore over a real redis-server, and both must answer alike. The Redis-only
tests start two or three stores on one Redis (replicas) and read the Redis keys
themselves: a write reaches the other replica within 1 s (by message, and by the
generation check when the message is lost), a dump of Redis holds no secret in
any encoding, ciphertexts that were tampered with, moved or written under
another key are bad records, keys rotate, a deleted tenant leaves no key but its
audit trail, and an emptied Redis is written back from a replica.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
import pytest
import redis

from actionpool.sidecar._secrets import Keyring, key_id
from actionpool.sidecar._store import (MemoryStore, NothingToRollBack, RedisStore, SecretsKeyMissing,
                                       SecretsUnavailable, Store, StoreFull, UnknownTenant, UnknownVersion,
                                       version_of)
from serve_fixtures import start_serve, write_config

pytestmark = pytest.mark.timeout(120)

P = "actionpool:serve:"
K1, K2 = os.urandom(32), os.urandom(32)
SECRET = "s3cr3t-Value-0123456789-xyz"
PY = "def on_execute(event, api):\n    pass\n"
PY2 = "def on_execute(event, api):\n    api.log('two')\n"
JS = "exports.onExecute = async (event, api) => {};\n"


def _make(kind: str, url: str | None, **kw: Any) -> Store:
    kw.setdefault("keyring", Keyring(K1))
    history = kw.pop("history_size", 100)
    if kind == "memory":
        kw.pop("keyring")
        return MemoryStore(history, **kw)
    assert url is not None
    return RedisStore(url, history, **kw)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make(request: pytest.FixtureRequest, redis_server_optional: str | None) -> Callable[..., Store]:
    """A factory of started-later stores of one kind (memory, or redis on a flushed real redis-server)."""
    if request.param == "redis":
        if redis_server_optional is None:
            pytest.skip("redis-server not found on PATH")
        with redis.Redis.from_url(redis_server_optional) as r:
            r.flushall()

    def factory(**kw: Any) -> Store:
        return _make(request.param, redis_server_optional, **kw)
    factory.kind = request.param  # type: ignore[attr-defined]
    return factory


async def _started(store: Store) -> Store:
    await store.start()
    return store


async def wait_for(cond: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``cond`` until true; fail after ``within`` seconds. Returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > within:
            pytest.fail(f"{what}: not within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------------------- actions

async def test_versions_carry_metadata_and_their_id_covers_it(make: Callable[..., Store]) -> None:
    store = await _started(make())
    try:
        await store.put_tenant("acme", {}, author="admin")
        v1 = await store.deploy("acme", "tag", PY, author="admin:alice", message="first")
        assert v1.version == version_of(PY)  # plain Python keeps the id it had before metadata existed
        assert (v1.language, v1.secrets, v1.failure, v1.author, v1.message) == ("python", (), None, "admin:alice",
                                                                               "first")
        assert v1.at > 0 and v1.deployed_at == v1.at
        v2 = await store.deploy("acme", "tag", PY, secrets=["B", "A", "A"], failure="open", author="admin")
        assert v2.version != v1.version and v2.secrets == ("A", "B") and v2.failure == "open"
        assert v2.version == version_of(PY, "python", ("B", "A"), "open")
        v3 = await store.deploy("acme", "js", JS, language="javascript")
        assert v3.language == "javascript" and v3.version != version_of(JS)
        assert store.current("acme", "tag") == v2 and store.current("acme", "js") == v3
        assert (await store.deploy("acme", "tag", PY, secrets=["A", "B"], failure="open")) == v2  # same: no-op
        with pytest.raises(ValueError, match="language"):
            await store.deploy("acme", "tag", PY, language="cobol")
        got = await store.get_version("acme", "tag", v1.version)
        assert got is not None and got.source == PY and got.message == "first" and got.author == "admin:alice"
        assert await store.get_version("acme", "tag", "0" * 16) is None
        d = await store.describe("acme", "tag")
        assert d["current"] == v2.version
        by = {v["version"]: v for v in d["versions"]}
        assert by[v1.version]["author"] == "admin:alice" and by[v1.version]["message"] == "first"
        assert by[v2.version]["secrets"] == ["A", "B"] and by[v2.version]["failure"] == "open"
        assert by[v1.version]["language"] == "python" and by[v1.version]["kept"] is True
        assert (await store.describe("acme", "js"))["versions"][0]["language"] == "javascript"
    finally:
        await store.close()


async def test_rollback_pops_one_or_pushes_a_named_kept_version(make: Callable[..., Store]) -> None:
    store = await _started(make(versions_kept=3))
    try:
        await store.put_tenant("acme", {}, author="admin")
        vs = [await store.deploy("acme", "tag", PY + f"# {i}\n", author=f"u{i}") for i in range(4)]
        # kept: vs[1..3]
        with pytest.raises(UnknownVersion):
            await store.rollback("acme", "tag", to=vs[0].version)  # fell off the kept stack
        with pytest.raises(KeyError):  # UnknownVersion is a KeyError (the route answers 404)
            await store.rollback("acme", "tag", to="nope")
        back = await store.rollback("acme", "tag", to=vs[1].version, author="admin:bob")
        assert back.version == vs[1].version and back.source == vs[1].source and back.author == "u1"
        assert store.current("acme", "tag").version == vs[1].version
        assert (await store.rollback("acme", "tag", to=vs[1].version)).version == vs[1].version  # already: no-op
        assert (await store.rollback("acme", "tag")).version == vs[3].version  # linear history: pop the push
        audit = await store.audit("acme")
        assert [(e["op"], e["old"], e["new"]) for e in audit[:2]] == [
            ("rollback", vs[1].version, vs[3].version), ("rollback", vs[3].version, vs[1].version)]
        assert audit[1]["who"] == "admin:bob"
        await store.rollback("acme", "tag")
        with pytest.raises(NothingToRollBack):
            await store.rollback("acme", "tag")
    finally:
        await store.close()


async def test_action_writes_for_a_tenant_the_store_lacks_are_refused_and_change_nothing(
        make: Callable[..., Store]) -> None:
    """Failed before the fix: deploy, shadow deploy, rollback and seed landed for a tenant never created or
    deleted (on Redis by another replica, whose DELETE this replica had not heard of yet), and a tenant re-created
    under the name inherited those versions. Now the tenant check is part of the write (the Lua script on Redis)."""
    a = await _started(make(versions_kept=3))
    b = await _started(make()) if make.kind == "redis" else a  # type: ignore[attr-defined]
    try:
        for write in (lambda: a.deploy("ghost", "tag", PY), lambda: a.deploy("ghost", "tag", PY, shadow=True),
                      lambda: a.rollback("ghost", "tag"), lambda: a.rollback("ghost", "tag", to=version_of(PY)),
                      lambda: a.seed("ghost", "tag", PY), lambda: a.rollback_flow("ghost", "post-login")):
            with pytest.raises(UnknownTenant, match="ghost"):
                await write()
        assert a.current("ghost", "tag") is None and a.shadow("ghost", "tag") is None and a.is_empty()
        assert await a.audit("ghost") == []
        await a.put_tenant("acme", {}, author="admin")
        await a.deploy("acme", "tag", PY)
        await a.deploy("acme", "tag", PY2)
        await a.put_flow("acme", "post-login", ["tag"], author="admin")
        await a.put_flow("acme", "post-login", ["tag", {"if": "true", "allow": True}], author="admin")
        await wait_for(lambda: b.current("acme", "tag") is not None and b.current("acme", "tag").source == PY2,
                       1.0, "the deploy on the other replica")
        assert await b.delete_tenant("acme", author="admin")
        # On Redis the replica may still hold the tenant locally: only the script's own check stops these.
        for write in (lambda: a.deploy("acme", "tag", PY + "# late\n"), lambda: a.deploy("acme", "tag", PY2,
                                                                                              shadow=True),
                      lambda: a.rollback("acme", "tag"), lambda: a.rollback("acme", "tag", to=version_of(PY)),
                      lambda: a.rollback_flow("acme", "post-login")):
            with pytest.raises(UnknownTenant):
                await write()
        await wait_for(lambda: a.tenant("acme") is None and a.current("acme", "tag") is None, 1.0, "the delete")
        await a.put_tenant("acme", {}, author="admin")  # re-created: starts with no versions at all
        assert a.current("acme", "tag") is None and a.shadow("acme", "tag") is None
        assert await a.get_version("acme", "tag", version_of(PY + "# late\n")) is None
        assert (await a.describe("acme", "tag"))["current"] is None
        assert (await a.usage("acme"))["versions"] == 0
        with pytest.raises(NothingToRollBack):
            await a.rollback("acme", "tag")
        assert a.flow("acme", "post-login") is None
        assert [e["op"] for e in await a.audit("acme")][:2] == ["create", "delete"]  # no refused write audited
    finally:
        await a.close()
        if b is not a:
            await b.close()


# ----------------------------------------------------------------------------------------- catalog

async def test_tenants_are_created_updated_listed_and_deleted(make: Callable[..., Store]) -> None:
    store = await _started(make())
    seen: list[tuple[str, str, str]] = []
    store.on_change = lambda *a: seen.append(a)
    try:
        assert store.is_empty() and store.tenant("acme") is None
        created, rec = await store.put_tenant("acme", {"denial_message": "no", "allow_hosts": ["a.example"]},
                                              author="admin")
        assert created and rec.settings == {"denial_message": "no", "allow_hosts": ["a.example"]}
        assert store.tenant("acme") == rec and not store.is_empty() and list(store.tenants()) == ["acme"]
        assert ("tenant", "acme", "acme") in seen
        again, same = await store.put_tenant("acme", {"allow_hosts": ["a.example"], "denial_message": "no"},
                                             author="admin")
        assert not again and same.version == rec.version  # key order does not make a new version
        updated, rec2 = await store.put_tenant("acme", {"failure": "open"}, author="admin:x")
        assert not updated and rec2.settings == {"failure": "open"} and rec2.version != rec.version
        assert store.tenant("acme").settings == {"failure": "open"}
        ops = [(e["op"], e["kind"], e["key"]) for e in await store.audit("acme")]
        assert ops == [("update", "tenant", "acme"), ("create", "tenant", "acme")]
        with pytest.raises(ValueError):
            await store.put_tenant("Bad:Name", {}, author="admin")
        assert await store.delete_tenant("acme", author="admin")
        assert store.tenant("acme") is None and store.is_empty()
        assert not await store.delete_tenant("acme", author="admin")
        assert (await store.audit("acme"))[0]["op"] == "delete"  # the audit trail stays under the name
    finally:
        await store.close()


async def test_flows_are_versioned_and_roll_back(make: Callable[..., Store]) -> None:
    store = await _started(make(versions_kept=3))
    try:
        with pytest.raises(UnknownTenant):
            await store.put_flow("acme", "post-login", ["tag"], author="admin")
        await store.put_tenant("acme", {}, author="admin")
        f1 = await store.put_flow("acme", "post-login", ["tag", {"if": "true", "deny": "x"}], author="admin:a",
                                  message="one")
        assert store.flow("acme", "post-login") == f1 and f1.message == "one" and f1.author == "admin:a"
        assert len(f1.version) == 16
        assert (await store.put_flow("acme", "post-login", ["tag", {"deny": "x", "if": "true"}],
                                     author="admin")).version == f1.version  # canonical JSON: same version
        f2 = await store.put_flow("acme", "post-login", [{"if": "true", "allow": True}, "tag"], author="admin")
        f3 = await store.put_flow("acme", "post-login", [], author="admin")
        vs = await store.flow_versions("acme", "post-login")
        assert [v["version"] for v in vs] == [f3.version, f2.version, f1.version]
        assert [v["current"] for v in vs] == [True, False, False] and vs[2]["message"] == "one"
        back = await store.rollback_flow("acme", "post-login", author="admin")
        assert back.version == f2.version and store.flow("acme", "post-login").entries == f2.entries
        again = await store.rollback_flow("acme", "post-login", to=f1.version, author="admin")
        assert again.version == f1.version and store.flow("acme", "post-login").version == f1.version
        with pytest.raises(UnknownVersion):
            await store.rollback_flow("acme", "post-login", to="0" * 16)
        assert store.flows("acme") == {"post-login": store.flow("acme", "post-login")}
        ops = [(e["op"], e["kind"], e["old"], e["new"]) for e in await store.audit("acme", limit=4)]
        assert ops[0] == ("rollback", "flow", f2.version, f1.version)
        assert ops[1] == ("rollback", "flow", f3.version, f2.version)
        with pytest.raises(NothingToRollBack):
            await store.rollback_flow("acme", "pre-login")
    finally:
        await store.close()


async def test_secrets_are_write_only_and_listed_by_name(make: Callable[..., Store]) -> None:
    store = await _started(make())
    try:
        with pytest.raises(UnknownTenant):
            await store.put_secret("acme", "API_KEY", SECRET, author="admin")
        await store.put_tenant("acme", {}, author="admin")
        await store.put_secret("acme", "API_KEY", SECRET, author="admin")
        await store.put_secret("acme", "OTHER", "another-value-1", author="admin")
        names = store.secret_names("acme")
        assert [n["name"] for n in names] == ["API_KEY", "OTHER"] and all(n["updated_at"] for n in names)
        assert store.secret_values("acme") == {"API_KEY": SECRET, "OTHER": "another-value-1"}
        assert store.secret_values("other") == {}
        for bad_name, value in (("1BAD", SECRET), ("has-dash", SECRET), ("OK", "short")):
            with pytest.raises(ValueError):
                await store.put_secret("acme", bad_name, value, author="admin")
        assert await store.delete_secret("acme", "OTHER", author="admin")
        assert not await store.delete_secret("acme", "OTHER", author="admin")
        assert store.secret_values("acme") == {"API_KEY": SECRET}
        audit = await store.audit("acme")
        assert [(e["op"], e["kind"], e["key"]) for e in audit[:3]] == [
            ("delete", "secret", "OTHER"), ("create", "secret", "OTHER"), ("create", "secret", "API_KEY")]
        assert SECRET not in orjson.dumps(audit).decode()
    finally:
        await store.close()


async def test_audit_is_bounded_newest_first_and_config_writes_are_sync(make: Callable[..., Store]) -> None:
    store = await _started(make(audit_max=5))
    try:
        await store.put_tenant("acme", {}, author="config")
        for i in range(8):
            await store.put_flow("acme", "post-login", [f"a{i}"], author="admin:x", message=f"m{i}")
        audit = await store.audit("acme", limit=100)
        assert len(audit) == 5 and [e["message"] for e in audit] == ["m7", "m6", "m5", "m4", "m3"]
        assert set(audit[0]) == {"at", "who", "op", "kind", "key", "old", "new", "message"}
        assert audit[0]["at"].endswith("Z") and audit[0]["who"] == "admin:x"
        assert len(await store.audit("acme", limit=2)) == 2
        store2 = make(audit_max=5)
        await store2.start()
        await store2.close()
        await store.put_tenant("beta", {}, author="config")
        assert (await store.audit("beta"))[0]["op"] == "sync"
    finally:
        await store.close()


async def test_bounds_give_store_full_and_change_nothing(make: Callable[..., Store]) -> None:
    store = await _started(make(tenants_max=2, flows_max=1, flow_entries_max=3, flow_max_bytes=200, secrets_max=1,
                                secret_max_bytes=40, actions_max=1, tenant_settings_max_bytes=100))
    try:
        await store.put_tenant("a", {}, author="admin")
        await store.put_tenant("b", {}, author="admin")
        with pytest.raises(StoreFull, match="tenants_max"):
            await store.put_tenant("c", {}, author="admin")
        with pytest.raises(StoreFull, match="tenant_settings_max_bytes"):
            await store.put_tenant("a", {"denial_message": "x" * 200}, author="admin")
        await store.put_flow("a", "post-login", ["x"], author="admin")
        with pytest.raises(StoreFull, match="flows_max"):
            await store.put_flow("a", "pre-login", ["x"], author="admin")
        with pytest.raises(StoreFull, match="flow_entries_max"):
            await store.put_flow("a", "post-login", ["x", "y", "z", "w"], author="admin")
        with pytest.raises(StoreFull, match="flow_max_bytes"):
            await store.put_flow("a", "post-login", ["x" * 300], author="admin")
        await store.put_secret("a", "ONE", "value-one-1", author="admin")
        with pytest.raises(StoreFull, match="secrets_max"):
            await store.put_secret("a", "TWO", "value-two-2", author="admin")
        with pytest.raises(StoreFull, match="secret_max_bytes"):
            await store.put_secret("a", "ONE", "v" * 41, author="admin")
        await store.deploy("a", "one", PY)
        with pytest.raises(StoreFull, match="actions_max"):
            await store.deploy("a", "two", PY)
        await store.deploy("b", "two", PY)  # per tenant
        assert sorted(store.tenants()) == ["a", "b"] and store.tenant("a").settings == {}
        assert store.flow("a", "post-login").entries == ["x"] and store.flow("a", "pre-login") is None
        assert store.secret_values("a") == {"ONE": "value-one-1"} and store.current("a", "two") is None
        assert len(await store.audit("a", limit=100)) == 4  # tenant, flow, secret, deploy: no refused write
    finally:
        await store.close()


async def test_delete_tenant_drops_its_actions_flows_secrets_and_history(make: Callable[..., Store]) -> None:
    store = await _started(make())
    try:
        for t in ("acme", "beta"):
            await store.put_tenant(t, {}, author="admin")
            await store.deploy(t, "tag", PY)
            await store.deploy(t, "tag", PY2)
            await store.deploy(t, "tag", PY + "# shadow\n", shadow=True)
            await store.put_flow(t, "post-login", ["tag"], author="admin")
            await store.put_secret(t, "API_KEY", SECRET, author="admin")
            for i in range(5):
                await store.record_run(t, f"{t}-run-{i}", {"flow_id": f"{t}-run-{i}", "tenant": t})
        assert await store.delete_tenant("acme", author="admin")
        assert store.current("acme", "tag") is None and store.shadow("acme", "tag") is None
        assert store.flow("acme", "post-login") is None and store.secret_values("acme") == {}
        assert await store.get_run("acme-run-0") is None and await store.get_version("acme", "tag",
                                                                                  version_of(PY)) is None
        assert (await store.describe("acme", "tag"))["current"] is None
        assert (await store.usage("acme"))["runs"] == 0
        # the other tenant is untouched
        assert store.current("beta", "tag") is not None and store.secret_values("beta") == {"API_KEY": SECRET}
        assert await store.get_run("beta-run-4") is not None
        # re-created: empty, and its audit trail is still there
        await store.put_tenant("acme", {}, author="admin")
        assert store.flow("acme", "post-login") is None and store.secret_names("acme") == []
        ops = [e["op"] for e in await store.audit("acme", limit=100)]
        assert ops[:2] == ["create", "delete"] and "deploy" in ops
    finally:
        await store.close()


async def test_memory_and_redis_answer_alike(redis_server: str) -> None:
    """The same script on both stores gives the same versions, flows, secrets and audit (times aside)."""
    with redis.Redis.from_url(redis_server) as r:
        r.flushall()

    async def script(store: Store) -> list[Any]:
        await store.start()
        out: list[Any] = []
        try:
            out.append((await store.put_tenant("acme", {"allow_hosts": ["x"]}, author="admin"))[1].version)
            out.append((await store.deploy("acme", "tag", PY, secrets=["K"], message="m", author="a")).version)
            out.append((await store.deploy("acme", "tag", PY2, language="python")).version)
            out.append((await store.rollback("acme", "tag")).version)
            out.append((await store.put_flow("acme", "post-login", ["tag"], author="a")).version)
            out.append((await store.put_flow("acme", "post-login", ["tag", "tag"], author="a")).version)
            out.append((await store.rollback_flow("acme", "post-login")).version)
            out.append([{k: v for k, v in x.items() if k != "at"} for x in await store.flow_versions("acme",
                                                                                                   "post-login")])
            await store.put_secret("acme", "K", SECRET, author="a")
            out.append(store.secret_values("acme"))
            out.append([n["name"] for n in store.secret_names("acme")])
            out.append([{k: v for k, v in e.items() if k != "at"} for e in await store.audit("acme")])
            d = await store.describe("acme", "tag")
            out.append([{k: v for k, v in x.items() if k != "deployed_at"} for x in d["versions"]])
            out.append(await store.delete_tenant("acme", author="a"))
            out.append((store.is_empty(), store.current("acme", "tag")))
        finally:
            await store.close()
        return out

    mem = await script(MemoryStore(100))
    red = await script(RedisStore(redis_server, 100, keyring=Keyring(K1)))
    assert mem == red


# ------------------------------------------------------------------------------------ redis only

@pytest.fixture
def url(redis_url: str) -> str:
    return redis_url


@contextlib.asynccontextmanager
async def replicas(url: str) -> AsyncIterator[tuple[RedisStore, RedisStore, redis.Redis]]:
    """Two started replicas on one Redis, and a raw client to look at (or tamper with) what they wrote."""
    a = RedisStore(url, 100, keyring=Keyring(K1))
    b = RedisStore(url, 100, keyring=Keyring(K1))
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        await a.start()
        await b.start()
        yield a, b, r
    finally:
        r.close()
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_two_replicas_see_every_write_within_a_second(url: str) -> None:
    async with replicas(url) as (a, b, r):
        changes: list[tuple[str, str, str]] = []
        b.on_change = lambda *x: changes.append(x)
        steps: list[tuple[str, Callable[[], Awaitable[Any]], Callable[[], bool]]] = [
            ("tenant", lambda: a.put_tenant("acme", {"denial_message": "no"}, author="admin"),
             lambda: b.tenant("acme") is not None and b.tenant("acme").settings == {"denial_message": "no"}),
            ("action", lambda: a.deploy("acme", "tag", PY, secrets=["K"]),
             lambda: b.current("acme", "tag") is not None and b.current("acme", "tag").secrets == ("K",)),
            ("flow", lambda: a.put_flow("acme", "post-login", ["tag"], author="admin"),
             lambda: b.flow("acme", "post-login") is not None),
            ("secret", lambda: a.put_secret("acme", "K", SECRET, author="admin"),
             lambda: b.secret_values("acme") == {"K": SECRET}),
            ("flow rollback", lambda: a.put_flow("acme", "post-login", [], author="admin"),
             lambda: b.flow("acme", "post-login").entries == []),
            ("secret delete", lambda: a.delete_secret("acme", "K", author="admin"),
             lambda: b.secret_values("acme") == {}),
            ("tenant delete", lambda: a.delete_tenant("acme", author="admin"),
             lambda: b.tenant("acme") is None and b.current("acme", "tag") is None
             and b.flow("acme", "post-login") is None),
        ]
        for what, write, seen in steps:
            await write()
            await wait_for(seen, 1.0, f"replica b sees the {what}")
        kinds = {c[0] for c in changes}
        assert kinds == {"tenant", "action", "flow", "secret"}
        assert ("secret", "acme", "K") in changes and ("action", "acme", "tag") in changes


@pytest.mark.redis
async def test_a_lost_message_is_caught_by_the_generation_check(url: str) -> None:
    async with replicas(url) as (a, b, r):
        async def no_publish(*args: Any, **kw: Any) -> int:
            return 0
        a._redis.publish = no_publish  # type: ignore[method-assign]  # every message from a is lost
        await a.put_tenant("acme", {}, author="admin")
        await a.put_secret("acme", "K", SECRET, author="admin")
        await a.put_flow("acme", "post-login", ["x"], author="admin")
        await wait_for(lambda: b.flow("acme", "post-login") is not None and b.secret_values("acme") == {"K": SECRET},
                       1.0, "the version check reloads the tenant")
        await a.delete_tenant("acme", author="admin")
        await wait_for(lambda: b.tenant("acme") is None and b.secret_values("acme") == {}, 1.0,
                       "the version check drops the deleted tenant")


def _dump_everything(url: str) -> list[bytes]:
    """Every key's name, its DUMP serialization and its readable contents, as bytes."""
    out: list[bytes] = []
    with redis.Redis.from_url(url) as r:
        for k in r.scan_iter(count=1000):
            out.append(k)
            out.append(r.dump(k) or b"")
            t = r.type(k)
            if t == b"string":
                out.append(r.get(k) or b"")
            elif t == b"hash":
                out.extend(x for kv in r.hgetall(k).items() for x in kv)
            elif t == b"list":
                out.extend(r.lrange(k, 0, -1))
            elif t == b"set":
                out.extend(r.smembers(k))
            elif t == b"zset":
                out.extend(m for m, _ in r.zrange(k, 0, -1, withscores=True))
    return out


def _encodings(value: str) -> list[bytes]:
    """The value as bytes, hex (both cases), and base64 (standard and URL-safe) at every byte alignment."""
    raw = value.encode()
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):  # a value inside a larger base64 text starts at any of three alignments
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * shift + raw)[4 * ((shift + 2) // 3):]
            forms.append(text[:-4].rstrip(b"="))  # the stable middle, no padding
    return [f for f in forms if len(f) >= 8]


@pytest.mark.redis
async def test_a_redis_dump_holds_no_secret_value_in_any_form(url: str) -> None:
    async with replicas(url) as (a, b, r):
        await a.put_tenant("acme", {}, author="admin")
        await a.deploy("acme", "tag", PY, secrets=["API_KEY"])
        await a.put_secret("acme", "API_KEY", SECRET, author="admin")
        await a.put_secret("acme", "API_KEY", SECRET + "-2", author="admin")   # the old value too
        await a.put_secret("acme", "OTHER", SECRET[::-1], author="admin")
        await a.record_run("acme", "f1", {"flow_id": "f1", "note": "no secret here"})
        await wait_for(lambda: b.secret_values("acme").get("API_KEY") == SECRET + "-2", 1.0, "b decrypts")
        dump = _dump_everything(url)
        assert any(b"v1:" + key_id(K1).encode() in x for x in dump)  # the ciphertexts are there
        for value in (SECRET, SECRET + "-2", SECRET[::-1]):
            for form in _encodings(value):
                hits = [x[:80] for x in dump if form in x]
                assert not hits, f"{value!r} found in Redis as {form!r}: {hits}"


@pytest.mark.redis
async def test_wrong_key_tampered_or_moved_ciphertexts_are_bad_records(url: str) -> None:
    async with replicas(url) as (a, b, r):
        for t in ("acme", "beta"):
            await a.put_tenant(t, {}, author="admin")
        await a.put_secret("acme", "GOOD", SECRET, author="admin")
        await a.put_secret("acme", "TAMPERED", SECRET, author="admin")
        await a.put_secret("beta", "MOVED", SECRET, author="admin")
        await wait_for(lambda: len(b.secret_values("acme")) == 2, 1.0, "b loads acme's secrets")
        bad0 = b.bad_records
        # tamper: flip one ciphertext character; move: copy acme's record to beta's other name
        rec = orjson.loads(r.hget(P + "secrets:acme", "TAMPERED"))
        head, _, ct = rec["value"].rpartition(":")
        rec["value"] = head + ":" + ("A" if ct[0] != "A" else "B") + ct[1:]
        r.hset(P + "secrets:acme", "TAMPERED", orjson.dumps(rec))
        r.hset(P + "secrets:beta", "MOVED", r.hget(P + "secrets:acme", "GOOD"))
        r.hincrby(P + "tgen", "acme", 1)
        r.hincrby(P + "tgen", "beta", 1)
        r.incr(P + "gen")
        await wait_for(lambda: "TAMPERED" not in b.secret_values("acme") and "MOVED" not in b.secret_values("beta"),
                       1.0, "the bad values are dropped")
        assert b.secret_values("acme") == {"GOOD": SECRET} and b.bad_records >= bad0 + 2
        # a value written by a replica with another key: unknown key id, a bad record here
        rec2 = {"value": Keyring(K2).encrypt("acme", "OTHERKEY", SECRET), "updated_at": time.time()}
        r.hset(P + "secrets:acme", "OTHERKEY", orjson.dumps(rec2))
        r.hincrby(P + "tgen", "acme", 1)
        r.incr(P + "gen")
        bad1 = b.bad_records
        await wait_for(lambda: b.bad_records > bad1, 1.0, "the other key's value is a bad record")
        assert "OTHERKEY" not in b.secret_values("acme") and b.secret_values("acme") == {"GOOD": SECRET}
        # and a replica starting with only the other key refuses to start (serve exits 2), naming the key ids
        d = RedisStore(url, 100, keyring=Keyring(K2))
        with pytest.raises(SecretsKeyMissing, match=key_id(K1)):
            await d.start()
        await d.close()
        # without any key: also refused, and writes say how to fix it
        e = RedisStore(url, 100, keyring=Keyring(None))
        with pytest.raises(SecretsKeyMissing, match="ACTIONPOOL_SECRETS_KEY"):
            await e.start()
        await e.close()


@pytest.mark.redis
async def test_without_a_key_redis_refuses_to_store_secrets(url: str) -> None:
    store = RedisStore(url, 100, keyring=Keyring(None))
    await store.start()
    try:
        await store.put_tenant("acme", {}, author="admin")
        with pytest.raises(SecretsUnavailable, match="ACTIONPOOL_SECRETS_KEY"):
            await store.put_secret("acme", "K", SECRET, author="admin")
        assert store.secret_names("acme") == []
        mem = MemoryStore(10)  # memory:// keeps values in memory only and needs no key
        await mem.put_tenant("acme", {}, author="admin")
        await mem.put_secret("acme", "K", SECRET, author="admin")
        assert mem.secret_values("acme") == {"K": SECRET}
    finally:
        await store.close()


@pytest.mark.redis
async def test_key_rotation_with_previous_keys_and_the_rekey_pass(url: str) -> None:
    old = RedisStore(url, 100, keyring=Keyring(K1))
    await old.start()
    await old.put_tenant("acme", {}, author="admin")
    for i in range(3):
        await old.put_secret("acme", f"K{i}", f"{SECRET}-{i}", author="admin")
    await old.close()
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        ids = {Keyring.key_of(orjson.loads(v)["value"]) for v in r.hvals(P + "secrets:acme")}
        assert ids == {key_id(K1)}
        new = RedisStore(url, 100, keyring=Keyring(K2, [K1]))   # rotated: K1 moved to _PREVIOUS
        await new.start()                                      # the start-up pass re-encrypts with K2
        try:
            assert new.secret_values("acme") == {f"K{i}": f"{SECRET}-{i}" for i in range(3)}
            ids = {Keyring.key_of(orjson.loads(v)["value"]) for v in r.hvals(P + "secrets:acme")}
            assert ids == {key_id(K2)}
            assert await new.rekey_secrets() == 0
        finally:
            await new.close()
        only_new = RedisStore(url, 100, keyring=Keyring(K2))    # K1 can now be dropped
        await only_new.start()
        try:
            assert only_new.secret_values("acme")["K0"] == f"{SECRET}-0"
        finally:
            await only_new.close()
    finally:
        r.close()


@pytest.mark.redis
async def test_deleted_tenant_leaves_no_key_but_its_audit(url: str) -> None:
    async with replicas(url) as (a, b, r):
        for t in ("acme", "beta"):
            await a.put_tenant(t, {"allow_hosts": ["h"]}, author="admin")
            for slug in ("tag", "geo"):
                await a.deploy(t, slug, PY)
                await a.deploy(t, slug, PY2 + f"# {slug}\n")
            await a.deploy(t, "tag", PY + "# s\n", shadow=True)
            await a.seed(t, "seeded", PY)
            await a.put_flow(t, "post-login", ["tag"], author="admin")
            await a.put_flow(t, "post-login", ["tag", "geo"], author="admin")
            await a.put_secret(t, "K", SECRET, author="admin")
            for i in range(700):  # more than one UNLINK batch of run records
                await a.record_run(t, f"{t}-{i}", {"flow_id": f"{t}-{i}"})
        before_beta = sorted(k for k in r.scan_iter(count=1000) if "beta" in k)
        assert await a.delete_tenant("acme", author="admin")
        left = [k for k in r.scan_iter(count=1000) if "acme" in k or r.type(k) == "string" and k.startswith(
            P + "run:acme")]
        assert left == [P + "audit:acme"], left
        assert "acme" not in r.hkeys(P + "tenants") and "acme" not in r.hkeys(P + "tgen")
        assert not [m for m in r.smembers(P + "actions") if m.startswith("acme:")]
        assert sorted(k for k in r.scan_iter(count=1000) if "beta" in k) == before_beta
        await wait_for(lambda: b.tenant("acme") is None and b.current("acme", "tag") is None, 1.0, "b drops acme")
        assert b.current("beta", "tag") is not None


@pytest.mark.redis
async def test_writes_are_idempotent_under_a_retried_request_id(url: str) -> None:
    store = RedisStore(url, 100, keyring=Keyring(K1))
    await store.start()
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        await store.put_tenant("acme", {}, author="admin")
        for i in range(3):
            await store.put_flow("acme", "post-login", [f"a{i}"], author="admin")
        audit = orjson.dumps({"op": "rollback"}).decode()
        args = [P, "acme", "rid-1", 300, "post-login", "", 10, audit, 100]
        first = await store._s_rollback_flow(args=args)
        second = await store._s_rollback_flow(args=args)   # redis-py retrying after a lost reply
        assert first == second and r.llen(P + "flowstack:acme:post-login") == 2
        sec = orjson.dumps({"value": Keyring(K1).encrypt("acme", "K", SECRET), "updated_at": 1.0}).decode()
        args = [P, "acme", "rid-2", 300, "K", sec, 10, orjson.dumps({"op": "create"}).decode(), 100]
        assert await store._s_put_secret(args=args) == "created"
        assert await store._s_put_secret(args=args) == "created"   # the first outcome, not "updated"
        assert r.llen(P + "audit:acme") == 6   # tenant, 3 flows, one rollback and one secret: no doubles
    finally:
        r.close()
        await store.close()


@pytest.mark.redis
async def test_an_emptied_redis_is_written_back_with_the_catalog(url: str) -> None:
    async with replicas(url) as (a, b, r):
        await a.put_tenant("acme", {"denial_message": "no"}, author="admin")
        await a.deploy("acme", "tag", PY, language="python", secrets=["K"], message="m")
        f = await a.put_flow("acme", "post-login", ["tag"], author="admin")
        await a.put_secret("acme", "K", SECRET, author="admin")
        await wait_for(lambda: b.secret_values("acme") == {"K": SECRET}, 1.0, "b loads")
        r.flushall()   # Redis restarted without persistence
        await wait_for(lambda: r.hexists(P + "tenants", "acme") and r.hexists(P + "secrets:acme", "K"), 5.0,
                       "a replica writes the catalog back")
        assert SECRET not in r.hget(P + "secrets:acme", "K")   # written back as ciphertext
        fresh = RedisStore(url, 100, keyring=Keyring(K1))
        await fresh.start()
        try:
            assert fresh.tenant("acme").settings == {"denial_message": "no"}
            assert fresh.flow("acme", "post-login").version == f.version
            assert fresh.secret_values("acme") == {"K": SECRET}
            assert fresh.current("acme", "tag").secrets == ("K",)
        finally:
            await fresh.close()
        assert a.tenant("acme") is not None and b.tenant("acme") is not None


@pytest.mark.redis
async def test_a_malformed_catalog_record_is_counted_and_the_old_view_kept(url: str) -> None:
    async with replicas(url) as (a, b, r):
        await a.put_tenant("acme", {"denial_message": "no"}, author="admin")
        await a.put_flow("acme", "post-login", ["x"], author="admin")
        await wait_for(lambda: b.flow("acme", "post-login") is not None, 1.0, "b loads")
        bad0 = b.bad_records
        r.hset(P + "tenants", "acme", "{not json")
        r.hset(P + "flows:acme", "post-login", '{"entries": 5}')
        r.hincrby(P + "tgen", "acme", 1)
        r.incr(P + "gen")
        await wait_for(lambda: b.bad_records >= bad0 + 2, 1.0, "b counts the bad records")
        assert b.tenant("acme").settings == {"denial_message": "no"} and b.flow("acme", "post-login").entries == ["x"]
        r.delete(P + "audit:acme")
        r.set(P + "audit:acme", "a string where a list belongs")
        await a.put_tenant("acme", {}, author="admin")  # the write repairs the key and goes through
        assert (await a.audit("acme"))[0]["op"] == "update"


@pytest.mark.redis
def test_serve_refuses_to_start_on_secrets_it_cannot_decrypt(url: str, tmp_path: Path) -> None:
    """A real `actionpool serve`: exit 2 and a line naming the key id, without the key or with another one."""
    async def seed() -> None:
        store = RedisStore(url, 100, keyring=Keyring(K1))
        await store.start()
        await store.put_tenant("acme", {}, author="admin")
        await store.put_secret("acme", "K", SECRET, author="admin")
        await store.close()
    asyncio.run(seed())
    cfg = write_config(tmp_path, f'[store]\nurl = "{url}"\n[tenants.acme]\n')
    for key in ("", base64.b64encode(K2).decode()):
        env = {**os.environ, "ACTIONPOOL_SECRETS_KEY": key}
        proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "serve", "--config", str(cfg), "--port",
                               "0"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"encrypted with key id(s) {key_id(K1)}" in proc.stderr and SECRET not in proc.stderr
    s = start_serve(cfg, env={"ACTIONPOOL_SECRETS_KEY": base64.b64encode(K2).decode(),
                              "ACTIONPOOL_SECRETS_KEY_PREVIOUS": base64.b64encode(K1).decode()})
    try:
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0
    with redis.Redis.from_url(url, decode_responses=True) as r:  # the start-up pass re-encrypted it with K2
        assert Keyring.key_of(orjson.loads(r.hget(P + "secrets:acme", "K"))["value"]) == key_id(K2)


@pytest.mark.redis
async def test_a_tenant_re_created_before_its_deletes_sweep_inherits_nothing_and_keeps_its_new_versions(
        redis_server_optional: str | None) -> None:
    """Failed before the fix: the delete's script dropped the indexes but left the action stacks to a later SCAN
    sweep. A tenant re-created (and deployed to) in between pushed onto its predecessor's stack (a rollback
    reached the deleted tenant's versions), and the sweep then unlinked the new tenant's keys."""
    if redis_server_optional is None:
        pytest.skip("redis-server not found on PATH")
    with redis.Redis.from_url(redis_server_optional) as r:
        r.flushall()
    a = await _started(_make("redis", redis_server_optional))
    swept: list[tuple[str, str]] = []
    real_sweep = a._unlink_tenant_keys  # type: ignore[attr-defined]

    async def later(tenant: str, gone: str) -> None:  # the sweep runs when the test says
        swept.append((tenant, gone))

    try:
        await a.put_tenant("acme", {}, author="admin")
        await a.deploy("acme", "tag", PY)
        await a.deploy("acme", "tag", PY2)
        a._unlink_tenant_keys = later  # type: ignore[attr-defined]
        assert await a.delete_tenant("acme", author="admin") and swept
        await a.put_tenant("acme", {}, author="admin")
        new = await a.deploy("acme", "tag", PY + "# new\n")
        with pytest.raises(NothingToRollBack):  # nothing of the deleted tenant's stack below it
            await a.rollback("acme", "tag")
        assert await a.get_version("acme", "tag", version_of(PY2)) is None
        await real_sweep(*swept[0])  # the delayed sweep meets the re-created tenant: its keys stay
        b = await _started(_make("redis", redis_server_optional))
        try:
            got = b.current("acme", "tag")
            assert got is not None and got.version == new.version and got.source == PY + "# new\n"
        finally:
            await b.close()
        with redis.Redis.from_url(redis_server_optional, decode_responses=True) as r:
            assert r.llen(P + "action:acme:tag:stack") == 1
            assert set(r.hkeys(P + "srcs:acme")) == {new.version}
            assert r.exists(P + f"src:acme:{version_of(PY2)}") == 0
    finally:
        await a.close()
