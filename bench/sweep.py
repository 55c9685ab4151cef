"""One model's sweep over accumulator widths P: every method, one row per (method, P).

Methods (``METHODS``):

- ``unconstrained-wrap``: the committed W/A model as it is, its MAC layers run with P-bit
  two's-complement wrap-around accumulators (:func:`a2q_passes.data_simulation.simulate_model`):
  the collapse accumulator-aware quantization prevents.
- ours: ``project-a2q`` / ``project-exact`` (:class:`ProjectToAccumulator`, post-training),
  ``axe`` (AXE PTQ) and ``qat`` (exact-range projected QAT), both through
  :class:`FinetuneAccumulators`; each starts from the committed W/A model.
- ``qat-float``: the same QAT, but from the float checkpoint quantized to the committed W/A layout and
  exported to QONNX (:func:`float_start`), so that it starts from the anchors' weights with their budget.
- ``ours-best``: per P, the one of our rows with the best *validation* score (never chosen on test), ties
  broken by the lower validation loss (:func:`ours_best_key`).
- ``qat-float-eq``: ``qat-float`` with the equal total budget of the ``-eq`` anchors below (:func:`equal_budget`):
  from the same float weights as they, for as long. It is no candidate of ``ours-best`` (which keeps the
  benchmark budget); :func:`best_row` over our rows and it gives *ours best, equal total* (bench.protocol).
- anchors: ``brevitas-a2q`` / ``brevitas-a2q+`` (:mod:`bench.anchors`), QAT from the float checkpoint;
  ``brevitas-a2q-eq`` / ``brevitas-a2q+-eq``: the same with the training that produced the committed
  W/A model added to their budget (:func:`equal_budget`), so that they have trained as long as our flows
  starting from that model.

Set-ups (``ModelBench.setup``, :data:`bench.anchors.SETUPS`): ``all`` constrains every MAC layer with
W-bit weights; ``paper`` (the A2Q papers') leaves the first and the last MAC layer at their natural
width (our flows give P to the hidden layers only, as ``--layer NAME=P``; the anchors keep the plain
W-bit quantizer there) and constrains the hidden ones.

Trained methods (``qat`` and the anchors) share one :class:`TrainBudget` per model: the same
training samples, epochs, batch size, learning rate and seed, and the best epoch on the same
validation samples (held out from the end of the training split). Both train weights and
activation scales (``train_act_scales``: Brevitas' QuantReLU scales are trained parameters).
Every score is on the test split.

Only the layers with W-bit weights are constrained (in set-up ``all``: all MAC layers except ESPCN's
fixed 8-bit first and last layers, as Brevitas' anchors do); widths, sparsity and simulated accumulators
refer to those layers (``free_width``: the widest exact accumulator of the other MAC layers). Our rows
are guaranteed: their exact accumulator range (``analyze_model``) fits P, so no input can overflow and
the test score equals the P-bit score.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from tqdm import tqdm

from bench.anchors import (ANCHOR_QUANTIZERS, SETUPS, TrainBudget, constrained_nodes, end_layers, export_check,
                           integer_layers, mac_module_names, predict, sparsity, train_anchor)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    family: str  # "baseline", "ours", "anchor"
    trained: bool = False


METHODS: tuple[Method, ...] = (
    Method("unconstrained-wrap", "unconstrained, P-bit wrap-around", "baseline"),
    Method("project-a2q", "ours: project a2q (PTQ)", "ours"),
    Method("project-exact", "ours: project exact (PTQ)", "ours"),
    Method("axe", "ours: AXE (PTQ)", "ours"),
    Method("qat", "ours: QAT finetune (a2q finetune defaults)", "ours", trained=True),
    Method("qat-float", "ours: QAT finetune from the float checkpoint", "ours", trained=True),
    Method("ours-best", "ours: best on validation", "ours"),
    Method("brevitas-a2q", "Brevitas A2Q (QAT)", "anchor", trained=True),
    Method("brevitas-a2q+", "Brevitas A2Q+ (QAT)", "anchor", trained=True),
    Method("brevitas-a2q-eq", "Brevitas A2Q (QAT), + the W/A model's own QAT budget", "anchor", trained=True),
    Method("brevitas-a2q+-eq", "Brevitas A2Q+ (QAT), + the W/A model's own QAT budget", "anchor", trained=True),
    Method("qat-float-eq", "ours: QAT finetune from the float checkpoint, + the W/A model's own QAT budget", "ours",
           trained=True),
)
OUR_METHODS = ("project-a2q", "project-exact", "axe", "qat", "qat-float")  # the candidates of ours-best
EQUAL_TOTAL_METHODS = (*OUR_METHODS, "qat-float-eq")  # the candidates of "ours best, equal total"
# run at ModelBench.equal_budget_widths
EQUAL_BUDGET_METHODS = ("qat-float", "brevitas-a2q-eq", "brevitas-a2q+-eq", "qat-float-eq")


@dataclass(frozen=True)
class ModelBench:
    """What to sweep for one model of the zoo."""

    name: str  # a models.nets model
    widths: tuple[int, ...]  # every P of the sweep (PTQ methods and the wrap-around simulation)
    train_widths: tuple[int, ...]  # the P where AXE, QAT and the anchors run (a subset of widths)
    budget: TrainBudget
    val_samples: int  # held out from the end of the training split, for best-epoch / best-method choice
    calibration_samples: int  # AXE calibration inputs (from the training subset)
    weight_bits: int = 4
    act_bits: int = 4
    test_limit: int | None = None  # None: the whole test split
    resources: bool = False  # FINN resource estimates of the ours-best rows
    setup: str = "all"  # which MAC layers are constrained (bench.anchors.SETUPS)
    equal_budget_widths: tuple[int, ...] = ()  # the P (of train_widths) where EQUAL_BUDGET_METHODS run
    methods: tuple[str, ...] | None = None  # run only these methods (None: every one of METHODS)

    def __post_init__(self) -> None:
        if self.setup not in SETUPS:
            raise ValueError(f"{self.name}: unknown set-up {self.setup!r}; expected one of {sorted(SETUPS)}")
        for label, subset, of in (("train_widths", self.train_widths, self.widths),
                                  ("equal_budget_widths", self.equal_budget_widths, self.train_widths)):
            if not set(subset) <= set(of):
                raise ValueError(f"{self.name}: {label} {sorted(set(subset) - set(of))} not among {sorted(of)}")

    @property
    def variant(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    @property
    def key(self) -> str:
        """The entry's name in the results: the model, with ``/paper`` for the A2Q papers' set-up."""
        return self.name if self.setup == "all" else f"{self.name}/{self.setup}"


@dataclass
class Context:
    """Data, the committed quantized model and its baseline figures for one model."""

    bench: ModelBench
    dataset: str
    metric: str
    base: ModelWrapper
    constrained: list[str]  # ONNX MAC nodes the set-up constrains
    plain_width: int  # widest exact accumulator of the committed model over the constrained layers
    plain_modules: tuple[str, ...]  # Brevitas modules the anchors leave at the plain W-bit quantizer
    extra_budget: "ExtraBudget"
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    float_score: float
    float_base: ModelWrapper | None = None  # float_start(), built on first use
    progress: bool = True  # progress bars of the rows and their training (off where models run concurrently)

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        from models.evaluate import score

        return float(score(self.dataset, outputs, targets))

    def loss(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        from models.evaluate import loss

        return loss(self.dataset, outputs, targets)

    def percent_of_float(self, value: float | None) -> float | None:
        return None if value is None else 100.0 * value / self.float_score


@dataclass(frozen=True)
class ExtraBudget:
    """The training that produced the committed W/A model (models/train.py), in epochs of the benchmark budget.

    That QAT ran ``qat_epochs`` epochs over the whole training split (``qat_samples``), from the same
    float checkpoint as the anchors. ``extra_epochs`` rounds ``qat_epochs x qat_samples`` up to whole
    epochs of the benchmark's training subset, so the ``-eq`` anchors train at least as many samples
    as our flows that start from the committed model.
    """

    qat_epochs: int
    qat_samples: int
    extra_epochs: int

    @classmethod
    def of(cls, bench: ModelBench, full_train_samples: int, budget_samples: int) -> "ExtraBudget":
        metrics = json.loads((MODELS_DIR / "metrics.json").read_text())
        qat_epochs = int(metrics[bench.name][bench.variant]["qat_epochs"])
        return cls(qat_epochs, full_train_samples, math.ceil(qat_epochs * full_train_samples / budget_samples))


def equal_budget(bench: ModelBench, extra: ExtraBudget) -> TrainBudget:
    """The benchmark budget plus the committed model's own QAT, as more epochs on the same training subset."""
    return replace(bench.budget, epochs=bench.budget.epochs + extra.extra_epochs)


def _model_digest(model: ModelWrapper) -> str:
    """Digest of the graph (nodes, weights), not of the model metadata the passes record widths in."""
    return hashlib.sha1(model.graph.SerializeToString()).hexdigest()


def load_context(bench: ModelBench) -> Context:
    """Load the splits, the committed model and the float score (re-evaluated from the float checkpoint)."""
    import torch

    from a2q_passes.analysis import analyze_model
    from a2q_passes.model_io import load_model
    from models.data import load_dataset
    from models.nets import MODELS, build_model, load_float_weights

    spec = MODELS[bench.name]
    x_train, y_train = load_dataset(spec.dataset, "train")
    x_test, y_test = load_dataset(spec.dataset, "test")
    if bench.test_limit is not None:
        x_test, y_test = x_test[:bench.test_limit], y_test[:bench.test_limit]
    n_fit = len(x_train) - bench.val_samples
    if n_fit < 1:
        raise ValueError(f"{bench.name}: {bench.val_samples} validation samples leave no training data")
    train = (x_train[:min(bench.budget.samples, n_fit)], y_train[:min(bench.budget.samples, n_fit)])
    val = (x_train[n_fit:], y_train[n_fit:])
    base = load_model(MODELS_DIR / f"{bench.name}_{bench.variant}.onnx")
    constrained = constrained_nodes(base, bench.weight_bits, bench.setup)
    if not constrained:
        raise ValueError(f"{bench.name}: no MAC layer with INT{bench.weight_bits} weights to constrain in set-up "
                         f"{bench.setup!r}")
    widths = {r.node: r.bounds["exact"] for r in analyze_model(base).layers if r.node in constrained}
    plain_modules = end_layers(mac_module_names(build_model(bench.name, bench.weight_bits, bench.act_bits))) \
        if bench.setup == "paper" else ()
    float_model = load_float_weights(build_model(bench.name, None, None), MODELS_DIR / "checkpoints" / f"{bench.name}_float.pt")
    with torch.no_grad():
        float_outputs = predict(float_model, x_test)
    ctx = Context(bench=bench, dataset=spec.dataset, metric="PSNR dB" if spec.dataset == "sr" else "top-1 %",
                  base=base, constrained=constrained, plain_width=max(widths.values()), plain_modules=plain_modules,
                  extra_budget=ExtraBudget.of(bench, len(x_train), len(train[0])), train=train, val=val,
                  test=(x_test, y_test), float_score=0.0)
    ctx.float_score = ctx.score(float_outputs, y_test)
    return ctx


def float_start(ctx: Context) -> ModelWrapper:
    """The float checkpoint in the committed model's W/A layout, exported to QONNX: our flows' start from the
    anchors' weights.

    Weights: Brevitas' per-channel W-bit quantizer (round to nearest) of the float weights, as the anchors'
    first step sees them; activation scales: Brevitas' own statistics (``collect_stats_steps`` forward passes
    in training mode, no weight update) over the first batches of the training subset, as the anchors'
    first training steps collect them.
    """
    import torch

    from a2q_passes.model_io import load_model
    from models.export import export_qonnx_model
    from models.nets import MODELS, UintActQuant, build_model, load_float_weights

    if ctx.float_base is not None:
        return ctx.float_base
    bench = ctx.bench
    torch.manual_seed(bench.budget.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_float_weights(build_model(bench.name, bench.weight_bits, bench.act_bits),
                                   MODELS_DIR / "checkpoints" / f"{bench.name}_float.pt")
        model.train()
        size = bench.budget.batch_size
        with torch.no_grad():
            for step in range(UintActQuant.collect_stats_steps + 1):  # the last pass turns the statistics into scales
                start = (step * size) % len(ctx.train[0])
                model(torch.from_numpy(ctx.train[0][start:start + size]))
        with tempfile.TemporaryDirectory() as folder:
            export_qonnx_model(model, MODELS[bench.name].input_shape, Path(folder) / "float_start.onnx")
            ctx.float_base = load_model(Path(folder) / "float_start.onnx", stream=False)
    return ctx.float_base


# --------------------------------------------------------------------------- rows


def new_row(ctx: Context, method: str, acc_bits: int | None, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": ctx.bench.name, "variant": ctx.bench.variant, "method": method, "P": acc_bits,
        "seed": ctx.bench.budget.seed, "status": "ok",
        "score": None, "pct_of_float": None, "val_score": None, "val_loss": None, "sparsity": None,
        "guaranteed_width": None, "free_width": None, "overflow_fraction": None, "seconds": None, "note": "",
    }
    row.update(fields)
    row["pct_of_float"] = ctx.percent_of_float(row["score"])
    return row


class OnnxScorer:
    """Scores ONNX models on test and validation data, caching by model content."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._cache: dict[str, dict[str, Any]] = {}

    def measure(self, model: ModelWrapper) -> dict[str, Any]:
        """Test and validation score, guaranteed width and sparsity over the constrained layers, and the widest
        exact accumulator of the other MAC layers (``free_width``, None when every one is constrained)."""
        from a2q_passes.analysis import analyze_model
        from a2q_passes.layers import find_mac_layers
        from models.evaluate import predict_onnx

        key = _model_digest(model)
        if key not in self._cache:
            ctx = self.ctx
            reports = {r.node: r for r in analyze_model(model).layers}
            rows = [layer.integer_rows(model) for layer in find_mac_layers(model) if layer.node in ctx.constrained]
            free = [r.bounds["exact"] for name, r in reports.items() if name not in ctx.constrained and r.status == "ok"]
            val_outputs = predict_onnx(model, ctx.val[0])
            self._cache[key] = {
                "score": ctx.score(predict_onnx(model, ctx.test[0]), ctx.test[1]),
                "val_score": ctx.score(val_outputs, ctx.val[1]),
                "val_loss": ctx.loss(val_outputs, ctx.val[1]),
                "guaranteed_width": max(reports[name].bounds["exact"] for name in ctx.constrained),
                "free_width": max(free, default=None),
                "sparsity": sparsity(rows),
            }
        return dict(self._cache[key])


def _unconstrained_wrap(ctx: Context, scorer: OnnxScorer, acc_bits: int) -> dict[str, Any]:
    from a2q_passes.data_simulation import simulate_model

    measured = scorer.measure(ctx.base)
    if ctx.plain_width <= acc_bits:  # proven: no input can overflow, so the P-bit result is the exact one
        return {**measured, "overflow_fraction": 0.0, "note": "fits already (no overflow possible)"}
    simulation = simulate_model(ctx.base, ctx.test[0], {name: acc_bits for name in ctx.constrained}, mode="wrap")
    output = next(iter(simulation.outputs))
    accumulations = sum(simulation.accumulations.values())
    return {**measured, "score": ctx.score(simulation.outputs[output], ctx.test[1]), "val_score": None,
            "val_loss": None,
            "overflow_fraction": sum(simulation.overflows.values()) / accumulations}


def _project(ctx: Context, method: str, acc_bits: int) -> ModelWrapper:
    from a2q_passes.transforms.project import ProjectToAccumulator

    return ctx.base.transform(ProjectToAccumulator(layer_bits={n: acc_bits for n in ctx.constrained}, method=method))


def _finetune(ctx: Context, method: str, acc_bits: int, start: ModelWrapper,
              budget: TrainBudget | None = None) -> ModelWrapper:
    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.transforms.finetune import FinetuneAccumulators

    budget = budget or ctx.bench.budget
    # the "qat" rows are `a2q finetune`'s defaults (method and init), so the benchmark follows the CLI
    fields = {"method": "axe"} if method == "axe" else {}
    config = FinetuneConfig(**fields, loss="mse" if ctx.dataset == "sr" else "ce", epochs=budget.epochs,
                            lr=budget.lr, batch_size=budget.batch_size, seed=budget.seed, device="cpu",
                            train_act_scales=True,  # as the anchors, whose QuantReLU scales are trained parameters
                            progress=ctx.progress, log=lambda line: tqdm.write(f"    {method} P={acc_bits}: {line}"))
    step = FinetuneAccumulators(None, ctx.train, ctx.val, config, overrides={n: acc_bits for n in ctx.constrained},
                                calibration_samples=ctx.bench.calibration_samples)
    return start.transform(step)


def _anchor(ctx: Context, method: str, acc_bits: int) -> dict[str, Any]:
    """One anchor row; ``-eq`` methods train with :func:`equal_budget`."""
    bench = ctx.bench
    quantizer = ANCHOR_QUANTIZERS[method.removesuffix("-eq")]
    budget = equal_budget(bench, ctx.extra_budget) if method.endswith("-eq") else bench.budget
    run = train_anchor(bench.name, quantizer, acc_bits, bench.weight_bits, bench.act_bits, ctx.train, ctx.val,
                       ctx.score, budget, MODELS_DIR / "checkpoints" / f"{bench.name}_float.pt",
                       desc=f"{method} P={acc_bits}", plain_layers=ctx.plain_modules, progress=ctx.progress)
    layers = integer_layers(run.model, quantizer, ctx.test[0])
    export = export_check(run.model, bench.name, acc_bits, bench.weight_bits, ctx.test[0], ctx.test[1], ctx.score,
                          setup=bench.setup)
    return {
        "score": ctx.score(predict(run.model, ctx.test[0]), ctx.test[1]),
        "val_score": max(run.val_history), "best_epoch": run.best_epoch, "epochs": budget.epochs,
        "guaranteed_width": max(layer.exact_width for layer in layers),
        "sparsity": sparsity([layer.rows for layer in layers]),
        **export,
    }


def _guarantee(width: int, acc_bits: int) -> dict[str, Any]:
    """Our rows must fit P exactly; then no input can overflow (so no data simulation is needed)."""
    if width <= acc_bits:
        return {"overflow_fraction": 0.0}
    return {"status": "guarantee broken", "note": f"needs {width} bits > P={acc_bits}"}


def ours_best_key(row: dict[str, Any]) -> tuple[float, float, int]:
    """Ranks our rows at one P for ``ours-best``: the validation score, ties (common on a small validation split)
    broken by the lower validation loss, then by the method listed first (the cheaper one). Rows saved before
    the loss was stored (no ``val_loss``) tie on it."""
    loss = row.get("val_loss")
    return row["val_score"], -(loss if loss is not None else 0.0), -EQUAL_TOTAL_METHODS.index(row["method"])


def best_row(rows: list[dict[str, Any]], methods: tuple[str, ...] = OUR_METHODS) -> dict[str, Any] | None:
    """The ``ours-best`` fields of the best (:func:`ours_best_key`) ``ok`` row of ``methods`` among ``rows`` (one
    P and seed), naming it in ``selected``; ``None`` where none has a validation score."""
    candidates = [r for r in rows if r["method"] in methods and r["status"] == "ok" and r["val_score"] is not None]
    if not candidates:
        return None
    chosen = max(candidates, key=ours_best_key)
    fields = {k: chosen.get(k) for k in ("score", "pct_of_float", "val_score", "val_loss", "sparsity",
                                         "guaranteed_width", "free_width", "overflow_fraction")}
    return {**fields, "selected": chosen["method"], "note": f"= {chosen['method']}"}


def _ours_best(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return best_row(rows) or {"status": "not run", "note": "none of our rows ran at this P"}


def jobs(bench: ModelBench) -> list[tuple[int, str]]:
    """(P, method) pairs in run order; ``ours-best`` comes after our four methods at each P."""
    return [(p, m.key) for p in bench.widths for m in METHODS if bench.methods is None or m.key in bench.methods]


def run_model(bench: ModelBench, on_row: Callable[[dict[str, Any]], None] | None = None,
              keep_models: bool = False, progress: bool = True
              ) -> tuple[Context, list[dict[str, Any]], dict[int, ModelWrapper]]:
    """Every row of one model (baselines first); ``keep_models`` also returns the ours-best model per P;
    ``progress=False`` turns off the progress bars (the rows still go to ``on_row``)."""
    started = time.perf_counter()
    ctx = replace(load_context(bench), progress=progress)
    scorer = OnnxScorer(ctx)
    base = scorer.measure(ctx.base)
    rows = [
        new_row(ctx, "float", None, score=ctx.float_score, seconds=round(time.perf_counter() - started, 1),
                note="float checkpoint, torch"),
        new_row(ctx, "quantized", None, **base, overflow_fraction=0.0,
                note=f"committed {bench.variant} QONNX, exact accumulation"),
    ]
    best_models: dict[int, ModelWrapper] = {}
    models_at_p: dict[str, ModelWrapper] = {}
    bar = tqdm(jobs(bench), desc=bench.name, unit="row", disable=not progress)
    for acc_bits, method in bar:
        bar.set_postfix_str(f"P={acc_bits} {method}")
        if method == "unconstrained-wrap":
            models_at_p = {}
        t0 = time.perf_counter()
        trained_here = acc_bits in (bench.equal_budget_widths if method in EQUAL_BUDGET_METHODS else bench.train_widths)
        fields: dict[str, Any]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "unconstrained-wrap":
                fields = _unconstrained_wrap(ctx, scorer, acc_bits)
            elif method in ("project-a2q", "project-exact"):
                models_at_p[method] = _project(ctx, method.removeprefix("project-"), acc_bits)
                fields = scorer.measure(models_at_p[method])
            elif method == "axe" and ctx.plain_width <= acc_bits:
                models_at_p[method] = ctx.base
                fields = {**base, "note": "fits already: the committed model, unchanged"}
            elif method in ("axe", "qat") and trained_here:
                models_at_p[method] = _finetune(ctx, method, acc_bits, ctx.base)
                fields = scorer.measure(models_at_p[method])
            elif method == "qat-float" and trained_here:
                models_at_p[method] = _finetune(ctx, "qat", acc_bits, float_start(ctx))
                fields = scorer.measure(models_at_p[method])
            elif method == "qat-float-eq" and trained_here:
                model = _finetune(ctx, "qat", acc_bits, float_start(ctx), equal_budget(bench, ctx.extra_budget))
                fields = scorer.measure(model)
            elif method == "ours-best":
                fields = _ours_best(ctx, [r for r in rows if r["P"] == acc_bits])
                if keep_models:
                    best_models[acc_bits] = models_at_p[fields["selected"]]
            elif method.removesuffix("-eq") in ANCHOR_QUANTIZERS and trained_here:
                fields = _anchor(ctx, method, acc_bits)
            else:
                which = "equal-budget" if method in EQUAL_BUDGET_METHODS else "trained"
                fields = {"status": "not run", "note": f"P={acc_bits} is not in the {which} widths"}
        if method in EQUAL_TOTAL_METHODS and fields.get("status", "ok") == "ok":
            fields.update(_guarantee(fields["guaranteed_width"], acc_bits))
        row = new_row(ctx, method, acc_bits, seconds=round(time.perf_counter() - t0, 1), **fields)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    bar.close()
    return ctx, rows, best_models


def finn_resources(model: ModelWrapper, fpgapart: str) -> dict[str, Any]:
    """Lower with ``LowerToFINN`` (each MVAU/VVAU gets its exact accumulator type) and estimate resources.

    Returns FINN's totals at INT32 and at the lowered widths, and the ratio of threshold-storage
    plus accumulator-register bits (INT32 / lowered).
    """
    from a2q_passes.resources import resource_report
    from a2q_passes.transforms.lower import LowerToFINN

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # FINN prints its notices
        warnings.simplefilter("ignore")
        hw = model.transform(LowerToFINN())
    report = resource_report(hw, fpgapart)
    totals = report["totals"]
    bits = {config: totals[config]["threshold_storage_bits"] + totals[config]["acc_register_bits"]
            for config in ("int32", "target")}
    return {
        "fpgapart": report["fpgapart"],
        "acc_dtypes": {layer["node"]: layer["target"]["acc_dtype"] for layer in report["layers"]},
        "int32": totals["int32"], "target": totals["target"],
        "threshold_plus_acc_bits": bits,
        "threshold_plus_acc_ratio": round(bits["int32"] / bits["target"], 3) if bits["target"] else None,
        "lut_ratio": report["ratio_int32_over_target"]["LUT"],
        "bram_ratio": report["ratio_int32_over_target"]["BRAM18"],
    }
