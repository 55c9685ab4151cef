"""``a2q allocate``: choose an accumulator width per layer; writes the ``--widths-json`` map ``project`` reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from a2q_passes.cli import app
from a2q_passes.cli.common import (InputDtypeOption, InputRangesOption, check_input_ranges, declare_input_dtypes,
                                   parse_input_dtypes)
from a2q_passes.conventions import DEFAULT_METHOD, INPUT_RANGES_TITLE
from a2q_passes.errors import A2QError

# torch, FINN and the model readers are imported inside the command: every `a2q` command imports
# this module to register `allocate`, and they would add seconds to each start-up.


def _check_output(path: Path, model_path: Path) -> None:
    if path.resolve() == model_path.resolve():
        raise A2QError(f"{path}: the output path equals the model path; write the width map elsewhere")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise A2QError(f"{path}: output folder '{folder}' does not exist or is not writable")


def _objective(min_score_pct: float | None, budget_bits: int | None, budget_lut: int | None,
               cost: str | None) -> tuple[float | None, int | None, str]:
    given = [name for name, value in (("--min-score-pct", min_score_pct), ("--budget-bits", budget_bits),
                                      ("--budget-lut", budget_lut)) if value is not None]
    if len(given) != 1:
        raise A2QError(f"give exactly one of --min-score-pct, --budget-bits, --budget-lut (got {', '.join(given) or 'none'})")
    if budget_bits is not None or budget_lut is not None:
        # a bit budget counts with either cost model in bits: with thresholds (FINN) or registers only
        allowed = ("bits", "acc-bits") if budget_bits is not None else ("finn-lut",)
        if cost is not None and cost not in allowed:
            raise A2QError(f"{given[0]} counts cost with the {' or '.join(map(repr, allowed))} cost model; "
                           f"drop --cost {cost}")
        return None, budget_bits if budget_bits is not None else budget_lut, cost or allowed[0]
    return min_score_pct, None, cost or "bits"


def allocation_table(details: dict[str, Any]) -> Table:
    table = Table(title=f"Accumulator allocation ({details['cost_model']} cost; "
                        f"{INPUT_RANGES_TITLE[details['input_ranges']]}; scores: {details['metric']} on the "
                        "calibration data with only that layer narrowed)")
    for col in ("layer", "exact", "chosen", "smallest feasible", "MH", "PE", "out bits", "cost exact", "cost chosen",
                "score at chosen"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer in details["layers"]:
        chosen = details["widths"][layer["node"]]
        shape = layer["shape"]
        table.add_row(layer["node"], str(layer["exact_bits"]), str(chosen), str(layer["min_feasible_bits"]),
                      str(shape["channels"]), str(shape["pe"]), str(shape["output_bits"] or "-"),
                      str(layer["costs"][str(layer["exact_bits"])]), str(layer["costs"][str(chosen)]),
                      f"{layer['scores'][str(chosen)]:.2f}")
    return table


def summary_lines(details: dict[str, Any]) -> list[str]:
    unit = details["metric"]
    saving = 1.0 - details["cost"] / details["cost_exact_widths"] if details["cost_exact_widths"] else 0.0
    lines = [f"model score: {details['base_val_score']:.3f} {unit} (validation), {details['base_score']:.3f} (calibration)",
             f"allocation: {details['val_score']:.3f} {unit} = {details['score_pct']:.2f}% of the model's own score "
             f"(validation, end to end, method {details['method']})",
             f"cost ({details['cost_model']}): {details['cost']} vs {details['cost_exact_widths']} at the exact widths "
             f"({100 * saving:.1f}% less); accumulator + threshold bits: {details['acc_threshold_bits']}"]
    if details["target_val_score"] is not None:
        lines.append(f"target {details['objective']['min_score_pct']}%: {details['target_val_score']:.3f} {unit}; "
                     f"met: {details['meets_target']}")
    return lines


def draw_pareto(ax: Any, curves: dict[str, Any], title: str, chosen: dict[str, Any] | None = None,
                target: float | None = None) -> None:
    """Score vs accumulator + threshold bits on ``ax``: uniform P (labelled) against the evaluated knapsack front."""
    uniform = curves["uniform"]
    ax.plot([u["acc_threshold_bits"] for u in uniform], [u["score"] for u in uniform], "o-", label="uniform P",
            color="tab:blue")
    for u in uniform:
        ax.annotate(str(u["P"]), (u["acc_threshold_bits"], u["score"]), textcoords="offset points", xytext=(3, 3),
                    fontsize=7)
    front = sorted(curves["allocation"], key=lambda a: a["acc_threshold_bits"])
    ax.plot([a["acc_threshold_bits"] for a in front], [a["score"] for a in front], "s--",
            label="per-layer allocation (knapsack front)", color="tab:orange")
    if chosen is not None:
        ax.plot([chosen["acc_threshold_bits"]], [chosen["score"]], "*", markersize=14, color="tab:red",
                label="chosen allocation")
    if target is not None:
        ax.axhline(target, color="black", linestyle=":", linewidth=1, label="target score")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))  # five-digit bit counts collide at the default density
    from a2q_passes.allocation import get_cost_model, needs_finn

    # without FINN's lowering (acc-bits) no layer has thresholds: the same count is registers only
    ax.set_xlabel("accumulator + threshold bits" if needs_finn(get_cost_model(curves["cost_model"]))
                  else "accumulator register bits")
    ax.set_ylabel(curves["metric"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot_pareto(curves: dict[str, Any], path: Path, title: str, chosen: dict[str, Any] | None = None,
                target: float | None = None) -> None:
    """PNG of :func:`draw_pareto`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from a2q_passes.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_pareto(ax, curves, title, chosen, target)
    save_figure(fig, path)
    plt.close(fig)


@app.command()
def allocate(
    model_path: Annotated[Path, typer.Argument(
        metavar="MODEL.onnx", help="QONNX or QDQ model (--method finetune: QONNX Quant weights)")],
    data: Annotated[Path, typer.Option("--data", help="calibration .npz: 'x' and optional 'y' (labels or targets)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="widths JSON to write ({layer: P}, for --widths-json)")],
    val: Annotated[Optional[Path], typer.Option("--val", help="validation .npz for the end-to-end checks")] = None,
    train: Annotated[Optional[Path], typer.Option(
        "--train", help="fine-tuning .npz for --method finetune (default: --data); finetune wins back more with more "
                        "samples, while --data only scores the per-layer sensitivities")] = None,
    min_score_pct: Annotated[Optional[float], typer.Option(
        "--min-score-pct", help="least cost keeping this % of the model's own score on the validation data")] = None,
    budget_bits: Annotated[Optional[int], typer.Option(
        "--budget-bits",
        help="best score within N accumulator + threshold bits (--cost acc-bits: register bits)")] = None,
    budget_lut: Annotated[Optional[int], typer.Option(
        "--budget-lut", help="best score within N LUTs of FINN's estimate (MVAU_hls lut_estimation)")] = None,
    cost: Annotated[Optional[str], typer.Option(
        "--cost", help="cost model: bits (default: accumulator registers + threshold storage of FINN's lowering), "
                        "finn-lut (FINN's LUT estimate), acc-bits (accumulator registers only, no FINN: for models "
                        "FINN does not lower, such as QDQ files), or a plugin")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="project (PTQ) or finetune (QAT at the candidate allocations in the end-to-end checks)")] = "project",
    projection_method: Annotated[str, typer.Option(
        "--projection-method", help="projection method (a2q project --list-methods)")] = DEFAULT_METHOD,
    metric: Annotated[str, typer.Option("--metric", help="auto, top1 or psnr")] = "auto",
    fpgapart: Annotated[Optional[str], typer.Option(
        "--fpgapart", help="FPGA part or board for FINN's estimates (default xczu3eg-sbva484-1-e)")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="finetune: epochs per end-to-end check")] = 1,
    no_refine: Annotated[bool, typer.Option(
        "--no-refine", help="skip trying narrower widths end to end after the target is met")] = False,
    seed: Annotated[int, typer.Option("--seed", help="seeds fine-tuning (projection and scoring are deterministic)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the allocation report as JSON")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="PNG: score vs accumulator + threshold bits, allocation vs uniform P")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    input_ranges: InputRangesOption = "exact",
    input_dtype: InputDtypeOption = None,
) -> None:
    """Pick each layer's accumulator width: sensitivity per layer, exact knapsack, end-to-end refinement.

    Flow: `a2q allocate M.onnx --data c.npz --min-score-pct 99 -o w.json`, then
    `a2q project M.onnx OUT.onnx --widths-json w.json` (with the same --input-ranges and --input-dtype).

    Every width in the map is proven on the projected model before the map is written.
    """
    import torch

    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.model_io import check_whole_model_fits, load_model
    from a2q_passes.output_files import atomic_write_text
    from a2q_passes.transforms.allocate import DEFAULT_FPGAPART, AllocateAccumulators, pareto_curves

    _check_output(output, model_path)
    check_input_ranges(input_ranges)
    if plot is not None:
        _check_output(plot, model_path)
    if epochs < 1:
        raise A2QError(f"--epochs must be at least 1, got {epochs}")
    target_pct, budget, cost_name = _objective(min_score_pct, budget_bits, budget_lut, cost)
    input_dtypes = parse_input_dtypes(input_dtype)
    check_whole_model_fits(model_path, "`a2q allocate` needs the whole model in one (its calibration and end-to-end "
                           "checks execute it in torch and qonnx)", "Choose one width with `a2q analyze` and `a2q "
                           "project --acc-bits P` (they stream models of any size), or allocate on a part of the "
                           "model under 2 GiB.")
    model = load_model(model_path, stream=False)  # calibration executes the whole graph
    declare_input_dtypes(input_dtypes, model, model_path)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = FinetuneConfig(epochs=epochs, seed=seed, progress=False, log=lambda line: None)
    step = AllocateAccumulators(data, val, min_score_pct=target_pct, budget=budget, cost_model=cost_name,
                                method=method, projection_method=projection_method, metric=metric,
                                fpgapart=fpgapart or DEFAULT_FPGAPART, finetune_config=config,
                                refine=not no_refine, progress=not no_progress, input_ranges=input_ranges,
                                train=train)
    result = step(model)
    details = result.details
    atomic_write_text(output, json.dumps(step.widths, indent=2) + "\n")
    if plot is not None:
        curves = pareto_curves(model, step, progress=not no_progress)
        details["pareto"] = curves
        chosen = {"acc_threshold_bits": details["acc_threshold_bits"], "score": details["val_score"]}
        plot_pareto(curves, plot, f"{model_path.name}: allocation vs uniform P", chosen, details["target_val_score"])
    if as_json:
        typer.echo(json.dumps({**details, "output": str(output)}, indent=2))
    else:
        Console(width=200).print(allocation_table(details))
        for line in summary_lines(details):
            typer.echo(line)
        typer.echo(f"wrote {output}")
