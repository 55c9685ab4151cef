"""Which integer grid a MAC layer's input lives on: the codes of the quantizer above it, through the ops that keep
(or shift, rescale, pad, join) a grid, and FINN's DataType annotations where its flow needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import NodeProto
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.bounds import BIPOLAR, IntRange
from a2q_passes.conventions import CHANNEL_KEEPING_OPS, INPUT_RANGES, ZERO_POINT_CONVENTIONS
from a2q_passes.finn_quant_forms import relu_fold_bits, unsigned_bits_after_relu
from a2q_passes.read_only_model import with_inferred_shapes
from a2q_passes.graph_values import clip_bounds, get_constant, node_attr, node_label, node_str_attr
from a2q_passes.weight_sources import (INTEGER_MAC_OPS, UnsupportedLayer, clipped_range, codes_less_zero_point,
                                       dtype_for_range, quant_dtype, skip_clips, storage_code_range, storage_dtype)

# Ops whose output codes are a subset of their input codes on the same grid.
GRID_PRESERVING_OPS = (
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity",
    "DepthToSpace", "SpaceToDepth", "MaxPoolNHWC", "Slice", "Gather", "Split",
    "Shuffle", "DuplicateStreams",  # FINN's HW layers for a transpose and a fork
)


@dataclass(frozen=True)
class InputGrid:
    """The integer grid of a layer input: codes in ``range``, real value ``(code - zero_code) * scale``."""

    range: IntRange
    dtype: str
    scale: float | None = None
    zero_code: int = 0
    two_point: bool = False  # the codes are exactly {lo, hi} (BIPOLAR and its affine images), not every integer between
    # one scale per index of this axis of the tensor (``scale`` is then None): codes of different steps, which only
    # a MAC summing each output over one index of that axis accumulates (a depthwise convolution over channels)
    scale_axis: int | None = None


# --------------------------------------------------------------------------- input grids


def dtype_grid(name: str, scale: float | None = None) -> InputGrid:
    dt = DataType[name]
    if not dt.is_integer():
        raise KeyError(f"{name} is not an integer datatype")
    return InputGrid(IntRange(int(dt.min()), int(dt.max())), name, scale, 0, name == "BIPOLAR")


def _step_multiplier(t: float, limit: int = 256) -> int | None:
    """Smallest ``a`` in ``1..limit`` with ``a * t`` a whole number (float32 rounding tolerated)."""
    for a in range(1, limit + 1):
        v = a * t
        if abs(v - round(v)) <= 4e-7 * max(1.0, abs(v)):
            return a
    return None


def _grid_dtype(codes: IntRange, two_point: bool, keep: str | None = None) -> str:
    if two_point and (codes.lo, codes.hi) == (-1, 1):
        return "BIPOLAR"
    if (codes.lo, codes.hi) == (0, 1):
        return "BINARY"
    if keep:
        try:
            dt = DataType[keep]
            if dt.is_integer() and keep != "BIPOLAR" and dt.min() <= codes.lo and codes.hi <= dt.max():
                return keep
        except KeyError:
            pass
    return dtype_for_range(codes)


def _coarsened(grid: InputGrid) -> InputGrid:
    """A two-point grid ``{lo, lo + g}`` whose real 0 sits a whole number of ``g`` steps away: codes ``{m, m + 1}``, step ``g * scale``."""
    r, z = grid.range, grid.zero_code
    g = r.hi - r.lo
    if not grid.two_point or g <= 1 or (r.lo - z) % g:
        return grid
    m = z + (r.lo - z) // g
    codes = IntRange(m, m + 1)
    scale = (1.0 if grid.scale is None else grid.scale) * g
    return InputGrid(codes, _grid_dtype(codes, True), scale, z, True)


def _offset_grid(grid: InputGrid, offset: float, label: str) -> tuple[InputGrid | None, str]:
    """The grid of ``real + offset``: codes shift by ``offset / scale`` steps (the zero code stays).

    When ``offset`` is not a whole number of steps the step is divided by the smallest ``a`` that makes
    it one: codes ``a * code + b`` (their extremes are the images of the old extremes, so a linear
    form's extremes over the box stay exact).
    """
    scale = 1.0 if grid.scale is None else grid.scale
    t = offset / scale
    a = _step_multiplier(t)
    if a is None:
        return None, f"{label} adds {offset}, which is not on the integer grid of step {scale} (nor of a step up to 256 times finer)"
    b = int(round(a * t))
    codes = IntRange(a * grid.range.lo + b, a * grid.range.hi + b)
    shifted = InputGrid(codes, _grid_dtype(codes, grid.two_point), scale / a, a * grid.zero_code, grid.two_point)
    return _coarsened(shifted), ""


def _scalar_constant(model: ModelWrapper, name: str) -> float | None:
    value = get_constant(model, name)
    if value is None or np.size(value) != 1:
        return None
    return float(np.asarray(value).reshape(()))


def _not_per_tensor(model: ModelWrapper, node: NodeProto, names: tuple[str, ...]) -> str:
    """Why a quantizer's parameters (inputs 1.. named ``names``) give no per-tensor grid: which is computed, which
    varies along an axis (a per-channel activation scale, as MobileNet-v1's before each depthwise convolution)."""
    problems = []
    for name, tensor in zip(names, node.input[1:]):
        value = get_constant(model, tensor)
        if value is None:
            problems.append(f"a non-constant {name} '{tensor}'")
        elif np.size(value) != 1:
            problems.append(f"a {name} of shape {list(np.shape(value))} (per channel)")
    return (f"{node_label(node)} has {' and '.join(problems)}; a2q reads an input quantizer with one scale, zero point "
            "and bit width for the whole tensor (the accumulator sums codes of one step), or, as the direct input of "
            "a depthwise Conv, one scale per channel with zero points 0")


def axis_scale(model: ModelWrapper, node: NodeProto, shape: list[int] | None) -> np.ndarray | None:
    """A ``Quant``'s scale, or a ``DequantizeLinear``'s 1-D scale along its ``axis`` attribute (not block-wise),
    broadcast to the rank of the quantizer's output of ``shape``, where it varies along exactly one axis, over that
    axis' whole length, every value finite and nonzero; else None (one scale, or none this reader takes)."""
    scale = get_constant(model, node.input[1])
    if scale is None or shape is None or np.ndim(scale) > len(shape):
        return None
    if node.op_type == "DequantizeLinear":  # ONNX: a 1-D scale along the attribute axis
        axis = int(node_attr(node, "axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        if np.ndim(scale) != 1 or node_attr(node, "block_size", 0) or not 0 <= axis < len(shape):
            return None
        scale = np.reshape(scale, [np.size(scale) if a == axis else 1 for a in range(len(shape))])
    scale = np.asarray(scale, dtype=np.float64).reshape((1,) * (len(shape) - np.ndim(scale)) + np.shape(scale))
    axes = [axis for axis, size in enumerate(scale.shape) if size > 1]
    if len(axes) != 1 or scale.shape[axes[0]] != shape[axes[0]] or not np.all(np.isfinite(scale)) or np.any(scale == 0):
        return None
    return scale


def quant_code_range(bits: float, signed: bool, narrow: bool, rounding_mode: str) -> IntRange:
    """The integer codes a qonnx ``Quant`` outputs, for any bit width >= 1 (4.5 included).

    qonnx's ``int_quant`` clamps ``x / s + z`` to ``min_int``/``max_int`` of the bit width as given
    (``2^3.5`` for 4.5 bits), cast to float32, then rounds with the node's rounding mode: the
    codes are the rounded limits (CEIL turns 4.5 unsigned bits' 21.6 into 22, not 21).
    """
    # imported where used: qonnx's general custom-op package imports onnxruntime, which models
    # without a Quant node (QDQ, FINN graphs) need not pay for at start-up
    from qonnx.custom_op.general.intquant import max_int, min_int, resolve_rounding_mode

    width = np.float32(bits)
    rounding = resolve_rounding_mode(rounding_mode)
    lo = rounding(np.float32(min_int(signed, narrow, width)))
    hi = rounding(np.float32(max_int(signed, narrow, width)))
    return IntRange(int(lo), int(hi))


class GridResolver:
    """Walks back from a tensor to the quantizer that put it on an integer grid.

    ``input_dtypes`` maps tensor names (or ``"*"`` for every graph input) to a qonnx
    datatype name the user vouches for. ``zero_point`` chooses how an activation zero
    point z is seen by the MAC: ``fold`` (FINN folds it into a bias; codes ``[0, 2^N-1]``)
    or ``subtract`` (an integer kernel sees ``code - z``). ``input_ranges`` (one of
    :data:`INPUT_RANGES`) chooses between the quantizers' exact codes and FINN's DataType of them
    (:meth:`_finn_codes`).
    """

    def __init__(self, model: ModelWrapper, input_dtypes: dict[str, str] | None = None, zero_point: str = "fold",
                 input_ranges: str = "exact"):
        if zero_point not in ZERO_POINT_CONVENTIONS:
            raise ValueError(f"zero_point must be one of {ZERO_POINT_CONVENTIONS}, got {zero_point!r}")
        if input_ranges not in INPUT_RANGES:
            raise ValueError(f"input_ranges must be one of {INPUT_RANGES}, got {input_ranges!r}")
        self.model = model
        self.input_dtypes = dict(input_dtypes or {})
        self.zero_point = zero_point
        self.finn_ranges = input_ranges == "finn"
        self.graph_inputs = {t.name for t in model.graph.input}
        self._cache: dict[str, tuple[InputGrid | None, str]] = {}
        self._inferred: ModelWrapper | None = None
        self.constants: dict[str, bool] = {}  # computed_from_constants' answers on this graph

    def shape(self, tensor: str) -> list[int] | None:
        """The tensor's shape: declared, else from qonnx shape inference on a copy of the model (once)."""
        shape = self.model.get_tensor_shape(tensor)
        if shape is None:
            if self._inferred is None:
                self._inferred = with_inferred_shapes(self.model)
            shape = self._inferred.get_tensor_shape(tensor)
        return None if shape is None else [int(d) for d in shape]

    def resolve(self, tensor: str, per_channel_scale: bool = False) -> tuple[InputGrid | None, str]:
        """``(grid, "")`` or ``(None, reason)``.

        ``per_channel_scale``: the caller sums each output over one channel only (a depthwise convolution), so a
        grid with one scale per channel (:attr:`InputGrid.scale_axis`) is an integer accumulation for it; every
        other caller, the ops between a quantizer and a MAC included, gets such a grid refused.
        """
        if tensor not in self._cache:
            self._cache[tensor] = self._resolve(tensor)
        grid, reason = self._cache[tensor]
        if grid is not None and grid.scale_axis is not None and not per_channel_scale:
            return None, (f"'{tensor}' has one scale per index of axis {grid.scale_axis} (per-channel activation "
                          "scales); a2q reads such codes only as the input of a depthwise ONNX Conv, directly or through "
                          "MaxPool (NCHW; each output summing one channel, whose codes share one step)")
        return grid, reason

    def _resolve(self, tensor: str) -> tuple[InputGrid | None, str]:
        if tensor in self.input_dtypes:
            return dtype_grid(self.input_dtypes[tensor]), ""
        if tensor in self.graph_inputs and "*" in self.input_dtypes:
            return dtype_grid(self.input_dtypes["*"]), ""
        dt = self.model.get_tensor_datatype(tensor)
        annotated = dt.is_integer() and not dt.name.startswith("SCALED")
        producer = self.model.find_producer(tensor)
        # What the producer computes comes first: qonnx executes it whatever the tensor's DataType says (its
        # sanitizer rounds values, it never clamps them to the type), and annotations can disagree with it
        # (ConvertQONNXtoFINN writes INT8 on a MultiThreshold counting 0..255). The annotation is read only where
        # the producer's codes cannot be derived (a graph input, FINN's HW layers).
        if producer is None:
            grid, reason = None, f"graph input '{tensor}' is float (give its datatype with --input-dtype)"
        elif hasattr(self, f"_from_{producer.op_type}"):
            grid, reason = getattr(self, f"_from_{producer.op_type}")(producer)
        elif producer.op_type in GRID_PRESERVING_OPS:
            grid, reason = self.resolve(producer.input[0], per_channel_scale=producer.op_type in CHANNEL_KEEPING_OPS)
            if grid is not None and grid.scale_axis not in (None, 1):  # MaxPool takes values across spatial axes
                grid, reason = None, (f"'{producer.input[0]}' has one scale per index of axis {grid.scale_axis}, "
                                      f"which {node_label(producer)} mixes")
        else:
            grid, reason = None, f"input comes from {node_label(producer)}, which is not on an integer grid"
        if grid is not None and annotated and self.finn_ranges:
            # FINN sizes the MAC from the tensor's DataType; the codes that execute stay inside the union
            return _widened(grid, dtype_grid(dt.name).range, dt.name), ""
        if grid is not None or not annotated:
            return grid, reason
        if producer is not None and not self._annotation_is_read(producer):
            return None, f"{reason} (its {dt.name} annotation is not read: qonnx executes {node_label(producer)} as is)"
        return dtype_grid(dt.name, 1.0), ""

    def _annotation_is_read(self, producer: NodeProto) -> bool:
        """Whether the DataType annotation of ``producer``'s output is where its codes come from: an op that neither
        this reader nor ONNX defines (FINN's HW layers). Every other op's codes are what qonnx executes, whatever
        the annotation says."""
        return (not hasattr(self, f"_from_{producer.op_type}") and producer.op_type not in GRID_PRESERVING_OPS
                and producer.domain not in ("", "ai.onnx"))

    def _from_Quant(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        scale = _scalar_constant(self.model, node.input[1])
        zp = _scalar_constant(self.model, node.input[2])
        bits = _scalar_constant(self.model, node.input[3])
        scale_axis = None
        if scale is None and zp == 0 and bits is not None:
            scale, scale_axis = self._per_axis_scale(node)
        if scale is None or zp is None or bits is None:
            return None, _not_per_tensor(self.model, node, ("scale", "zero point", "bit width"))
        signed, narrow = bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0))
        if zp != round(zp):
            return None, f"{node_label(node)} has a non-integer zero point {zp}"
        if not np.isfinite(bits) or bits < 1:
            return None, f"{node_label(node)} has bit width {bits}; a quantizer needs a bit width >= 1"
        if bits == 1 and signed:  # qonnx executes it as bipolar: codes {-1, +1}, real (code - z) * s
            if scale_axis is not None:
                return InputGrid(BIPOLAR, "BIPOLAR", None, 0, True, scale_axis), ""
            return self._with_zero_point(BIPOLAR, "BIPOLAR", scale, int(zp)), ""
        try:
            codes = quant_code_range(bits, signed, narrow, node_str_attr(node, "rounding_mode", "ROUND"))
        except ValueError as err:
            return None, f"{node_label(node)}: {err}"
        dtype = quant_dtype(int(bits), signed) if bits == int(bits) else dtype_for_range(codes)
        if scale > 0 and non_negative(self.model, node.input[0]) and not (self.finn_ranges and zp):
            codes = at_or_above(codes, int(zp))  # (a zero point's thresholds under finn: for all codes, below)
        if self.finn_ranges:
            codes, dtype, reason = self._finn_codes(node, codes, bits, signed, int(zp))
            if codes is None:
                return None, reason
            if zp:  # lowered as thresholds with an output bias: FINN's MAC reads q - z, real 0 is code 0
                return InputGrid(codes, dtype, scale, 0), ""
        if scale_axis is not None:  # zero point 0: the codes of every channel, each on its own step
            return InputGrid(codes, dtype, None, 0, False, scale_axis), ""
        return self._with_zero_point(codes, dtype, scale, int(zp)), ""

    def _per_axis_scale(self, node: NodeProto) -> tuple[float | None, int | None]:
        """(sign, axis) of a quantizer scale that varies along one axis of its output only (:func:`axis_scale`), all
        of one sign; else (None, None). The sign decides which codes reals >= 0 take."""
        scale = axis_scale(self.model, node, self.shape(node.output[0]))
        if scale is None or not (np.all(scale > 0) or np.all(scale < 0)):
            return None, None
        return float(np.sign(scale.flat[0])), int(np.flatnonzero(np.array(scale.shape) > 1)[0])

    def _finn_codes(self, node: NodeProto, codes: IntRange, bits: float, signed: bool,
                    zero: int = 0) -> tuple[IntRange | None, str, str]:
        """The codes FINN's MAC is sized for: ``codes`` joined with the DataType ConvertQONNXtoFINN gives them.

        FINN (qonnx ``Quant.get_integer_datatype``) annotates ``INT{b}``/``UINT{b}`` for an integer bit
        width b, whatever ``narrow`` says: narrow codes grow by the one code FINN's type adds. A signed
        ``Quant`` of a ``Relu`` output is ``UINT{b-1}`` there: FINN converts it only after the rewrite
        into that form (:class:`~a2q_passes.finn_quant_forms.UnsignedQuantAfterRelu`), which ``lower`` and
        the FINN build steps run first. A fractional bit width is truncated there to a type narrower than
        the codes: refused. With a zero point ``zero``, all values of the DataType of ``q - z``: ``lower`` makes
        the quantizer into thresholds with an output bias (:mod:`a2q_passes.finn_zero_points`).
        """
        if bits != int(bits):
            return None, "", (f"{node_label(node)} has bit width {bits}: FINN's conversion annotates its output "
                              f"{quant_dtype(int(bits), signed)}, narrower than its codes [{codes.lo}, {codes.hi}]; "
                              "re-export with an integer bit width, or use --input-ranges exact")
        if zero:
            return *_finn_type_less_zero_point(codes, zero), ""
        unsigned_bits = unsigned_bits_after_relu(self.model, node)
        dtype = quant_dtype(int(bits), signed) if unsigned_bits is None else quant_dtype(unsigned_bits, False)
        return _hull(codes, dtype_grid(dtype).range), dtype, ""

    _from_IntQuant = _from_Quant

    def _with_zero_point(self, codes: IntRange, dtype: str, scale: float, zp: int) -> InputGrid:
        pair = dtype == "BIPOLAR"
        if self.zero_point == "subtract":
            return InputGrid(codes.shifted(zp), dtype, scale, 0, pair)
        return InputGrid(codes, dtype, scale, zp, pair)

    def _from_BipolarQuant(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return InputGrid(BIPOLAR, "BIPOLAR", _scalar_constant(self.model, node.input[1]), 0, True), ""

    def _from_DequantizeLinear(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        scale = _scalar_constant(self.model, node.input[1])
        has_zp = len(node.input) > 2 and bool(node.input[2])
        zp_value = get_constant(self.model, node.input[2]) if has_zp else None
        scale_axis = None
        if scale is None and (not has_zp or (zp_value is not None and np.all(zp_value == 0))):
            scale, scale_axis = self._per_axis_scale(node)  # Brevitas' QCDQ per-channel activations, zero points 0
            zp_value = None
        if scale is None:
            return None, _not_per_tensor(self.model, node, ("scale", "zero point"))
        if has_zp and scale_axis is None and (zp_value is None or np.size(zp_value) != 1):
            return None, f"{node_label(node)} has a per-channel or non-constant activation zero point"
        storage = storage_dtype(self.model, node)
        if storage is None:
            return None, (f"{node_label(node)} has no zero point and the type of '{node.input[0]}' is unknown; "
                          "run shape inference or give the zero point explicitly")
        try:
            codes, dtype = storage_code_range(storage)
            clips = skip_clips(self.model, node.input[0])[1]
            if clips:  # QCDQ: a Clip narrows the container (uint8 clipped to [0, 3] is a 2-bit activation)
                codes = clipped_range(self.model, codes, clips)
                dtype = dtype_for_range(codes)
                if self.finn_ranges:
                    dtype = _qcdq_finn_dtype(codes, storage, node)
                    codes = _hull(codes, dtype_grid(dtype).range)
        except UnsupportedLayer as err:
            return None, str(err)
        if not self.finn_ranges:
            codes = self._quantized_non_negative(node, codes)
        if scale_axis is not None:  # zero point 0: the codes of every channel, each on its own step
            return InputGrid(codes, dtype, None, 0, False, scale_axis), ""
        zp = int(np.asarray(zp_value).reshape(-1)[0]) if zp_value is not None else 0
        if self.finn_ranges and zp:  # lowered as thresholds with an output bias, as a Quant's (see _finn_codes)
            return InputGrid(*_finn_type_less_zero_point(codes, zp), scale, 0), ""
        return self._with_zero_point(codes, dtype, scale, zp), ""

    def _quantized_non_negative(self, dq: NodeProto, codes: IntRange) -> IntRange:
        """``codes``, without those below the QuantizeLinear's zero point where it quantizes reals >= 0 with a
        positive scale (``round(x / s) + z >= z``; saturation and a Clip are monotone and keep that bound)."""
        quantize = self.model.find_producer(skip_clips(self.model, dq.input[0])[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or not non_negative(self.model, quantize.input[0]):
            return codes
        scale = get_constant(self.model, quantize.input[1])
        has_zp = len(quantize.input) > 2 and bool(quantize.input[2])
        zp = get_constant(self.model, quantize.input[2]) if has_zp else np.zeros(1)
        # one zero point (a per-channel QuantizeLinear's may repeat it per channel)
        if scale is None or zp is None or np.ptp(np.asarray(zp)) != 0 or not np.all(np.asarray(scale) > 0):
            return codes
        return at_or_above(codes, int(np.asarray(zp).reshape(-1)[0]))

    def integer_operand(self, node: NodeProto, second: bool = False) -> tuple[InputGrid | None, str]:
        """The codes an integer MAC op (QLinearConv, MatMulInteger, ...) reads at input 0, zero point at input 2;
        ``second``: at its second operand (a QLinearMatMul/MatMulInteger of two activations).

        They span the integer tensor's storage type. A zero point computed at run time
        (``DynamicQuantizeLinear``: any z in 0..255, real 0 always a code) leaves the raw codes
        ``[0, 255]`` (fold) but moves ``code - z`` anywhere in ``[-255, 255]`` (subtract; at one run the
        box is ``[-z, 255 - z]``, so that range is sound but up to one bit wider than any single run).
        """
        operands = INTEGER_MAC_OPS[node.op_type]
        data, zp_index = (operands.weight, operands.weight_zero_point) if second else (0, operands.data_zero_point)
        if operands.quantizes_data and not second:
            return self._dynamic_codes(IntRange(0, 255)), ""  # uint8, as DynamicQuantizeLinear
        storage = storage_dtype(self.model, node, data, zp_index)
        if storage is None:
            return None, (f"{node_label(node)}: the type of its integer input '{node.input[data]}' is unknown; "
                          "give its zero point or run shape inference")
        try:
            codes, dtype = storage_code_range(storage)
        except UnsupportedLayer as err:
            return None, str(err)
        zp_name = node.input[zp_index] if len(node.input) > zp_index else ""
        # the QLinear ops carry each operand's scale right after it
        scale = _scalar_constant(self.model, node.input[data + 1]) if operands.weight == 3 else None
        if not zp_name:
            return self._with_zero_point(codes, dtype, scale, 0), ""
        zp = get_constant(self.model, zp_name)
        if zp is None:
            producer = self.model.find_producer(zp_name)
            if producer is None or producer.op_type != "DynamicQuantizeLinear":
                return None, f"{node_label(node)} has a non-constant input zero point '{zp_name}' not computed by DynamicQuantizeLinear"
            return self._dynamic_codes(codes), ""
        if np.size(zp) != 1:
            return None, f"{node_label(node)} has a per-channel input zero point"
        return self._with_zero_point(codes, dtype, scale, int(np.asarray(zp).reshape(-1)[0])), ""

    def _dynamic_codes(self, codes: IntRange) -> InputGrid:
        """Codes whose zero point z is computed at each run (any code): the raw codes (fold), or ``code - z``
        anywhere in ``[lo - hi, hi - lo]`` (subtract)."""
        if self.zero_point == "subtract":
            span = IntRange(codes.lo - codes.hi, codes.hi - codes.lo)
            return InputGrid(span, dtype_for_range(span), None, 0)
        return InputGrid(codes, dtype_for_range(codes), None, codes.lo)  # the padding code z lies among the codes

    def _from_MultiThreshold(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx: ``out_scale * k + out_bias`` with ``k`` in ``0..T`` (the count of thresholds passed)."""
        thresholds = get_constant(self.model, node.input[1])
        if thresholds is None:
            return None, f"{node_label(node)} has non-constant thresholds"
        out_scale = float(node_attr(node, "out_scale", 1.0))
        out_bias = float(node_attr(node, "out_bias", 0.0))
        if out_scale == 0 or not np.isfinite(out_scale) or not np.isfinite(out_bias):
            return None, f"{node_label(node)} has out_scale {out_scale}, out_bias {out_bias}"
        steps = int(thresholds.shape[-1])
        counts = IntRange(0, steps)
        grid = InputGrid(counts, dtype_for_range(counts), out_scale, 0, steps <= 1)
        grid, reason = _offset_grid(grid, out_bias, node_label(node))
        if grid is None:
            return None, reason
        dtype = _grid_dtype(grid.range, grid.two_point, node_str_attr(node, "out_dtype", "") or None)
        return InputGrid(grid.range, dtype, grid.scale, grid.zero_code, grid.two_point), ""

    def _from_Add(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._offset(node, subtract=False)

    def _from_Sub(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._offset(node, subtract=True)

    def _offset(self, node: NodeProto, subtract: bool) -> tuple[InputGrid | None, str]:
        """Adding a per-tensor constant: the codes shift when it is a whole number of (possibly finer) steps."""
        for data, const in ((0, 1),) if subtract else ((0, 1), (1, 0)):
            offset = _scalar_constant(self.model, node.input[const])
            if offset is not None and get_constant(self.model, node.input[data]) is None:
                grid, reason = self.resolve(node.input[data])
                if grid is None:
                    return None, reason
                if not np.isfinite(offset):
                    return None, f"{node_label(node)} adds {offset}"
                return _offset_grid(grid, -offset if subtract else offset, node_label(node))
        return None, f"input comes from {node_label(node)}, which does not add a per-tensor constant to one input"

    def _from_Trunc(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx Trunc v2 (opset >= 2, 6 inputs) clamps to the output bit width's codes, then rounds."""
        opset = self.model.get_opset_imports().get(node.domain, 1)
        if opset < 2 or len(node.input) != 6:
            return None, (f"{node_label(node)} runs as qonnx Trunc v{1 if opset < 2 else 2} with {len(node.input)} inputs; "
                          "only Trunc v2 (6 inputs, clamped to its output bit width) has input-independent codes")
        values = [_scalar_constant(self.model, name) for name in node.input[1:]]
        if any(v is None for v in values):
            return None, _not_per_tensor(self.model, node, ("scale", "zero point", "input bit width", "output scale",
                                                            "output bit width"))
        scale, zp, _, out_scale, out_bits = values
        if scale == 0 or out_scale == 0 or not np.isfinite(out_bits) or out_bits < 1 or out_bits != round(out_bits):
            return None, f"{node_label(node)} has scale {scale}, output scale {out_scale}, output bit width {out_bits}"
        trunc_scale = 2.0 ** round(float(np.log2(out_scale / scale)))
        zero = zp / trunc_scale
        if zero != round(zero):
            return None, f"{node_label(node)} has an output zero point {zero}, not an integer code"
        signed, narrow = bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0))
        try:
            codes = quant_code_range(out_bits, signed, narrow, node_str_attr(node, "rounding_mode", "FLOOR"))
        except ValueError as err:
            return None, f"{node_label(node)}: {err}"
        dtype = dtype_for_range(codes)
        if self.finn_ranges:
            codes, dtype, _ = self._finn_codes(node, codes, out_bits, signed)  # out_bits is an integer (checked)
        return self._with_zero_point(codes, dtype, out_scale, int(zero)), ""

    def _from_Relu(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        grid, reason = self.resolve(node.input[0])
        if grid is None:
            return None, reason
        # real (code - z) * scale >= 0 keeps the codes on z's side given by the scale's sign; Relu maps
        # every other code to z (scale None: integer codes vouched for by the user, i.e. scale 1)
        r, z = grid.range, grid.zero_code
        if grid.scale is None or grid.scale > 0:
            codes = IntRange(max(r.lo, z), max(r.hi, z))
        elif grid.scale < 0:
            codes = IntRange(min(r.lo, z), min(r.hi, z))
        else:
            return None, f"{node_label(node)} follows a quantizer with scale 0"
        producer = self.model.find_producer(node.input[0])
        folded = relu_fold_bits(self.model, producer) if self.finn_ranges and producer is not None else None
        if folded is not None and folded == int(folded):  # FINN reads the unsigned Quant the Relu folds into
            dtype = quant_dtype(int(folded), False)
            return InputGrid(_hull(codes, dtype_grid(dtype).range), dtype, grid.scale, z), ""
        return InputGrid(codes, grid.dtype, grid.scale, z), ""

    def _from_Pad(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        grid, reason = self.resolve(node.input[0])
        if grid is None:
            return None, reason
        if node_str_attr(node, "mode", "constant") != "constant":
            return grid, ""  # edge / reflect / wrap repeat input values
        # the pad value: input 2 from opset 11, attribute ``value`` before
        value = _scalar_constant(self.model, node.input[2]) if len(node.input) > 2 and node.input[2] else \
            float(node_attr(node, "value", 0.0))
        if value != 0.0:
            return None, f"{node_label(node)} pads with value {value}; only zero padding keeps the grid"
        return with_zero_tap(grid), ""

    def _from_Im2Col(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx's Im2Col (FINN's lowered convolutions) only moves values, padding with ``pad_value`` (real 0)."""
        value = float(node_attr(node, "pad_value", 0))
        if value != 0.0:
            return None, f"{node_label(node)} pads with {value}; only zero padding keeps the grid"
        grid, reason = self.resolve(node.input[0])
        if grid is None:
            return None, reason
        return (with_zero_tap(grid) if any(node_attr(node, "pad_amount", [0])) else grid), ""

    def _from_Resize(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        if node_str_attr(node, "mode", "nearest") != "nearest":
            return None, f"{node_label(node)} interpolates (mode={node_str_attr(node, 'mode', '')}); only nearest keeps the grid"
        grid, reason = self.resolve(node.input[0])
        if grid is None or node_str_attr(node, "coordinate_transformation_mode", "") != "tf_crop_and_resize":
            return grid, reason
        # a crop box reaching outside the input samples extrapolation_value there, as padding does
        value = float(node_attr(node, "extrapolation_value", 0.0))
        if value != 0.0:
            return None, (f"{node_label(node)} crops with extrapolation_value {value} outside its input; only 0 "
                          "keeps the grid")
        return with_zero_tap(grid), ""

    _from_Upsample = _from_Resize

    def _from_Mul(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._scaled(node, invert=False)

    def _from_ElementwiseMul(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """FINN's HW layer for ``Mul`` (convert_to_hw): the same scaling."""
        return self._from_Mul(node)

    def _from_Div(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._scaled(node, invert=True)

    def _scaled(self, node: NodeProto, invert: bool) -> tuple[InputGrid | None, str]:
        """Multiplying by a nonzero per-tensor constant keeps the codes and changes the scale (a negative factor its
        sign: qonnx's ExtractQuantScaleZeroPt moves a negative activation scale into such a Mul)."""
        for data, const in ((0, 1), (1, 0)) if not invert else ((0, 1),):
            factor = _scalar_constant(self.model, node.input[const])
            if factor and np.isfinite(factor) and get_constant(self.model, node.input[data]) is None:
                grid, reason = self.resolve(node.input[data])
                if grid is None:
                    return None, reason
                # scale None (integer codes vouched for: scale 1) keeps None only where its sign stays positive
                base = 1.0 if grid.scale is None and factor < 0 else grid.scale
                scale = None if base is None else (base / factor if invert else base * factor)
                return InputGrid(grid.range, grid.dtype, scale, grid.zero_code, grid.two_point), ""
        return None, f"input comes from {node_label(node)}, which is not a per-tensor rescaling by a nonzero constant"

    def _from_Concat(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        grids = []
        for name in node.input:
            grid, reason = self.resolve(name)
            if grid is None:
                return None, reason
            grids.append(grid)
        first = grids[0]
        for g in grids[1:]:
            same_scale = (g.scale is None and first.scale is None) or (
                g.scale is not None and first.scale is not None and np.isclose(g.scale, first.scale, rtol=1e-6))
            if not same_scale or g.zero_code != first.zero_code:
                return None, f"{node_label(node)} joins inputs on different integer grids (scales or zero points differ)"
        r = IntRange(min(g.range.lo for g in grids), max(g.range.hi for g in grids))
        dtype = first.dtype if all(g.dtype == first.dtype for g in grids) else dtype_for_range(r)
        return InputGrid(r, dtype, first.scale, first.zero_code), ""


def value_origin(model: ModelWrapper, tensor: str) -> str:
    """The tensor whose values ``tensor`` carries past ops that only move or select them
    (:data:`GRID_PRESERVING_OPS`): the output of another node, a graph input or a constant."""
    producer = model.find_producer(tensor)
    while producer is not None and producer.op_type in GRID_PRESERVING_OPS:
        tensor = producer.input[0]
        producer = model.find_producer(tensor)
    return tensor


def value_source(model: ModelWrapper, tensor: str) -> NodeProto | None:
    """The node that makes :func:`value_origin` of ``tensor``; None where it is a graph input or a constant."""
    return model.find_producer(value_origin(model, tensor))


def non_negative(model: ModelWrapper, tensor: str) -> bool:
    """Whether every value of ``tensor`` is >= 0 by construction: the output of a Relu or of a Clip whose lower
    bound is a constant >= 0 (ReLU6 exports as ``Clip(0, 6)``), passed on only by ops that move or select values
    (:data:`GRID_PRESERVING_OPS`)."""
    producer = value_source(model, tensor)
    if producer is None or producer.op_type not in ("Relu", "Clip"):
        return False
    if producer.op_type == "Relu":
        return True
    low = clip_bounds(model, producer)[0]
    return low is not None and np.size(low) == 1 and float(np.asarray(low).reshape(-1)[0]) >= 0


def at_or_above(codes: IntRange, zero: int) -> IntRange:
    """The codes a monotone quantizer gives reals >= 0: those from the code of real 0 (``zero``, clamped into
    ``codes``) up."""
    return IntRange(min(max(codes.lo, zero), codes.hi), codes.hi)


def _finn_type_less_zero_point(codes: IntRange, zero: int) -> tuple[IntRange, str]:
    """The range and name of the DataType FINN's MAC reads ``q - z`` in, for codes ``q`` in ``codes``."""
    dtype = codes_less_zero_point(codes, zero)[1]
    return dtype_grid(dtype).range, dtype


def _hull(a: IntRange, b: IntRange) -> IntRange:
    return IntRange(min(a.lo, b.lo), max(a.hi, b.hi))


def _widened(grid: InputGrid, codes: IntRange, dtype: str) -> InputGrid:
    """``grid`` with its codes joined with ``codes`` (a DataType's range, named ``dtype``)."""
    joined = _hull(grid.range, codes)
    if joined == grid.range:
        return grid
    return replace(grid, range=joined, dtype=dtype, two_point=False)


def _qcdq_finn_dtype(codes: IntRange, storage: np.dtype, node: NodeProto) -> str:
    """The DataType FINN gives a QCDQ activation after qonnx's ``QCDQToQuant`` (FINN reads no QDQ).

    ``QCDQToQuant`` makes a Quant of ``ceil(log2(hi - lo + 1))`` bits, signed as the container,
    from a Clip ``[lo, hi]`` with ``lo <= 0 < hi`` (it refuses any other Clip).
    """
    if not codes.lo <= 0 < codes.hi:
        raise UnsupportedLayer(f"the Clip in front of {node_label(node)} keeps codes [{codes.lo}, {codes.hi}]; "
                               "qonnx's QCDQToQuant (the way to FINN) needs lo <= 0 < hi: use --input-ranges exact")
    bits = (codes.hi - codes.lo).bit_length()  # ceil(log2(n)) for n = hi - lo + 1 >= 2, in integers
    return quant_dtype(bits, storage_code_range(storage)[0].lo < 0)


def with_zero_tap(grid: InputGrid) -> InputGrid:
    """The grid with the code of real 0 added to its range: a padded tap holds ``zero_code``.

    Under ``fold`` that is the zero point z (real 0 = code z), under ``subtract`` 0; either may lie
    outside the quantizer's codes (e.g. UINT4 with z = 30, or codes behind a Relu).
    """
    r = IntRange(min(grid.range.lo, grid.zero_code), max(grid.range.hi, grid.zero_code))
    return replace(grid, range=r, two_point=False)


