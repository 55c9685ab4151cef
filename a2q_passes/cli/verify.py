"""``a2q verify``: can any accumulator overflow at the given widths? Proof, worst-case and data simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from a2q_passes.cli import app
from a2q_passes.cli.common import (InputDtypeOption, AllowUnknownOpsOption, INPUT_RANGES_HELP, check_input_dtype_tensors,
                                   check_input_ranges, check_zero_point, parse_input_dtypes, parse_layer_widths,
                                   read_data)
from a2q_passes.cli.lower import comparison_inputs, equivalence_lines
from a2q_passes.conventions import INPUT_RANGES_TITLE, KIND_WEIGHTS
from a2q_passes.errors import A2QError, AnalysisProblem

# numpy, onnx, qonnx and the verifier are imported inside the functions: every `a2q` command imports
# this module to register `verify`, and they would add seconds to each start-up.
if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

    from a2q_passes.verification import LayerVerdict, VerificationReport


@app.command()
def verify(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="QONNX, FINN-ONNX or QDQ ONNX model")],
    acc_bits: Annotated[Optional[int], typer.Option("--acc-bits", help="accumulator width P for every layer")] = None,
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", help="NAME=P for one layer (repeatable); without --acc-bits only these layers are checked")] = None,
    widths_json: Annotated[Optional[Path], typer.Option("--widths-json", help="JSON object {layer: P}")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help=".npz with array 'x' (or one array per model input): simulate real inputs")] = None,
    mode: Annotated[str, typer.Option("--mode", help="accumulator on overflow: 'wrap' or 'saturate'")] = "wrap",
    tile: Annotated[Optional[int], typer.Option(
        "--tile", help="multi-stage accumulation: tiles of T terms, each in its own P-bit accumulator")] = None,
    outer_bits: Annotated[Optional[int], typer.Option(
        "--outer-bits", help="with --tile: width of the accumulator summing the tile results (default: P)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG: required width vs P per layer")] = None,
    input_dtype: InputDtypeOption = None,
    zero_point: Annotated[str, typer.Option(
        "--zero-point", help="activation and weight zero points: 'fold' (FINN, MAC sees raw codes) or "
                             "'subtract' (code - zero point, the ONNX definition of QLinear*/*Integer ops)")] = "fold",
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="leave layer NAME out of the check (repeatable): it is listed as skipped and the verdict does "
                       "not cover it, e.g. a layer project --skip left alone")] = None,
    allow_unknown_ops: AllowUnknownOpsOption = False,
    against: Annotated[Optional[Path], typer.Option(
        "--against", help="ORIGINAL.onnx: MODEL (its FINN lowering) must compute the same outputs on --data "
        "(default: 8 seeded inputs in the input quantizer's range); tolerance 1e-5 x max(1, max |output|)")] = None,
    input_ranges: Annotated[Optional[str], typer.Option(
        "--input-ranges", help=INPUT_RANGES_HELP + "; default: 'finn' when project/annotate/finetune recorded "
        "a layer sized for it, else 'exact'")] = None,
) -> None:
    """Prove per layer that no accumulator overflows at P bits (bias excluded), and simulate it.

    Without a width option, the widths recorded by `a2q annotate` / `a2q project` / `a2q finetune` are
    checked; a layer the record leaves out is checked at its own exact width (or the accDataType its node
    declares), marked "no target", and one that cannot be read fails. With --layer / --widths-json alone,
    only the named layers are checked.

    Exit 0: no overflow possible in any quantized layer (but those left out with --skip); 3: overflow possible
    or not proven. With --against, also exit 3 when the outputs differ (the stages that introduced it are listed);
    without widths given or recorded, --against checks equivalence only.
    """
    from a2q_passes.metadata import recorded_input_ranges, recorded_widths
    from a2q_passes.model_io import check_whole_model_fits, load_model
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.transforms.verify import VerifyAccumulators

    check_zero_point(zero_point)
    if input_ranges is not None:
        check_input_ranges(input_ranges)
    check_output_paths([("--plot", plot)], inputs=[model_path] + ([against] if against else []))
    input_dtypes = parse_input_dtypes(input_dtype)
    global_bits, overrides = parse_layer_widths(acc_bits, layer, widths_json)
    # the proof and the --data simulation stream the weights; comparing --against runs FINN's execution
    for path in [model_path, against] if against is not None else []:
        check_whole_model_fits(path, "`a2q verify --against` needs both models whole in one (the equivalence check "
                               "runs FINN's execution)", "Check without --against: the proof, the worst-case and "
                               "the --data simulation stream models of any size.")
    model = load_model(model_path, allow_unknown_ops, stream=against is None)
    check_input_dtype_tensors(input_dtypes, model, model_path)
    if input_ranges is None:
        input_ranges = recorded_input_ranges(model)
    widths = global_bits if global_bits is not None else (overrides or None)
    inputs = read_data(data, model) if data is not None else None
    equivalence = check_against(model, model_path, against, data) if against is not None else None
    if equivalence is not None and widths is None and not recorded_widths(model):
        # no width given or recorded: the equivalence is the whole check
        if as_json:
            typer.echo(json.dumps({"equivalence": equivalence}, indent=2))
        for line in [] if as_json else equivalence_lines(equivalence):
            Console(width=220).print(line, highlight=False)
        _fail_if_different(equivalence, model_path, against)
        return
    check = VerifyAccumulators(widths, mode, tile, inputs, overrides=overrides if global_bits is not None else None,
                               input_dtypes=input_dtypes, zero_point=zero_point, input_ranges=input_ranges,
                               outer_bits=outer_bits, skip=frozenset(skip or ()))
    model.transform(check, cleanup=False)
    report = check.report
    if as_json:
        typer.echo(json.dumps({**report.to_json(), **({"equivalence": equivalence} if equivalence else {})}, indent=2))
    else:
        console = Console(width=220)
        console.print(verification_table(report))
        for line in summary_lines(report) + (equivalence_lines(equivalence) if equivalence else []):
            console.print(line, highlight=False)
    if plot is not None:
        plot_verification(report, plot)
    if equivalence is not None:
        _fail_if_different(equivalence, model_path, against)
    if not report.overflow_impossible:
        blocking = report.blocking
        raise AnalysisProblem(f"{model_path}: " + (
            f"overflow possible or not proven in {len(blocking)} layer(s): {', '.join(v.node for v in blocking)}"
            if blocking else "no quantized MAC layer was checked"))


def check_against(model: ModelWrapper, model_path: Path, original_path: Path, data: Optional[Path]) -> dict:
    """Equivalence of ``model`` (a FINN lowering) with the QONNX model at ``original_path``."""
    import numpy as np

    from a2q_passes.model_io import load_model
    from a2q_passes.finn_execution import check_equivalence

    original = load_model(original_path, stream=False)
    for path, graph in ((original_path, original), (model_path, model)):
        for name, shape in _input_shapes(graph).items():
            if shape[0] < 1:  # qonnx's execute_onnx compares the feed with the declared shape
                raise A2QError(f"--against: {path}: input '{name}' has a dynamic batch dimension {shape}; the "
                               "equivalence check executes with qonnx, which needs a fixed one. Fix it first, e.g. "
                               "`python -m onnxruntime.tools.make_dynamic_shape_fixed --input_name "
                               f"{name} --input_shape 1,{','.join(map(str, shape[1:]))} IN.onnx OUT.onnx`")
    ours, theirs = ([int(np.prod(s[1:])) for s in _input_shapes(g).values()] for g in (model, original))
    if ours != theirs:  # sizes, not shapes: FINN may have turned an NCHW input into NHWC
        raise A2QError(f"--against {original_path}: its inputs (values per sample: {theirs}) are not those of "
                       f"{model_path} (values per sample: {ours}); give the QONNX model it was lowered from")
    return check_equivalence(original, model, comparison_inputs(original, data, samples=8, seed=0))


def _input_shapes(model: ModelWrapper) -> dict[str, list[int]]:
    return {vi.name: model.get_tensor_shape(vi.name) for vi in model.graph.input if model.get_initializer(vi.name) is None}


def _fail_if_different(equivalence: dict, model_path: Path, against: Path) -> None:
    if not equivalence["within_tolerance"]:
        raise AnalysisProblem(f"{model_path} does not compute what {against} computes: max difference "
                              f"{equivalence['max_abs_diff']:.3g} > tolerance {equivalence['tolerance']:.3g}")


def _needs(v: LayerVerdict) -> str:
    if v.required_bits is None:
        return "-"
    needs = f"{'INT' if v.signed else 'UINT'}{v.required_bits}"
    return needs if v.outer_required_bits is None else f"{needs}/{v.outer_required_bits}"


def _worst_case(v: LayerVerdict) -> str:
    if v.adversarial_cases is None:
        return "-"
    text = f"{v.adversarial_overflows}/{v.adversarial_cases} wrong"
    if v.adversarial_register_overflows != v.adversarial_overflows:
        text += f", {v.adversarial_register_overflows} reg. overflow"
    return text


def _data(v: LayerVerdict) -> str:
    if v.data_accumulations is None:
        return "not simulated" if v.data_note else "-"
    return f"{v.data_overflows}/{v.data_accumulations}"


def _stage_pair(inner: int | None, outer: int | None, fmt: str) -> str:
    """One width or margin, or ``inner/outer`` for a tiled datapath whose outer stage has its own width."""
    if inner is None:
        return "-"
    return fmt.format(inner) if outer is None else f"{fmt.format(inner)}/{fmt.format(outer)}"


def verification_table(report: VerificationReport) -> Table:
    from a2q_passes.verification import PROOF_FAIL, PROOF_PASS

    proof_style = {PROOF_PASS: "green", PROOF_FAIL: "bold red"}
    tile = f", tiles of {report.tile}" if report.tile else ""
    table = Table(title=f"Accumulator overflow check ({report.mode}{tile}; widths: {report.width_source}; P and margin "
                        "as inner/outer where the sum of tiles has its own width; "
                        f"{INPUT_RANGES_TITLE[report.input_ranges]}; bias excluded)")
    for col in ("layer", "op", "K", "register range", "needs", "P", "margin", "proof", "worst-case sim.",
                "data overflows", "note"):
        table.add_column(col, justify="right" if col in ("K", "P", "margin") else "left")
    for v in report.layers:
        style = proof_style.get(v.proof, "yellow")
        table.add_row(
            v.node, v.op_type if v.kind == KIND_WEIGHTS else f"{v.op_type} ({v.kind})", str(v.K),
            f"[{v.acc_min}, {v.acc_max}]" if v.acc_min is not None else "-", _needs(v),
            _stage_pair(v.acc_bits, v.outer_bits, "{}"), _stage_pair(v.margin, v.outer_margin, "{:+d}"),
            f"[{style}]{v.proof}[/]", _worst_case(v), _data(v),
            "; ".join(filter(None, [v.width_note, f"tiles of {v.tile}" if v.tile and not report.tile else "",
                                    v.reason, v.data_note])),
        )
    return table


def summary_lines(report: VerificationReport) -> list[str]:
    from a2q_passes.verification import PROOF_SKIPPED

    lines = []
    sim = report.simulation
    if sim is not None:
        samples = next(iter(sim.outputs.values())).shape[0]
        changed = sim.changed_predictions()
        lines.append(f"data: {samples} samples; max |output - exact-accumulation output| = {sim.max_abs_deviation():.6g}"
                     + (f"; changed argmax predictions: {100 * changed:.2f}%" if changed is not None else ""))
    untargeted = [v for v in report.layers if v.width_note]
    if untargeted:
        lines.append(f"{len(untargeted)} layer(s) without a recorded width, checked at the width they hold without a "
                     "target: " + ", ".join(f"{v.node} (P={v.acc_bits}, {v.width_note})" for v in untargeted))
    skipped = [v.node for v in report.layers if v.proof == PROOF_SKIPPED]
    if skipped:
        lines.append(f"{len(skipped)} layer(s) left out with --skip, not covered by the verdict: {', '.join(skipped)}")
    if report.overflow_impossible:
        lines.append("[bold green]verdict: no overflow possible[/] in any checked layer at these widths")
    else:
        names = ", ".join(f"{v.node} ({v.proof})" for v in report.blocking) or "no layer was checked"
        lines.append(f"[bold red]verdict: overflow possible or not proven[/]: {names}")
    return lines


def plot_verification(report: VerificationReport, path: Path) -> None:
    from a2q_passes.report import grouped_bar_plot

    checked = [v for v in report.layers if v.required_bits is not None]
    series = {"required width": [v.required_bits for v in checked], "given P": [v.acc_bits for v in checked]}
    grouped_bar_plot(path, [v.node for v in checked], series, f"Accumulator widths ({report.mode})", "bits")
