"""The Node.js gateway client (examples/gateway-client/client.mjs) against a real ``actionpool serve``.

The issue asks for an example client in another language, run by a test when ``node`` is on the
machine. The client uses only Node's built-in ``fetch``; this test starts a sidecar with a flow token
and an admin token (memory:// store, no tenant in the config: the client onboards its own), runs the
client as a subprocess, and checks its exit status and each step line it prints, so a route, a
status or a field the client relies on that changes breaks this test.

The README's "Managing tenants at runtime" block (curl) runs here too, as printed, against the same
kind of sidecar: it is the other client a newcomer copies.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from serve_fixtures import ADMIN, ADMIN_TOKEN, TOKEN, start_serve, write_config

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "examples" / "gateway-client" / "client.mjs"
NODE = shutil.which("node")
VERSION = r"[0-9a-f]{16}"

needs_node = pytest.mark.skipif(NODE is None, reason="node is not on PATH: the Node.js example client cannot run here")

CONFIG = """\
[runner]
pool_size = 1
max_workers = 4

[server]
token_env = "AP_TOKEN"
admin_token_env = "AP_ADMIN"
"""

# One pattern per step, in the order the client prints them (its README describes the walk-through).
EXPECTED_LINES = [
    r"tenant example-co: created \(201\)",
    r"secret BLOCKED_COUNTRIES: set \(204\), listed by name only",
    rf"action check-country: deployed python version {VERSION} \(201\)",
    rf"action tag-tier: deployed javascript version {VERSION} \(201\)",
    rf"flow post-login: bound check-country, a deny block and tag-tier as version {VERSION} \(200\)",
    r"run post-login from IN: allow, claim tier=enterprise",
    r"run post-login from XX: deny, reason country-blocked, user message \"Sign-in is not available from your country\.\"",
    rf"action check-country: bad version refused \(422\) at line 1, column \d+: .+; still {VERSION}",
    rf"action tag-tier: deployed {VERSION}, rolled back to {VERSION} \(200\)",
    rf"flow post-login: replaced by {VERSION}, rolled back to {VERSION} \(200\); XX is denied again",
    r"tenant example-co: deleted \(204\); its flows answer 404",
    r"done",
]


def run_client(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, str(CLIENT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=45,
                          stdin=subprocess.DEVNULL)


@needs_node
@pytest.mark.timeout(120)
def test_node_client_onboards_deploys_runs_and_rolls_back_against_a_real_sidecar(tmp_path: Path) -> None:
    serve = start_serve(write_config(tmp_path, CONFIG))
    try:
        env = {"PATH": os.environ.get("PATH", ""), "ACTIONPOOL_URL": serve.url,
               "ACTIONPOOL_ADMIN_TOKEN": ADMIN_TOKEN, "ACTIONPOOL_FLOW_TOKEN": TOKEN}
        ran = run_client(env)
        explain = f"exit {ran.returncode}\nstdout:\n{ran.stdout}\nstderr:\n{ran.stderr}\nsidecar:\n{serve.output()[-3000:]}"
        assert ran.returncode == 0, explain
        lines = ran.stdout.splitlines()
        assert len(lines) == len(EXPECTED_LINES), explain
        for line, pattern in zip(lines, EXPECTED_LINES):
            assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}\n{explain}"
        # The rollbacks went back to the versions the client deployed first.
        tier = re.fullmatch(rf"action tag-tier: deployed javascript version ({VERSION}) \(201\)", lines[3])
        assert tier is not None and lines[8].endswith(f"rolled back to {tier.group(1)} (200)"), explain
        flow = re.search(rf"as version ({VERSION})", lines[4])
        assert flow is not None and f"rolled back to {flow.group(1)} (200)" in lines[9], explain
        assert "XX,YY,ZZ,QQ" not in serve.output(), explain   # the client's secret value is in no log line
        # The client deleted its tenant: the sidecar no longer knows it.
        with httpx.Client(base_url=serve.url, headers=ADMIN, timeout=30) as c:
            assert c.get("/v1/tenants/example-co").status_code == 404
    finally:
        serve.stop()


@needs_node
@pytest.mark.timeout(120)
def test_node_client_exits_1_naming_the_call_when_the_flow_token_is_refused(tmp_path: Path) -> None:
    """An unexpected answer is an error that names the call and the status, never a silent success."""
    serve = start_serve(write_config(tmp_path, CONFIG))
    try:
        env = {"PATH": os.environ.get("PATH", ""), "ACTIONPOOL_URL": serve.url,
               "ACTIONPOOL_ADMIN_TOKEN": TOKEN, "ACTIONPOOL_FLOW_TOKEN": TOKEN}   # the flow token may not manage
        ran = run_client(env)
        assert ran.returncode == 1, ran
        assert ran.stdout == "", ran
        assert re.search(r"gateway-client: failed: PUT /v1/tenants/example-co: expected 200 or 201, got 403: ",
                         ran.stderr), ran.stderr
    finally:
        serve.stop()


@needs_node
def test_node_client_exits_2_when_its_configuration_is_incomplete() -> None:
    ran = run_client({"PATH": os.environ.get("PATH", ""), "ACTIONPOOL_URL": "http://127.0.0.1:9"})
    assert ran.returncode == 2, ran
    assert "set ACTIONPOOL_ADMIN_TOKEN, ACTIONPOOL_FLOW_TOKEN" in ran.stderr, ran.stderr


def readme_runtime_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Managing tenants at runtime\n")
    section = readme[start:readme.index("\n## ", start + 1)]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not on PATH: the README's curl block cannot run here")
@pytest.mark.timeout(120)
def test_readme_runtime_management_block_runs_as_printed(tmp_path: Path) -> None:
    """Every curl of the block succeeds (``--fail-with-body`` under ``set -e``), the login is allowed, the tenant is gone."""
    block = readme_runtime_block()
    assert block.count("curl ") >= 6 and "$ACTIONPOOL_ADMIN_TOKEN" in block and "$ACTIONPOOL_TOKEN" in block, block
    serve = start_serve(write_config(tmp_path, CONFIG))
    try:
        env = {"PATH": os.environ.get("PATH", ""), "ACTIONPOOL_URL": serve.url,
               "ACTIONPOOL_ADMIN_TOKEN": ADMIN_TOKEN, "ACTIONPOOL_TOKEN": TOKEN}
        ran = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=45, stdin=subprocess.DEVNULL)
        explain = f"exit {ran.returncode}\nstdout:\n{ran.stdout}\nstderr:\n{ran.stderr}\nsidecar:\n{serve.output()[-3000:]}"
        assert ran.returncode == 0, explain
        assert '"outcome":"allow"' in ran.stdout and '"tag-account-tier":{"tier":"enterprise"}' in ran.stdout, explain
        assert '"op":"deploy"' in ran.stdout, explain   # the audit trail the block reads
        with httpx.Client(base_url=serve.url, headers=ADMIN, timeout=30) as c:
            assert c.get("/v1/tenants/acme").status_code == 404
    finally:
        serve.stop()
