"""``actionpool check`` for JavaScript actions: does the file parse, and which handler would run?

Parsed by the same engine the worker runs (QuickJS), never run: the script
handed to the engine starts with ``throw``, so even a source that closes the
wrapper function early (``}); ...``) has nothing executed before the throw;
parsing the whole script comes first, and a syntax error anywhere is
reported with the action's own line and column.

A module (``exports.onExecute<Trigger> = ...``) must assign the trigger's
handler or ``exports.onExecute``; names that look like a handler but are not
one get a "did you mean". A bare body is the handler of every trigger.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

import _quickjs

from ..worker._js import handler_names, is_module

from ._check_report import Report, SourceProblem
from ._triggers import TRIGGERS

_SENTINEL = "actionpool-check-parsed"
_POS = re.compile(r"<input>:(\d+):(\d+)")
# exports.NAME =, exports['NAME'] =, and the keys of module.exports = { NAME, NAME: ..., NAME() {...} }
_ASSIGNED = re.compile(r"(?<![\w$.])(?:module\s*\.\s*)?exports\s*(?:\.\s*([A-Za-z_$][\w$]*)|\[\s*['\"]([^'\"]+)['\"]\s*\])\s*=(?!=)")
_OBJECT_EXPORT = re.compile(r"(?<![\w$.])module\s*\.\s*exports\s*=\s*\{")
_KEY = re.compile(r"\s*(?:async\s+)?\*?\s*([A-Za-z_$][\w$]*)")
_BRACKET = re.compile(r"[{}\[\]()]")
_BRACKET_OR_NL = re.compile(r"[{}\[\]()\n]")
_PREFIX_OPS = re.compile(r"[-+!~]")


def parse_problem(source: str, module: bool) -> SourceProblem | None:
    """None if the source parses; else the engine's message at the action's own 1-based line and column."""
    wrapper = "(function (exports, module, require) {\n" if module else "(async function (event, api) {\n"
    script = f"throw {_SENTINEL!r};\n{wrapper}{source}\n}})"
    ctx = _quickjs.Context()
    ctx.set_memory_limit(256 << 20)
    ctx.set_time_limit(10.0)  # parsing only; a pathological source still ends
    try:
        ctx.eval(script)
    except _quickjs.JSException as exc:
        text = str(exc)
        if text.startswith(_SENTINEL):
            return None
        head = text.split("\n", 1)[0].strip()
        m = _POS.search(text)
        if m is None:
            if isinstance(exc, _quickjs.StackOverflow) or "call stack" in head:  # the parser's recursion gave up
                return SourceProblem(f"{head} (nested too deeply to parse)", _deepest_line(source))
            return SourceProblem(head)
        line = int(m.group(1)) - 2
        if line > source.count("\n") + 1:  # at the wrapper's closing brace: the source ended too early
            return SourceProblem(f"{head} (at the end of the source)", source.count("\n") + 1)
        return SourceProblem(head, line, int(m.group(2)))
    return SourceProblem("the engine ran the check script instead of refusing it")  # cannot happen: throw first


def _parse_error(source: str, module: bool) -> str | None:
    """``parse_problem`` as the checker prints it: "LINE:COL: SyntaxError: message"."""
    problem = parse_problem(source, module)
    return None if problem is None else str(problem)


def _deepest_line(source: str) -> int:
    """Where a parse that overflowed the engine's stack most likely did: deepest brackets, else most operators."""
    depth = best = 0
    line = best_line = 1
    for m in _BRACKET_OR_NL.finditer(source):
        ch = m.group()
        if ch == "\n":
            line += 1
        elif ch in "{[(":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        else:
            depth = max(depth - 1, 0)
    if best < 100:  # not brackets: a chain of prefix operators
        counts = [len(_PREFIX_OPS.findall(x)) for x in source.split("\n")]
        best_line = counts.index(max(counts)) + 1
    return best_line


def _exported_names(source: str) -> set[str]:
    names = {a or b for a, b in _ASSIGNED.findall(source)}
    opens = {m.end() - 1 for m in _OBJECT_EXPORT.finditer(source)}  # where each exported object literal's { is
    for text in _top_level_text(source, opens):
        for part in text.split(","):
            key = _KEY.match(part)
            if key:
                names.add(key.group(1))
    return names


def _top_level_text(source: str, opens: set[int]) -> list[str]:
    """The text at the top level of each bracket opened at a position in ``opens`` (nested brackets left out).

    One pass with a stack of open brackets, so every character is looked at once however the
    literals nest or stay unclosed (a ``// module.exports = {`` comment on every line used to make
    each literal scan to the end of the file: quadratic). Brackets are counted as written,
    strings and comments included, as the handler lookup always did; an unclosed literal runs
    to the end of the source.
    """
    if not opens:
        return []
    stack: list[list[str] | None] = []  # per open bracket: the pieces of its top-level text, None if not wanted
    found: list[list[str]] = []
    pos = 0
    for m in _BRACKET.finditer(source):
        i = m.start()
        if stack and stack[-1] is not None and i > pos:
            stack[-1].append(source[pos:i])
        if source[i] in "{[(":
            pieces: list[str] | None = [] if i in opens else None
            if pieces is not None:
                found.append(pieces)
            stack.append(pieces)
        elif stack:
            stack.pop()
        pos = i + 1
    if stack and stack[-1] is not None:
        stack[-1].append(source[pos:])
    return ["".join(pieces) for pieces in found]


def check_js(path: str, source: str, trigger: str | None) -> Report:
    report = Report(path)
    module = is_module(source)
    problem = _parse_error(source, module)
    if problem is not None:
        report.problems.append(problem)
        return report
    triggers = [trigger] if trigger else list(TRIGGERS)
    if not module:
        for t in triggers:
            report.handlers[t] = "(bare body)"
        return report
    exported = _exported_names(source)
    for t in triggers:
        found = next((n for n in handler_names(t) if n in exported), None)
        if found is not None:
            report.handlers[t] = found
    every_valid = {n for t in TRIGGERS for n in handler_names(t)}
    candidates = sorted({n for t in triggers for n in handler_names(t)})
    for name in sorted(exported - every_valid):
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75) or \
            difflib.get_close_matches(name, sorted(every_valid), n=1, cutoff=0.75)
        if close:
            report.problems.append(f"exports.{name} is not a handler name; did you mean {close[0]}?")
    if not report.handlers:
        if trigger:
            specific, catch_all = handler_names(trigger)
            report.problems.append(f"no handler for {trigger}: assign exports.{specific} = async (event, api) => {{...}} "
                                   f"or exports.{catch_all}")
        else:
            report.problems.append("no handler: assign exports.onExecute<Trigger> or exports.onExecute")
    return report


def js_problem(source: str, triggers: Iterable[str]) -> SourceProblem | None:
    """The first reason ``source`` cannot serve every trigger in ``triggers`` (validation at deploy), or None.

    Parsed by QuickJS, never run (``parse_problem``). A bare body is every trigger's handler; a
    module must assign each trigger's handler or ``exports.onExecute``.
    """
    module = is_module(source)
    problem = parse_problem(source, module)
    if problem is not None or not module:
        return problem
    exported = _exported_names(source)
    for t in triggers:
        if any(n in exported for n in handler_names(t)):
            continue
        specific, catch_all = handler_names(t)
        message = (f"no handler for {t}: assign exports.{specific} = async (event, api) => {{...}} "
                   f"or exports.{catch_all}")
        close = difflib.get_close_matches(specific, sorted(exported), n=1, cutoff=0.75)
        return SourceProblem(message + (f"; exports.{close[0]} is not a handler name" if close else ""))
    return None
