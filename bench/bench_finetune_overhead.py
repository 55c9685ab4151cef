"""Cost of the accumulator constraint in training: one epoch constrained vs one epoch unconstrained.

    .venv/bin/python -m bench.bench_finetune_overhead [--model models/fmnist_cnn_w4a4.onnx] [--acc-bits 14]
        [--method qat] [--samples 2048] [--batch-size 64] [--repeats 5] [--threads 1]

Both sides train the same :class:`QonnxModule` of the model with Adam, the same data and batches;
the constrained side adds what ``a2q finetune`` adds per step (the weight transform in the
forward pass, the projection after each optimizer step, the A2Q penalty for ``a2q``). Epochs
alternate (unconstrained, constrained, ...) so machine load hits both alike; the medians and
their ratio are printed (target: ratio <= 1.5). Data: the dataset matching the model's input
(digits 1x8x8, Fashion-MNIST 1x28x28), random inputs otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from a2q_passes.finetune.constraint import TRAINING_METHODS, Constraint
from a2q_passes.finetune.data import ModelIO
from a2q_passes.finetune.selection import select_layers
from a2q_passes.model_io import load_model
from a2q_passes.torch_bridge import QonnxModule

DATASET_BY_SHAPE = {(1, 8, 8): "digits", (1, 28, 28): "fashion_mnist"}


def _data(shape: tuple[int, ...], classes: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    name = DATASET_BY_SHAPE.get(shape)
    if name is not None:
        from models.data import load_dataset

        x, y = load_dataset(name, "train")
        return torch.from_numpy(x[:samples]), torch.from_numpy(y[:samples])
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.uniform(0, 1, (samples, *shape)).astype(np.float32)),
            torch.from_numpy(rng.integers(0, classes, samples)))


def _epoch(model, x: torch.Tensor, y: torch.Tensor, batch: int, method: str | None, acc_bits: int) -> float:
    """Seconds for one training epoch (set-up excluded)."""
    torch.manual_seed(0)
    module = QonnxModule(model)
    constraint = Constraint(module, select_layers(model, acc_bits), method) if method else None
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        loss = F.cross_entropy(module(x[idx]), y[idx])
        penalty = constraint.penalty() if constraint else None
        if penalty is not None:
            loss = loss + 1e-3 * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if constraint:
            constraint.after_step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/fmnist_cnn_w4a4.onnx")
    parser.add_argument("--acc-bits", type=int, default=14)
    parser.add_argument("--method", choices=TRAINING_METHODS, default="qat")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    io = ModelIO.of(model)
    x, y = _data(io.input_shape, io.output_shape[0], args.samples)
    times: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.repeats):
        times["unconstrained"].append(_epoch(model, x, y, args.batch_size, None, args.acc_bits))
        times["constrained"].append(_epoch(model, x, y, args.batch_size, args.method, args.acc_bits))
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = median["constrained"] / median["unconstrained"]
    print(f"command: {shlex.join([sys.executable, '-m', 'bench.bench_finetune_overhead', *(argv or sys.argv[1:])])}")
    print(f"model {args.model}, {len(x)} samples, batch {args.batch_size}, method {args.method}, "
          f"P={args.acc_bits}, {args.threads} thread(s), {args.repeats} alternating repeats")
    for kind, values in times.items():
        print(f"{kind:>13}: median {median[kind]:.3f} s/epoch  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"overhead ratio (constrained / unconstrained): {ratio:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
