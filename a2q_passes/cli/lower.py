"""``a2q lower`` (QONNX -> FINN HW graph with guaranteed accumulators) and ``a2q report`` (FPGA resources)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from a2q_passes.cli import app, err_console
from a2q_passes.cli.common import InputDtypeOption, declare_input_dtypes, parse_input_dtypes, read_data
from a2q_passes.conventions import INPUT_RANGES_TITLE
from a2q_passes.errors import A2QError, AnalysisProblem

# numpy, onnx, qonnx and the FINN flow are imported inside the functions: every `a2q` command
# imports this module to register `lower` and `report`, and they would add seconds to each start-up.
if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

    from a2q_passes.finn_execution import Inputs

    from a2q_passes.hw_accumulators import HWLayer

# Why lower and report refuse models over 2 GiB, and what to do instead
FINN_NEEDS_WHOLE = "FINN's transformations read, copy and serialise the whole model"
FINN_ADVICE = ("Lower the model in parts under 2 GiB (e.g. cut it with `onnx.utils.extract_model`); `a2q analyze`, "
               "`annotate`, `project` and `verify` stream models of any size.")
ACC_BITS_HELP = "one target accumulator width P for every MVAU/VVAU (default: the widths `a2q project` recorded)"
FROM_ANNOTATIONS_HELP = "use the widths recorded by `a2q project`/`a2q annotate`; error if there are none"


def comparison_inputs(model: ModelWrapper, data: Path | None, samples: int, seed: int) -> Inputs:
    """The ``--data`` arrays (one per data input, in graph order), else :func:`equivalence_inputs`."""
    from a2q_passes.finn_execution import equivalence_inputs, input_arrays

    if data is None:
        return equivalence_inputs(model, samples, seed)
    return input_arrays(list(read_data(data, model).values()))


def layers_table(layers: list[HWLayer]) -> Table:
    table = Table(title="FINN MVAU/VVAU accumulators (ours vs FINN's MinimizeAccumulatorWidth; "
                        f"{INPUT_RANGES_TITLE['finn']}: each node's inputDataType)")
    for col in ("node", "QONNX layer", "MW x MH", "exact range", "target P", "accDataType", "FINN picks"):
        table.add_column(col, justify="right" if col in ("target P",) else "left")
    for layer in layers:
        shape = f"{layer.K} x {layer.channels}" + (" (kernel x ch)" if layer.op_type.startswith("VVAU") else "")
        table.add_row(f"{layer.node} ({layer.op_type})", layer.qonnx_node or "-", shape,
                      f"[{layer.acc_min}, {layer.acc_max}]", "-" if layer.target_bits is None else str(layer.target_bits),
                      layer.acc_dtype, layer.finn_acc_dtype)
    return table


def equivalence_lines(result: dict[str, Any]) -> list[str]:
    """The end-to-end difference and, when it exceeds the tolerance, the stages that introduced it."""
    verdict = "[green]equivalent[/]" if result["within_tolerance"] else "[bold red]NOT equivalent[/]"
    lines = [f"equivalence ({result['samples']} samples): max |QONNX - FINN| = {result['max_abs_diff']:.3g} "
             f"(tolerance {result['tolerance']:.3g}): {verdict}"
             + (f"; top-1 agreement {100 * result['top1_agreement']:.1f}%" if "top1_agreement" in result else "")]
    if result.get("explained_by_tie_rounding"):
        lines.append("  all of it is FINN's rounding of exact ties: its thresholds round a value halfway between two "
                     "codes up, where the QONNX Quant nodes (ROUND) round it to even; with the activation quantizers "
                     "rounding ties up the outputs agree (max |diff| "
                     f"{result['ties_rounded_up_max_abs_diff']:.3g}). Power-of-two scales (or a pool averaging onto "
                     "its input's own scale) make such ties exact; the accumulators are not involved")
    for row in result.get("introduced_by", []):
        lines.append(f"  introduced by {row['stage']}: max |diff| {row['max_abs_diff']:.3g}; "
                     f"removed {row['nodes_removed'][:4]}, added {row['nodes_added'][:4]}")
    return lines


def _print_lowering_notes(details: dict[str, Any]) -> None:
    for node in details["lowering"]["unlowered"]:
        style = "[yellow]not lowered:[/]" if node["blocking"] else "host-side:"
        err_console.print(f"{style} {node['name']} ({node['op_type']}): {node['reason']}", highlight=False, soft_wrap=True)
    for name in details["unmapped"]:
        err_console.print(f"[yellow]warning:[/] recorded layer {name} has no MVAU/VVAU in the lowered graph; its "
                          "width was not applied", highlight=False, soft_wrap=True)


def _cast_float64(model: ModelWrapper, path: Path) -> None:
    """Cast float64 initializers to float32 (what FINN computes in), and say which and by how much."""
    from a2q_passes.model_io import cast_float64_initializers

    cast = cast_float64_initializers(model, str(path))
    if cast:
        worst = max(change for _, change in cast)
        names = ", ".join(name for name, _ in cast[:6]) + (f" (+{len(cast) - 6} more)" if len(cast) > 6 else "")
        err_console.print(f"note: {path}: {len(cast)} float64 initializer(s) stored as float32 ({names}; max relative "
                          f"change {worst:.2g}); the lowered graph and the equivalence check use these values",
                          highlight=False, soft_wrap=True)


def _one_sample_batch(model: ModelWrapper, path: Path) -> None:
    """Give a dynamic batch dimension the size 1 FINN's layers process, and say so.

    Why: FINN's graph has a fixed batch of one sample; left dynamic, shape inference gives the batch as 0 and the
    equivalence check cannot feed the graph. Only the graph's inputs and outputs carry it; intermediate shapes are
    inferred again.
    """
    from a2q_passes.model_io import data_inputs

    dynamic = [info.name for info in data_inputs(model.graph)
               if info.type.tensor_type.shape.dim and not info.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if not dynamic:
        return
    for info in [*data_inputs(model.graph), *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    err_console.print(f"note: {path}: the batch dimension of {', '.join(map(repr, dynamic))} is dynamic; lowered with "
                      "batch 1 (FINN's layers process one sample at a time)", highlight=False, soft_wrap=True)


@app.command()
def lower(
    input_path: Annotated[Path, typer.Argument(metavar="IN.onnx", help="QONNX model (e.g. the output of `a2q project`)")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.onnx", help="FINN HW graph (MVAU/VVAU/...)")],
    acc_bits: Annotated[Optional[int], typer.Option("--acc-bits", help=ACC_BITS_HELP)] = None,
    from_annotations: Annotated[bool, typer.Option("--from-annotations", help=FROM_ANNOTATIONS_HELP)] = False,
    fpgapart: Annotated[Optional[str], typer.Option(
        "--fpgapart", help="FPGA part or board name: add FINN's resource estimates at INT32 vs these widths")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="a layer FINN cannot lower is an error (exit 1)")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help=(
        ".npz inputs for the equivalence check (one array per graph input, named as the input, where the model has "
        "several)"))] = None,
    samples: Annotated[int, typer.Option("--samples", help="random inputs for the check when --data is absent")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="seed of those random inputs")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    report_json: Annotated[Optional[Path], typer.Option("--report-json", help="also write that JSON to a file")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG of resources vs INT32 (needs --fpgapart)")] = None,
    input_dtype: InputDtypeOption = None,
) -> None:
    """Lower to FINN HW layers; every MVAU/VVAU accDataType holds its exact range and is <= its target P.

    The output is the non-specialised HW graph (executes in numpy; FINN's build continues from it
    with step_specialize_layers). Equivalence with IN.onnx is checked on --data or on --samples
    random inputs inside each input quantizer's range; tolerance 1e-5 x max(1, max |output|).

    A model with 1-D convolutions goes through FINN's own 1-D step (qonnx's Change3DTo4DTensors):
    OUT.onnx takes and gives [N, C, L, 1] where IN.onnx has [N, C, L].

    Exit 0: written and equivalent; 3: written, but a layer was not lowered or the outputs differ;
    1: bad input, nothing written.
    """
    from a2q_passes.finn_runtime import validate_fpgapart
    from a2q_passes.model_io import check_whole_model_fits, has_external_data, load_model, save_model
    from a2q_passes.output_files import atomic_write_text, check_output_paths
    from a2q_passes.resources import plot_resources, render_table, resource_report
    from a2q_passes.finn_execution import check_equivalence
    from a2q_passes.transforms.lower import LowerToFINN

    if plot is not None and fpgapart is None:
        raise A2QError("--plot draws the resource report: give --fpgapart too")
    if data is None and samples < 1:
        raise A2QError(f"--samples must be at least 1 (the equivalence check needs inputs), got {samples}")
    check_output_paths([("OUT.onnx", output_path), ("--report-json", report_json), ("--plot", plot)],
                       inputs=[input_path] + ([data] if data is not None else []))
    part = validate_fpgapart(fpgapart) if fpgapart is not None else None
    input_dtypes = parse_input_dtypes(input_dtype)
    check_whole_model_fits(input_path, f"`a2q lower` needs it in one: {FINN_NEEDS_WHOLE}", FINN_ADVICE)
    model = load_model(input_path, stream=False)  # FINN's transformations read every initializer
    declare_input_dtypes(input_dtypes, model, input_path)
    _cast_float64(model, input_path)
    _one_sample_batch(model, input_path)
    inputs = comparison_inputs(model, data, samples, seed)
    lowering = LowerToFINN(acc_bits, from_annotations, strict)
    hw = model.transform(lowering, cleanup=False)  # the flow runs FINN's own cleanups itself
    details = lowering.result.details
    equivalence = check_equivalence(model, hw, inputs)
    resources = resource_report(hw, part) if part is not None else None
    save_model(hw, output_path, keep_external=has_external_data(input_path))
    payload = {"input": str(input_path), "output": str(output_path), **details,
               "equivalence": equivalence, "resources": resources}
    if report_json is not None:
        atomic_write_text(report_json, json.dumps(payload, indent=2))
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        console = Console(width=200)
        console.print(layers_table(lowering.layers))
        for line in equivalence_lines(equivalence):
            console.print(line, highlight=False)
        if resources is not None:
            console.print(render_table(resources))
        console.print(f"wrote {output_path} (accumulator targets: {details['targets']})", highlight=False)
    _print_lowering_notes(details)
    if plot is not None:
        plot_resources(resources, plot)
    problems = [f"{len(lowering.lowering.blocking)} node(s) not lowered"] if lowering.lowering.blocking else []
    problems += [f"recorded layer(s) not mapped: {', '.join(details['unmapped'])}"] if details["unmapped"] else []
    problems += [] if equivalence["within_tolerance"] else [
        f"outputs differ by {equivalence['max_abs_diff']:.3g} (tolerance {equivalence['tolerance']:.3g})"
        + (", all of it from FINN rounding exact ties up (see above)" if equivalence.get("explained_by_tie_rounding")
           else "")]
    if problems:
        raise AnalysisProblem(f"{input_path}: written to {output_path}, but " + "; ".join(problems))


@app.command()
def report(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="FINN HW graph, or a QONNX model (lowered first)")],
    fpgapart: Annotated[str, typer.Option("--fpgapart", help="FPGA part or board name, e.g. xczu3eg-sbva484-1-e")],
    acc_bits: Annotated[Optional[int], typer.Option("--acc-bits", help=ACC_BITS_HELP)] = None,
    from_annotations: Annotated[bool, typer.Option("--from-annotations", help=FROM_ANNOTATIONS_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG: per layer, resources at P / at INT32")] = None,
) -> None:
    """FINN resource estimates per MVAU/VVAU at INT32 and at the guaranteed accumulator widths.

    A HW graph is reported at the minimal type holding each node's exact accumulator range
    (what `a2q lower` sets; with --acc-bits each must fit P). A QONNX model is lowered first, as
    `a2q lower` does. Per node: FINN's LUT/BRAM18/URAM/DSP estimates (MVAU_hls/VVAU_hls) and the
    accumulator-dependent bits FINN's models do not show (registers, thresholds, comparators).
    """
    from a2q_passes.finn_accumulators import iterate_mac_nodes, set_accumulator_datatypes
    from a2q_passes.finn_runtime import validate_fpgapart
    from a2q_passes.model_io import check_whole_model_fits, load_model
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.resources import plot_resources, render_table, resource_report
    from a2q_passes.transforms.lower import LowerToFINN

    check_output_paths([("--plot", plot)], inputs=[model_path])
    part = validate_fpgapart(fpgapart)
    check_whole_model_fits(model_path, f"`a2q report` needs it in one: {FINN_NEEDS_WHOLE}", FINN_ADVICE)
    model = load_model(model_path, stream=False)  # FINN's transformations read every initializer
    _cast_float64(model, model_path)
    _one_sample_batch(model, model_path)
    if any(True for _ in iterate_mac_nodes(model)):
        if from_annotations:
            raise A2QError(f"{model_path} is already a FINN HW graph; --from-annotations applies to QONNX models")
        hw = set_accumulator_datatypes(model, target_bits=acc_bits)
    else:
        hw = model.transform(LowerToFINN(acc_bits, from_annotations), cleanup=False)
    resources = resource_report(hw, part)
    if as_json:
        typer.echo(json.dumps(resources, indent=2))
    else:
        console = Console(width=200)
        console.print(render_table(resources))
        ratio = resources["ratio_int32_over_target"]
        console.print(f"INT32 / guaranteed widths: LUT {ratio['LUT']}x, BRAM18 {ratio['BRAM18']}x, "
                      f"threshold storage {ratio['threshold_storage_bits']}x, accumulator-dependent bits "
                      f"{ratio['accumulator_dependent_bits']}x", highlight=False)
    if plot is not None:
        plot_resources(resources, plot)

