"""Strict sandbox mode: the runner refuses to start without the protections it requires."""

from __future__ import annotations

import pytest

from conftest import make_runner, run
from actionpool.runner import RunnerConfig, SandboxConfig, SandboxUnavailable
from actionpool.worker._sandbox import PROTECTIONS


async def _degraded_report() -> dict:
    async with make_runner(RunnerConfig(pool_size=0)) as r:
        return dict(r.sandbox_report)


async def test_strict_mode_starts_when_required_protections_are_present() -> None:
    report = await _degraded_report()
    present = tuple(p for p in ("fds", "no_new_privs", "rlimits", "landlock", "seccomp") if report.get(p))
    async with make_runner(RunnerConfig(pool_size=1, sandbox=SandboxConfig(mode="strict", require=present))) as r:
        res = await run(r, "def on_execute(event, api):\n    api.state.set('ok', True)\n")
    assert res["outcome"] == "allow"


async def test_strict_mode_refuses_to_start_without_a_required_protection() -> None:
    report = await _degraded_report()
    missing = [p for p in PROTECTIONS if not report.get(p)]
    if not missing:
        pytest.skip("every protection is active on this host: nothing to require that is missing")
    cfg = RunnerConfig(pool_size=1, sandbox=SandboxConfig(mode="strict", require=(missing[0],)))
    with pytest.raises(SandboxUnavailable, match=missing[0]):
        async with make_runner(cfg):
            pass
