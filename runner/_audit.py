"""The audit sink: every log entry, denial and failure as a structured event.

Log entries carry the reference's event type ``custom_action.test_run``. The
default sink writes one JSON line per event through the host's ``logging``
(logger ``actionpool.audit``), so a gateway routes it wherever its logs go.
Pass any object with ``emit(event: dict)`` to ``Runner(audit=...)`` instead.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import orjson

LOG_EVENT = "custom_action.test_run"
DENIED_EVENT = "custom_action.denied"
FAILED_EVENT = "custom_action.failed"
FLOW_EVENT = "custom_action.flow_completed"


class AuditSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...

    # Optional: ``enabled`` (bool property). When present and False, no events are built at all.


class LoggingAuditSink:
    """JSON lines on the ``actionpool.audit`` logger (serialised only when the logger is enabled)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("actionpool.audit")

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def emit(self, event: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS).decode())


class MemoryAuditSink:
    """Keeps events in a list; for tests and the CLI."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def audit_flow(sink: AuditSink, result: Any) -> None:
    """Emit the audit events of one finished flow."""
    if not getattr(sink, "enabled", True):
        return
    base = {"tenant": result.tenant, "trigger": result.trigger, "flow_id": result.flow_id}
    for entry in result.logs:
        sink.emit({"type": LOG_EVENT, **base, **entry})
    d = result.denial
    if d is not None:
        kind = d["kind"]
        etype = DENIED_EVENT if kind in ("denied", "validation_error") else FAILED_EVENT
        sink.emit({"type": etype, **base, "action": d["action"], "kind": kind, "reason": d["reason"],
                   "error_code": d.get("error_code")})
    sink.emit({"type": FLOW_EVENT, **base, "outcome": result.outcome,
               "actions": [a.to_dict() for a in result.actions], "duration_ms": round(result.duration_ms, 3)})
