"""Exact execution of ONNX's integer MAC ops, which onnxruntime's kernels do not give on every CPU.

onnxruntime multiplies uint8 by int8 with AVX2's ``vpmaddubsw`` on CPUs without VNNI (AVX512-VNNI / AVX-VNNI), which
adds each pair of products in int16 with saturation: ``255 * 127 + 255 * 127`` gives 32767, not 64770
(onnxruntime's documented reason for ``reduce_range``). That is an overflow inside the runtime, below any accumulator
a2q reasons about, so an "exact" reference computed by those kernels is not exact. Where its kernels are exact
(an AMD EPYC with AVX2, for one), onnxruntime lacks forms ONNX allows: a per-channel weight zero point in
``ConvInteger``, a uint8 x int8 ``QLinearMatMul``/``QLinearConv`` with an int8 output ("NOT_IMPLEMENTED"). So these
ops run in ONNX's reference implementation on every CPU (exact integer arithmetic, slower, the same result
everywhere), and onnxruntime's ``com.microsoft`` ``QGemm``, ``MatMulIntegerToFloat`` and ``DynamicQuantizeMatMul``,
which have none, in :class:`ExactQGemm` and :class:`ExactMatMulToFloat`. Q/DQ nodes of 4-bit codes run in the
reference implementation too, for another reason: onnxruntime's Python binding neither returns nor takes 4-bit
arrays.
"""

from __future__ import annotations

import copy

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

# the standard-domain ops that multiply integer operands (onnxruntime's com.microsoft ones have no reference kernel)
INTEGER_MAC_OPS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


class ReferenceSession:
    """A one-node model in ONNX's reference implementation, with the part of ``InferenceSession``'s interface that
    node-by-node runners use (``get_inputs``, ``run``)."""

    def __init__(self, model: ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)
        self.inputs = [_Input(vi.name) for vi in model.graph.input]

    def get_inputs(self) -> list[_Input]:
        return self.inputs

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.evaluator.run(outputs, feeds)


def needs_reference(domain: str, op_type: str) -> bool:
    """Whether a node of this op runs in :func:`exact_session` (every integer MAC op: see the module docstring)."""
    return (domain in ("", "ai.onnx") and op_type in INTEGER_MAC_OPS) or (domain, op_type) in CONTRIB_MACS


QGEMM = ("com.microsoft", "QGemm")
# the dynamic quantizer's fused MatMuls (onnxruntime's optimizer): float output, float bias
MATMUL_TO_FLOAT = (("com.microsoft", "MatMulIntegerToFloat"), ("com.microsoft", "DynamicQuantizeMatMul"))
CONTRIB_MACS = (QGEMM, ("com.microsoft", "QLinearConv"), *MATMUL_TO_FLOAT)


# codes narrower than a byte (opset 21's 4-bit, opset 25's 2-bit types): no numpy type onnxruntime's binding takes
SUB_BYTE = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2)
QUANTIZERS = ("QuantizeLinear", "DequantizeLinear")


def moves_sub_byte_codes(model: ModelProto) -> bool:
    """Whether a one-node model quantizes to or dequantizes from 4-bit or 2-bit codes (ONNX's or onnxruntime's
    ``com.microsoft`` Q/DQ): onnxruntime's Python binding neither returns nor takes such an array, so such a node
    runs in ONNX's reference implementation (:func:`exact_session`), which computes the same codes."""
    node = model.graph.node[0]
    if node.op_type not in QUANTIZERS:
        return False
    types = [vi.type.tensor_type.elem_type for vi in model.graph.input] + [i.data_type for i in model.graph.initializer]
    output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    return output_dtype in SUB_BYTE or any(t in SUB_BYTE for t in types)


def exact_session(model: ModelProto) -> "ExactSession":
    """An exact session for a one-node model of an op :func:`needs_reference` names, or one that
    :func:`moves_sub_byte_codes`."""
    node = model.graph.node[0]
    if (node.domain, node.op_type) == QGEMM:
        return ExactQGemm(model)
    if (node.domain, node.op_type) in MATMUL_TO_FLOAT:
        return ExactMatMulToFloat(model)
    if node.op_type in QUANTIZERS:  # 4-bit codes: ONNX's op, at the opset that has them
        return ReferenceSession(_as_onnx_op(model, min_opset=21))
    if node.domain == "com.microsoft":  # QLinearConv: ONNX's op, on NHWC data where channels_last is set
        return ReferenceSession(_onnx_qlinear_conv(model))
    return ReferenceSession(model)


def _as_onnx_op(model: ModelProto, min_opset: int = 1) -> ModelProto:
    """A copy of a one-node model whose ``com.microsoft`` node is ONNX's op of the same name, at an ONNX opset of at
    least ``min_opset``."""
    model = copy.deepcopy(model)
    model.graph.node[0].domain = ""
    kept = [o for o in model.opset_import if o.domain not in ("com.microsoft", "", "ai.onnx")]
    version = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] + [min_opset])
    del model.opset_import[:]
    model.opset_import.extend([*kept, helper.make_opsetid("", version)])
    return model


def _onnx_qlinear_conv(model: ModelProto) -> ModelProto:
    """onnxruntime's com.microsoft ``QLinearConv`` as ONNX's (its weights are OIHW either way), between transposes
    of its NHWC input and output where ``channels_last`` is set."""
    model = _as_onnx_op(model)
    node = model.graph.node[0]
    channels_last = next((a.i for a in node.attribute if a.name == "channels_last"), 0)
    kept = [a for a in node.attribute if a.name != "channels_last"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if channels_last:
        # the data's rank is the weights' (C_out, C_in / group, *kernel)
        weights = next((init for init in model.graph.initializer if init.name == node.input[3]), None)
        rank = len(weights.dims) if weights is not None else 4
        first = [0, rank - 1, *range(1, rank - 1)]
        last = [0, *range(2, rank), 1]
        x, y = node.input[0], node.output[0]
        node.input[0], node.output[0] = f"{x}__nchw", f"{y}__nchw"
        model.graph.node.insert(0, helper.make_node("Transpose", [x], [node.input[0]], perm=first))
        model.graph.node.append(helper.make_node("Transpose", [node.output[0]], [y], perm=last))
    return model


def output_multiplier(alpha: float, x_scale: np.ndarray, w_scale: np.ndarray,
                      y_scale: np.ndarray | None) -> np.ndarray:
    """A requantizing op's float32 multiplier ``alpha * s_x * s_w (/ s_y)`` (``s_w`` per tensor or per output
    channel), multiplied in that order in float32, as onnxruntime's output processors compute it."""
    multiplier = np.float32(alpha) * np.asarray(x_scale).astype(np.float32).reshape(-1)[0] * \
        np.asarray(w_scale).astype(np.float32).reshape(-1)
    if y_scale is not None:
        multiplier = multiplier / np.asarray(y_scale).astype(np.float32).reshape(-1)[0]
    return multiplier.astype(np.float32)


def scale_accumulator(acc: np.ndarray, multiplier: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """An int64 accumulator (bias included) times ``multiplier`` in float32; with an output ``zero_point``, rounded
    half to even, plus it, saturated to its type (onnxruntime's requantization); without, the float product."""
    scaled = acc.astype(np.float32) * multiplier
    if zero_point is None:
        return scaled
    info = np.iinfo(zero_point.dtype)
    return np.clip(np.rint(scaled).astype(np.float64) + int(zero_point.reshape(-1)[0]), info.min,
                   info.max).astype(zero_point.dtype)


def dynamic_quantization(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """The uint8 codes (int64), scale and zero point onnxruntime quantizes a float tensor to inside ``com.microsoft``
    ``DynamicQuantizeMatMul``, as ``DynamicQuantizeLinear`` does: the whole tensor's range widened to hold 0 spans
    0..255 (``scale = (max - min) / 255`` in float32, 1 for an all-zero tensor), ``z = round(-min / scale)``, codes
    ``round(x / scale) + z`` saturated (float32 division, rounding half to even)."""
    x = np.asarray(x, np.float32)
    low, high = min(np.float32(x.min(initial=0)), np.float32(0)), max(np.float32(x.max(initial=0)), np.float32(0))
    scale = np.float32(1) if high == low else np.float32((high - low) / np.float32(255))
    zero_point = int(np.rint(np.clip(np.float32(0) - low / scale, 0, 255)))
    return np.clip(np.rint(x / scale) + zero_point, 0, 255).astype(np.int64), scale, zero_point


class _ExactContribOp:
    """A one-node model of an onnxruntime ``com.microsoft`` integer op, run here in exact integer arithmetic."""

    def __init__(self, model: ModelProto) -> None:
        self.node = model.graph.node[0]
        self.inputs = [_Input(vi.name) for vi in model.graph.input]
        self.constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        self.attributes = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    def get_inputs(self) -> list[_Input]:
        return self.inputs

    def _value(self, feeds: dict[str, np.ndarray], index: int) -> np.ndarray | None:
        name = self.node.input[index] if len(self.node.input) > index else ""
        return None if not name else np.asarray(feeds[name] if name in feeds else self.constants[name])


class ExactQGemm(_ExactContribOp):
    """onnxruntime's ``com.microsoft`` ``QGemm`` in exact integer arithmetic, then scaled as its kernel scales.

    The accumulator is ``C + (A - z_a)(B - z_b)`` (int64; ``transA``/``transB`` applied, ``z_b`` and ``s_b`` per
    tensor or per column). With ``y_zero_point`` the output is ``saturate(round(acc * s) + z_y)``, else the float
    ``acc * s``, where ``s = alpha * s_a * s_b[n] (/ s_y)`` in float32 and rounding is half to even, as onnxruntime's
    requantizing and scaling output processors compute them.
    """

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        def value(index: int) -> np.ndarray | None:
            return self._value(feeds, index)

        a, b = value(0).astype(np.int64), value(3).astype(np.int64)
        a = a.T if self.attributes.get("transA", 0) else a
        b = b.T if self.attributes.get("transB", 0) else b
        z_a, z_b = value(2), value(5)
        acc = (a - (0 if z_a is None else int(z_a.reshape(-1)[0]))) @ \
            (b - (0 if z_b is None else z_b.astype(np.int64).reshape(-1)))
        bias = value(6)
        if bias is not None:
            acc = acc + bias.astype(np.int64)
        multiplier = output_multiplier(self.attributes.get("alpha", 1.0), value(1), value(4), value(7))
        return [scale_accumulator(acc, multiplier, value(8))]


class ExactMatMulToFloat(_ExactContribOp):
    """onnxruntime's ``com.microsoft`` ``MatMulIntegerToFloat`` (``A, B, s_a, s_b, z_a, z_b, bias``) and
    ``DynamicQuantizeMatMul`` (``A, B, s_b, z_b, bias``; ``A`` float, quantized by :func:`dynamic_quantization`) in
    exact integer arithmetic: ``(A - z_a) @ (B - z_b)`` in int64 (numpy's matmul broadcasting; ``z_b``, ``s_b`` per
    tensor or per column), times ``s_a * s_b`` in float32, plus the float bias, as onnxruntime's scaling output
    processor computes it."""

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.node.op_type == "DynamicQuantizeMatMul":
            a, a_scale, a_zero = dynamic_quantization(self._value(feeds, 0))
            b_scale, b_zero, bias = (self._value(feeds, i) for i in (2, 3, 4))
        else:
            a, a_scale, b_scale, a_zero, b_zero, bias = (self._value(feeds, i) for i in (0, 2, 3, 4, 5, 6))
            a, a_zero = a.astype(np.int64), 0 if a_zero is None else int(a_zero.reshape(-1)[0])
        b = self._value(feeds, 1).astype(np.int64) - (0 if b_zero is None else b_zero.astype(np.int64).reshape(-1))
        y = scale_accumulator(np.matmul(a - a_zero, b), output_multiplier(1.0, a_scale, b_scale, None), None)
        return [y if bias is None else y + bias.astype(np.float32)]


ExactSession = ReferenceSession | ExactQGemm | ExactMatMulToFloat
