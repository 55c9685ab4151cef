"""AXE over a whole graph: calibration inputs from executing it, then :mod:`axe` layer by layer (graph side).

Layers are quantized in graph order. For each layer both the *original* model (inputs ``X``)
and the *current* one, whose earlier layers already hold their AXE weights (inputs ``Xq``),
run on the calibration data, so each layer corrects the error the previous ones introduced. Graphs run through the torch bridge
(:class:`QonnxModule` on a copy of the model with the layer inputs added as graph outputs).
Conv inputs become ``(samples * positions, K)`` patch matrices with the Conv's own padding,
strides, dilations and groups; Gram matrices are accumulated in chunks of samples, so memory
stays at ``K x K`` per group whatever the calibration size. Layers AXE does not handle
(ConvTranspose, non-2-D convolutions) get the ``exact`` projection instead and say so.

AXE departs from the projection only where clearly better on held-out data (``held_out``, disjoint from the
calibration inputs). Greedy error feedback can over-fit the calibration set: on ESPCN it matched
128 calibration crops to 0.02 % layer output error while the same layer's error on other images
was above the projection's, and the model lost 6 dB. So each layer keeps, row by row, the AXE row
or the exact-projection row, whichever has the lower output error on the held-out inputs
(measured through that layer's own Gram matrices, both rows fit P); then
:func:`choose_against_projection` checks the whole model on the held-out data (metric and
objective, :class:`HeldOutScore`): a layer goes back to the projection where that is no worse, and
unless the result is :func:`clearly_better` than the plain projection of every layer, that
projection is the result. :func:`refresh_statistics` (BatchNorm statistics or bias correction
after the choice) is kept only where it is :func:`better` than that result on the held-out data and the
refreshed model is clearly better than the projection: the result differs from the exact projection
only where the difference is clearly better.

"Clearly": no worse in the metric, and the mean per-sample objective lower by more than
:data:`CLEAR_MARGIN` standard errors of the paired per-sample difference. A gain of a sample or
two on the held-out split is noise that an unseen test set does not repeat: fmnist_mlp (A2Q
papers' set-up, P=12) kept AXE for +1 held-out image in 2048 at 8 of 10 seeds and then scored
0.03-0.16 points below the projection on the 10000 test images. Where AXE's gain is real it is
many standard errors (fmnist_cnn at P=13: +4.4 points on the test split).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as tf
from onnx import NodeProto, helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.finetune.axe import axe_quantize, exact_projection_rows, gram_matrices, row_output_errors
from a2q_passes.finetune.data import Dataset
from a2q_passes.finetune.selection import ConstrainedLayer, Selection
from a2q_passes.finetune.train import metric_name, objective, predict, score
from a2q_passes.graph_values import node_attr
from a2q_passes.layers import RowLayout, find_mac_layers
from a2q_passes.weight_sources import WeightSource, unrounded_mac_weights, write_mac_weights
from a2q_passes.projection import plain_round
from a2q_passes.torch_bridge import QonnxModule
from a2q_passes.torch_bridge.ops import CHANNELS_LAST_DOMAIN

_CHUNK = 256  # calibration samples per forward pass / Gram update
REFRESH = ("auto", "on", "off")  # run_axe: when the output statistics refresh is kept
CLEAR_MARGIN = 2.0  # standard errors of the paired held-out difference a change must gain (clearly_better)


class _NotHandled(Exception):
    """A layer shape AXE does not quantize (it gets the exact projection instead)."""


@dataclass
class AxeLayerReport:
    node: str
    method: str  # "axe", or "exact" where AXE does not handle the layer
    rows_changed: int  # rows differing from plain rounding
    relative_output_error: float | None  # on the calibration data, against the original layer (AXE rows)
    relative_output_error_projection: float | None  # the same for the exact projection, for comparison
    note: str = ""
    rows_axe: int = 0  # rows that kept their AXE weights; the others hold the exact projection's
    rows: int = 0
    held_out_error: float | None = None  # relative output error of the kept rows on the held-out data
    held_out_error_projection: float | None = None  # the same for the exact projection
    refreshed: str = ""  # what refresh_statistics changed after this layer, where it was kept

    @property
    def choice(self) -> str:
        """"axe" (every row), "projection" (none) or "mixed" (per row, on the held-out error)."""
        if self.rows_axe == self.rows:
            return "axe"
        return "projection" if self.rows_axe == 0 else "mixed"


def layer_inputs(model: ModelWrapper, x: np.ndarray, tensors: list[str], device: torch.device) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of ``{tensor: value}`` for the given intermediate tensors, running the graph on ``x``."""
    probe = ModelWrapper(copy.deepcopy(model.model))
    (graph_input,) = [i.name for i in probe.graph.input if probe.get_initializer(i.name) is None]
    outputs = {o.name for o in probe.graph.output}
    value_info = {v.name: v for v in probe.graph.value_info}
    for name in tensors:
        if name not in outputs and name != graph_input:  # a layer reading the graph input reads x itself
            known = value_info.get(name)
            if known is not None:  # moved, not copied: qonnx refuses a tensor described twice
                probe.graph.value_info.remove(known)
            probe.graph.output.append(known or helper.make_empty_tensor_value_info(name))
            outputs.add(name)
    names = [o.name for o in probe.graph.output]
    module = QonnxModule(probe, trainable_scales="none").to(device).eval()
    for start in range(0, len(x), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + _CHUNK], dtype=np.float32)).to(device)
        with torch.no_grad():  # never across the yield: grad mode is global and would leak to the caller
            values = module(chunk)
        values = values if isinstance(values, tuple) else (values,)
        by_name = {graph_input: chunk, **dict(zip(names, values))}
        yield {name: by_name[name].double().cpu().numpy() for name in tensors}


def _node(model: ModelWrapper, name: str) -> NodeProto:
    return next(n for n in model.graph.node if (n.name or n.output[0]) == name)


def _groups(layer: ConstrainedLayer, node: NodeProto, value: np.ndarray) -> list[tuple[slice, np.ndarray]]:
    """``(rows of the group, (samples * positions, K) input matrix)`` for each group of the layer."""
    op = layer.mac.op_type
    if op in ("Gemm", "MatMul"):
        return [(slice(None), value.reshape(-1, value.shape[-1]))]
    if op != "Conv" or value.ndim != 4 or layer.mac.layout.kind != "reshape":
        raise _NotHandled(f"AXE handles Gemm, MatMul and 2-D Conv layers, not this {op}")
    if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _NotHandled("Conv with auto_pad")
    channels_last = node.domain == CHANNELS_LAST_DOMAIN  # data NHWC, weights (and so rows) O, kh, kw, I
    if channels_last:
        value = np.ascontiguousarray(value.transpose(0, 3, 1, 2))
    kh, kw = layer.mac.layout.shape[1:3] if channels_last else layer.mac.layout.shape[2:]
    top, left, bottom, right = list(node_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(node_attr(node, "strides", [1, 1]))
    dilations = list(node_attr(node, "dilations", [1, 1]))
    groups = int(node_attr(node, "group", 1))
    padded = tf.pad(torch.from_numpy(value), (left, right, top, bottom))
    c_in, c_out = value.shape[1] // groups, layer.mac.channels // groups
    result = []
    for g in range(groups):
        patches = tf.unfold(padded[:, g * c_in:(g + 1) * c_in], (kh, kw), dilation=dilations, stride=strides)
        if channels_last:  # unfold orders K as (c, kh, kw); these rows run (kh, kw, c)
            n, _, positions = patches.shape
            patches = patches.reshape(n, c_in, kh * kw, positions).transpose(1, 2).reshape(n, -1, positions)
        result.append((slice(g * c_out, (g + 1) * c_out), patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()))
    return result


def run_axe(model: ModelWrapper, selection: Selection, calibration: np.ndarray, tile: int | None = None,
            device: torch.device | str = "cpu", log: Callable[[str], None] | None = None,
            held_out: Dataset | None = None, loss: str = "ce",
            refresh: str = "auto") -> tuple[ModelWrapper, list[AxeLayerReport]]:
    """A copy of ``model`` whose constrained layers hold AXE weights; with a report per layer.

    ``held_out``: inputs (and optional targets for ``loss``'s metric) disjoint from ``calibration``.
    With them every row keeps AXE's or the exact projection's weights, whichever has the lower
    held-out output error, and :func:`choose_against_projection` makes the model-level choice, so
    the result is the exact projection of every layer unless it is clearly better on the held-out data.
    Without them every row keeps its AXE weights.

    ``refresh`` (:data:`REFRESH`): :func:`refresh_statistics` on the calibration inputs after the choice;
    ``auto`` keeps it only where it is :func:`better` than the choice and :func:`clearly_better` than the
    projection on the held-out data (never without them), ``on`` always, ``off`` never.
    """
    if refresh not in REFRESH:
        raise ValueError(f"refresh must be one of {REFRESH}, got {refresh!r}")
    device = torch.device(device)
    out = ModelWrapper(copy.deepcopy(model.model))
    reports = []
    candidates: dict[str, LayerCandidates] = {}
    for layer in selection.layers:
        mac = {m.node: m for m in find_mac_layers(out)}[layer.node]
        v = mac.layout.to_rows(unrounded_mac_weights(out, mac.source))
        node = _node(out, layer.node)
        projection, projection_fits = exact_projection_rows(v, layer.x, layer.acc_bits, layer.weight_range, tile)
        try:
            fit = _layer_grams(model, out, layer, node, calibration, device)
            q_axe = np.zeros(v.shape, dtype=np.int64)
            for rows, (F, G, H) in zip(*fit):
                q_axe[rows] = axe_quantize(v[rows], F, G, H, layer.x, layer.acc_bits, layer.weight_range, tile)
            report = AxeLayerReport(layer.node, "axe", 0, _relative_error(v, q_axe, *fit),
                                    _relative_error(v, projection, *fit), rows=len(v))
        except _NotHandled as why:
            q_axe, fit = projection, None
            report = AxeLayerReport(layer.node, "exact", 0, None, None, f"{why}; used the exact projection", rows=len(v))
        # rows whose projection breaks AXE's partial-sum promise (tiles) keep their AXE weights in every choice
        fallback = np.where(projection_fits[:, None], projection, q_axe)
        q, report.rows_axe = q_axe, len(v) if fit is not None else 0
        if fit is not None and held_out is not None:
            check = _layer_grams(model, out, layer, node, held_out.x, device)
            per_row = [np.zeros(len(v)) for _ in range(2)]
            for rows, (F, G, H) in zip(*check):
                for errors, candidate in zip(per_row, (q_axe, fallback)):
                    errors[rows] = row_output_errors(v[rows], candidate[rows], F, G, H)
            keep_axe = per_row[0] < per_row[1]  # ties go to the projection: AXE must earn its place
            q = np.where(keep_axe[:, None], q_axe, fallback)
            report.rows_axe = int(keep_axe.sum())
            report.held_out_error = _relative_error(v, q, *check)
            report.held_out_error_projection = _relative_error(v, fallback, *check)
        write_mac_weights(out, mac.source, mac.layout.from_rows(q))
        report.rows_changed = int((q != plain_round(v, layer.weight_range)).any(axis=1).sum())
        candidates[layer.node] = LayerCandidates(mac.source, mac.layout, q, fallback)
        reports.append(report)
        if log is not None:
            log(_describe(report))
    quality = HeldOutScore(model, held_out, loss, device) if held_out is not None else None
    if quality is not None:
        out, chosen_quality, projection_quality = choose_against_projection(model, out, candidates, reports, quality,
                                                                            log)
    if refresh == "on" or (refresh == "auto" and quality is not None):
        refreshed, notes = refresh_statistics(model, out, selection, calibration, device)
        if refresh == "on" or (better(refreshed_quality := quality(refreshed), chosen_quality)
                               and clearly_better(refreshed_quality, projection_quality)):
            out = refreshed
            for report in reports:
                report.refreshed = notes[report.node]
        if log is not None:
            log(f"output statistics refresh ({refresh}): " + ("kept" if out is refreshed else "not kept: on the "
                                                              "held-out data it was not better, or not clearly better "
                                                              "than the projection"))
    return out, reports


def _describe(report: AxeLayerReport) -> str:
    if report.relative_output_error is None:
        return f"{report.node}: {report.method}, {report.rows_changed}/{report.rows} rows changed, {report.note}"
    line = (f"{report.node}: {report.method}, {report.rows_changed}/{report.rows} rows changed, calibration output "
            f"error {report.relative_output_error:.4f} (projection {report.relative_output_error_projection:.4f})")
    if report.held_out_error is not None:
        line += (f"; held-out {report.held_out_error:.4f} (projection {report.held_out_error_projection:.4f}), "
                 f"AXE kept in {report.rows_axe}/{report.rows} rows")
    return line


@dataclass
class LayerCandidates:
    """One layer's integer rows as chosen per row (``chosen``) and as the exact projection gives them."""

    source: WeightSource
    layout: RowLayout
    chosen: np.ndarray
    projection: np.ndarray


@dataclass(frozen=True)
class HeldOutQuality:
    """A graph's quality on the held-out data: its metric and each sample's objective (lower is better)."""

    metric: float
    losses: np.ndarray

    @property
    def objective(self) -> float:
        return float(self.losses.mean())


class HeldOutScore:
    """Quality of a graph on held-out data (:class:`HeldOutQuality`) for ``loss``, against the targets (else against
    the original model's outputs, with the distillation objective). A graph counts as no worse than another only
    if it is no worse in both (:func:`no_worse`): on a few hundred samples top-1 moves in steps of a sample, and
    the objective, which moves with every output, keeps that noise from deciding alone."""

    def __init__(self, original: ModelWrapper, held_out: Dataset, loss: str, device: torch.device) -> None:
        self.held_out, self.loss, self.device = held_out, loss, device
        self.reference = predict(QonnxModule(original, trainable_scales="none").to(device), held_out.x, device)
        self.targets = torch.from_numpy(held_out.y) if held_out.y is not None else self.reference

    def __call__(self, graph: ModelWrapper) -> HeldOutQuality:
        outputs = predict(QonnxModule(graph, trainable_scales="none").to(self.device), self.held_out.x, self.device)
        distill = self.held_out.y is None
        losses = objective(outputs.double(), self.targets.double() if distill or self.loss != "ce" else self.targets,
                           self.loss, distill, per_sample=True)
        return HeldOutQuality(score(outputs, self.targets, self.loss), losses.numpy())


def no_worse(a: HeldOutQuality, b: HeldOutQuality) -> bool:
    """Whether held-out quality ``a`` is at least ``b`` in the metric and in the objective."""
    return a.metric >= b.metric and a.objective <= b.objective


def better(a: HeldOutQuality, b: HeldOutQuality) -> bool:
    return no_worse(a, b) and (a.metric, a.objective) != (b.metric, b.objective)


def clearly_better(a: HeldOutQuality, b: HeldOutQuality, margin: float = CLEAR_MARGIN) -> bool:
    """Whether ``a`` is no worse than ``b`` in the metric and lower in the mean objective by more than ``margin``
    standard errors of the paired per-sample difference (the same held-out samples score both)."""
    gain = b.losses - a.losses
    spread = gain.std(ddof=1) / math.sqrt(len(gain)) if len(gain) > 1 else 0.0
    return a.metric >= b.metric and float(gain.mean()) > margin * spread


def choose_against_projection(original: ModelWrapper, axe_model: ModelWrapper, candidates: dict[str, LayerCandidates],
                              reports: list[AxeLayerReport], quality: HeldOutScore,
                              log: Callable[[str], None] | None = None
                              ) -> tuple[ModelWrapper, HeldOutQuality, HeldOutQuality]:
    """The model-level choice on held-out data (``quality``): the exact projection of every layer unless AXE's
    rows are clearly better; with its held-out quality and the projection's.

    Layers in graph order: one still holding AXE rows goes back to its projection where that is
    :func:`no_worse` (in metric and objective). If the result is not :func:`clearly_better` than the
    all-projection model, that model is returned. The reports of layers put back say so (``rows_axe`` 0,
    ``note``).
    """

    def with_rows(base: ModelWrapper, rows: dict[str, np.ndarray]) -> ModelWrapper:
        graph = ModelWrapper(copy.deepcopy(base.model))
        for node, q in rows.items():
            write_mac_weights(graph, candidates[node].source, candidates[node].layout.from_rows(q))
        return graph

    current, best = axe_model, quality(axe_model)
    projected = with_rows(original, {node: c.projection for node, c in candidates.items()})
    projection_quality = quality(projected)
    for report in reports:
        c = candidates[report.node]
        if np.array_equal(c.chosen, c.projection):
            continue
        trial = with_rows(current, {report.node: c.projection})
        trial_quality = quality(trial)
        if no_worse(trial_quality, best):
            current, best = trial, trial_quality
            report.rows_axe, report.note = 0, "put back to the projection: its AXE rows did not raise the held-out score"
    if not clearly_better(best, projection_quality):
        current, best = projected, projection_quality
        for report in reports:
            if report.rows_axe:
                report.rows_axe, report.note = 0, "the AXE model was not clearly better than the projection on held-out data"
    if log is not None:
        used = [r.node for r in reports if r.rows_axe]
        log(f"held-out {metric_name(quality.loss)}: {best.metric:.2f}, objective {best.objective:.5g} (projection "
            f"of every layer {projection_quality.metric:.2f}, {projection_quality.objective:.5g}); AXE rows kept in "
            f"{', '.join(used) or 'no layer'}")
    return current, best, projection_quality


def _layer_grams(original: ModelWrapper, current: ModelWrapper, layer: ConstrainedLayer, node: NodeProto,
                 x: np.ndarray, device: torch.device) -> tuple[list[slice], list[list[np.ndarray]]]:
    """Per group of the layer: its rows and the Gram matrices ``(F, G, H)`` of its inputs on ``x`` in the
    original model (``X``) and in the current one (``Xq``)."""
    name = layer.mac.input_tensor
    grams: list[list[np.ndarray]] | None = None
    chunks = zip(layer_inputs(original, x, [name], device), layer_inputs(current, x, [name], device))
    slices: list[slice] = []
    for ref, cur in chunks:
        pairs = list(zip(_groups(layer, node, ref[name]), _groups(layer, node, cur[name])))
        if grams is None:
            slices = [rows for (rows, _), _ in pairs]
            grams = [[0.0, 0.0, 0.0] for _ in pairs]
        for acc, ((_, xf), (_, xq)) in zip(grams, pairs):
            for i, gram in enumerate(gram_matrices(xf, xq)):
                acc[i] = acc[i] + gram
    return slices, grams


def _relative_error(v: np.ndarray, q: np.ndarray, slices: list[slice], grams: list[list[np.ndarray]]) -> float:
    """``||X v - Xq q||^2 / ||X v||^2`` over the whole layer, from the Gram matrices."""
    error = energy = 0.0
    for rows, (F, G, H) in zip(slices, grams):
        error += float(row_output_errors(v[rows], q[rows], F, G, H).sum())
        energy += float(np.einsum("rk,kl,rl->", v[rows], F, v[rows]))
    return error / max(energy, 1e-300)


def refresh_statistics(original: ModelWrapper, model: ModelWrapper, selection: Selection, x: np.ndarray,
                       device: torch.device | str = "cpu") -> tuple[ModelWrapper, dict[str, str]]:
    """A copy of ``model`` whose constrained layers' outputs are re-centred on the original model's, from data.

    Projection and AXE shift the mean of each output channel (bias correction, Nagel et al. 2019).
    Layers in graph order, each seeing the corrections made above it, on the inputs ``x``:

    - a BatchNormalization that alone consumes the layer's output gets its statistics refreshed:
      ``var + eps`` scales with the ratio of the output variances and ``mean`` follows, so the
      normalised output has the original model's mean and spread on ``x``
      (with ``mean``/``var`` equal to the data's statistics this is the classic re-estimation);
    - else a float bias initializer of the layer (Conv/Gemm third input) absorbs the mean shift.

    Integer weights, scales and every input code range stay as they are: the bias and the
    BatchNormalization act after the accumulator, so no recorded width changes. Returns the copy and,
    per constrained layer, what was refreshed (or why nothing was).
    """
    device = torch.device(device)
    out = ModelWrapper(copy.deepcopy(model.model))
    done: dict[str, str] = {}
    for layer in selection.layers:
        node = _node(out, layer.node)
        consumers = out.find_consumers(node.output[0]) or []
        norm = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "BatchNormalization" else None
        bias = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] else ""
        channels = _node_channels(out, node)
        if norm is None and (not bias or out.get_initializer(bias) is None or out.get_initializer(bias).size != channels):
            done[layer.node] = "nothing to refresh: no per-channel float bias and no BatchNormalization after it"
            continue
        axis = -1 if node.domain == CHANNELS_LAST_DOMAIN else 1
        reference, current = (_channel_moments(graph, node.output[0], x, device, axis) for graph in (original, out))
        shift = current[0] - reference[0]
        if norm is not None:
            eps = float(node_attr(norm, "epsilon", 1e-5))
            mean, var = (out.get_initializer(norm.input[i]).astype(np.float64) for i in (3, 4))
            ratio = np.where(reference[1] > 0, current[1] / np.where(reference[1] > 0, reference[1], 1.0), 1.0)
            # (E[y_q] - mean') / sqrt(var' + eps) = (E[y] - mean) / sqrt(var + eps), with var' + eps = (var + eps) ratio
            out.set_initializer(norm.input[3], (current[0] - (reference[0] - mean) * np.sqrt(ratio)).astype(np.float32))
            out.set_initializer(norm.input[4], np.maximum((var + eps) * ratio - eps, 0.0).astype(np.float32))
            done[layer.node] = f"{norm.name or norm.output[0]} statistics refreshed (mean shift up to {np.abs(shift).max():.4g})"
        else:
            value = out.get_initializer(bias)
            out.set_initializer(bias, (value.astype(np.float64) - shift.reshape(value.shape)).astype(value.dtype))
            done[layer.node] = f"bias corrected (shift up to {np.abs(shift).max():.4g})"
    return out, done


def _node_channels(model: ModelWrapper, node: NodeProto) -> int:
    return next(m.channels for m in find_mac_layers(model) if m.node == (node.name or node.output[0]))


def _channel_moments(model: ModelWrapper, tensor: str, x: np.ndarray, device: torch.device,
                     axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (``axis``), the mean and variance of ``tensor`` over the samples and positions of ``x``."""
    total = square = None
    count = 0
    for chunk in layer_inputs(model, x, [tensor], device):
        value = np.moveaxis(chunk[tensor], axis, -1)
        value = value.reshape(-1, value.shape[-1])
        total = value.sum(axis=0) + (0.0 if total is None else total)
        square = (value ** 2).sum(axis=0) + (0.0 if square is None else square)
        count += len(value)
    mean = total / count
    return mean, np.maximum(square / count - mean ** 2, 0.0)
