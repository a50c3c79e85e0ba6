"""Layers point one way, read from the source (``ast``), so a violation fails before it ships.

    protocol   imports nothing of ours
    worker     imports protocol only (never runner: untrusted memory holds no authority)
    runner     imports protocol and worker (the doctor reads host capabilities); benchmarks only lazily, from the CLI
    benchmarks imports anything

Inside the package every import of our own code is relative (``from ..protocol import X``); an
absolute ``import protocol`` / ``import runner`` would resolve to whatever a host application calls
``protocol``. Tests and examples use ``actionpool.*``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("protocol", "worker", "runner", "benchmarks")
ALLOWED = {"protocol": {"protocol"}, "worker": {"worker", "protocol"},
           "runner": {"runner", "protocol", "worker"}, "benchmarks": set(SUBPACKAGES)}
# The only place outside benchmarks that may load it: the CLI's `bench` and `stress`, inside a function.
LAZY_BENCHMARKS = {"runner/cli.py"}


@dataclass(frozen=True)
class Edge:
    file: str        # path relative to the repository
    line: int
    target: str      # the subpackage imported ("" for the root package)
    top_level: bool  # at module level (runs at import time) rather than inside a function


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _edges(path: Path) -> list[Edge]:
    """Every import of our own code in ``path``, resolved to the subpackage it reaches."""
    rel = path.relative_to(ROOT).as_posix()
    pkg = _package_of(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` and try/except blocks at module level run at import time too
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            # Resolve against the module's package: level 1 is that package, each further level one up.
            base = [pkg] if pkg else []
            base = base[:max(len(base) - (node.level - 1), 0)]
            if node.module:
                targets = [(base + node.module.split("."))[0]]
            else:
                targets = [(base + [a.name])[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "actionpool":
                targets = [parts[1] if len(parts) > 1 else ""]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "actionpool":
                    targets.append(parts[1] if len(parts) > 1 else "")
        for t in targets:
            out.append(Edge(rel, node.lineno, t, id(node) in top))
    return out


def _package_files() -> list[Path]:
    return sorted(p for sub in SUBPACKAGES for p in (ROOT / sub).rglob("*.py")) + [ROOT / "__init__.py"]


def _all_python_files() -> list[Path]:
    skip = {".venv", ".git", "build", "dist"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_subpackage_imports_only_what_its_layer_allows(sub: str) -> None:
    bad = []
    for path in sorted((ROOT / sub).rglob("*.py")):
        for e in _edges(path):
            if e.target not in ALLOWED[sub] and not (e.target == "benchmarks" and e.file in LAZY_BENCHMARKS
                                                     and not e.top_level):
                bad.append(f"{e.file}:{e.line} imports {e.target or 'the root package'}")
    assert not bad, f"{sub} may import only {sorted(ALLOWED[sub])}:\n" + "\n".join(bad)


def test_nothing_outside_benchmarks_imports_benchmarks_at_import_time() -> None:
    bad = [f"{e.file}:{e.line}" for p in _package_files() for e in _edges(p)
           if e.target == "benchmarks" and not e.file.startswith("benchmarks/")
           and (e.top_level or e.file not in LAZY_BENCHMARKS)]
    assert not bad, "benchmarks imported outside benchmarks/: " + ", ".join(bad)


def test_the_root_package_imports_only_the_runner_and_lazily() -> None:
    edges = _edges(ROOT / "__init__.py")
    assert {e.target for e in edges} == {"runner"}
    # At module level only under TYPE_CHECKING (never true at run time); the real import is in __getattr__.
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        assert not isinstance(node, (ast.Import, ast.ImportFrom)) or node.module in ("__future__", "typing"), \
            ast.unparse(node)


def test_no_absolute_import_of_a_subpackage_anywhere() -> None:
    """``import runner`` or ``from protocol import X`` in any file (package, tests, examples, benchmarks)."""
    bad = []
    for path in _all_python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in SUBPACKAGES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "use relative imports inside the package and actionpool.* outside:\n" + "\n".join(bad)


def test_the_checker_resolves_relative_imports() -> None:
    """The parser above really resolves relative imports (a checker that finds nothing proves nothing)."""
    edges = _edges(ROOT / "worker" / "_runtime.py")
    assert {e.target for e in edges} <= {"worker", "protocol"} and edges
    cli = _edges(ROOT / "runner" / "cli.py")
    assert any(e.target == "benchmarks" and not e.top_level for e in cli)
    assert any(e.target == "runner" and e.top_level for e in cli)
