"""The sidecar-under-attack benchmark end to end, at the smallest size: it runs, answers every flow, cleans up.

``benchmarks/sidecar_attack.py --quick`` with tiny numbers, as a subprocess (as an operator runs it):
a real ``actionpool serve``, a real attacker process holding unauthenticated connections, the slow
and hoarder tenants. Only the report's structure, the answers and the clean-up are asserted; no
figure of speed or memory is (that is what the benchmark reports, not what a test may depend on).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONNECTIONS, FLOWS = 200, 30


@pytest.mark.timeout(180)
def test_quick_attack_run_answers_every_flow_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    proc = subprocess.run(
        [sys.executable, "-m", "actionpool.benchmarks.sidecar_attack", "--quick", "--connections", str(CONNECTIONS),
         "--flows", str(FLOWS), "--phase-seconds", "2", "--slow-inflight", "4", "--hoarder-runs", "5",
         "--json", str(out)],
        capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"schema", "meta", "knobs", "quiet", "attack", "attacker", "after", "sidecar", "cleanup",
            "targets"} <= doc.keys()
    assert doc["meta"]["preset"] == "quick" and doc["knobs"]["connections"] == CONNECTIONS

    # Every measured flow got its answer (200, allow), in both phases and on both kinds of connection.
    for phase in ("quiet", "attack"):
        for mode in ("keepalive", "new_connection"):
            m = doc[phase][mode]
            assert (m["planned"], m["answered"], m["failed"], m["errors"]) == (FLOWS, FLOWS, 0, {}), (phase, mode, m)
            assert m["n"] == FLOWS and 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
        assert doc[phase]["all"]["answered"] == 2 * FLOWS

    # The attack really happened: the connections were held, the other tenants ran.
    assert doc["attack_setup"]["flood"]["connects"] >= CONNECTIONS
    assert doc["attack"]["attack_open_during_measurement"]["max"] > 0
    final = doc["attacker"]
    assert set(final["flood"]["open"]) == {"idle", "slowloris"}
    assert isinstance(final["flood"]["closed_by_server"]["idle"], int)
    assert final["slow"]["flows"] > 0 and final["slow"]["statuses"].get("200", 0) > 0
    assert final["hoarder"]["flows"] >= 5 and final["hoarder"]["bytes_read"] > 5 << 20  # ~2 MB per answer

    # The sidecar was watched throughout, and its footprint is in the report.
    sc = doc["sidecar"]
    assert {"quiet", "ramp", "attack"} <= sc["phases"].keys()
    assert sc["phases"]["attack"]["peak_fds"] >= sc["phases"]["quiet"]["peak_fds"] > 0
    assert sc["phases"]["attack"]["peak_rss_mb"] > 0 and sc["nofile_limit"] > 0
    assert doc["quiet"]["sidecar"]["rss_mb"] > 0 and sc["timeline"]

    # Targets: every one present, each with a value and a verdict (met or not is the benchmark's finding).
    targets = {t["id"]: t for t in doc["targets"]}
    assert targets.keys() == {"p99_ratio.all", "p99_ratio.keepalive", "p99_ratio.new_connection",
                              "measured_errors", "rss_growth_mb", "fds_peak"}
    for t in targets.values():
        assert t["value"] is not None and t["met"] in (True, False), t
    assert targets["measured_errors"]["value"] == 0

    # Everything it started is gone: the sidecar exited by itself on SIGTERM, nothing had to be killed.
    assert sc["exit_code"] == 0, sc["log"]["tail"]
    assert doc["cleanup"] == {**doc["cleanup"], "leftover_processes_killed": 0, "sidecar_workers_outliving_it": [],
                              "port_still_open": False}
    assert doc["cleanup"]["benchmark_fds_after"] == doc["cleanup"]["benchmark_fds_before"]
    assert "measured p99 under attack / quiet" in proc.stdout


def test_bad_knobs_are_refused_before_anything_starts() -> None:
    proc = subprocess.run([sys.executable, "-m", "actionpool.benchmarks.sidecar_attack", "--quick", "--flows", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--flows is out of range: 0" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "actionpool.benchmarks.sidecar_attack", "--server-option", "nokey"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "expected KEY=VALUE" in proc.stderr
