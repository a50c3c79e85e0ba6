"""The runner's public API for a host that serves it over a network (the sidecar, ``actionpool.sidecar``).

A gateway that embeds the runner needs only :mod:`actionpool.runner`. A server in front of many
gateways also needs what is re-exported here: the decision blocks of a flow, the failure policy of an
action, the redaction of run records, the fetch stubs of replay, and the capacity sums that share the
process's descriptors and memory between the pool and the connections. The sidecar imports nothing
else of the runner (tests/test_layering.py), so everything it relies on is named in one place.
"""

from __future__ import annotations

from ._decisions import Decision, compile_decision, make_decision
from ._failure import set_failure_policy
from ._fetch_stub import load_fetch_stub
from ._flow import SLUG_RE
from ._history import (MIN_SECRET_CHARS, REDACTED, Redactor, build_record, flow_redactor, redact, redact_paths,
                       stub_from_fetches)
from ._pool_policy import (FD_RESERVE, FDS_PER_WORKER, WORKER_MEMORY_ESTIMATE_MB, default_memory_budget_mb,
                           default_tenant_cap, physical_memory_bytes)

__all__ = [
    "Decision", "FD_RESERVE", "FDS_PER_WORKER", "MIN_SECRET_CHARS", "REDACTED", "Redactor",
    "SLUG_RE", "WORKER_MEMORY_ESTIMATE_MB", "build_record", "compile_decision", "default_memory_budget_mb",
    "default_tenant_cap", "flow_redactor", "load_fetch_stub", "make_decision", "physical_memory_bytes", "redact",
    "redact_paths", "set_failure_policy", "stub_from_fetches",
]
