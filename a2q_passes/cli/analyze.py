"""``a2q analyze``: minimal accumulator width of every MAC layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from a2q_passes.cli import app, err_console
from a2q_passes.cli.common import (InputDtypeOption, AllowUnknownOpsOption, InputRangesOption, check_input_dtype_tensors,
                                   check_input_ranges, check_zero_point, parse_input_dtypes)
from a2q_passes.errors import A2QError, AnalysisProblem


@app.command()
def analyze(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="QONNX, FINN-ONNX or QDQ ONNX model")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with a 'layers' list")] = False,
    input_dtype: InputDtypeOption = None,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="also report every output channel")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG of per-layer widths per bound")] = None,
    zero_point: Annotated[str, typer.Option(
        "--zero-point", help="activation and weight zero points: 'fold' (FINN, MAC sees raw codes) or "
                             "'subtract' (code - zero point, the ONNX definition of QLinear*/*Integer ops)")] = "fold",
    allow_unknown_ops: AllowUnknownOpsOption = False,
    input_ranges: InputRangesOption = "exact",
    tile: Annotated[Optional[int], typer.Option(
        "--tile", help="also report a multi-stage datapath: each K-tile of T terms, and the sum of tiles")] = None,
) -> None:
    """Report the minimal accumulator width per layer under the data-type, l1 and exact-range bounds."""
    # imported here, not at start-up: the other commands (and --help) do not need onnx and qonnx
    from rich.console import Console

    from a2q_passes.model_io import load_model
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.report import analysis_table, plot_analysis
    from a2q_passes.transforms.analyze import AnalyzeAccumulators

    check_output_paths([("--plot", plot)], inputs=[model_path])
    if tile is not None and tile < 1:
        raise A2QError(f"--tile must be a positive number of terms, got {tile}")
    input_dtypes = parse_input_dtypes(input_dtype)
    analysis = AnalyzeAccumulators(input_dtypes, check_zero_point(zero_point), per_channel,
                                   check_input_ranges(input_ranges), tile)
    model = load_model(model_path, allow_unknown_ops)
    check_input_dtype_tensors(input_dtypes, model, model_path)
    model.transform(analysis, cleanup=False)  # qonnx's cleanup is not needed to read a model
    report = analysis.report
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        Console(width=200).print(analysis_table(report))
    if plot is not None:
        plot_analysis(report, plot)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    problems = [r for r in report.layers if r.status.startswith("unsupported")]
    if problems or not any(r.status != "weights not quantized" for r in report.layers):
        raise AnalysisProblem(f"{model_path}: " + (
            f"{len(problems)} layer(s) could not be analysed (see warnings)" if problems
            else "no quantized MAC layer to analyse"))
