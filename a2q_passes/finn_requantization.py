"""Requantizers of values already on their grid, removed before FINN's conversion.

onnxruntime's QDQ format quantizes the output of every op it keeps in the integer domain, value-moving ones included:
``MaxPool`` and ``Flatten`` get a QuantizeLinear -> DequantizeLinear pair on each side, with the scale and zero point
of the quantizer in front. After qonnx's ``QCDQToQuant`` these are ``Quant`` nodes of values that are already codes
of the same grid. FINN makes each a ``Thresholding`` layer of its own, and one between a ``Flatten`` and the
classifier's ``MatMul`` keeps FINN's ``RemoveCNVtoFCFlatten`` from taking the ``Flatten`` (no HW layer for it: the
lowering stops there).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from a2q_passes.finn_zero_points import MIDPOINT_ROUNDING
from a2q_passes.graph_values import get_constant, node_attr, node_str_attr
from a2q_passes.input_grids import value_source


def _parameters(model: ModelWrapper, node: NodeProto) -> tuple | None:
    values = [get_constant(model, name) for name in node.input[1:4]]
    if any(v is None for v in values):
        return None
    return (*(np.asarray(v, np.float32) for v in values), node_attr(node, "signed", 1), node_attr(node, "narrow", 0))


def _same(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]


class RedundantRequantization(Transformation):
    """A ``Quant`` whose input comes, through ops that only move or select values (``Flatten``, ``Reshape``,
    ``MaxPool``, ...), from a ``Quant`` with the same scale, zero point, bit width, signedness and narrowness is
    removed; its readers read its input. Only one that rounds halfway between codes: its input is a code of its own
    grid up to float32 rounding of ``(q - z) s / s``, far less than half a step, so it gives that code back
    (within its clamp, the same as the first's), as ``CEIL``/``FLOOR`` would not. A requantizer whose output is a
    graph output stays.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        outputs = {o.name for o in model.graph.output}
        changed = False
        for node in list(model.graph.node):  # one pass: a removed requantizer's readers read its input from then on
            if node.op_type != "Quant" or node.output[0] in outputs or \
                    node_str_attr(node, "rounding_mode", "ROUND").upper() not in MIDPOINT_ROUNDING:
                continue
            first = value_source(model, node.input[0])
            if first is None or first.op_type != "Quant" or first is node:
                continue
            mine, theirs = _parameters(model, node), _parameters(model, first)
            if mine is None or theirs is None or not _same(mine, theirs):
                continue
            for reader in model.find_consumers(node.output[0]) or []:
                for index, name in enumerate(reader.input):
                    if name == node.output[0]:
                        reader.input[index] = node.input[0]
            model.graph.node.remove(node)
            changed = True
        return model, changed
