"""``a2q finetune``: win accuracy back at a target accumulator width (constrained QAT, A2Q, or AXE PTQ).

Runs unchanged under ``torchrun --nproc_per_node=N`` (DistributedDataParallel; only rank 0 prints
and writes OUT.onnx).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from a2q_passes.cli import app
from a2q_passes.cli.common import (InputDtypeOption, InputRangesOption, check_input_ranges, declare_input_dtypes,
                                   parse_input_dtypes, parse_layer_widths)
from a2q_passes.conventions import INPUT_RANGES_TITLE
from a2q_passes.errors import A2QError

# torch, the training code and the model readers are imported inside the functions: every `a2q`
# command imports this module to register `finetune`, and they would add seconds to each start-up.


def _check_options(input_path: Path, output_path: Path, method: str, loss: str, epochs: int, lr: float,
                   batch_size: int, device: str, refresh_stats: str, init: str, warmup: float) -> None:
    from a2q_passes.finetune.calibration import REFRESH
    from a2q_passes.finetune.constraint import INITS
    from a2q_passes.finetune.data import LOSSES
    from a2q_passes.finetune.distributed import DEVICES
    from a2q_passes.output_files import check_output_paths
    from a2q_passes.transforms.finetune import METHODS

    check_output_paths([("OUT.onnx", output_path)], inputs=[input_path])
    for name, value, allowed in (("--method", method, METHODS), ("--loss", loss, LOSSES), ("--device", device, DEVICES),
                                 ("--refresh-stats", refresh_stats, REFRESH), ("--init", init, INITS)):
        if value not in allowed:
            raise A2QError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise A2QError("--device cuda: no CUDA GPU is available to torch (torch.cuda.is_available() is False); "
                           "use --device cpu, or --device auto to take a GPU when there is one")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise A2QError(f"need --epochs >= 0, --batch-size >= 1 and --lr > 0 (got {epochs}, {batch_size}, {lr})")
    if not 0.0 <= warmup < 1.0:
        raise A2QError(f"--warmup is a fraction of the training steps in [0, 1), got {warmup}")


def _summary(before: dict, after: dict, targets: dict[str, int], input_ranges: str) -> Table:
    table = Table(title=f"Accumulator bits per constrained layer (exact range; {INPUT_RANGES_TITLE[input_ranges]})")
    for col in ("layer", "target", "before", "after"):
        table.add_column(col)
    for node, bits in targets.items():
        table.add_row(node, str(bits), str(before[node].bounds.get("exact")), str(after[node].bounds.get("exact")))
    return table


@app.command()
def finetune(
    input_path: Annotated[Path, typer.Argument(metavar="IN.onnx", help="QONNX model (weights behind Quant nodes)")],
    output_path: Annotated[Path, typer.Argument(metavar="OUT.onnx")],
    data: Annotated[Path, typer.Option("--data", help=".npz with 'x' (inputs) and optional 'y' (labels/targets)")],
    acc_bits: Annotated[Optional[int], typer.Option("--acc-bits", help="target accumulator width P of every layer")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="per-layer width NAME=P; repeatable")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="validation .npz; the best epoch is chosen on it (score, then loss on ties)")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="norm (A2Q+-style weight normalisation over the exact budget, exact rounding), qat "
                         "(exact-range projected QAT), a2q (A2Q weight normalisation, round to zero) or axe (PTQ)")] = "norm",
    init: Annotated[str, typer.Option(
        "--init", help="training start: scaled (per channel, the weight scale whose exact projection loses least, "
                       "then project), project (Euclidean projection at the model's scales), axe (AXE's weights) "
                       "or none")] = "scaled",
    epochs: Annotated[int, typer.Option(
        "--epochs", help="passes over the training data (norm, qat, a2q; 0: the constrained start only); the best "
                         "epoch is written")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine decay)")] = 1e-3,
    warmup: Annotated[float, typer.Option(
        "--warmup", help="fraction of the steps with a linear learning-rate warm-up before the cosine decay")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="samples per step and process")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="seeds data order and initialisation")] = 0,
    loss: Annotated[str, typer.Option("--loss", help="ce (labels), mse or l1 (targets)")] = "ce",
    distill: Annotated[bool, typer.Option(
        "--distill", help="train on the original model's outputs (KL on softmax for ce); no labels needed")] = False,
    train_act_scales: Annotated[bool, typer.Option(
        "--train-act-scales",
        help="also train activation scales (every trained scale keeps its sign and at least 2^-10 of its starting "
             "size)")] = False,
    tile: Annotated[Optional[int], typer.Option("--tile", help="axe: hold each run of T terms to P bits too")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="axe: calibration inputs used")] = 512,
    held_out_samples: Annotated[int, typer.Option(
        "--held-out-samples", help="axe: other --data samples that choose, per row and layer, between AXE and the "
                                   "exact projection: the result is the projection unless clearly better on them "
                                   "(0: keep every AXE row)")] = 2048,
    refresh_stats: Annotated[str, typer.Option(
        "--refresh-stats", help="axe: re-centre each layer's output channels on the original model's from the "
                                "calibration data (BatchNorm statistics, else the float bias; weights and widths "
                                "unchanged): auto (kept where it is better on the held-out data, and clearly "
                                "better than the projection), on or off")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu or cuda")] = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="leave layer NAME unconstrained (repeatable); needed for quantized layers it cannot train")] = None,
    input_ranges: InputRangesOption = "exact",
    input_dtype: InputDtypeOption = None,
) -> None:
    """Train (or AXE-quantize) so every constrained layer fits P bits; writes the best checkpoint.

    Everything about the inputs is checked before training; on any problem nothing is written.
    Layers without a target are trained too but never come out needing a wider accumulator (projected
    back, or their weights restored); each one whose width changed is listed.
    """
    import torch

    from a2q_passes.analysis import analyze_model
    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.model_io import check_whole_model_fits, has_external_data, load_model, save_model
    from a2q_passes.transforms.finetune import FinetuneAccumulators

    _check_options(input_path, output_path, method, loss, epochs, lr, batch_size, device, refresh_stats, init, warmup)
    check_input_ranges(input_ranges)
    global_bits, overrides = parse_layer_widths(acc_bits, layer, None)
    input_dtypes = parse_input_dtypes(input_dtype)
    check_whole_model_fits(input_path, "`a2q finetune` needs the whole model in one (its torch bridge and qonnx's "
                           "passes copy and serialise it)", "Project it instead with `a2q project IN.onnx OUT.onnx "
                           "--acc-bits P` (it streams models of any size), or fine-tune in the framework that "
                           "exported it (e.g. Brevitas) and export it again.")
    model = load_model(input_path, stream=False)  # training executes the whole graph
    declare_input_dtypes(input_dtypes, model, input_path)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = FinetuneConfig(method=method, init=init, warmup=warmup, loss=loss, distill=distill, epochs=epochs,
                            lr=lr, batch_size=batch_size, seed=seed, train_act_scales=train_act_scales,
                            device=device, progress=not no_progress, log=typer.echo)
    step = FinetuneAccumulators(global_bits, data, val, config, overrides=overrides, tile=tile,
                                calibration_samples=calib_samples, held_out_samples=held_out_samples, refresh=refresh_stats, skip=skip, input_ranges=input_ranges)
    result = step(model)
    if not result.details["is_main"]:
        return
    save_model(result.model, output_path, keep_external=has_external_data(input_path))
    targets = {layer.node: layer.acc_bits for layer in step.selection.layers}
    before, after = (analyze_model(m, input_ranges=input_ranges).by_node() for m in (model, result.model))
    Console(width=200).print(_summary(before, after, targets, input_ranges))
    for node, why in result.details["skipped"].items():
        typer.echo(f"not constrained: {node} ({why})")
    for node, change in result.details["untargeted"].items():
        how = f"training widened it: {change['held']}" if change["held"] else "never wider than before"
        typer.echo(f"untargeted layer {node}: {change['before']} -> {change['after']} ({how})")
    for report in result.details.get("axe", []):
        typer.echo(f"AXE rows kept in {report.node}: {report.rows_axe}/{report.rows} (the others hold the exact "
                   f"projection)" + (f"; {report.note}" if report.note else "")
                   + (f"; {report.refreshed}" if report.refreshed else ""))
    typer.echo(f"wrote {output_path}")
