"""Units of the management API's rules: tenant settings and limits caps, the config's per-action secrets and
language, and the drift report (no process started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from actionpool.runner import ConfigError, Limits
from actionpool.sidecar._config import load_config
from actionpool.sidecar._tenancy import (
    SettingsError,
    Tenant,
    settings_of,
    validate_settings,
)
from serve_fixtures import write_config

CAPS = Limits(action_timeout_s=2.0, memory_mb=256)


def test_settings_defaults_and_a_full_object() -> None:
    assert validate_settings({}, CAPS) == {"denial_message": None, "allow_hosts": [], "limits": {}, "redact": [],
                                          "failure": "closed"}
    full = {"denial_message": "No.", "allow_hosts": ["api.example.com", "*.example.org", "127.0.0.1"],
            "limits": {"action_timeout_s": 1.5, "memory_mb": 64}, "redact": ["user.email"], "failure": "open"}
    assert validate_settings(full, CAPS) == full
    view = Tenant.of("acme", full, "v1")
    assert view.allow_hosts == ("api.example.com", "*.example.org", "127.0.0.1") and view.failure == "open"


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"colour": "red"}, "colour"),
    ({"denial_message": ""}, "denial_message"),
    ({"denial_message": "x" * 1001}, "denial_message"),
    ({"allow_hosts": "api.example.com"}, "allow_hosts"),
    ({"allow_hosts": ["has space.example"]}, "allow_hosts"),
    ({"allow_hosts": ["x"] * 257}, "allow_hosts"),
    ({"limits": []}, "limits"),
    ({"limits": {"nope": 1}}, "limits.nope"),
    ({"limits": {"action_timeout_s": 2.5}}, "limits.action_timeout_s"),    # above the operator's cap
    ({"limits": {"memory_mb": 512}}, "limits.memory_mb"),
    ({"limits": {"memory_mb": 64.5}}, "limits.memory_mb"),                  # an integer field
    ({"limits": {"action_timeout_s": True}}, "limits.action_timeout_s"),
    ({"limits": {"action_timeout_s": -1}}, "limits.action_timeout_s"),
    ({"limits": {"memory_mb": 16}}, "limits"),                              # within the cap, below the runner's floor
    ({"redact": ["user..email"]}, "redact"),
    ({"failure": "maybe"}, "failure"),
])
def test_bad_settings_name_the_key(body: Any, field: str) -> None:
    with pytest.raises(SettingsError) as info:
        validate_settings(body, CAPS)
    assert info.value.field == field


ACTIONS = {"a.py": "def on_execute(event, api):\n    pass\n", "b.js": "api.state.set('x', 1);\n"}


def test_config_actions_declare_secrets_and_carry_their_language(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, """
        [tenants.acme]
        failure = "open"
        limits = { action_timeout_s = 1.0 }
        [tenants.acme.actions.a]
        file = "actions/a.py"
        secrets = ["API_KEY", "OTHER"]
        [tenants.acme.actions.b]
        file = "actions/b.js"
        [tenants.acme.actions.c]
        file = "actions/a.py"
        language = "javascript"
        [tenants.acme.flows]
        post-login = ["a", { if = "true", skip_to = "b" }, { if = "false", allow = true },
                      { if = "false", deny = "no", message = "Not you." }, "b"]
    """, ACTIONS))
    t = cfg.tenants["acme"]
    assert t.actions["a"].secrets == ("API_KEY", "OTHER") and t.actions["a"].language == "python"
    assert t.actions["a"].failure is None   # the tenant's default applies
    assert t.actions["b"].secrets == () and t.actions["b"].language == "javascript"
    assert t.actions["c"].language == "javascript"
    assert t.flows["post-login"][1] == {"if": "true", "skip_to": "b"}
    assert settings_of(t) == {"denial_message": None, "allow_hosts": [], "limits": {"action_timeout_s": 1.0},
                              "redact": [], "failure": "open"}


@pytest.mark.parametrize("line, key", [
    ('secrets = ["bad name"]', "tenants.acme.actions.a.secrets"),
    ('secrets = "API_KEY"', "tenants.acme.actions.a.secrets"),
    ('language = "ruby"', "tenants.acme.actions.a.language"),
])
def test_config_action_errors_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    path = write_config(tmp_path, f"""
        [tenants.acme.actions.a]
        file = "actions/a.py"
        {line}
    """, ACTIONS)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f": {key}:" in str(info.value)


@pytest.mark.parametrize("entry, key", [
    ('{ if = "true", allow = false }', "post-login[0].allow"),
    ('{ if = "true", skip_to = 3 }', "post-login[0].skip_to"),
    ('{ if = "true", deny = "x", allow = true }', "post-login[0]"),
    ('{ if = "true", allow = true, message = "m" }', "post-login[0].message"),
])
def test_config_decision_blocks_are_checked(tmp_path: Path, entry: str, key: str) -> None:
    path = write_config(tmp_path, f"""
        [tenants.acme.flows]
        post-login = [{entry}]
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"tenants.acme.flows.{key}" in str(info.value)
