"""Decision blocks: ``{ if = "step.check-country.country_blocked == true", deny = "country-blocked" }``.

A flow entry that is evaluated in the supervisor, between actions, with CEL
(``common-expression-language``, a Rust interpreter) and never ``eval``.
The expression sees ``step`` (what earlier actions wrote with
``api.state.set``) and ``event`` (the flow's event, without secrets).

Hyphenated slugs and keys are valid in the reference's syntax but would parse
as a subtraction in CEL, so ``step.<slug>.<key>`` paths are rewritten into
index syntax (``step["check-country"]["country_blocked"]``) before compiling;
string literals are left alone. Cost is capped before anything runs: at most
``MAX_EXPR_CHARS`` characters and no comprehension macros (``all``, ``exists``,
``exists_one``, ``map``, ``filter``) and only the standard functions in
``FUNCTIONS``, so an evaluation is linear in the
expression's size times the data it reads (itself bounded by the frame
limits) and cannot loop. A result that is not a boolean, or an evaluation
error (a missing key), denies the flow (``decision_error``): fail closed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._flow import Action

if TYPE_CHECKING:
    from ._flow import FlowState

MAX_EXPR_CHARS = 512
VARIABLES = frozenset({"step", "event"})
# Named functions an expression may call (operators, such as _==_ or @in, are always allowed).
FUNCTIONS = frozenset({"size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string",
                       "bool", "type", "lowerAscii", "upperAscii"})
_OPERATOR = re.compile(r"^(_[^\w\s]+_|_\[_\]|_\?_:_|!_|-_|@in)$")
_MACROS = re.compile(r"\.\s*(all|exists|exists_one|map|filter)\s*\(")
_STRING = re.compile(r"""'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*\"""", re.S)
_STEP_PATH = re.compile(r"(?<![\w.\]])step\.([a-z0-9][a-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_-]*))?")


def _rewrite_code(code: str) -> str:
    def sub(m: re.Match[str]) -> str:
        slug, key = m.group(1), m.group(2)
        out = f'step["{slug}"]' if "-" in slug else f"step.{slug}"
        if key is not None:
            out += f'["{key}"]' if "-" in key else f".{key}"
        return out

    return _STEP_PATH.sub(sub, code)


def rewrite(expr: str) -> str:
    """``step.check-country.country_blocked`` -> ``step["check-country"].country_blocked`` (outside strings)."""
    out, pos = [], 0
    for m in _STRING.finditer(expr):
        out.append(_rewrite_code(expr[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_rewrite_code(expr[pos:]))
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def compile_decision(expr: str) -> Any:
    """A compiled CEL program for ``expr``, or ValueError saying why it is refused."""
    import cel

    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    code = rewrite(expr)
    if _MACROS.search(_STRING.sub('""', code)):
        raise ValueError("comprehension macros (all, exists, exists_one, map, filter) are not allowed")
    try:
        program = cel.compile(code)
    except Exception as exc:  # the library raises ValueError for syntax errors; keep its message
        raise ValueError(f"not a valid CEL expression: {str(exc).splitlines()[0]}") from None
    unknown = set(program.variables()) - VARIABLES
    if unknown:
        raise ValueError(f"unknown variable(s) {', '.join(sorted(unknown))}; expressions read step and event")
    calls = {f for f in program.functions() if not _OPERATOR.match(f) and f not in FUNCTIONS}
    if calls:
        raise ValueError(f"unknown function(s) {', '.join(sorted(calls))}; allowed: {', '.join(sorted(FUNCTIONS))}")
    return program


@dataclass(frozen=True)
class Decision(Action):
    """A flow entry that runs no worker: the engine calls :meth:`decide` instead (see runner/_engine.py)."""

    expr: str = ""
    deny_reason: str = ""
    _program: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_program", compile_decision(self.expr))

    def decide(self, flow: "FlowState") -> str:
        """Evaluate against the flow so far; deny it when true. Returns the record status."""
        names = self._program.variables()
        ctx: dict[str, Any] = {}
        if "step" in names:
            ctx["step"] = flow.state
        if "event" in names:
            ctx["event"] = flow.event
        try:
            value = self._program.execute(ctx)
        except Exception as exc:
            flow.deny(self.slug, "decision_error", f"decision {self.expr!r} failed: {exc}", None)
            return "failed"
        if type(value) is not bool:
            flow.deny(self.slug, "decision_error",
                      f"decision {self.expr!r} gave {type(value).__name__}, not a boolean", None)
            return "failed"
        if value:
            flow.deny(self.slug, "denied", self.deny_reason, None)
            return "denied"
        return "ok"


def make_decision(index: int, expr: str, deny: str) -> Decision:
    """The block at position ``index`` (1-based) of a flow; its record slug is ``decision-<index>``."""
    return Decision(slug=f"decision-{index}", source="", expr=expr, deny_reason=deny)
