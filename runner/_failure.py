"""Failure policy per action: ``failure = "open"`` lets a flow continue past that action's failure.

Only failures that are the environment's, not the action's decision, can
fail open: a timeout, a killed or crashed worker, a fetch that timed out or
failed, the cache backend being down. A deny, a validation error, an
uncaught exception (in Authentik, an exception read as "false" became a
password bypass), a fetch refused by policy and anything hostile (protocol or
output violations) always stay closed. The default is closed.
"""

from __future__ import annotations

from typing import Any

FAIL_OPEN_KINDS = frozenset({"timeout", "memory_limit", "cpu_limit", "worker_crash",
                             "http_fetch_timeout", "http_fetch_error", "cache_unavailable"})


def set_failure_policy(action: Any, failure: str) -> None:
    """Give ``action`` the ``fails_open(kind)`` the flow engine asks when one of its executions fails."""
    object.__setattr__(action, "failure", failure)
    object.__setattr__(action, "fails_open", FAIL_OPEN_KINDS.__contains__ if failure == "open" else None)
