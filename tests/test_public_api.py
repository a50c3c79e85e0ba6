"""The public surface a gateway embeds: ``import actionpool`` and nothing else.

Pins ``actionpool.__all__`` (adding or removing a public name is a decision,
made here), checks that every name is the runner's own object, that the
untrusted side can be imported without the supervisor's modules (httpx,
redis) coming along, and that the built wheel installs exactly one top-level
import name. Import side effects are checked in fresh interpreters: this
test process has long since imported everything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import actionpool

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    # the façade and its inputs and outputs
    "Runner", "SyncRunner", "Action", "FlowResult", "TRIGGERS",
    # configuration
    "RunnerConfig", "Limits", "FetchConfig", "SandboxConfig",
    # audit sinks
    "AuditSink", "LoggingAuditSink", "MemoryAuditSink",
    # the error model
    "ActionpoolError", "ConfigError", "ActionError", "EventError", "SandboxUnavailable", "RunnerClosed",
    "DenialKind", "DENIAL_KINDS",
}


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the installed package, not this process's imports)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")


def test_all_is_exactly_the_public_api() -> None:
    assert set(actionpool.__all__) == PUBLIC
    assert len(actionpool.__all__) == len(PUBLIC), "a name is listed twice"


def test_every_public_name_resolves_to_the_runner_object() -> None:
    from actionpool import runner

    for name in actionpool.__all__:
        assert getattr(actionpool, name) is getattr(runner, name), name
    assert set(dir(actionpool)) >= PUBLIC


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from actionpool import *", ns)
    assert set(ns) - {"__builtins__"} == PUBLIC


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Worker'"):
        actionpool.Worker  # noqa: B018


def test_error_tree() -> None:
    for name in ("ConfigError", "ActionError", "EventError", "SandboxUnavailable", "RunnerClosed"):
        assert issubclass(getattr(actionpool, name), actionpool.ActionpoolError), name
    assert actionpool.DenialKind.SHUTDOWN == "shutdown"
    assert actionpool.DENIAL_KINDS == tuple(k.value for k in actionpool.DenialKind)
    assert "post-auth" in actionpool.TRIGGERS


def test_import_actionpool_is_lazy() -> None:
    """``import actionpool`` alone loads nothing of the runner; the first public name loads it, never benchmarks."""
    res = python(
        "import sys, actionpool\n"
        "print(sorted(m for m in sys.modules if m.startswith('actionpool.')))\n"
        "actionpool.Runner\n"
        "print('actionpool.runner' in sys.modules, any(m.startswith('actionpool.benchmarks') for m in sys.modules))\n"
    )
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first == "[]"
    assert second == "True False"


def test_importing_the_worker_side_loads_no_supervisor_code() -> None:
    """Untrusted memory holds no supervisor module (httpx, redis, the runner); checked in a fresh interpreter."""
    res = python(
        "import sys\n"
        "import actionpool.worker, actionpool.worker._runtime, actionpool.worker._proxy, actionpool.worker._channel\n"
        "import actionpool.worker._event, actionpool.worker._sandbox, actionpool.worker._template\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'aiohttp', 'redis', 'psutil')\n"
        "             or m.startswith(('actionpool.runner', 'actionpool.benchmarks')))\n"
        "print(bad)\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_built_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    """``pip wheel`` of a copy of the repository: every file of the wheel lives under ``actionpool/``."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                                             "dist", ".pytest_cache", ".hypothesis"))
    out = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "--disable-pip-version-check", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    [wheel] = out.glob("actionpool-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = zf.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"actionpool"}
    assert top_level == ["actionpool"]
    for sub in ("protocol", "worker", "runner", "benchmarks"):
        assert f"actionpool/{sub}/__init__.py" in names, sub
    assert "actionpool/__init__.py" in names and "actionpool/runner/cli.py" in names
    assert not any(n.startswith("actionpool/tests/") for n in names)
