"""The sidecar's pure parts: decision-block compilation, the version store's semantics, redaction."""

from __future__ import annotations

from typing import Any

import pytest

from actionpool.runner._decisions import MAX_EXPR_CHARS, compile_decision, make_decision, rewrite
from actionpool.sidecar._server import redact, redact_paths
from actionpool.sidecar._store import MemoryStore, NothingToRollBack, RedisStore, Store


class FakeFlow:
    def __init__(self, state: dict[str, Any], event: dict[str, Any] | None = None) -> None:
        self.state, self.event, self.denial = state, event or {}, None

    def deny(self, slug: str, kind: str, reason: str, msg: Any) -> None:
        self.denial = {"action": slug, "kind": kind, "reason": reason}


@pytest.mark.parametrize("expr, code", [
    ("step.check-country.country_blocked == true", 'step["check-country"].country_blocked == true'),
    ("step.tag.tier == 'x-y'", "step.tag.tier == 'x-y'"),
    ("step.a-b.some-key", 'step["a-b"]["some-key"]'),
    ('"step.a-b" == step.c-d.e', '"step.a-b" == step["c-d"].e'),
    ("event.user.email.endsWith('@x.io') && step.s-1.v > 2", "event.user.email.endsWith('@x.io') && step[\"s-1\"].v > 2"),
])
def test_step_paths_with_hyphens_become_index_syntax_outside_strings(expr: str, code: str) -> None:
    assert rewrite(expr) == code


def test_decisions_deny_allow_and_fail_closed() -> None:
    d = make_decision(2, "step.check-country.country_blocked == true", "country-blocked")
    f = FakeFlow({"check-country": {"country_blocked": True}})
    assert d.decide(f) == "denied" and f.denial == {"action": "decision-2", "kind": "denied",
                                                    "reason": "country-blocked"}
    f = FakeFlow({"check-country": {"country_blocked": False}})
    assert d.decide(f) == "ok" and f.denial is None
    f = FakeFlow({})  # the step never ran: an error, so the flow is denied
    assert d.decide(f) == "failed" and f.denial["kind"] == "decision_error"
    d = make_decision(1, "event.user.email", "x")  # not a boolean
    f = FakeFlow({}, {"user": {"email": "a@b"}})
    assert d.decide(f) == "failed" and "not a boolean" in f.denial["reason"]


@pytest.mark.parametrize("expr, why", [
    ("x" * (MAX_EXPR_CHARS + 1), "longer than"),
    ("[1, 2].exists(i, i == step.a.b)", "not allowed"),
    ("[1].map(i, [1].map(j, i + j)).size() > 0", "not allowed"),
    ("__import__('os')", "unknown function"),
    ("secrets.KEY == 'x'", "unknown variable"),
    ("step.a ==", "not a valid CEL expression"),
])
def test_expensive_or_foreign_expressions_are_refused(expr: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        compile_decision(expr)


async def _store_semantics(store: Store) -> None:
    await store.put_tenant("acme", {}, author="admin")  # action writes need the tenant (UnknownTenant otherwise)
    v1 = await store.deploy("acme", "tag", "print(1)\n")
    v2 = await store.deploy("acme", "tag", "print(2)\n")
    assert v1.version != v2.version and store.current("acme", "tag").version == v2.version
    assert (await store.deploy("acme", "tag", "print(2)\n")).version == v2.version  # content-addressed, no new entry
    assert (await store.rollback("acme", "tag")).version == v1.version
    assert store.current("acme", "tag").source == "print(1)\n"
    with pytest.raises(NothingToRollBack):
        await store.rollback("acme", "tag")
    sh = await store.deploy("acme", "tag", "print(3)\n", shadow=True)
    assert store.shadow("acme", "tag").version == sh.version and store.current("acme", "tag").version == v1.version
    await store.deploy("acme", "tag", "print(3)\n")  # promoting the shadow ends it
    assert store.shadow("acme", "tag") is None and store.current("acme", "tag").version == sh.version
    d = await store.describe("acme", "tag")
    assert d["current"] == sh.version and [h["op"] for h in d["history"]] == ["deploy", "deploy", "rollback",
                                                                            "shadow", "deploy"]
    await store.seed("acme", "file", "a = 1\n")
    await store.deploy("acme", "file", "a = 2\n")
    await store.seed("acme", "file", "a = 1\n")  # the same file again: the API deploy stays
    assert store.current("acme", "file").source == "a = 2\n"
    for i in range(5):
        await store.record_run("acme", f"f{i}", {"tenant": "acme", "i": i})
    assert await store.get_run("f0") is None and (await store.get_run("f4"))["i"] == 4  # history_size = 3
    assert await store.get_run("f2") is not None


async def test_memory_store_semantics() -> None:
    await _store_semantics(MemoryStore(history_size=3))


@pytest.mark.redis
async def test_redis_store_semantics(redis_url: str) -> None:
    store = RedisStore(redis_url, history_size=3)
    await store.start()
    try:
        await _store_semantics(store)
    finally:
        await store.close()


def test_redaction_of_secrets_and_configured_paths() -> None:
    event = {"user": {"email": "ada@x.io", "name": "Ada"}, "note": "key=abcd1234!", "list": ["abcd1234"]}
    out = redact(redact_paths(event, ("user.email", "request.ip", "user.name.first")), ("abcd1234",))
    assert out == {"user": {"email": "[redacted]", "name": "Ada"}, "note": "key=[redacted]!", "list": ["[redacted]"]}
    assert event["user"]["email"] == "ada@x.io"  # the original is untouched


def test_one_tenants_flood_of_run_records_drops_only_its_own_history(tmp_path: Any, monkeypatch: Any) -> None:
    """Records wait for the history thread in per-tenant shares: a tenant over its share loses its own records,
    never another tenant's (the builder is held on an event so the records pile up)."""
    import asyncio
    import threading

    from actionpool.sidecar import _server
    from actionpool.sidecar._config import load_config

    (tmp_path / "serve.toml").write_text("[tenants.a]\n[tenants.b]\n")
    sidecar = _server.Sidecar(load_config(tmp_path / "serve.toml", env={}))
    gate = threading.Event()
    built: list[str] = []

    def slow_build(**kw: Any) -> dict[str, Any]:
        gate.wait(30)
        built.append(kw["tenant"])
        return {"tenant": kw["tenant"]}

    monkeypatch.setattr(_server, "build_record", slow_build)

    async def main() -> None:
        tenants = {name: sidecar.config.tenants[name] for name in ("a", "b")}
        body = {"flow_id": "f", "actions": []}
        flood = [asyncio.ensure_future(sidecar._record(tenants["a"], {}, dict(body), 0.0)) for _ in range(40)]
        other = asyncio.ensure_future(sidecar._record(tenants["b"], {}, dict(body), 0.0))
        await asyncio.sleep(0)   # every _record has run up to its wait for the thread
        assert sidecar.store.history_dropped == 40 - _server.RECORDS_PENDING_PER_TENANT
        gate.set()
        await asyncio.gather(*flood, other)
        assert built.count("b") == 1 and built.count("a") == _server.RECORDS_PENDING_PER_TENANT
        assert sidecar._records_pending == {} and sidecar._records_total == 0

    try:
        asyncio.run(main())
    finally:
        gate.set()
        sidecar._history_thread.shutdown(wait=True)
