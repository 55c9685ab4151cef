"""Data simulation of onnxruntime's integer MAC ops: ``ConvInteger``/``MatMulInteger``, ``QLinearConv``/
``QLinearMatMul`` and onnxruntime's ``com.microsoft`` ``QGemm`` and ``QLinearConv`` (channels-last, as its optimizer
writes it).

Their inputs are already integer codes. The accumulator multiplies ``code - z`` (``subtract``) or the raw codes
with ``z`` in padded taps (``fold``: the zero point's share is a bias added after the accumulator), so the codes
come straight from the executed input tensor and its zero point, which may be computed per run
(``DynamicQuantizeLinear``). ``ConvInteger``/``MatMulInteger`` output the exact accumulator, so a P-bit error
reaches the output unscaled; ``QLinearConv``/``QLinearMatMul``/``QGemm`` requantize (or scale) it, and an output
whose accumulator overflowed is recomputed here from the P-bit result (:class:`Requantization`).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.exact_integer_ops import output_multiplier, scale_accumulator
from a2q_passes.graph_values import get_constant, node_attr
from a2q_passes.weight_sources import INTEGER_MAC_OPS

SIMULATED_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm")
REQUANTIZING_OPS = ("QLinearConv", "QLinearMatMul", "QGemm")
# where a requantizing op keeps (input scale, weight scale, bias, output scale, output zero point)
_REQUANTIZATION_INPUTS = {"QLinearConv": (1, 4, 8, 6, 7), "QLinearMatMul": (1, 4, None, 6, 7), "QGemm": (1, 4, 6, 7, 8)}


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
    outputs the float ``acc * alpha * s_x * s_w (/ s_y)``."""

    def __init__(self, model: ModelWrapper, node: NodeProto) -> None:
        def constant(index: int, what: str) -> np.ndarray:
            value = get_constant(model, _input(node, index))
            if value is None:
                raise NotRequantizable(f"its {what} '{_input(node, index)}' is not a constant, so an overflowed "
                                       "accumulator could not be requantized")
            return np.asarray(value)

        x_scale, w_scale, bias, y_scale, y_zero = _REQUANTIZATION_INPUTS[node.op_type]
        self.multiplier = output_multiplier(
            node_attr(node, "alpha", 1.0), constant(x_scale, "input scale"), constant(w_scale, "weight scale"),
            constant(y_scale, "output scale") if _input(node, y_scale) else None)
        # QGemm without y_zero_point outputs floats; the QLinear ops' output zero point defaults to uint8 0
        self.zero_point: np.ndarray | None = constant(y_zero, "output zero point") if _input(node, y_zero) else (
            None if node.op_type == "QGemm" else np.zeros((), np.uint8))
        self.bias = np.zeros(1, np.int64)
        if bias is not None and _input(node, bias):
            self.bias = constant(bias, "bias").astype(np.int64)
            if self.bias.ndim > 1 and self.bias.shape[0] != 1:  # QGemm's C of shape (M, 1) or (M, N)
                raise NotRequantizable(f"its bias '{_input(node, bias)}' of shape {list(self.bias.shape)} differs "
                                       "between rows; only one per tensor or per output channel is requantized")
            self.bias = self.bias.reshape(-1)

    def output(self, acc: np.ndarray, channel_axis: int) -> np.ndarray:
        """The op's output for accumulators ``acc`` (int64), channels along ``channel_axis``."""
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        return scale_accumulator(acc + self.bias.reshape(shape), self.multiplier.reshape(shape), self.zero_point)
