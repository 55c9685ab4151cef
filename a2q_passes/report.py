"""Human-facing views of reports: rich tables and matplotlib plots (PNG, deterministic bytes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from rich.table import Table

from a2q_passes.analysis import ModelReport
from a2q_passes.layers import INPUT_RANGES_TITLE, KIND_WEIGHTS
from a2q_passes.output_files import atomic_write_bytes


def analysis_table(report: ModelReport) -> Table:
    tiled = any(r.tile is not None for r in report.layers)
    blocked = any(r.weight_block is not None for r in report.layers)
    table = Table(title=f"Accumulator widths per layer (bits; bias excluded; {INPUT_RANGES_TITLE[report.input_ranges]}"
                        + ("; block-wise weight scales: K = terms per block, each block its own accumulator" if blocked else "")
                        + ("; tile: every partial sum within a K-tile, outer: every running sum of tiles" if tiled else "")
                        + ")")
    stage_columns = ("tile", "tile range", "outer", "outer range") if tiled else ()
    for col in ("layer", "op", "K", "ch", "input", "weight", "datatype", "l1", "zero-c.", "exact", "acc range",
                *stage_columns, "status"):
        table.add_column(col, justify="right" if col in ("K", "ch", "datatype", "l1", "zero-c.", "exact", "tile", "outer")
                         else "left")
    for r in report.layers:
        b = r.bounds or {}
        stages = ((_cell(r.tile_bits), "-" if r.tile_range is None else str(r.tile_range),
                   _cell(r.outer_bits), "-" if r.outer_range is None else str(r.outer_range)) if tiled else ())
        table.add_row(
            r.node, r.op_type if r.kind == KIND_WEIGHTS else f"{r.op_type} ({r.kind})", str(r.K),
            str(r.channels) if r.kind == KIND_WEIGHTS else "per output",
            r.input_dtype or "-", r.weight_dtype or "-",
            _cell(b.get("datatype")), _cell(b.get("l1")) + ("" if r.kind == KIND_WEIGHTS or not b else " (=exact)"), _cell(b.get("zero_centered")), _cell(b.get("exact")),
            f"[{r.acc_min}, {r.acc_max}]" if r.acc_min is not None else "-", *stages, r.status,
        )
    return table


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as PNG atomically, without timestamps, so equal inputs give equal bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(Path(path), buf.getvalue())


def grouped_bar_plot(path: str | Path, labels: Sequence[str], series: dict[str, Sequence[float | None]],
                     title: str, ylabel: str, hline: float | None = None) -> None:
    """One group of bars per label, one bar per series (``None`` values, and all-``None`` series, are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: values for name, values in series.items() if any(v is not None for v in values)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.2))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width=width, label=name, color=plt.get_cmap("tab10")(i))
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=1, label=f"target {hline:g}")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_analysis(report: ModelReport, path: str | Path) -> None:
    """Per-layer accumulator width under each bound."""
    layers = [r for r in report.layers if r.status == "ok"]
    series = {
        "data-type bound": [r.bounds["datatype"] for r in layers],
        "A2Q l1 bound": [r.bounds["l1"] for r in layers],
        "zero-centred (A2Q+)": [r.bounds["zero_centered"] for r in layers],
        "exact range": [r.bounds["exact"] for r in layers],
    }
    grouped_bar_plot(path, [r.node for r in layers], series, "Minimal accumulator width per layer", "bits")
