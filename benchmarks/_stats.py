"""Latency summaries: percentiles, means, a compact quantile sketch for plots.

Pure functions on lists of seconds; results are in milliseconds because that
is the unit every row of the table speaks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

SKETCH_POINTS = 201  # quantiles kept per row for the plot: enough for a smooth CDF, small JSON


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def sketch(sorted_values: Sequence[float], points: int = SKETCH_POINTS) -> list[float]:
    """Evenly spaced quantiles (0th..100th) of sorted values: a CDF without every sample."""
    if not sorted_values:
        return []
    if len(sorted_values) <= points:
        return list(sorted_values)
    return [percentile(sorted_values, 100 * i / (points - 1)) for i in range(points)]


def summarize(samples_s: Sequence[float], elapsed_s: float | None = None) -> dict[str, Any]:
    """Row figures from latency samples in seconds.

    ``elapsed_s`` is the wall time of the whole measurement; when given, the
    throughput is ``n / elapsed`` (what a closed loop actually achieved),
    otherwise it is left out rather than guessed from the mean.
    """
    if not samples_s:
        raise ValueError("no successful samples to summarize")
    ms = sorted(s * 1000.0 for s in samples_s)
    out: dict[str, Any] = {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "quantiles_ms": [round(v, 6) for v in sketch(ms)],
    }
    if elapsed_s is not None and elapsed_s > 0:
        out["elapsed_s"] = elapsed_s
        out["throughput_per_s"] = len(ms) / elapsed_s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side is missing or the divisor is not positive."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return None
    return a / b


def mib(n_bytes: float) -> float:
    return n_bytes / (1 << 20)
