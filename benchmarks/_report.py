"""Turning rows into what a reader sees: ratios, the text table, the PNG of latency distributions."""

from __future__ import annotations

import math
from typing import Any

from ._catalog import RATIOS, ROWS
from ._stats import ratio


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every ratio of the catalog whose two rows were measured; None where one side is missing."""
    by_id = {r["id"]: r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for spec in RATIOS:
        a, b = by_id.get(spec.row), by_id.get(spec.ref)
        if a is None and b is None:
            continue  # neither phase selected: not worth a null in the JSON
        value = ratio(_metric(a, spec.metric), _metric(b, spec.ref_metric))
        out[spec.key] = {"value": value, "row": spec.row, "metric": spec.metric, "ref": spec.ref,
                         "ref_metric": spec.ref_metric, "label": spec.label}
    return out


def _metric(row: dict[str, Any] | None, name: str) -> Any:
    """A row's figure: a top-level one (``p50_ms``), or ``extra.NAME`` for one kept in its extra."""
    if row is None:
        return None
    if name.startswith("extra."):
        return (row.get("extra") or {}).get(name[6:])
    return row.get(name)


def fmt_num(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if unit == "ops":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}" if v >= 0.001 else f"{v:.2e}"


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "?"
    if v >= 100:
        return f"{v:.0f}x"
    if v >= 10:
        return f"{v:.1f}x"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"


COLUMNS = (("row", 22), ("n", 6), ("conc", 5), ("p50 ms", 9), ("p99 ms", 9), ("mean ms", 9), ("ops/s", 10))


def render_table(rows: list[dict[str, Any]], ratios: dict[str, dict[str, Any]]) -> str:
    ratio_text: dict[str, list[str]] = {}
    for r in ratios.values():
        if r["value"] is not None:  # a missing side is already visible as that row's error
            ratio_text.setdefault(r["row"], []).append(f"{fmt_ratio(r['value'])} {r['label']}")
    header = " ".join(name.rjust(w) if i else name.ljust(w) for i, (name, w) in enumerate(COLUMNS))
    lines = [header + "  ratio / notes", "-" * (len(header) + 40)]
    group = None
    for row in rows:
        if row.get("group") != group:
            group = row.get("group")
            lines.append(f"[{group}]")
        cells = [
            row["id"].ljust(COLUMNS[0][1]),
            fmt_num(row.get("n")).rjust(COLUMNS[1][1]),
            str(row.get("concurrency") or "-").rjust(COLUMNS[2][1]),
            fmt_num(row.get("p50_ms")).rjust(COLUMNS[3][1]),
            fmt_num(row.get("p99_ms")).rjust(COLUMNS[4][1]),
            fmt_num(row.get("mean_ms")).rjust(COLUMNS[5][1]),
            fmt_num(row.get("throughput_per_s"), "ops").rjust(COLUMNS[6][1]),
        ]
        tail = []
        if row.get("error"):
            tail.append(f"ERROR {row['error']}")
        tail += ratio_text.get(row["id"], [])
        if row.get("note"):
            tail.append(row["note"])
        lines.append(" ".join(cells) + "  " + "; ".join(tail))
    lines.append("")
    lines.append("rows:")
    for row in rows:
        lines.append(f"  {row['id']:<22} {row.get('title') or ROWS.get(row['id'], row['id'])}")
    return "\n".join(lines)


def _colour_key(row: dict[str, Any]) -> str:
    return row["id"].split(".")[0] if row.get("group") == "baselines" else row["id"]


PANELS = (
    ("latency", "single client, one call at a time"),
    ("load", "under load (N in flight): per-call latency"),
    ("once", "one-off events (cold start, kill, replacement)"),
)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """CDFs of every latency row on log-x axes, one panel per kind of measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(kind, label, [r for r in rows if r.get("kind") == kind and r.get("quantiles_ms")])
              for kind, label in PANELS]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(11, 4.2 * max(len(panels), 1)), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no latency row was measured", ha="center", va="center")
    # One colour per baseline (its latency and load rows match) and per scenario row; the dark
    # half of tab20 first, so neighbours differ.
    keys = list(dict.fromkeys(_colour_key(r) for r in rows))
    palette = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    color = {k: palette(order[i % 20]) for i, k in enumerate(keys)}
    for ax, (kind, label, prow) in zip((a[0] for a in axes), panels):
        for r in prow:
            q = [max(v, 1e-6) for v in r["quantiles_ms"]]
            y = [i / (len(q) - 1) if len(q) > 1 else 1.0 for i in range(len(q))]
            style = "--" if r.get("group") == "baselines" else "-"
            ax.step(q, y, where="post", linestyle=style, linewidth=1.6, color=color[_colour_key(r)],
                    label=f"{r['id']}  p50 {fmt_num(r.get('p50_ms'))} ms")
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", alpha=0.25)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
