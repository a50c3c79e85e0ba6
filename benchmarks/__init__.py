"""actionpool's benchmark suite: the runner against its peers, in one run.

Every scenario (``scenarios.py``) runs next to every baseline
(``baselines.py``) in the same invocation, so ratios compare figures taken on
the same machine in the same minute. ``bench.main(argv)`` is the entry point
(``actionpool bench`` and ``python -m benchmarks.bench``); README.md explains
how to read the table.

Data flow::

    bench.main ──spawns──▶ phase child (python -m benchmarks.bench --_phase NAME)
        │                      │ runs one phase, rewrites its rows to a JSON file after each row
        │◀── rows file ────────┘ (a killed child still leaves the rows it finished)
        └─▶ table on stdout, figures as JSON, latency distributions as PNG

Each phase runs in its own process so that a hang is bounded by a hard kill,
a crash costs one row and not the run, and the supervisor's RSS is measured
without the other phases' garbage.
"""
