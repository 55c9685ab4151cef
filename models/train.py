"""Train the model zoo: float first, then QAT of the Brevitas model initialised from the float weights.

    python -m models.train MODEL [--epochs E] [--qat-epochs Q] [--seed S] [--wbits 4 --abits 4] [--out DIR]
    python -m models.train all            # every model and variant, as committed (see models/build_all.py)

Writes <out>/checkpoints/<model>_float.pt, <out>/checkpoints/<model>_w<W>a<A>.pt,
<out>/<model>_w<W>a<A>.onnx (cleaned-up QONNX) and merges the metrics into <out>/metrics.json.
Deterministic for a given seed (fixed data order, torch.use_deterministic_algorithms, 1 thread default).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.data import bicubic_upscale, load_dataset
from models.evaluate import evaluate_onnx, score
from models.export import export_qonnx_model
from models.nets import MODELS, build_model, load_float_weights

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Recipe:
    """Training schedule of one model: Adam with a cosine learning-rate decay per step."""

    float_epochs: int
    qat_epochs: int
    batch_size: int
    float_lr: float
    qat_lr: float
    variants: tuple[tuple[int, int], ...]  # (weight bits, activation bits) of the committed QAT models


RECIPES: dict[str, Recipe] = {
    "digits_cnn": Recipe(30, 15, 32, 3e-3, 1e-3, ((4, 4),)),
    "digits_mlp": Recipe(30, 15, 32, 3e-3, 1e-3, ((4, 4),)),
    "digits_resdw": Recipe(30, 15, 32, 3e-3, 1e-3, ((4, 4),)),
    "fmnist_cnn": Recipe(5, 1, 64, 2e-3, 5e-4, ((4, 4), (8, 8))),
    "fmnist_mlp": Recipe(5, 1, 64, 2e-3, 5e-4, ((4, 4),)),
    "espcn_x2": Recipe(6, 4, 16, 1e-3, 5e-4, ((4, 4),)),
}


def variant_name(weight_bit_width: int, act_bit_width: int) -> str:
    return f"w{weight_bit_width}a{act_bit_width}"


def set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def _loss(dataset: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target) if dataset == "sr" else F.cross_entropy(output, target)


def fit(model: nn.Module, dataset: str, inputs: np.ndarray, targets: np.ndarray, *, epochs: int,
        batch_size: int, lr: float, seed: int, desc: str) -> None:
    """Adam + per-step cosine decay; the epoch order comes from a generator seeded with `seed`."""
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(targets)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))))
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=total_steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x_all), generator=order_rng)
            for start in range(0, len(order), batch_size):
                index = order[start: start + batch_size]
                loss = _loss(dataset, model(x_all[index]), y_all[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()


@torch.no_grad()
def predict_torch(model: nn.Module, inputs: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    return torch.cat([model(torch.from_numpy(inputs[i: i + batch_size])) for i in range(0, len(inputs), batch_size)]
                     ).numpy()


def update_metrics(path: Path, name: str, entry: dict[str, Any]) -> None:
    """Merge one model's entry into metrics.json, keeping the other models' entries."""
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.setdefault(name, {}).update(entry)
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")


def train_model(name: str, *, out: Path = MODELS_DIR, seed: int = DEFAULT_SEED,
                epochs: int | None = None, qat_epochs: int | None = None,
                variants: tuple[tuple[int, int], ...] | None = None, skip_float: bool = False,
                threads: int = 1) -> dict[str, Any]:
    """Train float (or reuse the saved float checkpoint with skip_float), then QAT each variant; export, score.

    Returns the metrics entry also merged into <out>/metrics.json.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} or 'all'")
    spec, recipe = MODELS[name], RECIPES[name]
    epochs = recipe.float_epochs if epochs is None else epochs
    qat_epochs = recipe.qat_epochs if qat_epochs is None else qat_epochs
    variants = recipe.variants if variants is None else variants
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    float_path = checkpoints / f"{name}_float.pt"
    x_train, y_train = load_dataset(spec.dataset, "train")
    x_test, y_test = load_dataset(spec.dataset, "test")
    entry: dict[str, Any] = {"dataset": spec.dataset, "metric": "psnr_db" if spec.dataset == "sr" else "top1_percent"}
    if spec.dataset == "sr":
        entry["bicubic"] = round(score("sr", bicubic_upscale(x_test), y_test), 3)

    set_determinism(seed, threads)
    float_model = build_model(name, None, None)
    if skip_float:
        if not float_path.is_file():
            raise FileNotFoundError(f"{float_path}: no float checkpoint to reuse; train without --skip-float first")
        load_float_weights(float_model, float_path)
    else:
        started = time.perf_counter()
        fit(float_model, spec.dataset, x_train, y_train, epochs=epochs, batch_size=recipe.batch_size,
            lr=recipe.float_lr, seed=seed, desc=f"{name} float")
        torch.save(float_model.state_dict(), float_path)
        entry["float"] = {
            "score": round(score(spec.dataset, predict_torch(float_model, x_test), y_test), 3),
            "epochs": epochs, "seed": seed, "train_seconds": round(time.perf_counter() - started, 1),
            "checkpoint": str(float_path.relative_to(out)),
        }
        print(f"{name} float: {entry['float']['score']} {entry['metric']}")

    for weight_bits, act_bits in variants:
        tag = variant_name(weight_bits, act_bits)
        set_determinism(seed, threads)
        model = load_float_weights(build_model(name, weight_bits, act_bits), float_model.state_dict())
        started = time.perf_counter()
        fit(model, spec.dataset, x_train, y_train, epochs=qat_epochs, batch_size=recipe.batch_size,
            lr=recipe.qat_lr, seed=seed, desc=f"{name} {tag} QAT")
        seconds = time.perf_counter() - started
        torch.save(model.state_dict(), checkpoints / f"{name}_{tag}.pt")
        onnx_path = out / f"{name}_{tag}.onnx"
        export_qonnx_model(model, spec.input_shape, onnx_path)
        entry[tag] = {
            "score_torch": round(score(spec.dataset, predict_torch(model, x_test), y_test), 3),
            "score_onnx": round(evaluate_onnx(onnx_path, spec.dataset), 3),
            "qat_epochs": qat_epochs, "seed": seed, "train_seconds": round(seconds, 1),
            "onnx": str(onnx_path.relative_to(out)),
        }
        print(f"{name} {tag}: torch {entry[tag]['score_torch']}, onnx {entry[tag]['score_onnx']} {entry['metric']}")
    update_metrics(out / "metrics.json", name, entry)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(MODELS) + ["all"])
    parser.add_argument("--epochs", type=int, help="float training epochs (default: the model's recipe)")
    parser.add_argument("--qat-epochs", type=int, help="QAT epochs per variant (default: the model's recipe)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--wbits", type=int, help="weight bits of a single QAT variant (with --abits)")
    parser.add_argument("--abits", type=int, help="activation bits of a single QAT variant (with --wbits)")
    parser.add_argument("--skip-float", action="store_true", help="reuse <out>/checkpoints/<model>_float.pt")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory (default: models/)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if (args.wbits is None) != (args.abits is None):
        parser.error("give --wbits and --abits together")
    variants = None if args.wbits is None else ((args.wbits, args.abits),)
    if args.model == "all":
        from models.build_all import build_all

        build_all(out=args.out, seed=args.seed, threads=args.threads)
        return
    train_model(args.model, out=args.out, seed=args.seed, epochs=args.epochs, qat_epochs=args.qat_epochs,
                variants=variants, skip_float=args.skip_float, threads=args.threads)


if __name__ == "__main__":
    main()
