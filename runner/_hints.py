"""The reason of a failed execution, with what to do about the mistakes newcomers make first.

The worker reports what happened (an exception's type and message, a memory
kill) and carries no policy and no advice; the runner words the denial here.
Two cases get a hint: an import of a package that is not in the standard
library (actions have the standard library only; I/O goes through
``api.fetch``), and running out of memory (the limit in MB, and the flag and
config key that set it; a ``MemoryError`` has an empty message of its own).
"""

from __future__ import annotations

import re
import sys
from typing import Any

_MISSING_MODULE = re.compile(r"No module named '([^']+)'")

STDLIB_ONLY = "actions have the standard library only; I/O goes through api.fetch"


def memory_hint(memory_mb: int) -> str:
    return f"the limit is {memory_mb} MB: raise it with --memory-mb (actionpool run) or limits.memory_mb (config)"


def failure_reason(err: dict[str, Any], kind: str, memory_mb: int) -> str:
    """``denial.reason`` for an execution that ended with ``err`` (the worker's or the supervisor's report)."""
    etype = err.get("type") or None
    message = err.get("message")
    if not etype:
        reason = message if message is not None else kind
    else:
        reason = f"{etype}: {message or ''}"
    if kind == "memory_limit":
        if etype == "MemoryError" and not message:
            return f"MemoryError: the action ran out of memory; {memory_hint(memory_mb)}"
        return f"{reason.rstrip(': ')}; {memory_hint(memory_mb)}"
    if etype in ("ModuleNotFoundError", "ImportError") and message:
        m = _MISSING_MODULE.search(message)
        if m and m.group(1).split(".")[0] not in sys.stdlib_module_names:
            return f"{reason} ({STDLIB_ONLY})"
    return reason
