"""``a2q annotate``: record each layer's minimal accumulator in the model metadata (graph unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from a2q_passes.cli import app
from a2q_passes.cli.common import parse_input_dtypes
from a2q_passes.errors import A2QError
from a2q_passes.model_io import load_model, save_model
from a2q_passes.transforms import AnnotateAccumulators


@app.command()
def annotate(
    input_path: Annotated[Path, typer.Argument(metavar="IN.onnx")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.onnx")],
    input_dtype: Annotated[Optional[list[str]], typer.Option("--input-dtype", help="as for analyze")] = None,
    zero_point: Annotated[str, typer.Option("--zero-point", help="'fold' or 'subtract'")] = "fold",
    in_place: Annotated[bool, typer.Option("--in-place", help="allow OUT.onnx to be IN.onnx")] = False,
) -> None:
    """Write the exact accumulator width of every analysable layer to metadata_props (key a2q.accumulators)."""
    if output_path.resolve() == input_path.resolve() and not in_place:
        raise A2QError(f"{output_path}: output path equals the input path; pass --in-place to overwrite the input")
    model = load_model(input_path)
    annotation = AnnotateAccumulators(parse_input_dtypes(input_dtype), zero_point)
    annotated = model.transform(annotation)
    layers = annotation.result.details["layers"]
    if not layers:
        raise A2QError(f"{input_path}: no layer with quantized weights and a quantized input to annotate")
    save_model(annotated, output_path)
    for node, info in layers.items():
        typer.echo(f"{node}: {info['acc_dtype']} (range [{info['acc_min']}, {info['acc_max']}])")
    typer.echo(f"wrote {output_path}")
