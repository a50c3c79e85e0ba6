"""``actionpool check``: does an action file compile, and does it define the handler its trigger calls?

Static only: the action's code is parsed, never run, in the supervisor's
process. A handler is ``on_execute_<trigger>`` (``on_execute_post_login``) or
the catch-all ``on_execute``, defined at module level. Names that look like a
handler but are not one (``on_execute_postlogin``, ``onExecutePostLogin``,
``on_exec``) get a "did you mean" from difflib.

Each language registers one checker in ``CHECKERS`` by file suffix; a checker
takes the path, the source text and the trigger (or ``None``: any trigger)
and returns the file's :class:`Report`.
"""

from __future__ import annotations

import ast
import difflib
import io
import re
import tokenize
from pathlib import Path
from typing import Iterable

from ..worker._runtime import handler_names

from ._check_js import check_js
from ._check_report import Checker, Report, SourceProblem
from ._triggers import TRIGGERS




def _snake(name: str) -> str:
    """``onExecutePostLogin`` -> ``on_execute_post_login``; ``On-Execute`` -> ``on_execute``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).replace("-", "_")
    return re.sub(r"_+", "_", s).lower()


def _valid_names(trigger: str | None) -> set[str]:
    """The handler names ``trigger`` (or, for ``None``, any trigger) would call."""
    return {n for t in ([trigger] if trigger else TRIGGERS) for n in handler_names(t)}


def _suggest(name: str, candidates: list[str]) -> str | None:
    """The handler name ``name`` most likely meant, if it is close enough."""
    snake = _snake(name)
    if snake in candidates:
        return snake
    close = difflib.get_close_matches(snake, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def _top_level_bindings(tree: ast.Module) -> dict[str, ast.AST]:
    """Names bound at module level (functions, assignments, imports), with the node that binds each."""
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[(a.asname or a.name).split(".")[0]] = node
    return out


def _arity_problem(name: str, node: ast.AST) -> str | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if isinstance(node, ast.ClassDef):
            return f"{node.lineno}: {name} is a class; the handler must be a function (event, api)"
        return None  # bound by assignment or import: cannot tell statically
    a = node.args
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    if a.vararg is None and positional < 2:
        return f"{node.lineno}: {name} takes {positional} argument(s); the handler is called as {name}(event, api)"
    if required > 2 or any(d is None for d in a.kw_defaults):
        return f"{node.lineno}: {name} requires more than (event, api)"
    return None


# Tokens that nest one expression inside the next (a chain of binary operators is a left-leaning tree,
# unary operators and attribute/call/subscript chains nest too). Comparisons and and/or are flat.
_NESTING_OPS = frozenset({"+", "-", "*", "/", "//", "%", "@", "**", "<<", ">>", "&", "|", "^", "~", ".", "(", "[",
                          "{", ":="})
_NESTING_WORDS = frozenset({"not", "lambda", "await", "if", "else", "yield"})
# Far above what the compiler itself takes (its recursion gives up near 1,000 levels): a larger element is
# refused before the parser spends memory on it. Also bounded: the scan itself (one pass, no recursion).
MAX_NESTING_TOKENS = 3000
# Code objects (def, lambda, class, comprehension) in one source. CPython 3.11's compiler merges equal
# constants, and equal code objects cost it time quadratic in their number: 10,000 copies of one small
# function took seconds of the supervisor's CPU to compile, for 200 kB of source. An action needs far fewer.
MAX_CODE_OBJECTS = 1000
_CODE_WORDS = frozenset({"def", "lambda", "class"})


def _nesting(source: str) -> tuple[int, int, int, int]:
    """(most nesting tokens in one comma-separated element, its line, code objects, the line of the one over
    ``MAX_CODE_OBJECTS``): one linear pass over the tokens.

    Counts reset at each comma of the element's own bracket level, so long flat literals
    (``[-1, -2, ...]``) count little. A source the tokenizer refuses is the compiler's to report.
    """
    stack = [0]
    best, best_line = 0, 1
    code, code_line = 0, 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NEWLINE:
                stack = [0]
                continue
            t = tok.string
            if tok.type == tokenize.NAME and (t in _CODE_WORDS or (t == "for" and len(stack) > 1)):
                code += 1
                if code == MAX_CODE_OBJECTS + 1:
                    code_line = tok.start[0]
            if tok.type == tokenize.OP:
                if t == "," or t == ";":
                    stack[-1] = 0
                    continue
                if t in (")", "]", "}"):
                    inner = stack.pop() if len(stack) > 1 else 0
                    stack[-1] += inner
                    continue
                if t not in _NESTING_OPS:
                    continue
            elif tok.type != tokenize.NAME or t not in _NESTING_WORDS:
                continue
            stack[-1] += 1
            if stack[-1] > best:
                best, best_line = stack[-1], tok.start[0]
            if t in ("(", "[", "{"):
                stack.append(0)
            # past the tokenizer's own bracket limit (200) the compiler reports the exact place at once
            if best > MAX_NESTING_TOKENS or len(stack) > 256:
                break
    except (tokenize.TokenError, SyntaxError, ValueError):  # unterminated string, bad indentation, null byte
        pass
    return best, best_line, code, code_line


def compile_python(path: str, source: str) -> tuple[ast.Module | None, SourceProblem | None]:
    """Parse and compile ``source``, never run it, without letting it crash or stall the caller.

    (tree, None) or (None, problem with its 1-based line and column where known). A deeply nested
    expression makes CPython's parser or compiler raise MemoryError or RecursionError; both become
    a problem naming the line, like a syntax error. Too many code objects are refused before the
    compiler's quadratic merge of them runs (``MAX_CODE_OBJECTS``).
    """
    depth, line, code, code_line = _nesting(source)
    too_deep = SourceProblem("expression nested too deeply to compile (split it into several statements)", line)
    if depth > MAX_NESTING_TOKENS:
        return None, too_deep
    if code > MAX_CODE_OBJECTS:
        return None, SourceProblem(f"more than {MAX_CODE_OBJECTS} functions, lambdas, classes and comprehensions "
                                   "in one action (split it into several actions)", code_line)
    try:
        tree = ast.parse(source, filename=path)
        compile(tree, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        return None, SourceProblem(f"SyntaxError: {exc.msg}", exc.lineno or None,
                                   exc.offset if exc.lineno and exc.offset and exc.offset > 0 else None)
    except ValueError as exc:  # e.g. a null byte in the source
        return None, SourceProblem(f"cannot compile: {exc}")
    except (RecursionError, MemoryError):
        return None, too_deep
    return tree, None


def _compile_problem(path: str, source: str) -> tuple[ast.Module | None, str | None]:
    """``compile_python`` with its problem as the checker prints it ("LINE:COL: message")."""
    tree, problem = compile_python(path, source)
    return tree, None if problem is None else str(problem)


def check_python(path: str, source: str, trigger: str | None) -> Report:
    report = Report(path)
    tree, problem = _compile_problem(path, source)
    if tree is None:
        report.problems.append(problem or "cannot compile")
        return report
    bound = _top_level_bindings(tree)
    every_valid = _valid_names(None)
    for t in ([trigger] if trigger else list(TRIGGERS)):
        found = next((n for n in handler_names(t) if n in bound), None)
        if found is not None:
            report.handlers[t] = found
    for name in sorted(set(report.handlers.values()), key=lambda n: getattr(bound[n], "lineno", 0)):
        problem = _arity_problem(name, bound[name])
        if problem:
            report.problems.append(problem)
    # Near misses: names that look like a handler but are none (any trigger's handler is not a near miss).
    candidates = sorted(_valid_names(trigger))
    for name, node in bound.items():
        if name in every_valid:
            continue
        guess = _suggest(name, candidates)
        if guess is None and re.match(r"(?i)on_?exec", name):
            guess = _suggest(name, sorted(every_valid))
        if guess is not None:
            line = getattr(node, "lineno", 0)
            report.problems.append(f"{line}: {name} is not a handler name; did you mean {guess}?")
    if not report.handlers:
        if trigger:
            specific, catch_all = handler_names(trigger)
            others = sorted(n for n in bound if n in every_valid)
            hint = f" (found {', '.join(others)}, for other triggers)" if others else ""
            report.problems.append(f"no handler for {trigger}: define {specific}(event, api) or "
                                   f"{catch_all}(event, api){hint}")
        else:
            report.problems.append("no handler: define on_execute_<trigger>(event, api) or on_execute(event, api)")
    return report


def python_problem(source: str, triggers: Iterable[str]) -> SourceProblem | None:
    """The first reason ``source`` cannot serve every trigger in ``triggers`` (validation at deploy), or None.

    Compiled, never run (``compile_python``), then a module-level handler per trigger with the
    arity ``check`` accepts; a missing handler names the near miss that was probably meant.
    """
    tree, problem = compile_python("<action>", source)
    if tree is None:
        return problem
    bound = _top_level_bindings(tree)
    every_valid = _valid_names(None)
    for t in triggers:
        found = next((n for n in handler_names(t) if n in bound), None)
        if found is not None:
            node = bound[found]
            arity = _arity_problem(found, node)
            if arity:
                return SourceProblem(arity.split(": ", 1)[1], getattr(node, "lineno", None),
                                     getattr(node, "col_offset", -1) + 1 or None)
            continue
        specific, catch_all = handler_names(t)
        message = f"no handler for {t}: define {specific}(event, api) or {catch_all}(event, api)"
        candidates = sorted(handler_names(t))
        for name, node in bound.items():
            if name in every_valid:
                continue
            guess = _suggest(name, candidates)
            if guess is not None:
                return SourceProblem(f"{message}; {name} is not a handler name, did you mean {guess}?",
                                     getattr(node, "lineno", None), getattr(node, "col_offset", -1) + 1 or None)
        others = sorted(n for n in bound if n in every_valid)
        return SourceProblem(message + (f" (found {', '.join(others)}, for other triggers)" if others else ""))
    return None


# One checker per language, by file suffix.
CHECKERS: dict[str, Checker] = {".py": check_python, ".js": check_js}


class CheckUsageError(Exception):
    """The file cannot be checked at all (missing, unreadable, unknown language)."""


def check_file(path: str, trigger: str | None) -> Report:
    p = Path(path)
    checker = CHECKERS.get(p.suffix)
    if checker is None:
        known = ", ".join(sorted(CHECKERS))
        raise CheckUsageError(f"{path}: no checker for {p.suffix or 'files without a suffix'} (known: {known})")
    try:
        source = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckUsageError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        return Report(path, problems=[f"not UTF-8: {exc}"])
    except OSError as exc:
        raise CheckUsageError(f"{path}: cannot read: {exc.strerror}") from None
    return checker(path, source, trigger)
