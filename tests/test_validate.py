"""Validation at deploy (issue 17): sources compiled or parsed, never run; flows checked entry by entry.

``validate_source`` and ``validate_flow`` are what the management API answers 422 with, so the
exact line and column, and the entry a flow problem names, are the contract tested here.
"""

from __future__ import annotations

from typing import Any

import pytest

from actionpool.runner.hosting import (MAX_FLOW_ENTRIES, SourceProblem, flow_problem, validate_flow,
                                       validate_source)
from actionpool.runner import _check
from actionpool.runner._check import MAX_CODE_OBJECTS

PY_OK = "def on_execute_post_login(event, api):\n    api.access.deny('no')\n"
JS_OK = "exports.onExecutePostLogin = async (event, api) => { api.access.deny('no'); };\n"


# ------------------------------------------------------------------ python


@pytest.mark.parametrize("source, line, column, text", [
    ("def on_execute_post_login(event, api):\n    x = (1 +\n    return x\n", 2, 9, "'(' was never closed"),
    ("def on_execute_post_login(event, api):\n    x = 1 +\n", 2, 12, "invalid syntax"),
    ("def on_execute_post_login(event, api):\n    if x\n        pass\n", 2, 9, "expected ':'"),
    # found by the compiler, not the parser: compile() runs too
    ("def on_execute(event, api):\n    pass\n\nreturn 5\n", 4, 1, "'return' outside function"),
])
def test_python_syntax_errors_have_their_line_and_column(source: str, line: int, column: int, text: str) -> None:
    problem = validate_source(source, "python", ["post-login"])
    assert problem == SourceProblem(f"SyntaxError: {text}", line, column)


def test_python_needs_a_handler_for_each_trigger() -> None:
    assert validate_source(PY_OK, "python", ["post-login"]) is None
    problem = validate_source(PY_OK, "python", ["post-login", "pre-user-registration"])
    assert problem is not None and problem.line is None
    assert problem.message.startswith("no handler for pre-user-registration: define "
                                      "on_execute_pre_user_registration(event, api) or on_execute(event, api)")
    assert "found on_execute_post_login" in problem.message
    # the catch-all serves every trigger
    assert validate_source("def on_execute(event, api):\n    pass\n", "python",
                           ["post-login", "pre-user-registration"]) is None
    # no trigger bound yet: compiled only
    assert validate_source("x = 1\n", "python", []) is None


def test_python_near_miss_and_arity_point_at_the_def() -> None:
    near = validate_source("import json\n\ndef on_execute_postlogin(event, api):\n    pass\n", "python", ["post-login"])
    assert near is not None and (near.line, near.column) == (3, 1)
    assert "did you mean on_execute_post_login" in near.message
    arity = validate_source("x = 1\ndef on_execute_post_login(event):\n    pass\n", "python", ["post-login"])
    assert arity == SourceProblem("on_execute_post_login takes 1 argument(s); the handler is called as "
                                  "on_execute_post_login(event, api)", 2, 1)


def test_python_is_compiled_never_run(tmp_path: Any) -> None:
    marker = tmp_path / "ran"
    source = (f"open({str(marker)!r}, 'w').write('x')\nwhile True:\n    pass\n"
              "def on_execute(event, api):\n    pass\n")
    assert validate_source(source, "python", ["post-login"]) is None
    assert not marker.exists()


def test_python_bounds_refuse_before_the_compiler_runs() -> None:
    """Nesting (RecursionError in the parser) and many equal code objects (quadratic to compile) are refused."""
    deep = "def on_execute(event, api):\n    pass\nx = " + "-" * 5000 + "1\n"
    problem = validate_source(deep, "python", ["post-login"])
    assert problem is not None and problem.line == 3 and "nested too deeply" in problem.message
    many = "x = 1\n" + "def f():\n    return 1\n" * (MAX_CODE_OBJECTS + 1)
    problem = validate_source(many, "python", [])
    assert problem is not None and problem.line == 2 * MAX_CODE_OBJECTS + 2
    assert f"more than {MAX_CODE_OBJECTS} functions" in problem.message
    # at the bound it compiles
    assert validate_source("def f():\n    return 1\n" * MAX_CODE_OBJECTS, "python", []) is None


def test_compile_work_is_bounded_by_the_code_object_cap() -> None:
    """Counted, not timed: past the cap the token scan refuses the source and the compiler never sees it."""
    compiled: list[int] = []

    def counting(tree: Any, *a: Any, **kw: Any) -> Any:
        compiled.append(len(tree.body))
        return compile(tree, *a, **kw)

    _check.compile = counting  # type: ignore[attr-defined]  (shadows the builtin in the checker's module)
    try:
        assert validate_source("def g():\n    return 2\n" * 20_000, "python", []) is not None
        assert validate_source("def g():\n    return 3\n" * MAX_CODE_OBJECTS, "python", []) is None
    finally:
        del _check.compile  # type: ignore[attr-defined]
    assert compiled == [MAX_CODE_OBJECTS]  # only the source within the cap reached the compiler


# ------------------------------------------------------------------ javascript


@pytest.mark.parametrize("language", ["javascript", "js"])
def test_js_syntax_errors_have_their_line_and_column(language: str) -> None:
    src = "exports.onExecutePostLogin = async (event, api) => {\n  const x = ;\n};\n"
    assert validate_source(src, language, ["post-login"]) == SourceProblem(
        "SyntaxError: unexpected token in expression: ';'", 2, 13)
    src = "exports.onExecutePostLogin = async (event, api) => {\n  api.log('info', 'x'\n};\n"
    problem = validate_source(src, language, ["post-login"])
    assert problem is not None and (problem.line, problem.column) == (3, 1)
    # a source that ends too early points at its own last line, not the wrapper's
    problem = validate_source("exports.onExecute = async (event, api) => {\n  if (x) {\n", language, ["post-login"])
    assert problem is not None and problem.line == 3 and problem.column is None


def test_js_needs_a_handler_for_each_trigger() -> None:
    assert validate_source(JS_OK, "javascript", ["post-login"]) is None
    problem = validate_source(JS_OK, "javascript", ["post-login", "pre-user-registration"])
    assert problem is not None and problem.message.startswith(
        "no handler for pre-user-registration: assign exports.onExecutePreUserRegistration")
    typo = validate_source("exports.onExecutePostLogn = async () => {};\n", "javascript", ["post-login"])
    assert typo is not None and "exports.onExecutePostLogn is not a handler name" in typo.message
    assert validate_source("exports.onExecute = async () => {};\n", "javascript",
                           ["post-login", "pre-user-registration"]) is None
    assert validate_source("api.log('info', 'a bare body');\n", "javascript", ["post-login"]) is None


def test_js_is_parsed_never_run() -> None:
    """A source that loops forever when run: were it run, the engine's time limit would interrupt it into a problem."""
    forever = "while (true) {}\n"
    module = "exports.onExecutePostLogin = async (event, api) => {};\nfor (;;) { }\n"
    assert validate_source(forever, "javascript", ["post-login"]) is None
    assert validate_source(module, "javascript", ["post-login"]) is None
    # and a wrapper-escaping source still runs nothing: the check script throws first
    escape = "});\nwhile (true) {}\n(function () {\n"
    assert validate_source(escape, "javascript", ["post-login"]) is None


def test_js_nesting_is_a_problem_not_a_crash() -> None:
    problem = validate_source("x = " + "(" * 100_000 + "1" + ")" * 100_000 + ";\n", "javascript", ["post-login"])
    assert problem is not None and "nested too deeply" in problem.message and problem.line == 1


# ------------------------------------------------------------------ refusals of the call itself


@pytest.mark.parametrize("language", ["ruby", "Python", "", None, 3])
def test_unknown_language_names_the_allowed_ones(language: Any) -> None:
    problem = validate_source(PY_OK, language, ["post-login"])
    assert problem is not None and '"python" or "javascript" (or "js")' in problem.message


def test_unknown_trigger_and_bad_source_type() -> None:
    problem = validate_source(PY_OK, "python", ["post-logout"])
    assert problem is not None and "unknown trigger 'post-logout'" in problem.message
    assert validate_source(b"x", "python", []).message == "source must be a string, got bytes"  # type: ignore[arg-type,union-attr]
    assert validate_source("x = '\x00'\n", "javascript", []).message == "source contains a NUL character"  # type: ignore[union-attr]


def test_the_memo_never_changes_an_answer() -> None:
    bad = "def on_execute_post_login(event, api):\n    x = 1 +\n"
    first = validate_source(bad, "python", ["post-login"])
    assert validate_source(bad, "python", ["post-login"]) == first
    assert validate_source(bad, "js", ["post-login"]) != first   # keyed by language too
    assert validate_source(PY_OK, "python", ["pre-user-registration"]) is not None  # and by trigger


# ------------------------------------------------------------------ flows

SLUGS = {
    "a": ("python", "def on_execute(event, api):\n    pass\n"),
    "b": ("javascript", JS_OK),
    "c": ("python", PY_OK),                               # post-login only
    "broken": ("python", "def on_execute(event, api):\n    x = (\n"),
    "decision-1": ("python", "def on_execute(event, api):\n    pass\n"),
}


def test_a_valid_flow_with_every_kind_of_entry() -> None:
    entries = ["a", {"if": "step.a.x == 1", "skip_to": "c"}, "b",
               {"if": "event.user.email.endsWith('@x.example')", "deny": "blocked", "message": "Nope."},
               {"if": "true", "allow": True}, "c"]
    assert validate_flow(entries, SLUGS, "post-login") is None
    assert validate_flow([], SLUGS, "post-login") is None


@pytest.mark.parametrize("entries, where, text", [
    ("a", "flow", "a flow is a list"),
    ([f"x{i}" for i in range(MAX_FLOW_ENTRIES + 1)], "flow", f"at most {MAX_FLOW_ENTRIES}"),
    (["a", "Not A Slug"], "flow[1]", "is not a valid action slug"),
    (["a", "b", "a"], "flow[2]", "'a' is already flow[0]"),
    (["a", 3], "flow[1]", "must be an action slug or a decision block"),
    (["a", None], "flow[1]", "got NoneType"),
    (["nope"], "flow[0]", "unknown action 'nope': no deployed version in this tenant"),
    (["a", "broken"], "flow[1]", "action 'broken': 2:9: SyntaxError: '(' was never closed"),
    (["c"], "flow[0]", "action 'c': no handler for pre-user-registration"),
    ([{"if": "true"}], "flow[0]", "exactly one of deny"),
    ([{"if": "true", "deny": "x", "allow": True}], "flow[0].allow", "exactly one of deny"),
    ([{"if": "true", "deny": "x", "unless": "y"}], "flow[0].unless", "unknown key(s) 'unless'"),
    ([{"deny": "x"}], "flow[0].if", "needs an expression string"),
    ([{"if": "", "deny": "x"}], "flow[0].if", "needs an expression string"),
    ([{"if": "step.a.x ==", "deny": "x"}], "flow[0].if", "not a valid CEL expression"),
    ([{"if": "[1].all(x, x > 0)", "deny": "x"}], "flow[0].if", "not allowed"),
    ([{"if": "secrets.k == 'v'", "deny": "x"}], "flow[0].if", "unknown variable(s) secrets"),
    ([{"if": "x" * 600, "deny": "x"}], "flow[0].if", "longer than 512"),
    ([{"if": "true", "deny": ""}], "flow[0].deny", "deny reason"),
    ([{"if": "true", "deny": 3}], "flow[0].deny", "deny reason"),
    ([{"if": "true", "allow": False}], "flow[0].allow", "allow must be true"),
    ([{"if": "true", "allow": 1}], "flow[0].allow", "allow must be true"),
    ([{"if": "true", "allow": True, "message": "hi"}], "flow[0].message", "user message of a deny block"),
    ([{"if": "true", "deny": "x", "message": ""}], "flow[0].message", "non-empty string"),
    ([{"if": "true", "skip_to": "a"}, "b"], "flow[0].skip_to", "not an action of this flow"),
    (["a", {"if": "true", "skip_to": "a"}], "flow[1].skip_to", "'a' is an earlier entry"),
    ([{"if": "true", "skip_to": {"slug": "a"}}, "a"], "flow[0].skip_to", "slug of a later action"),
    ([{"if": "true", "skip_to": "decision-2"}, {"if": "true", "deny": "x"}], "flow[0].skip_to", "not an action"),
    ([{"if": "true", "deny": "x"}, "decision-1"], "flow[1]", "record name of the decision block at flow[0]"),
])
def test_every_flow_refusal_names_its_entry(entries: Any, where: str, text: str) -> None:
    trigger = "pre-user-registration" if entries == ["c"] else "post-login"
    problem = validate_flow(entries, SLUGS, trigger)
    assert problem is not None and problem.startswith(where + ": "), problem
    assert text in problem, problem


def test_unknown_trigger_and_shape_only_checks() -> None:
    problem = validate_flow(["a"], SLUGS, "post-logout")
    assert problem is not None and problem.startswith("flow: unknown trigger 'post-logout' (expected one of: ")
    # slugs=None: the shape only (a config file's flows, before their actions are deployed)
    assert validate_flow(["nope", {"if": "true", "skip_to": "later"}, "later"], None, "post-login") is None
    problem = flow_problem(["nope", {"if": "true", "skip_to": "nope"}], None, "post-login")
    assert problem is not None and (problem.index, problem.field, problem.where) == (1, "skip_to", "flow[1].skip_to")


def test_validation_work_is_linear_in_the_flow() -> None:
    """Each action's source is compiled once per (source, language, trigger), not once per flow check."""
    calls: list[str] = []
    real = _check.python_problem
    import actionpool.runner._validate as v

    def counting(source: str, triggers: Any) -> Any:
        calls.append(source)
        return real(source, triggers)

    v.python_problem = counting  # type: ignore[assignment]
    try:
        slugs = {f"s{i}": ("python", f"def on_execute(event, api):\n    return {i}\n") for i in range(MAX_FLOW_ENTRIES)}
        for _ in range(3):
            assert validate_flow(list(slugs), slugs, "post-login") is None
    finally:
        v.python_problem = real  # type: ignore[assignment]
    assert len(calls) == MAX_FLOW_ENTRIES



# ------------------------------------------------------------------ off the event loop


async def test_large_sources_are_checked_in_a_child_not_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import actionpool.runner._validate as v
    from actionpool.runner.hosting import INLINE_SOURCE_BYTES, validate_flow_async, validate_source_async

    def not_here(source: str, lang: str, wanted: Any) -> Any:
        assert len(source) <= INLINE_SOURCE_BYTES, "a large source was compiled on the event loop"
        return real(source, lang, wanted)

    real = v._check_here
    monkeypatch.setattr(v, "_check_here", not_here)
    filler = "x = y + 1\n" * (INLINE_SOURCE_BYTES // 10 + 1)
    bad = PY_OK + filler + "def broken(:\n"
    lines = bad.count("\n")
    assert await validate_source_async(bad, "python", ["post-login"]) == SourceProblem(
        "SyntaxError: invalid syntax", lines, 12)
    assert await validate_source_async(PY_OK + filler, "python", ["post-login"]) is None
    missing = await validate_source_async(PY_OK + filler, "python", ["pre-user-registration"])
    assert missing is not None and missing.message.startswith("no handler for pre-user-registration")
    # JavaScript in the child too, and still never run
    js = "while (true) {}\n" + "// padding\n" * (INLINE_SOURCE_BYTES // 11 + 1)
    assert await validate_source_async(js, "javascript", ["post-login"]) is None
    # a flow naming that action is answered from what the child said (remembered by digest)
    monkeypatch.setattr(v, "_check_in_child", None)  # a second child would fail the test
    assert await validate_flow_async(["big"], {"big": ("python", PY_OK + filler)}, "post-login") is None
    problem = await validate_flow_async(["big"], {"big": ("python", bad)}, "post-login")
    assert problem == f"flow[0]: action 'big': {lines}:12: SyntaxError: invalid syntax"
    # small sources and cheap refusals never start a child
    assert await validate_source_async(PY_OK, "python", ["post-login"]) is None
    assert (await validate_source_async(PY_OK + filler, "ruby", [])) is not None


async def test_a_child_that_fails_is_a_problem_never_an_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    import actionpool.runner._validate as v

    monkeypatch.setattr(v, "CHILD_TIMEOUT_S", 0.0)
    source = PY_OK + "z = 0\n" * (v.INLINE_SOURCE_BYTES // 6 + 1)
    problem = await v.validate_source_async(source, "python", ["post-login"])
    assert problem is not None and problem.message.startswith("could not be validated within")
    monkeypatch.setattr(v, "CHILD_TIMEOUT_S", 60.0)
    assert await v.validate_source_async(source, "python", ["post-login"]) is None  # the failure was not remembered
