"""The fine-tuning loop: constrained training of a QONNX graph through the torch bridge.

Objectives (``loss``): ``ce`` cross-entropy on integer labels; ``mse`` / ``l1`` on target arrays
(regression, super-resolution). With ``distill`` the targets are the original model's outputs
and labels are not needed: for ``ce`` the loss is the KL divergence ``KL(softmax(teacher) ||
softmax(student))`` (temperature 1), which matches the whole output distribution rather than
only the argmax; for ``mse`` / ``l1`` it is that loss on the raw outputs.

Validation metric (higher is better): top-1 accuracy in % for ``ce``; PSNR in dB,
``10 log10(1 / MSE)``, for ``mse`` / ``l1`` (meaningful for outputs in [0, 1], e.g. images). It is
measured against the validation labels, or against the original model's outputs (argmax for
``ce``) where the validation data has none. The best epoch (highest validation metric, or the
lowest mean training loss without validation data) is kept; epochs with the same validation
metric (common for top-1 on a small validation split that is already at 100%) are told apart by
the training objective on the validation data, then by the earlier epoch. With validation data the
constrained starting point (epoch 0, the initialisation) is a candidate too, so fine-tuning never
returns a model that scores worse on it than the point it starts from.

Initialisation: ``init`` (:data:`~a2q_passes.finetune.constraint.INITS`, see
:mod:`~a2q_passes.finetune.constraint`); for ``axe`` the training data's first
:data:`AXE_INIT_CALIBRATION` samples (after a seeded shuffle) calibrate AXE and up to
:data:`AXE_INIT_HELD_OUT` others choose between AXE and the projection, as ``--method axe`` does.
The original model (never the initialisation) is the teacher for ``distill`` and the reference score.

Optimiser: Adam with a per-step cosine decay of the learning rate, after a linear warm-up over
the first ``warmup`` fraction of the steps (0: none). Data order comes from a
``DistributedSampler`` seeded with ``seed`` (also in a world of one), so a run is reproducible;
``batch_size`` is per process. Under DDP every rank computes the same validation metric and
the all-reduced training loss, so all ranks pick the same best epoch and end identical.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from qonnx.core.modelwrapper import ModelWrapper
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from a2q_passes.finetune.constraint import INITS, TRAINING_METHODS, Constraint
from a2q_passes.finetune.data import Dataset, split_held_out
from a2q_passes.finetune.distributed import Distributed, distributed
from a2q_passes.finetune.selection import Selection, enforce_widths
from a2q_passes.torch_bridge import QonnxModule, write_back

StepCallback = Callable[[int, Constraint], None]
_EVAL_BATCH = 512
AXE_INIT_CALIBRATION = 512  # AXE's own defaults (a2q finetune --method axe)
AXE_INIT_HELD_OUT = 2048


@dataclass
class FinetuneConfig:
    method: str = "norm"  # "norm", "qat" or "a2q" train here; "axe" is post-training (FinetuneAccumulators)
    init: str = "scaled"  # one of constraint.INITS
    warmup: float = 0.0  # fraction of the steps with a linear learning-rate warm-up before the cosine decay
    loss: str = "ce"
    distill: bool = False
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    train_act_scales: bool = False
    a2q_penalty: float = 1e-3  # weight of Brevitas' relu(g - T s) term (methods a2q and norm)
    device: str = "auto"
    progress: bool = True
    log: Callable[[str], None] | None = field(default=None, repr=False)  # per-epoch lines (rank 0); None: stderr


@dataclass
class EpochRecord:
    epoch: int  # 0: the constrained starting point, before any step
    train_loss: float | None
    val_metric: float | None
    val_loss: float | None = None  # the training objective on the validation data: breaks val_metric ties


@dataclass
class FinetuneResult:
    model: ModelWrapper  # best epoch, written back into the input graph, every constrained layer within P
    history: list[EpochRecord]
    best_epoch: int
    metric: str  # "top-1 %" or "PSNR dB"
    original_metric: float | None  # the unconstrained input model on the validation data
    reprojected: dict[str, int]  # rows re-projected after write-back (normally empty)
    is_main: bool  # rank 0 (the one that writes files)


def metric_name(loss: str) -> str:
    return "top-1 %" if loss == "ce" else "PSNR dB"


def score(outputs: Tensor, targets: Tensor, loss: str) -> float:
    """Top-1 % (``targets``: labels, or reference logits) or PSNR in dB against reference outputs."""
    if loss == "ce":
        labels = targets if targets.dim() == 1 else targets.argmax(dim=1)
        return float((outputs.argmax(dim=1) == labels).double().mean() * 100.0)
    mse = float(F.mse_loss(outputs.double(), targets.double()))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def objective(outputs: Tensor, targets: Tensor, loss: str, distill: bool, per_sample: bool = False) -> Tensor:
    """The training objective over the batch, or (``per_sample``) each sample's own, whose mean it is."""
    if loss == "ce":
        if distill:
            kl = F.kl_div(F.log_softmax(outputs, dim=1), F.log_softmax(targets, dim=1),
                          reduction="none" if per_sample else "batchmean", log_target=True)
            return kl.flatten(1).sum(dim=1) if per_sample else kl
        return F.cross_entropy(outputs, targets, reduction="none" if per_sample else "mean")
    distance = F.mse_loss if loss == "mse" else F.l1_loss
    if per_sample:
        return distance(outputs, targets, reduction="none").flatten(1).mean(dim=1)
    return distance(outputs, targets)


@torch.no_grad()
def predict(module: torch.nn.Module, x: np.ndarray, device: torch.device) -> Tensor:
    """Outputs of ``module`` on all of ``x`` (in chunks), on the CPU."""
    was_training = module.training
    module.eval()
    outputs = [module(torch.from_numpy(x[i:i + _EVAL_BATCH]).to(device)).float().cpu()
               for i in range(0, len(x), _EVAL_BATCH)]
    module.train(was_training)
    return torch.cat(outputs)


def evaluate_graph(model: ModelWrapper, data: Dataset, loss: str, device: torch.device,
                   reference: ModelWrapper | None = None) -> float:
    """The validation metric of a graph on ``data``: against ``data.y``, else against ``reference``'s outputs."""
    outputs = predict(QonnxModule(model, trainable_scales="none").to(device), data.x, device)
    if data.y is not None:
        return score(outputs, torch.from_numpy(data.y), loss)
    if reference is None:
        raise ValueError(f"{data.name} has no targets and no reference model was given")
    return score(outputs, predict(QonnxModule(reference, trainable_scales="none").to(device), data.x, device), loss)


def learning_rate_factor(step: int, total_steps: int, warmup: float) -> float:
    """The learning rate of ``step`` relative to ``lr``: linear warm-up over ``warmup * total_steps``, then cosine."""
    ramp = int(warmup * total_steps)
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(total_steps - ramp, 1)))


def _targets(data: Dataset, teacher: Callable[[np.ndarray], Tensor], use_teacher: bool) -> Tensor:
    return teacher(data.x) if use_teacher or data.y is None else torch.from_numpy(data.y)


def _original_targets(model: ModelWrapper, train: Dataset, val: Dataset | None, config: FinetuneConfig,
                      device: torch.device) -> tuple[Tensor, Tensor | None, float | None]:
    """The training and validation targets and the original model's validation score; the original module (the
    teacher) lives only here, so it is freed before training starts."""
    original = QonnxModule(model, trainable_scales="none").to(device)

    def teacher(x: np.ndarray) -> Tensor:
        return predict(original, x, device)

    train_targets = _targets(train, teacher, config.distill)
    val_targets = _targets(val, teacher, False) if val is not None else None
    original_metric = score(teacher(val.x), val_targets, config.loss) if val is not None else None
    return train_targets, val_targets, original_metric


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def finetune(model: ModelWrapper, selection: Selection, train: Dataset, val: Dataset | None = None,
             config: FinetuneConfig | None = None, callback: StepCallback | None = None) -> FinetuneResult:
    """Train ``model`` with every layer of ``selection`` held to its width; returns the best epoch's graph.

    ``train`` / ``val`` must already be validated (:func:`a2q_passes.finetune.data.validate`).
    ``callback(step, constraint)`` runs after every optimizer step and its projection.
    Runs under DDP when started by torchrun (see :mod:`a2q_passes.finetune.distributed`).
    """
    config = config or FinetuneConfig()
    if config.method not in TRAINING_METHODS:
        raise ValueError(f"finetune() trains with one of {TRAINING_METHODS}, got {config.method!r} "
                         "(AXE runs through FinetuneAccumulators)")
    if config.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {config.init!r}")
    if not 0.0 <= config.warmup < 1.0:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {config.warmup}")
    with distributed(config.device) as world:
        return _run(model, selection, train, val, config, callback, world)


def _run(model: ModelWrapper, selection: Selection, train: Dataset, val: Dataset | None, config: FinetuneConfig,
         callback: StepCallback | None, world: Distributed) -> FinetuneResult:
    def log(line: str) -> None:
        if world.is_main:
            (config.log or (lambda s: tqdm.write(s, file=sys.stderr)))(line)

    torch.manual_seed(config.seed)
    device = world.device
    train_targets, val_targets, original_metric = _original_targets(model, train, val, config, device)

    initial = model
    if config.init == "axe":
        from a2q_passes.finetune.calibration import run_axe  # it imports this module

        calibration, held_out = split_held_out(train, AXE_INIT_CALIBRATION, AXE_INIT_HELD_OUT, config.seed)
        initial, _ = run_axe(model, selection, calibration.x, device=device, held_out=held_out, loss=config.loss)
    module = QonnxModule(initial, trainable_scales="all" if config.train_act_scales else "weights")
    constraint = Constraint(module, selection, config.method, "project" if config.init == "axe" else config.init)
    module.to(device)
    net = module
    if world.active:
        net = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)  # buffers never change: BN runs in eval mode
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    sampler = DistributedSampler(range(len(train)), num_replicas=world.world_size, rank=world.rank,
                                 shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = max(config.epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, total_steps,
                                                                                              config.warmup))
    x_all = torch.from_numpy(train.x)

    metric = metric_name(config.loss)
    if original_metric is not None:
        log(f"original model: val {metric} {original_metric:.2f}")
    history: list[EpochRecord] = []
    best = ((-math.inf, -math.inf), 0, _state(module))

    def evaluate(epoch: int, train_loss: float | None) -> None:
        nonlocal best
        val_metric = val_loss = None
        if val is not None:
            outputs = predict(module, val.x, device)
            val_metric = score(outputs, val_targets, config.loss)
            # reference logits as targets (no labels) are compared as distillation compares them
            val_loss = float(objective(outputs, val_targets, config.loss, distill=val_targets.dim() > 1))
        history.append(EpochRecord(epoch, train_loss, val_metric, val_loss))
        shown = f"val {metric} {val_metric:.2f}" if val_metric is not None else ""
        loss_text = f"loss {train_loss:.4f}" if train_loss is not None else "constrained start"
        log(f"epoch {epoch}/{config.epochs}  {loss_text}  {shown}".rstrip())
        if val_metric is not None:
            key = (val_metric, -val_loss)
        else:
            key = (-train_loss if train_loss is not None else -math.inf, 0.0)
        if key > best[0]:
            best = (key, epoch, _state(module))

    evaluate(0, None)
    step = 0
    for epoch in range(1, config.epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        net.train()
        loss_sum, count = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False, file=sys.stderr,
                   disable=not (config.progress and world.is_main))
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            outputs = net(x_all[idx].to(device))
            loss = objective(outputs, train_targets[idx].to(device), config.loss, config.distill)
            total = loss
            penalty = constraint.penalty()
            if penalty is not None:
                total = loss + config.a2q_penalty * penalty
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            module.keep_scales_off_zero()
            constraint.after_step()
            step += 1
            if callback is not None:
                callback(step, constraint)
            loss_sum += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        bar.close()
        loss_sum, count = world.sum([loss_sum, float(count)])
        evaluate(epoch, loss_sum / count)

    _, best_epoch, state = best
    module.load_state_dict(state)
    module.eval()
    out = write_back(module, initial)
    reprojected = enforce_widths(out, selection)
    log(f"best epoch {best_epoch}" + (f" (val {metric} {history[best_epoch].val_metric:.2f})" if val is not None else ""))
    return FinetuneResult(out, history, best_epoch, metric, original_metric, reprojected, world.is_main)
