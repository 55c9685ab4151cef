"""QONNX layer <-> FINN HW node mapping by weight content.

FINN renames nodes, and its lowering reorders a conv's weights from ``(cin, kh, kw)`` to ``(kh, kw, cin)``. The link
between a QONNX layer and the MVAU/VVAU made from it is therefore the integer weight content, compared in a form that
ignores both reorderings (:func:`weight_signature`); identical layers are paired in graph order. The QONNX layers'
signatures can be stored in the model (:func:`record_weight_signatures`), so the mapping works after FINN's
conversion, partitioning and specialisation.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import node_attr
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, RowLayout, find_mac_layers
from a2q_passes.metadata import metadata_value, set_metadata_value

WEIGHT_SIGNATURES_KEY = "a2q.weight_signatures"  # {qonnx node: signature}, for mapping after the model is gone


def weight_signature(rows: np.ndarray) -> str:
    """Name-free identity of a layer's integer weights ``(channels, K)``.

    It does not change when channels or the terms within a channel are permuted, or when a whole
    channel is negated. That covers what lowering does to the weights: a conv's ``(cin, kh, kw)``
    becomes ``(kh, kw, cin)``, a Gemm's ``(out, in)`` becomes MatMul ``(in, out)``, and FINN's
    streamlining negates the channels whose folded BatchNorm scale is negative
    (``FactorOutMulSignMagnitude`` then ``Absorb1BitMulIntoMatMul``). Only the pairing uses it: each
    HW node's accumulator range is computed from its own weights.
    """
    rows = np.asarray(rows, dtype=np.int64)
    up, down = np.sort(rows, axis=1), np.sort(-rows, axis=1)
    canonical = [min(a.tobytes(), b.tobytes()) for a, b in zip(up, down)]
    digest = hashlib.sha1(b"".join(sorted(canonical))).hexdigest()[:20]
    return f"{rows.shape[0]}x{rows.shape[1]}:{digest}"


def layer_signatures(model: ModelWrapper) -> dict[str, str]:
    """Signature per MAC layer with readable integer weights (QONNX layers or MVAU/VVAU), in graph order.

    FINN stores binary xnor weights as ``{0, 1}`` for ``{-1, +1}``; they are mapped back first so
    a bipolar QONNX layer and its xnor MVAU get the same signature. A grouped ``Conv`` that is not depthwise is
    signed as the dense MVAU it is lowered to (:class:`~a2q_passes.finn_quant_forms.GroupedConvAsDense`): each row
    with the zeros of the other groups' input channels.
    """
    from a2q_passes.finn_quant_forms import is_grouped_conv

    convs = {node.name or node.output[0]: node for node in model.graph.node if node.op_type == "Conv"}
    signatures = {}
    for layer in find_mac_layers(model, zero_point="subtract"):  # weights q - z, as FINN's MVAU holds them
        if layer.source is None or layer.status == STATUS_WEIGHTS_NOT_QUANTIZED or layer.status.startswith("unsupported"):
            continue
        rows = layer.integer_rows(model)
        conv = convs.get(layer.node)
        shape = layer.layout.shape if isinstance(layer.layout, RowLayout) else None
        if conv is not None and is_grouped_conv(conv, shape):
            rows = np.pad(rows, ((0, 0), (0, (int(node_attr(conv, "group", 1)) - 1) * rows.shape[1])))
        signatures[layer.node] = weight_signature(2 * rows - 1 if layer.binary_xnor else rows)
    return signatures


def match_layers(qonnx_signatures: dict[str, str], hw_signatures: dict[str, str]) -> dict[str, str]:
    """HW node -> QONNX layer with the same signature; equal signatures are paired in graph order."""
    waiting: dict[str, list[str]] = defaultdict(list)
    for name, signature in qonnx_signatures.items():
        waiting[signature].append(name)
    mapping = {}
    for hw_name, signature in hw_signatures.items():
        if waiting[signature]:
            mapping[hw_name] = waiting[signature].pop(0)
    return mapping


def recorded_signatures(model: ModelWrapper) -> dict[str, str]:
    """Signatures stored by :func:`record_weight_signatures` (empty if none)."""
    value = metadata_value(model, WEIGHT_SIGNATURES_KEY)
    return json.loads(value) if value is not None else {}


def record_weight_signatures(model: ModelWrapper) -> None:
    """Store the QONNX layers' signatures in the model, so the mapping works after conversion to FINN."""
    set_metadata_value(model, WEIGHT_SIGNATURES_KEY, json.dumps(layer_signatures(model), sort_keys=True))
