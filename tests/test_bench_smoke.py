"""The benchmark harness end to end, at the smallest size: it runs, and its JSON has the promised shape.

No timing is asserted (only that figures exist and are positive): speed is
what the benchmark reports, not what a test may depend on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actionpool.benchmarks import bench

BASELINE_ROWS = (
    "direct.latency", "ppe.latency", "ppe.throughput", "pebble.latency", "pebble.throughput",
    "subprocess.latency", "subprocess.throughput", "pipe.latency", "pipe.throughput",
)


@pytest.mark.timeout(120)
def test_quick_run_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    rc = bench.main(["--quick", "--iterations", "20", "--tasks", "64", "--only", "baselines,1",
                     "--json", str(out)])
    doc = json.loads(out.read_text())

    assert {"schema", "meta", "knobs", "rows", "ratios", "errors", "plot"} <= doc.keys()
    assert doc["meta"]["preset"] == "quick" and doc["meta"]["cpus"] >= 1
    rows = {r["id"]: r for r in doc["rows"]}
    assert set(BASELINE_ROWS) | {"s1.latency"} == rows.keys()

    for row_id in (*BASELINE_ROWS, "s1.latency"):
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

    table = capsys.readouterr().out
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
