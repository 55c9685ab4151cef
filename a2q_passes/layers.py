"""Find quantized MAC layers in an ONNX graph and read or write their integer weights.

Graph code only: which node is a MAC layer, where its integer weights come from, and which
integer grid its input lives on. All bound math is in :mod:`a2q_passes.bounds`.

Supported weight sources: QONNX ``Quant``/``IntQuant``/``BipolarQuant`` on constants,
FINN-ONNX initializers with an integer datatype annotation, and standard
``DequantizeLinear`` (optionally fed by ``QuantizeLinear``, and optionally behind integer ``Clip``
nodes as Brevitas' QCDQ export writes them) on constants of any ONNX integer storage type
(int4/uint4 to int32 included; opset-21 block-wise scales along K make each block its own accumulator,
see :class:`BlockRowLayout`), each optionally behind ``Transpose``/``Identity`` nodes. FINN ``MVAU``/``VVAU`` nodes carry their integer
weights and datatypes directly, and so do the integer ops of onnxruntime's QOperator and dynamic
formats (``QLinearConv``, ``QLinearMatMul``, ``com.microsoft`` ``QGemm``, ``ConvInteger``, ``MatMulInteger``),
which also carry their input's codes (its storage type and zero point). A ``MatMul`` whose second operand
is computed at run time is an activation x activation layer (``kind`` :data:`KIND_ACT_X_ACT`): both operands'
grids are resolved like any MAC input, and there are no weights. Other multiply-accumulate ops (onnxruntime's
fused and packed contrib ops, Einsum, LSTM, ...: :data:`UNREAD_MACS`) are reported as unsupported layers, never
passed over.

A non-zero weight zero point z (``DequantizeLinear`` and the integer ops) follows the activation
convention: under ``subtract`` (the ONNX definition) the MAC multiplies ``code - z`` per output
channel; under ``fold`` it multiplies the raw codes, which project cannot shrink toward real 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np
from onnx import AttributeProto, GraphProto, NodeProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.bounds import (BINARY, BIPOLAR, IntRange, act_x_act_range, integer_format, narrowest_integers,
                               stored_as_columns)
from a2q_passes.conventions import (INPUT_RANGES, INPUT_RANGES_TITLE, KIND_ACT_X_ACT,  # noqa: F401 (re-exported)
                                  KIND_WEIGHTS, ZERO_POINT_CONVENTIONS)
from a2q_passes.model_io import (initializer_proto, initializer_shape, initializer_value, set_initializer_value,
                                 with_inferred_shapes)

MAC_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


_BEFORE_OPTIMISATION = ("a fusion by onnxruntime's graph optimizer: analyse the model as the quantizer wrote it, or "
                        "save the optimized model at ORT_ENABLE_BASIC")
_PACKED = ("packed block-wise weights; onnxruntime's MatMulNBitsQuantizer(quant_format=QuantFormat.QDQ) writes them "
           "as DequantizeLinear with block_size, which a2q reads")
# Ops that multiply-accumulate and are not read, by (domain, op): (computes on integers itself, what to do). An op on
# integers is always a layer; a float one (a fusion of ONNX ops, or a recurrent or attention op) only where one of
# its operands is quantized. Either way the layer is reported unsupported, so no check passes a model it did not read.
UNREAD_MACS: dict[tuple[str, str], tuple[bool, str]] = {
    ("com.microsoft", "MatMulInteger16"): (True, "16-bit integer operands"),
    ("com.microsoft", "QAttention"): (True, "quantized attention"),
    ("com.microsoft", "DynamicQuantizeLSTM"): (True, "quantized LSTM"),
    ("com.microsoft", "QMoE"): (True, "quantized mixture of experts"),
    **{("com.microsoft", op): (True, "ordered int8 layouts")
       for op in ("QOrderedMatMul", "QOrderedAttention", "QOrderedLongformerAttention")},
    **{("com.microsoft", op): (True, _PACKED) for op in (
        "MatMulNBits", "MatMulNBitsMlp", "MatMulNBitsQkv", "MatMulNBitsQLoRA", "MatMulBnb4", "MatMulFpQ4",
        "MatMulBlockQuantizedFp4Weight", "MatMulBlockQuantizedFp8Weight")},
    **{("com.microsoft", op): (False, _BEFORE_OPTIMISATION) for op in (
        "FusedConv", "NhwcConv", "NhwcFusedConv", "FusedGemm", "FusedMatMul", "FusedMatMulActivation",
        "TransposeMatMul", "GemmFastGelu", "ConvTransposeWithDynamicPads", "SparseToDenseMatMul", "Attention",
        "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
        "DecoderAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention", "LongformerAttention",
        "SparseAttention", "PagedAttention", "MoE")},
    **{("", op): (False, "only Conv, ConvTranspose, Gemm and MatMul are read; express it with those")
       for op in ("Einsum", "LSTM", "GRU", "RNN", "DeformConv", "Attention")},
}


def unread_mac(node: NodeProto) -> tuple[bool, str] | None:
    """``(computes on integers, what to do)`` where ``node`` is one of :data:`UNREAD_MACS`, else ``None``."""
    return None if is_integer_mac(node) else UNREAD_MACS.get(("" if node.domain == "ai.onnx" else node.domain,
                                                              node.op_type))


MVAU_OP_TYPES = ("MVAU", "MVAU_hls", "MVAU_rtl", "MatrixVectorActivation")
VVAU_OP_TYPES = ("VVAU", "VVAU_hls", "VVAU_rtl", "VectorVectorActivation")
QUANT_OP_TYPES = ("Quant", "IntQuant")
# Ops whose output codes are a subset of their input codes on the same grid.
GRID_PRESERVING_OPS = (
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity",
    "DepthToSpace", "SpaceToDepth", "MaxPoolNHWC", "Slice", "Gather", "Split",
    "Shuffle", "DuplicateStreams",  # FINN's HW layers for a transpose and a fork
)

# Ops whose output grid is derived from their semantics before any DataType annotation is trusted.
SEMANTICS_FIRST_OPS = ("MultiThreshold", "Add", "Sub", "Mul", "Div", "Trunc")

STATUS_OK = "ok"
STATUS_INPUT_NOT_QUANTIZED = "input not quantized"
STATUS_WEIGHTS_NOT_QUANTIZED = "weights not quantized"


class UnsupportedLayer(Exception):
    """A MAC layer whose quantization this tool cannot read; the message says why and what to do."""


@dataclass(frozen=True)
class InputGrid:
    """The integer grid of a layer input: codes in ``range``, real value ``(code - zero_code) * scale``."""

    range: IntRange
    dtype: str
    scale: float | None = None
    zero_code: int = 0
    two_point: bool = False  # the codes are exactly {lo, hi} (BIPOLAR and its affine images), not every integer between


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


@dataclass
class RowLayout:
    """Maps the weight tensor as the MAC node sees it to ``(rows, K)`` accumulator rows.

    ``kind`` is ``reshape`` (Conv, VVAU), ``transpose`` (MatMul, Gemm without transB, MVAU),
    ``identity`` (Gemm with transB) or ``gather`` (ConvTranspose: one row per output
    channel and stride phase, padded with ``-1`` indices).
    """

    kind: str
    shape: tuple[int, ...]
    index: np.ndarray | None = None
    row_channel: np.ndarray | None = None

    @property
    def rows(self) -> int:
        """How many rows :meth:`to_rows` makes of weights of ``shape`` (without making them)."""
        if self.kind == "gather":
            return self.index.shape[0]
        return self.shape[1] if self.kind == "transpose" else self.shape[0]

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "reshape":
            return w.reshape(w.shape[0], -1)
        if self.kind == "transpose":
            return w.T
        if self.kind == "identity":
            return w
        flat = w.reshape(-1)
        return np.where(self.index >= 0, flat[np.maximum(self.index, 0)], 0)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.kind == "reshape":
            return rows.reshape(self.shape)
        if self.kind == "transpose":
            return transposed_copy(rows)
        if self.kind == "identity":
            return rows
        flat = np.zeros(int(np.prod(self.shape)), dtype=rows.dtype)
        valid = self.index >= 0
        flat[self.index[valid]] = rows[valid]
        return flat.reshape(self.shape)

    def rows_to_channels(self, per_row: np.ndarray, reduce: Callable) -> np.ndarray:
        """Reduce a per-row quantity to one value per output channel."""
        if self.row_channel is None:
            return per_row
        channels = int(self.row_channel.max()) + 1
        return reduce(per_row.reshape(channels, -1), axis=1)


@dataclass
class BlockRowLayout:
    """The rows of ``inner`` cut into the K-blocks of a block-wise weight scale: one accumulator row per block.

    Within a block every weight has one scale, so the block's integer dot product is exact; two blocks
    have different scales and are added only after scaling, in the real domain. Each block is therefore
    its own integer accumulator of ``block`` terms (the natural multi-stage datapath with tile =
    ``block_size`` whose outer stage is not an integer sum): a row of ``K`` terms becomes
    ``ceil(K / block)`` accumulator rows, the last one padded with zero weights (which add nothing).
    """

    inner: RowLayout
    block: int
    K: int  # terms per row of ``inner``
    kind = "blocks"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def blocks(self) -> int:
        return -(-self.K // self.block)

    @property
    def rows(self) -> int:
        return self.inner.rows * self.blocks

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        rows = self.inner.to_rows(w)
        pad = self.blocks * self.block - self.K
        if pad:
            rows = np.pad(rows, ((0, 0), (0, pad)))
        return rows.reshape(-1, self.block)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        joined = rows.reshape(-1, self.blocks * self.block)
        if np.any(joined[:, self.K:] != 0):
            raise ValueError("block rows hold non-zero weights in the padding past K")
        return self.inner.from_rows(np.ascontiguousarray(joined[:, :self.K]))

    def rows_to_channels(self, per_row: np.ndarray, reduce: Callable) -> np.ndarray:
        return self.inner.rows_to_channels(reduce(per_row.reshape(-1, self.blocks), axis=1), reduce)


@dataclass
class MacLayer:
    """One multiply-accumulate layer of the graph in its integer view."""

    node: str
    op_type: str
    input_tensor: str
    K: int
    channels: int
    status: str
    grid: InputGrid | None = None
    source: WeightSource | None = None
    layout: RowLayout | BlockRowLayout | None = None
    binary_xnor: bool = False
    kind: str = KIND_WEIGHTS
    operand_grid: InputGrid | None = None  # act x act: the grid of the second operand (in place of weights)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def act_x_act(self) -> bool:
        """Both operands are activations: the range is fixed by their grids, nothing can be projected."""
        return self.kind == KIND_ACT_X_ACT

    @property
    def input_dtype(self) -> str | None:
        return self.grid.dtype if self.grid else None

    @property
    def weight_dtype(self) -> str | None:
        """The weights' datatype; for an act x act MatMul that of its second operand."""
        if self.operand_grid is not None:
            return self.operand_grid.dtype
        return self.source.dtype if self.source else None

    def act_x_act_range(self) -> tuple[int, int]:
        """Exact accumulator range of a readable act x act MatMul, under the grids' zero-point convention."""
        return act_x_act_range(self.K, self.grid.range, self.operand_grid.range)

    def integer_rows(self, model: ModelWrapper) -> np.ndarray:
        """The integer weights as ``(rows, K)`` int64 accumulator rows."""
        return self.layout.to_rows(read_mac_weights(model, self.source)).astype(np.int64, copy=False)

    def code_rows(self, model: ModelWrapper) -> np.ndarray:
        """The integer rows without widening, for reductions that accumulate in int64 themselves.

        The stored integer codes, viewed as rows, when the MAC multiplies them unchanged (an integer
        initializer, or DequantizeLinear codes no Clip narrows and no zero point is subtracted from):
        an int8 layer then costs no int64 copy. Otherwise :meth:`integer_rows`.
        """
        codes = _codes_as_stored(model, self.source)
        if codes is None:
            return self.integer_rows(model)
        return self.layout.to_rows(apply_perms(codes, self.source.perms))

    def unrounded_rows(self, model: ModelWrapper, keep_integers: bool = False) -> np.ndarray:
        """The weights in integer units before rounding, as ``(rows, K)`` float64 rows.

        Sources that store integers give their integer rows (:meth:`code_rows`: no int64 copy where stored
        narrower), converted in one pass into C-ordered rows: the projection gathers blocks of rows, several
        times faster from contiguous rows than across the columns of a transposed tensor. ``keep_integers``:
        those rows stay in their integer type (an int8 layer's copy is 1 byte a weight, not 8), for callers
        that convert a block of rows at a time (:func:`projection.project_exact` and the other methods).
        """
        rows = self.unrounded_row_view(model)
        if self.source.kind in _UNROUNDED_KINDS:
            return rows
        return contiguous_copy(rows, rows.dtype if keep_integers else np.float64)

    def unrounded_row_view(self, model: ModelWrapper) -> np.ndarray:
        """The values of :meth:`unrounded_rows` without their float64 copy where the source stores integers
        (:meth:`code_rows`, a view of the stored tensor where it can be): for reading a few rows of a large layer."""
        if self.source.kind in _UNROUNDED_KINDS:
            return self.layout.to_rows(unrounded_mac_weights(model, self.source))
        return self.code_rows(model)

    def write_rows(self, model: ModelWrapper, rows: np.ndarray) -> None:
        """Store new integer rows so the graph's own quantizer reproduces them exactly."""
        rows = np.asarray(rows)
        if rows.dtype.kind in "iu":
            # the layout change (a transpose for MatMul) moves the narrowest integer type holding the rows: an
            # int8 layer moves 1 byte per weight, not 8 (write_mac_weights widens to int64 afterwards)
            rows = narrowest_integers(rows)
        write_mac_weights(model, self.source, self.layout.from_rows(rows))

    def row_weight_ranges(self, model: ModelWrapper) -> list[tuple[np.ndarray, IntRange]]:
        """Groups of rows ``(row indices, weights they may hold)``: one group unless a weight zero point is subtracted.

        Each channel's weights ``code - z`` stay in its storage range shifted by its own zero point z.
        Raises :class:`UnsupportedLayer` when a zero point varies along a row (per-input-channel zero points).
        """
        source = self.source
        if source.zero_offset is None:
            return [(np.arange(self.layout.rows), source.weight_range)]
        stored_shape = initializer_shape(model, source.tensor)
        offsets = self.layout.to_rows(apply_perms(np.broadcast_to(source.zero_offset, stored_shape), source.perms))
        # positions a row pads (a short last weight block) hold no weight and no zero point
        weights_at = self.layout.to_rows(apply_perms(np.ones(stored_shape, dtype=bool), source.perms))
        if self.layout.kind == "gather" or np.any((offsets != offsets[:, :1]) & weights_at):
            raise UnsupportedLayer(f"the weight zero point of layer '{self.node}' varies along its accumulation axis; "
                                   "project needs one zero point per output channel")
        groups = []
        for z in np.unique(offsets[:, 0]):
            lo, hi = source.storage_range.lo - int(z), source.storage_range.hi - int(z)
            groups.append((np.flatnonzero(offsets[:, 0] == z), IntRange(lo, hi)))
        return groups


# --------------------------------------------------------------------------- constants


def get_constant(model: ModelWrapper, name: str) -> np.ndarray | None:
    """Value of an initializer or a ``Constant`` node output, also through ``Identity`` nodes and exact integer
    ``Cast`` nodes, else ``None``.

    Why: PyTorch's TorchScript exporter shares equal constants through Identity nodes (the all-zero weight zero
    points of two layers of a QAT model: one initializer, the second layer's an Identity of it), and without
    constant folding casts each int32 zero point to its quantizer's int8/uint8 type.
    """
    value = initializer_value(model, name) if name else None
    producer = model.find_producer(name) if name and value is None else None
    if producer is None:
        return value
    if producer.op_type == "Constant":
        attr = next((a for a in producer.attribute if a.name == "value"), None)
        return None if attr is None else numpy_helper.to_array(attr.t)
    if producer.op_type == "Identity":
        return get_constant(model, producer.input[0])
    if producer.op_type == "Cast":
        value = get_constant(model, producer.input[0])
        target = helper.tensor_dtype_to_np_dtype(int(node_attr(producer, "to", 0))) if node_attr(producer, "to") else None
        if value is None or target is None or np.dtype(value.dtype).kind not in "iu" or np.dtype(target).kind not in "iu":
            return None
        info = np.iinfo(target)  # integers that fit convert exactly; ONNX leaves the others' result to the runtime
        return value.astype(target) if value.size == 0 or info.min <= value.min() and value.max() <= info.max else None
    return None


def node_attr(node: NodeProto, name: str, default=None):
    """Value of attribute ``name`` of an ONNX node, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def node_str_attr(node: NodeProto, name: str, default: str) -> str:
    """A string attribute, decoded."""
    value = node_attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _node_label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


# --------------------------------------------------------------------------- weights


def _require_constant(model: ModelWrapper, node: NodeProto, index: int, what: str) -> np.ndarray:
    value = get_constant(model, node.input[index]) if len(node.input) > index else None
    if value is None:
        raise UnsupportedLayer(
            f"{_node_label(node)} has a non-constant {what} ('{node.input[index] if len(node.input) > index else ''}'); "
            "fold constants first (e.g. `qonnx-cleanup`) so the weight quantizer is static"
        )
    return value


def _require_stored_weights(model: ModelWrapper, node: NodeProto, tensor: str) -> None:
    """Refuse weights that are constant but no initializer of their own (an ``Identity`` of another tensor):
    ``project`` rewrites weights by storing their initializer."""
    if initializer_proto(model, tensor) is None:
        raise UnsupportedLayer(f"{_node_label(node)} reads weights '{tensor}' computed from another constant, not "
                               "stored as an initializer of their own, so a2q cannot rewrite them; fold constants "
                               "first (e.g. `qonnx-cleanup` or onnxsim)")


def _int_dtype_name(bits: int, signed: bool) -> str:
    return f"{'INT' if signed else 'UINT'}{bits}"


def _quant_dtype(bits: int, signed: bool) -> str:
    if bits == 1:
        return "BIPOLAR" if signed else "BINARY"
    return _int_dtype_name(bits, signed)


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


def _storage_range(dtype: np.dtype) -> tuple[IntRange, str]:
    """Integer range and qonnx datatype name of a QDQ storage type (int4, uint8, int16, ...).

    onnx reads int4/uint4 tensors as ``ml_dtypes`` types, which ``np.iinfo`` rejects.
    """
    try:
        info = ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError) as err:
        raise UnsupportedLayer(f"QDQ storage type {np.dtype(dtype).name} is not an integer type") from err
    return IntRange(int(info.min), int(info.max)), _int_dtype_name(info.bits, info.min < 0)


def _skip_clips(model: ModelWrapper, tensor: str) -> tuple[str, list[NodeProto]]:
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
            raise UnsupportedLayer(f"{_node_label(clip)} gives its bounds as attributes (opset < 11, float only); "
                                   "an integer Clip takes them as inputs: re-export with opset >= 13")
        lo, hi = codes.lo, codes.hi
        limits = []
        for index in (1, 2):
            name = clip.input[index] if len(clip.input) > index else ""
            value = get_constant(model, name) if name else None
            if name and (value is None or np.size(value) != 1):
                raise UnsupportedLayer(f"{_node_label(clip)} has a non-constant or non-scalar bound '{name}'; "
                                       "fold constants first so the integer range is static")
            limits.append(None if value is None else float(np.asarray(value, dtype=np.float64).reshape(())))
        c_lo, c_hi = limits
        if any(v is not None and v != round(v) for v in limits):
            raise UnsupportedLayer(f"{_node_label(clip)} clips integer codes to non-integer bounds {limits}")
        if c_lo is not None and c_hi is not None and c_lo > c_hi:
            raise UnsupportedLayer(f"{_node_label(clip)} has min {c_lo} > max {c_hi}; fix the exported bounds")
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
        _require_constant(model, producer, 0, "weight input")
        _require_stored_weights(model, producer, producer.input[0])
        scale = _require_constant(model, producer, 1, "scale")
        zero_point = _require_constant(model, producer, 2, "zero point")
        bits = _require_constant(model, producer, 3, "bit width")
        if np.any(zero_point != 0):
            raise UnsupportedLayer(
                f"{_node_label(producer)} quantizes weights with a non-zero zero point, which a2q reads from "
                "DequantizeLinear only (FINN assumes symmetric QONNX weights too): re-export with a zero-point-free "
                "weight quantizer, or as QCDQ (Brevitas export_onnx_qcdq) and use --zero-point subtract"
            )
        bits = float(np.asarray(bits).reshape(-1)[0]) if np.size(bits) == 1 else None
        if bits is None or not np.isfinite(bits) or bits != int(bits) or bits < 1:
            # a bit width <= 0 makes qonnx clamp every weight to one value; non-integer widths clamp
            # to fractional limits: neither is a weight quantizer this tool reads
            raise UnsupportedLayer(f"{_node_label(producer)} has weight bit width "
                                   f"{'per channel' if bits is None else bits}; weights are read only with one "
                                   "integer bit width >= 1: re-export the weight quantizer with such a bit width")
        bits = int(bits)
        signed, narrow = bool(node_attr(producer, "signed", 1)), bool(node_attr(producer, "narrow", 0))
        if bits == 1 and signed:
            weight_range = BIPOLAR
        else:
            from qonnx.custom_op.general.intquant import max_int, min_int  # see quant_code_range

            weight_range = IntRange(int(min_int(signed, narrow, bits)), int(max_int(signed, narrow, bits)))
        return WeightSource(
            "quant", producer.input[0], producer.name, weight_range, _quant_dtype(bits, signed),
            scale=np.asarray(scale, dtype=np.float32), zero_point=np.asarray(zero_point, dtype=np.float32),
            rounding_mode=node_str_attr(producer, "rounding_mode", "ROUND"), perms=perms,
        )
    if op == "BipolarQuant":
        _require_constant(model, producer, 0, "weight input")
        _require_stored_weights(model, producer, producer.input[0])
        scale = _require_constant(model, producer, 1, "scale")
        return WeightSource("bipolar_quant", producer.input[0], producer.name, BIPOLAR, "BIPOLAR",
                            scale=np.asarray(scale, dtype=np.float32), perms=perms)
    if op == "DequantizeLinear":
        return _dequantize_linear_source(model, producer, perms, zero_point)
    if op == "FloatQuant":
        raise UnsupportedLayer(f"weights are produced by {_node_label(producer)}: minifloat weights multiply in floating "
                               "point, so the layer has no integer accumulator for a2q to bound")
    if op in ("Mul", "Div") and any(initializer_proto(model, t) is not None for t in producer.input):
        # qonnx's ExtractQuantScaleZeroPt writes Quant(w / s, 1, 0, b) * s: the codes a2q would rewrite lie behind a
        # rescaling it does not carry through project and verify
        raise UnsupportedLayer(f"weights are produced by {_node_label(producer)}, a rescaling after the weight "
                               "quantizer (as qonnx's ExtractQuantScaleZeroPt writes): a2q reads weights whose "
                               "quantizer (Quant, BipolarQuant, DequantizeLinear) feeds the layer directly or through "
                               "Transpose/Identity; run a2q on the model before that transformation")
    raise UnsupportedLayer(f"weights are produced by {_node_label(producer)}, which this tool does not read; a2q "
                           "reads weights from a quantizer (Quant, BipolarQuant, DequantizeLinear) or an integer "
                           "initializer, directly or through Transpose/Identity")


def _per_axis(value: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a per-axis QDQ parameter so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    value = np.asarray(value)
    if value.ndim == 0 or ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis % ndim] = value.size
    return value.reshape(shape)


def _storage_dtype(model: ModelWrapper, dq: NodeProto, data: int = 0, zero_point: int = 2) -> np.dtype | None:
    """The integer type a ``DequantizeLinear`` reads (int8, uint8, ...), or ``None`` if unknown; also that of
    the operand at input ``data`` of an integer MAC op, its zero point at input ``zero_point``.

    ONNX: the zero point's type if one is given, else the type of the ``x`` input itself (a
    ``QuantizeLinear`` without zero point outputs its ``output_dtype``, by default uint8).
    """
    zp = get_constant(model, dq.input[zero_point]) if len(dq.input) > zero_point and dq.input[zero_point] else None
    if zp is not None:
        return np.dtype(zp.dtype)
    codes, _ = _skip_clips(model, dq.input[data])  # a Clip keeps its input's type
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
    source.dtype = _dtype_for_range(source.weight_range)
    return source


def _dequantize_linear_source(model: ModelWrapper, dq: NodeProto, perms: list[list[int]],
                              convention: str = "fold") -> WeightSource:
    scale = _require_constant(model, dq, 1, "scale")
    block_size = int(node_attr(dq, "block_size", 0))
    zp = get_constant(model, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if len(dq.input) > 2 and dq.input[2] and zp is None:
        raise UnsupportedLayer(f"{_node_label(dq)} has a non-constant weight zero point; fold constants first")
    codes, clips = _skip_clips(model, dq.input[0])
    stored = get_constant(model, codes)
    quantize = model.find_producer(codes) if stored is None else None
    if stored is None and (quantize is None or quantize.op_type != "QuantizeLinear"):
        raise UnsupportedLayer(f"{_node_label(dq)} dequantizes a non-constant weight tensor")
    zp_dtype = _storage_dtype(model, dq)
    if quantize is not None:
        _require_constant(model, quantize, 0, "weight input")
    _require_stored_weights(model, dq if quantize is None else quantize, codes if quantize is None else quantize.input[0])
    if quantize is not None:
        q_zp = get_constant(model, quantize.input[2]) if len(quantize.input) > 2 and quantize.input[2] else None
        if not np.array_equal(np.zeros((), zp_dtype) if q_zp is None else q_zp, np.zeros((), zp_dtype) if zp is None else zp):
            # the codes QuantizeLinear writes are read with another zero point: no integer weight view
            raise UnsupportedLayer(f"{_node_label(dq)} dequantizes with a zero point other than its QuantizeLinear's")
    weight_range, dtype = _storage_range(zp_dtype)
    if clips:  # QCDQ: the Clip bounds are the weights' integer range (e.g. [-127, 127], or [-2, 1] for 2 bits)
        weight_range = clipped_range(model, weight_range, clips)
        if (zp is None or not np.any(zp != 0)) and not weight_range.lo <= 0 <= weight_range.hi:
            # weights are symmetric (zero point 0): a zero weight must stay representable, or the Clip
            # would turn every weight project shrinks to 0 back into a non-zero one
            raise UnsupportedLayer(
                f"{_node_label(clips[0])} clips the weight codes of {_node_label(dq)} to "
                f"[{weight_range.lo}, {weight_range.hi}], which excludes 0; a QCDQ weight Clip must keep 0 "
                "(Brevitas exports e.g. [-127, 127] or [-2, 1])")
        dtype = _dtype_for_range(weight_range)
    ndim = np.ndim(stored) if stored is not None else np.ndim(get_constant(model, quantize.input[0]))
    axis = int(node_attr(dq, "axis", 1))
    kind = "dequantize_linear" if quantize is None else "quantize_dequantize"
    tensor = codes if quantize is None else quantize.input[0]
    if block_size:
        if quantize is not None:
            raise UnsupportedLayer(f"{_node_label(dq)} dequantizes block-wise (block_size {block_size}) what a "
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
    return _zero_point_source(source, zero, convention, _node_label(dq))


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
        raise UnsupportedLayer(f"{_node_label(dq)} has a block-wise {what} of shape {list(value.shape)}; data of "
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
        raise UnsupportedLayer(f"{_node_label(node)} reads non-constant weights '{name}' (only an integer "
                               "initializer is read)")
    if np.dtype(stored.dtype).kind not in "iu":
        raise UnsupportedLayer(f"{_node_label(node)} reads weights '{name}' of type {stored.dtype}, not integers")
    storage, dtype = _storage_range(stored.dtype)
    zp_name = node.input[operands.weight_zero_point] if len(node.input) > operands.weight_zero_point else ""
    zp = get_constant(model, zp_name) if zp_name else np.zeros((), stored.dtype)
    if zp is None:
        raise UnsupportedLayer(f"{_node_label(node)} has a non-constant weight zero point '{zp_name}'")
    if np.size(zp) > 1:
        channel_axis = 0 if operands.mac_op == "Conv" or (operands.mac_op == "Gemm" and node_attr(node, "transB", 0)) else 1
        if stored.ndim < 2 or np.ndim(zp) != 1 or np.size(zp) != stored.shape[channel_axis]:
            raise UnsupportedLayer(f"{_node_label(node)} has a weight zero point of shape {list(np.shape(zp))}; "
                                   "only one per tensor or one per output channel is read")
        zp = _per_axis(np.asarray(zp), channel_axis, stored.ndim)
    else:
        zp = np.asarray(zp).reshape(())
    source = WeightSource("integer_operand", name, node.name, storage, dtype)
    return _zero_point_source(source, zp, convention, _node_label(node))


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


def _codes_as_stored(model: ModelWrapper, source: WeightSource) -> np.ndarray | None:
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
    # qonnx int_quant: round(clip(x / s + z)) - z with z == 0, in float32 like qonnx executes it
    from qonnx.custom_op.general.intquant import resolve_rounding_mode  # see quant_code_range

    y = stored.astype(np.float32, copy=False) / source.scale.astype(np.float32)
    y = np.clip(y, source.weight_range.lo, source.weight_range.hi, out=y)
    return resolve_rounding_mode(source.rounding_mode)(y).astype(np.int64)


# weight sources whose stored values are real (weight / scale need not be an integer): the others store integers
_UNROUNDED_KINDS = ("quant", "quantize_dequantize")


def unrounded_mac_weights(model: ModelWrapper, source: WeightSource) -> np.ndarray:
    """The weights in integer units before rounding (float weight / scale), in the MAC node's layout.

    Sources that store integers (FINN initializers, ``DequantizeLinear``) return those integers.
    """
    if source.kind in _UNROUNDED_KINDS:
        stored = initializer_value(model, source.tensor).astype(np.float64)
        unrounded = stored / source.scale.astype(np.float64)
        if source.kind == "quantize_dequantize" and source.zero_offset is None:
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
    mode = source.rounding_mode.upper()
    offset = _ROUNDING_OFFSET.get(mode, 0.0)
    if mode in ("UP", "DOWN", "HALF_UP", "HALF_DOWN"):
        offset = np.sign(q_stored) * (0.5 if mode == "DOWN" else -0.5 if mode == "UP" else 0.0)
    return ((q_stored + offset) * source.scale.astype(np.float64)).astype(np.float32)


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
    written = _codes_as_stored(model, source)
    if not np.array_equal(read_stored_integers(model, source) if written is None else written, expected):
        raise AssertionError(f"quantizer of '{source.tensor}' does not reproduce the written integers")


# --------------------------------------------------------------------------- input grids


def _dtype_grid(name: str, scale: float | None = None) -> InputGrid:
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
    return _dtype_for_range(codes)


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

    def resolve(self, tensor: str) -> tuple[InputGrid | None, str]:
        """``(grid, "")`` or ``(None, reason)``."""
        if tensor not in self._cache:
            self._cache[tensor] = self._resolve(tensor)
        return self._cache[tensor]

    def _resolve(self, tensor: str) -> tuple[InputGrid | None, str]:
        if tensor in self.input_dtypes:
            return _dtype_grid(self.input_dtypes[tensor]), ""
        if tensor in self.graph_inputs and "*" in self.input_dtypes:
            return _dtype_grid(self.input_dtypes["*"]), ""
        dt = self.model.get_tensor_datatype(tensor)
        annotated = dt.is_integer() and not dt.name.startswith("SCALED")
        producer = self.model.find_producer(tensor)
        if producer is not None and producer.op_type in SEMANTICS_FIRST_OPS:
            # FINN's out_dtype/annotations on these can disagree with what executes (ConvertQONNXtoFINN
            # writes INT8 on a MultiThreshold counting 0..255): their semantics come first
            grid, reason = getattr(self, f"_from_{producer.op_type}")(producer)
            if grid is not None and annotated and self.finn_ranges:
                # FINN sizes the MAC from the tensor's DataType; the codes that execute stay inside the union
                return _widened(grid, _dtype_grid(dt.name).range, dt.name), ""
            if grid is not None or not annotated:
                return grid, reason
        if annotated:
            return _dtype_grid(dt.name, 1.0), ""
        if producer is None:
            return None, f"graph input '{tensor}' is float (give its datatype with --input-dtype)"
        handler = getattr(self, f"_from_{producer.op_type}", None)
        if handler is not None:
            return handler(producer)
        if producer.op_type in GRID_PRESERVING_OPS:
            return self.resolve(producer.input[0])
        return None, f"input comes from {_node_label(producer)}, which is not on an integer grid"

    def _from_Quant(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        scale = _scalar_constant(self.model, node.input[1])
        zp = _scalar_constant(self.model, node.input[2])
        bits = _scalar_constant(self.model, node.input[3])
        if scale is None or zp is None or bits is None:
            return None, (f"{_node_label(node)} has a non-constant or per-channel scale/zero point/bit width; "
                          "the accumulator needs one per-tensor input scale")
        signed, narrow = bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0))
        if zp != round(zp):
            return None, f"{_node_label(node)} has a non-integer zero point {zp}"
        if not np.isfinite(bits) or bits < 1:
            return None, f"{_node_label(node)} has bit width {bits}; a quantizer needs a bit width >= 1"
        if bits == 1 and signed:  # qonnx executes it as bipolar: codes {-1, +1}, real (code - z) * s
            return self._with_zero_point(BIPOLAR, "BIPOLAR", scale, int(zp)), ""
        try:
            codes = quant_code_range(bits, signed, narrow, node_str_attr(node, "rounding_mode", "ROUND"))
        except ValueError as err:
            return None, f"{_node_label(node)}: {err}"
        dtype = _quant_dtype(int(bits), signed) if bits == int(bits) else _dtype_for_range(codes)
        if self.finn_ranges:
            codes, dtype, reason = self._finn_codes(node, codes, bits, signed)
            if codes is None:
                return None, reason
        return self._with_zero_point(codes, dtype, scale, int(zp)), ""

    def _finn_codes(self, node: NodeProto, codes: IntRange, bits: float, signed: bool) -> tuple[IntRange | None, str, str]:
        """The codes FINN's MAC is sized for: ``codes`` joined with the DataType ConvertQONNXtoFINN gives them.

        FINN (qonnx ``Quant.get_integer_datatype``) annotates ``INT{b}``/``UINT{b}`` for an integer bit
        width b, whatever ``narrow`` says: narrow codes grow by the one code FINN's type adds. A
        fractional bit width is truncated there to a type narrower than the codes: refused.
        """
        if bits != int(bits):
            return None, "", (f"{_node_label(node)} has bit width {bits}: FINN's conversion annotates its output "
                              f"{_quant_dtype(int(bits), signed)}, narrower than its codes [{codes.lo}, {codes.hi}]; "
                              "re-export with an integer bit width, or use --input-ranges exact")
        dtype = _quant_dtype(int(bits), signed)
        return _hull(codes, _dtype_grid(dtype).range), dtype, ""

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
        if scale is None:
            return None, f"{_node_label(node)} has a per-channel or non-constant activation scale"
        has_zp = len(node.input) > 2 and bool(node.input[2])
        zp_value = get_constant(self.model, node.input[2]) if has_zp else None
        if has_zp and (zp_value is None or np.size(zp_value) != 1):
            return None, f"{_node_label(node)} has a per-channel or non-constant activation zero point"
        storage = _storage_dtype(self.model, node)
        if storage is None:
            return None, (f"{_node_label(node)} has no zero point and the type of '{node.input[0]}' is unknown; "
                          "run shape inference or give the zero point explicitly")
        try:
            codes, dtype = _storage_range(storage)
            clips = _skip_clips(self.model, node.input[0])[1]
            if clips:  # QCDQ: a Clip narrows the container (uint8 clipped to [0, 3] is a 2-bit activation)
                codes = clipped_range(self.model, codes, clips)
                dtype = _dtype_for_range(codes)
                if self.finn_ranges:
                    dtype = _qcdq_finn_dtype(codes, storage, node)
                    codes = _hull(codes, _dtype_grid(dtype).range)
        except UnsupportedLayer as err:
            return None, str(err)
        zp = int(np.asarray(zp_value).reshape(-1)[0]) if zp_value is not None else 0
        return self._with_zero_point(codes, dtype, scale, zp), ""

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
        storage = _storage_dtype(self.model, node, data, zp_index)
        if storage is None:
            return None, (f"{_node_label(node)}: the type of its integer input '{node.input[data]}' is unknown; "
                          "give its zero point or run shape inference")
        try:
            codes, dtype = _storage_range(storage)
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
                return None, f"{_node_label(node)} has a non-constant input zero point '{zp_name}' not computed by DynamicQuantizeLinear"
            return self._dynamic_codes(codes), ""
        if np.size(zp) != 1:
            return None, f"{_node_label(node)} has a per-channel input zero point"
        return self._with_zero_point(codes, dtype, scale, int(np.asarray(zp).reshape(-1)[0])), ""

    def _dynamic_codes(self, codes: IntRange) -> InputGrid:
        """Codes whose zero point z is computed at each run (any code): the raw codes (fold), or ``code - z``
        anywhere in ``[lo - hi, hi - lo]`` (subtract)."""
        if self.zero_point == "subtract":
            span = IntRange(codes.lo - codes.hi, codes.hi - codes.lo)
            return InputGrid(span, _dtype_for_range(span), None, 0)
        return InputGrid(codes, _dtype_for_range(codes), None, codes.lo)  # the padding code z lies among the codes

    def _from_MultiThreshold(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx: ``out_scale * k + out_bias`` with ``k`` in ``0..T`` (the count of thresholds passed)."""
        thresholds = get_constant(self.model, node.input[1])
        if thresholds is None:
            return None, f"{_node_label(node)} has non-constant thresholds"
        out_scale = float(node_attr(node, "out_scale", 1.0))
        out_bias = float(node_attr(node, "out_bias", 0.0))
        if out_scale == 0 or not np.isfinite(out_scale) or not np.isfinite(out_bias):
            return None, f"{_node_label(node)} has out_scale {out_scale}, out_bias {out_bias}"
        steps = int(thresholds.shape[-1])
        counts = IntRange(0, steps)
        grid = InputGrid(counts, _dtype_for_range(counts), out_scale, 0, steps <= 1)
        grid, reason = _offset_grid(grid, out_bias, _node_label(node))
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
                    return None, f"{_node_label(node)} adds {offset}"
                return _offset_grid(grid, -offset if subtract else offset, _node_label(node))
        return None, f"input comes from {_node_label(node)}, which does not add a per-tensor constant to one input"

    def _from_Trunc(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx Trunc v2 (opset >= 2, 6 inputs) clamps to the output bit width's codes, then rounds."""
        opset = self.model.get_opset_imports().get(node.domain, 1)
        if opset < 2 or len(node.input) != 6:
            return None, (f"{_node_label(node)} runs as qonnx Trunc v{1 if opset < 2 else 2} with {len(node.input)} inputs; "
                          "only Trunc v2 (6 inputs, clamped to its output bit width) has input-independent codes")
        values = [_scalar_constant(self.model, name) for name in node.input[1:]]
        if any(v is None for v in values):
            return None, f"{_node_label(node)} has a non-constant or per-channel scale/zero point/bit width"
        scale, zp, _, out_scale, out_bits = values
        if scale == 0 or out_scale == 0 or not np.isfinite(out_bits) or out_bits < 1 or out_bits != round(out_bits):
            return None, f"{_node_label(node)} has scale {scale}, output scale {out_scale}, output bit width {out_bits}"
        trunc_scale = 2.0 ** round(float(np.log2(out_scale / scale)))
        zero = zp / trunc_scale
        if zero != round(zero):
            return None, f"{_node_label(node)} has an output zero point {zero}, not an integer code"
        signed, narrow = bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0))
        try:
            codes = quant_code_range(out_bits, signed, narrow, node_str_attr(node, "rounding_mode", "FLOOR"))
        except ValueError as err:
            return None, f"{_node_label(node)}: {err}"
        dtype = _dtype_for_range(codes)
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
            return None, f"{_node_label(node)} follows a quantizer with scale 0"
        return InputGrid(codes, grid.dtype, grid.scale, z), ""

    def _from_Pad(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        mode = node_str_attr(node, "mode", "constant")
        value = _scalar_constant(self.model, node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        if mode != "constant" or value != 0.0:
            return None, f"{_node_label(node)} pads with mode={mode}, value={value}; only zero padding keeps the grid"
        grid, reason = self.resolve(node.input[0])
        if grid is None:
            return None, reason
        return _with_zero_tap(grid), ""

    def _from_Im2Col(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """qonnx's Im2Col (FINN's lowered convolutions) only moves values, padding with ``pad_value`` (real 0)."""
        value = float(node_attr(node, "pad_value", 0))
        if value != 0.0:
            return None, f"{_node_label(node)} pads with {value}; only zero padding keeps the grid"
        grid, reason = self.resolve(node.input[0])
        if grid is None:
            return None, reason
        return (_with_zero_tap(grid) if any(node_attr(node, "pad_amount", [0])) else grid), ""

    def _from_Resize(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        if node_str_attr(node, "mode", "nearest") != "nearest":
            return None, f"{_node_label(node)} interpolates (mode={node_str_attr(node, 'mode', '')}); only nearest keeps the grid"
        return self.resolve(node.input[0])

    _from_Upsample = _from_Resize

    def _from_Mul(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._scaled(node, invert=False)

    def _from_ElementwiseMul(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        """FINN's HW layer for ``Mul`` (convert_to_hw): the same scaling."""
        return self._from_Mul(node)

    def _from_Div(self, node: NodeProto) -> tuple[InputGrid | None, str]:
        return self._scaled(node, invert=True)

    def _scaled(self, node: NodeProto, invert: bool) -> tuple[InputGrid | None, str]:
        """Multiplying by a positive per-tensor constant keeps the codes and changes the scale."""
        for data, const in ((0, 1), (1, 0)) if not invert else ((0, 1),):
            factor = _scalar_constant(self.model, node.input[const])
            if factor is not None and factor > 0 and get_constant(self.model, node.input[data]) is None:
                grid, reason = self.resolve(node.input[data])
                if grid is None:
                    return None, reason
                scale = None if grid.scale is None else (grid.scale / factor if invert else grid.scale * factor)
                return InputGrid(grid.range, grid.dtype, scale, grid.zero_code, grid.two_point), ""
        return None, f"input comes from {_node_label(node)}, which is not a per-tensor positive rescaling"

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
                return None, f"{_node_label(node)} joins inputs on different integer grids (scales or zero points differ)"
        r = IntRange(min(g.range.lo for g in grids), max(g.range.hi for g in grids))
        dtype = first.dtype if all(g.dtype == first.dtype for g in grids) else _dtype_for_range(r)
        return InputGrid(r, dtype, first.scale, first.zero_code), ""


def _dtype_for_range(r: IntRange) -> str:
    return _int_dtype_name(*integer_format(r))


def _hull(a: IntRange, b: IntRange) -> IntRange:
    return IntRange(min(a.lo, b.lo), max(a.hi, b.hi))


def _widened(grid: InputGrid, codes: IntRange, dtype: str) -> InputGrid:
    """``grid`` with its codes joined with ``codes`` (a DataType's range, named ``dtype``)."""
    joined = _hull(grid.range, codes)
    if joined == grid.range:
        return grid
    return InputGrid(joined, dtype, grid.scale, grid.zero_code, False)


def _qcdq_finn_dtype(codes: IntRange, storage: np.dtype, node: NodeProto) -> str:
    """The DataType FINN gives a QCDQ activation after qonnx's ``QCDQToQuant`` (FINN reads no QDQ).

    ``QCDQToQuant`` makes a Quant of ``ceil(log2(hi - lo + 1))`` bits, signed as the container,
    from a Clip ``[lo, hi]`` with ``lo <= 0 < hi`` (it refuses any other Clip).
    """
    if not codes.lo <= 0 < codes.hi:
        raise UnsupportedLayer(f"the Clip in front of {_node_label(node)} keeps codes [{codes.lo}, {codes.hi}]; "
                               "qonnx's QCDQToQuant (the way to FINN) needs lo <= 0 < hi: use --input-ranges exact")
    bits = (codes.hi - codes.lo).bit_length()  # ceil(log2(n)) for n = hi - lo + 1 >= 2, in integers
    return _quant_dtype(bits, _storage_range(storage)[0].lo < 0)


# --------------------------------------------------------------------------- layouts


def _conv_transpose_layout(model: ModelWrapper, node: NodeProto, shape: tuple[int, ...]) -> RowLayout:
    """One row per (output channel, stride phase): the taps that reach one output pixel (any number of spatial
    dimensions: 1-D, 2-D, 3-D)."""
    c_in, c_out_g, *kernel = shape
    n = len(kernel)
    groups = int(node_attr(node, "group", 1))
    strides = list(node_attr(node, "strides", [1] * n))
    dilations = list(node_attr(node, "dilations", [1] * n))
    c_in_g = c_in // groups
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    rows, row_channel = [], []
    for co in range(c_out_g * groups):
        g, local = divmod(co, c_out_g)
        block = idx[g * c_in_g:(g + 1) * c_in_g, local]  # (c_in_g, *kernel)
        for phase in itertools.product(*(range(s) for s in strides)):
            taps = block
            for axis, (k, s, d, p) in enumerate(zip(kernel, strides, dilations, phase), start=1):
                taps = np.take(taps, [i for i in range(k) if (i * d) % s == p], axis=axis)
            rows.append(taps.reshape(-1))
            row_channel.append(co)
    k = max(len(r) for r in rows)
    index = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        index[i, :len(r)] = r
    return RowLayout("gather", shape, index, np.asarray(row_channel))


def _layout_for(model: ModelWrapper, node: NodeProto, shape: tuple[int, ...], op: str | None = None) -> tuple[RowLayout, int, int]:
    """Row layout, K and channel count of a MAC node with weight shape ``shape`` (laid out as op ``op``)."""
    op = op or node.op_type
    if op == "Conv" or op in VVAU_OP_TYPES:
        return RowLayout("reshape", shape), int(np.prod(shape[1:])), shape[0]
    if op == "ConvTranspose":
        layout = _conv_transpose_layout(model, node, shape)
        return layout, layout.index.shape[1], shape[1] * int(node_attr(node, "group", 1))
    if len(shape) != 2:
        raise UnsupportedLayer(f"{_node_label(node)} has a {len(shape)}-D weight; only 2-D weights are supported")
    if op == "Gemm" and node_attr(node, "transB", 0):
        return RowLayout("identity", shape), shape[1], shape[0]
    return RowLayout("transpose", shape), shape[0], shape[1]


# --------------------------------------------------------------------------- discovery


def _mac_weight_index(model: ModelWrapper, node: NodeProto) -> int | None:
    if node.op_type == "Gemm" and node_attr(node, "transA", 0):
        return None
    return 1


def computed_from_constants(model: ModelWrapper, tensor: str, known: dict[str, bool] | None = None) -> bool:
    """Whether ``tensor`` depends on initializers and ``Constant`` nodes only (no graph input).

    ``known``: the answers for tensors of the same graph from earlier calls, extended here. Every layer of a deep
    graph asks about its activation, whose walk back reaches the graph input: without the shared answers each
    walk repeats the earlier ones (quadratic in depth: 0.25 s of ``analyze`` on a 32-layer transformer).
    """
    known = {} if known is None else known
    stack, expanded = [tensor], set()
    while stack:
        name = stack[-1]
        if name in known:
            stack.pop()
        elif not name or initializer_proto(model, name) is not None:
            known[name] = True
            stack.pop()
        elif (producer := model.find_producer(name)) is None:
            known[name] = False
            stack.pop()
        elif name not in expanded:  # first its inputs, then itself
            expanded.add(name)
            stack.extend(producer.input)
        else:
            known[name] = all(known.get(source, True) for source in producer.input)  # absent: a cycle, as before
            stack.pop()
    return known[tensor]


def find_mac_layers(
    model: ModelWrapper,
    input_dtypes: dict[str, str] | None = None,
    zero_point: str = "fold",
    input_ranges: str = "exact",
) -> list[MacLayer]:
    """Every MAC node of the graph in graph order, with its status.

    Layers whose weights are float are reported with status ``weights not quantized``;
    layers whose weights are quantized in a way this tool cannot read get
    ``unsupported: <reason>``. Never raises for a single layer. ``input_ranges``: see
    :data:`INPUT_RANGES` (FINN MVAU/VVAU nodes are read at their ``inputDataType`` either way).
    """
    resolver = GridResolver(model, input_dtypes, zero_point, input_ranges)
    layers = []
    for node in model.graph.node:
        if _multiplies_activations(model, node, resolver):
            read = _act_x_act_layer
        elif node.op_type in MAC_OP_TYPES:
            read = _standard_layer
        elif is_integer_mac(node):
            read = _integer_op_layer
        elif node.op_type in MVAU_OP_TYPES or node.op_type in VVAU_OP_TYPES:
            read = _finn_layer
        elif unread_mac(node):
            read = _unread_layer
        elif node.op_type == "StreamingDataflowPartition":
            read = _partition_layer
        else:
            layers.extend(_subgraph_layers(model, node, resolver))
            continue
        try:
            layer = read(model, node, resolver)
            if layer is not None:
                layers.append(layer)
        except Exception as err:  # a malformed layer is reported, it never stops the analysis of the others
            layers.append(MacLayer(node.name or node.output[0], node.op_type, node.input[0], 0, 0,
                                   f"unsupported: could not read this layer ({type(err).__name__}: {err})"))
    return layers


def _multiplies_activations(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> bool:
    """A MatMul (float, or QLinearMatMul/MatMulInteger) whose second operand is computed at run time."""
    if node.op_type == "MatMul":
        second = node.input[1]
    elif is_integer_mac(node) and INTEGER_MAC_OPS[node.op_type].mac_op == "MatMul":
        second = node.input[INTEGER_MAC_OPS[node.op_type].weight]
    else:
        return False
    return not computed_from_constants(model, second, resolver.constants)


def _standard_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer:
    name = node.name or node.output[0]
    if (node.op_type == "Gemm" and computed_from_constants(model, node.input[0], resolver.constants)
            and not computed_from_constants(model, node.input[1], resolver.constants)):
        return MacLayer(name, node.op_type, node.input[1], 0, 0,
                        "unsupported: constant first operand times an activation (Gemm W @ X); only X @ W with "
                        "constant W is read (W X is the transpose of Gemm(X^T, W, transB=1): export it that way)")
    index = _mac_weight_index(model, node)
    if index is None:
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        "unsupported: transposed or non-constant left operand (only X @ W with constant W)")
    try:
        source = resolve_weight_source(model, node.input[index], zero_point=resolver.zero_point)
        if source is None:
            w = get_constant(model, node.input[index])
            K, channels = (_layout_for(model, node, w.shape)[1:] if w is not None else (0, 0))
            return MacLayer(name, node.op_type, node.input[0], K, channels, STATUS_WEIGHTS_NOT_QUANTIZED)
        shape = mac_weight_shape(source, initializer_shape(model, source.tensor))  # the values are read once, later
        layout, K, channels = _layout_for(model, node, shape)
        if source.block_size:
            layout, K = _block_layout(model, node, source, layout, K)
        else:
            _check_scale_per_output_channel(node, source, len(shape))
    except UnsupportedLayer as err:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    grid, reason = resolver.resolve(node.input[0])
    if grid is not None and node.op_type == "ConvTranspose" and grid.zero_code != 0:
        # a border output sums fewer taps: the missing ones add real 0, which under fold is neither
        # a code the hardware sums (as padding would be) nor nothing; do not guess
        return MacLayer(name, node.op_type, node.input[0], K, channels,
                        f"unsupported: ConvTranspose on codes with zero point {grid.zero_code} under --zero-point "
                        "fold (border outputs sum fewer taps); use --zero-point subtract", None, source, layout)
    if grid is not None and _reads_implicit_zeros(node):
        grid = _with_zero_tap(grid)
    status = STATUS_OK if grid is not None else STATUS_INPUT_NOT_QUANTIZED
    layer = MacLayer(name, node.op_type, node.input[0], K, channels, status, grid, source, layout)
    if grid is None:
        layer.status = f"{STATUS_INPUT_NOT_QUANTIZED}: {reason}"
    return layer


def _check_scale_per_output_channel(node: NodeProto, source: WeightSource, ndim: int) -> None:
    """Refuse weights whose scale varies along an axis the MAC sums over (e.g. onnxruntime's per-channel axis set to
    a MatMul's K): their products, each in its own step, are no single integer accumulation. Block-wise scales
    (each block its own accumulator) are read by :func:`_block_layout` instead."""
    if source.scale is None or np.size(source.scale) <= 1:
        return
    scale = np.asarray(source.scale)
    if scale.ndim != ndim:  # broadcast from the trailing axes of the stored weights (same rank as the MAC's)
        scale = scale.reshape((1,) * (ndim - scale.ndim) + scale.shape)
    scale = apply_perms(scale, source.perms)  # to the MAC's weight axes
    channel_axis = {"MatMul": ndim - 1, "ConvTranspose": 1}.get(node.op_type, 0)
    if node.op_type == "Gemm" and not node_attr(node, "transB", 0):
        channel_axis = 1
    for axis, size in enumerate(scale.shape):
        if axis != channel_axis and size > 1 and np.ptp(scale, axis=axis).max() > 0:
            raise UnsupportedLayer(f"the weight scale of {_node_label(node)} varies along axis {axis} of its "
                                   "weights, which the MAC sums over: its products are no single integer "
                                   "accumulation; quantize the weights per output channel or per tensor")


def _block_layout(model: ModelWrapper, node: NodeProto, source: WeightSource, layout: RowLayout,
                  K: int) -> tuple[RowLayout | BlockRowLayout, int]:
    """The row layout and K of a layer whose weights are dequantized block-wise (see :class:`BlockRowLayout`).

    Blocks that never split a row (e.g. along the output channels) leave one scale per row: an ordinary
    layer. Blocks along the accumulation axis must cut every row into consecutive runs of equal length
    (the last may be shorter): the K-tiles in the order ``verify --tile`` uses. Anything else is refused.
    """
    shape = initializer_shape(model, source.tensor)
    # which scale entry each weight uses: its index, divided by block_size along the block axis
    index = list(np.ogrid[tuple(slice(d) for d in shape)])
    index[source.block_axis] = index[source.block_axis] // source.block_size
    entries = tuple(-(-d // source.block_size) if i == source.block_axis else d for i, d in enumerate(shape))
    row_ids = layout.to_rows(apply_perms(np.ravel_multi_index(index, entries), source.perms))
    if np.all(row_ids == row_ids[:, :1]):
        return layout, K
    if layout.kind not in ("transpose", "identity"):
        raise UnsupportedLayer(f"the block-wise weight scales of {_node_label(node)} split its accumulation; "
                               "that is read for MatMul and Gemm weights only")
    run = int(np.argmax(row_ids[0] != row_ids[0, 0]))
    same_as_previous = row_ids[:, 1:] == row_ids[:, :-1]
    if not np.array_equal(same_as_previous, np.broadcast_to(np.arange(1, K) % run != 0, same_as_previous.shape)):
        raise UnsupportedLayer(f"the block-wise weight scales of {_node_label(node)} do not cut each accumulation "
                               "into consecutive blocks sharing one scale; quantize the weights in blocks along the "
                               "input axis (K)")
    return BlockRowLayout(layout, run, K), run


def _act_x_act_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer:
    """A MatMul whose second operand is computed at run time: both operands must be quantized activations;
    also a QLinearMatMul/MatMulInteger of two integer activations (each operand's codes from its own type and
    zero point)."""
    integer = is_integer_mac(node)
    name, a = node.name or node.output[0], node.input[0]
    b = node.input[INTEGER_MAC_OPS[node.op_type].weight] if integer else node.input[1]

    def layer(status: str, K: int = 0, grid: InputGrid | None = None, operand: InputGrid | None = None) -> MacLayer:
        return MacLayer(name, node.op_type, a, K, 1 if K else 0, status, grid, kind=KIND_ACT_X_ACT, operand_grid=operand)

    if computed_from_constants(model, a, resolver.constants):
        return layer("unsupported: constant left operand times an activation (W @ X); only X @ W with constant W "
                     "or a product of two activations is read")
    shape_a, shape_b = resolver.shape(a), resolver.shape(b)
    if not shape_a or not shape_a[-1]:
        return layer(f"unsupported: the shape of '{a}' is unknown; run shape inference (e.g. `qonnx-cleanup`) "
                     "so the length K of the summed dimension is known")
    K = int(shape_a[-1])
    if shape_b and len(shape_b) >= 1 and shape_b[-2 if len(shape_b) > 1 else 0] not in (K, 0):
        return layer(f"unsupported: operand shapes {list(shape_a)} and {list(shape_b)} do not multiply")
    grid, reason = resolver.integer_operand(node) if integer else resolver.resolve(a)
    if grid is None:
        return layer(f"{STATUS_INPUT_NOT_QUANTIZED}: first operand: {reason}", K)
    operand, reason = resolver.integer_operand(node, second=True) if integer else resolver.resolve(b)
    if operand is None:
        return layer(f"{STATUS_INPUT_NOT_QUANTIZED}: second operand: {reason}", K, grid)
    return layer(STATUS_OK, K, grid, operand)


def _integer_op_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer:
    """A QLinearConv/QLinearMatMul/QGemm/ConvInteger/MatMulInteger node: integer operands, zero points as inputs."""
    name = node.name or node.output[0]
    mac_op = INTEGER_MAC_OPS[node.op_type].mac_op
    if mac_op == "Gemm" and node_attr(node, "transA", 0):
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        "unsupported: transposed left operand (transA); only X @ W with constant W")
    try:
        source = integer_operand_source(model, node, resolver.zero_point)
        layout, K, channels = _layout_for(model, node, initializer_shape(model, source.tensor), mac_op)
    except UnsupportedLayer as err:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    grid, reason = resolver.integer_operand(node)
    if grid is None:
        return MacLayer(name, node.op_type, node.input[0], K, channels, f"{STATUS_INPUT_NOT_QUANTIZED}: {reason}",
                        None, source, layout)
    if _reads_implicit_zeros(node, mac_op):
        grid = _with_zero_tap(grid)  # ONNX pads the zero-point-subtracted input with 0: real 0, code z
    return MacLayer(name, node.op_type, node.input[0], K, channels, STATUS_OK, grid, source, layout)


def _unread_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer | None:
    """A MAC of :data:`UNREAD_MACS` as an unsupported layer; ``None`` for a float one with constant float weights
    and a float input (no integer accumulator to check). A float one of two activations is always a layer, as a
    MatMul of two activations is (whether its operands are on an integer grid is not known)."""
    on_integers, hint = unread_mac(node)
    quantized = [name for name in node.input if name and _is_quantized(model, name, resolver)]
    weights = len(node.input) > 1 and computed_from_constants(model, node.input[1], resolver.constants)
    if not on_integers and not quantized and weights:
        return None
    operands = f" on quantized {', '.join(repr(n) for n in quantized)}" if quantized and not on_integers else ""
    return MacLayer(node.name or node.output[0], node.op_type, node.input[0], 0, 0,
                    f"unsupported: {node.domain or 'ONNX'} {node.op_type}{operands} is a MAC a2q does not read "
                    f"({hint})")


def _partition_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer:
    """A FINN dataflow partition (``step_create_dataflow_partition``): its layers live in another model file, which
    this graph does not hold; the partition is reported, never passed over."""
    child = node_str_attr(node, "model", "")
    return MacLayer(node.name or node.output[0], node.op_type, node.input[0] if node.input else "", 0, 0,
                    f"unsupported: a FINN dataflow partition; its MVAU/VVAU layers are in the model file '{child}', "
                    "which is not read from here: run a2q on that file")


# ops whose presence in a subgraph makes its MACs quantized ones
_QUANTIZERS = (*QUANT_OP_TYPES, "BipolarQuant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
               "MultiThreshold", "Trunc")


def _subgraph_layers(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> list[MacLayer]:
    """The MACs inside ``node``'s subgraphs (If branches, Loop and Scan bodies), each an unsupported layer.

    Only the main graph is read. A subgraph's MAC is reported where the subgraph quantizes something, holds an
    integer MAC, or reads a quantized tensor of the main graph; a float-only subgraph has no integer accumulator.
    """
    reported = []
    for attribute in node.attribute:
        for graph in _attribute_graphs(attribute):
            inner = list(_nodes_within(graph))
            produced = {t for n in inner for t in n.output} | {t.name for t in graph.input} | \
                {t.name for t in graph.initializer}
            outer = {t for n in inner for t in n.input if t and t not in produced}
            quantized = any(n.op_type in _QUANTIZERS or is_integer_mac(n) for n in inner) or \
                any(_is_quantized(model, t, resolver) for t in sorted(outer) if model.find_producer(t) is not None
                    or t in resolver.graph_inputs)
            if not quantized:
                continue
            where = f"in the '{attribute.name}' subgraph of {_node_label(node)}"
            reported += [MacLayer(n.name or n.output[0], n.op_type, n.input[0] if n.input else "", 0, 0,
                                  f"unsupported: {where}; a2q reads the MAC layers of the main graph only (inline or "
                                  "unroll the subgraph, e.g. fold a constant If condition)")
                         for n in inner if n.op_type in MAC_OP_TYPES + MVAU_OP_TYPES + VVAU_OP_TYPES
                         or is_integer_mac(n) or unread_mac(n)]
    return reported


def _attribute_graphs(attribute: AttributeProto) -> list[GraphProto]:
    """The subgraphs an attribute holds (an If branch, a Loop or Scan body), none for any other attribute."""
    if attribute.type == AttributeProto.GRAPH:
        return [attribute.g]
    return list(attribute.graphs) if attribute.type == AttributeProto.GRAPHS else []


def _nodes_within(graph: GraphProto):
    """Every node of ``graph``, those of its nested subgraphs included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in _attribute_graphs(attribute):
                yield from _nodes_within(sub)


def _is_quantized(model: ModelWrapper, tensor: str, resolver: GridResolver) -> bool:
    """Whether ``tensor`` is quantized weights or a quantized activation; unreadable quantization counts."""
    try:
        if computed_from_constants(model, tensor, resolver.constants):
            return resolve_weight_source(model, tensor, zero_point=resolver.zero_point) is not None
    except UnsupportedLayer:
        return True
    return resolver.resolve(tensor)[0] is not None


def _reads_implicit_zeros(node: NodeProto, op: str | None = None) -> bool:
    """Whether some accumulator of this node sums taps that are not input pixels but real zeros.

    A Conv with non-zero ``pads`` or ``auto_pad`` SAME_* pads its input with 0.0; a ConvTranspose
    output pixel near the border receives fewer input pixels than its row of taps holds.
    """
    op = op or node.op_type
    if op == "ConvTranspose":
        return True
    if op != "Conv":
        return False
    auto_pad = node_str_attr(node, "auto_pad", "NOTSET")
    return auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(int(p) != 0 for p in node_attr(node, "pads", []))


def _with_zero_tap(grid: InputGrid) -> InputGrid:
    """The grid with the code of real 0 added to its range: a padded tap holds ``zero_code``.

    Under ``fold`` that is the zero point z (real 0 = code z), under ``subtract`` 0; either may lie
    outside the quantizer's codes (e.g. UINT4 with z = 30, or codes behind a Relu).
    """
    r = IntRange(min(grid.range.lo, grid.zero_code), max(grid.range.hi, grid.zero_code))
    return InputGrid(r, grid.dtype, grid.scale, grid.zero_code)


def _finn_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver | None = None) -> MacLayer:
    name = node.name or node.output[0]
    weights = initializer_value(model, node.input[1])
    idt, wdt = node_str_attr(node, "inputDataType", ""), node_str_attr(node, "weightDataType", "")
    xnor = bool(node_attr(node, "binaryXnorMode", 0))
    if weights is None:
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        "unsupported: weights are not an initializer (runtime-writeable or external weights)")
    try:
        wdtype = DataType[wdt]
        grid = _dtype_grid(idt, 1.0)
    except KeyError:
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        f"unsupported: unknown inputDataType/weightDataType '{idt}'/'{wdt}'")
    try:
        check_integer_values(weights, DataType["BINARY"] if xnor else wdtype, f"weights of {_node_label(node)}")
    except UnsupportedLayer as err:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    # MVAU weights are (MW, MH); VVAU weights are (Channels, 1, kh, kw): both map to rows by _layout_for
    layout, K, channels = _layout_for(model, node, tuple(weights.shape))
    wrange = BINARY if xnor else IntRange(int(wdtype.min()), int(wdtype.max()))
    source = WeightSource("initializer", node.input[1], None, wrange, wdt)
    if xnor:
        grid = InputGrid(BINARY, "BINARY", 1.0)
    return MacLayer(name, node.op_type, node.input[0], K, channels, STATUS_OK, grid, source, layout, binary_xnor=xnor)
