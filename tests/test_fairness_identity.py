"""Worker identity: a warm worker belongs to one action (tenant, slug, source, secrets).

Module globals survive between executions in a warm worker, so the probe
action below remembers the secret it saw and reports it on its next run. Two
actions that differ only in secrets (or slug, or tenant) must never meet in one
worker: the second must never see the first's secret.
"""

from __future__ import annotations

import pytest

from actionpool.runner import Action, RunnerConfig
from actionpool.runner._flow import action_identity

from conftest import make_runner

# Reports the secret the previous execution in this process saw, and its pid.
PROBE = '''
import os
SEEN = None

def on_execute(event, api):
    global SEEN
    api.state.set("previous", SEEN)
    api.state.set("pid", os.getpid())
    SEEN = event.secrets["key"]
'''


async def _run(r, action: Action, tenant: str = "t1") -> dict:
    res = await r.run_flow(trigger="post-login", actions=[action], event={"user": {}}, tenant=tenant)
    assert res.outcome == "allow", res.denial
    return res.state[action.slug]


def test_identity_covers_slug_source_and_secrets() -> None:
    base = Action(slug="a", source=PROBE, secrets={"key": "one"})
    assert base.identity == Action(slug="a", source=PROBE, secrets={"key": "one"}).identity
    assert base.identity != Action(slug="a", source=PROBE, secrets={"key": "two"}).identity
    assert base.identity != Action(slug="b", source=PROBE, secrets={"key": "one"}).identity
    assert base.identity != Action(slug="a", source=PROBE + "\n", secrets={"key": "one"}).identity
    assert base.identity != Action(slug="a", source=PROBE, secrets={"key": "one", "x": ""}).identity
    # No ambiguity from moving bytes between a secret's name and value.
    assert action_identity("a", "d", {"ab": "c"}) != action_identity("a", "d", {"a": "bc"})
    # Order of secrets does not matter.
    assert (Action(slug="a", source="", secrets={"x": "1", "y": "2"}).identity
            == Action(slug="a", source="", secrets={"y": "2", "x": "1"}).identity)


def test_identity_is_fixed_at_creation() -> None:
    secrets = {"key": "one"}
    a = Action(slug="a", source=PROBE, secrets=secrets)
    before = a.identity
    secrets["key"] = "two"  # the caller's dict, not the action's
    assert a.secrets == {"key": "one"} and a.identity == before


async def test_same_source_different_secrets_never_share_a_worker() -> None:
    one = Action(slug="a", source=PROBE, secrets={"key": "secret-of-one"})
    two = Action(slug="a", source=PROBE, secrets={"key": "secret-of-two"})
    async with make_runner(RunnerConfig(pool_size=1, max_workers=4)) as r:
        s1 = await _run(r, one)
        s1b = await _run(r, one)
        # The probe works: the same action on its warm worker sees its own previous secret.
        assert s1b["pid"] == s1["pid"] and s1b["previous"] == "secret-of-one"
        for _ in range(3):
            s2 = await _run(r, two)
            assert s2["previous"] in (None, "secret-of-two")
            assert s2["pid"] != s1["pid"]
        s1c = await _run(r, one)
        assert s1c["previous"] == "secret-of-one"


@pytest.mark.parametrize("other", ["slug", "tenant"])
async def test_other_slug_or_tenant_never_shares_a_worker(other: str) -> None:
    one = Action(slug="a", source=PROBE, secrets={"key": "secret-of-one"})
    two = Action(slug="b" if other == "slug" else "a", source=PROBE, secrets={"key": "secret-of-two"})
    tenant2 = "t2" if other == "tenant" else "t1"
    async with make_runner(RunnerConfig(pool_size=1, max_workers=4)) as r:
        s1 = await _run(r, one)
        await _run(r, one)
        for _ in range(3):
            s2 = await _run(r, two, tenant2)
            assert s2["previous"] in (None, "secret-of-two") and s2["pid"] != s1["pid"]


async def test_tenant_binding_shares_workers_within_the_tenant() -> None:
    """The documented trade-off of worker_binding="tenant": one worker for the tenant's actions."""
    one = Action(slug="a", source=PROBE, secrets={"key": "secret-of-one"})
    two = Action(slug="b", source=PROBE + "# b\n", secrets={"key": "secret-of-two"})
    async with make_runner(RunnerConfig(pool_size=0, max_workers=4, worker_binding="tenant")) as r:
        s1 = await _run(r, one)
        s2 = await _run(r, two)
        assert s2["pid"] == s1["pid"]
        # ...but never across tenants.
        s3 = await _run(r, two, "t2")
        assert s3["pid"] != s1["pid"] and s3["previous"] is None
