"""Brevitas A2Q / A2Q+ anchors: QAT from the trained float checkpoint with Brevitas' own quantizers.

Each anchor is ``models.nets.build_model(name, W, A, weight_quant=<Brevitas accumulator-aware
quantizer>, accumulator_bit_width=P)`` initialised from the float checkpoint (never from random
weights: at low P A2Q's round-to-zero zeroes every weight of a random wide layer), then trained
with the same schedule as our fine-tuning (:mod:`a2q_passes.finetune.train`): Adam with a per-step
cosine decay, the data order of a seeded ``DistributedSampler`` (world of one), the best epoch
chosen on the validation data.

In the A2Q papers' set-up (``plain_layers``: the first and last MAC layers) those layers keep the
plain per-channel W-bit quantizer of the committed model and only the hidden layers get the
accumulator-aware one.

Anchors are scored in torch, with their own forward pass. Their integer weights are read from
that forward pass (``quant_weight(quant_input).int()`` of every constrained layer), which gives the
width the *torch* model guarantees. Brevitas' QONNX export of these quantizers does not carry the
same integers (its weight ``Quant`` rounds to nearest), so the export is analysed and simulated
separately (:func:`export_check`): its real width can exceed the nominal P.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import brevitas.nn as qnn
import numpy as np
import torch
import torch.nn.functional as F
from brevitas.quant.scaled_int import Int8AccumulatorAwareWeightQuant, Int8AccumulatorAwareZeroCenterWeightQuant
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from a2q_passes import bounds
from models.nets import MODELS, build_model, load_float_weights

ANCHOR_QUANTIZERS: dict[str, type] = {
    "brevitas-a2q": Int8AccumulatorAwareWeightQuant,
    "brevitas-a2q+": Int8AccumulatorAwareZeroCenterWeightQuant,
}
_EVAL_BATCH = 1000
SETUPS: dict[str, str] = {
    "all": "all MAC layers with W-bit weights constrained",
    "paper": "the A2Q papers' set-up: first and last MAC layers at their natural width, hidden layers at P",
}


@dataclass(frozen=True)
class TrainBudget:
    """One training budget, shared by every trained method of a model (ours and the anchors)."""

    samples: int  # first `samples` of the training split (validation samples excluded)
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0


@dataclass
class IntegerLayer:
    """A constrained layer's integer weights as accumulator rows, and the integer range of its input."""

    name: str
    rows: np.ndarray  # (rows, K) int64
    x: bounds.IntRange

    @property
    def exact_width(self) -> int:
        acc_min, acc_max = bounds.exact_accumulator_range(self.rows, self.x)
        return int(bounds.accumulator_width(int(acc_min.min()), int(acc_max.max())))


@dataclass
class AnchorRun:
    model: nn.Module  # best epoch, eval mode
    best_epoch: int
    val_history: list[float] = field(default_factory=list)  # validation score after each epoch
    seconds: float = 0.0


def loss_fn(dataset: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification, MSE for super-resolution (as ``a2q finetune --loss ce|mse``)."""
    return F.mse_loss if dataset == "sr" else F.cross_entropy


@torch.no_grad()
def predict(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.cat([model(torch.from_numpy(inputs[i:i + _EVAL_BATCH])) for i in range(0, len(inputs), _EVAL_BATCH)]
                     ).numpy()


def _constrained_modules(model: nn.Module, quantizer: type) -> dict[str, nn.Module]:
    """Layers whose weight quantizer is `quantizer` (ESPCN's fixed 8-bit end layers use another one)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (qnn.QuantConv2d, qnn.QuantLinear))
            and module.weight_quant.quant_injector.__name__ == quantizer.__name__}


def mac_module_names(model: nn.Module) -> list[str]:
    """The Brevitas MAC layers (convolutions, linear layers) in registration order, which is their forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, (qnn.QuantConv2d, qnn.QuantLinear))]


def end_layers(names: list[str]) -> tuple[str, ...]:
    """The first and the last of the MAC layers ``names`` (in forward order): those the A2Q papers leave unconstrained."""
    return (names[0], names[-1]) if names else ()


def build_anchor(model_name: str, quantizer: type, acc_bits: int, weight_bits: int, act_bits: int,
                 plain_layers: tuple[str, ...] = ()) -> nn.Module:
    """The Brevitas model with ``quantizer`` on its constrainable layers, except ``plain_layers`` (module names),
    which get the committed model's plain per-channel W-bit weight quantizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(model_name, weight_bits, act_bits, weight_quant=quantizer, accumulator_bit_width=acc_bits)
        plain = build_model(model_name, weight_bits, act_bits) if plain_layers else None
    for name in plain_layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain.get_submodule(name))
    return model


def train_anchor(model_name: str, quantizer: type, acc_bits: int, weight_bits: int, act_bits: int,
                 train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 score: Callable[[np.ndarray, np.ndarray], float], budget: TrainBudget,
                 float_checkpoint: Path, desc: str = "anchor", plain_layers: tuple[str, ...] = (),
                 progress: bool = True) -> AnchorRun:
    """Brevitas QAT at accumulator width ``acc_bits``, from the float checkpoint; best epoch on ``val``.

    ``plain_layers``: module names left at the plain W-bit quantizer (see :func:`build_anchor`).
    """
    dataset = MODELS[model_name].dataset
    torch.manual_seed(budget.seed)
    model = build_anchor(model_name, quantizer, acc_bits, weight_bits, act_bits, plain_layers)
    load_float_weights(model, float_checkpoint)
    x_all, y_all = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    criterion = loss_fn(dataset)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=budget.lr)
    sampler = DistributedSampler(range(len(x_all)), num_replicas=1, rank=0, shuffle=True, seed=budget.seed)
    steps_per_epoch = math.ceil(len(sampler) / budget.batch_size)
    total_steps = max(budget.epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
    started = time.perf_counter()
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    for epoch in range(1, budget.epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        model.train()
        with tqdm(total=steps_per_epoch, desc=f"{desc} epoch {epoch}/{budget.epochs}", leave=False,
                  disable=not progress) as bar:
            for start in range(0, len(order), budget.batch_size):
                idx = order[start:start + budget.batch_size]
                loss = criterion(model(x_all[idx]), y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        history.append(score(predict(model, val[0]), val[1]))
        if best is None or history[-1] > best[0]:
            best = (history[-1], epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return AnchorRun(model, best[1], history, time.perf_counter() - started)


def _input_range(quant_input: Any) -> bounds.IntRange:
    bits = int(round(float(quant_input.bit_width)))
    return bounds.integer_range(bits, bool(quant_input.signed))


@torch.no_grad()
def integer_layers(model: nn.Module, quantizer: type, sample: np.ndarray) -> list[IntegerLayer]:
    """The integers Brevitas' own forward pass uses in every constrained layer (read during one forward)."""
    modules = _constrained_modules(model, quantizer)
    found: dict[str, IntegerLayer] = {}

    def hook(name: str) -> Callable:
        def read(module: nn.Module, args: tuple, _output: Any) -> None:
            quant_input = module.input_quant(args[0]) if hasattr(module, "input_quant") else args[0]
            weights = module.quant_weight(quant_input)
            rows = weights.int().reshape(weights.value.shape[0], -1).to(torch.int64).numpy()
            found[name] = IntegerLayer(name, rows, _input_range(quant_input))
        return read

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        model.eval()
        model(torch.from_numpy(sample[:1]))
    finally:
        for handle in handles:
            handle.remove()
    return [found[name] for name in modules]


def sparsity(rows: list[np.ndarray]) -> float:
    """Fraction of zero integer weights over all given layers together."""
    total = sum(r.size for r in rows)
    return float(sum(int(np.count_nonzero(r == 0)) for r in rows) / total) if total else 0.0


def constrained_nodes(model: Any, weight_bits: int, setup: str) -> list[str]:
    """The ONNX MAC nodes a set-up constrains: those with W-bit weights (``setup`` ``all``), less the first and
    the last MAC node of the graph (``paper``: the A2Q papers leave them at their natural width)."""
    from a2q_passes.analysis import analyze_model

    if setup not in SETUPS:
        raise ValueError(f"unknown set-up {setup!r}; expected one of {sorted(SETUPS)}")
    reports = analyze_model(model).layers  # every MAC node, in graph order
    ends = end_layers([r.node for r in reports]) if setup == "paper" else ()
    return [r.node for r in reports if r.status == "ok" and r.weight_dtype == f"INT{weight_bits}" and r.node not in ends]


def export_check(model: nn.Module, model_name: str, acc_bits: int, weight_bits: int, inputs: np.ndarray,
                 targets: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
                 setup: str = "all") -> dict[str, Any]:
    """Export the anchor to QONNX and measure what the export really is.

    Returns the export's widest exact accumulator over the layers ``setup`` constrains,
    its weight sparsity, its score with exact accumulation and with P-bit wrap-around accumulators
    (``simulate_model``), and the fraction of accumulations that overflowed P bits.
    """
    from a2q_passes.analysis import analyze_model
    from a2q_passes.layers import find_mac_layers
    from a2q_passes.data_simulation import simulate_model
    from models.export import export_qonnx_model

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_qonnx_model(model, MODELS[model_name].input_shape, Path(folder) / "anchor.onnx")
    names = set(constrained_nodes(exported, weight_bits, setup))
    reports = [r for r in analyze_model(exported).layers if r.node in names]
    rows = [layer.integer_rows(exported) for layer in find_mac_layers(exported) if layer.node in names]
    simulation = simulate_model(exported, inputs, {name: acc_bits for name in names}, mode="wrap")
    output = next(iter(simulation.outputs))
    accumulations = sum(simulation.accumulations.values())
    return {
        "export_width": max(r.bounds["exact"] for r in reports),
        "export_sparsity": sparsity(rows),
        "export_score_exact": score(simulation.exact_outputs[output], targets),
        "export_score_wrap": score(simulation.outputs[output], targets),
        "export_overflow_fraction": sum(simulation.overflows.values()) / accumulations if accumulations else 0.0,
        "export_samples": int(len(inputs)),
    }
