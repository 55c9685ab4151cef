"""Which integer codes a MAC input holds, derived from the semantics of the ops that produce it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Mapping

import numpy as np
from onnx import NodeProto, TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from a2q_passes.certificate.execution import CannotCertify, as_integers, execute_constants, node_attr, node_label, \
    uniform_value
from a2q_passes.certificate.shapes import inferred_shapes
from a2q_passes.tensor_store import initializer_proto

# Ops whose every output value is one of their (first) input's values.
_SELECTING_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "MaxPoolNHWC",
                  "DepthToSpace", "SpaceToDepth", "Slice", "Gather", "Split", "Shuffle", "DuplicateStreams")
# ONNX integer storage types of QuantizeLinear/DequantizeLinear and the codes they hold.
STORAGE_RANGES = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-(1 << 15), (1 << 15) - 1),
    TensorProto.UINT16: (0, (1 << 16) - 1), TensorProto.INT32: (-(1 << 31), (1 << 31) - 1),
    TensorProto.UINT32: (0, (1 << 32) - 1), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
    TensorProto.INT2: (-2, 1), TensorProto.UINT2: (0, 3),
}


@dataclass(frozen=True)
class Grid:
    """Codes ``[lo, hi]`` of a tensor whose real value is ``(code - zero) * scale``."""

    lo: int
    hi: int
    zero: int
    scale: float
    pair: bool = False  # only the two codes lo and hi occur (BIPOLAR and what constants make of it)
    # the scale varies along this axis of the tensor (``scale`` is then its sign): only a MAC that sums each output
    # over one index of that axis, a depthwise Conv over channels, accumulates such codes
    scale_axis: int | None = None


def dtype_grid(name: str, where: str) -> Grid:
    try:
        dt = DataType[name]
    except KeyError as err:
        raise CannotCertify(f"{where}: unknown DataType '{name}'") from err
    if not dt.is_integer() or dt.name.startswith("SCALED"):
        raise CannotCertify(f"{where}: DataType {dt.name} is not an integer type")
    return Grid(int(dt.min()), int(dt.max()), 0, 1.0, dt.name == "BIPOLAR")


def _plus_constant(g: Grid, offset: float, where: str) -> Grid:
    """``real + offset`` on a grid: ``offset / scale`` as a fraction n/d (d <= 256) of steps.

    The step becomes ``scale / d`` and each code ``c`` becomes ``d * c + n``; the zero code scales with
    the step. A pair ``{lo, lo + k}`` whose zero code is a multiple of k steps from lo is then
    re-expressed as ``{m, m + 1}`` with step ``k * scale``.
    """
    steps = offset / g.scale
    if not np.isfinite(steps):
        raise CannotCertify(f"{where} adds {offset}")
    frac = Fraction(steps).limit_denominator(256)
    n, d = frac.numerator, frac.denominator
    if abs(steps * d - n) > 4e-7 * max(1.0, abs(n)):
        raise CannotCertify(f"{where} adds {offset}, which is no whole number of 1/256 steps of its input grid "
                            f"(step {g.scale})")
    out = Grid(d * g.lo + n, d * g.hi + n, d * g.zero, g.scale / d, g.pair)
    span = out.hi - out.lo
    if out.pair and span > 1:
        q, r = divmod(out.lo - out.zero, span)
        if r == 0:
            out = Grid(out.zero + q, out.zero + q + 1, out.zero, out.scale * span, True)
    return out


class InputCodes:
    """Derives the code grid of a MAC input from the semantics of the ops that produce it."""

    def __init__(self, model: ModelWrapper, input_dtypes: Mapping[str, str] | None, zero_point: str = "fold",
                 input_ranges: str = "exact") -> None:
        if input_ranges not in ("exact", "finn"):
            raise CannotCertify(f"unknown input ranges {input_ranges!r}")
        self.model = model
        self.input_dtypes = dict(input_dtypes or {})
        self.zero_point = zero_point
        self.finn = input_ranges == "finn"
        self.graph_inputs = {vi.name for vi in model.graph.input}
        self.cache: dict[str, Grid] = {}

    def grid(self, tensor: str, per_channel_scale: bool = False) -> Grid:
        """``per_channel_scale``: the caller sums each output over one channel (a depthwise Conv); every other caller,
        the ops between a quantizer and a MAC included, is refused a grid whose scale varies along an axis."""
        if tensor not in self.cache:
            self.cache[tensor] = self._grid(tensor)
        grid = self.cache[tensor]
        if grid.scale_axis is not None and not per_channel_scale:
            raise CannotCertify(f"'{tensor}' has one scale per index of axis {grid.scale_axis}: certified only as the "
                                "input of a depthwise Conv, directly or through MaxPool")
        return grid

    def _grid(self, tensor: str) -> Grid:
        if tensor in self.input_dtypes:
            return dtype_grid(self.input_dtypes[tensor], f"--input-dtype for '{tensor}'")
        if tensor in self.graph_inputs and "*" in self.input_dtypes:
            return dtype_grid(self.input_dtypes["*"], "--input-dtype")
        producer = self.model.find_producer(tensor)
        handler = getattr(self, f"_{producer.op_type}", None) if producer is not None else None
        if producer is not None and producer.op_type in _SELECTING_OPS:
            handler = self._selecting
        dt = self.model.get_tensor_datatype(tensor)
        annotated = dt.is_integer() and not dt.name.startswith("SCALED")
        if handler is not None:
            grid = handler(producer)
            return self._finn_view(grid, producer, dt if annotated else None) if self.finn else grid
        # an annotation states the codes only of what qonnx does not execute by ONNX's or our definition: a graph
        # input, an op of FINN's (its HW layers); qonnx executes every other op as is, whatever the annotation
        if annotated and (producer is None or producer.domain not in ("", "ai.onnx")):
            return dtype_grid(dt.name, f"tensor '{tensor}'")
        where = f"{node_label(producer)}" if producer is not None else "a float graph input"
        raise CannotCertify(f"input '{tensor}' comes from {where}, whose codes the certificate cannot derive")

    def _constant(self, name: str, what: str) -> float:
        return uniform_value(execute_constants(self.model, [name])[name], what)

    def _finn_view(self, grid: Grid, producer: NodeProto, annotation: DataType | None) -> Grid:
        """``grid`` joined with the DataType FINN gives the tensor (see the module docstring)."""
        if annotation is None and grid.zero != 0 and producer.op_type in ("Quant", "IntQuant", "DequantizeLinear"):
            return self._finn_less_zero_point(grid, producer)
        dt = annotation if annotation is not None else self._finn_datatype(producer)
        if dt is None:
            return grid
        if producer.op_type in ("Quant", "IntQuant") and not dt.min() <= grid.lo <= grid.hi <= dt.max():
            raise CannotCertify(f"FINN annotates the output of {node_label(producer)} {dt.name}, which does not hold its "
                                f"codes [{grid.lo}, {grid.hi}]")
        lo, hi = min(grid.lo, int(dt.min())), max(grid.hi, int(dt.max()))
        return replace(grid, lo=lo, hi=hi, pair=grid.pair and (lo, hi) == (grid.lo, grid.hi))

    def _finn_less_zero_point(self, grid: Grid, node: NodeProto) -> Grid:
        """A quantizer with a zero point z as ``a2q lower`` gives it to FINN: thresholds with output bias
        ``qmin - z``, so the MAC reads ``q - z`` (zero point 0) in the DataType FINN's streamlining gives such codes
        (its ``AbsorbScalarBiasIntoMultiThreshold`` rule), over all the quantizer's codes: qonnx's clamp of a
        ``Quant`` (narrow ones included), a ``DequantizeLinear``'s storage type through its ``Clip`` nodes."""
        if node.op_type == "DequantizeLinear":
            storage = self._storage_type(node)
            lo, hi = self._through_clips(node, storage, *STORAGE_RANGES[storage])
        else:
            from qonnx.custom_op.general.intquant import max_int, min_int

            bits = self._constant(node.input[3], f"the bit width of {node_label(node)}")
            signed, narrow = bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0))
            lo, hi = int(min_int(signed, narrow, bits)), int(max_int(signed, narrow, bits))
        lo, hi = lo - grid.zero, hi - grid.zero
        finn_type = DataType.get_smallest_possible(hi) if lo >= 0 else DataType.get_smallest_possible(min(lo, -(hi + 1)))
        return Grid(int(finn_type.min()), int(finn_type.max()), 0, grid.scale)

    def _finn_datatype(self, node: NodeProto) -> DataType | None:
        """What FINN's conversion annotates a quantizer's output with (``None``: the codes themselves)."""
        if node.op_type in ("Quant", "IntQuant"):
            bits = execute_constants(self.model, [node.input[3]])[node.input[3]]
            if self._made_unsigned_for_finn(node, bits):  # FINN converts the unsigned Quant of one bit less
                # (2 bits, behind a Clip at the scale, where that is 1: FINN lowers 1 bit as bipolar)
                bits, node = np.maximum(bits - 1, 2), copy.deepcopy(node)
                getCustomOp(node).set_nodeattr("signed", 0)

            class _Initializers:  # get_integer_datatype reads only the bit width initializer
                def get_initializer(self, name: str) -> np.ndarray | None:
                    return bits if name == node.input[3] else None

            return getCustomOp(node).get_integer_datatype(_Initializers())
        if node.op_type == "DequantizeLinear" and self._codes_before_clips(node) != node.input[0]:
            from qonnx.transformation.qcdq_to_qonnx import extract_elem_type

            storage = self._storage_type(node)
            lo, hi = self._through_clips(node, storage, *STORAGE_RANGES[storage])
            try:
                bits, signed, _ = extract_elem_type(storage, (np.array(lo), np.array(hi)))
            except (AssertionError, ValueError) as err:
                raise CannotCertify(f"qonnx's QCDQToQuant cannot convert the Clip [{lo}, {hi}] in front of "
                                    f"{node_label(node)}") from err
            return DataType[("INT" if signed else "UINT") + str(bits)] if bits > 1 else \
                DataType["BIPOLAR" if signed else "BINARY"]
        if node.op_type == "Trunc":  # a 6-input v2 Trunc (checked by _Trunc): FINN's type of its output bits
            bits = int(self._constant(node.input[5], f"the output bit width of {node_label(node)}"))
            return DataType[("INT" if node_attr(node, "signed", 1) else "UINT") + str(bits)]
        return None

    def _holds_non_negative(self, tensor: str) -> bool:
        """Whether ``tensor`` holds reals >= 0: a Relu's output, or a Clip's whose executed lower bound is >= 0,
        passed on only by value-selecting ops."""
        producer = self.model.find_producer(tensor)
        while producer is not None and producer.op_type in _SELECTING_OPS:
            producer = self.model.find_producer(producer.input[0])
        if producer is None or producer.op_type not in ("Relu", "Clip"):
            return False
        if producer.op_type == "Relu":
            return True
        if len(producer.input) < 2 or not producer.input[1]:
            low = node_attr(producer, "min")  # opset < 11: the bound is an attribute
            return low is not None and float(low) >= 0
        try:
            low = execute_constants(self.model, [producer.input[1]])[producer.input[1]]
        except CannotCertify:  # a bound computed at run time: nothing known
            return False
        return np.size(low) == 1 and float(np.asarray(low).reshape(-1)[0]) >= 0

    def _made_unsigned_for_finn(self, node: NodeProto, bits: np.ndarray) -> bool:
        """Whether the rewrite that ``lower`` and the FINN build steps run before FINN's conversion
        (``finn_quant_forms.UnsignedQuantAfterRelu``; FINN refuses the signed form) makes ``node`` an unsigned
        Quant of one bit less (of 2 bits where that is 1): a signed ``Quant`` right after a ``Relu``, zero point 0,
        positive scales (one, for 2 bits) and an integer bit width of at least 2."""
        producer = self.model.find_producer(node.input[0])
        if node.op_type != "Quant" or producer is None or producer.op_type != "Relu":
            return False
        if not node_attr(node, "signed", 1):
            return False
        scale, zero = (execute_constants(self.model, [name])[name] for name in node.input[1:3])
        b = float(np.asarray(bits).reshape(-1)[0]) if np.size(bits) == 1 else 0.0
        # a 2-bit one needs one scale for its Clip
        return bool(np.all(scale > 0) and np.all(zero == 0) and b == int(b) and b >= 2 and (b > 2 or np.size(scale) == 1))

    def _probe(self, node: NodeProto, scale: float | np.ndarray, zero: float, version: int | None = None) -> Grid:
        """Execute a qonnx quantizer on its lowest and highest possible input, -inf (0 where it holds only reals >= 0) and +inf: it
        is monotone, and its clamp yields the extreme codes."""
        params = execute_constants(self.model, [n for n in node.input[1:] if n])
        x, y = f"{node.input[0]}__certificate_probe", f"{node.output[0]}__certificate_probe"
        probe_node = helper.make_node(node.op_type, [x, *node.input[1:]], [y], domain=node.domain)
        probe_node.attribute.extend(node.attribute)
        ndim = max((np.ndim(v) for v in params.values()), default=0)
        lowest = 0.0 if self._holds_non_negative(node.input[0]) else -np.inf
        context = {**params, x: np.array([lowest, np.inf], dtype=np.float32).reshape(2, *[1] * ndim), y: None}
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                getCustomOp(probe_node, version).execute_node(context, self.model.graph)
        except Exception as err:  # qonnx's kernel decides which parameters are valid
            raise CannotCertify(f"executing {node_label(node)} on -inf/+inf failed ({type(err).__name__}: {err})") from err
        out = np.asarray(context[y], dtype=np.float64)
        codes = as_integers(out / scale + zero, f"the extreme outputs of {node_label(node)} (scale {scale}, zero point {zero})")
        if np.ndim(scale):  # one scale per index of one axis, all of one sign (_axis_scale)
            return Grid(int(codes.min()), int(codes.max()), int(zero), float(np.sign(scale).flat[0]),
                        scale_axis=int(np.flatnonzero(np.array(np.shape(scale)) > 1)[0]))
        return Grid(int(codes.min()), int(codes.max()), int(zero), scale)

    def _axis_scale(self, node: NodeProto) -> np.ndarray:
        """A Quant's scale, or a DequantizeLinear's 1-D scale along its ``axis``, that varies along one axis of the
        output, all nonzero and finite, of one sign, with zero points 0: the scale, shaped to the output's rank
        (else CannotCertify)."""
        scale = np.asarray(execute_constants(self.model, [node.input[1]])[node.input[1]], dtype=np.float64)
        has_zero = len(node.input) > 2 and bool(node.input[2])
        zero = execute_constants(self.model, [node.input[2]])[node.input[2]] if has_zero else 0
        # the output has its input's rank (a Quant scale of higher rank would broadcast it: refused below)
        shape = self.model.get_tensor_shape(node.input[0]) or self.model.get_tensor_shape(node.output[0]) or \
            inferred_shapes(self.model).get_tensor_shape(node.output[0])
        rank = scale.ndim if shape is None else len(shape)
        if node.op_type == "DequantizeLinear":
            axis = int(node_attr(node, "axis", 1))
            axis = axis + rank if axis < 0 else axis
            if scale.ndim != 1 or node_attr(node, "block_size", 0) or not 0 <= axis < rank:
                raise CannotCertify(f"the scale of {node_label(node)} is neither one value nor one per index of its "
                                    "axis")
            scale = scale.reshape([scale.size if a == axis else 1 for a in range(rank)])
        varying = [axis for axis, size in enumerate(scale.shape) if size > 1]
        if (np.any(np.asarray(zero) != 0) or scale.ndim > rank or len(varying) != 1 or not np.all(np.isfinite(scale))
                or not (np.all(scale > 0) or np.all(scale < 0))):
            raise CannotCertify(f"the scale of {node_label(node)} is neither one per-tensor value nor one nonzero value "
                                "of one sign per index of one axis with a zero point 0")
        return scale.reshape((1,) * (rank - scale.ndim) + scale.shape)

    def _Quant(self, node: NodeProto) -> Grid:
        try:
            scale = self._constant(node.input[1], f"the scale of {node_label(node)}")
        except CannotCertify:
            scale = self._axis_scale(node)
        zero = self._constant(node.input[2], f"the zero point of {node_label(node)}")
        if np.any(scale == 0) or zero != round(zero):
            raise CannotCertify(f"{node_label(node)} has scale {scale} and zero point {zero}")
        grid = self._probe(node, scale, zero)
        bits = self._constant(node.input[3], f"the bit width of {node_label(node)}")
        # qonnx runs a signed 1-bit Quant as bipolar: only its two extreme codes occur
        return replace(grid, pair=bits == 1 and bool(node_attr(node, "signed", 1)) and grid.hi - grid.lo == 2)

    _IntQuant = _Quant

    def _BipolarQuant(self, node: NodeProto) -> Grid:
        scale = self._constant(node.input[1], f"the scale of {node_label(node)}")
        if scale == 0:
            raise CannotCertify(f"{node_label(node)} has scale 0")
        return replace(self._probe(node, scale, 0.0), pair=True)

    def _DequantizeLinear(self, node: NodeProto) -> Grid:
        scale_axis = None
        try:
            scale = self._constant(node.input[1], f"the scale of {node_label(node)}")
            zero = self._constant(node.input[2], f"the zero point of {node_label(node)}") if len(node.input) > 2 and node.input[2] else 0.0
        except CannotCertify:
            axis_scale = self._axis_scale(node)  # one scale per channel (Brevitas' QCDQ), zero points 0
            scale, zero = float(np.sign(axis_scale).flat[0]), 0.0
            scale_axis = int(np.flatnonzero(np.array(axis_scale.shape) > 1)[0])
        storage = self._storage_type(node)
        if storage not in STORAGE_RANGES or scale == 0:
            raise CannotCertify(f"{node_label(node)} dequantizes storage type {TensorProto.DataType.Name(storage)} "
                                f"with scale {scale}")
        lo, hi = STORAGE_RANGES[storage]
        lo, hi = self._through_clips(node, storage, lo, hi)
        lo, hi = self._quantized_non_negative(node, lo, hi)
        return Grid(lo, hi, int(zero), scale, scale_axis=scale_axis)

    def _quantized_non_negative(self, dq: NodeProto, lo: int, hi: int) -> tuple[int, int]:
        """``[lo, hi]`` cut to the codes the graph's own QuantizeLinear (and Clips) give reals >= 0, where it
        quantizes only such reals (:meth:`_holds_non_negative`): executed on 0 and on a real past its saturation
        (it is monotone)."""
        start = self._codes_before_clips(dq)
        quantize = self.model.find_producer(start)
        if quantize is None or quantize.op_type != "QuantizeLinear" or not self._holds_non_negative(quantize.input[0]):
            return lo, hi
        # 0 and a real past saturation, along the first axis; a per-axis quantizer takes them at every index of its
        # axis (another than the first), so the probe spans that axis
        shape = [2]
        scale = execute_constants(self.model, [quantize.input[1]])[quantize.input[1]]
        if np.size(scale) > 1:
            rank = len(self.model.get_tensor_shape(quantize.input[0]) or
                       inferred_shapes(self.model).get_tensor_shape(quantize.input[0]) or [])
            axis = int(node_attr(quantize, "axis", 1))
            if np.ndim(scale) != 1 or not -rank <= axis < rank or axis % rank == 0:
                return lo, hi  # the codes stay as read
            shape = [2] + [np.size(scale) if a == axis % rank else 1 for a in range(1, rank)]
        probe = np.array([0.0, 1e30], dtype=np.float32).reshape([2] + [1] * (len(shape) - 1)) * np.ones(shape, np.float32)
        try:
            out = execute_constants(self.model, [dq.input[0]], {quantize.input[0]: probe})[dq.input[0]]
        except Exception:  # a quantizer the probe cannot run: the codes stay as read
            return lo, hi
        codes = as_integers(np.asarray(out, dtype=np.float64), f"the codes {node_label(dq)} dequantizes")
        return max(lo, int(codes.min())), min(hi, int(codes.max()))

    def _codes_before_clips(self, dq: NodeProto) -> str:
        """The tensor entering the ``Clip`` chain (Brevitas QCDQ) in front of DequantizeLinear's input."""
        name = dq.input[0]
        producer = self.model.find_producer(name)
        while producer is not None and producer.op_type == "Clip":
            name = producer.input[0]
            producer = self.model.find_producer(name)
        return name

    def _through_clips(self, dq: NodeProto, storage: int, lo: int, hi: int) -> tuple[int, int]:
        """Execute the graph's own Clip chain on the storage type's extreme codes (clamping is monotone)."""
        start = self._codes_before_clips(dq)
        if start == dq.input[0]:
            return lo, hi
        extremes = np.array([lo, hi]).astype(helper.tensor_dtype_to_np_dtype(storage))
        out = execute_constants(self.model, [dq.input[0]], {start: extremes})[dq.input[0]]
        codes = as_integers(np.asarray(out, dtype=np.float64), f"the Clip output in front of {node_label(dq)}")
        return int(codes.min()), int(codes.max())

    def _storage_type(self, dq: NodeProto) -> int:
        """ONNX: the codes' type is the zero point's, else that of DequantizeLinear's input (a Clip keeps it)."""
        if len(dq.input) > 2 and dq.input[2]:
            return helper.np_dtype_to_tensor_dtype(execute_constants(self.model, [dq.input[2]])[dq.input[2]].dtype)
        codes = self._codes_before_clips(dq)
        quantize = self.model.find_producer(codes)
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            if len(quantize.input) > 2 and quantize.input[2]:
                zp = execute_constants(self.model, [quantize.input[2]])[quantize.input[2]]
                return helper.np_dtype_to_tensor_dtype(zp.dtype)
            return int(node_attr(quantize, "output_dtype", 0)) or TensorProto.UINT8
        init = initializer_proto(self.model, codes)
        if init is not None:
            return init.data_type
        vi = self.model.get_tensor_valueinfo(codes)
        if vi is None:
            raise CannotCertify(f"the type of the codes {node_label(dq)} dequantizes is unknown")
        return vi.type.tensor_type.elem_type

    def _MultiThreshold(self, node: NodeProto) -> Grid:
        thresholds = execute_constants(self.model, [node.input[1]])[node.input[1]]
        out_scale, out_bias = float(node_attr(node, "out_scale", 1.0)), float(node_attr(node, "out_bias", 0.0))
        if not out_scale or not np.isfinite(out_scale):
            raise CannotCertify(f"{node_label(node)} has out_scale {out_scale}")
        # qonnx outputs out_scale * k + out_bias, k the count of the T thresholds passed (0..T)
        count = int(np.shape(thresholds)[-1])
        return _plus_constant(Grid(0, count, 0, out_scale, count <= 1), out_bias, node_label(node))

    def _Add(self, node: NodeProto) -> Grid:
        return self._shift(node, negate=False)

    def _Sub(self, node: NodeProto) -> Grid:
        return self._shift(node, negate=True)

    def _shift(self, node: NodeProto, negate: bool) -> Grid:
        """A scalar constant added to (or subtracted from) the one non-constant input."""
        candidates = ((0, 1),) if negate else ((0, 1), (1, 0))
        for data, const in candidates:
            try:
                value = self._constant(node.input[const], f"the constant of {node_label(node)}")
            except CannotCertify:
                continue
            if initializer_proto(self.model, node.input[data]) is not None:
                continue
            return _plus_constant(self.grid(node.input[data]), -value if negate else value, node_label(node))
        raise CannotCertify(f"{node_label(node)} does not add one scalar constant to one tensor")

    def _Trunc(self, node: NodeProto) -> Grid:
        """Executed as qonnx does: the version is the model's opset of the node's domain (default 1)."""
        version = self.model.get_opset_imports().get(node.domain, 1)
        if version < 2 or len(node.input) != 6:
            raise CannotCertify(f"{node_label(node)} executes as Trunc v{min(version, 2)} with {len(node.input)} inputs; "
                                "only v2 with 6 inputs clamps its output codes")
        scale = self._constant(node.input[1], f"the scale of {node_label(node)}")
        zero_in = self._constant(node.input[2], f"the zero point of {node_label(node)}")
        out_scale = self._constant(node.input[4], f"the output scale of {node_label(node)}")
        if not scale or not out_scale:
            raise CannotCertify(f"{node_label(node)} has a zero scale")
        zero = zero_in / np.exp2(np.rint(np.log2(out_scale / scale)))
        if zero != np.rint(zero):
            raise CannotCertify(f"{node_label(node)}: its output zero point {zero} is not an integer code")
        return self._probe(node, out_scale, float(zero), version=2)

    def _Relu(self, node: NodeProto) -> Grid:
        g = self.grid(node.input[0])
        if g.scale > 0:  # real >= 0 <=> code >= zero; negative reals become the zero code
            return Grid(max(g.lo, g.zero), max(g.hi, g.zero), g.zero, g.scale)
        return Grid(min(g.lo, g.zero), min(g.hi, g.zero), g.zero, g.scale)

    def _selecting(self, node: NodeProto) -> Grid:
        # a max over a window of one channel, or a copy, keeps each channel's codes on that channel's scale
        grid = self.grid(node.input[0], per_channel_scale=node.op_type in ("MaxPool", "Identity"))
        if grid.scale_axis not in (None, 1):
            raise CannotCertify(f"'{node.input[0]}' has one scale per index of axis {grid.scale_axis}, which "
                                f"{node_label(node)} mixes")
        return grid

    def _Resize(self, node: NodeProto) -> Grid:
        if node_attr(node, "mode", "nearest") != "nearest":
            raise CannotCertify(f"{node_label(node)} interpolates (mode {node_attr(node, 'mode')})")
        g = self.grid(node.input[0])
        if node_attr(node, "coordinate_transformation_mode", "") != "tf_crop_and_resize":
            return g
        # samples outside the input take extrapolation_value
        return self._with_value(g, float(node_attr(node, "extrapolation_value", 0.0)), node)

    _Upsample = _Resize

    def _Pad(self, node: NodeProto) -> Grid:
        g = self.grid(node.input[0])
        if node_attr(node, "mode", "constant") != "constant":
            return g  # edge / reflect / wrap repeat input values
        if len(node.input) > 2 and node.input[2]:
            value = self._constant(node.input[2], f"the pad value of {node_label(node)}")
        else:
            value = float(node_attr(node, "value", 0.0))
        return self._with_value(g, value, node)

    def _Im2Col(self, node: NodeProto) -> Grid:
        """qonnx's Im2Col: the input's values, plus ``pad_value`` where ``pad_amount`` pads."""
        g = self.grid(node.input[0])
        if not any(node_attr(node, "pad_amount", [0])):
            return g
        return self._with_value(g, float(node_attr(node, "pad_value", 0)), node)

    @staticmethod
    def _with_value(g: Grid, value: float, node: NodeProto) -> Grid:
        """``g`` plus the code of real ``value``, which ``node`` writes where it reads no input (padding)."""
        code = int(as_integers(np.array(value / g.scale + g.zero), f"the fill value {value} of {node_label(node)} on its grid"))
        return Grid(min(g.lo, code), max(g.hi, code), g.zero, g.scale)

    def _Mul(self, node: NodeProto) -> Grid:
        return self._rescale(node, divide=False)

    def _ElementwiseMul(self, node: NodeProto) -> Grid:  # FINN's HW layer for Mul
        return self._rescale(node, divide=False)

    def _Div(self, node: NodeProto) -> Grid:
        return self._rescale(node, divide=True)

    def _rescale(self, node: NodeProto, divide: bool) -> Grid:
        """A nonzero scalar constant factor keeps the codes and changes the step."""
        for data, factor in ((0, 1),) if divide else ((0, 1), (1, 0)):
            try:
                value = self._constant(node.input[factor], f"the factor of {node_label(node)}")
            except CannotCertify:
                continue
            if value != 0:
                g = self.grid(node.input[data])
                return replace(g, scale=g.scale / value if divide else g.scale * value)
        raise CannotCertify(f"{node_label(node)} is not a multiplication by a nonzero scalar constant")

    def _Concat(self, node: NodeProto) -> Grid:
        grids = [self.grid(name) for name in node.input]
        first = grids[0]
        if any(not np.isclose(g.scale, first.scale, rtol=1e-6, atol=0) for g in grids):
            raise CannotCertify(f"{node_label(node)} joins inputs with different scales")
        if all(g.zero == first.zero for g in grids):
            return Grid(min(g.lo for g in grids), max(g.hi for g in grids), first.zero, first.scale)
        if self.zero_point != "subtract":  # raw codes of different zero points mean different reals
            raise CannotCertify(f"{node_label(node)} joins inputs with different zero points (under fold)")
        # a subtracting MAC sees real / scale: on that grid the inputs agree, with zero point 0
        return Grid(min(g.lo - g.zero for g in grids), max(g.hi - g.zero for g in grids), 0, first.scale)


def mac_codes(grid: Grid, zero_point: str) -> tuple[int, int, int]:
    """``(lo, hi, padding code)`` the integer MAC sees: raw codes (fold) or codes minus the zero point."""
    if zero_point == "subtract":
        return grid.lo - grid.zero, grid.hi - grid.zero, 0
    return grid.lo, grid.hi, grid.zero
