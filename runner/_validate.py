"""Validation at deploy: is this source, or this flow, fit to go live? Checked statically, never run.

A control plane answers a bad deploy with 422 and changes nothing, so everything a
flow would otherwise fail on at the first login is found here, in the supervisor's
process, at a cost linear in the input:

* ``validate_source``: Python is compiled (``runner/_check.py``, with its nesting and
  code-object bounds), JavaScript parsed by QuickJS (``runner/_check_js.py``, the same
  engine the worker runs); then a handler for each trigger the action is bound to.
* ``validate_flow``: the shape of every entry (slugs, decision blocks), CEL compiled with
  the decision bounds, ``skip_to`` targets, slugs deployed and each action's handler for
  the flow's trigger. A problem names the entry: ``flow[2]: ...`` (0-based, as in JSON).

The TOML flow lists go through the same ``flow_problem`` (with ``slugs=None``: shape
only, since a config's actions may be deployed later), so the file and the API agree.

Linear is not free: compiling 1 MB of Python costs the interpreter a second or more of CPU
in C calls that hold the GIL, which a thread would not hide from the event loop. A server
calls ``validate_source_async``/``validate_flow_async``: a source over ``INLINE_SOURCE_BYTES``
is checked in a short-lived child process (CPU- and memory-capped, killed past its time), so
one large deploy never stalls every tenant's flows; smaller ones stay in-process (a few ms).

The children are few (``CHILDREN``), and each check waiting for one holds its request's body (up to
1 MiB) in the server. So the large-source checks admitted at once (running or waiting) are bounded:
``QUEUE_MAX`` in all and ``QUEUE_PER_TENANT`` per tenant. Past either, ``validate_source_async``
raises :class:`ValidationBusy` at once (the server answers 503, or 429 for the tenant's own cap, with
Retry-After), so no body waits unboundedly and one tenant cannot take every place in the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._check import python_problem
from ._check_js import js_problem
from ._check_report import SourceProblem
from ._decisions import BlockError, parse_block
from ._flow import SLUG_RE
from ._triggers import TRIGGERS

__all__ = ["FlowProblem", "INLINE_SOURCE_BYTES", "MAX_FLOW_ENTRIES", "SourceProblem", "ValidationBusy", "flow_problem",
           "flow_problem_async", "normalise_language", "queue_stats", "validate_flow", "validate_flow_async",
           "validate_source", "validate_source_async"]

MAX_FLOW_ENTRIES = 64
# validate_source_async: sources up to this size are checked in-process (a few ms of CPU); larger ones in a child.
INLINE_SOURCE_BYTES = 64 << 10
CHILD_TIMEOUT_S = 20.0          # wall time of one child check (its CPU is capped at CHILD_CPU_S)
CHILD_CPU_S = 10
CHILD_MEMORY_BYTES = 1 << 30
CHILDREN = 2                    # checks in children at once; more wait (a deploy is an operator's act, not a login)
QUEUE_MAX = 8                   # large-source checks admitted at once (running + waiting), all tenants; more: busy
QUEUE_PER_TENANT = 2            # of those, one tenant's
BUSY_RETRY_AFTER_S = 2          # the Retry-After of a refused check: about one child check
CHILD_ARGV: tuple[str, ...] = (sys.executable, "-I", "-m", __name__)  # the checker process
# What validate_source answers for sources seen recently (by digest): re-validating a flow that names
# the same versions costs a hash, not a compile. Bounded in entries; a key holds no source text.
_MEMO_ENTRIES = 4096
_memo: OrderedDict[tuple[str, str, tuple[str, ...]], SourceProblem | None] = OrderedDict()


class ValidationBusy(Exception):
    """Too many large-source checks are admitted (in all, or for this tenant): try again after ``retry_after_s``.

    ``scope`` is ``"tenant"`` (this tenant's ``QUEUE_PER_TENANT``: the server answers 429) or ``"server"``
    (``QUEUE_MAX``: 503). Raised before any child starts, so nothing about the source was learnt.
    """

    def __init__(self, message: str, scope: str, retry_after_s: int = BUSY_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.scope, self.retry_after_s = scope, retry_after_s


class _Queue:
    """The admitted large-source checks of one event loop: a count in all and per tenant, and the child slots."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(CHILDREN)
        self.admitted = 0
        self.by_tenant: dict[str, int] = {}

    def admit(self, tenant: str | None) -> None:
        mine = self.by_tenant.get(tenant, 0) if tenant is not None else 0
        if tenant is not None and mine >= QUEUE_PER_TENANT:
            raise ValidationBusy(f"tenant {tenant} already has {mine} source(s) over {INLINE_SOURCE_BYTES >> 10} "
                                 f"KiB being validated (at most {QUEUE_PER_TENANT} at once); retry after "
                                 f"{BUSY_RETRY_AFTER_S} s", "tenant")
        if self.admitted >= QUEUE_MAX:
            raise ValidationBusy(f"the validation queue is full: {self.admitted} source(s) over "
                                 f"{INLINE_SOURCE_BYTES >> 10} KiB are being validated (at most {QUEUE_MAX} at once, "
                                 f"all tenants); retry after {BUSY_RETRY_AFTER_S} s", "server")
        self.admitted += 1
        if tenant is not None:
            self.by_tenant[tenant] = mine + 1

    def release(self, tenant: str | None) -> None:
        self.admitted -= 1
        if tenant is not None:
            left = self.by_tenant.pop(tenant) - 1
            if left:
                self.by_tenant[tenant] = left


_queue: _Queue | None = None
_queue_loop: asyncio.AbstractEventLoop | None = None


def normalise_language(language: Any) -> str | None:
    """``"python"`` -> ``"python"``; ``"javascript"`` or ``"js"`` -> ``"js"`` (the runner's name); else None."""
    return {"python": "python", "javascript": "js", "js": "js"}.get(language) if type(language) is str else None


def validate_source(source: str, language: str, triggers: Iterable[str]) -> SourceProblem | None:
    """Why ``source`` cannot be deployed for ``triggers``, with its 1-based line and column where known; or None.

    ``language``: ``"python"``, ``"javascript"`` (or ``"js"``). The source is compiled or parsed, never
    run; it needs a handler for EACH trigger (``on_execute_<trigger>`` or ``on_execute``; in
    JavaScript ``exports.onExecute<Trigger>``, ``exports.onExecute`` or a bare body).
    """
    pre = _prelude(source, language, triggers)
    if isinstance(pre, SourceProblem) or pre is None:
        return pre
    key, lang, wanted = pre
    return _remember(key, _check_here(source, lang, wanted))


_Key = tuple[str, str, tuple[str, ...]]


def _prelude(source: Any, language: Any, triggers: Iterable[str]) -> SourceProblem | None | tuple[_Key, str, list[str]]:
    """The checks that cost nothing, then the memo: a problem, a remembered None, or (key, language, triggers)."""
    lang = normalise_language(language)
    if lang is None:
        return SourceProblem(f"language must be \"python\" or \"javascript\" (or \"js\"), got {language!r}")
    if type(source) is not str:
        return SourceProblem(f"source must be a string, got {type(source).__name__}")
    wanted: list[str] = []
    for t in triggers:
        if t not in TRIGGERS:
            return SourceProblem(f"unknown trigger {t!r} (expected one of: {', '.join(TRIGGERS)})")
        if t not in wanted:
            wanted.append(t)
    if "\x00" in source:
        return SourceProblem("source contains a NUL character")
    key = (hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest(), lang, tuple(wanted))
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]
    return key, lang, wanted


def _check_here(source: str, lang: str, wanted: list[str]) -> SourceProblem | None:
    return python_problem(source, wanted) if lang == "python" else js_problem(source, wanted)


def _remember(key: _Key, problem: SourceProblem | None) -> SourceProblem | None:
    _memo[key] = problem
    while len(_memo) > _MEMO_ENTRIES:
        _memo.popitem(last=False)
    return problem


async def validate_source_async(source: str, language: str, triggers: Iterable[str], *,
                                tenant: str | None = None) -> SourceProblem | None:
    """``validate_source`` that never holds the event loop for long: a large source is checked in a child process.

    The child is this module run with ``python -I -m``, its CPU and memory capped; an answer it
    cannot give in time, or a crash, is a problem (fail closed), never an allow. A large source
    that finds the queue full (``QUEUE_MAX``, or ``QUEUE_PER_TENANT`` for ``tenant``) raises
    :class:`ValidationBusy` at once; a remembered answer never waits.
    """
    pre = _prelude(source, language, triggers)
    if isinstance(pre, SourceProblem) or pre is None:
        return pre
    key, lang, wanted = pre
    if len(source) <= INLINE_SOURCE_BYTES:
        return _remember(key, _check_here(source, lang, wanted))
    problem, answered = await _check_in_child(source, lang, wanted, tenant)
    return _remember(key, problem) if answered else problem  # a child that failed said nothing about the source


def _the_queue() -> _Queue:
    global _queue, _queue_loop
    loop = asyncio.get_running_loop()
    if _queue is None or _queue_loop is not loop:
        _queue, _queue_loop = _Queue(), loop
    return _queue


def queue_stats() -> dict[str, Any]:
    """The large-source checks admitted now, in all and per tenant (operators and tests; no I/O)."""
    q = _queue
    return {"admitted": q.admitted if q else 0, "by_tenant": dict(q.by_tenant) if q else {},
            "max": QUEUE_MAX, "per_tenant": QUEUE_PER_TENANT}


async def _check_in_child(source: str, lang: str, wanted: list[str],
                          tenant: str | None = None) -> tuple[SourceProblem | None, bool]:
    """(the child's answer, True), or (a problem saying why there is none, False); ValidationBusy past the caps."""
    queue = _the_queue()
    queue.admit(tenant)   # before the request is encoded: a refused check copies nothing
    try:
        request = json.dumps({"source": source, "language": lang, "triggers": wanted}).encode("utf-8",
                                                                                             "surrogatepass")
        async with queue.slots:
            proc = await asyncio.create_subprocess_exec(
                *CHILD_ARGV, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(request), CHILD_TIMEOUT_S)
            except asyncio.TimeoutError:
                return SourceProblem(f"could not be validated within {CHILD_TIMEOUT_S:.0f} s; split the action"), \
                    False
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        queue.release(tenant)
    try:
        answer = json.loads(out)
        found = answer["problem"]
        if found is None:
            return None, True
        return SourceProblem(str(found["message"]), found.get("line"), found.get("column")), True
    except (ValueError, KeyError, TypeError):
        why = "over its CPU or memory cap" if proc.returncode and proc.returncode < 0 else \
            f"exit status {proc.returncode}"
        return SourceProblem(f"could not be validated: the checker stopped ({why}); split the action"), False


def _child_main() -> None:
    """``python -I -m actionpool.runner._validate``: one request on stdin, one answer on stdout."""
    resource.setrlimit(resource.RLIMIT_CPU, (CHILD_CPU_S, CHILD_CPU_S + 1))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ValueError, OSError):  # a lower hard limit already applies
        pass
    request = json.loads(sys.stdin.buffer.read().decode("utf-8", "surrogatepass"))
    try:
        problem = _check_here(request["source"], request["language"], list(request["triggers"]))
    except MemoryError:
        problem = SourceProblem("too large to validate within the checker's memory cap; split the action")
    out = None if problem is None else {"message": problem.message, "line": problem.line, "column": problem.column}
    sys.stdout.write(json.dumps({"problem": out}))
    sys.stdout.flush()
    os._exit(0)


@dataclass(frozen=True)
class FlowProblem:
    """What is wrong with a flow: the entry (0-based; None: the flow itself), the key at fault, why."""

    index: int | None
    field: str | None
    message: str

    @property
    def where(self) -> str:
        """``flow[2].skip_to``, ``flow[0]`` or ``flow``: the JSON path of the fault."""
        out = "flow" if self.index is None else f"flow[{self.index}]"
        return out + (f".{self.field}" if self.field else "")

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def flow_problem(entries: Any, slugs: Mapping[str, tuple[str, str]] | None, trigger: str) -> FlowProblem | None:
    """The first problem of a flow's ``entries`` for ``trigger``, or None. See ``validate_flow``.

    ``slugs=None`` checks the shape only (slugs well formed, blocks, skip_to targets, no repeats):
    what a config file can be checked for before its actions are deployed.
    """
    if trigger not in TRIGGERS:
        return FlowProblem(None, None, f"unknown trigger {trigger!r} (expected one of: {', '.join(TRIGGERS)})")
    if type(entries) is not list:
        return FlowProblem(None, None, f"a flow is a list of action slugs and decision blocks, "
                                       f"got {type(entries).__name__}")
    if len(entries) > MAX_FLOW_ENTRIES:
        return FlowProblem(None, None, f"{len(entries)} entries; a flow has at most {MAX_FLOW_ENTRIES}")
    positions: dict[str, int] = {}
    blocks: dict[int, Any] = {}
    for i, entry in enumerate(entries):
        if type(entry) is str:
            if not SLUG_RE.match(entry):
                return FlowProblem(i, None, f"{entry[:80]!r} is not a valid action slug ({SLUG_RE.pattern})")
            if entry in positions:
                return FlowProblem(i, None, f"{entry!r} is already flow[{positions[entry]}]; an action appears "
                                            "once in a flow")
            positions[entry] = i
        elif type(entry) is dict:
            try:
                blocks[i] = parse_block(entry)
            except BlockError as exc:
                return FlowProblem(i, exc.field, str(exc))
        else:
            return FlowProblem(i, None, f"must be an action slug or a decision block "
                                        f"({{\"if\", \"deny\"|\"allow\"|\"skip_to\"}}), got {type(entry).__name__}")
    for i, block in blocks.items():
        if block.skip_to is not None and positions.get(block.skip_to, -1) <= i:
            later = "an earlier entry" if block.skip_to in positions else "not an action of this flow"
            return FlowProblem(i, "skip_to", f"{block.skip_to!r} is {later}; skip_to names a later action")
    for slug, i in positions.items():  # the engine names block records decision-<1-based position>
        if slug.startswith("decision-") and slug[9:].isdigit() and int(slug[9:]) - 1 in blocks:
            return FlowProblem(i, None, f"{slug!r} is the record name of the decision block at "
                                        f"flow[{int(slug[9:]) - 1}]; rename the action")
    if slugs is None:
        return None
    for slug, i in positions.items():
        found = slugs.get(slug)
        if found is None:
            return FlowProblem(i, None, f"unknown action {slug!r}: no deployed version in this tenant")
        language, source = found
        problem = validate_source(source, language, [trigger])
        if problem is not None:
            return FlowProblem(i, None, f"action {slug!r}: {problem}")
    return None


async def flow_problem_async(entries: Any, slugs: Mapping[str, tuple[str, str]], trigger: str, *,
                             tenant: str | None = None) -> FlowProblem | None:
    """``flow_problem`` whose source checks go through ``validate_source_async`` (large sources in a child).

    ValidationBusy when a large source finds the queue full (see ``validate_source_async``).
    """
    shape = flow_problem(entries, None, trigger)
    if shape is not None:
        return shape
    for i, entry in enumerate(entries):
        if type(entry) is not str:
            continue
        found = slugs.get(entry)
        if found is None:
            return FlowProblem(i, None, f"unknown action {entry!r}: no deployed version in this tenant")
        problem = await validate_source_async(found[1], found[0], [trigger], tenant=tenant)
        if problem is not None:
            return FlowProblem(i, None, f"action {entry!r}: {problem}")
    return None


async def validate_flow_async(entries: Any, slugs: Mapping[str, tuple[str, str]], trigger: str, *,
                              tenant: str | None = None) -> str | None:
    """``validate_flow`` whose source checks go through ``validate_source_async`` (large sources in a child)."""
    problem = await flow_problem_async(entries, slugs, trigger, tenant=tenant)
    return None if problem is None else str(problem)


def validate_flow(entries: Any, slugs: Mapping[str, tuple[str, str]] | None, trigger: str) -> str | None:
    """Why ``entries`` cannot be the flow of ``trigger``, naming the entry (``"flow[2]: ..."``), or None.

    ``slugs``: slug -> (language, source) of the tenant's current versions. Entries are slugs and
    decision blocks (``{"if", "deny"[, "message"]}``, ``{"if", "allow": true}``, ``{"if", "skip_to"}``);
    at most ``MAX_FLOW_ENTRIES``; a slug at most once and deployed, with a handler for ``trigger``;
    a ``skip_to`` names a later slug entry; expressions compile within the decision bounds.
    """
    problem = flow_problem(entries, slugs, trigger)
    return None if problem is None else str(problem)


if __name__ == "__main__":
    _child_main()
