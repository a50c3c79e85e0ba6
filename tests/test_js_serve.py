"""The sidecar serves JavaScript actions: a ``.js`` file in the config is a JavaScript action (issue 11)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_fixtures import start_serve, write_config

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "js"

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    [tenants.acme.actions.tag-account-tier]
    file = "actions/tag_account_tier.js"
    [tenants.acme.actions.route]
    file = "actions/route.py"
    [tenants.acme.actions.register]
    file = "actions/pre_user_registration.js"
    [tenants.acme.flows]
    post-login = ["tag-account-tier", {{ if = "step.tag-account-tier.tier == \\"blocked\\"", deny = "never" }}, "route"]
    pre-user-registration = ["register"]
"""

ACTIONS = {
    "route.py": """
        def on_execute_post_login(event, api):
            api.state.set("corporate", event.step["tag-account-tier"]["tier"] == "enterprise")
    """,
}


def test_sidecar_runs_js_actions_beside_python(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG.format(), ACTIONS)
    for name in ("tag_account_tier.js", "pre_user_registration.js"):  # the examples, as they are
        shutil.copy(EXAMPLES / name, tmp_path / "actions" / name)
    s = start_serve(path)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"email": "ada@cymmetri.io"}}).json()
            assert r["outcome"] == "allow", r
            assert r["state"] == {"tag-account-tier": {"tier": "enterprise"}, "route": {"corporate": True}}
            r = c.post("/v1/tenants/acme/flows/pre-user-registration",
                       json={"user": {"email": "x@spam.example"}, "request": {"ip": "127.0.0.1"}}).json()
            assert r["denial"]["kind"] == "denied" and r["denial"]["reason"] == "blocked-domain:spam.example"
            assert r["denial"]["user_message"] == "Sign-ups from this e-mail domain are not accepted."
    finally:
        assert s.stop() == 0, s.output()[-2000:]
