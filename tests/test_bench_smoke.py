"""The benchmark harness end to end, at the smallest size: it runs, and its JSON has the promised shape.

No timing is asserted (only that figures exist and are positive): speed is
what the benchmark reports, not what a test may depend on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

from actionpool.benchmarks import bench

BASELINE_ROWS = (
    "direct.latency", "ppe.latency", "ppe.throughput", "pebble.latency", "pebble.throughput",
    "subprocess.latency", "subprocess.throughput", "pipe.latency", "pipe.throughput",
)


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.timeout(120)
def test_quick_run_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    rc = bench.main(["--quick", "--iterations", "20", "--tasks", "64", "--only", "baselines,1",
                     "--json", str(out)])
    doc = json.loads(out.read_text())
    captured = capsys.readouterr()
    if not HAVE_MATPLOTLIB:  # `.[test]` installs it; without it the plot is an error, reported
        assert doc["errors"].keys() == {"plot"} and rc == 1
        assert "error: plot" in captured.err and "actionpool[bench]" in captured.err
        pytest.skip("matplotlib is not installed (pip install -e '.[test]'): the plot was not checked")

    assert {"schema", "meta", "knobs", "rows", "ratios", "errors", "plot"} <= doc.keys()
    assert doc["meta"]["preset"] == "quick" and doc["meta"]["cpus"] >= 1
    rows = {r["id"]: r for r in doc["rows"]}
    assert set(BASELINE_ROWS) | {"s1.latency", "s1.latency_js"} == rows.keys()

    for row_id in (*BASELINE_ROWS, "s1.latency", "s1.latency_js"):
        row = rows[row_id]
        assert row["error"] is None, f"{row_id}: {row['error']}"
        assert row["n"] > 0
        for key in ("p50_ms", "p99_ms", "mean_ms", "throughput_per_s"):
            assert row[key] > 0, (row_id, key)
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["quantiles_ms"] == sorted(row["quantiles_ms"])

    for key in ("s1_p50_vs_ppe_p50", "s1_p50_vs_pipe_p50", "ppe_p50_vs_pipe_p50"):
        assert doc["ratios"][key]["value"] > 0
    assert doc["errors"] == {}
    assert rc == 0

    png = Path(doc["plot"])
    assert png == out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = captured.out
    assert f"writing figures to {out}" in captured.err
    assert "ppe.latency" in table and "s1.latency" in table and "x ppe p50" in table


def test_phase_past_its_deadline_is_an_error_row_and_the_run_goes_on(tmp_path: Path) -> None:
    """A zero deadline fails every row at its first check; each still appears, with the reason."""
    out = tmp_path / "t.json"
    rc = bench.main(["--quick", "--only", "direct,pipe", "--phase-timeout", "0", "--json", str(out), "--no-plot"])
    doc = json.loads(out.read_text())
    rows = {r["id"]: r for r in doc["rows"]}
    assert rows.keys() == {"direct.latency", "pipe.latency", "pipe.throughput"}
    for row in rows.values():
        assert row["error"] and "deadline" in row["error"], row
    assert doc["errors"].keys() == rows.keys()
    assert doc["plot"] is None
    assert rc == 1


def test_only_rejects_unknown_phase_names() -> None:
    with pytest.raises(SystemExit, match="unknown phase"):
        bench.main(["--only", "nonsense"])


def test_outputs_go_to_a_new_temporary_directory_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Not the current directory: a fresh one under TMPDIR, named on stderr."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    rc = bench.main(["--quick", "--only", "direct", "--iterations", "20", "--inline", "--no-plot"])
    assert rc == 0
    assert list(cwd.iterdir()) == []
    [out] = tmp.iterdir()
    assert out.name.startswith("actionpool-bench-")
    doc = json.loads((out / "bench.json").read_text())
    assert [r["id"] for r in doc["rows"]] == ["direct.latency"] and doc["errors"] == {}
    captured = capsys.readouterr()
    assert f"writing figures to {out / 'bench.json'}" in captured.err
    assert f"figures: {out / 'bench.json'}" in captured.out


def test_out_dir_holds_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "dir"
    rc = bench.main(["--quick", "--only", "direct", "--iterations", "20", "--inline", "--out", str(out)])
    doc = json.loads((out / "bench.json").read_text())
    if not HAVE_MATPLOTLIB:
        assert rc == 1 and doc["errors"].keys() == {"plot"}
        pytest.skip("matplotlib is not installed (pip install -e '.[test]'): the plot was not checked")
    assert rc == 0 and doc["plot"] == str(out / "bench.png")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_plot_is_printed_on_stderr_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without matplotlib the figures are still written; the failure is on stderr, not only in the JSON."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rc = bench.main(["--quick", "--only", "direct", "--iterations", "20", "--inline", "--out", str(tmp_path)])
    assert rc == 1
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["errors"].keys() == {"plot"} and doc["plot"] is None
    assert doc["rows"][0]["error"] is None
    err = capsys.readouterr().err
    assert "[bench] error: plot" in err and "matplotlib" in err and "pip install 'actionpool[bench]'" in err
    assert "[bench] 1 error(s): plot:" in err
