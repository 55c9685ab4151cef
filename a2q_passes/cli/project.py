"""``a2q project``: make every layer fit a chosen accumulator width (A2Q-constrained projection)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from a2q_passes.cli import app
from a2q_passes.cli.common import (InputDtypeOption, InputRangesOption, check_input_dtype_tensors,
                                   check_input_ranges, check_zero_point, parse_input_dtypes, parse_layer_widths)
from a2q_passes.conventions import DEFAULT_METHOD, INPUT_RANGES_TITLE
from a2q_passes.errors import A2QError

if TYPE_CHECKING:
    from a2q_passes.transforms.project import LayerProjection


def projection_table(projections: list[LayerProjection], method: str, input_ranges: str = "exact") -> Table:
    tiled = any(p.tile is not None for p in projections)
    table = Table(title=f"Projection ({method}; {INPUT_RANGES_TITLE[input_ranges]}): accumulator bits per layer"
                        + ("; target and after: each K-tile, outer: the sum of tiles" if tiled else ""))
    for col in ("layer", "op", "target", "before", "after", *(("tile", "outer", "outer after") if tiled else ()),
                "acc type", "rel. L2 change", "sparsity before", "sparsity after", "channels touched", "rows by method",
                "status"):
        table.add_column(col)
    for p in projections:
        stages = (p.tile, p.outer_bits, p.outer_width_after) if tiled else ()
        table.add_row(p.node, p.op_type, *("-" if v is None else str(v)
                                           for v in (p.target_bits, p.width_before, p.width_after, *stages)),
                      p.acc_dtype_after or "-", f"{p.rel_l2_change:.4f}",
                      "-" if p.sparsity_before is None else f"{p.sparsity_before:.3f}",
                      "-" if p.sparsity_after is None else f"{p.sparsity_after:.3f}",
                      f"{p.channels_touched}/{p.channels}",
                      " ".join(f"{m}:{n}" for m, n in p.rows_by_method.items()) or "-", p.status)
    return table


def _list_methods() -> None:
    from a2q_passes.methods import available_methods, get_method

    for name in available_methods():
        marker = " (default)" if name == DEFAULT_METHOD else ""
        typer.echo(f"{name}{marker}: {get_method(name).description}")


@app.command()
def project(
    input_path: Annotated[Optional[Path], typer.Argument(metavar="IN.onnx")] = None,
    output_path: Annotated[Optional[Path], typer.Argument(metavar="OUT.onnx")] = None,
    acc_bits: Annotated[Optional[int], typer.Option("--acc-bits", help="target accumulator width P for every layer")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="per-layer width NAME=P (node name); repeatable")] = None,
    widths_json: Annotated[Optional[Path], typer.Option("--widths-json", help="JSON map {layer: P}")] = None,
    method: Annotated[str, typer.Option("--method", help="projection method (see --list-methods)")] = DEFAULT_METHOD,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list projection methods and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-layer report as JSON")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG of widths before/after per layer")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="allow OUT.onnx to be IN.onnx")] = False,
    input_dtype: InputDtypeOption = None,
    zero_point: Annotated[str, typer.Option("--zero-point", help="'fold' (raw codes) or 'subtract' (code - zero point; "
                                                              "needed to project weights with a zero point)")] = "fold",
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="leave layer NAME unconstrained (repeatable); needed for quantized layers project cannot read")] = None,
    input_ranges: InputRangesOption = "exact",
    tile: Annotated[Optional[int], typer.Option(
        "--tile", help="multi-stage datapath: each K-tile of T terms (verify --tile's tiling) fits --acc-bits")] = None,
    outer_bits: Annotated[Optional[int], typer.Option(
        "--outer-bits", help="with --tile: width of the accumulator summing the tiles (default: the exact width "
                             "of the projected tiles' sum, reported and recorded)")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="threads projecting a large layer's row blocks at once (default: one per CPU core, "
                          "at most 8); "
                          "the output is the same for any count")] = None,
) -> None:
    """Rewrite weights so every layer's exact accumulator range fits P bits; write nothing unless all fit.

    With --tile T, each run of T consecutive terms of every accumulation fits P (--acc-bits) and their sum
    fits --outer-bits; both widths and the tile are recorded, so `a2q verify OUT` checks both stages.
    """
    if list_methods:
        _list_methods()
        return
    # imported here, not at start-up: the other commands (and --help) do not need onnx and qonnx
    from a2q_passes.model_io import has_external_data, load_model, save_model
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.report import grouped_bar_plot
    from a2q_passes.transforms.project import ProjectToAccumulator, projection_summary

    if input_path is None or output_path is None:
        raise A2QError("usage: a2q project IN.onnx OUT.onnx --acc-bits P (or --list-methods)")
    check_output_paths([("OUT.onnx", output_path), ("--plot", plot)], inputs=[input_path], in_place=in_place,
                       in_place_option="--in-place")
    global_bits, overrides = parse_layer_widths(acc_bits, layer, widths_json)
    input_dtypes = parse_input_dtypes(input_dtype)
    projection = ProjectToAccumulator(global_bits, overrides, method, input_dtypes, check_zero_point(zero_point), skip,
                                      check_input_ranges(input_ranges), tile, outer_bits, threads)
    model = load_model(input_path)
    check_input_dtype_tensors(input_dtypes, model, input_path)
    # no qonnx cleanup: it gives shared parameters new random names (GiveUniqueParameterTensors)
    projected = model.transform(projection, cleanup=False)
    save_model(projected, output_path, keep_external=has_external_data(input_path))
    projections = projection.projections
    if as_json:
        payload = {"method": projection.method.name, "input_ranges": input_ranges, "output": str(output_path),
                   "summary": projection_summary(projections), "layers": [asdict(p) for p in projections]}
        typer.echo(json.dumps(payload, indent=2))
    else:
        Console(width=200).print(projection_table(projections, projection.method.name, input_ranges))
        typer.echo(f"wrote {output_path}")
    if plot is not None:
        grouped_bar_plot(plot, [p.node for p in projections],
                         {"exact width before": [p.width_before for p in projections],
                          "exact width after": [p.width_after for p in projections]},
                         f"Accumulator width before/after projection ({projection.method.name})", "bits",
                         hline=global_bits)
