"""Decision blocks: ``{ if = "step.check-country.country_blocked == true", deny = "country-blocked" }``.

A flow entry that is evaluated in the supervisor, between actions, with CEL
(``common-expression-language``, a Rust interpreter) and never ``eval``.
The expression sees ``step`` (what earlier actions wrote with
``api.state.set``) and ``event`` (the flow's event, without secrets).
The reference's Decision blocks route a flow, they do not only stop it. A
block does exactly one thing when its expression is true:

* ``deny = "reason"`` (optional ``message``: what the user sees): the flow
  halts denied, no later entry runs;
* ``allow = true``: the flow ends allowed; the later entries are ``skipped``;
* ``skip_to = "<slug>"``: the flow goes on at that later action; the entries
  in between are ``skipped``.

False: the flow continues with the next entry.

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

from ._flow import SLUG_RE, Action

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


MAX_REASON_CHARS = 1024     # a deny reason or user message; it reaches the audit log and the gateway
BLOCK_KEYS = ("if", "deny", "allow", "skip_to", "message")


class BlockError(ValueError):
    """A decision block of the wrong shape; ``field`` names the key at fault (None: the block itself)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FlowBlock:
    """A decision block as written in a flow (TOML or the management API), checked but not yet placed."""

    expr: str
    deny: str | None = None
    allow: bool = False
    skip_to: str | None = None
    message: str | None = None

    def to_entry(self) -> dict[str, Any]:
        """The block as a flow entry again (what ``parse_block`` reads)."""
        out: dict[str, Any] = {"if": self.expr}
        if self.deny is not None:
            out["deny"] = self.deny
            if self.message is not None:
                out["message"] = self.message
        elif self.allow:
            out["allow"] = True
        else:
            out["skip_to"] = self.skip_to
        return out

    def decision(self, index: int) -> "Decision":
        """The block at position ``index`` (1-based) of its flow, ready to run."""
        return make_decision(index, self.expr, self.deny, allow=self.allow, skip_to=self.skip_to,
                             message=self.message)


def _reason(value: Any, key: str) -> str:
    if type(value) is not str or not value.strip():
        raise BlockError(f"{key} must be a non-empty string", key)
    if len(value) > MAX_REASON_CHARS:
        raise BlockError(f"{key} is longer than {MAX_REASON_CHARS} characters", key)
    return value


def parse_block(entry: Any) -> FlowBlock:
    """Check one decision block's shape and compile its expression; BlockError (a ValueError) says why not.

    ``{"if", "deny"[, "message"]}``, ``{"if", "allow": true}`` or ``{"if", "skip_to": slug}``: exactly one
    of deny, allow and skip_to; no other key. Whether a ``skip_to`` names a later entry is the flow's
    question (``validate_flow``).
    """
    if type(entry) is not dict:
        raise BlockError(f"a decision block must be an object, got {type(entry).__name__}")
    unknown = sorted(str(k) for k in entry if k not in BLOCK_KEYS)
    if unknown:
        raise BlockError(f"unknown key(s) {', '.join(repr(k) for k in unknown[:5])} in a decision block "
                         f"(allowed: {', '.join(BLOCK_KEYS)})", unknown[0] if len(unknown[0]) <= 64 else None)
    expr = entry.get("if")
    if type(expr) is not str or not expr.strip():
        raise BlockError("a decision block needs an expression string", "if")
    actions = [k for k in ("deny", "allow", "skip_to") if k in entry]
    if len(actions) != 1:
        raise BlockError("a decision block needs exactly one of deny = \"reason\", allow = true or "
                         f"skip_to = \"<slug>\", got {', '.join(actions) if actions else 'none'}",
                         actions[1] if len(actions) > 1 else None)
    if "message" in entry and "deny" not in entry:
        raise BlockError("message is the user message of a deny block; allow and skip_to blocks have none",
                         "message")
    try:
        compile_decision(expr)
    except ValueError as exc:
        raise BlockError(str(exc), "if") from None
    if "deny" in entry:
        deny = entry["deny"]
        if type(deny) is not str or not deny:
            raise BlockError("a decision block needs the deny reason (a string)", "deny")
        _reason(deny, "deny")
        message = _reason(entry["message"], "message") if "message" in entry else None
        return FlowBlock(expr, deny=deny, message=message)
    if "allow" in entry:
        if entry["allow"] is not True:
            raise BlockError("allow must be true (leave the block out to let the flow continue)", "allow")
        return FlowBlock(expr, allow=True)
    target = entry["skip_to"]
    if type(target) is not str or not SLUG_RE.match(target):
        raise BlockError(f"skip_to must be the slug of a later action ({SLUG_RE.pattern})", "skip_to")
    return FlowBlock(expr, skip_to=target)


# What a true block asks of the engine (FlowState.goto), besides deny: end allowed, or jump to a slug.
ALLOW = "\x00allow"


@dataclass(frozen=True)
class Decision(Action):
    """A flow entry that runs no worker: the engine calls :meth:`decide` instead (see runner/_engine.py).

    Exactly one of ``deny_reason``, ``allow`` and ``skip_to`` is what a true expression does
    (``make_decision`` checks it); ``user_message`` is a denial's message for the user.
    """

    expr: str = ""
    deny_reason: str = ""
    allow: bool = False
    skip_to: str = ""
    user_message: str | None = None
    _program: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_program", compile_decision(self.expr))

    def decide(self, flow: "FlowState") -> str:
        """Evaluate against the flow so far and act on a true result. Returns the record status.

        Deny: the flow's denial is set. Allow and skip_to: ``flow.goto`` tells the engine where
        the flow goes on (runner/_engine.py), and a log line says why the entries between were skipped.
        """
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
        if not value:
            return "ok"
        if self.allow:
            flow.goto = ALLOW
            flow.log(self.slug, "info", f"allow: {self.expr} is true; the flow ends allowed")
            return "ok"
        if self.skip_to:
            flow.goto = self.skip_to
            flow.log(self.slug, "info", f"skip_to: {self.expr} is true; the flow goes on at {self.skip_to}")
            return "ok"
        flow.deny(self.slug, "denied", self.deny_reason, self.user_message)
        return "denied"


def make_decision(index: int, expr: str, deny: str | None = None, *, allow: bool = False,
                  skip_to: str | None = None, message: str | None = None) -> Decision:
    """The block at position ``index`` (1-based) of a flow; its record slug is ``decision-<index>``.

    ``make_decision(2, expr, "reason")`` (deny) keeps working; ``allow=True`` or ``skip_to=slug``
    route instead. Exactly one of the three; ``message`` only with deny. ValueError otherwise.
    """
    entry: dict[str, Any] = {"if": expr}
    if deny is not None:
        entry["deny"] = deny
    if allow:
        entry["allow"] = True
    if skip_to is not None:
        entry["skip_to"] = skip_to
    if message is not None:
        entry["message"] = message
    block = parse_block(entry)
    return Decision(slug=f"decision-{index}", source="", expr=block.expr, deny_reason=block.deny or "",
                    allow=block.allow, skip_to=block.skip_to or "", user_message=block.message)


def decision_from_block(index: int, entry: Any) -> Decision:
    """A flow entry dict (``{"if", "deny"|"allow"|"skip_to"[, "message"]}``) at 1-based ``index``, ready to run."""
    return parse_block(entry).decision(index)
