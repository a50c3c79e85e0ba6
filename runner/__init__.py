"""actionpool's trusted side: the supervisor that owns workers, policy and authority.

Public API::

    from . import Runner, Action, RunnerConfig, Limits
"""

from ._audit import AuditSink, LoggingAuditSink, MemoryAuditSink
from ._config import FetchConfig, Limits, RunnerConfig, SandboxConfig
from ._errors import (DENIAL_KINDS, ActionError, ActionpoolError, ConfigError, DenialKind, EventError, RunnerClosed,
                      SandboxUnavailable)
from ._flow import Action, FlowResult
from ._runner import Runner, SyncRunner
from ._triggers import TRIGGERS

__all__ = [
    "Action", "ActionError", "ActionpoolError", "AuditSink", "ConfigError", "DENIAL_KINDS", "DenialKind", "EventError",
    "FetchConfig", "FlowResult", "Limits", "LoggingAuditSink", "MemoryAuditSink", "Runner", "RunnerClosed",
    "RunnerConfig", "SandboxConfig", "SandboxUnavailable", "SyncRunner", "TRIGGERS",
]
