"""Data simulation of onnxruntime's integer MAC ops: ``ConvInteger``/``MatMulInteger`` and ``QLinearConv``/
``QLinearMatMul`` (ONNX domain).

Their inputs are already integer codes. The accumulator multiplies ``code - z`` (``subtract``) or the raw codes
with ``z`` in padded taps (``fold``: the zero point's share is a bias added after the accumulator), so the codes
come straight from the executed input tensor and its zero point, which may be computed per run
(``DynamicQuantizeLinear``). ``ConvInteger``/``MatMulInteger`` output the exact accumulator, so a P-bit error
reaches the output unscaled; ``QLinearConv``/``QLinearMatMul`` requantize it, and an output whose accumulator
overflowed is requantized here from the P-bit result (:class:`Requantization`).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.graph_values import get_constant
from a2q_passes.weight_sources import INTEGER_MAC_OPS

SIMULATED_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
REQUANTIZING_OPS = ("QLinearConv", "QLinearMatMul")


def unsimulated_integer_op(node: NodeProto) -> str | None:
    """Why ``node``, an integer MAC op, is not simulated on data, or None."""
    if node.op_type not in SIMULATED_INTEGER_OPS:
        return (f"data simulation of {node.domain or 'ONNX'} {node.op_type} nodes is not implemented (the static proof "
                "and adversarial simulation still apply)")
    if node.domain not in ("", "ai.onnx"):  # com.microsoft QLinearConv: onnxruntime's optimizer writes it NHWC
        return f"a {node.domain} {node.op_type} reads channels-last (NHWC) data; the simulator convolves NCHW data"
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
    """``QLinearConv``/``QLinearMatMul``'s output from its accumulator ``acc`` (``sum (x - z_x)(w - z_w)``, plus
    ``QLinearConv``'s int32 bias): ``saturate(round(acc * (s_x * s_w / s_y)) + z_y)``, the multiplier in float32
    and rounding half to even, as onnxruntime requantizes."""

    def __init__(self, model: ModelWrapper, node: NodeProto) -> None:
        def constant(index: int, what: str) -> np.ndarray:
            value = get_constant(model, _input(node, index))
            if value is None:
                raise NotRequantizable(f"its {what} '{_input(node, index)}' is not a constant, so an overflowed "
                                       "accumulator could not be requantized")
            return np.asarray(value)

        s_x, s_w, s_y = (constant(i, what).astype(np.float32) for i, what in ((1, "input scale"), (4, "weight scale"),
                                                                              (6, "output scale")))
        self.multiplier = (s_x.reshape(()) * s_w.reshape(-1) / s_y.reshape(())).astype(np.float32)
        z_y = constant(7, "output zero point") if _input(node, 7) else np.zeros((), np.uint8)
        self.zero_point, self.dtype = int(z_y.reshape(-1)[0]), z_y.dtype
        bias = _input(node, 8) if node.op_type == "QLinearConv" else ""
        self.bias = constant(8, "bias").astype(np.int64).reshape(-1) if bias else np.zeros(1, np.int64)

    def output(self, acc: np.ndarray, channel_axis: int) -> np.ndarray:
        """The op's output for accumulators ``acc`` (int64), channels along ``channel_axis``."""
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        total = acc + self.bias.reshape(shape)
        scaled = np.rint(total.astype(np.float32) * self.multiplier.reshape(shape)).astype(np.float64)
        info = np.iinfo(self.dtype)
        return np.clip(scaled + self.zero_point, info.min, info.max).astype(self.dtype)
