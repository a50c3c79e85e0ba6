"""``serve --log-format json``: one JSON object per log line, carrying the flow it is about.

A log pipeline (Loki, Elasticsearch, Cloud Logging) indexes fields, not prose. Every line is
``{"ts", "level", "logger", "msg"}``; a line logged while a flow runs (in the sidecar, the runner, the
pool, the fetch service, or a background task the flow started) also carries ``execution_id``,
``tenant`` and ``trigger``: :func:`flow_context` sets them in a context variable at the top of the flow
path, so code deep inside needs no logger argument, and each request's task has its own copy. The
sidecar's loggers and uvicorn's both write through the one formatter.

What a flow's event held never reaches a log line: the formatter writes only the record's message,
and the sidecar never logs an event, a result or a secret (run history is the redacted place for those).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

FORMATS = ("text", "json")

# (execution_id, tenant, trigger) of the flow the current task serves; None outside a flow.
_FLOW: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar("actionpool_flow", default=None)

# Loggers that would print what actions logged (their api.log lines, unredacted): run history has those.
QUIET_LOGGERS = ("actionpool.audit",)


def flow_context(execution_id: str, tenant: str, trigger: str) -> contextvars.Token[tuple[str, str, str] | None]:
    """Mark the current task (and the tasks it starts) as serving this flow; reset with :func:`end_flow`."""
    return _FLOW.set((execution_id, tenant, trigger))


def end_flow(token: contextvars.Token[tuple[str, str, str] | None]) -> None:
    _FLOW.reset(token)


def current_flow() -> dict[str, str] | None:
    f = _FLOW.get()
    return None if f is None else {"execution_id": f[0], "tenant": f[1], "trigger": f[2]}


def _ts(created: float) -> str:
    t = time.gmtime(created)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "execution_id"?, "tenant"?, "trigger"?, "exc"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _ts(record.created), "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        f = _FLOW.get()
        if f is not None:
            out["execution_id"], out["tenant"], out["trigger"] = f
        fields = getattr(record, "fields", None)   # structured extras of our own lines (start/stop)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


def uvicorn_log_config(log_format: str, level: str) -> dict[str, Any] | None:
    """uvicorn's ``log_config``: None keeps its own (text); json sends every logger through JsonFormatter.

    Text: the CLI's root handler stays (``LEVEL logger: message``) at ``level``, so ``--log-level info``
    shows the sidecar's own info lines (one per flow) as it shows uvicorn's.
    """
    lvl = level.upper()
    if log_format == "text":
        logging.getLogger().setLevel(lvl)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": [], "level": lvl, "propagate": True},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": [], "level": lvl, "propagate": True},
            **{name: {"level": "WARNING"} for name in QUIET_LOGGERS},
        },
        "root": {"handlers": ["json"], "level": lvl},
    }


_FLOWS = logging.getLogger("actionpool.flow")


def log_flow(body: dict[str, Any], seconds: float) -> None:
    """One INFO line per answered flow (``--log-level info``): the access log a gateway operator greps.

    Its outcome, duration, denial kind and the entry that decided, never the event, a reason or a message an
    action wrote (those may hold user data; run history has them, redacted).
    """
    if not _FLOWS.isEnabledFor(logging.INFO):
        return
    denial = body.get("denial")
    fields: dict[str, Any] = {"outcome": body["outcome"], "duration_ms": round(seconds * 1000.0, 3),
                              "flow_id": body.get("flow_id")}
    text = (f"flow {body.get('tenant')}/{body.get('trigger')} {body.get('execution_id')}: {body['outcome']} in "
            f"{seconds * 1000.0:.1f} ms")
    if denial is not None:
        fields["denial_kind"], fields["denied_by"] = denial.get("kind"), denial.get("action")
        text += f" ({denial.get('kind')} by {denial.get('action')})"
    _FLOWS.info(text, extra={"fields": fields})


def say(log_format: str, text: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """One operator line on stderr (ready, stopped, a refusal to start): the text as is, or a JSON line.

    Written whatever the log level: these lines are how an operator and a supervisor know the state.
    """
    if log_format == "json":
        record = logging.LogRecord("actionpool.serve", level, __file__, 0, text, None, None)
        record.fields = fields
        line = JsonFormatter().format(record)
    else:
        line = text
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
