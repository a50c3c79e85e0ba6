"""``--fetch-stub`` / ``FetchConfig.stub``: an action that calls real APIs, run offline (issue 9).

The stub URLs point at a real local server that records every request, so
"nothing reaches the network" is checked, not assumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import make_runner, run
from actionpool.runner import ConfigError, FetchConfig, RunnerConfig
from actionpool.runner._fetch_stub import compile_stub, load_fetch_stub
from net_fixtures import LocalHTTPServer

ACTION = '''
import json
async def on_execute(event, api):
    res = await api.fetch(event.url, {"method": "POST", "headers": {"Content-Type": "application/json"},
                                      "body": json.dumps({"ip": "1.2.3.4"})})
    api.state.set("score", json.loads(res.body)["score"])
    api.state.set("status", res.status)
    try:
        await api.fetch(event.url + "/missing")
    except api.ApiError as exc:
        api.state.set("missing", exc.error_kind)
'''


def _stub(base: str) -> dict[str, Any]:
    return {f"POST {base}/v1/score": {"status": 200, "headers": {"content-type": "application/json"},
                                      "body": json.dumps({"score": 7})}}


async def test_stub_through_the_runner_api(http_server: LocalHTTPServer) -> None:
    base = f"http://risk.example.com:{http_server.port}"
    cfg = RunnerConfig(pool_size=1, max_workers=2,
                       fetch=FetchConfig(allow_hosts=("risk.example.com",), stub=_stub(base)))
    async with make_runner(cfg) as r:
        res = await run(r, ACTION, event={"url": f"{base}/v1/score"})
    assert res["outcome"] == "allow", res
    assert res["state"]["a"] == {"score": 7, "status": 200, "missing": "http_fetch_error"}
    assert http_server.requests == []


async def test_the_allowlist_still_applies_to_a_stub(http_server: LocalHTTPServer) -> None:
    base = f"http://risk.example.com:{http_server.port}"
    cfg = RunnerConfig(pool_size=1, max_workers=2, fetch=FetchConfig(allow_hosts=(), stub=_stub(base)))
    async with make_runner(cfg) as r:
        res = await run(r, ACTION, event={"url": f"{base}/v1/score"})
    assert res["denial"]["kind"] == "http_fetch_denied", res["denial"]
    assert http_server.requests == []


@pytest.mark.parametrize("stub,match", [
    ([], "must be a JSON object"),
    ({"GET": {}}, "must be 'METHOD URL'"),
    ({"TRACE http://a.test/": {}}, "must be 'METHOD URL'"),
    ({"GET ftp://a.test/": {}}, "absolute http"),
    ({"GET http://a.test/": []}, "must be an object"),
    ({"GET http://a.test/": {"status": "200"}}, "status must be an integer"),
    ({"GET http://a.test/": {"status": 99}}, "status must be an integer"),
    ({"GET http://a.test/": {"headers": {"a": 1}}}, "headers must be an object of strings"),
    ({"GET http://a.test/": {"body": {"a": 1}}}, "body must be a string"),
    ({"GET http://a.test/": {"delay": 1}}, "unknown field"),
])
def test_bad_stubs_are_config_errors(stub: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compile_stub(stub)
    with pytest.raises(ConfigError, match=match):
        RunnerConfig(fetch=FetchConfig(stub=stub)).validate()


def test_load_fetch_stub(tmp_path: Path) -> None:
    good = tmp_path / "stub.json"
    good.write_text(json.dumps({"GET https://a.test": {"body": "x"}}))
    assert load_fetch_stub(str(good)) == {"GET https://a.test": {"body": "x"}}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_fetch_stub(str(bad))
    with pytest.raises(ConfigError, match="cannot read fetch stub"):
        load_fetch_stub(str(tmp_path / "absent.json"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actionpool.runner.cli", *args], capture_output=True, text=True,
                          timeout=50)


def test_fetch_stub_on_the_command_line(tmp_path: Path, http_server: LocalHTTPServer) -> None:
    base = f"https://risk.example.com:{http_server.port}"
    (tmp_path / "a.py").write_text(ACTION)
    (tmp_path / "event.json").write_text(json.dumps({"url": f"{base}/v1/score"}))
    (tmp_path / "stub.json").write_text(json.dumps(_stub(base)))
    common = [str(tmp_path / "a.py"), "--trigger", "post-login", "--event", str(tmp_path / "event.json"),
              "--compact"]
    proc = _cli("run", *common, "--allow-host", "risk.example.com", "--fetch-stub", str(tmp_path / "stub.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["state"]["a"] == {"score": 7, "status": 200, "missing": "http_fetch_error"}
    denied = _cli("run", *common, "--fetch-stub", str(tmp_path / "stub.json"))  # not on the allowlist
    assert denied.returncode == 3 and json.loads(denied.stdout)["denial"]["kind"] == "http_fetch_denied"
    (tmp_path / "bad.json").write_text("[1]")
    bad = _cli("run", *common, "--fetch-stub", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "fetch stub must be a JSON object" in bad.stderr
    assert http_server.requests == []
