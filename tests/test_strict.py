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
    spawn = False
    if not missing:  # a spawned worker cannot have the template's minimal filesystem view
        missing, spawn = ["fs_view"], True
    cfg = RunnerConfig(pool_size=1, fork_template=not spawn, sandbox=SandboxConfig(mode="strict", require=(missing[0],)))
    with pytest.raises(SandboxUnavailable, match=missing[0]):
        async with make_runner(cfg):
            pass


def test_the_default_sandbox_mode_is_strict() -> None:
    assert SandboxConfig().mode == "strict"
    assert RunnerConfig().sandbox.mode == "strict"


async def test_a_missing_protection_runs_only_when_told_degraded(capsys: pytest.CaptureFixture[str]) -> None:
    """The same requirement the strict runner refuses: degraded starts, and says so loudly on stderr."""
    cfg = RunnerConfig(pool_size=0, fork_template=False, sandbox=SandboxConfig(require=("seccomp", "fs_view")))
    with pytest.raises(SandboxUnavailable, match="fs_view"):
        async with make_runner(cfg):
            pass
    degraded = RunnerConfig(pool_size=0, max_workers=2, fork_template=False,
                            sandbox=SandboxConfig(mode="degraded", require=("seccomp", "fs_view")))
    async with make_runner(degraded) as r:
        res = await run(r, "def on_execute(event, api):\n    api.state.set('ok', True)\n")
        await run(r, "def on_execute(event, api):\n    pass\n", tenant="other")
    assert res["outcome"] == "allow"
    err = capsys.readouterr().err
    assert err.count("actionpool: WARNING: sandbox mode 'degraded': protections MISSING on this host: fs_view") == 1, err
    assert "actionpool doctor" in err


@pytest.mark.parametrize("mode", ["off", "degraded"])
async def test_unprotected_modes_warn_on_stderr_once_per_runner(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RunnerConfig(pool_size=1, max_workers=3, sandbox=SandboxConfig(mode=mode))  # type: ignore[arg-type]
    async with make_runner(cfg) as r:
        for i in range(3):  # several workers, one warning
            await run(r, "def on_execute(event, api):\n    pass\n", tenant=f"t{i}")
        report = r.sandbox_report
    err = capsys.readouterr().err
    assert err.count(f"actionpool: WARNING: sandbox mode '{mode}'") == 1, err
    if report.get("uid") == 0:  # a worker left as root is announced too
        assert err.count("actionpool: WARNING: workers run as uid 0") == 1, err


async def test_strict_mode_with_everything_present_says_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    async with make_runner(RunnerConfig(pool_size=0)) as r:
        report = r.sandbox_report
    err = capsys.readouterr().err
    if report.get("uid") != 0:
        assert "actionpool: WARNING" not in err, err
    else:
        assert "workers run as uid 0" in err


def test_doctor_says_what_to_change_for_each_missing_protection() -> None:
    from actionpool.runner._doctor import ROWS, fix_for
    from actionpool.worker._sandbox import host_capabilities

    caps = host_capabilities()
    for key, _ in ROWS:
        fix = fix_for(key, caps, SandboxConfig())
        assert fix and isinstance(fix, str)
    assert "/root" in fix_for("uid_drop", caps, SandboxConfig())
    assert "lsm=" in fix_for("landlock", caps, SandboxConfig())
    assert "network_namespace=True" in fix_for("netns", caps, SandboxConfig(network_namespace=False))


def test_doctor_json_reports_fixes_and_the_default_mode() -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "doctor", "--json"], capture_output=True,
                          timeout=60)
    out = json.loads(proc.stdout)
    assert out["default_mode"] == "strict"
    assert proc.returncode == (1 if out["missing"] else 0)
    for key, fix in out["fixes"].items():
        assert not out["worker"].get(key) or key == "cgroup", key
        assert fix
    assert "fs_view" in out["worker"] and "pdeathsig" in out["worker"]
    assert b"actionpool: WARNING" not in proc.stderr  # doctor prints its table, not the runner's warnings
