"""Decision blocks route flows (issue 17): ``allow`` ends a flow allowed, ``skip_to`` jumps forward.

The reference's Decision blocks read ``step.<slug>.<key>`` and route the login, they do not
only stop it. Every flow here runs through ``Runner.run_flow`` on real worker processes (the
sidecar passes the same Decision objects), and every action that must not run would deny
the flow if it ran, so an ``allow`` outcome proves it was skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import make_runner
from actionpool.runner import Action, ConfigError, FlowResult, Runner
from actionpool.runner.hosting import Decision, FlowBlock, decision_from_block, make_decision, parse_block
from actionpool.runner._flow import FlowState
from actionpool.runner._config import Limits

TAG = '''
def on_execute(event, api):
    api.state.set("tier", event.user.get("tier", "self-serve"))
'''
NEVER = '''
def on_execute(event, api):
    api.access.deny("this action must have been skipped")
'''
MARK = '''
def on_execute(event, api):
    api.user.setAppMetadata({"reached": True})
'''


def actions(*entries: Any) -> list[Action]:
    """Slug strings name the canned actions (tag, never*, mark); dicts are blocks, numbered by position."""
    out: list[Action] = []
    for i, e in enumerate(entries, 1):
        if isinstance(e, dict):
            out.append(decision_from_block(i, e))
        else:
            source = TAG if e == "tag" else MARK if e == "mark" else NEVER
            out.append(Action(slug=e, source=source))
    return out


async def run(r: Runner, entries: list[Action], tier: str = "enterprise") -> FlowResult:
    return await r.run_flow(trigger="post-login", actions=entries, event={"user": {"tier": tier}}, tenant="acme")


def statuses(result: FlowResult) -> list[tuple[str, str]]:
    return [(a.slug, a.status) for a in result.actions]


async def test_allow_ends_the_flow_allowed_and_skips_the_rest() -> None:
    flow = actions("tag", {"if": 'step.tag.tier == "enterprise"', "allow": True}, "never-1", "never-2")
    async with make_runner() as r:
        res = await run(r, flow)
        assert res.outcome == "allow" and res.denial is None, res.denial
        assert statuses(res) == [("tag", "ok"), ("decision-2", "ok"), ("never-1", "skipped"), ("never-2", "skipped")]
        assert res.state == {"tag": {"tier": "enterprise"}}
        assert {"action": "decision-2", "level": "info",
                "message": 'allow: step.tag.tier == "enterprise" is true; the flow ends allowed'} in res.logs
        # false: the flow continues, and the next action runs (and denies)
        res = await run(r, flow, tier="self-serve")
        assert res.outcome == "deny" and res.denial["action"] == "never-1"
        assert statuses(res) == [("tag", "ok"), ("decision-2", "ok"), ("never-1", "denied"), ("never-2", "skipped")]


async def test_skip_to_jumps_forward_over_the_entries_between() -> None:
    flow = actions("tag", {"if": 'step.tag.tier == "enterprise"', "skip_to": "mark"}, "never-1",
                   {"if": "true", "deny": "blocked-by-a-skipped-block"}, "mark", "tail")
    flow[-1] = Action(slug="tail", source=TAG)
    async with make_runner() as r:
        res = await run(r, flow)
        assert res.outcome == "allow", res.denial
        assert statuses(res) == [("tag", "ok"), ("decision-2", "ok"), ("never-1", "skipped"),
                                 ("decision-4", "skipped"), ("mark", "ok"), ("tail", "ok")]
        assert res.app_metadata == {"reached": True}
        assert any(l["message"].endswith("the flow goes on at mark") for l in res.logs)
        res = await run(r, flow, tier="self-serve")  # false: nothing skipped, never-1 runs and denies
        assert res.outcome == "deny" and res.denial["action"] == "never-1"


async def test_blocks_in_a_row_and_deny_with_a_user_message() -> None:
    flow = actions({"if": "true", "skip_to": "tag"}, "never-1", "tag",
                   {"if": 'step.tag.tier == "self-serve"', "deny": "free-tier", "message": "Upgrade to sign in."},
                   {"if": "true", "allow": True}, "never-2")
    async with make_runner() as r:
        res = await run(r, flow, tier="self-serve")
        assert res.outcome == "deny"
        assert res.denial["kind"] == "denied" and res.denial["reason"] == "free-tier"
        assert res.denial["user_message"] == "Upgrade to sign in." and res.denial["action"] == "decision-4"
        assert statuses(res) == [("decision-1", "ok"), ("never-1", "skipped"), ("tag", "ok"), ("decision-4", "denied"),
                                 ("decision-5", "skipped"), ("never-2", "skipped")]
        res = await run(r, flow, tier="enterprise")
        assert res.outcome == "allow"
        assert statuses(res)[-2:] == [("decision-5", "ok"), ("never-2", "skipped")]


async def test_a_block_that_cannot_decide_still_fails_closed() -> None:
    flow = actions({"if": "step.nobody.flag", "allow": True}, "never-1")
    async with make_runner() as r:
        res = await run(r, flow)
        assert res.outcome == "deny" and res.denial["kind"] == "decision_error"
        assert statuses(res) == [("decision-1", "failed"), ("never-1", "skipped")]
        # an embedder's list whose skip_to target is missing (or earlier) is denied, never run past
        bad = [make_decision(1, "true", skip_to="gone"), Action(slug="never-1", source=NEVER)]
        res = await run(r, bad)
        assert res.outcome == "deny" and res.denial["kind"] == "decision_error"
        assert "skip_to 'gone' is not a later entry" in res.denial["reason"]
        assert statuses(res) == [("decision-1", "failed"), ("never-1", "skipped")]


def test_make_decision_keeps_its_old_call_and_checks_the_new_one() -> None:
    old = make_decision(2, "step.x.y == true", "reason")
    assert isinstance(old, Decision) and (old.slug, old.deny_reason, old.allow, old.skip_to) == \
        ("decision-2", "reason", False, "")
    assert make_decision(2, "step.x.y == true", deny="reason") == old
    assert make_decision(3, "true", allow=True).allow is True
    assert make_decision(3, "true", skip_to="later").skip_to == "later"
    assert make_decision(3, "true", "r", message="Hi.").user_message == "Hi."
    for kwargs, text in [({}, "exactly one of"), ({"deny": "r", "allow": True}, "exactly one of"),
                         ({"allow": True, "message": "m"}, "deny block"), ({"skip_to": "Bad Slug"}, "slug"),
                         ({"deny": ""}, "deny reason")]:
        with pytest.raises(ValueError, match=text):
            make_decision(1, "true", **kwargs)
    with pytest.raises(ValueError, match="not a valid CEL expression"):
        make_decision(1, "1 +", "r")


def test_parse_block_round_trips_and_decides_on_a_flow_state() -> None:
    for entry in ({"if": "true", "deny": "r"}, {"if": "true", "deny": "r", "message": "m"},
                  {"if": "true", "allow": True}, {"if": "true", "skip_to": "b"}):
        block = parse_block(entry)
        assert isinstance(block, FlowBlock) and block.to_entry() == entry
        assert block.decision(1) == decision_from_block(1, entry)
    flow = FlowState(tenant="t", trigger="post-login", event={}, actions=[], limits=Limits(), flow_timeout_s=5,
                     denial_message="No.")
    d = make_decision(1, "true", allow=True)
    assert d.decide(flow) == "ok" and flow.goto is not None and flow.denial is None


def test_toml_flow_lists_take_the_same_blocks_and_refusals(tmp_path: Path) -> None:
    from actionpool.sidecar._config import load_config

    def load(flow: str) -> Any:
        path = tmp_path / "serve.toml"
        path.write_text(f"[tenants.acme.flows]\npost-login = {flow}\n")
        return load_config(path, env={}).tenants["acme"].flows["post-login"]

    entries = load('["a", { if = "true", skip_to = "b" }, "c", { if = "true", allow = true }, '
                   '{ if = "false", deny = "r", message = "Nope." }, "b"]')
    assert entries[1] == {"if": "true", "skip_to": "b"} and entries[3] == {"if": "true", "allow": True}
    assert entries[4] == {"if": "false", "deny": "r", "message": "Nope."}
    for flow, key, text in [
        ('["a", { if = "true", skip_to = "a" }]', "post-login[1].skip_to", "earlier entry"),
        ('[{ if = "true", skip_to = "zz" }, "a"]', "post-login[0].skip_to", "not an action of this flow"),
        ('[{ if = "true", allow = false }]', "post-login[0].allow", "allow must be true"),
        ('[{ if = "true", allow = true, message = "m" }]', "post-login[0].message", "deny block"),
        ('[{ if = "true", deny = "r", allow = true }]', "post-login[0]", "exactly one of"),
        ('["a", "b", "a"]', "post-login[2]", "already flow[0]"),
    ]:
        with pytest.raises(ConfigError) as info:
            load(flow)
        assert f"tenants.acme.flows.{key}" in str(info.value) and text in str(info.value), str(info.value)
