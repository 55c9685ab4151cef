"""``FinetuneAccumulators``: win accuracy back at a target accumulator width, by training or by AXE.

Methods: ``norm`` (default), ``qat`` and ``a2q`` train through the torch bridge with the constraint and
initialisation (``config.init``) of :mod:`a2q_passes.finetune.constraint`; ``axe`` is post-training (:mod:`a2q_passes.finetune.calibration`)
and only needs unlabelled calibration inputs. Every method ends with the exact re-check of what
the graph's own quantizers produce (:func:`~a2q_passes.finetune.selection.enforce_widths`), and
the pass proves its promise on its own output: the exact accumulator width of every constrained
layer, from :func:`~a2q_passes.analysis.analyze_model`, is at most its target (with ``tile``, every
partial sum within each tile too). The graph keeps its structure; the targets are recorded in the
model metadata (``a2q.accumulators``, ``source: finetune``), so ``a2q verify`` needs no widths.

Training updates every Quant weight, also of layers without a target; none of them may come out
needing a wider accumulator than before. Held layers (:attr:`Selection.held`) are projected back by
``enforce_widths``; any other readable one that grew (bipolar weights, which projection cannot
shrink) gets its original weights and weight scale back. ``details["untargeted"]`` lists every
untargeted layer whose width changed, and ``ensures`` checks none grew.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import A2QError, PostconditionError
from a2q_passes.finetune.calibration import REFRESH, run_axe
from a2q_passes.finetune.constraint import TRAINING_METHODS
from a2q_passes.finetune.data import Dataset, ModelIO, as_dataset, split_held_out, validate
from a2q_passes.finetune.distributed import distributed
from a2q_passes.finetune.selection import Selection, enforce_widths, select_layers
from a2q_passes.finetune.train import FinetuneConfig, StepCallback, evaluate_graph, finetune, metric_name
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, find_mac_layers
from a2q_passes.metadata import record_accumulators
from a2q_passes.passes import A2QPass, PassResult
from a2q_passes.torch_bridge import check_runs

METHODS = (*TRAINING_METHODS, "axe")
DataLike = Dataset | str | Iterable[Any] | tuple | np.ndarray


def _structure(model: ModelWrapper) -> list[tuple]:
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


class FinetuneAccumulators(A2QPass):
    """Fine-tune (``qat``/``norm``/``a2q``) or AXE-quantize (``axe``) every constrained layer to its target width.

    The method is ``config.method``. ``acc_bits``: the width P of every constrained layer;
    ``overrides``: ``{MAC node: P}``. ``train``: training data, or calibration inputs for ``axe``
    (labels ignored there);
    ``val``: optional validation data (the best epoch is chosen on it). Data may be a
    :class:`Dataset`, an ``.npz`` path, an ``(x, y)`` tuple, an array of inputs, or an iterable of
    ``x`` or ``(x, y)`` batches. ``tile`` (``axe`` only): each run of T terms is held to P too.
    ``calibration_samples``: how many training inputs AXE calibrates on; ``held_out_samples``: how many
    other training samples (drawn with ``config.seed``, disjoint from the calibration ones) choose between
    AXE and the exact projection, per row and per layer; the result is the projection unless clearly better on
    them (0: keep every AXE row, no check). ``refresh`` (``axe`` only): after the choice, re-centre
    each constrained layer's output channels on the original model's from the calibration inputs (BatchNormalization
    statistics, else the float bias; :func:`~a2q_passes.finetune.calibration.refresh_statistics`): ``auto`` keeps it
    where it is better on the held-out data and clearly better than the projection, ``on`` always, ``off`` never; integer weights and widths never change. ``skip``: MAC nodes left unconstrained on
    purpose (with a global ``acc_bits`` every other quantized MAC layer must be constrainable). Results: ``self.selection``,
    ``self.result.details`` (``history``/``best_epoch``/``metric`` or ``axe`` layer reports, ``is_main``).
    """

    def __init__(self, acc_bits: int | None, train: DataLike, val: DataLike | None = None,
                 config: FinetuneConfig | None = None, *, overrides: dict[str, int] | None = None,
                 tile: int | None = None, calibration_samples: int = 512, held_out_samples: int = 2048,
                 refresh: str = "auto",
                 callback: StepCallback | None = None,
                 skip: list[str] | None = None, input_ranges: str = "exact") -> None:
        super().__init__()
        self.input_ranges = input_ranges
        self.config = config or FinetuneConfig()
        self.method = self.config.method
        if self.method not in METHODS:
            raise A2QError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if tile is not None and self.method != "axe":
            raise A2QError(f"--tile is supported by --method axe only (got --method {self.method})")
        if tile is not None and tile < 1:
            raise A2QError(f"--tile must be at least 1, got {tile}")
        if calibration_samples < 1:
            raise A2QError(f"the number of calibration samples must be at least 1, got {calibration_samples}")
        if refresh not in REFRESH:
            raise A2QError(f"unknown statistics refresh '{refresh}'; choose one of {', '.join(REFRESH)}")
        if held_out_samples < 0:
            raise A2QError(f"the number of held-out samples must be at least 0, got {held_out_samples}")
        self.acc_bits, self.overrides, self.tile = acc_bits, dict(overrides or {}), tile
        self.skip = frozenset(skip or ())
        self.calibration_samples, self.held_out_samples, self.callback = calibration_samples, held_out_samples, callback
        self.refresh = refresh
        self._train_source, self._val_source = train, val
        self.selection: Selection | None = None
        self.train: Dataset | None = None  # validated in requires()
        self.val: Dataset | None = None
        self.held_out: Dataset | None = None  # axe: the held-out split of the training data

    def requires(self, model: ModelWrapper) -> None:
        """Everything that can be wrong with the inputs, checked before any training starts."""
        self.selection = select_layers(model, self.acc_bits, self.overrides, self.skip, self.input_ranges)
        io = ModelIO.of(model)
        train = as_dataset(self._train_source, "training data")
        # AXE calibrates on inputs only; labels, where given, score its held-out check
        self.train = validate(train, io, self.config.loss, needs_labels=self.method != "axe" and not self.config.distill)
        if self.method == "axe":
            self.train, self.held_out = split_held_out(self.train, self.calibration_samples, self.held_out_samples,
                                                       self.config.seed)
        if self._val_source is not None:
            self.val = validate(as_dataset(self._val_source, "validation data"), io, self.config.loss, False)
        check_runs(model, self.train.x[:2], "fine-tuning")
        self._structure_before = _structure(model)

    def call(self, model: ModelWrapper) -> PassResult:
        if self.method == "axe":
            out, details = self._axe(model)
        else:
            result = finetune(model, self.selection, self.train, self.val, self.config, self.callback)
            out = result.model
            details = {"history": result.history, "best_epoch": result.best_epoch, "metric": result.metric,
                       "original_metric": result.original_metric, "reprojected": result.reprojected,
                       "is_main": result.is_main}
        untargeted = self._hold_untargeted(model, out, details["reprojected"])
        layers = {}
        for report in analyze_model(out, input_ranges=self.input_ranges).layers:
            layer = self.selection.by_node().get(report.node)
            if layer is not None:
                layers[report.node] = {"acc_bits": layer.acc_bits, "acc_dtype": report.acc_dtype,
                                       "acc_min": report.acc_min, "acc_max": report.acc_max,
                                       "input_ranges": self.input_ranges}
        record_accumulators(out, layers, source="finetune")
        details.update(method=self.method, input_ranges=self.input_ranges, tile=self.tile, layers=layers, skipped=dict(self.selection.skipped),
                       untargeted=untargeted)
        return PassResult(out, True, details)

    def _untargeted(self, model: ModelWrapper) -> dict[str, Any]:
        """Analysis reports of the quantized MAC layers without a target, by node."""
        targeted = self.selection.by_node()
        return {r.node: r for r in analyze_model(model, input_ranges=self.input_ranges).layers
                if r.node not in targeted and r.node in self._quantized}

    def _hold_untargeted(self, model: ModelWrapper, out: ModelWrapper,
                         reprojected: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Restore the weights of readable untargeted layers that training widened; report every width change.

        Returns ``{node: {"before", "after": acc dtype, "held": how}}`` for the layers whose exact width
        changed or that training widened (``held``: "" if not, "projected back" for the rows
        ``enforce_widths`` re-projected, "restored" for original weights put back).
        """
        self._quantized = {m.node: m for m in find_mac_layers(model) if m.status != STATUS_WEIGHTS_NOT_QUANTIZED}
        before, after = self._untargeted(model), self._untargeted(out)
        self._widths_before = {node: r.bounds.get("exact") for node, r in before.items()}
        restored = []
        for node, r in before.items():
            grew = r.bounds.get("exact") is not None and (after[node].bounds.get("exact") or 0) > r.bounds["exact"]
            source = self._quantized[node].source
            if grew and source is not None and source.quant_node is not None:
                # projection cannot shrink these (see Selection.held): their original integers fit by definition
                scale = model.get_node_from_name(source.quant_node).input[1]
                for tensor in (source.tensor, scale):
                    if model.get_initializer(tensor) is not None:
                        out.set_initializer(tensor, model.get_initializer(tensor))
                restored.append(node)
        after = self._untargeted(out) if restored else after
        held = {node: "restored" for node in restored}
        held.update({node: f"projected back to its width before ({rows} rows)" for node, rows in reprojected.items() if node in before})
        return {node: {"before": r.acc_dtype, "after": after[node].acc_dtype, "held": held.get(node, "")}
                for node, r in before.items() if r.acc_dtype != after[node].acc_dtype or node in held}

    def _axe(self, model: ModelWrapper) -> tuple[ModelWrapper, dict[str, Any]]:
        log = self.config.log
        with distributed(self.config.device) as world:  # AXE is cheap: every rank computes it, rank 0 writes
            out, reports = run_axe(model, self.selection, self.train.x, self.tile, world.device,
                                   log if world.is_main else None, self.held_out, self.config.loss, self.refresh)
            details: dict[str, Any] = {"axe": reports, "reprojected": enforce_widths(out, self.selection),
                                       "calibration_samples": len(self.train),
                                       "held_out_samples": len(self.held_out) if self.held_out is not None else 0,
                                       "is_main": world.is_main, "metric": metric_name(self.config.loss)}
            if self.val is not None:
                for key, graph in (("original_metric", model), ("final_metric", out)):
                    details[key] = evaluate_graph(graph, self.val, self.config.loss, world.device, reference=model)
                if log is not None and world.is_main:
                    log(f"val {details['metric']}: original {details['original_metric']:.2f}, "
                        f"AXE {details['final_metric']:.2f}")
        return out, details

    def ensures(self, result: PassResult) -> None:
        model = result.model
        if _structure(model) != self._structure_before:
            raise PostconditionError("FinetuneAccumulators changed the graph structure; it may only change weights")
        reports = analyze_model(model, input_ranges=self.input_ranges).by_node()
        macs = {m.node: m for m in find_mac_layers(model)}  # integer weights only: the input codes are layer.x
        for layer in self.selection.layers:
            exact = reports[layer.node].bounds.get("exact")
            if exact is None or exact > layer.acc_bits:
                raise PostconditionError(f"layer '{layer.node}' needs a {exact}-bit accumulator after fine-tuning, "
                                         f"above its target of {layer.acc_bits} bits")
            if self.tile is not None:
                lo, hi = bounds.partial_sum_range(macs[layer.node].integer_rows(model), layer.x, self.tile)
                low = min(int(lo.min()), reports[layer.node].acc_min)  # the layer's INT/UINT choice holds for all
                if bounds.accumulator_width(low, int(hi.max())) > layer.acc_bits:
                    raise PostconditionError(f"layer '{layer.node}': a partial sum within a tile of {self.tile} "
                                             f"terms leaves {layer.acc_bits} bits")
        certify_claims(model, {layer.node: Claim(reports[layer.node].acc_min, reports[layer.node].acc_max, layer.acc_bits)
                               for layer in self.selection.layers}, what="finetune", input_ranges=self.input_ranges)
        for node, width in self._widths_before.items():
            now = reports[node].bounds.get("exact")
            if width is not None and (now is None or now > width):
                raise PostconditionError(f"layer '{node}' has no target but needs a {now}-bit accumulator after "
                                         f"fine-tuning, above its {width} bits before; give it a target with "
                                         f"--layer {node}={width}")
