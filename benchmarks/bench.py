"""``actionpool bench``: run every scenario against every baseline, print the table, save figures.

Usage::

    actionpool bench --quick --json bench.json     # whole run in under a minute
    actionpool bench --only baselines,1,2          # a subset; outputs in a new temporary directory
    actionpool bench --out results/                # the full run (a few minutes), outputs in results/

Each phase (one baseline, or one scenario) runs in a child process of its
own, bounded by a hard timeout; see ``benchmarks/__init__.py`` for why. The
outputs (``bench.json``, ``bench.png``) go to ``--out DIR``, or ``--json`` /
``--plot`` where given, else to a fresh temporary directory; never silently
into the current directory. Where they went is printed on stderr. The exit
status is 0 when every row was measured and 1 when anything failed (a row,
the plot); every failure is printed on stderr, and the table and JSON are
written either way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ._catalog import PHASES, PRESETS, Phase
from ._harness import Deadline, Recorder, error_text, kill_leftovers
from ._report import compute_ratios, plot, render_table
from ._tenant_plot import plot_tenant_cdf

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
KILL_GRACE_S = 15.0  # the parent waits this long past a phase's own deadline before killing it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actionpool bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: everything in under a minute")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="directory for bench.json and bench.png (default: a new temporary directory)")
    p.add_argument("--json", metavar="FILE", default=None, help="write figures here (default: OUT/bench.json)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="latency distribution plot (default: next to the JSON, .png)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--only", metavar="LIST", default=None,
                   help="comma-separated: baselines, scenarios, direct, ppe, pebble, subprocess, pipe, 1..8, 10 (warm)")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="single-client calls per latency row (direct call and pipe: 10x; fresh subprocess: N/10)")
    p.add_argument("--tasks", type=int, metavar="N", help="submissions per throughput row")
    p.add_argument("--concurrency", type=int, metavar="N", help="in-flight submissions of throughput rows (64)")
    p.add_argument("--io-flows", type=int, metavar="N", help="scenario 4: concurrent I/O-bound flows")
    p.add_argument("--warm-workers", type=int, metavar="N", help="scenario 6: warm workers to measure")
    p.add_argument("--cold-iterations", type=int, metavar="N", help="scenario 5: cold starts and kills")
    p.add_argument("--tenants", type=int, metavar="N", help="scenarios 7-9: tenants of the mix (300)")
    p.add_argument("--actions-per-tenant", metavar="N|LO-HI", help="scenarios 7-9: actions per tenant (1-3)")
    p.add_argument("--zipf", type=float, metavar="S", help="scenarios 7-9: Zipf exponent of tenant traffic (1.1)")
    p.add_argument("--many-tasks", type=int, metavar="N", help="scenarios 7-8: measured flows")
    p.add_argument("--open-flows", type=int, metavar="N", help="S7 open loop: scheduled flows")
    p.add_argument("--restart-flows", type=int, metavar="N", help="scenario 10: first flows of a restarted runner")
    p.add_argument("--restart-reps", type=int, metavar="N", help="scenario 10: rounds with and without prewarm")
    p.add_argument("--phase-timeout", type=float, metavar="S", help="hard bound per phase, seconds")
    p.add_argument("--sandbox", choices=("strict", "degraded", "off"), default=None,
                   help="RunnerConfig.sandbox.mode for scenarios (default: the config's default)")
    p.add_argument("--runner", action="append", default=[], metavar="KEY=VALUE",
                   help="a RunnerConfig field for every scenario (int, float, true/false/none or text), e.g. worker_nice=0; repeatable")
    p.add_argument("--no-freeze-heap", action="store_true",
                   help="S7-S10: leave the warm heap in the GC's full passes (serve freezes it after its prewarm)")
    p.add_argument("--inline", action="store_true", help="run phases in this process (debugging; no hard kill)")
    p.add_argument("-v", "--verbose", action="store_true", help="show phase processes' stderr as it comes")
    # Internal: the parent runs a phase child with these.
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    p.add_argument("--_knobs", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p


def build_knobs(args: argparse.Namespace) -> dict[str, Any]:
    preset = "quick" if args.quick else "full"
    knobs = dict(PRESETS[preset], preset=preset, sandbox=args.sandbox)
    if args.iterations is not None:
        n = max(1, args.iterations)
        knobs["iterations"] = n
        knobs["subprocess_iterations"] = max(3, min(knobs["subprocess_iterations"], n // 10))
    if args.tasks is not None:
        knobs["tasks"] = max(1, args.tasks)
        knobs["subprocess_tasks"] = max(1, min(knobs["subprocess_tasks"], args.tasks))
    if args.actions_per_tenant is not None:
        knobs["actions_per_tenant"] = args.actions_per_tenant
    if args.zipf is not None:
        knobs["zipf"] = max(0.0, args.zipf)
    for name in ("concurrency", "io_flows", "warm_workers", "cold_iterations", "tenants", "many_tasks", "open_flows",
                 "restart_flows", "restart_reps"):
        v = getattr(args, name)
        if v is not None:
            knobs[name] = max(1, v)
    if args.phase_timeout is not None:
        knobs["phase_timeout_s"] = args.phase_timeout
    knobs["runner"] = _runner_overrides(args.runner)
    knobs["freeze_heap"] = not args.no_freeze_heap
    return knobs


def _runner_overrides(items: list[str]) -> dict[str, Any]:
    """``--runner KEY=VALUE`` pairs as RunnerConfig keyword arguments (checked against its fields)."""
    import dataclasses

    from ..runner import RunnerConfig

    fields = {f.name for f in dataclasses.fields(RunnerConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--runner: expected KEY=VALUE with KEY a RunnerConfig field, got {item!r}")
        value: Any = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        for conv in (int, float) if isinstance(value, str) else ():
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        out[key] = value
    try:
        RunnerConfig(**out).validate()
    except Exception as exc:
        raise SystemExit(f"--runner: {exc}") from None
    return out


def select_phases(only: str | None) -> list[Phase]:
    if not only:
        return list(PHASES)
    wanted = {w.strip().lower() for w in only.split(",") if w.strip()}
    known = {"baselines", "scenarios"} | {p.name for p in PHASES} | {a for p in PHASES for a in p.aliases}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return [p for p in PHASES if wanted & ({p.group, p.name} | set(p.aliases))]


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# -- the phase child -----------------------------------------------------------------------------


def _phase_child(args: argparse.Namespace) -> int:
    knobs = json.loads(args._knobs)
    phase = next(p for p in PHASES if p.name == args._phase)
    rec = Recorder(args._out)
    deadline = Deadline(knobs["phase_timeout_s"])
    try:
        _resolve(phase.target)(knobs, rec, deadline)
    except Exception as exc:  # the rows not yet written get this error from the parent
        print(f"phase {phase.name} failed: {error_text(exc)}", file=sys.stderr)
        rec.flush()
        return 3
    finally:
        kill_leftovers()
    return 0


# -- the parent ----------------------------------------------------------------------------------


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill a phase child and everything it started, by pid (snapshot first: orphans get reparented)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    proc.kill()
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(tree, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(path: str, limit: int = 600) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-limit:]


def run_phase_process(phase: Phase, knobs: dict[str, Any], verbose: bool) -> tuple[list[dict[str, Any]], str | None]:
    """Run one phase in a child; return (rows it wrote, why the rest are missing or None)."""
    fd, out = tempfile.mkstemp(prefix=f"bench-{phase.name}-", suffix=".json")
    os.close(fd)
    log_fd, log = tempfile.mkstemp(prefix=f"bench-{phase.name}-", suffix=".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "actionpool.benchmarks.bench", "--_phase", phase.name, "--_knobs", json.dumps(knobs),
           "--_out", out]
    why: str | None = None
    try:
        sink = None if verbose else log_fd
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        try:
            rc = proc.wait(timeout=knobs["phase_timeout_s"] + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc = None
            why = f"phase killed after {knobs['phase_timeout_s'] + KILL_GRACE_S:.0f}s (hung)"
        if rc is not None and rc != 0:
            why = f"phase process exited with status {rc}" + (f": {_tail(log)}" if _tail(log) else "")
        try:
            rows = json.loads(Path(out).read_text() or "[]")
        except (OSError, ValueError):
            rows = []
        return rows, why
    finally:
        os.close(log_fd)
        for path in (out, log, f"{out}.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def run_phase_inline(phase: Phase, knobs: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    rec = Recorder(None)
    try:
        _resolve(phase.target)(knobs, rec, Deadline(knobs["phase_timeout_s"]))
    except Exception as exc:
        return rec.rows, error_text(exc)
    return rec.rows, None


def complete_rows(phase: Phase, got: list[dict[str, Any]], why: str | None, knobs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in catalog order, annotated; a row the phase never wrote carries the reason."""
    by_id = {r.get("id"): r for r in got}
    rows = []
    for spec in phase.rows:
        row = by_id.get(spec.id) or {"id": spec.id, "extra": {},
                                     "error": why or "phase finished without reporting this row"}
        conc = knobs.get(spec.concurrency) if isinstance(spec.concurrency, str) else spec.concurrency
        row.setdefault("concurrency", conc)
        row.update(phase=phase.name, group=phase.group, title=spec.title, kind=spec.kind)
        rows.append(row)
    return rows


def collect_meta(argv: list[str], knobs: dict[str, Any]) -> dict[str, Any]:
    import psutil

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        commit = res.stdout.strip() or None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "git_commit": commit,
        "preset": knobs["preset"],
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """Other work on the machine skews every figure; the load average says how much there was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = _parser().parse_args(argv)
    if args._phase:
        return _phase_child(args)
    knobs = build_knobs(args)
    phases = select_phases(args.only)
    json_path, plot_path = output_paths(args)
    print(f"[bench] writing figures to {json_path}" + (f" and {plot_path}" if plot_path else ""),
          file=sys.stderr, flush=True)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "meta": collect_meta(argv, knobs), "knobs": knobs,
                           "rows": [], "ratios": {}, "errors": {}, "plot": None}
    t_run = time.monotonic()
    for phase in phases:
        t0 = time.monotonic()
        print(f"[bench] {phase.group[:-1]} {phase.name} ...", file=sys.stderr, flush=True)
        got, why = run_phase_inline(phase, knobs) if args.inline else run_phase_process(phase, knobs, args.verbose)
        rows = complete_rows(phase, got, why, knobs)
        doc["rows"].extend(rows)
        for r in rows:
            if r.get("error"):
                print(f"[bench]   {r['id']}: {r['error']}", file=sys.stderr, flush=True)
        print(f"[bench]   done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
        _write_json(json_path, doc)  # after every phase: an interrupted run still leaves its figures
    doc["meta"]["duration_s"] = round(time.monotonic() - t_run, 2)
    doc["meta"]["loadavg_end"] = _loadavg()
    doc["ratios"] = compute_ratios(doc["rows"])
    doc["errors"] = {r["id"]: r["error"] for r in doc["rows"] if r.get("error")}
    if plot_path is not None:
        try:
            plot(doc["rows"], str(plot_path), f"actionpool bench ({knobs['preset']}), {doc['meta']['date']}")
            doc["plot"] = str(plot_path)
            tenants = plot_tenant_cdf(doc["rows"], str(plot_path.with_name(plot_path.stem + "-tenants.png")),
                                      f"many tenants: S2 vs S7 vs S8 ({knobs['preset']}), {doc['meta']['date']}")
            if tenants:
                doc["plot_tenants"] = tenants
        except Exception as exc:  # a missing matplotlib must not cost the figures
            doc["errors"]["plot"] = error_text(exc)
            hint = " (install the bench extra: pip install 'actionpool[bench]')" if isinstance(exc, ImportError) else ""
            print(f"[bench] error: plot {plot_path}: {error_text(exc)}{hint}", file=sys.stderr, flush=True)
    _write_json(json_path, doc)
    print(render_table(doc["rows"], doc["ratios"]))
    # Only the load before the run says something about others: S4/S6 raise it themselves.
    load = doc["meta"]["loadavg_start"]
    if load and load[0] > (os.cpu_count() or 1):
        print(f"\nnote: the machine was busy before the run (1-min load average {load[0]:.1f} on {os.cpu_count()} "
              "cpus); figures are noisy, compare ratios within this run only")
    print(f"\nfigures: {json_path}" + (f"   plot: {doc['plot']}" if doc["plot"] else "")
          + f"   ({doc['meta']['duration_s']}s)")
    if doc["errors"]:
        print(f"[bench] {len(doc['errors'])} error(s): " + "; ".join(f"{k}: {v}" for k, v in doc["errors"].items()),
              file=sys.stderr, flush=True)
        return 1
    return 0


def output_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Where the JSON and the PNG go: explicit paths, else ``--out``, else a new temporary directory."""
    if args.json and args.out is None:
        json_path = Path(args.json)
    else:
        out = Path(args.out) if args.out is not None else Path(tempfile.mkdtemp(prefix="actionpool-bench-"))
        out.mkdir(parents=True, exist_ok=True)
        json_path = Path(args.json) if args.json else out / "bench.json"
    if args.no_plot:
        return json_path, None
    return json_path, Path(args.plot) if args.plot else json_path.with_suffix(".png")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
