"""Data simulation of onnxruntime's integer MAC ops: ``ConvInteger``/``MatMulInteger``, ``QLinearConv``/
``QLinearMatMul`` and onnxruntime's ``com.microsoft`` ``QGemm``, ``QLinearConv`` (channels-last, as its optimizer
writes it) and the dynamic quantizer's fused ``MatMulIntegerToFloat``/``DynamicQuantizeMatMul``.

Their inputs are integer codes (``DynamicQuantizeMatMul`` quantizes its float input itself, as
``DynamicQuantizeLinear`` does). The accumulator multiplies ``code - z`` (``subtract``) or the raw codes
with ``z`` in padded taps (``fold``: the zero point's share is a bias added after the accumulator), so the codes
come straight from the executed input tensor and its zero point, which may be computed per run
(``DynamicQuantizeLinear``). ``ConvInteger``/``MatMulInteger`` output the exact accumulator, so a P-bit error
reaches the output unscaled; the others requantize (or scale) it, and an output
whose accumulator overflowed is recomputed here from the P-bit result (:class:`Requantization`).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.exact_integer_ops import dynamic_quantization, output_multiplier, scale_accumulator
from a2q_passes.graph_values import get_constant, node_attr
from a2q_passes.weight_sources import INTEGER_MAC_OPS

SIMULATED_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                         "DynamicQuantizeMatMul")
REQUANTIZING_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
# where a requantizing op keeps (input scale, weight scale, bias, output scale, output zero point); None: it has none
# (DynamicQuantizeMatMul computes its input scale itself)
_REQUANTIZATION_INPUTS = {"QLinearConv": (1, 4, 8, 6, 7), "QLinearMatMul": (1, 4, None, 6, 7), "QGemm": (1, 4, 6, 7, 8),
                          "MatMulIntegerToFloat": (2, 3, 6, None, None), "DynamicQuantizeMatMul": (None, 2, 4, None, None)}
# ops whose float output adds a float bias after scaling (the others add an int32 bias to the accumulator)
_FLOAT_BIAS_OPS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def unsimulated_integer_op(node: NodeProto) -> str | None:
    """Why ``node``, an integer MAC op, is not simulated on data, or None."""
    if node.op_type not in SIMULATED_INTEGER_OPS:
        return (f"data simulation of {node.domain or 'ONNX'} {node.op_type} nodes is not implemented (the static proof "
                "and adversarial simulation still apply)")
    return None


def _input(node: NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def operand_codes(node: NodeProto, context: dict[str, np.ndarray], convention: str,
                  second: bool = False) -> tuple[np.ndarray, int]:
    """The codes the accumulator multiplies at the data operand (``second``: the weight operand) of ``node`` and the
    code of a padded tap: ``(code - z, 0)`` under ``subtract``, ``(code, z)`` under ``fold``. ``z`` is the executed
    zero point (one per tensor: the layer reader refuses others)."""
    operands = INTEGER_MAC_OPS[node.op_type]
    data, zp_index = (operands.weight, operands.weight_zero_point) if second else (0, operands.data_zero_point)
    x = np.asarray(context[node.input[data]])
    if operands.quantizes_data and not second:
        codes, _, z = dynamic_quantization(x)
        return (codes - z, 0) if convention == "subtract" else (codes, z)
    if x.dtype.kind not in "iu":
        raise A2QError(f"{node.op_type} node '{node.name or node.output[0]}': its input '{node.input[data]}' is "
                       f"{x.dtype}, not integer codes")
    zp_name = _input(node, zp_index)
    z = int(np.asarray(context[zp_name]).reshape(-1)[0]) if zp_name else 0
    codes = x.astype(np.int64)
    return (codes - z, 0) if convention == "subtract" else (codes, z)


class NotRequantizable(Exception):
    """A requantizing op whose output this module cannot recompute; the message says why."""


class Requantization:
    """A requantizing op's output from its accumulator ``acc = sum (x - z_x)(w - z_w)``: ``QLinearConv``'s and
    ``QGemm``'s int32 bias added, times ``alpha * s_x * s_w / s_y`` (``QGemm``'s ``alpha``; float32, in that order),
    rounded half to even, plus ``z_y`` and saturated, as onnxruntime requantizes; a ``QGemm`` without ``y_zero_point``
    outputs the float ``acc * alpha * s_x * s_w (/ s_y)``, ``MatMulIntegerToFloat`` and ``DynamicQuantizeMatMul`` the
    float ``acc * s_x * s_w`` plus their float bias. Scales and zero points are the executed ones (a dynamically
    quantized input's differ between runs)."""

    def __init__(self, model: ModelWrapper, node: NodeProto) -> None:
        self.node = node
        x_scale, w_scale, bias, y_scale, y_zero = _REQUANTIZATION_INPUTS[node.op_type]
        self.x_scale, self.w_scale = (_input(node, x_scale) if x_scale is not None else None), _input(node, w_scale)
        self.y_scale = _input(node, y_scale) if y_scale is not None else ""
        self.y_zero = _input(node, y_zero) if y_zero is not None else ""
        # QGemm without y_zero_point outputs floats, as the ToFloat ops do; the QLinear ops' defaults to uint8 0
        self.float_output = not self.y_zero and node.op_type not in ("QLinearConv", "QLinearMatMul")
        self.float_bias = node.op_type in _FLOAT_BIAS_OPS
        self.bias = np.zeros(1, np.float32 if self.float_bias else np.int64)
        if bias is not None and _input(node, bias):
            value = get_constant(model, _input(node, bias))
            if value is None:
                raise NotRequantizable(f"its bias '{_input(node, bias)}' is not a constant, so an overflowed "
                                       "accumulator could not be requantized")
            self.bias = np.asarray(value).astype(self.bias.dtype)
            if self.bias.ndim > 1 and self.bias.shape[0] != 1:  # QGemm's C of shape (M, 1) or (M, N)
                raise NotRequantizable(f"its bias '{_input(node, bias)}' of shape {list(self.bias.shape)} differs "
                                       "between rows; only one per tensor or per output channel is requantized")
            self.bias = self.bias.reshape(-1)

    def output(self, acc: np.ndarray, channel_axis: int, context: dict[str, np.ndarray]) -> np.ndarray:
        """The op's output for accumulators ``acc`` (int64), channels along ``channel_axis``, on the run whose
        executed tensors ``context`` holds."""
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        x_scale = dynamic_quantization(context[self.node.input[0]])[1] if self.x_scale is None else \
            context[self.x_scale]
        multiplier = output_multiplier(node_attr(self.node, "alpha", 1.0), x_scale, context[self.w_scale],
                                       context[self.y_scale] if self.y_scale else None).reshape(shape)
        bias = self.bias.reshape(shape)
        if self.float_bias:
            return scale_accumulator(acc, multiplier, None) + bias
        zero_point = None if self.float_output else context[self.y_zero] if self.y_zero else np.zeros((), np.uint8)
        return scale_accumulator(acc + bias, multiplier, zero_point)
