"""Shared fixtures: real runners over real worker processes, and leak checks.

``make_runner`` starts a :class:`runner.Runner` on the test's event loop and
closes it afterwards, asserting that every worker process it started is gone.
Tests run each async test function with ``asyncio.run`` (no plugin needed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from typing import Any

import psutil
import pytest

from actionpool.runner import Action, MemoryAuditSink, Runner, RunnerConfig  # noqa: E402

try:  # fixtures of the fetch/cache suites (a real HTTP server, a real redis-server)
    from net_fixtures import *  # noqa: F401,F403,E402
except ImportError:  # pragma: no cover - only while that module is absent
    pass


def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop."""
    fn = pyfuncitem.obj
    if inspect.iscoroutinefunction(fn):
        kwargs = {k: pyfuncitem.funcargs[k] for k in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(fn(**kwargs))
        return True
    return None


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def wait_gone(pids: set[int], timeout: float = 5.0) -> set[int]:
    """Pids still alive (not zombies) after waiting up to ``timeout`` seconds."""
    from actionpool.benchmarks.stress import _survivors  # the stress report's own leak check

    alive, _zombies = _survivors(pids, timeout)
    return set(alive)


TEST_CONFIG = RunnerConfig(pool_size=1, max_workers=8)


def make_runner(config: RunnerConfig | None = None, **overrides: Any) -> Runner:
    """A Runner with the test defaults and an in-memory audit sink; use as ``async with``."""
    cfg = config or TEST_CONFIG
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return Runner(cfg, audit=MemoryAuditSink())


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Any:
    """Every test must leave no child process behind (workers are killed with their group)."""
    before = children()
    yield
    extra = children() - before
    leaked = wait_gone(extra)
    for pid in leaked:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    assert not leaked, f"child processes leaked: {sorted(leaked)}"


async def run(runner: Runner, sources: str | list[str] | list[Action], *, trigger: str = "post-login",
              event: dict[str, Any] | None = None, tenant: str = "t1", **kw: Any) -> dict[str, Any]:
    """Run a flow of actions given as sources (slugs a, b, c, ...) and return ``to_dict()``."""
    if isinstance(sources, str):
        sources = [sources]
    actions = [s if isinstance(s, Action) else Action(slug=chr(ord("a") + i), source=s) for i, s in enumerate(sources)]
    result = await runner.run_flow(trigger=trigger, actions=actions, event=event if event is not None else {"user": {}},
                                   tenant=tenant, **kw)
    return result.to_dict()


async def wait_for_condition(cond: Any, timeout: float = 20.0) -> None:
    """Poll ``cond()`` every 5 ms until it holds; fail after ``timeout`` seconds (synchronisation, never a sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)
