"""onnxruntime's integer MAC ops (QOperator and dynamic formats): their integer operands, as the ONNX op
definitions state."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from onnx import NodeProto, helper, shape_inference
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.certificate.execution import CannotCertify, execute_constants, node_attr, node_label, \
    reads_graph_input, uniform_value
from a2q_passes.certificate.input_codes import STORAGE_RANGES

# Ops that multiply integer tensors themselves: (float op they compute like, weight input, weight zero point input);
# input 0 is the data, its zero point at input 2 but where DATA_ZERO_POINT / _QUANTIZES_DATA say otherwise.
INTEGER_MACS = {"QLinearConv": ("Conv", 3, 5), "ConvInteger": ("Conv", 1, 3), "QLinearMatMul": ("MatMul", 3, 5),
                "MatMulInteger": ("MatMul", 1, 3), "QGemm": ("Gemm", 3, 5),
                "DynamicQuantizeMatMul": ("MatMul", 1, 3), "MatMulIntegerToFloat": ("MatMul", 1, 5)}
# com.microsoft MatMulIntegerToFloat keeps its data's zero point at input 4 (input 2 elsewhere); DynamicQuantizeMatMul
# quantizes its float data itself, as DynamicQuantizeLinear does: uint8 codes, a zero point per run
DATA_ZERO_POINT = {"MatMulIntegerToFloat": 4}
_QUANTIZES_DATA = ("DynamicQuantizeMatMul",)
# the others are standard ONNX ops; com.microsoft QLinearConv is the channels-last form onnxruntime's optimizer writes
INTEGER_MAC_DOMAINS = {"QGemm": ("com.microsoft",), "QLinearConv": ("", "ai.onnx", "com.microsoft"),
                       "DynamicQuantizeMatMul": ("com.microsoft",), "MatMulIntegerToFloat": ("com.microsoft",)}


def integer_act_x_act(model: ModelWrapper, node: NodeProto) -> bool:
    """An integer MatMul op (QLinearMatMul, MatMulInteger, ...) whose second operand is computed at run time."""
    op = node.op_type
    if op not in INTEGER_MACS or INTEGER_MACS[op][0] != "MatMul":
        return False
    return node.domain in INTEGER_MAC_DOMAINS.get(op, ("", "ai.onnx")) and \
        reads_graph_input(model, node.input[INTEGER_MACS[op][1]])


def elem_types(model: ModelWrapper) -> dict[str, int]:
    """ONNX type inference's element type of every tensor it can type."""
    inferred = shape_inference.infer_shapes(model.model)
    infos = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos if vi.type.tensor_type.elem_type}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def integer_operands(model: ModelWrapper, node: NodeProto, zero_point: str) -> tuple[np.ndarray, int, int, int]:
    """Integer weights the op multiplies (Conv/MatMul layout) and ``(lo, hi, padding code)`` of its input.

    ONNX QLinearConv/ConvInteger/QLinearMatMul/MatMulInteger and com.microsoft QGemm compute on
    ``(x - x_zero_point) * (w - w_zero_point)``; the weight zero point is one per tensor or one per
    output channel (QLinearConv/ConvInteger: the first weight axis; MatMul: B's columns; QGemm: B's
    columns, its rows when transB). Under fold the MAC multiplies the raw codes instead.
    """
    _, w_index, wz_index = INTEGER_MACS[node.op_type]
    names = [node.input[w_index]] + [n for n in (node.input[wz_index] if len(node.input) > wz_index else "",) if n]
    values = execute_constants(model, names)
    w = np.asarray(values[names[0]])
    if w.dtype.kind not in "iu":
        raise CannotCertify(f"{node_label(node)} multiplies weights of type {w.dtype}, not integers")
    w = w.astype(np.int64)
    if zero_point == "subtract" and len(names) > 1:
        wz = np.asarray(values[names[1]]).astype(np.int64)
        if wz.size > 1:
            by_rows = node.op_type in ("QLinearConv", "ConvInteger") or (node.op_type == "QGemm" and node_attr(node, "transB", 0))
            wz = wz.reshape([-1] + [1] * (w.ndim - 1)) if by_rows else wz.reshape(-1)
        w = w - wz
    data_zero_point = DATA_ZERO_POINT.get(node.op_type, 2)
    return (w, *integer_codes(model, node, 0, data_zero_point, zero_point, elem_types(model)))


def integer_codes(model: ModelWrapper, node: NodeProto, data: int, zero_point_input: int, zero_point: str,
                  types: Mapping[str, int]) -> tuple[int, int, int]:
    """``(lo, hi, padding code)`` of the integer operand at input ``data`` of an integer MAC op, its zero point at
    input ``zero_point_input``: its type's range, less the zero point under subtract."""
    if data == 0 and node.op_type in _QUANTIZES_DATA:  # any uint8 code, any uint8 zero point
        return (-255, 255, 0) if zero_point == "subtract" else (0, 255, 0)
    x_zp = node.input[zero_point_input] if len(node.input) > zero_point_input else ""
    zp_value = None
    if x_zp:
        try:
            zp_value = execute_constants(model, [x_zp])[x_zp]
        except CannotCertify:
            zp_value = None  # computed at run time (DynamicQuantizeLinear): any value of its type
    x = node.input[data]
    x_type = helper.np_dtype_to_tensor_dtype(zp_value.dtype) if zp_value is not None else types.get(x)
    if x_type not in STORAGE_RANGES or (types.get(x) not in (None, x_type)):
        raise CannotCertify(f"the integer input '{x}' of {node_label(node)} has type {x_type} "
                            f"(type inference: {types.get(x)})")
    lo, hi = STORAGE_RANGES[x_type]
    if zp_value is not None:
        z = uniform_value(zp_value, f"the zero point '{x_zp}' of {node_label(node)}")
        z_lo = z_hi = int(z)
    elif x_zp:
        if types.get(x_zp) not in STORAGE_RANGES:
            raise CannotCertify(f"the run-time input zero point '{x_zp}' of {node_label(node)} has an unknown type")
        z_lo, z_hi = STORAGE_RANGES[types[x_zp]]
    else:
        z_lo = z_hi = 0
    if zero_point == "subtract":  # ONNX pads x - z with 0
        return lo - z_hi, hi - z_lo, 0
    # raw codes; a padded tap holds z, a code of the input's own type, so [lo, hi] covers it whatever z is
    return lo, hi, z_lo if z_lo == z_hi else lo
