"""The runner's public API for a host that serves it over a network (the sidecar, ``actionpool.sidecar``).

A gateway that embeds the runner needs only :mod:`actionpool.runner`. A server in front of many
gateways also needs what is re-exported here: the decision blocks of a flow, the failure policy of an
action, the redaction of run records, the fetch stubs of replay, the capacity sums that share the
process's descriptors and memory between the pool and the connections, the GC freeze of a warm
process (``freeze_heap``, for an embedding gateway too), and validation at deploy
(``validate_source``, ``validate_flow``: checked statically, never run). Runtime changes of a tenant
are ``Runner`` methods: ``set_tenant_policy``, ``forget_tenant``, ``check_event``. The sidecar imports nothing
else of the runner (tests/test_layering.py), so everything it relies on is named in one place.
"""

from __future__ import annotations

from ._check_report import SourceProblem
from ._decisions import (BlockError, Decision, FlowBlock, compile_decision, decision_from_block, make_decision,
                         parse_block)
from ._failure import set_failure_policy
from ._fetch_stub import load_fetch_stub
from ._flow import SLUG_RE
from ._heap import freeze_heap
from ._history import (MIN_SECRET_CHARS, REDACTED, Redactor, build_record, flow_redactor, redact, redact_paths,
                       stub_from_fetches)
from ._pool_policy import (FD_RESERVE, FDS_PER_WORKER, WORKER_MEMORY_ESTIMATE_MB, default_memory_budget_mb,
                           default_tenant_cap, physical_memory_bytes)
from ._validate import (INLINE_SOURCE_BYTES, MAX_FLOW_ENTRIES, FlowProblem, ValidationBusy, flow_problem,
                        flow_problem_async, normalise_language, validate_flow, validate_flow_async, validate_source,
                        validate_source_async)

__all__ = [
    "BlockError", "build_record", "compile_decision", "Decision", "decision_from_block", "default_memory_budget_mb",
    "default_tenant_cap", "FD_RESERVE", "FDS_PER_WORKER", "flow_problem", "flow_problem_async", "flow_redactor",
    "FlowBlock", "FlowProblem", "freeze_heap", "INLINE_SOURCE_BYTES", "load_fetch_stub", "make_decision", "MAX_FLOW_ENTRIES",
    "MIN_SECRET_CHARS", "normalise_language", "parse_block", "physical_memory_bytes", "redact", "redact_paths",
    "REDACTED", "Redactor", "set_failure_policy", "SLUG_RE", "SourceProblem", "stub_from_fetches", "validate_flow",
    "validate_flow_async", "validate_source", "validate_source_async", "ValidationBusy", "WORKER_MEMORY_ESTIMATE_MB",
]
