"""``actionpool check`` stays linear and never crashes on hostile sources (issue 16).

JavaScript: the exported-object lookup once scanned from every ``module.exports = {``
to the end of its literal, so a literal left open on every line (a comment is
enough) made it quadratic. The work is counted here (Python line events inside the
checker), never timed. Python: a deeply nested expression made CPython's parser or
compiler raise MemoryError or RecursionError out of the checker; it is now a
problem with its line, and the exit status is 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from actionpool.runner import _check, _check_js
from actionpool.runner._check import check_file

CHECKER_FILES = {_check.__file__, _check_js.__file__}


def line_events(fn: Callable[[], Any]) -> int:
    """How many lines of the checker's own modules ``fn`` executes (a count of work, not a time)."""
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in CHECKER_FILES else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


HANDLER = "exports.onExecutePostLogin = async (event, api) => { api.log('info', 'hi'); };\n"
JS_SHAPES = {
    # a literal left open on every line, inside comments: valid JavaScript
    "open_in_comments": lambda n: HANDLER + "// module.exports = { a: (1,\n" * (n // 28),
    # the same in strings
    "open_in_strings": lambda n: HANDLER + "const s = 'module.exports = {';\n" * (n // 32),
    # one big exported object, nested
    "big_object": lambda n: "module.exports = {\n  onExecute: async () => {},\n"
                            + "".join(f"  k{i}: {{a: [1, {{b: ({i})}}]}},\n" for i in range(n // 28)) + "};\n",
    # many exported names
    "many_names": lambda n: HANDLER + "".join(f"exports.helper{i} = {i};\n" for i in range(n // 22)),
}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("shape", sorted(JS_SHAPES))
def test_js_check_work_grows_linearly(tmp_path: Path, shape: str) -> None:
    small, large = JS_SHAPES[shape](16_000), JS_SHAPES[shape](128_000)
    ratio = len(large) / len(small)
    small_work = line_events(lambda: check_file(write(tmp_path, "s.js", small), "post-login"))
    large_work = line_events(lambda: check_file(write(tmp_path, "l.js", large), "post-login"))
    # linear: about `ratio` times the work (quadratic was ratio**2 = 64 times); constant costs only help
    assert large_work <= 1.5 * ratio * small_work + 1000, (shape, small_work, large_work)


def test_js_check_of_a_large_hostile_file_finishes(tmp_path: Path) -> None:
    """The real command on 128 kB that took minutes before; bounded by the timeout, not timed."""
    path = write(tmp_path, "big.js", JS_SHAPES["open_in_comments"](128_000))
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "check", path, "--trigger", "post-login"],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "ok: onExecutePostLogin" in proc.stdout


DEEP_PYTHON = {
    "open_brackets": "[" * 10**6,
    "closed_parens": "x = " + "(" * 100_000 + "1" + ")" * 100_000,
    "closed_lists": "x = " + "[" * 100_000 + "]" * 100_000,
    "unary_chain": "x = " + "-" * 10**6 + "1",
    "not_chain": "x = " + "not " * 10**5 + "1",
    "lambda_chain": "x = " + "lambda: " * 10**5 + "1",
    "attribute_chain": "x = a" + ".b" * 10**5,
    "call_chain": "x = f" + "()" * 10**5,
    "power_chain": "x = " + "2**" * 10**5 + "2",
    "ternary_chain": "x = " + "1 if 1 else " * 10**5 + "1",
    # below the pre-scan's bound: the compiler's own RecursionError, caught
    "sum_2000": "x = " + "1+" * 2000 + "1",
}


@pytest.mark.parametrize("shape", sorted(DEEP_PYTHON))
def test_deeply_nested_python_is_a_problem_with_its_line(tmp_path: Path, shape: str) -> None:
    source = "def on_execute(event, api):\n    pass\n\n" + DEEP_PYTHON[shape] + "\n"
    report = check_file(write(tmp_path, "deep.py", source), None)
    assert not report.ok
    problem = report.problems[0]
    assert problem.split(":", 1)[0] == "4", problem  # the line of the nested expression
    assert "nested" in problem or "SyntaxError" in problem, problem


def test_nesting_bound_leaves_long_flat_code_alone(tmp_path: Path) -> None:
    """Long literals and comparison chains are flat: no false alarm from the pre-scan."""
    source = ("X = [" + ", ".join(f"-{i}" for i in range(20_000)) + "]\n"
              "Y = {" + ", ".join(f"'k{i}': a.b.c" for i in range(5_000)) + "}\n"
              "Z = '" + "+/=" * 20_000 + "'\n"
              "W = 1 " + "< 1 " * 5_000 + "\n"
              "def on_execute(event, api):\n    pass\n")
    report = check_file(write(tmp_path, "flat.py", source), None)
    assert report.ok, report.problems


def test_cli_exit_status_on_deep_sources(tmp_path: Path) -> None:
    paths = [write(tmp_path, "a.py", "def on_execute(event, api):\n    pass\nx = " + "-" * 10**6 + "1\n"),
             write(tmp_path, "b.py", "[" * 10**6),
             write(tmp_path, "c.js", "exports.onExecute = async () => {\n  const a = " + "[" * 10**6 + "\n};\n"),
             write(tmp_path, "d.js", "exports.onExecute = async () => {\n  const a = " + "-" * 200_000 + "1;\n};\n")]
    proc = subprocess.run([sys.executable, "-m", "actionpool.runner.cli", "check", *paths],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Error" not in proc.stderr.replace("4 of 4 file(s) with problems", ""), proc.stderr  # no traceback
    out = proc.stdout
    assert f"{paths[0]}:3: expression nested too deeply" in out, out
    assert f"{paths[1]}:1:201: SyntaxError: too many nested parentheses" in out, out
    assert f"{paths[2]}:2: RangeError" in out and f"{paths[3]}:2: RangeError" in out, out
