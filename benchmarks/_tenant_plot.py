"""The many-tenants picture: latency CDFs of S2 (one hot action), S7 (many tenants) and S8 (one spinning tenant).

One small function, so the bench report can call it next to its own plot; it draws nothing (and
returns None) when none of the three rows was measured.
"""

from __future__ import annotations

from typing import Any

ROWS = (("s2.throughput", "S2 one hot action"), ("s7.many_tenants", "S7 many tenants, Zipf"),
        ("s8.spinning_tenant", "S8 + a spinning tenant (normal flows)"))


def plot_tenant_cdf(rows: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Write the S2/S7/S8 latency CDFs (log x) to ``path``; the path, or None when there was nothing to draw."""
    by_id = {r["id"]: r for r in rows if r.get("quantiles_ms")}
    drawn = [(rid, label) for rid, label in ROWS if rid in by_id]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rid, label in drawn:
        r = by_id[rid]
        q = [max(v, 1e-6) for v in r["quantiles_ms"]]
        y = [i / (len(q) - 1) if len(q) > 1 else 1.0 for i in range(len(q))]
        ax.step(q, y, where="post", linewidth=1.8,
                label=f"{label}: p50 {r.get('p50_ms', 0):.3g} ms, p99 {r.get('p99_ms', 0):.3g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("flow latency, ms (log), 64 in flight")
    ax.set_ylabel("fraction of flows")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
