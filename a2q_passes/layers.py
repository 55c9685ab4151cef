"""Find the quantized MAC layers of an ONNX graph: which node is one, its integer view (``MacLayer``: input grid,
weight source, the row layout of its accumulators), and the layers a2q cannot read, reported rather than passed over.

Graph code only; all bound math is in :mod:`a2q_passes.bounds`. Where a layer's integer weights are stored and how
they are read and written is :mod:`a2q_passes.weight_sources`; which integer grid its input lives on is
:mod:`a2q_passes.input_grids`.

Layers: Conv (grouped, depthwise, 1-D to 3-D), ConvTranspose, Gemm and MatMul with quantized weights (see
:mod:`a2q_passes.weight_sources`; opset-21 block-wise scales along K make each block its own accumulator, see
:class:`BlockRowLayout`), FINN ``MVAU``/``VVAU`` nodes, which carry their integer weights and datatypes directly,
and the integer ops of onnxruntime's QOperator and dynamic formats, which also carry their input's codes. A ``MatMul``
whose second operand is computed at run time is an activation x activation layer (``kind`` :data:`KIND_ACT_X_ACT`):
both operands' grids are resolved like any MAC input, and there are no weights. Other multiply-accumulate ops
(onnxruntime's fused and packed contrib ops, Einsum, LSTM, ...: :data:`UNREAD_MACS`), MACs inside subgraphs and
FINN's dataflow partitions are reported as unsupported layers, never passed over.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import AttributeProto, GraphProto, NodeProto
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.bounds import BINARY, IntRange, act_x_act_range, narrowest_integers
from a2q_passes.conventions import (INPUT_RANGES, INPUT_RANGES_TITLE, KIND_ACT_X_ACT,  # noqa: F401 (re-exported)
                                  KIND_WEIGHTS, ZERO_POINT_CONVENTIONS)
from a2q_passes.input_grids import GRID_PRESERVING_OPS, GridResolver, InputGrid, dtype_grid, with_zero_tap
from a2q_passes.pixel_padding import pixel_padding_masks
from a2q_passes.tensor_store import initializer_proto, initializer_shape, initializer_value
from a2q_passes.graph_values import get_constant, node_attr, node_label, node_str_attr
from a2q_passes.weight_sources import (INTEGER_MAC_OPS, QUANT_OP_TYPES, UNROUNDED_KINDS, UnsupportedLayer, WeightSource,
                                       apply_perms, check_integer_values, codes_as_stored, contiguous_copy,
                                       integer_operand_source, is_integer_mac, mac_weight_shape, read_mac_weights,
                                       resolve_weight_source, unrounded_mac_weights, write_mac_weights)

MAC_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")

QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas")  # qonnx's general ops, and old Brevitas exports' domain
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
    **{("com.microsoft", op): (False, "only Conv, ConvTranspose, Gemm and MatMul are read; express it with those")
       for op in ("AttnLSTM", "CDist", "CausalConvWithState", "VarlenCausalConvWithState", "WordConvEmbedding",
                  "LinearAttention", "LinearAttentionGate", "GatedDeltaNet", "HyperConnectionPreMix",
                  "HyperConnectionPostMix")},
    **{("", op): (False, "only Conv, ConvTranspose, Gemm and MatMul are read; express it with those")
       for op in ("Einsum", "LSTM", "GRU", "RNN", "DeformConv", "Attention")},
    # Brevitas' QONNX export of QuantLSTM (an op qonnx does not define)
    **{(domain, "QuantLSTMCell"): (True, "a quantized LSTM cell (Brevitas' QuantLSTM); recurrent cells are not read")
       for domain in QONNX_DOMAINS},
    # finn-plus' attention HW layer: two products of activations (its AccQKMatMul and AccAVMatMul accumulators)
    **{(domain, op): (True, "FINN's attention layer; analyse the model before FINN's conversion to HW layers, where "
                            "its two products of activations are MatMul nodes a2q reads")
       for domain, op in (("finn.custom_op.fpgadataflow", "ScaledDotProductAttention"),
                          ("finn.custom_op.fpgadataflow.hls", "ScaledDotProductAttention_hls"))},
}


def unread_mac(node: NodeProto) -> tuple[bool, str] | None:
    """``(computes on integers, what to do)`` where ``node`` is one of :data:`UNREAD_MACS`, else ``None``."""
    return None if is_integer_mac(node) else UNREAD_MACS.get(("" if node.domain == "ai.onnx" else node.domain,
                                                              node.op_type))


MVAU_OP_TYPES = ("MVAU", "MVAU_hls", "MVAU_rtl", "MatrixVectorActivation")
# qonnx's binary MatMul (FINN's streamlining makes it of a bipolar one): an MVAU in binaryXnorMode before HW conversion
XNOR_POPCOUNT = "XnorPopcountMatMul"
VVAU_OP_TYPES = ("VVAU", "VVAU_hls", "VVAU_rtl", "VectorVectorActivation")
STATUS_OK = "ok"
STATUS_INPUT_NOT_QUANTIZED = "input not quantized"
STATUS_WEIGHTS_NOT_QUANTIZED = "weights not quantized"
# in the status of a layer whose weight scale varies along an axis it sums over (no single integer accumulation)
SCALE_ALONG_SUMMED_AXIS = "which the MAC sums over"


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
        if self.kind == "transpose":  # a view: the writer copies it once into the stored layout (no copy if that is rows)
            return rows.T
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
        codes = codes_as_stored(model, self.source)
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
        if self.source.kind in UNROUNDED_KINDS:
            return rows
        return contiguous_copy(rows, rows.dtype if keep_integers else np.float64)

    def unrounded_row_view(self, model: ModelWrapper) -> np.ndarray:
        """The values of :meth:`unrounded_rows` without their float64 copy where the source stores integers
        (:meth:`code_rows`, a view of the stored tensor where it can be): for reading a few rows of a large layer."""
        if self.source.kind in UNROUNDED_KINDS:
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
        Raises :class:`UnsupportedLayer` when a zero point varies along a row (per-input-channel zero points), and
        for a Quant rounding UP (away from 0) with a zero point: it makes code 0 only of ``w / s + z`` exactly 0,
        which no float32 ``w`` reaches for some scales, so the projection's zero weights could not be written.
        """
        source = self.source
        if source.zero_offset is None:
            return [(np.arange(self.layout.rows), source.weight_range)]
        if source.kind == "quant" and source.rounding_mode.upper() == "UP":
            raise UnsupportedLayer(f"'{self.node}' rounds its weights UP (away from 0) with a zero point, which cannot "
                                   "store every code exactly; re-export its weight quantizer with ROUND")
        stored_shape = initializer_shape(model, source.tensor)
        offsets = self.layout.to_rows(apply_perms(np.broadcast_to(source.zero_offset, stored_shape), source.perms))
        # positions a row pads (a short last weight block) hold no weight and no zero point
        weights_at = self.layout.to_rows(apply_perms(np.ones(stored_shape, dtype=bool), source.perms))
        if np.any((offsets != offsets[:, :1]) & weights_at):
            raise UnsupportedLayer(f"the weight zero point of layer '{self.node}' varies along its accumulation axis; "
                                   "project needs one zero point per output channel")
        groups = []
        for z in np.unique(offsets[:, 0]):
            lo, hi = source.storage_range.lo - int(z), source.storage_range.hi - int(z)
            groups.append((np.flatnonzero(offsets[:, 0] == z), IntRange(lo, hi)))
        return groups


# --------------------------------------------------------------------------- layouts


def _conv_transpose_layout(model: ModelWrapper, node: NodeProto, shape: tuple[int, ...]) -> RowLayout:
    """One row per (output channel, stride phase that taps reach): the taps that reach one output pixel (any
    number of spatial dimensions: 1-D, 2-D, 3-D)."""
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
            if taps.size == 0:  # a phase no tap reaches (dilation a multiple of the stride): its outputs sum nothing
                continue
            rows.append(taps.reshape(-1))
            row_channel.append(co)
    k = max(len(r) for r in rows)
    index = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        index[i, :len(r)] = r
    return RowLayout("gather", shape, index, np.asarray(row_channel))


def _pixel_padding_layout(node: NodeProto, shape: tuple[int, ...], masks: np.ndarray,
                          no_zero_code: bool) -> tuple[RowLayout, int]:
    """An MVAU reading a window over pixel-padded input (:mod:`a2q_passes.pixel_padding`): one row per (output
    channel, tap pattern), as a ``ConvTranspose``'s per stride phase, each with the inputs that hold pixels."""
    if no_zero_code:
        raise UnsupportedLayer(f"{node_label(node)} reads pixel-padded input whose codes exclude 0, the code of the "
                               "inserted zeros (a bipolar or xnor input)")
    if np.any(masks.sum(axis=0) > 1):
        raise UnsupportedLayer(f"{node_label(node)} reads pixel-padded input whose output positions reach no stride "
                               "phase whole (an image smaller than the kernel), which its rows do not split into")
    mw, mh = shape
    taps = [np.flatnonzero(mask) for mask in masks]
    index = np.full((mh * len(taps), max(len(t) for t in taps)), -1, dtype=np.int64)
    for row, (channel, inputs) in enumerate(itertools.product(range(mh), taps)):
        index[row, :len(inputs)] = inputs * mh + channel  # weights (MW, MH), row-major
    return RowLayout("gather", shape, index, np.repeat(np.arange(mh), len(taps))), index.shape[1]


def _layout_for(model: ModelWrapper, node: NodeProto, shape: tuple[int, ...], op: str | None = None) -> tuple[RowLayout, int, int]:
    """Row layout, K and channel count of a MAC node with weight shape ``shape`` (laid out as op ``op``)."""
    op = op or node.op_type
    if op == "Conv" or op in VVAU_OP_TYPES:
        return RowLayout("reshape", shape), int(np.prod(shape[1:])), shape[0]
    if op == "ConvTranspose":
        layout = _conv_transpose_layout(model, node, shape)
        return layout, layout.index.shape[1], shape[1] * int(node_attr(node, "group", 1))
    if len(shape) != 2:
        raise UnsupportedLayer(f"{node_label(node)} has a {len(shape)}-D weight; only 2-D weights are supported")
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
            read = finn_mac_layer
        elif node.op_type == XNOR_POPCOUNT and node.domain in QONNX_DOMAINS:
            read = _xnor_popcount_layer
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
    # a depthwise Conv sums each output over one input channel: per-channel input scales keep it one accumulation
    depthwise = node.op_type == "Conv" and node.domain in ("", "ai.onnx") and shape[1] == 1
    grid, reason = resolver.resolve(node.input[0], per_channel_scale=depthwise)
    if grid is not None and grid.scale_axis not in (None, 1):
        grid, reason = None, (f"its input '{node.input[0]}' has one scale per index of axis {grid.scale_axis}, "
                              "not of its channel axis 1")
    if grid is not None and node.op_type == "ConvTranspose" and grid.zero_code != 0:
        # a border output sums fewer taps: the missing ones add real 0, which under fold is neither
        # a code the hardware sums (as padding would be) nor nothing; do not guess
        return MacLayer(name, node.op_type, node.input[0], K, channels,
                        f"unsupported: ConvTranspose on codes with zero point {grid.zero_code} under --zero-point "
                        "fold (border outputs sum fewer taps); use --zero-point subtract", None, source, layout)
    if grid is not None and _reads_implicit_zeros(node):
        grid = with_zero_tap(grid)
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
            raise UnsupportedLayer(f"the weight scale of {node_label(node)} varies along axis {axis} of its "
                                   f"weights, {SCALE_ALONG_SUMMED_AXIS}: its products are no single integer "
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
        raise UnsupportedLayer(f"the block-wise weight scales of {node_label(node)} split its accumulation; "
                               "that is read for MatMul and Gemm weights only")
    run = int(np.argmax(row_ids[0] != row_ids[0, 0]))
    same_as_previous = row_ids[:, 1:] == row_ids[:, :-1]
    if not np.array_equal(same_as_previous, np.broadcast_to(np.arange(1, K) % run != 0, same_as_previous.shape)):
        raise UnsupportedLayer(f"the block-wise weight scales of {node_label(node)} do not cut each accumulation "
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
        grid = with_zero_tap(grid)  # ONNX pads the zero-point-subtracted input with 0: real 0, code z
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
            where = f"in the '{attribute.name}' subgraph of {node_label(node)}"
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


def _xnor_popcount_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver) -> MacLayer:
    """qonnx's ``XnorPopcountMatMul``: ``(bipolar(x) @ bipolar(W) + K) / 2`` of 0/1 inputs and weights, the count of
    input bits equal to their weight bits (what FINN's MVAU in binaryXnorMode computes): an accumulator in [0, K]."""
    name = node.name or node.output[0]
    weights = initializer_value(model, node.input[1])
    if weights is None:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, "unsupported: weights are not an initializer")
    grid, reason = resolver.resolve(node.input[0])
    if grid is None or not (0 <= grid.range.lo and grid.range.hi <= 1):
        why = reason or f"its codes span [{grid.range.lo}, {grid.range.hi}]"
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"{STATUS_INPUT_NOT_QUANTIZED}: a 0/1 input is "
                        f"counted; {why}")
    try:
        check_integer_values(weights, DataType["BINARY"], f"weights of {node_label(node)}")
        layout, K, channels = _layout_for(model, node, tuple(weights.shape), "MatMul")
    except UnsupportedLayer as err:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    source = WeightSource("initializer", node.input[1], None, BINARY, "BINARY")
    return MacLayer(name, node.op_type, node.input[0], K, channels, STATUS_OK, InputGrid(BINARY, "BINARY", 1.0),
                    source, layout, binary_xnor=True)


# ops whose output type qonnx's and FINN's datatype inference copy from their first input (FINN's HW layers by the
# name before any ``_hls``/``_rtl``); any other op types its own output
_TYPE_KEEPING_OPS = GRID_PRESERVING_OPS + ("Im2Col", "ConvolutionInputGenerator", "FMPadding", "Pad",
                                           "StreamingMaxPool", "StreamingDataWidthConverter", "StreamingFIFO")


def _mistyped_concat(model: ModelWrapper, tensor: str) -> str | None:
    """Why the type annotated on ``tensor`` need not hold its values, or None: a standard ``Concat`` it comes from
    (through type-keeping ops) typed narrower than one of its inputs. qonnx's ``InferDataTypes`` types a ``Concat``'s
    output as its first input (a Concat of UINT2 and UINT6 codes: UINT2), and FINN builds the layers behind it,
    and an MVAU's ``inputDataType``, from that; FINN's ``StreamingConcat`` types its output by all of them."""
    seen = set()
    while tensor not in seen and (producer := model.find_producer(tensor)) is not None:
        seen.add(tensor)
        if producer.op_type == "Concat" and producer.domain in ("", "ai.onnx"):
            typed = model.get_tensor_datatype(producer.output[0])
            wider = [f"'{t}' ({model.get_tensor_datatype(t).name})" for t in producer.input
                     if model.get_tensor_datatype(t).min() < typed.min() or model.get_tensor_datatype(t).max() > typed.max()]
            return (f"comes from {node_label(producer)}, typed {typed.name} (qonnx types a Concat as its first "
                    f"input) while its input {', '.join(wider)} holds wider values: this layer's inputs may leave "
                    f"{typed.name}. Quantize the joined branches to one type, or join them along the channel "
                    "axis, which FINN's StreamingConcat types by all inputs") if wider else None
        if producer.op_type.split("_")[0] not in _TYPE_KEEPING_OPS:
            return None
        tensor = producer.input[0]
    return None


def finn_mac_layer(model: ModelWrapper, node: NodeProto, resolver: GridResolver | None = None) -> MacLayer:
    name = node.name or node.output[0]
    weights = initializer_value(model, node.input[1])
    idt, wdt = node_str_attr(node, "inputDataType", ""), node_str_attr(node, "weightDataType", "")
    xnor = bool(node_attr(node, "binaryXnorMode", 0))
    if weights is None:
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        "unsupported: weights are not an initializer (runtime-writeable or external weights)")
    try:
        wdtype = DataType[wdt]
        grid = dtype_grid(idt, 1.0)
    except KeyError:
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        f"unsupported: unknown inputDataType/weightDataType '{idt}'/'{wdt}'")
    annotated = model.get_tensor_datatype(node.input[0])
    if annotated.is_integer() and annotated.name != idt:
        # FINN's own InferDataTypes sets inputDataType to the input's annotation: which one the values follow is
        # not certain, so neither is read
        return MacLayer(name, node.op_type, node.input[0], 0, 0,
                        f"unsupported: inputDataType {idt} disagrees with the datatype {annotated.name} annotated on "
                        f"its input '{node.input[0]}' (FINN's InferDataTypes would make it {annotated.name}); run "
                        "qonnx's InferDataTypes or fix the annotation")
    if (why := _mistyped_concat(model, node.input[0])) is not None:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: inputDataType {idt} {why}")
    try:
        check_integer_values(weights, DataType["BINARY"] if xnor else wdtype, f"weights of {node_label(node)}")
    except UnsupportedLayer as err:
        return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    # MVAU weights are (MW, MH); VVAU weights are (Channels, 1, kh, kw): both map to rows by _layout_for
    layout, K, channels = _layout_for(model, node, tuple(weights.shape))
    wrange = BINARY if xnor else IntRange(int(wdtype.min()), int(wdtype.max()))
    source = WeightSource("initializer", node.input[1], None, wrange, wdt)
    masks = pixel_padding_masks(model, node) if node.op_type in MVAU_OP_TYPES else None
    if masks is not None:
        try:
            layout, K = _pixel_padding_layout(node, tuple(weights.shape), masks, xnor or grid.two_point
                                               or not grid.range.lo <= 0 <= grid.range.hi)
        except UnsupportedLayer as err:
            return MacLayer(name, node.op_type, node.input[0], 0, 0, f"unsupported: {err}")
    if xnor:
        grid = InputGrid(BINARY, "BINARY", 1.0)
    return MacLayer(name, node.op_type, node.input[0], K, channels, STATUS_OK, grid, source, layout, binary_xnor=xnor)
