"""``AllocateAccumulators``: choose an accumulator width per layer (mixed allocation), graph side.

1. **Candidates**: every layer ``project`` narrows (quantized weights on a quantized input, not bipolar, no weight
   zero point; ``method="finetune"``: QONNX ``Quant`` weights) from its exact width down to its smallest feasible
   width (:func:`a2q_passes.projection.min_feasible_acc_bits`; :mod:`a2q_passes.allocation_layers`).
2. **Cost** of each candidate from a cost model of :mod:`a2q_passes.allocation`. The layer shapes
   it needs (MH, PE, output bits, thresholds or not, FINN's LUT estimate per width) come from
   FINN's own lowering of the model and :func:`a2q_passes.resources.resource_report`, matched to
   the QONNX layers by weight signature; a cost model that needs no FINN (``acc-bits``) gets them from the
   analysis (:func:`a2q_passes.allocation_layers.analysis_layer_shapes`: PE = 1, no thresholds).
3. **Sensitivity**: the score on the calibration data when only that layer is projected
   (:class:`~a2q_passes.transforms.project.ProjectToAccumulator`) to the candidate width. The score
   is the fine-tuning validation metric (:class:`a2q_passes.scoring.Scorer`): top-1 %
   or PSNR dB, against the data's ``y`` or, without it, against the original model's outputs.
   With a score target, a layer's descent stops at the first width whose score alone misses it
   (``method="project"`` only: fine-tuning wins back much of what projection alone loses, so with
   ``method="finetune"`` every width down to the smallest feasible one stays a candidate).
4. **Knapsack**: exact multiple-choice knapsack over the candidates (additive loss model).
5. **Refinement** (score target only), with real end-to-end evaluation on the validation data: while
   the allocation misses the target, one bit goes back to the layer whose predicted loss falls most
   per unit of cost; then layers not raised try one bit less at a time, kept where the score still
   meets the target (the additive estimate is often pessimistic). With ``method="finetune"`` the
   projection sensitivities are pessimistic, so the refinement first finds, by bisection, the least
   uniform P whose fine-tuned model meets the target, and starts from it wherever the knapsack's
   pick (raised until it meets the target) would cost as much or more; the allocation is then never
   dearer than the best uniform width it found.
6. The output model is the input projected to the allocation (``method="finetune"``: fine-tuned at
   it by :class:`~a2q_passes.transforms.finetune.FinetuneAccumulators`). ``ensures`` proves every
   allocated width on it with :func:`a2q_passes.verification.verify_model`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from tqdm import tqdm

from a2q_passes.allocation import (
    DEFAULT_COST_MODEL, Choice, CostModel, LayerShape, get_cost_model, layer_cost, minimum_cost, needs_finn,
    pareto_front, solve_max_score, solve_min_cost,
)
from a2q_passes.allocation_layers import LayerCandidates, allocatable_layers, analysis_layer_shapes, finn_layer_shapes
from a2q_passes.errors import A2QError, PostconditionError, PreconditionError
from a2q_passes.finetune.train import FinetuneConfig
from a2q_passes.methods import DEFAULT_METHOD, get_method
from a2q_passes.passes import A2QPass, PassResult
from a2q_passes.scoring import DataLike, Scorer
from a2q_passes.transforms.finetune import FinetuneAccumulators
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.verification import verify_model

ALLOCATION_METHODS = ("project", "finetune")
DEFAULT_FPGAPART = "xczu3eg-sbva484-1-e"  # the part of the FINN resource benchmark


# --------------------------------------------------------------------------- end-to-end


def project_to(model: ModelWrapper, widths: dict[str, int], method: str = DEFAULT_METHOD,
               input_ranges: str = "exact") -> ModelWrapper:
    """``model`` with every named layer projected to its width (recorded in the metadata)."""
    return model.transform(ProjectToAccumulator(None, widths, method, input_ranges=input_ranges))


def _total(layers: list[LayerCandidates], widths: dict[str, int], cost: CostModel) -> int:
    return sum(layer_cost(cost, layer.shape, widths[layer.node]) for layer in layers)


def _predicted_loss(layers: list[LayerCandidates], widths: dict[str, int], base: float) -> float:
    return float(sum(max(0.0, base - layer.scores[widths[layer.node]]) for layer in layers))


@dataclass
class RefinementStep:
    action: str  # "knapsack", "raise", "uniform" (fine-tuning's start), "lower" (kept) or "lower rejected"
    node: str | None
    widths: dict[str, int]
    score: float


class AllocateAccumulators(A2QPass):
    """Pick a width per layer: least cost at ``min_score_pct`` % of the model's score, or best score within ``budget``.

    ``data``: calibration data (sensitivities; fine-tuning data for ``method="finetune"`` unless
    ``train`` is given); ``val``: validation data for the end-to-end checks (default: ``data``);
    ``train``: fine-tuning data (``method="finetune"`` only; default: ``data``). ``budget`` is in the
    units of ``cost_model``. ``early_stop=False`` scores every candidate down to the smallest
    feasible width even with a score target (full Pareto fronts). End-to-end scores are kept per
    allocation (:meth:`score`; fine-tuning is deterministic for one ``finetune_config.seed``). ``shapes(model, {layer: widths})``
    replaces the FINN lowering that provides the cost-model facts. Results: ``self.widths``,
    ``self.layers`` and ``self.result.details``.
    """

    def __init__(self, data: DataLike, val: DataLike | None = None, *, min_score_pct: float | None = None,
                 budget: int | None = None, cost_model: str = DEFAULT_COST_MODEL, method: str = "project",
                 projection_method: str = DEFAULT_METHOD, metric: str = "auto", fpgapart: str = DEFAULT_FPGAPART,
                 finetune_config: FinetuneConfig | None = None, refine: bool = True, early_stop: bool = True,
                 progress: bool = True,
                 shapes: Callable[[ModelWrapper, dict[str, list[int]]], dict[str, LayerShape]] | None = None,
                 input_ranges: str = "exact", train: DataLike | None = None) -> None:
        super().__init__()
        self.input_ranges = input_ranges
        if train is not None and method != "finetune":
            raise A2QError("fine-tuning data (--train) is only used by --method finetune")
        if (min_score_pct is None) == (budget is None):
            raise A2QError("give exactly one target: a minimum score (--min-score-pct) or a budget (--budget-bits / "
                           "--budget-lut)")
        if min_score_pct is not None and not 0 < min_score_pct <= 100:
            raise A2QError(f"--min-score-pct must be in (0, 100], got {min_score_pct}")
        if budget is not None and budget < 0:
            raise A2QError(f"the budget must be non-negative, got {budget}")
        if method not in ALLOCATION_METHODS:
            raise A2QError(f"--method must be one of {', '.join(ALLOCATION_METHODS)}, got '{method}'")
        try:
            self.cost_model = get_cost_model(cost_model)
            get_method(projection_method)
        except ValueError as err:
            raise A2QError(str(err)) from err
        self.min_score_pct, self.budget, self.method = min_score_pct, budget, method
        self.projection_method, self.metric, self.fpgapart, self.refine = projection_method, metric, fpgapart, refine
        self.finetune_config = finetune_config or FinetuneConfig(epochs=1, progress=False, log=lambda line: None)
        self.progress, self.early_stop = progress, early_stop
        if shapes is None:
            shapes = ((lambda model, widths: finn_layer_shapes(model, widths, fpgapart))
                      if needs_finn(self.cost_model) else analysis_layer_shapes)
        self._shapes = shapes
        self._data_source, self._val_source, self._train_source = data, val, train
        self.widths: dict[str, int] = {}
        self._scores: dict[tuple[tuple[str, int], ...], float] = {}  # allocation -> end-to-end validation score

    def requires(self, model: ModelWrapper) -> None:
        try:
            self._layers = allocatable_layers(model, self.input_ranges, self.method)
        except A2QError as err:
            hint = " (--method finetune trains QONNX Quant weights only; --method project takes every format)" \
                if self.method == "finetune" else ""
            raise PreconditionError(f"nothing to allocate{hint}: {err}") from err
        if not self._layers:
            raise PreconditionError("nothing to allocate: every constrainable layer has bipolar weights")
        fallback = self.method == "project"  # scoring only: onnxruntime or qonnx runs what the bridge cannot
        self.scorer = Scorer(model, self._data_source, self.metric, "calibration data", fallback)
        self.val_scorer = (Scorer(model, self._val_source, self.scorer.metric, "validation data", fallback)
                           if self._val_source is not None else self.scorer)
        # without y, training targets are the original model's outputs, as for scoring
        self.train_data = (Scorer(model, self._train_source, self.scorer.metric, "fine-tuning data").data
                           if self._train_source is not None else self.scorer.data)

    # ------------------------------------------------------------------ steps

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=not self.progress)

    def end_to_end(self, model: ModelWrapper, widths: dict[str, int]) -> tuple[ModelWrapper, float]:
        """``model`` projected (or fine-tuned) at ``widths``, and its validation score."""
        if self.method == "finetune":
            config = replace(self.finetune_config, loss=self.scorer.loss)  # train on what is scored
            step = FinetuneAccumulators(None, self.train_data, self.val_scorer.data, config, overrides=widths,
                                        input_ranges=self.input_ranges)
            out = step(model).model
        else:
            out = project_to(model, widths, self.projection_method, self.input_ranges)
        score = self.val_scorer(out)
        self._scores[tuple(sorted(widths.items()))] = score
        return out, score

    def score(self, model: ModelWrapper, widths: dict[str, int]) -> float:
        """The validation score of :meth:`end_to_end` at ``widths``, computed once per allocation.

        Only scores are kept: a fine-tune per evaluated allocation is the expensive part, and
        keeping each model would hold one copy of the weights per allocation.
        """
        key = tuple(sorted(widths.items()))
        if key not in self._scores:
            self.end_to_end(model, widths)
        return self._scores[key]

    def _sensitivities(self, model: ModelWrapper, base: float, floor: float | None) -> list[LayerCandidates]:
        widths = {node: list(range(exact, smallest - 1, -1)) for node, exact, smallest in self._layers}
        shapes = self._shapes(model, widths)
        layers = [LayerCandidates(node, exact, smallest, shapes[node]) for node, exact, smallest in self._layers]
        with self._bar(sum(len(w) - 1 for w in widths.values()), "sensitivity") as bar:
            for layer in layers:
                layer.scores[layer.exact_bits] = base  # projection leaves weights that already fit untouched
                for bits in widths[layer.node][1:]:
                    score = self.scorer(project_to(model, {layer.node: bits}, self.projection_method, self.input_ranges))
                    bar.update(1)
                    if floor is not None and score < floor:  # alone it misses the target: never part of a pick
                        bar.update(bits - layer.min_feasible_bits)
                        break
                    layer.scores[bits] = score
                try:
                    layer.costs = {bits: layer_cost(self.cost_model, layer.shape, bits) for bits in layer.widths()}
                except ValueError as err:
                    raise A2QError(f"cost model '{self.cost_model.name}': {err}") from err
        return layers

    @staticmethod
    def choice_groups(layers: list[LayerCandidates], base: float) -> list[list[Choice]]:
        """Knapsack candidates per layer, widest first: cost and predicted loss (score drop, never below 0)."""
        return [[Choice(bits, layer.costs[bits], max(0.0, base - layer.scores[bits])) for bits in layer.widths()]
                for layer in layers]

    def _raise_one(self, layers: list[LayerCandidates], widths: dict[str, int], base: float) -> str | None:
        """The layer whose predicted loss falls most per unit of cost when it gets one bit back."""
        best, best_key = None, None
        for layer in layers:
            bits = widths[layer.node]
            if bits >= layer.exact_bits:
                continue
            loss_now, loss_up = (max(0.0, base - layer.scores[b]) for b in (bits, bits + 1))
            extra = max(layer.costs[bits + 1] - layer.costs[bits], 1)
            key = ((loss_now - loss_up) / extra, loss_now, -extra)
            if best_key is None or key > best_key:
                best, best_key = layer.node, key
        return best

    def _uniform_start(self, model: ModelWrapper, layers: list[LayerCandidates],
                       target: float) -> tuple[dict[str, int], ModelWrapper, float] | None:
        """The least uniform P whose end-to-end model meets ``target``, by bisection; None if none does.

        Bisection assumes the score rises with P, which fine-tuned scores do up to noise; a P it
        skips only costs a cheaper start, never a wrong claim (every width is proven on the output).
        """
        low, high = max(la.min_feasible_bits for la in layers), max(la.exact_bits for la in layers)
        found = None
        with self._bar(0, "uniform start") as bar:
            while low <= high:
                p = (low + high) // 2
                widths = uniform_widths(layers, p)
                out, score = self.end_to_end(model, widths)
                bar.update(1)
                if score >= target:
                    found, high = (widths, out, score), p - 1
                else:
                    low = p + 1
        return found

    def _refine(self, model: ModelWrapper, layers: list[LayerCandidates], widths: dict[str, int], base: float,
                target: float) -> tuple[dict[str, int], ModelWrapper, float, list[RefinementStep]]:
        # fine-tuning: the projection sensitivities behind the knapsack are pessimistic; a uniform P may be cheaper
        start = self._uniform_start(model, layers, target) if self.method == "finetune" else None
        start_cost = _total(layers, start[0], self.cost_model) if start is not None else None
        history: list[RefinementStep] = []
        raised: set[str] = set()
        with self._bar(0, "refine") as bar:
            if start_cost is None or _total(layers, widths, self.cost_model) < start_cost:
                out, score = self.end_to_end(model, widths)
                history.append(RefinementStep("knapsack", None, dict(widths), score))
                while score < target and (start_cost is None or _total(layers, widths, self.cost_model) < start_cost):
                    node = self._raise_one(layers, widths, base)
                    if node is None:  # every layer at its exact width: the input model itself
                        break
                    widths = {**widths, node: widths[node] + 1}
                    raised.add(node)
                    out, score = self.end_to_end(model, widths)
                    history.append(RefinementStep("raise", node, dict(widths), score))
                    bar.update(1)
            if start is not None and (not history or history[-1].score < target
                                      or _total(layers, widths, self.cost_model) >= start_cost):
                widths, out, score = start
                raised = set()
                history.append(RefinementStep("uniform", None, dict(widths), score))
            if not self.refine:
                return widths, out, score, history
            frozen = set(raised)
            while True:
                trials = []
                for layer in layers:
                    bits = widths[layer.node]
                    if layer.node in frozen or bits - 1 not in layer.scores:
                        continue
                    saving = layer.costs[bits] - layer.costs[bits - 1]
                    extra_loss = max(0.0, base - layer.scores[bits - 1]) - max(0.0, base - layer.scores[bits])
                    trials.append((-saving / max(extra_loss, 1e-9), layer.node))
                if not trials:
                    break
                node = min(trials)[1]
                trial = {**widths, node: widths[node] - 1}
                trial_out, trial_score = self.end_to_end(model, trial)
                bar.update(1)
                if trial_score >= target:
                    widths, out, score = trial, trial_out, trial_score
                    history.append(RefinementStep("lower", node, dict(widths), score))
                else:
                    frozen.add(node)
                    history.append(RefinementStep("lower rejected", node, dict(trial), trial_score))
        return widths, out, score, history

    def call(self, model: ModelWrapper) -> PassResult:
        base = self.scorer(model)
        base_val = self.val_scorer(model) if self.val_scorer is not self.scorer else base
        floor = self.min_score_pct / 100.0 * base if self.min_score_pct is not None else None
        # fine-tuning recovers widths whose projection alone misses the target: keep them as candidates
        early_stop = self.early_stop and self.method == "project"
        layers = self._sensitivities(model, base, floor if early_stop else None)
        groups = self.choice_groups(layers, base)
        history: list[RefinementStep] = []
        if self.min_score_pct is not None:
            pick = solve_min_cost(groups, base - floor)
            widths = {layer.node: groups[i][j].bits for i, (layer, j) in enumerate(zip(layers, pick.picks))}
            target = self.min_score_pct / 100.0 * base_val
            widths, out, score, history = self._refine(model, layers, widths, base, target)
        else:
            pick = solve_max_score(groups, self.budget)
            if pick is None:
                raise A2QError(f"budget {self.budget} ({self.cost_model.name}) is below the least cost any allocation "
                               f"reaches, {minimum_cost(groups)} (every layer at its smallest feasible width)")
            widths = {layer.node: groups[i][j].bits for i, (layer, j) in enumerate(zip(layers, pick.picks))}
            target = None
            out, score = self.end_to_end(model, widths)
        self.widths = widths
        details = {
            "metric": self.scorer.unit, "method": self.method, "projection_method": self.projection_method,
            "input_ranges": self.input_ranges,
            "cost_model": self.cost_model.name, "objective": (
                {"min_score_pct": self.min_score_pct} if self.min_score_pct is not None else {"budget": self.budget}),
            "base_score": base, "base_val_score": base_val, "target_val_score": target, "val_score": score,
            "meets_target": None if target is None else score >= target,
            "score_pct": 100.0 * score / base_val if base_val else None,
            "predicted_loss": _predicted_loss(layers, widths, base),
            "cost": _total(layers, widths, self.cost_model),
            "cost_exact_widths": _total(layers, {la.node: la.exact_bits for la in layers}, self.cost_model),
            **allocation_costs(layers, widths), "widths": dict(widths), "layers": [layer.to_json() for layer in layers],
            "refinement": [asdict(step) for step in history],
        }
        self.layers = layers
        return PassResult(out, True, details)

    def ensures(self, result: PassResult) -> None:
        report = verify_model(result.model, self.widths, input_ranges=self.input_ranges)
        if not report.overflow_impossible:
            names = ", ".join(f"{v.node} ({v.proof})" for v in report.blocking)
            raise PostconditionError(f"allocated widths not proven on the output model: {names}")


def uniform_widths(layers: list[LayerCandidates], p: int) -> dict[str, int]:
    """Every layer at ``p``, or at its exact width where that is narrower (FINN keeps the exact width)."""
    return {layer.node: min(p, layer.exact_bits) for layer in layers}


def allocation_costs(layers: list[LayerCandidates], widths: dict[str, int]) -> dict[str, int | None]:
    """Accumulator + threshold bits and FINN's LUT estimate (None where not tabulated) of an allocation."""
    bits = _total(layers, widths, get_cost_model("bits"))
    tabulated = all(widths[la.node] in la.shape.finn_lut for la in layers)
    return {"acc_threshold_bits": bits,
            "finn_lut": _total(layers, widths, get_cost_model("finn-lut")) if tabulated else None}


# --------------------------------------------------------------------------- Pareto fronts


def pareto_curves(model: ModelWrapper, step: AllocateAccumulators, points: int = 8,
                  progress: bool = True) -> dict[str, Any]:
    """Cost vs end-to-end validation score: uniform P against the knapsack's Pareto front (after ``step`` ran).

    Uniform P runs from the widest exact width down to the narrowest P every layer can take, and
    stops after the first P that scores below 75 % of the model's own validation score (narrower
    ones score lower still, and each may cost a fine-tune); a
    layer's cost at uniform P is its cost at ``min(P, exact)`` (FINN keeps the exact width when it
    is narrower). Up to ``points`` picks of the knapsack front whose predicted loss is at most 25 %
    of the calibration score, spread evenly along it, are projected (or fine-tuned) and scored end to end.
    """
    layers, cost = step.layers, step.cost_model
    lowest = max(layer.min_feasible_bits for layer in layers)
    uniform_ps = list(range(max(layer.exact_bits for layer in layers), lowest - 1, -1))
    base = step.scorer(model)
    floor = 0.75 * step.val_scorer(model)
    # the front's cheap end predicts chance-level scores; keep the region a target can sit in
    front = [pick for pick in pareto_front(step.choice_groups(layers, base)) if pick.loss <= 0.25 * abs(base)]
    if len(front) > points:
        front = [front[int(round(i))] for i in np.linspace(0, len(front) - 1, points)]
    uniform, allocated = [], []
    with tqdm(total=len(uniform_ps) + len(front), desc="pareto", leave=False, file=sys.stderr,
              disable=not progress) as bar:
        for p in uniform_ps:
            widths = uniform_widths(layers, p)
            score = step.score(model, widths)
            uniform.append({"P": p, "widths": widths, "cost": _total(layers, widths, cost),
                            **allocation_costs(layers, widths), "score": score})
            bar.update(1)
            if score < floor:
                bar.update(len(uniform_ps) - len(uniform))
                break
        for pick in front:
            widths = {layer.node: layer.widths()[j] for layer, j in zip(layers, pick.picks)}
            score = step.score(model, widths)
            allocated.append({"widths": widths, "cost": pick.cost, "predicted_loss": pick.loss,
                              **allocation_costs(layers, widths), "score": score})
            bar.update(1)
    return {"cost_model": cost.name, "metric": step.scorer.unit, "uniform": uniform, "allocation": allocated}
