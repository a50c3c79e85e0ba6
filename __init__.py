"""actionpool: run untrusted login and registration actions in isolated worker processes.

The public API (the names in ``__all__``)::

    import actionpool

    async with actionpool.Runner(actionpool.RunnerConfig()) as runner:
        result = await runner.run_flow(trigger="post-login", actions=[actionpool.Action.from_file("a.py")],
                                       event={"user": {"email": "x@example.com"}}, tenant="acme")

The repository keeps ``runner/`` (the trusted supervisor), ``worker/`` (the
untrusted side), ``protocol/`` (pure wire code) and ``benchmarks/`` at its top
level; installed, they are the subpackages ``actionpool.runner`` and so on. The
public names load lazily, so a worker that imports ``actionpool.worker`` never
loads the supervisor's modules (httpx, redis) into untrusted memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Action", "ActionError", "ActionpoolError", "AuditSink", "ConfigError", "DENIAL_KINDS", "DenialKind", "EventError",
    "FetchConfig", "FlowResult", "Limits", "LoggingAuditSink", "MemoryAuditSink", "Runner", "RunnerClosed", "RunnerConfig",
    "SandboxConfig", "SandboxUnavailable", "SyncRunner", "TRIGGERS",
]

if TYPE_CHECKING:  # pragma: no cover
    from .runner import (DENIAL_KINDS, Action, ActionError, ActionpoolError, AuditSink, ConfigError, DenialKind,
                         EventError, FetchConfig,
                         FlowResult, Limits, LoggingAuditSink, MemoryAuditSink, Runner, RunnerClosed, RunnerConfig,
                         SandboxConfig, SandboxUnavailable, SyncRunner, TRIGGERS)


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import runner

        value = getattr(runner, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actionpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
