"""``a2q annotate``: record each layer's minimal accumulator in the model metadata (graph unchanged but for the
``--input-dtype`` annotations the widths rest on)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import typer

from a2q_passes.cli import app
from a2q_passes.cli.common import (InputDtypeOption, InputRangesOption, check_input_dtype_tensors,
                                   check_input_ranges, check_zero_point, parse_input_dtypes)
from a2q_passes.conventions import INPUT_RANGES_TITLE
from a2q_passes.errors import A2QError


@app.command()
def annotate(
    input_path: Annotated[Path, typer.Argument(metavar="IN.onnx")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.onnx")],
    input_dtype: InputDtypeOption = None,
    zero_point: Annotated[str, typer.Option("--zero-point", help="'fold' (raw codes) or 'subtract' (code - zero point)")] = "fold",
    in_place: Annotated[bool, typer.Option("--in-place", help="allow OUT.onnx to be IN.onnx")] = False,
    input_ranges: InputRangesOption = "exact",
) -> None:
    """Write the exact accumulator width of every analysable layer to metadata_props (key a2q.accumulators)."""
    # imported here, not at start-up: the other commands (and --help) do not need onnx and qonnx
    from a2q_passes.model_io import has_external_data, read_model_proto, save_model, wrap_model
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.transforms.annotate import AnnotateAccumulators

    check_output_paths([("OUT.onnx", output_path)], inputs=[input_path], in_place=in_place, in_place_option="--in-place")
    input_dtypes = parse_input_dtypes(input_dtype)
    annotation = AnnotateAccumulators(input_dtypes, check_zero_point(zero_point), check_input_ranges(input_ranges))
    proto = read_model_proto(input_path)
    model = wrap_model(copy.deepcopy(proto), input_path)
    check_input_dtype_tensors(input_dtypes, model, input_path)
    # no qonnx cleanup: it renames shared parameters (GiveUniqueParameterTensors), i.e. changes the graph
    annotated = model.transform(annotation, cleanup=False)
    layers = annotation.result.details["layers"]
    if not layers:
        raise A2QError(f"{input_path}: no layer with quantized weights and a quantized input to annotate")
    # the file's own graph with the new metadata and the --input-dtype annotations (the pass changes no other
    # annotation): ModelWrapper also adds value_info for initializers
    del proto.metadata_props[:]
    proto.metadata_props.extend(annotated.model.metadata_props)
    del proto.graph.quantization_annotation[:]
    proto.graph.quantization_annotation.extend(annotated.graph.quantization_annotation)
    save_model(proto, output_path, keep_external=has_external_data(input_path))
    typer.echo(f"{INPUT_RANGES_TITLE[input_ranges]}:")
    for node, info in layers.items():
        typer.echo(f"{node}: {info['acc_dtype']} (range [{info['acc_min']}, {info['acc_max']}])")
    typer.echo(f"wrote {output_path}")
