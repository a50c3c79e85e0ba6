"""Layers point one way, read from the source (``ast``), so a violation fails before it ships.

    protocol   imports nothing of ours
    worker     imports protocol only (never runner: untrusted memory holds no authority)
    runner     imports protocol and worker (the doctor reads host capabilities); the floors above only
               lazily, from the CLI, which dispatches their subcommands (serve, replay, doctor --store, bench)
    sidecar    imports the runner's public API only: ``actionpool.runner`` and ``actionpool.runner.hosting``
    benchmarks imports anything (it measures the internals too)

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
SUBPACKAGES = ("protocol", "worker", "runner", "sidecar", "benchmarks")
ALLOWED = {"protocol": {"protocol"}, "worker": {"worker", "protocol"},
           "runner": {"runner", "protocol", "worker"}, "sidecar": {"sidecar", "runner"},
           "benchmarks": set(SUBPACKAGES)}
# The only place below them that may load the upper floors: the CLI's subcommands, inside a function.
LAZY_UPPER = {"runner/cli.py": {"benchmarks", "sidecar"}}
# What the sidecar may import of the runner: its public modules.
RUNNER_PUBLIC = {"runner", "runner.hosting"}


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
            if e.target not in ALLOWED[sub] and not (e.target in LAZY_UPPER.get(e.file, ()) and not e.top_level):
                bad.append(f"{e.file}:{e.line} imports {e.target or 'the root package'}")
    assert not bad, f"{sub} may import only {sorted(ALLOWED[sub])}:\n" + "\n".join(bad)


@pytest.mark.parametrize("upper", ["benchmarks", "sidecar"])
def test_nothing_below_an_upper_floor_imports_it_at_import_time(upper: str) -> None:
    bad = [f"{e.file}:{e.line}" for p in _package_files() for e in _edges(p)
           if e.target == upper and _package_of(ROOT / e.file) not in (upper, "benchmarks")
           and (e.top_level or upper not in LAZY_UPPER.get(e.file, ()))]
    assert not bad, f"{upper} imported from below it: " + ", ".join(bad)


def _runner_modules_imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of the runner in a sidecar file, e.g. ``runner.hosting``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module and node.module.startswith("runner"):
            out.append((node.lineno, node.module))
            if node.module == "runner":  # `from ..runner import _private` names a module too
                out += [(node.lineno, f"runner.{a.name}") for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actionpool.runner"):
            out.append((node.lineno, node.module.removeprefix("actionpool.")))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("actionpool.")) for a in node.names
                    if a.name.startswith("actionpool.runner")]
    return out


def test_the_sidecar_uses_only_the_runners_public_api() -> None:
    """``actionpool.runner`` and ``actionpool.runner.hosting``: the sidecar never reaches into ``runner/_x.py``."""
    files = sorted((ROOT / "sidecar").rglob("*.py"))
    seen = [(p, line, mod) for p in files for line, mod in _runner_modules_imported(p)]
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, line, mod in seen if mod not in RUNNER_PUBLIC]
    assert seen and not bad, "the sidecar may import only " + ", ".join(sorted(RUNNER_PUBLIC)) + ":\n" + "\n".join(bad)


def test_the_runners_public_modules_have_no_leading_underscore() -> None:
    assert all(not m.split(".")[-1].startswith("_") for m in RUNNER_PUBLIC)
    assert (ROOT / "runner" / "hosting.py").is_file()


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
    assert any(e.target == "sidecar" and not e.top_level for e in cli)
    assert any(e.target == "runner" for e in _edges(ROOT / "sidecar" / "_server.py"))
    assert any(e.target == "runner" and e.top_level for e in cli)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at import time (``runner._check`` -> {``runner._check_js``, ...})."""
    graph: dict[str, set[str]] = {}
    for path in _package_files():
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for n in tree.body:
            if isinstance(n, ast.Try):
                top |= {id(c) for c in ast.walk(n)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) not in top or not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = pkg[:max(len(pkg) - (node.level - 1), 0)]
            mod = base + (node.module.split(".") if node.module else [])
            candidates = [".".join(mod + [a.name]) for a in node.names] + [".".join(mod)]
            for c in candidates:
                if (ROOT / Path(*c.split("."))).with_suffix(".py").is_file():
                    deps.add(c)
        graph[name] = deps
    return graph


def test_no_import_cycle_between_modules() -> None:
    """Cycles make import order matter (``runner/_check.py`` and ``runner/_check_js.py`` once needed a bottom import)."""
    graph = _module_graph()
    assert graph["runner._check"] >= {"runner._check_js", "runner._check_report"}, graph["runner._check"]
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
