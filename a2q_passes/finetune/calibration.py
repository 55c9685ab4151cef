"""AXE over a whole graph: calibration inputs from executing it, then :mod:`axe` layer by layer (graph side).

Layers are quantized in graph order. For each layer both the *original* model (inputs ``X``)
and the *current* one, whose earlier layers already hold their AXE weights (inputs ``Xq``),
run on the calibration data, so each layer corrects the error the previous ones introduced. Graphs run through the torch bridge
(:class:`QonnxModule` on a copy of the model with the layer inputs added as graph outputs).
Conv inputs become ``(samples * positions, K)`` patch matrices with the Conv's own padding,
strides, dilations and groups; Gram matrices are accumulated in chunks of samples, so memory
stays at ``K x K`` per group whatever the calibration size. Layers AXE does not handle
(ConvTranspose, non-2-D convolutions) get the ``exact`` projection instead and say so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as tf
from onnx import NodeProto, helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.finetune.axe import axe_quantize, gram_matrices, row_output_errors
from a2q_passes.finetune.selection import ConstrainedLayer, Selection
from a2q_passes.layers import node_attr, find_mac_layers, unrounded_mac_weights, write_mac_weights
from a2q_passes.projection import plain_round, project_exact
from a2q_passes.torch_bridge import QonnxModule

_CHUNK = 256  # calibration samples per forward pass / Gram update


class _NotHandled(Exception):
    """A layer shape AXE does not quantize (it gets the exact projection instead)."""


@dataclass
class AxeLayerReport:
    node: str
    method: str  # "axe", or "exact" where AXE does not handle the layer
    rows_changed: int  # rows differing from plain rounding
    relative_output_error: float | None  # on the calibration data, against the original layer
    relative_output_error_projection: float | None  # the same for the exact projection, for comparison
    note: str = ""


def layer_inputs(model: ModelWrapper, x: np.ndarray, tensors: list[str], device: torch.device) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of ``{tensor: value}`` for the given intermediate tensors, running the graph on ``x``."""
    probe = ModelWrapper(copy.deepcopy(model.model))
    outputs = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
            outputs.add(name)
    names = [o.name for o in probe.graph.output]
    module = QonnxModule(probe, trainable_scales="none").to(device).eval()
    for start in range(0, len(x), _CHUNK):
        with torch.no_grad():  # never across the yield: grad mode is global and would leak to the caller
            values = module(torch.from_numpy(np.ascontiguousarray(x[start:start + _CHUNK], dtype=np.float32)).to(device))
        values = values if isinstance(values, tuple) else (values,)
        by_name = dict(zip(names, values))
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
    kh, kw = layer.mac.layout.shape[2:]
    top, left, bottom, right = list(node_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(node_attr(node, "strides", [1, 1]))
    dilations = list(node_attr(node, "dilations", [1, 1]))
    groups = int(node_attr(node, "group", 1))
    padded = tf.pad(torch.from_numpy(value), (left, right, top, bottom))
    c_in, c_out = value.shape[1] // groups, layer.mac.channels // groups
    result = []
    for g in range(groups):
        patches = tf.unfold(padded[:, g * c_in:(g + 1) * c_in], (kh, kw), dilation=dilations, stride=strides)
        result.append((slice(g * c_out, (g + 1) * c_out), patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()))
    return result


def run_axe(model: ModelWrapper, selection: Selection, calibration: np.ndarray, tile: int | None = None,
            device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> tuple[ModelWrapper, list[AxeLayerReport]]:
    """A copy of ``model`` whose constrained layers hold AXE weights; with a report per layer."""
    device = torch.device(device)
    out = ModelWrapper(copy.deepcopy(model.model))
    reports = []
    for layer in selection.layers:
        mac = {m.node: m for m in find_mac_layers(out)}[layer.node]
        v = mac.layout.to_rows(unrounded_mac_weights(out, mac.source))
        node = _node(out, layer.node)
        try:
            q, errors = _quantize_layer(model, out, layer, node, v, calibration, tile, device)
            method, note = "axe", ""
        except _NotHandled as why:
            q = project_exact(v, layer.x, layer.acc_bits, layer.weight_range).weights
            errors, method, note = (None, None), "exact", f"{why}; used the exact projection"
        write_mac_weights(out, mac.source, mac.layout.from_rows(q))
        changed = int((q != plain_round(v, layer.weight_range)).any(axis=1).sum())
        reports.append(AxeLayerReport(layer.node, method, changed, *errors, note))
        if log is not None:
            detail = f"output error {errors[0]:.4f} (projection {errors[1]:.4f})" if errors[0] is not None else note
            log(f"{layer.node}: {method}, {changed}/{len(q)} rows changed, {detail}")
    return out, reports


def _quantize_layer(original: ModelWrapper, current: ModelWrapper, layer: ConstrainedLayer, node: NodeProto,
                    v: np.ndarray, calibration: np.ndarray, tile: int | None,
                    device: torch.device) -> tuple[np.ndarray, tuple[float, float]]:
    """AXE weights of one layer, and the relative output errors of AXE and of the exact projection."""
    name = layer.mac.input_tensor
    grams: list[list[np.ndarray]] | None = None
    q_projection = project_exact(v, layer.x, layer.acc_bits, layer.weight_range).weights
    chunks = zip(layer_inputs(original, calibration, [name], device), layer_inputs(current, calibration, [name], device))
    slices: list[slice] = []
    for ref, cur in chunks:
        pairs = list(zip(_groups(layer, node, ref[name]), _groups(layer, node, cur[name])))
        if grams is None:
            slices = [rows for (rows, _), _ in pairs]
            grams = [[0.0, 0.0, 0.0] for _ in pairs]
        for acc, ((_, xf), (_, xq)) in zip(grams, pairs):
            for i, gram in enumerate(gram_matrices(xf, xq)):
                acc[i] = acc[i] + gram
    q = np.zeros(v.shape, dtype=np.int64)
    for rows, (F, G, H) in zip(slices, grams):
        q[rows] = axe_quantize(v[rows], F, G, H, layer.x, layer.acc_bits, layer.weight_range, tile)
    errors = tuple(_relative_error(v, candidate, slices, grams) for candidate in (q, q_projection))
    return q, errors


def _relative_error(v: np.ndarray, q: np.ndarray, slices: list[slice], grams: list[list[np.ndarray]]) -> float:
    """``||X v - Xq q||^2 / ||X v||^2`` over the whole layer, from the Gram matrices."""
    error = energy = 0.0
    for rows, (F, G, H) in zip(slices, grams):
        error += float(row_output_errors(v[rows], q[rows], F, G, H).sum())
        energy += float(np.einsum("rk,kl,rl->", v[rows], F, v[rows]))
    return error / max(energy, 1e-300)
