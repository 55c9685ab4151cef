"""An independent certificate for every "no overflow at P" promise.

The passes size accumulators from :mod:`a2q_passes.layers` and the modules it reads with (the *reader*:
:mod:`a2q_passes.weight_sources` and :mod:`a2q_passes.input_grids` recognise weight
quantizers and input grids and re-implement their arithmetic). A pass that checks its own output
with the same reader inherits the reader's bugs, so writer and check are wrong together. This
module derives each layer's exact accumulator range a second way and shares no code with the
reader (only the pure integer math of :mod:`a2q_passes.bounds`):

* **Weights** are what the graph computes: the constant subgraph that feeds the MAC node's weight
  input (``Quant``/``IntQuant``/``BipolarQuant``/``Trunc``, ``QuantizeLinear`` ->
  ``DequantizeLinear``, ``Transpose``/``Reshape``/..., ``Clip``) is extracted and executed with
  qonnx's ``execute_onnx``; the result divided by the quantizer's executed scale (sent through the
  same layout ops) must be integers. FINN integer initializers carry their values directly and
  must hold what their ``DataType`` annotation allows. A ``DequantizeLinear`` weight zero point is
  added back under ``fold`` (the MAC multiplies raw codes). The integer ops of onnxruntime's
  QOperator/dynamic formats (``QLinearConv``, ``ConvInteger``, ...) read an integer initializer and
  a weight zero point directly: the certificate executes that constant subgraph and subtracts the
  zero point along the output channels as the ONNX op definitions state (``subtract``).
* **Input codes** follow the ONNX/qonnx semantics of the activation quantizer: a ``Quant`` family
  node is executed by qonnx on ``-inf``/``+inf`` (its clamp gives the extreme codes, whatever its
  bit width or signedness); ``DequantizeLinear`` codes span its storage type, sent through the
  graph's own ``Clip`` nodes when Brevitas' QCDQ export narrows the container with them; ``MultiThreshold``
  counts ``0..T`` thresholds; an integer op's input spans the storage type of its zero point (ONNX
  binds both to one type) or, for a zero point computed at run time, the type ONNX type inference
  gives, shifted by every value that zero point's type allows under ``subtract``; FINN ``DataType``
  annotations and user-given input types are taken as declared. With ``input_ranges="finn"`` each
  activation's codes are joined with the DataType FINN gives it, taken from FINN's own tools: the
  tensor's annotation in a FINN graph, qonnx's ``Quant.get_integer_datatype`` (what
  ``ConvertQONNXtoFINN`` annotates) and, for QCDQ, qonnx's ``QCDQToQuant`` bit width rule
  (``extract_elem_type``). Between quantizer and MAC only ops with a known effect on real values are
  crossed (value-selecting ops, ``Relu`` with either scale sign, ``Pad``, scalar ``Mul``/``Div``,
  ``Concat`` of equal grids). Anything else: :class:`CannotCertify`.
* **Activation x activation MatMuls** (no constant second operand: it reads a graph input) take
  both operands' codes as above, K from shape inference on a copy, and the range
  ``K * [min, max corner product]`` (:func:`a2q_passes.bounds.act_x_act_range`).
* **Ranges** are exact per output channel, including ``Conv`` padding taps that hold the zero-point
  code (fold convention) when that code lies outside the input codes: every distinct pattern of
  padded taps over the output positions is evaluated.

:func:`certify_claims` compares the certificate with what a pass claims (the fast path's range and
the promised width) and raises :class:`~a2q_passes.errors.PostconditionError` (exit 4, nothing
written) when the fast path is narrower or the layer cannot be certified.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Mapping

import numpy as np
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper, shape_inference
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes import bounds, progress
from a2q_passes.errors import PostconditionError
from a2q_passes.model_io import (CHANNELS_LAST_DOMAIN, ReadOnlyModel, initializer_proto, initializer_value,
                                 is_streamed, tensor_value, with_inferred_shapes)

_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
_WEIGHT_QUANTIZERS = ("Quant", "IntQuant", "BipolarQuant", "Trunc", "DequantizeLinear")
# Ops the certificate executes on constants (nothing else may feed a weight quantizer).
_CONSTANT_OPS = (*_LAYOUT_OPS, *_WEIGHT_QUANTIZERS, "QuantizeLinear", "Clip", "Constant", "Cast")
# Ops whose every output value is one of their (first) input's values.
_SELECTING_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "MaxPoolNHWC",
                  "DepthToSpace", "SpaceToDepth", "Slice", "Gather", "Split", "Shuffle", "DuplicateStreams")
_MVAU = ("MVAU", "MVAU_hls", "MVAU_rtl", "MatrixVectorActivation")
_VVAU = ("VVAU", "VVAU_hls", "VVAU_rtl", "VectorVectorActivation")
# ONNX integer storage types of QuantizeLinear/DequantizeLinear and the codes they hold.
_STORAGE_RANGES = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-(1 << 15), (1 << 15) - 1),
    TensorProto.UINT16: (0, (1 << 16) - 1), TensorProto.INT32: (-(1 << 31), (1 << 31) - 1),
    TensorProto.UINT32: (0, (1 << 32) - 1), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
}
# |value / scale - q| allowed: float32 q * s / s lands within a few ulps (2^-24 |q| each) of q
_INTEGER_TOLERANCE, _RELATIVE_TOLERANCE = 1e-3, 2.0 ** -16
_INT64_SAFE = 1 << 62
# tensors from this many values up are checked by the compiled kernel: below it, importing numba (and compiling
# once, cached on disk) takes longer than the numpy check
_KERNEL_VALUES = 1 << 22
# Ops that multiply integer tensors themselves: (float op they compute like, weight input, weight zero point input);
# input 0 is the data, its zero point at input 2 but where _DATA_ZERO_POINT / _QUANTIZES_DATA say otherwise.
_INTEGER_MACS = {"QLinearConv": ("Conv", 3, 5), "ConvInteger": ("Conv", 1, 3), "QLinearMatMul": ("MatMul", 3, 5),
                 "MatMulInteger": ("MatMul", 1, 3), "QGemm": ("Gemm", 3, 5),
                 "DynamicQuantizeMatMul": ("MatMul", 1, 3), "MatMulIntegerToFloat": ("MatMul", 1, 5)}
# com.microsoft MatMulIntegerToFloat keeps its data's zero point at input 4 (input 2 elsewhere); DynamicQuantizeMatMul
# quantizes its float data itself, as DynamicQuantizeLinear does: uint8 codes, a zero point per run
_DATA_ZERO_POINT = {"MatMulIntegerToFloat": 4}
_QUANTIZES_DATA = ("DynamicQuantizeMatMul",)
# the others are standard ONNX ops; com.microsoft QLinearConv is the channels-last form onnxruntime's optimizer writes
_INTEGER_MAC_DOMAINS = {"QGemm": ("com.microsoft",), "QLinearConv": ("", "ai.onnx", "com.microsoft"),
                        "DynamicQuantizeMatMul": ("com.microsoft",), "MatMulIntegerToFloat": ("com.microsoft",)}
# domains of the ops onnxruntime executes itself (the certificate's fallback for constant subgraphs qonnx cannot run)
_ONNXRUNTIME_DOMAINS = ("", "ai.onnx", "com.microsoft")


class CannotCertify(Exception):
    """The certificate cannot derive this layer's integer view from graph semantics alone."""


@dataclass(frozen=True)
class Claim:
    """What a pass asserts about one layer: the fast path's range and (optionally) the promised width.

    With ``tile`` (a multi-stage datapath of K-tiles of that many terms) ``tile_min``/``tile_max`` is the fast
    path's range of every partial sum within a tile and ``tile_bits`` the width promised for it; ``acc_bits``
    then covers the outer stage (every running sum of tile results and the final sum).
    """

    acc_min: int | None
    acc_max: int | None
    acc_bits: int | None = None
    tile: int | None = None
    tile_min: int | None = None
    tile_max: int | None = None
    tile_bits: int | None = None


@dataclass(frozen=True)
class LayerCertificate:
    """Exact accumulator range of one MAC layer, derived independently of the reader."""

    node: str
    input_codes: tuple[int, int]  # codes the MAC multiplies, in the chosen zero-point convention
    pad_code: int | None  # code a Conv padding tap holds, when padding can widen the range
    channel_min: tuple[int, ...]
    channel_max: tuple[int, ...]
    operand_codes: tuple[int, int] | None = None  # act x act MatMul: the codes of the second operand
    tile: int | None = None  # multi-stage datapath: terms per inner accumulator
    tile_range: tuple[int, int] | None = None  # every partial sum within a tile
    running_range: tuple[int, int] | None = None  # every running sum of tile results

    @property
    def acc_min(self) -> int:
        return min(self.channel_min)

    @property
    def acc_max(self) -> int:
        return max(self.channel_max)


@dataclass(frozen=True)
class _Grid:
    """Codes ``[lo, hi]`` of a tensor whose real value is ``(code - zero) * scale``."""

    lo: int
    hi: int
    zero: int
    scale: float
    pair: bool = False  # only the two codes lo and hi occur (BIPOLAR and what constants make of it)


# --------------------------------------------------------------------------- execution


def _label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _attr(node: NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _execute_constants(model: ModelWrapper, targets: list[str], overrides: Mapping[str, np.ndarray] | None = None,
                       clip_as_identity: bool = False) -> dict[str, np.ndarray]:
    """Values of ``targets``, computed by executing their constant subgraph with qonnx.

    ``overrides`` replace tensors (their producers are not executed); ``clip_as_identity`` passes
    values through ``Clip`` nodes unchanged (used to carry a scale through the weight path).
    """
    overrides = dict(overrides or {})
    initializers = _initializer_table(model)
    chosen: dict[str, NodeProto] = {}
    used: set[str] = set()
    stack, seen = list(targets), set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in overrides or name in initializers:
            used.add(name)
            continue
        node = model.find_producer(name)
        if node is None:
            raise CannotCertify(f"'{name}' is not a constant (a graph input)")
        if node.op_type not in _CONSTANT_OPS:
            raise CannotCertify(f"'{name}' is computed by {_label(node)}, which the certificate does not execute")
        chosen[node.output[0]] = node
        stack.extend(node.input)

    def stored(name: str) -> np.ndarray:
        return overrides[name] if name in overrides else tensor_value(initializers[name])

    if not chosen:
        return {name: stored(name) for name in targets}
    nodes = []
    for node in _in_execution_order(model, chosen, targets):
        if clip_as_identity and node.op_type == "Clip":
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        nodes.append(node)
    # a streamed tensor enters as a graph input fed its memory-mapped values: inlined, it would be copied into the
    # proto, through shape inference's serialisation and back out of the proto before anything executes
    feeds = {name: tensor_value(initializers[name]) for name in sorted(used)
             if name not in overrides and _fed(initializers[name])}
    inits = [_inline(initializers[name]) for name in sorted(used) if name not in overrides and name not in feeds]
    inits += [numpy_helper.from_array(np.asarray(value), name) for name, value in overrides.items() if name in used]
    inputs = [helper.make_tensor_value_info(name, initializers[name].data_type, value.shape)
              for name, value in feeds.items()]
    graph = helper.make_graph(nodes, "certificate_constants", inputs, [], inits)
    sub = ModelWrapper(qonnx_make_model(graph, opset_imports=list(model.model.opset_import)))
    sub = sub.transform(InferShapes())
    try:
        context = execute_onnx(sub, feeds, return_full_exec_context=True)
    except Exception as err:  # the graph's own kernels decide what is valid; say which subgraph failed
        if not all(n.domain in _ONNXRUNTIME_DOMAINS for n in nodes):
            raise CannotCertify(f"executing the constant subgraph of {targets} failed ({type(err).__name__}: {err})") from err
        # qonnx runs node by node and hands tensors to onnxruntime as numpy arrays, which fails for
        # int4/uint4 (ml_dtypes), and it needs every shape inferred, which ONNX cannot for onnxruntime's contrib
        # QuantizeLinear/DequantizeLinear; onnxruntime runs the whole subgraph, its own ops included
        context = _execute_with_onnxruntime(sub, targets, f"{type(err).__name__}: {err}", feeds)
    # a target that is itself constant is not in the execution context of the nodes computing the others
    return {name: np.asarray(context[name]) if name in chosen else stored(name) for name in targets}


def _initializer_table(model: ModelWrapper) -> Mapping[str, TensorProto]:
    """The graph's initializers by name: a read-only model's table, built once (collecting them per call is
    quadratic in depth), else collected here."""
    if isinstance(model, ReadOnlyModel):
        return model.initializers
    return {init.name: init for init in model.graph.initializer}


def _in_execution_order(model: ModelWrapper, chosen: Mapping[str, NodeProto], targets: list[str]) -> list[NodeProto]:
    """The ``chosen`` nodes (by first output) with every producer before its consumers: a depth-first walk from
    ``targets``, not a scan of the whole graph per call (quadratic in depth)."""
    order: list[NodeProto] = []
    placed: set[str] = set()
    stack = [(name, False) for name in reversed(targets)]
    while stack:
        name, inputs_placed = stack.pop()
        producer = model.find_producer(name) if name else None
        if producer is None or producer.output[0] not in chosen or producer.output[0] in placed:
            continue
        if inputs_placed:
            placed.add(producer.output[0])
            order.append(producer)
            continue
        stack.append((name, True))
        stack.extend((n, False) for n in reversed(producer.input))
    return order


def _fed(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is streamed and of a type numpy holds natively (int4/uint4 and the like go inline: their
    ml_dtypes arrays cannot be fed to onnxruntime)."""
    return is_streamed(tensor) and tensor.data_type not in (TensorProto.INT4, TensorProto.UINT4) and \
        helper.tensor_dtype_to_np_dtype(tensor.data_type).kind in "biuf"


def _inline(tensor: TensorProto) -> TensorProto:
    """``tensor`` with its data in the proto: qonnx and onnxruntime execute a subgraph of inline tensors only."""
    return numpy_helper.from_array(tensor_value(tensor), tensor.name) if is_streamed(tensor) else tensor


def _execute_with_onnxruntime(sub: ModelWrapper, targets: list[str], first_error: str,
                              feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``targets`` from one onnxruntime session on the constant subgraph ``sub`` (standard ONNX and
    onnxruntime's com.microsoft ops), whose graph inputs take ``feeds``."""
    import onnxruntime as ort

    initializers = {init.name: numpy_helper.to_array(init) for init in sub.graph.initializer}
    initializers.update(feeds)
    computed = [t for t in dict.fromkeys(targets) if t not in initializers]
    proto = ModelWrapper(sub.model.SerializeToString())
    for name in computed:  # onnxruntime types an output whose type ONNX's shape inference could not give
        proto.graph.output.append(sub.get_tensor_valueinfo(name) or ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(proto.model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = dict(zip(computed, session.run(computed, dict(feeds))))
    except Exception as err:
        raise CannotCertify(f"executing the constant subgraph of {targets} failed ({first_error}; onnxruntime: "
                            f"{type(err).__name__}: {err})") from err
    return {**initializers, **values}


def _as_integers(values: np.ndarray, what: str, block: int = 1 << 16, divisor: np.ndarray | None = None) -> np.ndarray:
    """``values`` (divided by ``divisor``, broadcast to their shape) as integers, each within the tolerance of one.

    Checked a block of leading-axis slices at a time: the float64 quotient of a large weight tensor is never
    held whole, only the int64 result (each element's quotient is the same float64 division either way);
    blocks of about 2^16 values keep the half-dozen passes over each in cache. A tensor of at least
    ``_KERNEL_VALUES`` values is checked by the compiled kernel of :mod:`a2q_passes.certificate_kernels` (the
    same float64 operations in one pass), whose result has the narrowest integer type holding it (an int8
    layer's integers take 1 byte each, not 8); where it finds a problem, the blocks below name it.
    """
    values = np.asarray(values)
    shape = values.shape
    if values.ndim and values.size and values.size >= _KERNEL_VALUES and values.flags.c_contiguous:
        from a2q_passes.certificate_kernels import integer_quotients

        fast = integer_quotients(values, divisor, _INTEGER_TOLERANCE, _RELATIVE_TOLERANCE)
        if fast is not None:  # else the check below names what is wrong
            return fast
    values = values.reshape(1, -1) if values.ndim == 0 else values
    divisor = None if divisor is None else np.broadcast_to(np.asarray(divisor), shape).reshape(values.shape)
    out = np.empty(values.shape, dtype=np.int64)
    step = max(1, block // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, values.shape[0], step):
        chunk = values[start:start + step].astype(np.float64)
        if divisor is not None:
            chunk /= divisor[start:start + step]
        rounded = np.rint(chunk)
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, refused below
            off = np.abs(np.subtract(chunk, rounded, out=chunk), out=chunk)
        # within the absolute tolerance is within the allowance (the relative part is >= 0): the per-element
        # allowance is computed only when some element needs it; NaN and infinities (offset NaN, never <= anything)
        # fail both comparisons, and rint keeps them, so the rounded values tell which complaint applies
        if not np.all(off <= _INTEGER_TOLERANCE) and not np.all(
                off <= np.abs(rounded) * _RELATIVE_TOLERANCE + _INTEGER_TOLERANCE):
            if not np.all(np.isfinite(rounded)):
                raise CannotCertify(f"{what} holds NaN or infinite values")
            raise CannotCertify(f"{what} is not integer (off by up to {float(off.max()):.3g})")
        out[start:start + step] = rounded
    return out.reshape(shape)


def _uniform(value: np.ndarray, what: str) -> float:
    """The single value of a per-tensor parameter (all elements equal)."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size == 0 or not np.all(flat == flat[0]):
        raise CannotCertify(f"{what} is not one per-tensor value")
    if not np.isfinite(flat[0]):
        raise CannotCertify(f"{what} is not finite")
    return float(flat[0])


# --------------------------------------------------------------------------- weights


def _scale_input(node: NodeProto) -> str:
    """The input holding the step of a quantizer's output grid."""
    if node.op_type == "Trunc" and len(node.input) >= 6:
        return node.input[4]  # Trunc v2: output_scale
    return node.input[1]


def _block_size(quantizer: NodeProto) -> int:
    """ONNX opset 21: a ``DequantizeLinear`` with ``block_size`` > 0 scales blocks of that many elements along ``axis``."""
    return int(_attr(quantizer, "block_size", 0) or 0) if quantizer.op_type == "DequantizeLinear" else 0


def _scale_in_rank(quantizer: NodeProto, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The quantizer's scale (or zero point) with the rank of its output ``shape`` and broadcastable to it.

    Keeps the parameter's own size (a per-channel scale stays a vector with unit dims elsewhere) except for a
    block-wise one, whose entry per element along ``axis`` is picked out here.
    """
    scale = np.asarray(scale, dtype=np.float64)
    block = _block_size(quantizer)
    if block:  # element i along axis takes entry i // block_size (the ONNX definition of blocked quantization)
        axis = int(_attr(quantizer, "axis", 1)) % len(shape)
        if scale.ndim != len(shape) or scale.shape[axis] * block < shape[axis]:
            raise CannotCertify(f"the block-wise scale of {_label(quantizer)} does not cover its output {shape}")
        scale = scale[tuple(np.arange(shape[axis]) // block if d == axis else slice(None) for d in range(len(shape)))]
    elif quantizer.op_type == "DequantizeLinear" and scale.ndim == 1 and scale.size > 1:
        axis = int(_attr(quantizer, "axis", 1)) % len(shape)
        scale = scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    if scale.ndim < len(shape):  # numpy broadcasting aligns trailing dims: the same values, with the output's rank
        scale = scale.reshape((1,) * (len(shape) - scale.ndim) + scale.shape)
    if scale.ndim > len(shape) or any(n not in (1, d) for n, d in zip(scale.shape, shape)):
        raise CannotCertify(f"the scale of {_label(quantizer)} does not broadcast to its output {shape}")
    return scale


def _annotated_integers(model: ModelWrapper, source: str, values: np.ndarray) -> np.ndarray:
    """A FINN integer initializer: its values, which must be what its DataType annotation allows."""
    dt = model.get_tensor_datatype(source)
    if not dt.is_integer() or dt.name.startswith("SCALED"):
        raise CannotCertify(f"weights '{source}' have no quantizer and no integer DataType annotation")
    q = _as_integers(values, f"initializer '{source}' (annotated {dt.name})")
    allowed = {-1, 1} if dt.name == "BIPOLAR" else None
    bad = ~np.isin(q, list(allowed)) if allowed else (q < dt.min()) | (q > dt.max())
    if bad.any():
        raise CannotCertify(f"initializer '{source}' is annotated {dt.name} but holds {int(q[bad].reshape(-1)[0])}")
    return q


def weight_integers(model: ModelWrapper, tensor: str, zero_point: str = "fold") -> np.ndarray:
    """Integer weights as the MAC node consumes them, from executing the graph's own weight path.

    A ``DequantizeLinear`` computes ``(code - z) * scale``: divided by the scale that is ``code - z``,
    what a subtracting MAC multiplies; under ``fold`` the MAC multiplies the raw codes, so ``z`` (sent
    through the same layout ops) is added back.
    """
    return _weight_view(model, tensor, zero_point)[0]


def _weight_view(model: ModelWrapper, tensor: str, zero_point: str) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`weight_integers` and, for a block-wise ``DequantizeLinear``, each weight's block number in the same
    layout (the block index along its axis, sent through the graph's own layout ops), else ``None``."""
    t = tensor
    producer = model.find_producer(t)
    path = []  # the layout ops (and Clips) from the quantizer's output to the MAC input
    while producer is not None and producer.op_type in (*_LAYOUT_OPS, "Clip"):
        path.append(producer.op_type)
        t = producer.input[0]
        producer = model.find_producer(t)
    if producer is None or producer.op_type == "Constant":
        return _annotated_integers(model, t, _execute_constants(model, [tensor])[tensor]), None
    if producer.op_type not in _WEIGHT_QUANTIZERS:
        raise CannotCertify(f"weights come from {_label(producer)}, which is not a weight quantizer")
    scale_name = _scale_input(producer)
    values = _execute_constants(model, [tensor, producer.output[0], scale_name])
    out_shape = values[producer.output[0]].shape
    if producer.output[0] != tensor:  # only its shape is used: a large layer's weights are then held once, not twice
        del values[producer.output[0]]
    grid_step = _scale_in_rank(producer, values[scale_name], out_shape)
    if not np.all(np.isfinite(grid_step)) or np.any(grid_step == 0):
        raise CannotCertify(f"{_label(producer)} has a zero or non-finite scale")
    # Transpose permutes axes and Identity (and a Clip, passed as one) keeps values: both act on a tensor of the
    # output's rank that broadcasts to it as on the broadcast tensor, so a scale travels in its own shape
    # (a per-channel vector, not one value per weight); Reshape-like ops need every element
    own_shape = all(op in ("Transpose", "Identity", "Clip") for op in path)

    def carried(param: np.ndarray) -> np.ndarray:
        """``param`` (the output's rank, broadcastable to it) through the same layout ops: broadcastable to ``tensor``."""
        if t == tensor:
            return param
        sent = param if own_shape else np.broadcast_to(param, out_shape)
        # float32, what the executed ops take: exact for the float32 scales and the integers (< 2^24) sent here
        return _execute_constants(model, [tensor], {producer.output[0]: sent.astype(np.float32)},
                                  clip_as_identity=True)[tensor]

    q = _as_integers(values[tensor], f"the executed weights of {_label(producer)} divided by its scale",
                     divisor=carried(grid_step))
    has_zero = producer.op_type in ("DequantizeLinear", "Quant", "IntQuant") and len(producer.input) > 2 and producer.input[2]
    if zero_point == "fold" and has_zero:
        z = _execute_constants(model, [producer.input[2]])[producer.input[2]]
        # the zero point's integers in its own shape, added to every weight it covers
        q = _plus_widened(q, _as_integers(carried(_scale_in_rank(producer, z, out_shape)),
                                          f"the weight zero point of {_label(producer)}"))
    block = _block_size(producer)
    if not block:
        return q, None
    # each weight's scale entry, numbered in the scale tensor's own order (ONNX: index i along axis uses i // block)
    scale_shape = np.shape(values[scale_name])
    axis = int(_attr(producer, "axis", 1)) % len(scale_shape)
    index = list(np.indices(out_shape))
    index[axis] = index[axis] // block
    number = np.ravel_multi_index(index, scale_shape).astype(np.float64)
    if number.size and number.max() >= 1 << 24:
        raise CannotCertify(f"{_label(producer)} has more block scales than this check numbers exactly")
    return q, np.rint(carried(number)).astype(np.int64)


def _plus_widened(q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``q + z`` (``z`` broadcast to ``q``) in an integer type holding every sum, ``q``'s own where it does."""
    if not np.any(z):  # zero points of 0 (symmetric weights, as onnxruntime writes them): nothing to add
        return q
    lo = int(q.min(initial=0)) + int(z.min(initial=0))
    hi = int(q.max(initial=0)) + int(z.max(initial=0))
    q = q.astype(np.promote_types(q.dtype, bounds.smallest_signed_type(lo, hi)), copy=False)
    q += z  # every sum fits q's type: numpy adds in the wider type and stores each result
    return q


# --------------------------------------------------------------------------- input codes


def _dtype_grid(name: str, where: str) -> _Grid:
    try:
        dt = DataType[name]
    except KeyError as err:
        raise CannotCertify(f"{where}: unknown DataType '{name}'") from err
    if not dt.is_integer() or dt.name.startswith("SCALED"):
        raise CannotCertify(f"{where}: DataType {dt.name} is not an integer type")
    return _Grid(int(dt.min()), int(dt.max()), 0, 1.0, dt.name == "BIPOLAR")


def _plus_constant(g: _Grid, offset: float, where: str) -> _Grid:
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
    out = _Grid(d * g.lo + n, d * g.hi + n, d * g.zero, g.scale / d, g.pair)
    span = out.hi - out.lo
    if out.pair and span > 1:
        q, r = divmod(out.lo - out.zero, span)
        if r == 0:
            out = _Grid(out.zero + q, out.zero + q + 1, out.zero, out.scale * span, True)
    return out


class _InputCodes:
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
        self.cache: dict[str, _Grid] = {}

    def grid(self, tensor: str) -> _Grid:
        if tensor not in self.cache:
            self.cache[tensor] = self._grid(tensor)
        return self.cache[tensor]

    def _grid(self, tensor: str) -> _Grid:
        if tensor in self.input_dtypes:
            return _dtype_grid(self.input_dtypes[tensor], f"--input-dtype for '{tensor}'")
        if tensor in self.graph_inputs and "*" in self.input_dtypes:
            return _dtype_grid(self.input_dtypes["*"], "--input-dtype")
        producer = self.model.find_producer(tensor)
        handler = getattr(self, f"_{producer.op_type}", None) if producer is not None else None
        if producer is not None and producer.op_type in _SELECTING_OPS:
            handler = self._selecting
        dt = self.model.get_tensor_datatype(tensor)
        annotated = dt.is_integer() and not dt.name.startswith("SCALED")
        try:
            if handler is not None:
                grid = handler(producer)
                return self._finn_view(grid, producer, dt if annotated else None) if self.finn else grid
        except CannotCertify:
            if not annotated:
                raise
        if annotated:  # FINN declares the tensor's integer type
            return _dtype_grid(dt.name, f"tensor '{tensor}'")
        where = f"{_label(producer)}" if producer is not None else "a float graph input"
        raise CannotCertify(f"input '{tensor}' comes from {where}, whose codes the certificate cannot derive")

    def _constant(self, name: str, what: str) -> float:
        return _uniform(_execute_constants(self.model, [name])[name], what)

    def _finn_view(self, grid: _Grid, producer: NodeProto, annotation: DataType | None) -> _Grid:
        """``grid`` joined with the DataType FINN gives the tensor (see the module docstring)."""
        dt = annotation if annotation is not None else self._finn_datatype(producer)
        if dt is None:
            return grid
        if producer.op_type in ("Quant", "IntQuant") and not dt.min() <= grid.lo <= grid.hi <= dt.max():
            raise CannotCertify(f"FINN annotates the output of {_label(producer)} {dt.name}, which does not hold its "
                                f"codes [{grid.lo}, {grid.hi}]")
        lo, hi = min(grid.lo, int(dt.min())), max(grid.hi, int(dt.max()))
        return grid if (lo, hi) == (grid.lo, grid.hi) else _Grid(lo, hi, grid.zero, grid.scale)

    def _finn_datatype(self, node: NodeProto) -> DataType | None:
        """What FINN's conversion annotates a quantizer's output with (``None``: the codes themselves)."""
        if node.op_type in ("Quant", "IntQuant"):
            bits = _execute_constants(self.model, [node.input[3]])[node.input[3]]

            class _Initializers:  # get_integer_datatype reads only the bit width initializer
                def get_initializer(self, name: str) -> np.ndarray | None:
                    return bits if name == node.input[3] else None

            return getCustomOp(node).get_integer_datatype(_Initializers())
        if node.op_type == "DequantizeLinear" and self._codes_before_clips(node) != node.input[0]:
            from qonnx.transformation.qcdq_to_qonnx import extract_elem_type

            storage = self._storage_type(node)
            lo, hi = self._through_clips(node, storage, *_STORAGE_RANGES[storage])
            try:
                bits, signed, _ = extract_elem_type(storage, (np.array(lo), np.array(hi)))
            except (AssertionError, ValueError) as err:
                raise CannotCertify(f"qonnx's QCDQToQuant cannot convert the Clip [{lo}, {hi}] in front of "
                                    f"{_label(node)}") from err
            return DataType[("INT" if signed else "UINT") + str(bits)] if bits > 1 else \
                DataType["BIPOLAR" if signed else "BINARY"]
        if node.op_type == "Trunc":  # a 6-input v2 Trunc (checked by _Trunc): FINN's type of its output bits
            bits = int(self._constant(node.input[5], f"the output bit width of {_label(node)}"))
            return DataType[("INT" if _attr(node, "signed", 1) else "UINT") + str(bits)]
        return None

    def _probe(self, node: NodeProto, scale: float, zero: float, version: int | None = None) -> _Grid:
        """Execute a qonnx quantizer on -inf and +inf: its clamp yields the extreme codes."""
        params = _execute_constants(self.model, [n for n in node.input[1:] if n])
        x, y = f"{node.input[0]}__certificate_probe", f"{node.output[0]}__certificate_probe"
        probe_node = helper.make_node(node.op_type, [x, *node.input[1:]], [y], domain=node.domain)
        probe_node.attribute.extend(node.attribute)
        ndim = max((np.ndim(v) for v in params.values()), default=0)
        context = {**params, x: np.array([-np.inf, np.inf], dtype=np.float32).reshape(2, *[1] * ndim), y: None}
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                getCustomOp(probe_node, version).execute_node(context, self.model.graph)
        except Exception as err:  # qonnx's kernel decides which parameters are valid
            raise CannotCertify(f"executing {_label(node)} on -inf/+inf failed ({type(err).__name__}: {err})") from err
        out = np.asarray(context[y], dtype=np.float64)
        codes = _as_integers(out / scale + zero, f"the extreme outputs of {_label(node)} (scale {scale}, zero point {zero})")
        return _Grid(int(codes.min()), int(codes.max()), int(zero), scale)

    def _Quant(self, node: NodeProto) -> _Grid:
        scale = self._constant(node.input[1], f"the scale of {_label(node)}")
        zero = self._constant(node.input[2], f"the zero point of {_label(node)}")
        if scale == 0 or zero != round(zero):
            raise CannotCertify(f"{_label(node)} has scale {scale} and zero point {zero}")
        grid = self._probe(node, scale, zero)
        bits = self._constant(node.input[3], f"the bit width of {_label(node)}")
        # qonnx runs a signed 1-bit Quant as bipolar: only its two extreme codes occur
        return replace(grid, pair=bits == 1 and bool(_attr(node, "signed", 1)) and grid.hi - grid.lo == 2)

    _IntQuant = _Quant

    def _BipolarQuant(self, node: NodeProto) -> _Grid:
        scale = self._constant(node.input[1], f"the scale of {_label(node)}")
        if scale == 0:
            raise CannotCertify(f"{_label(node)} has scale 0")
        return replace(self._probe(node, scale, 0.0), pair=True)

    def _DequantizeLinear(self, node: NodeProto) -> _Grid:
        scale = self._constant(node.input[1], f"the scale of {_label(node)}")
        zero = self._constant(node.input[2], f"the zero point of {_label(node)}") if len(node.input) > 2 and node.input[2] else 0.0
        storage = self._storage_type(node)
        if storage not in _STORAGE_RANGES or scale == 0:
            raise CannotCertify(f"{_label(node)} dequantizes storage type {TensorProto.DataType.Name(storage)} "
                                f"with scale {scale}")
        lo, hi = _STORAGE_RANGES[storage]
        lo, hi = self._through_clips(node, storage, lo, hi)
        return _Grid(lo, hi, int(zero), scale)

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
        out = _execute_constants(self.model, [dq.input[0]], {start: extremes})[dq.input[0]]
        codes = _as_integers(np.asarray(out, dtype=np.float64), f"the Clip output in front of {_label(dq)}")
        return int(codes.min()), int(codes.max())

    def _storage_type(self, dq: NodeProto) -> int:
        """ONNX: the codes' type is the zero point's, else that of DequantizeLinear's input (a Clip keeps it)."""
        if len(dq.input) > 2 and dq.input[2]:
            return helper.np_dtype_to_tensor_dtype(_execute_constants(self.model, [dq.input[2]])[dq.input[2]].dtype)
        codes = self._codes_before_clips(dq)
        quantize = self.model.find_producer(codes)
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            if len(quantize.input) > 2 and quantize.input[2]:
                zp = _execute_constants(self.model, [quantize.input[2]])[quantize.input[2]]
                return helper.np_dtype_to_tensor_dtype(zp.dtype)
            return int(_attr(quantize, "output_dtype", 0)) or TensorProto.UINT8
        init = initializer_proto(self.model, codes)
        if init is not None:
            return init.data_type
        vi = self.model.get_tensor_valueinfo(codes)
        if vi is None:
            raise CannotCertify(f"the type of the codes {_label(dq)} dequantizes is unknown")
        return vi.type.tensor_type.elem_type

    def _MultiThreshold(self, node: NodeProto) -> _Grid:
        thresholds = _execute_constants(self.model, [node.input[1]])[node.input[1]]
        out_scale, out_bias = float(_attr(node, "out_scale", 1.0)), float(_attr(node, "out_bias", 0.0))
        if not out_scale or not np.isfinite(out_scale):
            raise CannotCertify(f"{_label(node)} has out_scale {out_scale}")
        # qonnx outputs out_scale * k + out_bias, k the count of the T thresholds passed (0..T)
        count = int(np.shape(thresholds)[-1])
        return _plus_constant(_Grid(0, count, 0, out_scale, count <= 1), out_bias, _label(node))

    def _Add(self, node: NodeProto) -> _Grid:
        return self._shift(node, negate=False)

    def _Sub(self, node: NodeProto) -> _Grid:
        return self._shift(node, negate=True)

    def _shift(self, node: NodeProto, negate: bool) -> _Grid:
        """A scalar constant added to (or subtracted from) the one non-constant input."""
        candidates = ((0, 1),) if negate else ((0, 1), (1, 0))
        for data, const in candidates:
            try:
                value = self._constant(node.input[const], f"the constant of {_label(node)}")
            except CannotCertify:
                continue
            if initializer_proto(self.model, node.input[data]) is not None:
                continue
            return _plus_constant(self.grid(node.input[data]), -value if negate else value, _label(node))
        raise CannotCertify(f"{_label(node)} does not add one scalar constant to one tensor")

    def _Trunc(self, node: NodeProto) -> _Grid:
        """Executed as qonnx does: the version is the model's opset of the node's domain (default 1)."""
        version = self.model.get_opset_imports().get(node.domain, 1)
        if version < 2 or len(node.input) != 6:
            raise CannotCertify(f"{_label(node)} executes as Trunc v{min(version, 2)} with {len(node.input)} inputs; "
                                "only v2 with 6 inputs clamps its output codes")
        scale = self._constant(node.input[1], f"the scale of {_label(node)}")
        zero_in = self._constant(node.input[2], f"the zero point of {_label(node)}")
        out_scale = self._constant(node.input[4], f"the output scale of {_label(node)}")
        if not scale or not out_scale:
            raise CannotCertify(f"{_label(node)} has a zero scale")
        zero = zero_in / np.exp2(np.rint(np.log2(out_scale / scale)))
        if zero != np.rint(zero):
            raise CannotCertify(f"{_label(node)}: its output zero point {zero} is not an integer code")
        return self._probe(node, out_scale, float(zero), version=2)

    def _Relu(self, node: NodeProto) -> _Grid:
        g = self.grid(node.input[0])
        if g.scale > 0:  # real >= 0 <=> code >= zero; negative reals become the zero code
            return _Grid(max(g.lo, g.zero), max(g.hi, g.zero), g.zero, g.scale)
        return _Grid(min(g.lo, g.zero), min(g.hi, g.zero), g.zero, g.scale)

    def _selecting(self, node: NodeProto) -> _Grid:
        return self.grid(node.input[0])

    def _Resize(self, node: NodeProto) -> _Grid:
        if _attr(node, "mode", "nearest") != "nearest":
            raise CannotCertify(f"{_label(node)} interpolates (mode {_attr(node, 'mode')})")
        return self.grid(node.input[0])

    _Upsample = _Resize

    def _Pad(self, node: NodeProto) -> _Grid:
        g = self.grid(node.input[0])
        if _attr(node, "mode", "constant") != "constant":
            return g  # edge / reflect / wrap repeat input values
        if len(node.input) > 2 and node.input[2]:
            value = self._constant(node.input[2], f"the pad value of {_label(node)}")
        else:
            value = float(_attr(node, "value", 0.0))
        code = int(_as_integers(np.array(value / g.scale + g.zero), f"the pad value {value} of {_label(node)} on its grid"))
        return _Grid(min(g.lo, code), max(g.hi, code), g.zero, g.scale)

    def _Im2Col(self, node: NodeProto) -> _Grid:
        """qonnx's Im2Col: the input's values, plus ``pad_value`` where ``pad_amount`` pads."""
        g = self.grid(node.input[0])
        if not any(_attr(node, "pad_amount", [0])):
            return g
        value = float(_attr(node, "pad_value", 0))
        code = int(_as_integers(np.array(value / g.scale + g.zero), f"the pad value {value} of {_label(node)} on its grid"))
        return _Grid(min(g.lo, code), max(g.hi, code), g.zero, g.scale)

    def _Mul(self, node: NodeProto) -> _Grid:
        return self._rescale(node, divide=False)

    def _ElementwiseMul(self, node: NodeProto) -> _Grid:  # FINN's HW layer for Mul
        return self._rescale(node, divide=False)

    def _Div(self, node: NodeProto) -> _Grid:
        return self._rescale(node, divide=True)

    def _rescale(self, node: NodeProto, divide: bool) -> _Grid:
        """A nonzero scalar constant factor keeps the codes and changes the step."""
        for data, factor in ((0, 1),) if divide else ((0, 1), (1, 0)):
            try:
                value = self._constant(node.input[factor], f"the factor of {_label(node)}")
            except CannotCertify:
                continue
            if value != 0:
                g = self.grid(node.input[data])
                return replace(g, scale=g.scale / value if divide else g.scale * value)
        raise CannotCertify(f"{_label(node)} is not a multiplication by a nonzero scalar constant")

    def _Concat(self, node: NodeProto) -> _Grid:
        grids = [self.grid(name) for name in node.input]
        first = grids[0]
        if any(not np.isclose(g.scale, first.scale, rtol=1e-6, atol=0) for g in grids):
            raise CannotCertify(f"{_label(node)} joins inputs with different scales")
        if all(g.zero == first.zero for g in grids):
            return _Grid(min(g.lo for g in grids), max(g.hi for g in grids), first.zero, first.scale)
        if self.zero_point != "subtract":  # raw codes of different zero points mean different reals
            raise CannotCertify(f"{_label(node)} joins inputs with different zero points (under fold)")
        # a subtracting MAC sees real / scale: on that grid the inputs agree, with zero point 0
        return _Grid(min(g.lo - g.zero for g in grids), max(g.hi - g.zero for g in grids), 0, first.scale)


# --------------------------------------------------------------------------- ranges


def _exact(w: np.ndarray, *codes: int) -> np.ndarray:
    """``w`` as int64, or as Python ints when a sum of ``w.size`` products with ``codes`` could overflow int64."""
    bound = int(np.max(np.abs(w), initial=0)) * max(*(abs(c) for c in codes), 1) * max(w.size, 1)
    return w.astype(object if bound >= _INT64_SAFE else np.int64)


def _term_extremes(w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest value of each product ``w_i * x_i`` over the codes ``[lo, hi]``."""
    return np.minimum(w * lo, w * hi), np.maximum(w * lo, w * hi)


def _spatial_pads(node: NodeProto, sizes: list[int] | None, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> tuple[list[int], list[int]] | None:
    """Begin/end padding per spatial dim (``None``: ``SAME`` padding of an unknown input size)."""
    n = len(kernel)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(_attr(node, "pads", [0] * 2 * n))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if sizes is None:
        return None
    total = [max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
             for size, k, s, d in zip(sizes, kernel, strides, dilations)]
    small = [t // 2 for t in total]
    begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
    return begin, [t - b for t, b in zip(total, begin)]


def _outer(per_dim: tuple[tuple[bool, ...], ...]) -> np.ndarray:
    """Flattened kernel mask from one boolean tuple per spatial dim (their outer AND)."""
    return functools.reduce(np.logical_and.outer, [np.asarray(d, dtype=bool) for d in per_dim]).reshape(-1)


def _input_sizes(model: ModelWrapper, tensor: str, channels_last: bool = False) -> list[int] | None:
    """The spatial sizes of a Conv input, ``(N, C, *sizes)`` or, ``channels_last``, ``(N, *sizes, C)``."""
    shape = model.get_tensor_shape(tensor)
    if shape is None:
        shape = _inferred(model).get_tensor_shape(tensor)
    sizes = None if shape is None or len(shape) < 3 else (shape[1:-1] if channels_last else shape[2:])
    return None if sizes is None or not all(sizes) else [int(d) for d in sizes]


def _conv_masks(model: ModelWrapper, node: NodeProto, kernel: list[int]) -> np.ndarray:
    """Every distinct set of in-bounds taps over the output positions, as ``(patterns, prod(kernel))`` booleans."""
    n = len(kernel)
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    # onnxruntime's com.microsoft QLinearConv (attribute) and qonnx's channels-last Conv (domain) read NHWC data
    channels_last = bool(_attr(node, "channels_last", 0)) or node.domain == CHANNELS_LAST_DOMAIN
    sizes = _input_sizes(model, node.input[0], channels_last)
    pads = _spatial_pads(node, sizes, kernel, strides, dilations)
    if pads is None or sizes is None:
        raise CannotCertify(f"{_label(node)} pads with a code outside the input codes, and its input size is unknown")
    per_dim = []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, *pads):
        outputs = (size + b + e - d * (k - 1) - 1) // s + 1
        per_dim.append(sorted({tuple(0 <= o * s - b + j * d < size for j in range(k)) for o in range(max(outputs, 0))}))
    if not all(per_dim):
        raise CannotCertify(f"{_label(node)} has no output position for its input size {sizes}")
    return np.asarray([_outer(combo) for combo in itertools.product(*per_dim)], dtype=bool)


def _conv_ranges(model: ModelWrapper, node: NodeProto, w: np.ndarray, lo: int, hi: int,
                 pad: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    kernel = list(w.shape[2:])
    w = _exact(w, lo, hi, pad)
    t_min, t_max = _term_extremes(w, lo, hi)
    channels = w.shape[0]
    t_min = t_min.sum(axis=1).reshape(channels, -1)  # per channel and kernel position, over input channels
    t_max = t_max.sum(axis=1).reshape(channels, -1)
    has_pads = _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "", "VALID") or any(_attr(node, "pads", []))
    if not has_pads or lo <= pad <= hi:  # a padding tap is then one more point of the input box
        return t_min.sum(axis=1), t_max.sum(axis=1), None
    masks = _conv_masks(model, node, kernel)
    padded = w.sum(axis=1).reshape(channels, -1) * pad
    inside, outside = masks.T.astype(w.dtype), (~masks).T.astype(w.dtype)
    acc_min = (t_min.dot(inside) + padded.dot(outside)).min(axis=1)
    acc_max = (t_max.dot(inside) + padded.dot(outside)).max(axis=1)
    return acc_min, acc_max, pad


def _conv_transpose_ranges(node: NodeProto, w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output sums the taps of one stride phase; taps falling outside the input add nothing.

    A missing tap adds what a tap holding code 0 adds, so the input box widened to hold 0 covers
    every border output (exactly when such a border exists, safely when none does).
    """
    lo, hi = min(lo, 0), max(hi, 0)
    groups = int(_attr(node, "group", 1))
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    t_min, t_max = _term_extremes(_exact(w, lo, hi), lo, hi)
    c_in, c_out_g = w.shape[0], w.shape[1]
    per_group = (groups, c_in // groups, c_out_g, -1)
    t_min = t_min.reshape(per_group).sum(axis=1).reshape(groups * c_out_g, -1)
    t_max = t_max.reshape(per_group).sum(axis=1).reshape(groups * c_out_g, -1)
    per_dim = [[tuple((j * d) % s == p for j in range(k)) for p in range(s)]
               for k, s, d in zip(kernel, strides, dilations)]
    masks = np.asarray([_outer(combo) for combo in itertools.product(*per_dim)], dtype=bool)
    masks = masks[masks.any(axis=1)].T.astype(t_min.dtype)
    return t_min.dot(masks).min(axis=1), t_max.dot(masks).max(axis=1)


def _row_ranges(rows: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    acc_min, acc_max = bounds.exact_accumulator_range(rows, bounds.IntRange(lo, hi))
    return np.asarray(acc_min), np.asarray(acc_max)


def _accumulations(rows: np.ndarray, blocks: np.ndarray | None, node: NodeProto) -> list[np.ndarray]:
    """The integer accumulations of MAC rows ``(C, K)``: the rows, or with block-wise weight scales each block's
    terms of every row (in K order), since blocks with different scales are added only after scaling."""
    if blocks is None or np.all(blocks == blocks[:, :1]):
        return [rows]
    # number each row's blocks 0, 1, ... by their scale entry (rows use different entries)
    order = np.argsort(blocks, axis=1, kind="stable")
    ordered = np.take_along_axis(blocks, order, axis=1)
    rank = np.concatenate([np.zeros((rows.shape[0], 1), np.int64),
                           np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1)], axis=1)
    local = np.empty_like(rank)
    np.put_along_axis(local, order, rank, axis=1)
    parts = []
    for number in np.unique(local):
        inside = local == number
        count = inside.sum(axis=1)
        if not np.all(count == count[0]):
            raise CannotCertify(f"{_label(node)}: weight block {number} holds a different number of terms per output")
        parts.append(rows[inside].reshape(rows.shape[0], int(count[0])))
    return parts


def _stage_ranges(parts: list[np.ndarray], lo: int, hi: int, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Extremes of every partial sum within a K-tile of ``tile`` terms and of every running sum of tile results.

    Each term ``w x`` ranges over ``[min(w lo, w hi), max(w lo, w hi)]`` independently of the others, so a
    sum of consecutive terms reaches the sum of their extremes.
    """
    x = bounds.IntRange(lo, hi)
    tile_lo, tile_hi, run_lo, run_hi = [], [], [], []
    for part in parts:
        t_lo, t_hi = bounds.partial_sum_range(part, x, tile)
        tile_lo.append(int(np.min(t_lo, initial=0)))
        tile_hi.append(int(np.max(t_hi, initial=0)))
        totals = [_row_ranges(part[:, s:s + tile], lo, hi) for s in range(0, part.shape[1], tile)]
        running_lo = np.cumsum(np.stack([t[0] for t in totals]).astype(object), axis=0)
        running_hi = np.cumsum(np.stack([t[1] for t in totals]).astype(object), axis=0)
        run_lo.append(int(running_lo.min()))
        run_hi.append(int(running_hi.max()))
    return (min(tile_lo), max(tile_hi)), (min(run_lo), max(run_hi))


def _mac_codes(grid: _Grid, zero_point: str) -> tuple[int, int, int]:
    """``(lo, hi, padding code)`` the integer MAC sees: raw codes (fold) or codes minus the zero point."""
    if zero_point == "subtract":
        return grid.lo - grid.zero, grid.hi - grid.zero, 0
    return grid.lo, grid.hi, grid.zero


def _finn_weights(model: ModelWrapper, node: NodeProto, xnor: bool) -> np.ndarray:
    values = initializer_value(model, node.input[1])
    if values is None:
        raise CannotCertify(f"{_label(node)} has no weight initializer")
    if xnor:
        q = _as_integers(values, f"the weights of {_label(node)}")
        if not np.isin(q, (0, 1)).all():
            raise CannotCertify(f"{_label(node)} is in binaryXnorMode but its weights are not 0/1")
        return q
    wdt = _dtype_grid(_attr(node, "weightDataType", ""), f"weightDataType of {_label(node)}")
    q = _as_integers(values, f"the weights of {_label(node)}")
    bipolar = _attr(node, "weightDataType", "") == "BIPOLAR"
    if (not np.isin(q, (-1, 1)).all()) if bipolar else (q.min(initial=0) < wdt.lo or q.max(initial=0) > wdt.hi):
        raise CannotCertify(f"the weights of {_label(node)} leave its weightDataType {_attr(node, 'weightDataType')}")
    return q


def _reads_graph_input(model: ModelWrapper, tensor: str) -> bool:
    """Whether executing ``tensor`` needs a graph input (else it is a constant the graph computes)."""
    initializers = _initializer_table(model).keys()
    inputs = {vi.name for vi in model.graph.input} - initializers
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name in inputs:
            return True
        if not name or name in seen or name in initializers:
            continue
        seen.add(name)
        producer = model.find_producer(name)
        stack.extend(producer.input if producer is not None else ())
    return False


def _certify_act_x_act(model: ModelWrapper, node: NodeProto, codes: "_InputCodes | None",
                       zero_point: str) -> LayerCertificate:
    """A MatMul of two activations: each output sums K products of independent codes of both operands.

    ``codes`` None: a QLinearMatMul/MatMulInteger of two integer activations, each operand's codes from its
    own type and zero point (:func:`_integer_codes`).
    """
    a = node.input[0]
    b = node.input[_INTEGER_MACS[node.op_type][1]] if codes is None else node.input[1]
    if not _reads_graph_input(model, a):
        raise CannotCertify(f"{_label(node)} multiplies a constant left operand by an activation")
    inferred = _inferred(model)
    shape_a, shape_b = inferred.get_tensor_shape(a), inferred.get_tensor_shape(b)
    if not shape_a or not shape_a[-1] or not shape_b:
        raise CannotCertify(f"{_label(node)}: the operand shapes are unknown ({shape_a}, {shape_b})")
    K = int(shape_a[-1])
    if int(shape_b[-2] if len(shape_b) > 1 else shape_b[0]) not in (K, 0):  # 0: a dimension left symbolic
        raise CannotCertify(f"{_label(node)}: operand shapes {shape_a} and {shape_b} do not share K")
    if codes is None:
        types = _elem_types(model)
        operands = ((0, _DATA_ZERO_POINT.get(node.op_type, 2)), _INTEGER_MACS[node.op_type][1:])
        (a_lo, a_hi, _), (b_lo, b_hi, _) = (_integer_codes(model, node, data, zp, zero_point, types)
                                            for data, zp in operands)
    else:
        a_lo, a_hi, _ = _mac_codes(codes.grid(a), zero_point)
        b_lo, b_hi, _ = _mac_codes(codes.grid(b), zero_point)
    acc_min, acc_max = bounds.act_x_act_range(K, bounds.IntRange(a_lo, a_hi), bounds.IntRange(b_lo, b_hi))
    return LayerCertificate(node.name or node.output[0], (int(a_lo), int(a_hi)), None, (acc_min,), (acc_max,),
                            (int(b_lo), int(b_hi)))


def _integer_act_x_act(model: ModelWrapper, node: NodeProto) -> bool:
    """An integer MatMul op (QLinearMatMul, MatMulInteger, ...) whose second operand is computed at run time."""
    op = node.op_type
    if op not in _INTEGER_MACS or _INTEGER_MACS[op][0] != "MatMul":
        return False
    return node.domain in _INTEGER_MAC_DOMAINS.get(op, ("", "ai.onnx")) and \
        _reads_graph_input(model, node.input[_INTEGER_MACS[op][1]])


def _inferred(model: ModelWrapper) -> ModelWrapper:
    """A read-only copy of ``model`` with qonnx's shape inference applied (ONNX's alone where the graph has no qonnx
    or FINN custom op: qonnx's would only re-wrap the model, quadratic in its size, see
    :func:`a2q_passes.model_io.with_inferred_shapes`); one per :func:`certify_claims` call.

    Why cached: inference walks the whole graph, and a transformer stack asks once per layer;
    certifying does not change the graph.
    """
    key = id(model.model)
    if key not in _INFERRED:
        inferred = with_inferred_shapes(model)
        if not _INFERRED.get("active"):
            return inferred
        _INFERRED[key] = inferred
    return _INFERRED[key]


# Filled only while certify_claims runs (the key "active" says so), emptied when it ends.
_INFERRED: dict = {}


def _elem_types(model: ModelWrapper) -> dict[str, int]:
    """ONNX type inference's element type of every tensor it can type."""
    inferred = shape_inference.infer_shapes(model.model)
    infos = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos if vi.type.tensor_type.elem_type}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def _integer_operands(model: ModelWrapper, node: NodeProto, zero_point: str) -> tuple[np.ndarray, int, int, int]:
    """Integer weights the op multiplies (Conv/MatMul layout) and ``(lo, hi, padding code)`` of its input.

    ONNX QLinearConv/ConvInteger/QLinearMatMul/MatMulInteger and com.microsoft QGemm compute on
    ``(x - x_zero_point) * (w - w_zero_point)``; the weight zero point is one per tensor or one per
    output channel (QLinearConv/ConvInteger: the first weight axis; MatMul: B's columns; QGemm: B's
    columns, its rows when transB). Under fold the MAC multiplies the raw codes instead.
    """
    _, w_index, wz_index = _INTEGER_MACS[node.op_type]
    names = [node.input[w_index]] + [n for n in (node.input[wz_index] if len(node.input) > wz_index else "",) if n]
    values = _execute_constants(model, names)
    w = np.asarray(values[names[0]])
    if w.dtype.kind not in "iu":
        raise CannotCertify(f"{_label(node)} multiplies weights of type {w.dtype}, not integers")
    w = w.astype(np.int64)
    if zero_point == "subtract" and len(names) > 1:
        wz = np.asarray(values[names[1]]).astype(np.int64)
        if wz.size > 1:
            by_rows = node.op_type in ("QLinearConv", "ConvInteger") or (node.op_type == "QGemm" and _attr(node, "transB", 0))
            wz = wz.reshape([-1] + [1] * (w.ndim - 1)) if by_rows else wz.reshape(-1)
        w = w - wz
    data_zero_point = _DATA_ZERO_POINT.get(node.op_type, 2)
    return (w, *_integer_codes(model, node, 0, data_zero_point, zero_point, _elem_types(model)))


def _integer_codes(model: ModelWrapper, node: NodeProto, data: int, zero_point_input: int, zero_point: str,
                   types: Mapping[str, int]) -> tuple[int, int, int]:
    """``(lo, hi, padding code)`` of the integer operand at input ``data`` of an integer MAC op, its zero point at
    input ``zero_point_input``: its type's range, less the zero point under subtract."""
    if data == 0 and node.op_type in _QUANTIZES_DATA:  # any uint8 code, any uint8 zero point
        return (-255, 255, 0) if zero_point == "subtract" else (0, 255, 0)
    x_zp = node.input[zero_point_input] if len(node.input) > zero_point_input else ""
    zp_value = None
    if x_zp:
        try:
            zp_value = _execute_constants(model, [x_zp])[x_zp]
        except CannotCertify:
            zp_value = None  # computed at run time (DynamicQuantizeLinear): any value of its type
    x = node.input[data]
    x_type = helper.np_dtype_to_tensor_dtype(zp_value.dtype) if zp_value is not None else types.get(x)
    if x_type not in _STORAGE_RANGES or (types.get(x) not in (None, x_type)):
        raise CannotCertify(f"the integer input '{x}' of {_label(node)} has type {x_type} "
                            f"(type inference: {types.get(x)})")
    lo, hi = _STORAGE_RANGES[x_type]
    if zp_value is not None:
        z = _uniform(zp_value, f"the zero point '{x_zp}' of {_label(node)}")
        z_lo = z_hi = int(z)
    elif x_zp:
        if types.get(x_zp) not in _STORAGE_RANGES:
            raise CannotCertify(f"the run-time input zero point '{x_zp}' of {_label(node)} has an unknown type")
        z_lo, z_hi = _STORAGE_RANGES[types[x_zp]]
    else:
        z_lo = z_hi = 0
    if zero_point == "subtract":  # ONNX pads x - z with 0
        return lo - z_hi, hi - z_lo, 0
    # raw codes; a padded tap holds z, a code of the input's own type, so [lo, hi] covers it whatever z is
    return lo, hi, z_lo if z_lo == z_hi else lo


def certify_layer(model: ModelWrapper, node_name: str, input_dtypes: Mapping[str, str] | None = None,
                  zero_point: str = "fold", input_ranges: str = "exact", tile: int | None = None) -> LayerCertificate:
    """Exact per-channel accumulator range of MAC node ``node_name`` (bias excluded), or :class:`CannotCertify`.

    With block-wise weight scales each block is its own integer accumulation (the range is over every block).
    ``tile``: also the ranges of a multi-stage datapath that sums each run of ``tile`` consecutive terms
    (K order of the accumulation rows) in an inner accumulator and the tile results in an outer one.
    """
    node = model.named.get(node_name) if isinstance(model, ReadOnlyModel) else next(
        (n for n in model.graph.node if (n.name or n.output[0]) == node_name), None)
    if node is None:
        raise CannotCertify(f"no node named '{node_name}'")
    op = node.op_type
    pad_code = None
    parts = None  # accumulation rows (C, terms) whose K order a tiled datapath follows
    if op in _MVAU or op in _VVAU:
        xnor = bool(_attr(node, "binaryXnorMode", 0))
        w = _finn_weights(model, node, xnor)
        rows = w.T if op in _MVAU else w.reshape(w.shape[0], -1)
        if xnor:  # popcount of K xnor matches
            lo, hi = 0, 1
            acc_min, acc_max = np.zeros(rows.shape[0], dtype=np.int64), np.full(rows.shape[0], rows.shape[1])
        else:
            lo, hi, _ = _mac_codes(_dtype_grid(_attr(node, "inputDataType", ""), f"inputDataType of {_label(node)}"),
                                   zero_point)
            parts = [rows]
            acc_min, acc_max = _row_ranges(rows, lo, hi)
    elif op == "MatMul" and _reads_graph_input(model, node.input[1]) or _integer_act_x_act(model, node):
        if tile is not None:
            raise CannotCertify(f"{_label(node)} multiplies two activations; tiled ranges are not certified for it")
        codes = None if op in _INTEGER_MACS else _InputCodes(model, input_dtypes, zero_point, input_ranges)
        return _certify_act_x_act(model, node, codes, zero_point)
    elif op in ("Conv", "ConvTranspose", "Gemm", "MatMul") or op in _INTEGER_MACS:
        blocks = None
        if op in _INTEGER_MACS:
            if node.domain not in _INTEGER_MAC_DOMAINS.get(op, ("", "ai.onnx")):
                raise CannotCertify(f"{_label(node)} is from domain '{node.domain}', not the integer op of that name")
            w, lo, hi, pad = _integer_operands(model, node, zero_point)
            op = _INTEGER_MACS[op][0]
        else:
            w, blocks = _weight_view(model, node.input[1], zero_point)
            codes = _InputCodes(model, input_dtypes, zero_point, input_ranges)
            lo, hi, pad = _mac_codes(codes.grid(node.input[0]), zero_point)
        if op == "Gemm" and _attr(node, "transA", 0):
            raise CannotCertify(f"{_label(node)} transposes its data input")
        if blocks is not None and op in ("Conv", "ConvTranspose") and not np.all(
                blocks.reshape(blocks.shape[0], -1) == blocks.reshape(blocks.shape[0], -1)[:, :1]):
            raise CannotCertify(f"the block-wise weight scales of {_label(node)} split its accumulation")
        if op == "Conv":
            acc_min, acc_max, pad_code = _conv_ranges(model, node, w, lo, hi, pad)
            parts = [w.reshape(w.shape[0], -1)]
        elif op == "ConvTranspose":
            acc_min, acc_max = _conv_transpose_ranges(node, w, lo, hi)
        elif w.ndim != 2:
            raise CannotCertify(f"{_label(node)} has a {w.ndim}-D weight")
        else:
            transposed = op == "Gemm" and _attr(node, "transB", 0)
            rows = w if transposed else w.T
            parts = _accumulations(rows, None if blocks is None else (blocks if transposed else blocks.T), node)
            ranges = [_row_ranges(part, lo, hi) for part in parts]
            acc_min = np.min(np.stack([r[0] for r in ranges]), axis=0)
            acc_max = np.max(np.stack([r[1] for r in ranges]), axis=0)
    else:
        raise CannotCertify(f"{_label(node)} is not a MAC layer")
    tile_range = running_range = None
    if tile is not None:
        if parts is None:
            raise CannotCertify(f"{_label(node)}: tiled partial sums are certified for MatMul, Gemm, Conv and FINN "
                                "MVAU/VVAU only")
        # a padded tap holds pad_code: with it among the codes every tile's terms range over a box holding all
        # they take (the reader's view of such a Conv; exact once every tile can reach a border pattern)
        box = (lo, hi) if pad_code is None else (min(lo, pad_code), max(hi, pad_code))
        tile_range, running_range = _stage_ranges(parts, int(box[0]), int(box[1]), tile)
    return LayerCertificate(node_name, (int(lo), int(hi)), pad_code,
                            tuple(int(v) for v in acc_min), tuple(int(v) for v in acc_max),
                            tile=tile, tile_range=tile_range, running_range=running_range)


def certify_claims(model: ModelWrapper, claims: Mapping[str, Claim], *, what: str,
                   input_dtypes: Mapping[str, str] | None = None, zero_point: str = "fold",
                   input_ranges: str = "exact") -> None:
    """Certify every claimed layer; :class:`PostconditionError` when a claim is narrower than the certificate.

    ``input_ranges``: the input codes the claims were made for, the quantizers' (``exact``) or FINN's
    DataType of them (``finn``); derived here independently of :mod:`a2q_passes.layers`.

    A claim fails when the layer cannot be certified, when its range misses part of the certified
    range, or when the certified range does not fit its promised width. Each layer's certificate is dropped once
    checked (its per-channel ranges would otherwise add up over a deep model: some 0.4 MB per layer of a 7B stack).
    """
    # producers and shapes looked up in tables built once (the certificate only reads the model): scanning the
    # graph for each layer's tensors is quadratic in the graph's size
    model = model if isinstance(model, ReadOnlyModel) else ReadOnlyModel(model.model)
    _INFERRED.clear()
    _INFERRED["active"] = True
    try:
        _certify_each(model, claims, what, input_dtypes, zero_point, input_ranges)
    finally:
        _INFERRED.clear()


def _certify_each(model: ModelWrapper, claims: Mapping[str, Claim], what: str,
                  input_dtypes: Mapping[str, str] | None, zero_point: str, input_ranges: str) -> None:
    for node, claim in progress.over_layers(claims.items(), f"{what}: certificate"):
        try:
            cert = certify_layer(model, node, input_dtypes, zero_point, input_ranges, claim.tile)
        except CannotCertify as err:
            raise PostconditionError(f"{what}: layer '{node}' cannot be certified independently of the analysis "
                                     f"({err}); nothing was written") from err
        certified = f"[{cert.acc_min}, {cert.acc_max}]"
        codes = f"input codes {list(cert.input_codes)}" + (
            f", padded taps hold code {cert.pad_code}" if cert.pad_code is not None else "") + (
            f", second operand codes {list(cert.operand_codes)}" if cert.operand_codes is not None else "")
        if claim.acc_min is None or claim.acc_max is None or claim.acc_min > cert.acc_min or claim.acc_max < cert.acc_max:
            raise PostconditionError(
                f"{what}: layer '{node}': the analysis gives the accumulator range [{claim.acc_min}, {claim.acc_max}], "
                f"but executing the graph's own quantizers gives {certified} ({codes}); "
                "the analysis under-reports, nothing was written")
        if claim.acc_bits is not None and not bounds.fits(cert.acc_min, cert.acc_max, claim.acc_bits):
            raise PostconditionError(
                f"{what}: layer '{node}' was promised {claim.acc_bits} bits, but its certified range {certified} needs "
                f"{bounds.accumulator_width(cert.acc_min, cert.acc_max)}; nothing was written")
        if claim.tile is not None:
            _check_stages(what, node, claim, cert)


def _check_stages(what: str, node: str, claim: Claim, cert: LayerCertificate) -> None:
    """A tiled claim: the fast path's within-tile range covers the certified one, and both stages fit their widths."""
    (t_lo, t_hi), (r_lo, r_hi) = cert.tile_range, cert.running_range
    if claim.tile_min is None or claim.tile_max is None or claim.tile_min > t_lo or claim.tile_max < t_hi:
        raise PostconditionError(
            f"{what}: layer '{node}': the analysis gives the partial sums within tiles of {claim.tile} the range "
            f"[{claim.tile_min}, {claim.tile_max}], but executing the graph's own quantizers gives [{t_lo}, {t_hi}]; "
            "the analysis under-reports, nothing was written")
    if claim.tile_bits is not None and not bounds.fits(t_lo, t_hi, claim.tile_bits):
        raise PostconditionError(
            f"{what}: layer '{node}': the partial sums within tiles of {claim.tile} were promised {claim.tile_bits} "
            f"bits, but their certified range [{t_lo}, {t_hi}] needs {bounds.accumulator_width(t_lo, t_hi)}; "
            "nothing was written")
    if claim.acc_bits is not None and not bounds.fits(r_lo, r_hi, claim.acc_bits):
        raise PostconditionError(
            f"{what}: layer '{node}': the running sums of tile results were promised {claim.acc_bits} bits, but "
            f"their certified range [{r_lo}, {r_hi}] needs {bounds.accumulator_width(r_lo, r_hi)}; nothing was written")
