"""Benchmark figures: score vs accumulator width P and weight sparsity vs P, one panel per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from a2q_passes.report import save_figure
from bench.sweep import METHODS

_STYLE = {  # method -> (colour, marker, line style)
    "unconstrained-wrap": ("tab:gray", "x", ":"),
    "project-a2q": ("tab:olive", "v", "--"),
    "project-exact": ("tab:green", "^", "--"),
    "axe": ("tab:cyan", "s", "--"),
    "qat": ("tab:blue", "o", "-"),
    "ours-best": ("navy", "*", "-"),
    "brevitas-a2q": ("tab:red", "D", "-"),
    "brevitas-a2q+": ("tab:orange", "P", "-"),
    "qat-float": ("tab:purple", "o", "--"),
    "brevitas-a2q-eq": ("darkred", "D", "--"),
    "brevitas-a2q+-eq": ("darkorange", "P", "--"),
}
_LABELS = {m.key: m.label for m in METHODS}


def _series(rows: list[dict[str, Any]], method: str, field: str, widths: list[int]) -> tuple[list[int], list[float]]:
    """Points of one method, x = position of P in the sweep (evenly spaced, widest first)."""
    points = sorted((widths.index(r["P"]), r[field]) for r in rows
                    if r["method"] == method and r["status"] == "ok" and r[field] is not None)
    return [x for x, _ in points], [v for _, v in points]


def _p_axis(ax, widths: list[int]) -> None:
    ax.set_xticks(range(len(widths)), [str(p) for p in widths])
    ax.set_xlabel("accumulator width P (bits; not to scale)")
    ax.grid(alpha=0.3)


def _panels(models: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(models)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _finish(plt, fig, axes, path: Path, title: str) -> Path:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    save_figure(fig, path)
    plt.close(fig)
    return path


def accuracy_plot(models: dict[str, Any], path: Path) -> Path:
    """Score (as % of float) vs P for every method; dashed lines: float and the quantized baseline."""
    plt, fig, axes = _panels(models)
    for ax, (name, entry) in zip(axes, models.items()):
        rows, widths = entry["rows"], list(entry["config"]["widths"])
        for method in _STYLE:
            ps, values = _series(rows, method, "pct_of_float", widths)
            if ps:
                colour, marker, style = _STYLE[method]
                ax.plot(ps, values, color=colour, marker=marker, linestyle=style, label=_LABELS[method], ms=5)
        quantized = next(r for r in rows if r["method"] == "quantized")
        ax.axhline(100.0, color="black", lw=0.8, ls="--", label="float")
        ax.axhline(quantized["pct_of_float"], color="purple", lw=0.8, ls="-.",
                   label=f"{entry['variant']}, exact accumulation")
        ax.axhline(99.0, color="black", lw=0.5, ls=":", label="99% of float")
        _p_axis(ax, widths)
        ax.set_ylabel(f"{entry['metric']} as % of float")
        low = min((r["pct_of_float"] for r in rows if r["pct_of_float"] is not None and r["P"] is not None), default=0)
        ax.set_ylim(max(0.0, min(low, 90.0) - 2), 101.5)
        ax.set_title(f"{name} {entry['variant']} (float {entry['float_score']:.2f} {entry['metric']})", fontsize=10)
    return _finish(plt, fig, axes, path, "Score vs accumulator width (test split; higher is better)")


def sparsity_plot(models: dict[str, Any], path: Path) -> Path:
    """Fraction of zero integer weights (constrained layers) vs P for every method."""
    plt, fig, axes = _panels(models)
    for ax, (name, entry) in zip(axes, models.items()):
        rows, widths = entry["rows"], list(entry["config"]["widths"])
        for method in _STYLE:
            if method == "unconstrained-wrap":
                continue  # same weights as the quantized baseline
            ps, values = _series(rows, method, "sparsity", widths)
            if ps:
                colour, marker, style = _STYLE[method]
                ax.plot(ps, [100 * v for v in values], color=colour, marker=marker, linestyle=style,
                        label=_LABELS[method], ms=5)
        quantized = next(r for r in rows if r["method"] == "quantized")
        ax.axhline(100 * quantized["sparsity"], color="purple", lw=0.8, ls="-.", label=f"{entry['variant']} baseline")
        _p_axis(ax, widths)
        ax.set_ylabel("zero weights (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name} {entry['variant']}", fontsize=10)
    return _finish(plt, fig, axes, path, "Unstructured weight sparsity vs accumulator width")
