"""The runner's one error model: what it raises, what it reports, and its internal signals.

Raised to the caller (public)::

    ActionpoolError             base of everything the runner raises
    ├── ConfigError             a bad RunnerConfig, Limits or Action (raised before any work)
    ├── ActionError             an Action that cannot be loaded (missing file, not UTF-8)
    ├── EventError              an event that is not a JSON object of plain values
    ├── SandboxUnavailable      strict mode and a required protection is missing on this host
    └── RunnerClosed            run_flow() after close()

What goes wrong *inside* a flow (a deny, a timeout, a crashed or hostile
worker) is never raised: it is a denied :class:`FlowResult` whose
``denial.kind`` is a :class:`DenialKind`. Errors of the wire protocol are
``protocol.ProtocolError``.

Internal signals (caught inside the runner, turned into a denial or an
``ApiError`` the action sees; never seen by the caller)::

    Violation           a worker broke a rule: killed, its execution denied with ``kind``
    Overloaded          no worker within the queue bounds            -> ``overloaded``
    PoolClosed          the pool is shutting down                     -> ``shutdown``
    FetchError          an outbound fetch failed                      -> ``http_fetch_error``
    ├── FetchDenied     refused by policy, no request made            -> ``http_fetch_denied``
    └── FetchTimeout    did not finish within its budget              -> ``http_fetch_timeout``
    CacheUnavailable    the cache backend itself failed               -> ``cache_unavailable`` (get);
                                                                         set/delete: ``{"type": "error", "code": "CacheUnavailable"}``
    TemplateError       the fork template could not fork a worker
    CgroupError         a cgroup operation failed
"""

from __future__ import annotations

from typing import Any

from enum import StrEnum


class DenialKind(StrEnum):
    """Every ``denial.kind`` a FlowResult can carry (a ``str``: compares equal to its value)."""

    DENIED = "denied"                          # the action called deny
    VALIDATION_ERROR = "validation_error"      # the action called validation.error
    UNCAUGHT_ERROR = "uncaught_error"          # the action raised
    TIMEOUT = "timeout"                        # the action overran its time limit
    FLOW_TIMEOUT = "flow_timeout"              # the flow overran its time limit
    MEMORY_LIMIT = "memory_limit"              # the worker hit its memory cap
    CPU_LIMIT = "cpu_limit"                    # the execution used more CPU time than allowed
    WORKER_CRASH = "worker_crash"              # the worker died or could not start
    WORKER_LOST = "worker_lost"                # killed with another execution co-running in its worker
    PROTOCOL_ERROR = "protocol_error"          # the worker broke the protocol
    OUTPUT_LIMIT = "output_limit"              # the worker sent or queued too much
    HTTP_FETCH_DENIED = "http_fetch_denied"    # a fetch refused by policy: the flow halts even if the action catches it
    HTTP_FETCH_TIMEOUT = "http_fetch_timeout"  # a fetch timed out: the flow halts even if the action catches it
    # The two below are ApiError codes the action can catch; left uncaught they deny as themselves
    # (reason ``ApiError: <code>: ...``, error_code ``ApiError``), not as ``uncaught_error``, so an outage
    # shows as one in the metrics and ``failure = "open"`` can let it pass (runner/_failure.py).
    HTTP_FETCH_ERROR = "http_fetch_error"      # a fetch failed (connection, status line, body cap, ...), uncaught
    CACHE_UNAVAILABLE = "cache_unavailable"    # api.cache.get found the cache backend down, uncaught
    OVERLOADED = "overloaded"                  # no worker within the queue bounds
    INVALID_EVENT = "invalid_event"            # the event was unusable; no action ran
    SHUTDOWN = "shutdown"                      # the runner closed while the flow was in flight
    DECISION_ERROR = "decision_error"          # a decision block failed to evaluate to a boolean (sidecar)
    NOT_DEPLOYED = "not_deployed"              # a flow names an action with no deployed version (sidecar)


DENIAL_KINDS: tuple[str, ...] = tuple(k.value for k in DenialKind)


class ActionpoolError(Exception):
    """Base class of every error the runner raises."""


class ConfigError(ActionpoolError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ActionError(ActionpoolError, ValueError):
    """An action could not be loaded."""


class EventError(ActionpoolError, ValueError):
    """The event is not a JSON object of plain values."""


class SandboxUnavailable(ActionpoolError):
    """Strict sandbox mode, and this host lacks a required protection."""


class RunnerClosed(ActionpoolError):
    """The runner was closed; it accepts no more flows."""


# ------------------------------------------------------------------ internal signals


class Violation(Exception):
    """A worker broke a rule; it is killed and its execution denied with ``kind``.

    ``culprit`` is the execution whose call broke it, where several run in one worker (the
    others are denied ``worker_lost``); None when that is the only one or nothing says whose.
    """

    def __init__(self, kind: str, message: str, culprit: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.culprit = culprit


class Overloaded(Exception):
    """No worker could be had within the queue bounds."""


class PoolClosed(Exception):
    """The pool is shutting down."""


class FetchError(Exception):
    """A fetch that failed; ``error_kind`` is what the action sees."""

    error_kind = "http_fetch_error"


class FetchDenied(FetchError):
    """Refused by policy (scheme, allowlist, SSRF); no request was made."""

    error_kind = "http_fetch_denied"


class FetchTimeout(FetchError):
    """The fetch did not finish within its budget."""

    error_kind = "http_fetch_timeout"


class CacheUnavailable(Exception):
    """The backend itself failed (e.g. redis unreachable); not the action's fault."""

    error_kind = "cache_unavailable"


class TemplateError(RuntimeError):
    """The template could not fork a worker."""


class CgroupError(OSError):
    """A cgroup operation failed (cannot create, configure or join)."""
