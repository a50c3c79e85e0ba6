"""The runner's public error tree.

    ActionpoolError             base of everything the runner raises
    ├── ConfigError             a bad RunnerConfig, Limits or Action (raised before any work)
    ├── ActionError             an Action that cannot be loaded (missing file, not UTF-8)
    ├── EventError              an event that is not a JSON object of plain values
    ├── SandboxUnavailable      strict mode and a required protection is missing on this host
    └── RunnerClosed            run_flow() after close()

What goes wrong *inside* a flow (a deny, a timeout, a crashed or hostile
worker) is never raised: it is a denied :class:`FlowResult` with a precise
``denial.kind``. Errors of the wire protocol are ``protocol.ProtocolError``.
"""

from __future__ import annotations


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
