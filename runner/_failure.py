"""Failure policy per action: ``failure = "open"`` lets a flow continue past that action's failure.

Only failures that are the environment's, not the action's decision, can
fail open (the table is ``FAIL_OPEN_KINDS``, documented in docs/gateway.md
"Failure policy"): a time or resource limit, a killed or crashed worker, and
an ``api.ApiError`` the action left uncaught whose code says the cache backend
was down or a fetch timed out or failed in transport. A deny, a validation
error, the action's own exception (in Authentik, an exception read as "false"
became a password bypass), a fetch refused by policy (``http_fetch_denied``)
and anything hostile (protocol or output violations) always stay closed. The
default is closed.
"""

from __future__ import annotations

from typing import Any, Collection

# ApiError codes that name the environment's failure, not the action's: left uncaught, an execution
# is denied with the code itself as its ``denial.kind`` (not ``uncaught_error``), so metrics and
# failure policies see the outage for what it is.
ENVIRONMENT_API_CODES = frozenset({"cache_unavailable", "http_fetch_timeout", "http_fetch_error"})

FAIL_OPEN_KINDS = frozenset({"timeout", "memory_limit", "cpu_limit", "worker_crash", "worker_lost"}) | ENVIRONMENT_API_CODES


def environment_kind(error: dict[str, Any], failed_calls: Collection[str]) -> str | None:
    """The environmental ApiError code an execution died of, or None.

    ``error`` is the worker's report (``{kind, type, message}``), which the worker, running
    untrusted code, could forge: the code counts only if this execution's api calls really failed
    with it (``failed_calls``, recorded by the supervisor). An ApiError of the action's own making
    without such a failure, or any other exception, stays ``uncaught_error``. Both runtimes report an
    ApiError as type ``ApiError`` with the message ``"<code>: <detail>"``.
    """
    if error.get("kind") != "uncaught_error" or error.get("type") != "ApiError":
        return None
    code = str(error.get("message", "")).partition(": ")[0]
    return code if code in ENVIRONMENT_API_CODES and code in failed_calls else None


def set_failure_policy(action: Any, failure: str) -> None:
    """Give ``action`` the ``fails_open(kind)`` the flow engine asks when one of its executions fails."""
    object.__setattr__(action, "failure", failure)
    object.__setattr__(action, "fails_open", FAIL_OPEN_KINDS.__contains__ if failure == "open" else None)
