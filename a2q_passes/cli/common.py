"""Option parsing shared by the commands."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from a2q_passes.conventions import INPUT_RANGES, ZERO_POINT_CONVENTIONS
from a2q_passes.errors import A2QError

if TYPE_CHECKING:  # numpy, onnx and qonnx are imported by the commands that read a model, not at start-up
    import numpy as np
    from qonnx.core.modelwrapper import ModelWrapper


_INPUT_DTYPE = re.compile(r"(BIPOLAR|BINARY|TERNARY|U?INT([1-9][0-9]?))")
MAX_INPUT_BITS = 64


def parse_input_dtypes(specs: list[str] | None) -> dict[str, str]:
    """``UINT8`` (every graph input) or ``TENSOR=UINT8`` (one tensor) -> ``{name or "*": dtype}``.

    Only qonnx's integer datatypes of 1 to 64 bits are accepted (qonnx's own parser also takes
    ``INT0``, ``INT-3`` or ``INT9999`` and raises on ``INT4X``).
    """
    from qonnx.core.datatype import DataType

    result: dict[str, str] = {}
    for spec in specs or []:
        name, _, dtype = spec.rpartition("=")
        dtype = dtype.strip().upper()
        match = _INPUT_DTYPE.fullmatch(dtype)
        if match is None or (match.group(2) is not None and int(match.group(2)) > MAX_INPUT_BITS):
            raise A2QError(f"--input-dtype {spec!r}: '{dtype}' is not an integer qonnx datatype of 1 to "
                           f"{MAX_INPUT_BITS} bits (e.g. UINT8, INT4, BIPOLAR)")
        result[name.strip() or "*"] = DataType[dtype].name
    return result


# the one definition of --input-dtype, shared by every command that reads layers
InputDtypeOption = Annotated[Optional[list[str]], typer.Option(
    "--input-dtype", help="datatype of a float input: UINT8 (all graph inputs) or TENSOR=UINT8; repeatable; a written "
                          "model carries it as that input's DataType (FINN's annotation)")]


def declare_input_dtypes(dtypes: dict[str, str], model: ModelWrapper, model_path: Path) -> None:
    """``--input-dtype`` of a command that hands the whole model to its passes: checked, then written on the model
    as each input's DataType, which every reader (and FINN) takes as that input's grid."""
    from a2q_passes.input_annotations import annotate_input_dtypes

    check_input_dtype_tensors(dtypes, model, model_path)
    annotate_input_dtypes(model, dtypes)


def check_input_dtype_tensors(dtypes: dict[str, str], model: ModelWrapper, model_path: Path) -> None:
    """Every ``TENSOR=`` of ``--input-dtype`` must name a tensor of the model (a typo would be ignored)."""
    tensors = {name for node in model.graph.node for name in (*node.input, *node.output)}
    tensors |= {vi.name for vi in model.graph.input}
    for name, dtype in dtypes.items():
        if name != "*" and name not in tensors:
            inputs = ", ".join(vi.name for vi in model.graph.input if model.get_initializer(vi.name) is None)
            raise A2QError(f"--input-dtype {name}={dtype}: {model_path} has no tensor '{name}' "
                           f"(graph inputs: {inputs}); name one of its tensors, or give just {dtype} for every input")


def read_data(path: Path, model: ModelWrapper) -> dict[str, np.ndarray]:
    """``--data``: the arrays of an ``.npz``, checked against the model's inputs (shape, NaN, samples)."""
    from a2q_passes.data_simulation import graph_feeds, load_inputs

    arrays = load_inputs(path, model)
    try:
        return graph_feeds(model, arrays)
    except A2QError as err:
        raise A2QError(f"{path}: {err}") from err


def check_zero_point(zero_point: str) -> str:
    """The ``--zero-point`` convention, refused before any work when it is not one a2q knows."""
    if zero_point not in ZERO_POINT_CONVENTIONS:
        raise A2QError(f"--zero-point must be one of {', '.join(ZERO_POINT_CONVENTIONS)}, got {zero_point!r}")
    return zero_point


INPUT_RANGES_HELP = (
    "input codes each layer is sized for: 'exact' (the codes the model's activation quantizers produce; "
    "plain QONNX/QDQ use) or 'finn' (the FINN DataType the input gets after ConvertQONNXtoFINN, e.g. a narrow "
    "signed 2-bit input [-1, 1] becomes INT2 = [-2, 1]; use it for models you will `a2q lower` or build with FINN)")
# the one definition of --input-ranges, shared by analyze/annotate/verify/project/finetune/allocate
InputRangesOption = Annotated[str, typer.Option("--input-ranges", help=INPUT_RANGES_HELP)]
AllowUnknownOpsOption = Annotated[bool, typer.Option(
    "--allow-unknown-ops", help="read a model with ops from unknown domains (refused by default): layers behind such "
                                "an op are reported as unquantized, since a2q cannot tell how it changes the grid")]


def check_input_ranges(input_ranges: str) -> str:
    """The ``--input-ranges`` choice, refused before any work when it is not one a2q knows."""
    if input_ranges not in INPUT_RANGES:
        raise A2QError(f"--input-ranges must be one of {', '.join(INPUT_RANGES)}, got {input_ranges!r}")
    return input_ranges


def parse_layer_widths(acc_bits: int | None, layer_specs: list[str] | None, widths_json: Path | None) -> tuple[int | None, dict[str, int]]:
    """The global width and per-layer overrides from ``--acc-bits``, ``--layer NAME=P`` and a JSON map."""
    overrides: dict[str, int] = {}
    if widths_json is not None:
        try:
            data = json.loads(Path(widths_json).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise A2QError(f"{widths_json}: cannot read the JSON width map ({err})") from err
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise A2QError(f"{widths_json}: expected a JSON object mapping layer names to integer widths")
        overrides.update(data)
    for spec in layer_specs or []:
        name, sep, bits = spec.rpartition("=")
        if not sep or not name or not bits.strip().isdigit():
            raise A2QError(f"--layer {spec!r}: expected NAME=BITS, e.g. --layer conv3=12")
        overrides[name] = int(bits)
    return acc_bits, overrides
