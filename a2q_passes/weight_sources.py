"""Where a MAC layer's integer weights are stored, and how to read and write them.

Supported weight sources: QONNX ``Quant``/``IntQuant``/``BipolarQuant`` on constants, FINN-ONNX initializers with an
integer datatype annotation, and standard ``DequantizeLinear`` (optionally fed by ``QuantizeLinear``, and optionally
behind integer ``Clip`` nodes as Brevitas' QCDQ export writes them) on constants of any ONNX integer storage type
(int4/uint4 to int32 included; opset-21 block-wise scales), each optionally behind ``Transpose``/``Identity`` nodes;
and the integer initializers of onnxruntime's QOperator and dynamic ops (``QLinearConv``, ``QLinearMatMul``,
``com.microsoft`` ``QGemm``, ``ConvInteger``, ``MatMulInteger``, ...).

A non-zero weight zero point z (``DequantizeLinear`` and the integer ops) follows the activation convention: under
``subtract`` (the ONNX definition) the MAC multiplies ``code - z`` per output channel; under ``fold`` it multiplies the
raw codes, which project cannot shrink toward real 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from onnx import NodeProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.bounds import BIPOLAR, IntRange, integer_format, narrowest_integers, stored_as_columns
from a2q_passes.graph_values import extracted_quant_scale, get_constant, node_attr, node_label, node_str_attr
from a2q_passes.tensor_store import initializer_proto, initializer_value, set_initializer_value


@dataclass(frozen=True)
class IntegerOperands:
    """Where an op that multiplies integer tensors itself (onnxruntime QOperator / dynamic formats) keeps them.

    Input 0 holds the data, its zero point at ``data_zero_point`` (ONNX QLinearConv/QLinearMatMul/ConvInteger/
    MatMulInteger, com.microsoft QGemm: 2; com.microsoft MatMulIntegerToFloat: 4); ``quantizes_data``: the data is
    float and the op quantizes it itself as DynamicQuantizeLinear does (com.microsoft DynamicQuantizeMatMul).
    ``mac_op`` is the float op whose weight layout (and padding) the op shares.
    """

    mac_op: str
    weight: int
    weight_zero_point: int
    domains: tuple[str, ...] = ("", "ai.onnx")
    data_zero_point: int = 2
    quantizes_data: bool = False


INTEGER_MAC_OPS = {
    # com.microsoft: the channels-last form onnxruntime's optimizer writes (ORT_ENABLE_ALL); its weights stay OIHW
    "QLinearConv": IntegerOperands("Conv", 3, 5, ("", "ai.onnx", "com.microsoft")),
    "ConvInteger": IntegerOperands("Conv", 1, 3),
    "QLinearMatMul": IntegerOperands("MatMul", 3, 5),
    "MatMulInteger": IntegerOperands("MatMul", 1, 3),
    "QGemm": IntegerOperands("Gemm", 3, 5, ("com.microsoft",)),
    # what onnxruntime's optimizer fuses a dynamic model's DynamicQuantizeLinear -> MatMulInteger (-> Mul) into
    "DynamicQuantizeMatMul": IntegerOperands("MatMul", 1, 3, ("com.microsoft",), quantizes_data=True),
    "MatMulIntegerToFloat": IntegerOperands("MatMul", 1, 5, ("com.microsoft",), data_zero_point=4),
}


def is_integer_mac(node: NodeProto) -> bool:
    """Whether ``node`` is one of :data:`INTEGER_MAC_OPS` in its own domain."""
    operands = INTEGER_MAC_OPS.get(node.op_type)
    return operands is not None and node.domain in operands.domains


QUANT_OP_TYPES = ("Quant", "IntQuant")


class UnsupportedLayer(Exception):
    """A MAC layer whose quantization this tool cannot read; the message says why and what to do."""


@dataclass
class WeightSource:
    """Where a layer's integer weights are stored and how to write new ones back."""

    # "quant", "bipolar_quant", "initializer", "dequantize_linear", "quantize_dequantize", or
    # "integer_operand" (an integer initializer an integer MAC op such as QLinearConv reads itself)
    kind: str
    tensor: str  # initializer holding the stored weights
    quant_node: str | None
    weight_range: IntRange  # the integers the MAC multiplies (with zero offsets: over every channel)
    dtype: str
    scale: np.ndarray | None = None  # broadcastable to the stored tensor
    zero_point: np.ndarray | None = None  # the stored zero point (storage dtype), broadcastable to the stored tensor
    rounding_mode: str = "ROUND"
    perms: list[list[int]] = field(default_factory=list)  # Transposes from stored tensor to MAC input
    # the raw codes the quantizer stores (weight_range unless a zero point is subtracted)
    storage_range: IntRange | None = None
    # --zero-point subtract: the non-zero weight zero point the MAC subtracts from the stored codes
    zero_offset: np.ndarray | None = None
    # --zero-point fold with a non-zero weight zero point: the MAC multiplies raw codes, whose 0 is not real 0
    raw_zero_point: bool = False
    # opset-21 block-wise DequantizeLinear: ``block_size`` consecutive elements along stored axis ``block_axis``
    # share one scale (and zero point); ``scale``/``zero_point`` are then expanded to the stored shape
    block_size: int = 0
    block_axis: int = 0

    @property
    def bipolar(self) -> bool:
        """Weights in {-1, +1}: the tensor cannot hold a 0, so projection cannot shrink it."""
        return self.dtype == "BIPOLAR"


# --------------------------------------------------------------------------- weights


def _require_constant(model: ModelWrapper, node: NodeProto, index: int, what: str) -> np.ndarray:
    value = get_constant(model, node.input[index]) if len(node.input) > index else None
    if value is None:
        raise UnsupportedLayer(
            f"{node_label(node)} has a non-constant {what} ('{node.input[index] if len(node.input) > index else ''}'); "
            "fold constants first (e.g. `qonnx-cleanup`) so the weight quantizer is static"
        )
    return value


def _require_stored_weights(model: ModelWrapper, node: NodeProto, tensor: str | None = None) -> None:
    """Refuse weights that are not constant, or constant but no initializer of their own (an ``Identity`` of another
    tensor): ``project`` rewrites weights by storing their initializer. ``tensor``: the stored weights, by default
    the quantizer ``node``'s input 0 (then checked constant first)."""
    if tensor is None:
        _require_constant(model, node, 0, "weight input")
        tensor = node.input[0]
    if initializer_proto(model, tensor) is None:
        raise UnsupportedLayer(f"{node_label(node)} reads weights '{tensor}' computed from another constant, not "
                               "stored as an initializer of their own, so a2q cannot rewrite them; fold constants "
                               "first (e.g. `qonnx-cleanup` or onnxsim)")


def int_dtype_name(bits: int, signed: bool) -> str:
    return f"{'INT' if signed else 'UINT'}{bits}"


def dtype_for_range(r: IntRange) -> str:
    return int_dtype_name(*integer_format(r))


def codes_less_zero_point(codes: IntRange, zero: int) -> tuple[IntRange, str]:
    """The values ``q - z`` of a quantizer's codes ``q`` in ``codes`` less its zero point ``zero``, and the smallest
    DataType holding them (``INT9`` for uint8 codes with ``z`` in 1..255): what FINN's MAC reads once ``a2q lower``
    makes the quantizer into thresholds with an output bias (:mod:`a2q_passes.finn_zero_points`)."""
    shifted = codes.shifted(zero)
    return shifted, dtype_for_range(shifted)


def quant_dtype(bits: int, signed: bool) -> str:
    if bits == 1:
        return "BIPOLAR" if signed else "BINARY"
    return int_dtype_name(bits, signed)


def check_integer_values(values: np.ndarray, dt: DataType, what: str) -> None:
    """Raise :class:`UnsupportedLayer` unless every value of ``values`` belongs to the integer datatype ``dt``.

    Execution uses the stored values, not the annotation: a ``BIPOLAR`` tensor holding a 0 or an
    ``INT4`` tensor holding 9 would be read with a range that does not contain what executes.
    """
    values = np.asarray(values)
    if not np.array_equal(values, np.round(values)):
        raise UnsupportedLayer(f"{what} is annotated {dt.name} but holds non-integers")
    if not values.size:
        return
    zeros = dt == DataType["BIPOLAR"] and bool((values == 0).any())
    if zeros or values.min() < dt.min() or values.max() > dt.max():
        raise UnsupportedLayer(f"{what} is annotated {dt.name} but holds values outside it "
                               f"(min {values.min()}, max {values.max()}{', zeros' if zeros else ''}); "
                               "fix the datatype annotation or the values")


def storage_code_range(dtype: np.dtype) -> tuple[IntRange, str]:
    """Integer range and qonnx datatype name of a QDQ storage type (int4, uint8, int16, ...).

    onnx reads int4/uint4 tensors as ``ml_dtypes`` types, which ``np.iinfo`` rejects.
    """
    try:
        info = ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError) as err:
        raise UnsupportedLayer(f"QDQ storage type {np.dtype(dtype).name} is not an integer type") from err
    return IntRange(int(info.min), int(info.max)), int_dtype_name(info.bits, info.min < 0)


def skip_clips(model: ModelWrapper, tensor: str) -> tuple[str, list[NodeProto]]:
    """The tensor feeding a chain of ``Clip`` nodes that ends in ``tensor``, and those Clips (last first)."""
    clips = []
    producer = model.find_producer(tensor)
    while producer is not None and producer.op_type == "Clip":
        clips.append(producer)
        tensor = producer.input[0]
        producer = model.find_producer(tensor)
    return tensor, clips


def clipped_range(model: ModelWrapper, codes: IntRange, clips: list[NodeProto]) -> IntRange:
    """The codes left after the integer ``Clip`` nodes ``clips`` (last first) on ``codes``.

    Brevitas' QCDQ export narrows an int8/uint8 container with a Clip between QuantizeLinear and
    DequantizeLinear (a 2-bit activation is uint8 clipped to [0, 3]). Clamping is monotone, so
    the image of ``[lo, hi]`` is ``[clamp(lo), clamp(hi)]``; a missing bound leaves that side.
    """
    for clip in reversed(clips):
        if node_attr(clip, "min") is not None or node_attr(clip, "max") is not None:
            raise UnsupportedLayer(f"{node_label(clip)} gives its bounds as attributes (opset < 11, float only); "
                                   "an integer Clip takes them as inputs: re-export with opset >= 13")
        lo, hi = codes.lo, codes.hi
        limits = []
        for index in (1, 2):
            name = clip.input[index] if len(clip.input) > index else ""
            value = get_constant(model, name) if name else None
            if name and (value is None or np.size(value) != 1):
                raise UnsupportedLayer(f"{node_label(clip)} has a non-constant or non-scalar bound '{name}'; "
                                       "fold constants first so the integer range is static")
            limits.append(None if value is None else float(np.asarray(value, dtype=np.float64).reshape(())))
        c_lo, c_hi = limits
        if any(v is not None and v != round(v) for v in limits):
            raise UnsupportedLayer(f"{node_label(clip)} clips integer codes to non-integer bounds {limits}")
        if c_lo is not None and c_hi is not None and c_lo > c_hi:
            raise UnsupportedLayer(f"{node_label(clip)} has min {c_lo} > max {c_hi}; fix the exported bounds")
        clamp = lambda v: int(min(max(v, c_lo if c_lo is not None else v), c_hi if c_hi is not None else v))  # noqa: E731
        codes = IntRange(clamp(lo), clamp(hi))
    return codes


def resolve_weight_source(model: ModelWrapper, tensor: str, perms: list[list[int]] | None = None,
                          zero_point: str = "fold") -> WeightSource | None:
    """How the weight input ``tensor`` of a MAC node is quantized, or ``None`` if it is float.

    ``zero_point`` is the convention for a non-zero ``DequantizeLinear`` weight zero point (see
    :func:`_zero_point_source`). Raises :class:`UnsupportedLayer` for quantized weights this tool cannot read.
    """
    perms = list(perms or [])
    producer = model.find_producer(tensor)
    if producer is None:
        if initializer_proto(model, tensor) is None:
            raise UnsupportedLayer(f"weight input '{tensor}' is not a constant")
        dt = model.get_tensor_datatype(tensor)
        if dt.is_integer() and not dt.name.startswith("SCALED"):
            check_integer_values(initializer_value(model, tensor), dt, f"initializer '{tensor}'")
            return WeightSource("initializer", tensor, None, IntRange(int(dt.min()), int(dt.max())), dt.name, perms=perms)
        return None
    op = producer.op_type
    if op in ("Transpose", "Identity"):
        perm = list(node_attr(producer, "perm", [])) if op == "Transpose" else []
        if op == "Transpose" and not perm:
            shape = get_constant(model, producer.input[0])
            perm = list(range(np.ndim(shape) - 1, -1, -1)) if shape is not None else []
        return resolve_weight_source(model, producer.input[0], ([perm] if perm else []) + perms, zero_point)
    if op in QUANT_OP_TYPES:
        _require_stored_weights(model, producer)
        return _quant_source(model, producer, perms, zero_point, producer.input[0],
                             _require_constant(model, producer, 1, "scale"))
    if op == "BipolarQuant":
        _require_stored_weights(model, producer)
        scale = _require_constant(model, producer, 1, "scale")
        return WeightSource("bipolar_quant", producer.input[0], producer.name, BIPOLAR, "BIPOLAR",
                            scale=np.asarray(scale, dtype=np.float32), perms=perms)
    if op == "DequantizeLinear":
        return _dequantize_linear_source(model, producer, perms, zero_point)
    if op == "FloatQuant":
        raise UnsupportedLayer(f"weights are produced by {node_label(producer)}: minifloat weights multiply in floating "
                               "point, so the layer has no integer accumulator for a2q to bound")
    if op == "Mul" and any(get_constant(model, t) is not None for t in producer.input):
        return _extracted_scale_source(model, producer, perms, zero_point)
    raise UnsupportedLayer(f"weights are produced by {node_label(producer)}, which this tool does not read; a2q "
                           "reads weights from a quantizer (Quant, BipolarQuant, DequantizeLinear) or an integer "
                           "initializer, directly or through Transpose/Identity")


def _quant_source(model: ModelWrapper, quant: NodeProto, perms: list[list[int]], zero_point: str, tensor: str,
                  scale: np.ndarray) -> WeightSource:
    """The weights a QONNX ``Quant`` makes of the stored ``tensor`` divided by ``scale``: its own input and scale, or
    those qonnx's ExtractQuantScaleZeroPt moved out of it (:func:`_extracted_scale_source`)."""
    z = _require_constant(model, quant, 2, "zero point")
    bits = _require_constant(model, quant, 3, "bit width")
    if np.any(z != np.rint(z)):
        raise UnsupportedLayer(f"{node_label(quant)} has a non-integer weight zero point: its weights are no "
                               "integers a MAC multiplies")
    bits = float(np.asarray(bits).reshape(-1)[0]) if np.size(bits) == 1 else None
    if bits is None or not np.isfinite(bits) or bits != int(bits) or bits < 1:
        # a bit width <= 0 makes qonnx clamp every weight to one value; non-integer widths clamp
        # to fractional limits: neither is a weight quantizer this tool reads
        raise UnsupportedLayer(f"{node_label(quant)} has weight bit width "
                               f"{'per channel' if bits is None else bits}; weights are read only with one "
                               "integer bit width >= 1: re-export the weight quantizer with such a bit width")
    bits = int(bits)
    signed, narrow = bool(node_attr(quant, "signed", 1)), bool(node_attr(quant, "narrow", 0))
    if bits == 1 and signed:
        if np.any(z != 0):  # qonnx's bipolar codes +-1 less a zero point: neither a weight range nor bipolar
            raise UnsupportedLayer(f"{node_label(quant)} is a 1-bit signed weight quantizer with a non-zero "
                                   "zero point, which a2q does not read; re-export it without a zero point")
        weight_range = BIPOLAR
    else:
        from qonnx.custom_op.general.intquant import max_int, min_int  # see quant_code_range

        weight_range = IntRange(int(min_int(signed, narrow, bits)), int(max_int(signed, narrow, bits)))
    source = WeightSource(
        "quant", tensor, quant.name, weight_range, quant_dtype(bits, signed),
        # in their stored types: qonnx divides and adds in numpy's promotion of the weights' and these types (a
        # float64 scale over float32 weights divides in float64, as qonnx's converter of QKeras models stores them)
        scale=np.asarray(scale), zero_point=np.asarray(z),
        rounding_mode=node_str_attr(quant, "rounding_mode", "ROUND"), perms=perms,
    )
    # qonnx's Quant: codes round(clip(w / s + z)), real weight (code - z) * s, as DequantizeLinear's
    if not np.any(z != 0):
        return source
    return _zero_point_source(source, np.rint(z).astype(np.int64), zero_point, node_label(quant))


def _extracted_scale_source(model: ModelWrapper, mul: NodeProto, perms: list[list[int]], zero_point: str) -> WeightSource:
    """Weights as qonnx's ExtractQuantScaleZeroPt writes a weight ``Quant(w, s, 0, b)``: ``Quant(w / s, 1, 0, b) * s``.

    The same codes ``round(clip(w / s))`` in the same float32 steps (``Div`` then a unit-scale ``Quant``), scaled back
    by the same ``s``: read and written as that ``Quant`` (new weights are stored into ``w``). Only that exact form is
    read (:func:`~a2q_passes.graph_values.extracted_quant_scale`), with ``w`` an initializer.
    """
    match = extracted_quant_scale(model, mul)
    if isinstance(match, tuple) and initializer_proto(model, match[0].input[0]) is None:
        match = f"{node_label(match[0])} divides '{match[0].input[0]}', which is no initializer"
    if isinstance(match, str):
        raise UnsupportedLayer(f"weights are produced by {node_label(mul)}, a rescaling after the weight quantizer; "
                               "a2q reads one there only in the form qonnx's ExtractQuantScaleZeroPt writes, "
                               f"Quant(w / s, scale 1, zero point 0) * s with w an initializer, and here {match}; "
                               "run a2q on the model before that transformation")
    div, quant = match
    return _quant_source(model, quant, perms, zero_point, div.input[0], get_constant(model, div.input[1]))


def _per_axis(value: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a per-axis QDQ parameter so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    value = np.asarray(value)
    if value.ndim == 0 or ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis % ndim] = value.size
    return value.reshape(shape)


def storage_dtype(model: ModelWrapper, dq: NodeProto, data: int = 0, zero_point: int = 2) -> np.dtype | None:
    """The integer type a ``DequantizeLinear`` reads (int8, uint8, ...), or ``None`` if unknown; also that of
    the operand at input ``data`` of an integer MAC op, its zero point at input ``zero_point``.

    ONNX: the zero point's type if one is given, else the type of the ``x`` input itself (a
    ``QuantizeLinear`` without zero point outputs its ``output_dtype``, by default uint8).
    """
    zp = get_constant(model, dq.input[zero_point]) if len(dq.input) > zero_point and dq.input[zero_point] else None
    if zp is not None:
        return np.dtype(zp.dtype)
    codes, _ = skip_clips(model, dq.input[data])  # a Clip keeps its input's type
    x = get_constant(model, codes)
    if x is not None:
        return np.dtype(x.dtype)
    producer = model.find_producer(codes)
    if producer is not None and producer.op_type == "DynamicQuantizeLinear":
        return np.dtype(np.uint8)  # ONNX: its codes are always uint8
    if producer is not None and producer.op_type == "QuantizeLinear":
        q_zp = get_constant(model, producer.input[2]) if len(producer.input) > 2 else None
        if q_zp is not None:
            return np.dtype(q_zp.dtype)
        output_dtype = int(node_attr(producer, "output_dtype", 0))
        return helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else np.dtype(np.uint8)
    vi = model.get_tensor_valueinfo(codes)
    elem_type = vi.type.tensor_type.elem_type if vi is not None else 0
    return helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else None


def _zero_point_source(source: WeightSource, zero_point: np.ndarray, convention: str, where: str) -> WeightSource:
    """``source`` (raw codes in ``source.weight_range``) with its weight zero point applied per ``convention``.

    ONNX computes on ``code - z``: under ``subtract`` the MAC multiplies those (per channel, each in
    the storage range shifted by its z); under ``fold`` it multiplies the raw codes, and ``raw_zero_point``
    marks that shrinking raw codes toward 0 does not shrink the real weights.
    """
    storage = source.weight_range
    source.storage_range = storage
    source.zero_point = np.asarray(zero_point)
    z = np.asarray(zero_point, dtype=np.int64)
    if not np.any(z != 0):
        return source
    if convention == "fold":
        source.raw_zero_point = True
        return source
    if np.any(z < storage.lo) or np.any(z > storage.hi):
        raise UnsupportedLayer(f"{where} has a weight zero point outside its codes [{storage.lo}, {storage.hi}]")
    source.zero_offset = z
    source.weight_range = IntRange(storage.lo - int(z.max()), storage.hi - int(z.min()))
    source.dtype = dtype_for_range(source.weight_range)
    return source


def _dequantize_linear_source(model: ModelWrapper, dq: NodeProto, perms: list[list[int]],
                              convention: str = "fold") -> WeightSource:
    scale = _require_constant(model, dq, 1, "scale")
    block_size = int(node_attr(dq, "block_size", 0))
    zp = get_constant(model, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if len(dq.input) > 2 and dq.input[2] and zp is None:
        raise UnsupportedLayer(f"{node_label(dq)} has a non-constant weight zero point; fold constants first")
    codes, clips = skip_clips(model, dq.input[0])
    stored = get_constant(model, codes)
    quantize = model.find_producer(codes) if stored is None else None
    if stored is None and (quantize is None or quantize.op_type != "QuantizeLinear"):
        raise UnsupportedLayer(f"{node_label(dq)} dequantizes a non-constant weight tensor")
    zp_dtype = storage_dtype(model, dq)
    if quantize is None:
        _require_stored_weights(model, dq, codes)
    else:
        _require_stored_weights(model, quantize)
        q_zp = get_constant(model, quantize.input[2]) if len(quantize.input) > 2 and quantize.input[2] else None
        if not np.array_equal(np.zeros((), zp_dtype) if q_zp is None else q_zp, np.zeros((), zp_dtype) if zp is None else zp):
            # the codes QuantizeLinear writes are read with another zero point: no integer weight view
            raise UnsupportedLayer(f"{node_label(dq)} dequantizes with a zero point other than its QuantizeLinear's")
    weight_range, dtype = storage_code_range(zp_dtype)
    if clips:  # QCDQ: the Clip bounds are the weights' integer range (e.g. [-127, 127], or [-2, 1] for 2 bits)
        weight_range = clipped_range(model, weight_range, clips)
        if (zp is None or not np.any(zp != 0)) and not weight_range.lo <= 0 <= weight_range.hi:
            # weights are symmetric (zero point 0): a zero weight must stay representable, or the Clip
            # would turn every weight project shrinks to 0 back into a non-zero one
            raise UnsupportedLayer(
                f"{node_label(clips[0])} clips the weight codes of {node_label(dq)} to "
                f"[{weight_range.lo}, {weight_range.hi}], which excludes 0; a QCDQ weight Clip must keep 0 "
                "(Brevitas exports e.g. [-127, 127] or [-2, 1])")
        dtype = dtype_for_range(weight_range)
    ndim = np.ndim(stored) if stored is not None else np.ndim(get_constant(model, quantize.input[0]))
    axis = int(node_attr(dq, "axis", 1))
    kind = "dequantize_linear" if quantize is None else "quantize_dequantize"
    tensor = codes if quantize is None else quantize.input[0]
    if block_size:
        if quantize is not None:
            raise UnsupportedLayer(f"{node_label(dq)} dequantizes block-wise (block_size {block_size}) what a "
                                   "QuantizeLinear computes; only constant block-wise codes are read (fold constants "
                                   "first, as onnxruntime's MatMulNBitsQuantizer writes them)")
        shape = np.shape(stored)
        scale = _expand_blocks(scale, axis, block_size, shape, dq, "scale")
        zp = None if zp is None else _expand_blocks(zp, axis, block_size, shape, dq, "zero point")
    else:
        scale = _per_axis(scale, axis, ndim)
        zp = None if zp is None else _per_axis(zp, axis, ndim)
    source = WeightSource(kind, tensor, dq.name, weight_range, dtype, scale=scale, perms=perms,
                          block_size=block_size, block_axis=axis % max(ndim, 1))
    zero = np.zeros((), dtype=zp_dtype) if zp is None else zp
    return _zero_point_source(source, zero, convention, node_label(dq))


def _expand_blocks(value: np.ndarray, axis: int, block_size: int, shape: tuple[int, ...], dq: NodeProto,
                   what: str) -> np.ndarray:
    """A block-wise ``DequantizeLinear`` parameter repeated to the data's shape (ONNX opset 21).

    The parameter has the data's rank and shape except along ``axis``, where it holds
    ``ceil(shape[axis] / block_size)`` entries: element ``i`` along ``axis`` uses entry ``i // block_size``.
    """
    value = np.asarray(value)
    axis %= len(shape)
    expected = tuple(-(-d // block_size) if i == axis else d for i, d in enumerate(shape))
    if block_size < 1 or value.shape != expected:
        raise UnsupportedLayer(f"{node_label(dq)} has a block-wise {what} of shape {list(value.shape)}; data of "
                               f"shape {list(shape)} with block_size {block_size} on axis {axis} needs {list(expected)}")
    return np.repeat(value, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def integer_operand_source(model: ModelWrapper, node: NodeProto, convention: str = "fold") -> WeightSource:
    """The integer weight initializer (and weight zero point) an integer MAC op such as QLinearConv reads itself.

    The weight zero point is per tensor or one per output channel (ONNX: ``w_zero_point`` of
    QLinearConv/ConvInteger along the output channels, ``b_zero_point`` of QLinearMatMul/MatMulInteger
    and com.microsoft QGemm per column of B).
    """
    operands = INTEGER_MAC_OPS[node.op_type]
    name = node.input[operands.weight]
    stored = initializer_value(model, name)
    if stored is None:
        raise UnsupportedLayer(f"{node_label(node)} reads non-constant weights '{name}' (only an integer "
                               "initializer is read)")
    if np.dtype(stored.dtype).kind not in "iu":
        raise UnsupportedLayer(f"{node_label(node)} reads weights '{name}' of type {stored.dtype}, not integers")
    storage, dtype = storage_code_range(stored.dtype)
    zp_name = node.input[operands.weight_zero_point] if len(node.input) > operands.weight_zero_point else ""
    zp = get_constant(model, zp_name) if zp_name else np.zeros((), stored.dtype)
    if zp is None:
        raise UnsupportedLayer(f"{node_label(node)} has a non-constant weight zero point '{zp_name}'")
    if np.size(zp) > 1:
        channel_axis = 0 if operands.mac_op == "Conv" or (operands.mac_op == "Gemm" and node_attr(node, "transB", 0)) else 1
        if stored.ndim < 2 or np.ndim(zp) != 1 or np.size(zp) != stored.shape[channel_axis]:
            raise UnsupportedLayer(f"{node_label(node)} has a weight zero point of shape {list(np.shape(zp))}; "
                                   "only one per tensor or one per output channel is read")
        zp = _per_axis(np.asarray(zp), channel_axis, stored.ndim)
    else:
        zp = np.asarray(zp).reshape(())
    source = WeightSource("integer_operand", name, node.name, storage, dtype)
    return _zero_point_source(source, zp, convention, node_label(node))


def transposed_copy(a: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """``np.ascontiguousarray(a.T, dtype)`` for a 2-D array, copied a square tile at a time.

    numpy copies a transposed view walking one of the two arrays across its rows, a cache miss per element
    on a layer of millions of weights; a tile (about 32 KiB of the wider type) stays in cache: 3-4x faster.
    """
    out = np.empty(a.shape[::-1], dtype=a.dtype if dtype is None else dtype)
    tile = max(16, int((32768 / max(a.itemsize, out.itemsize)) ** 0.5))
    for i in range(0, a.shape[0], tile):
        for j in range(0, a.shape[1], tile):
            out[j:j + tile, i:i + tile] = a[i:i + tile, j:j + tile].T
    return out


def contiguous_copy(a: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype)``; a transposed view (rows stored as columns) is copied tile by tile."""
    if stored_as_columns(a):
        return transposed_copy(a.T, dtype)
    return np.ascontiguousarray(a, dtype=dtype)


def apply_perms(w: np.ndarray, perms: list[list[int]], inverse: bool = False) -> np.ndarray:
    """Apply the weight path's ``Transpose`` permutations in order (or undo them with ``inverse``)."""
    for perm in (reversed(perms) if inverse else perms):
        w = np.transpose(w, np.argsort(perm) if inverse else perm)
    return w


def mac_weight_shape(source: WeightSource, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the weights as the MAC node sees them (the stored shape through the weight path's Transposes)."""
    for perm in source.perms:
        stored_shape = tuple(stored_shape[axis] for axis in perm)
    return tuple(stored_shape)


def read_stored_integers(model: ModelWrapper, source: WeightSource) -> np.ndarray:
    """Integer weights in the layout of the stored tensor, exactly as the graph's quantizer makes them.

    With a subtracted weight zero point these are ``code - z``, the integers the MAC multiplies.
    """
    codes = _stored_codes(model, source)
    return codes if source.zero_offset is None else codes - source.zero_offset


def codes_as_stored(model: ModelWrapper, source: WeightSource) -> np.ndarray | None:
    """The stored integer tensor when it already holds the integers the MAC multiplies, else ``None``."""
    if source.kind not in ("initializer", "dequantize_linear", "integer_operand") or source.zero_offset is not None:
        return None
    stored = initializer_value(model, source.tensor)
    if stored.dtype.kind not in "iu":  # float-stored FINN weights, int4 (ml_dtypes): widen as usual
        return None
    if source.kind == "dequantize_linear":
        codes, storage = source.storage_range or source.weight_range, np.iinfo(stored.dtype)
        if storage.min < codes.lo or storage.max > codes.hi:  # a Clip narrows the codes: clamp as usual
            return None
    return stored


def _stored_codes(model: ModelWrapper, source: WeightSource) -> np.ndarray:
    """The codes the graph's weight quantizer makes, before any zero point is subtracted."""
    stored = initializer_value(model, source.tensor)  # streamed: memory-mapped, read once below
    if source.kind in ("initializer", "integer_operand"):
        return np.asarray(stored).astype(np.int64)
    codes = source.storage_range or source.weight_range
    if source.kind == "dequantize_linear":
        # any Clip between the stored codes and DequantizeLinear clamps them to the code range
        # (without one, the storage type already holds them there); one int64 copy, clamped in place
        wide = np.asarray(stored).astype(np.int64)
        return np.clip(wide, codes.lo, codes.hi, out=wide)
    if source.kind == "bipolar_quant":
        return np.where(stored >= 0, 1, -1).astype(np.int64)
    if source.kind == "quant" and source.bipolar:
        # qonnx int_quant executes a 1-bit signed Quant as bipolar: sign(x / s + z), 0 -> +1 (z == 0)
        return np.where(stored.astype(np.float32) / source.scale.astype(np.float32) >= 0, 1, -1).astype(np.int64)
    if source.kind == "quantize_dequantize":
        # QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), then any Clip: one clamp to
        # the code range does both
        q = np.round(stored.astype(np.float32, copy=False) / source.scale.astype(np.float32)) + source.zero_point.astype(np.int64)
        return np.clip(q, codes.lo, codes.hi, out=q).astype(np.int64, copy=False)
    # qonnx int_quant: the codes round(clip(x / s + z))
    from qonnx.custom_op.general.intquant import resolve_rounding_mode  # see quant_code_range

    y = _quant_unclamped(stored, source)
    y = np.clip(y, codes.lo, codes.hi, out=y)
    return resolve_rounding_mode(source.rounding_mode)(y).astype(np.int64)


def _quant_unclamped(stored: np.ndarray, source: WeightSource) -> np.ndarray:
    """``x / s + z`` of a qonnx ``Quant`` in the types qonnx computes it in: numpy's promotion of the stored weights'
    type and the scale's, then of that and the zero point's (a float32 sum would round where a float64 one does
    not). A new array."""
    y = np.asarray(stored) / source.scale
    return y + source.zero_point if _has_zero_point(source) else y


def saturated_weights(model: ModelWrapper, source: WeightSource) -> tuple[int, int, float]:
    """How many stored weights the graph's quantizer saturates by more than a code: ``w / s + z`` more than a code
    and a half outside the code range (a symmetric quantizer's largest weight one code past a two's-complement
    range, as QKeras' ``quantized_bits`` gives, is not counted). Returns (saturated, total, largest
    ``|w / s + z|``); (0, total, 0.0) for sources that store integers.

    Dividing by one scale and adding one zero point are monotone (correctly rounded), so the extremes of ``w / s + z``
    over the weights sharing a scale are those of their extreme weights: two reductions of the stored tensor decide
    whether any weight saturates, and only then is every weight divided (``analyze`` reads the weights once more here).
    """
    stored = np.asarray(initializer_value(model, source.tensor))
    if source.kind not in UNROUNDED_KINDS or source.bipolar or stored.size == 0:
        return 0, int(stored.size), 0.0
    codes = source.storage_range or source.weight_range

    def unclamped(w: np.ndarray) -> np.ndarray:
        if source.kind == "quant":
            return _quant_unclamped(w, source)
        y = w.astype(np.float32) / source.scale.astype(np.float32)  # QuantizeLinear: float32
        return y + source.zero_point.astype(np.float32) if _has_zero_point(source) else y

    params = np.shape(source.scale) if source.zero_point is None else np.broadcast_shapes(
        np.shape(source.scale), np.shape(source.zero_point))
    if len(params) <= stored.ndim:
        params = (1,) * (stored.ndim - len(params)) + tuple(params)
        shared = tuple(axis for axis, size in enumerate(params) if size == 1)  # axes along which one scale applies
        ends = unclamped(stored.min(axis=shared, keepdims=True)), unclamped(stored.max(axis=shared, keepdims=True))
        low, high = float(np.minimum(*ends).min()), float(np.maximum(*ends).max())
        if codes.lo - 1.5 <= low and high <= codes.hi + 1.5:  # (False for NaN: counted below)
            return 0, int(stored.size), max(abs(low), abs(high))
    y = unclamped(stored)
    outside = int(np.count_nonzero((y < codes.lo - 1.5) | (y > codes.hi + 1.5)))
    return outside, int(y.size), float(np.abs(y).max(initial=0.0))


def _has_zero_point(source: WeightSource) -> bool:
    return source.zero_point is not None and bool(np.any(source.zero_point != 0))


# weight sources whose stored values are real (weight / scale need not be an integer): the others store integers
UNROUNDED_KINDS = ("quant", "quantize_dequantize")


def unrounded_mac_weights(model: ModelWrapper, source: WeightSource) -> np.ndarray:
    """The weights in integer units before rounding (float weight / scale), in the MAC node's layout.

    Sources that store integers (FINN initializers, ``DequantizeLinear``) return those integers.
    """
    if source.kind in UNROUNDED_KINDS:
        stored = initializer_value(model, source.tensor).astype(np.float64)
        unrounded = stored / source.scale.astype(np.float64)
        if source.zero_offset is None and _has_zero_point(source):
            unrounded = unrounded + source.zero_point.astype(np.float64)  # raw codes (fold)
        return apply_perms(unrounded, source.perms)
    return read_mac_weights(model, source).astype(np.float64)


def read_mac_weights(model: ModelWrapper, source: WeightSource) -> np.ndarray:
    """Integer weights in the layout the MAC node consumes (after any weight ``Transpose``)."""
    return apply_perms(read_stored_integers(model, source), source.perms)


# Offsets that make each rounding mode land exactly on the integer q from q * s / s.
_ROUNDING_OFFSET = {"FLOOR": 0.5, "CEIL": -0.5}


def stored_values_for(source: WeightSource, q_stored: np.ndarray) -> np.ndarray:
    """Values to store so that the graph's own quantizer reproduces the integers ``q_stored``."""
    if source.kind in ("initializer", "dequantize_linear", "integer_operand"):
        original_dtype = source.zero_point.dtype if source.zero_point is not None else np.float32
        # no copy where the integers already have the stored type (the projection's int8 weights of an int8 tensor)
        return (q_stored if source.zero_offset is None else q_stored + source.zero_offset).astype(original_dtype,
                                                                                                  copy=False)
    if source.kind == "bipolar_quant":
        return np.where(q_stored > 0, 1.0, -1.0).astype(np.float32) * np.abs(source.scale).astype(np.float32)
    # qonnx's Quant rounds w / s + z: the raw code, less the zero point where one is subtracted
    raw = q_stored if source.zero_offset is None else q_stored + source.zero_offset
    mode = source.rounding_mode.upper()
    offset = _ROUNDING_OFFSET.get(mode, 0.0)
    if mode in ("UP", "DOWN", "HALF_UP", "HALF_DOWN"):
        offset = np.sign(raw) * (0.5 if mode == "DOWN" else -0.5 if mode == "UP" else 0.0)
    unrounded = raw + offset
    if not _has_zero_point(source):
        return (unrounded * source.scale.astype(np.float64)).astype(np.float32)
    return ((unrounded - source.zero_point.astype(np.float64)) * source.scale.astype(np.float64)).astype(np.float32)


def write_mac_weights(model: ModelWrapper, source: WeightSource, q_mac: np.ndarray) -> None:
    """Store new integer weights (MAC layout) and check the graph's quantizer reproduces them exactly."""
    # undo the Transposes in the caller's (possibly narrow) integer type, into one contiguous copy; widened to int64
    # only where a zero point is added (an int8 layer's new weights then stay 1 byte a weight throughout)
    q_stored = contiguous_copy(apply_perms(np.asarray(q_mac), source.perms, inverse=True))
    if source.zero_offset is not None or q_stored.dtype.kind not in "iu":
        q_stored = q_stored.astype(np.int64, copy=False)
    codes = q_stored if source.zero_offset is None else q_stored + source.zero_offset
    limits = source.storage_range or source.weight_range
    if codes.size and (int(codes.min()) < limits.lo or int(codes.max()) > limits.hi):
        raise ValueError(f"new weights for '{source.tensor}' leave the code range [{limits.lo}, {limits.hi}]")
    if source.bipolar and (q_stored == 0).any():
        raise ValueError(f"new weights for '{source.tensor}' contain 0, which its bipolar quantizer cannot represent")
    set_initializer_value(model, source.tensor, stored_values_for(source, q_stored))
    # the read-back below may be an int64 copy of the whole tensor: the new integers wait for it in their narrowest
    # type; where the stored tensor itself holds the integers the MAC multiplies, it is read back as stored
    expected = narrowest_integers(q_stored)
    del q_stored, codes
    written = codes_as_stored(model, source)
    if not _equal_in_blocks(read_stored_integers(model, source) if written is None else written, expected):
        raise AssertionError(f"quantizer of '{source.tensor}' does not reproduce the written integers")


def _equal_in_blocks(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal(a, b)`` a few MB at a time: no mask the size of a large layer (its pages, first touched,
    cost more than the comparison)."""
    if a.shape != b.shape:
        return False
    a, b = a.reshape(-1), b.reshape(-1)
    step = 1 << 22
    return all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.size, step))


