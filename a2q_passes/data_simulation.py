"""Real inputs through a model with P-bit accumulators in its MAC layers (``verify --data``, benchmarks).

The graph runs node by node (:class:`_GraphRunner`); at each simulated MAC node the input is turned
back into integer codes with the layer's :class:`~a2q_passes.input_grids.InputGrid`, accumulated in P bits
(:mod:`a2q_passes.simulate`), and the error is propagated downstream as
``y_sim = y_exact + (acc_sim - acc_exact) * s_w[channel] * s_x``. Exact execution runs alongside, so
every output comes with the value an exact accumulator gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as rt
from onnx import NodeProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp, is_custom_op
from qonnx.util.basic import get_preferred_qonnx_opset

from a2q_passes import model_io, progress
from a2q_passes.analysis import INNER_REGISTER, integer_view, register_ranges
from a2q_passes.batching import batch_free_reshapes
from a2q_passes.conventions import CHANNEL_KEEPING_OPS, DYNAMIC_QUANTIZER_OPS
from a2q_passes.conv_transpose_simulation import conv_transpose_accumulate, unsimulated_attributes
from a2q_passes.errors import A2QError
from a2q_passes.npz_data import read_npz
from a2q_passes.exact_integer_ops import ExactSession, exact_session, moves_sub_byte_codes, needs_reference
from a2q_passes.finn_accumulators import HW_DOMAIN_PREFIX
from a2q_passes.finn_runtime import as_generic_hw_layers, register_finn_hw_ops
from a2q_passes.graph_values import auto_pads, node_attr, node_str_attr
from a2q_passes.input_grids import InputGrid, axis_scale
from a2q_passes.integer_op_simulation import (REQUANTIZING_OPS, NotRequantizable, Requantization, operand_codes,
                                              unsimulated_integer_op)
from a2q_passes.layers import MVAU_OP_TYPES, VVAU_OP_TYPES, XNOR_POPCOUNT, MacLayer, find_mac_layers
from a2q_passes.model_io import CHANNELS_LAST_DOMAIN, data_inputs
from a2q_passes.mvau_simulation import (SIMULATED_MVAU, SIMULATED_VVAU, MvauActivation, mvau_rows, unsimulated_mvau,
                                        vvau_interleave, vvau_taps)
from a2q_passes.tensor_store import initializer_shape, tensor_value
from a2q_passes.weight_sources import INTEGER_MAC_OPS
from a2q_passes.simulate import MAX_SIMULATED_BITS, MODES, Accumulation, accumulate, accumulate_dot, exact_float_dtype
from a2q_passes.width_resolution import resolve_widths

_GRID_TOLERANCE = 1e-2  # |x / scale - code|: float32 Quant outputs sit within ~1e-5 of their codes
DEFAULT_BATCH = 512


def check_datapath(mode: str, tile: int | None, outer_bits: int | None = None) -> None:
    """Refuse an unknown accumulation mode or a bad multi-stage datapath (CLI wording: the options named)."""
    if mode not in MODES:
        raise A2QError(f"accumulation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if tile is not None and tile < 1:
        raise A2QError(f"--tile must be a positive number of terms, got {tile}")
    if outer_bits is not None and (tile is None or not 1 <= outer_bits <= 64):
        raise A2QError(f"--outer-bits {outer_bits} needs --tile T and a width from 1 to 64 bits")


# --------------------------------------------------------------------------- graph execution


class _GraphRunner:
    """Runs a graph node by node on batched tensors of any batch size.

    qonnx/FINN custom ops run through their numpy ``execute_node``; every other node runs in
    onnxruntime as a single-node model (one cached session per node; integer MAC ops exactly, in ONNX's reference
    implementation or :mod:`a2q_passes.exact_integer_ops`), like
    ``qonnx.core.onnx_exec.execute_node`` does, but with untyped shapes so the batch may differ
    from the one the model declares. Nodes whose inputs are all constant run once up front.
    """

    def __init__(self, model: ModelWrapper) -> None:
        model = batch_free_reshapes(model)
        self.model = model
        self.opsets = {imp.domain: imp.version for imp in model.model.opset_import}
        self.shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                       for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
        # streamed weights memory-mapped from their data file, read-only (one copy each in its node's session)
        self.constants = {init.name: tensor_value(init) for init in model.graph.initializer}
        self.data_inputs = [vi.name for vi in data_inputs(model.graph)]
        first = self.shapes.get(self.data_inputs[0]) if self.data_inputs else None
        self.declared_batch = first[0] if first else 0
        self.sessions: dict[int, rt.InferenceSession | ExactSession] = {}
        if any(node.domain.startswith("finn") for node in model.graph.node):
            register_finn_hw_ops()
        self.pending: list[tuple[int, NodeProto]] = []
        for index, node in enumerate(model.graph.node):
            if all(name in self.constants for name in node.input if name):
                self.run_node(index, node, self.constants, batch=self.declared_batch)
            else:
                self.pending.append((index, node))

    def run_node(self, index: int, node: NodeProto, context: dict[str, np.ndarray], batch: int) -> None:
        opset = self.opsets.get(node.domain, get_preferred_qonnx_opset())
        if node.domain and is_custom_op(node.domain, node.op_type):
            # Some custom ops read the output shape from the context: give them one with this batch
            for name in node.output:
                shape = self.shapes.get(name)
                if name and shape and shape[0] == self.declared_batch and node.input[0] not in self.constants:
                    context[name] = np.zeros((batch, *shape[1:]), dtype=np.float32)
            try:
                getCustomOp(node, onnx_opset_version=opset).execute_node(context, self.model.graph)
            except Exception as err:  # third-party kernels raise anything; say which node failed
                raise A2QError(f"executing {node.op_type} node '{node.name}' on a batch of {batch} failed: {err}") from err
            return
        outputs = [name for name in node.output if name]
        try:
            session = self.sessions.get(index) or self._session(index, node, context)
            values = session.run(outputs, {i.name: context[i.name] for i in session.get_inputs()})
        except Exception as err:
            raise A2QError(f"executing {node.op_type} node '{node.name}' on a batch of {batch} failed: {err}") from err
        context.update(zip(outputs, values))

    def _session(self, index: int, node: NodeProto,
                 context: dict[str, np.ndarray]) -> rt.InferenceSession | ExactSession:
        initializers, inputs = [], []
        for name in dict.fromkeys(n for n in node.input if n):
            if name in self.constants:
                if self.constants[name].nbytes >= model_io.PROTO_LIMIT_BYTES:
                    raise A2QError(f"{node.op_type} node '{node.name or node.output[0]}': its input '{name}' "
                                   f"({self.constants[name].nbytes / 1e9:.2f} GB) is over protobuf's 2 GiB limit on "
                                   "the one-node model onnxruntime executes it in, so the --data simulation cannot "
                                   "run it; verify without --data (the proof and worst-case simulation read it)")
                initializers.append(numpy_helper.from_array(self.constants[name], name))
            else:
                elem = helper.np_dtype_to_tensor_dtype(context[name].dtype)
                inputs.append(helper.make_tensor_value_info(name, elem, None))
        outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = helper.make_graph([node], "single_node", inputs, outputs, initializers)
        opsets = [helper.make_opsetid(domain, version) for domain, version in self.opsets.items()]
        proto = helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = min(self.model.model.ir_version or 10, 10)
        # onnxruntime's integer kernels are not exact (or lack forms ONNX allows) on some CPUs; no 4-bit arrays
        if needs_reference(node.domain, node.op_type) or moves_sub_byte_codes(proto):
            self.sessions[index] = exact_session(proto)
            return self.sessions[index]
        options = rt.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = rt.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.sessions[index] = session
        return session


# --------------------------------------------------------------------------- integer view of MAC nodes


class _NotSimulated(Exception):
    """This layer's data simulation is not supported; the message says why."""


def grid_codes(x: np.ndarray, grid: InputGrid, scale: float | np.ndarray, layer: str, tensor: str) -> np.ndarray:
    """Integer codes of ``tensor``, the input of ``layer`` (integer-valued float64), checked to lie on its grid."""
    x = np.asarray(x)
    scaled = x.astype(np.float64) / scale + grid.zero_code
    step = f"{scale:g}" if np.ndim(scale) == 0 else "one per channel"
    codes = np.rint(scaled)
    off = np.abs(scaled - codes)
    lo, hi = (float(codes.min()), float(codes.max())) if codes.size else (grid.range.lo, grid.range.hi)
    # a float16 graph's dequantized values carry half a unit in their last place (relative to the code)
    precision = float(ml_dtypes.finfo(x.dtype).eps) if x.dtype.name in ("float16", "bfloat16") else 0.0
    magnitude = max(abs(lo), abs(hi))
    if magnitude * precision + _GRID_TOLERANCE >= 0.5:
        raise A2QError(f"layer '{layer}': its input '{tensor}' is {x.dtype}, which cannot tell codes as large as "
                       f"{magnitude:g} apart; simulate a float32 copy of the model")
    if not np.all(off <= _GRID_TOLERANCE + np.abs(codes) * precision) or lo < grid.range.lo or hi > grid.range.hi:
        off = float(off.max()) if off.size else 0.0
        raise A2QError(
            f"layer '{layer}': its input '{tensor}' is not on the integer grid {grid.dtype} (scale {step}, zero point "
            f"{grid.zero_code}, codes [{grid.range.lo}, {grid.range.hi}]): codes span [{lo:g}, {hi:g}], up to "
            f"{off:.3g} off an integer. Feed data in the range the model expects (for an --input-dtype input: the "
            "integer codes)")
    return codes


def _signedness(registers: dict[str, tuple[int, int]],
                outer_bits: int | None) -> tuple[bool, tuple[int, bool] | None]:
    """Whether the accumulator is signed (some register can go negative, as in the static proof), and the
    ``(bits, signed)`` of a tiled datapath's outer stage with its own width."""
    if outer_bits is None:
        return min(lo for lo, _ in registers.values()) < 0, None
    outer_signed = min(lo for name, (lo, _) in registers.items() if name != INNER_REGISTER) < 0
    return registers.get(INNER_REGISTER, registers["final sum"])[0] < 0, (outer_bits, outer_signed)


def _check_simulated(layer: MacLayer, bits: int) -> None:
    if not layer.ok:
        raise _NotSimulated(layer.status)
    if bits > MAX_SIMULATED_BITS:
        raise _NotSimulated(f"P = {bits} > {MAX_SIMULATED_BITS} bits")


class _ActXActKernel:
    """A MatMul of two quantized activations on real data: both operands -> codes -> P-bit accumulator values."""

    def __init__(self, model: ModelWrapper, layer: MacLayer, node: NodeProto, bits: int, mode: str,
                 tile: int | None, outer_bits: int | None = None, zero_point: str = "fold") -> None:
        _check_simulated(layer, bits)
        self.integer_op = layer.op_type in INTEGER_MAC_OPS
        if self.integer_op and (why := unsimulated_integer_op(node)) is not None:
            raise _NotSimulated(why)
        if (INTEGER_MAC_OPS[layer.op_type].mac_op if self.integer_op else layer.op_type) != "MatMul":
            raise _NotSimulated(f"data simulation of {layer.op_type} nodes is not implemented "
                                "(the static proof and adversarial simulation still apply)")
        if layer.grid.scale_axis is not None or layer.operand_grid.scale_axis is not None:
            raise _NotSimulated("an operand has one scale per index of an axis")
        self.layer, self.node = layer, node
        self.bits, self.mode, self.tile, self.zero_point = bits, mode, tile, zero_point
        self.signed, self.outer = _signedness(register_ranges(layer, *integer_view(model, layer), mode, tile),
                                              outer_bits)
        self.scales = [float(g.scale) if g.scale is not None else 1.0 for g in (layer.grid, layer.operand_grid)]
        # an integer op's output is its accumulator (MatMulInteger) or requantizes it (QLinearMatMul)
        self.output_scale = np.array([1.0 if self.integer_op else self.scales[0] * self.scales[1]])
        self.requantization = _requantization(model, node)
        self.requantized: np.ndarray | None = None  # set by accumulate() for corrected() on the same batch

    def accumulate(self, context: dict[str, np.ndarray]) -> tuple[Accumulation, int]:
        """P-bit accumulation of ``A @ B`` (numpy's matmul: 1-D operands promoted, batch axes broadcast)."""
        if self.integer_op:  # the codes multiplied, and the zero points a requantizing op subtracts under fold
            (a, a_zero), (b, b_zero) = (operand_codes(self.node, context, self.zero_point, second)
                                        for second in (False, True))
        else:
            a, b = (grid_codes(context[tensor], grid, scale, self.layer.node, tensor).astype(np.int64)
                    for tensor, grid, scale in zip(self.node.input[:2], (self.layer.grid, self.layer.operand_grid),
                                                   self.scales))
            a_zero = b_zero = 0
        a2, b2 = (a[None, :] if a.ndim == 1 else a), (b[:, None] if b.ndim == 1 else b)
        exact = np.matmul(a2, b2)  # int64: every partial sum is bounded by the static range, far below 2^62
        acc = accumulate(lambda k: a2[..., :, k, None] * b2[..., None, k, :], a2.shape[-1], self.bits, self.signed,
                         self.mode, self.tile, exact, self.outer)
        self.requantized = None
        if self.requantization is not None and acc.overflow_count:
            of_op = exact if a_zero == b_zero == 0 else np.matmul(a2 - a_zero, b2 - b_zero)
            self.requantized = self.requantization.output(of_op + (acc.values - acc.exact), -1, context)
        if a.ndim == 1 or b.ndim == 1:  # numpy drops the promoted axes again
            axes = tuple(axis for axis, promoted in ((-2, a.ndim == 1), (-1, b.ndim == 1)) if promoted)
            acc = Accumulation(*(np.squeeze(v, axis=axes) for v in (acc.values, acc.exact, acc.register_overflow)))
            if self.requantized is not None:
                self.requantized = np.squeeze(self.requantized, axis=axes)
        return acc, -1

    def corrected(self, y: np.ndarray, delta: np.ndarray, channel_axis: int) -> np.ndarray:
        """``y + delta * s_a * s_b`` in the node output's dtype (a requantizing op: its outputs whose accumulator
        overflowed requantized from the P-bit one)."""
        if self.requantized is not None:
            return np.where(delta != 0, self.requantized, y)
        return (y.astype(np.float64) + delta * self.output_scale[0]).astype(y.dtype)


def _requantization(model: ModelWrapper, node: NodeProto) -> Requantization | MvauActivation | None:
    """How ``node`` requantizes (an MVAU: thresholds) its accumulator, None where its output is the accumulator (or
    not an integer op)."""
    try:
        if node.op_type in REQUANTIZING_OPS:
            return Requantization(model, node)
        if node.op_type in (SIMULATED_MVAU, SIMULATED_VVAU) and not node_attr(node, "noActivation", 0):
            return MvauActivation(model, node)
    except NotRequantizable as why:
        raise _NotSimulated(str(why)) from None
    return None


class _MacKernel:
    """Integer view of one MAC node on real data: float input -> codes -> P-bit accumulator values."""

    def __init__(self, model: ModelWrapper, layer: MacLayer, node: NodeProto, bits: int, mode: str,
                 tile: int | None, outer_bits: int | None = None, zero_point: str = "fold") -> None:
        _check_simulated(layer, bits)
        integer_op = self.integer_op = layer.op_type in INTEGER_MAC_OPS
        finn_op = layer.op_type in MVAU_OP_TYPES + VVAU_OP_TYPES + (XNOR_POPCOUNT,)  # an XnorPopcountMatMul: an MVAU
        tiled = tile is not None or outer_bits is not None
        if (why := unsimulated_integer_op(node) if integer_op else unsimulated_mvau(layer, node, tiled) if finn_op
                else None) is not None:
            raise _NotSimulated(why)
        # an MVAU multiplies its input vectors by its (MW, MH) weights: a MatMul
        self.mac_op = INTEGER_MAC_OPS[layer.op_type].mac_op if integer_op else "MatMul" if finn_op else layer.op_type
        # an MVAU's input vectors, less the batch (an XnorPopcountMatMul multiplies its input's last axis, as MatMul)
        self.vectors = list(node_attr(node, "numInputVectors", [1]))[1:] if node.op_type != XNOR_POPCOUNT and finn_op \
            else None
        self.interleave = vvau_interleave(model, node) if node.op_type == SIMULATED_VVAU else 1
        if self.mac_op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            raise _NotSimulated(f"data simulation of {layer.op_type} nodes is not implemented "
                                "(the static proof and adversarial simulation still apply)")
        self.layer, self.node = layer, node
        self.bits, self.mode, self.tile, self.zero_point = bits, mode, tile, zero_point
        self.rows = layer.integer_rows(model)
        self.signed, self.outer = _signedness(register_ranges(layer, self.rows, layer.grid.range, mode, tile),
                                              outer_bits)
        if finn_op:  # the register is the reader's; the products are the node's (over pixel padding: whole rows)
            self.rows = mvau_rows(model, layer, self.rows)
        grid = layer.grid
        # the input's step: one, or one per channel (a depthwise Conv: output row o reads input channel o // m)
        self.input_scale, row_input_scale = self._input_scales(model)
        self.output_scale = self._weight_scales(model) * row_input_scale * float(node_attr(node, "alpha", 1.0))
        # an integer op's (FINN node's) output is its accumulator (ConvInteger, MatMulInteger, an MVAU without
        # activation) or requantizes (thresholds) it
        if integer_op or finn_op:
            self.output_scale = np.ones(self.rows.shape[0])
        self.requantization = _requantization(model, node)
        self.requantized: np.ndarray | None = None  # set by accumulate() for corrected() on the same batch
        self.weight_zero_rows = self._weight_zero_rows(model) if integer_op and zero_point == "fold" else 0
        # bounds every partial sum (padding holds the zero-point code, which lies inside the range)
        self.bound = grid.range.magnitude * int(np.abs(self.rows).sum(axis=1).max(initial=0))
        # qonnx's channels-last Conv (ConvertToChannelsLastAndClean): NHWC data, weights (C_out, *kernel, C_in / g),
        # so its rows sum the taps kernel position first, then input channel; onnxruntime's com.microsoft QLinearConv
        # with channels_last: NHWC data, weights (C_out, C_in / g, *kernel) as ONNX's
        self.channels_last = node.domain == CHANNELS_LAST_DOMAIN
        self.nhwc = self.channels_last or (integer_op and bool(node_attr(node, "channels_last", 0)))
        if self.nhwc and grid.scale_axis is not None:
            raise _NotSimulated("a channels-last Conv whose input has one scale per channel")
        if self.mac_op == "Conv":
            self._conv_setup()
        elif node.op_type == "ConvTranspose":
            if (why := unsimulated_attributes(node)) is not None:
                raise _NotSimulated(why)
            # one output scale per channel, not per (channel, stride phase) row
            self.output_scale = self.output_scale[np.unique(layer.layout.row_channel, return_index=True)[1]]

    def _weight_zero_rows(self, model: ModelWrapper) -> np.ndarray | int:
        """The weight zero point at every term of the rows (the fold convention's rows are the raw codes)."""
        source = self.layer.source
        if source.zero_point is None or not np.any(source.zero_point != 0):
            return 0
        shape = initializer_shape(model, source.tensor)
        return self.layer.layout.to_rows(np.broadcast_to(source.zero_point, shape)).astype(np.int64)

    def _input_scales(self, model: ModelWrapper) -> tuple[float | np.ndarray, float | np.ndarray]:
        """The input's step, broadcast to the input (one scale, or one per channel shaped ``(1, C, 1, ...)``), and
        the step each accumulator row's codes have."""
        grid = self.layer.grid
        if grid.scale_axis is None:
            scale = float(grid.scale) if grid.scale is not None else 1.0
            return scale, scale
        # the reader takes one scale per channel only as the input of a depthwise Conv (weights (C_out, 1, ...)),
        # directly or through ops that keep each channel's values in it
        shape = self.layer.layout.shape
        channels = int(node_attr(self.node, "group", 1))
        quantizer = model.find_producer(self.layer.input_tensor)
        while quantizer is not None and quantizer.op_type in CHANNEL_KEEPING_OPS:
            quantizer = model.find_producer(quantizer.input[0])
        scale = axis_scale(model, quantizer, [1, channels] + [1] * (len(shape) - 2)) if quantizer is not None else None
        if scale is None or grid.scale_axis != 1 or shape[1] != 1 or self.node.op_type != "Conv":
            raise _NotSimulated("its input has one scale per index of an axis the simulator does not convert")
        return scale, np.repeat(scale.reshape(-1), shape[0] // channels)

    def _weight_scales(self, model: ModelWrapper) -> np.ndarray:
        """Per-row weight scale ``s_w`` (rows of the accumulator), checked constant along K."""
        source = self.layer.source
        if source.scale is None:
            return np.ones(self.rows.shape[0])
        scale = np.broadcast_to(np.asarray(source.scale, dtype=np.float64), initializer_shape(model, source.tensor))
        for perm in source.perms:
            scale = np.transpose(scale, perm)
        layout = self.layer.layout
        per_term = layout.to_rows(scale)
        taps = layout.to_rows(np.ones(scale.shape, dtype=bool))  # a row's padding (ConvTranspose, last block) is no term
        if not np.all((per_term == per_term[:, :1]) | ~taps):
            raise _NotSimulated("the weight scale varies along the accumulation axis, so the float layer "
                                "is not a scaled integer dot product")
        return per_term[:, 0].copy()

    def _conv_setup(self) -> None:
        # Conv weights: (C_out, C_in / groups, *kernel); channels-last (C_out, *kernel, C_in / groups)
        shape = self.layer.layout.shape
        kernel = tuple(shape[1:-1] if self.channels_last else shape[2:])
        self.taps = (*kernel, shape[-1]) if self.channels_last else (shape[1], *kernel)  # a row's terms, in order
        n = len(kernel)
        self.groups = int(node_attr(self.node, "group", 1))
        self.strides = list(node_attr(self.node, "strides", [1] * n))
        self.dilations = list(node_attr(self.node, "dilations", [1] * n))
        self.window = [(k - 1) * d + 1 for k, d in zip(kernel, self.dilations)]
        self.auto_pad = node_str_attr(self.node, "auto_pad", "NOTSET")
        self.pads = list(node_attr(self.node, "pads", [0] * 2 * n))

    def accumulate(self, context: dict[str, np.ndarray]) -> tuple[Accumulation, int]:
        """P-bit accumulation of the node on its input in ``context``, in the node's output layout, and its channel
        axis."""
        if self.integer_op:
            codes, padding = operand_codes(self.node, context, self.zero_point)
        else:  # its input's codes on the layer's grid
            codes = grid_codes(context[self.node.input[0]], self.layer.grid, self.input_scale, self.layer.node,
                               self.layer.input_tensor)
            padding = self.layer.grid.zero_code
            if self.node.op_type == SIMULATED_VVAU:  # each channel's window taps times its own kernel
                codes = vvau_taps(codes, self.rows.shape[1], self.rows.shape[0], self.interleave)
            elif self.vectors is not None:  # an MVAU reads its input as vectors of MW codes (FINN's normal shape)
                codes = codes.reshape(len(codes), *self.vectors, self.rows.shape[1])
        if self.node.op_type == "ConvTranspose":
            weights = self.layer.layout.from_rows(self.rows)
            return conv_transpose_accumulate(codes, weights, self.node, self.bits, self.signed, self.mode, self.tile,
                                             self.outer), 1
        if self.layer.layout.kind == "blocks":
            return self._accumulate_blocks(codes), -2
        if self.nhwc:  # convolved channels-first; the results go back to the node's NHWC layout below
            codes = np.moveaxis(codes, -1, 1)
        acc, channel_axis = self._accumulate(codes, padding)
        self.requantized = None
        if self.requantization is not None and acc.overflow_count:
            self.requantized = self.requantization.output(self._accumulator_of_op(codes, padding, acc) +
                                                          (acc.values - acc.exact), channel_axis, context)
        if self.nhwc:
            acc = Accumulation(*(np.moveaxis(v, 1, -1) for v in (acc.values, acc.exact, acc.register_overflow)))
            channel_axis = -1
            if self.requantized is not None:
                self.requantized = np.moveaxis(self.requantized, 1, -1)
        return acc, channel_axis

    def _accumulate(self, codes: np.ndarray, padding: int) -> tuple[Accumulation, int]:
        """Dense and convolutional layers on ``codes``; a Conv pads with code ``padding``."""
        if self.node.op_type == SIMULATED_VVAU:  # codes (B, H, W, taps, C): channel c sums its taps times row c
            taps = codes.astype(np.int64)
            exact = np.einsum("bhwtc,ct->bhwc", taps, self.rows)
            return accumulate(lambda k: taps[..., k, :] * self.rows[:, k], self.rows.shape[1], self.bits, self.signed,
                              self.mode, self.tile, exact, self.outer), -1
        if self.layer.binary_xnor:  # FINN's xnor-popcount MVAU: each term counts a match of input and weight bit
            bits, rows = codes.astype(np.int64), self.rows
            exact = bits @ rows.T + (1 - bits) @ (1 - rows).T
            return accumulate(lambda k: (bits[..., k, None] == rows[:, k]).astype(np.int64), rows.shape[1], self.bits,
                              self.signed, self.mode, self.tile, exact, self.outer), -1
        if self.mac_op != "Conv":
            return accumulate_dot(codes, self.rows, self.bits, self.signed, self.mode, self.tile, self.outer), -1
        padded = self._padded(codes, padding)  # float64 holding integers
        padded_int: list[np.ndarray] = []  # the int64 copy, made only if terms are needed
        n = codes.ndim - 2
        spatial = tuple((p - w) // s + 1 for p, w, s in zip(padded.shape[2:], self.window, self.strides))
        per_group_in = codes.shape[1] // self.groups
        per_group_out = self.rows.shape[0] // self.groups
        weight_shape = (1, self.rows.shape[0]) + (1,) * n

        def term_at(k: int) -> np.ndarray:  # input code of term k at every output pixel, times its weight
            index = np.unravel_index(k, self.taps)
            channel, tap = (index[-1], index[:-1]) if self.channels_last else (index[0], index[1:])
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                           for t, d, o, s in zip(tap, self.dilations, spatial, self.strides))
            if not padded_int:
                padded_int.append(padded.astype(np.int64))
            x_k = padded_int[0][(slice(None), slice(channel, None, per_group_in), *window)]  # (B, groups, *spatial)
            if self.groups > 1:
                x_k = np.repeat(x_k, per_group_out, axis=1)
            return x_k * self.rows[:, k].reshape(weight_shape)

        exact = self._exact_conv(padded, self.rows, self.bound)
        return accumulate(term_at, self.rows.shape[1], self.bits, self.signed, self.mode, self.tile, exact, self.outer), 1

    def _accumulator_of_op(self, codes: np.ndarray, padding: int, acc: Accumulation) -> np.ndarray:
        """The accumulator a requantizing op defines, ``sum (x - z_x)(w - z_w)``: under ``subtract`` the exact sums;
        under ``fold`` (raw codes, ``z_x`` in padded taps) the sums of the codes less both zero points."""
        if self.zero_point == "subtract" or not self.integer_op:  # no zero point is subtracted after the sums
            return acc.exact
        rows = self.rows - self.weight_zero_rows
        if self.mac_op != "Conv":
            return np.matmul(codes - padding, rows.T)  # int64; the codes are at most 16-bit integers
        shifted = self._padded(codes - padding, 0)
        bound = int(np.abs(shifted).max(initial=0)) * int(np.abs(rows).sum(axis=1).max(initial=0))
        exact = self._exact_conv(shifted, rows, bound)
        if exact is None:
            raise A2QError(f"layer '{self.layer.node}': its accumulator exceeds float64's integers; please report "
                           "this model")
        return exact

    def _accumulate_blocks(self, codes: np.ndarray) -> Accumulation:
        """Block-wise weight scales: each K-block of each output is its own accumulator; results ``(..., C, blocks)``
        (the rows are ordered output-major, block-minor)."""
        layout = self.layer.layout
        pad = layout.blocks * layout.block - layout.K
        codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)]).reshape(*codes.shape[:-1], layout.blocks,
                                                                                  layout.block)
        rows = self.rows.reshape(-1, layout.blocks, layout.block)
        per_block = [accumulate_dot(codes[..., b, :], rows[:, b], self.bits, self.signed, self.mode, self.tile,
                                    self.outer) for b in range(layout.blocks)]
        return Accumulation(*(np.stack([getattr(acc, field) for acc in per_block], axis=-1)
                              for field in ("values", "exact", "register_overflow")))

    def _padded(self, codes: np.ndarray, padding: int) -> np.ndarray:
        n = codes.ndim - 2
        if self.auto_pad in ("NOTSET", ""):
            begin, end = self.pads[:n], self.pads[n:]
        else:  # the window's extent stands for its kernel at dilation 1
            begin, end = auto_pads(self.auto_pad, list(codes.shape[2:]), self.window, self.strides, [1] * n)
        # padding holds real 0, i.e. the zero-point code
        return np.pad(codes, [(0, 0), (0, 0), *zip(begin, end)], constant_values=padding)

    def _exact_conv(self, padded: np.ndarray, rows: np.ndarray, bound: int) -> np.ndarray | None:
        """Exact integer convolution of ``padded`` codes with weight ``rows``, whose partial sums ``bound`` bounds, in
        float (see ``simulate.exact_float_dtype``); None if too wide."""
        import torch

        dtype = exact_float_dtype(bound)
        n = padded.ndim - 2
        conv = getattr(torch.nn.functional, f"conv{n}d")
        for candidate in ((dtype, np.float64) if dtype is np.float32 else (dtype,)):
            if candidate is None:
                return None  # summed term by term in int64
            weights = rows.reshape(self.layer.layout.shape).astype(candidate)
            if self.channels_last:
                weights = np.moveaxis(weights, -1, 1)
            with torch.no_grad():
                y = conv(torch.from_numpy(padded.astype(candidate)), torch.from_numpy(weights),
                         stride=self.strides, dilation=self.dilations, groups=self.groups).numpy()
            exact = np.rint(y)
            # a direct convolution is exact here; a transformed one (Winograd) would leave fractions
            if candidate is np.float64 or np.array_equal(exact, y):
                return exact.astype(np.int64)
        return None

    def corrected(self, y: np.ndarray, delta: np.ndarray, channel_axis: int) -> np.ndarray:
        """``y + delta * s_w[channel] * s_x`` in the node output's dtype (block-wise: summed over the blocks; a
        requantizing op: its outputs whose accumulator overflowed requantized from the P-bit one, see
        :meth:`accumulate`)."""
        if self.requantized is not None:
            return np.where(delta != 0, self.requantized, y)
        if self.layer.layout.kind == "blocks":
            change = (delta * self.output_scale.reshape(-1, self.layer.layout.blocks)).sum(axis=-1)
            return (y.astype(np.float64) + change).astype(y.dtype)
        shape = [1] * delta.ndim
        shape[channel_axis] = -1
        return (y.astype(np.float64) + delta * self.output_scale.reshape(shape)).astype(y.dtype)


# --------------------------------------------------------------------------- data simulation


@dataclass
class SimulationResult:
    """Graph outputs with P-bit accumulators next to exact accumulation, and per-layer overflow counts."""

    outputs: dict[str, np.ndarray]
    exact_outputs: dict[str, np.ndarray]
    widths: dict[str, int]  # layers simulated in P bits
    mode: str
    tile: int | None
    accumulations: dict[str, int]  # accumulator outputs simulated per layer
    overflows: dict[str, int]  # ... whose P-bit result differs from the exact sum
    register_overflows: dict[str, int]  # ... where some register left the P-bit range
    skipped: dict[str, str]  # layers given a width that could not be simulated, and why

    def max_abs_deviation(self) -> float:
        """Largest ``|y_sim - y_exact|`` over every graph output."""
        return max((float(np.max(np.abs(self.outputs[k].astype(np.float64) - self.exact_outputs[k])))
                    for k in self.outputs if self.outputs[k].size), default=0.0)

    def changed_predictions(self) -> float | None:
        """For a classifier (first output ``(N, classes)``): fraction of samples whose argmax changed."""
        name = next(iter(self.outputs), None)
        if name is None or self.outputs[name].ndim != 2 or self.outputs[name].shape[1] < 2:
            return None
        changed = np.argmax(self.outputs[name], axis=1) != np.argmax(self.exact_outputs[name], axis=1)
        return float(np.mean(changed))

    def to_json(self) -> dict[str, Any]:
        first = next(iter(self.outputs.values()), np.zeros((0,)))
        return {
            "samples": int(first.shape[0]) if first.ndim else 0,
            "mode": self.mode, "tile": self.tile, "widths": dict(self.widths),
            "accumulations": dict(self.accumulations), "overflows": dict(self.overflows),
            "register_overflows": dict(self.register_overflows), "skipped": dict(self.skipped),
            "max_abs_output_deviation": self.max_abs_deviation(),
            "changed_predictions": self.changed_predictions(),
        }


def graph_feeds(model: ModelWrapper, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Validated, batched feeds for the graph inputs; errors name the input and the expected shape."""
    declared = data_inputs(model.graph)
    names = [vi.name for vi in declared]
    if not isinstance(inputs, dict):
        if len(names) != 1:
            raise A2QError(f"the model has {len(names)} inputs ({', '.join(names)}); give the data as arrays "
                           "keyed by input name")
        inputs = {names[0]: inputs}
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise A2QError(f"data arrays {sorted(inputs)} do not match the model inputs {names}"
                       + (f" (missing: {', '.join(missing)})" if missing else ""))
    feeds, batch = {}, None
    for vi in declared:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        expected = "(N, " + ", ".join(str(d) if d else "?" for d in dims[1:]) + ")" if dims else "()"
        arr = np.asarray(inputs[vi.name])
        if arr.dtype.kind not in "biuf":
            raise A2QError(f"input '{vi.name}': data of dtype {arr.dtype} is not numeric")
        if dims and (arr.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], arr.shape[1:]))):
            raise A2QError(f"input '{vi.name}': data shape {tuple(arr.shape)} does not match the model, "
                           f"which expects {expected} (N samples)")
        if arr.shape[0] == 0:
            raise A2QError(f"input '{vi.name}': the data holds no samples")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise A2QError(f"input '{vi.name}': the data holds {bad} NaN or infinite value(s)")
        if batch is not None and arr.shape[0] != batch:
            raise A2QError(f"input '{vi.name}' has {arr.shape[0]} samples, the other inputs {batch}")
        batch = arr.shape[0]
        feeds[vi.name] = arr.astype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return feeds


def load_inputs(path: Path, model: ModelWrapper) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz``: ``x`` (and optional labels ``y``, ignored) for single-input models, or arrays keyed by input name."""
    arrays = read_npz(path, "an array 'x' of inputs or one array per model input, named as the input")
    if not arrays:
        raise A2QError(f"{path}: the archive holds no arrays")
    names = [vi.name for vi in data_inputs(model.graph)]
    # the finetune data format (labels unused here), unless the arrays are keyed by input name
    if "x" in arrays and set(arrays) <= {"x", "y"} and not set(arrays) <= set(names):
        if len(names) != 1:
            raise A2QError(f"{path}: array 'x' is ambiguous for a model with inputs {names}; key the arrays by input name")
        return {names[0]: arrays["x"]}
    return arrays


def _fixes_batch(node: NodeProto) -> bool:
    """Whether ``node`` computes for the declared batch only: FINN's dataflow kernels reshape to it; qonnx's
    ``Im2Col`` (``LowerConvsToMatMul``, FINN's streamlined convolutions) windows the ``input_shape`` it records, so on
    a larger batch it returns other windows without an error; dynamic quantization (onnxruntime's
    ``quantize_dynamic``) takes its scale and zero point from the whole tensor, so other samples in a batch change a
    sample's codes (a symbolic batch runs one sample at a time)."""
    return (node.domain.startswith("finn") or (node.op_type == "Im2Col" and node.domain.startswith("qonnx"))
            or node.op_type in DYNAMIC_QUANTIZER_OPS)


def simulate_model(
    model: ModelWrapper,
    inputs: dict[str, np.ndarray] | np.ndarray,
    widths: int | dict[str, int] | None,
    mode: str = "wrap",
    tile: int | None = None,
    input_dtypes: dict[str, str] | None = None,
    zero_point: str = "fold",
    batch_size: int = DEFAULT_BATCH,
    stages: dict[str, tuple[int, int | None]] | None = None,
) -> SimulationResult:
    """Run ``inputs`` through ``model`` with P-bit accumulators in the given layers.

    ``widths`` is one P for every quantized MAC layer, ``{node: P}`` (other layers accumulate
    exactly) or ``None`` (the widths recorded in the model). The simulated error of each layer propagates to later layers, so ``outputs`` is
    what the model computes with those accumulators; ``exact_outputs`` is ordinary execution.
    Layers that cannot be simulated (e.g. FINN dataflow nodes) run exactly and are listed in
    ``skipped``. The model is not modified. ``stages``: per layer ``(tile, outer bits)`` of a multi-stage
    datapath, in place of ``tile`` (``verify`` passes what ``project --tile`` recorded).
    """
    check_datapath(mode, tile)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(node.domain.startswith(f"{HW_DOMAIN_PREFIX}.") for node in model.graph.node):
        # FINN's specialised layers (MVAU_hls, Thresholding_rtl, ...) execute only in C++ or RTL simulation: they run,
        # and are simulated, as the HW layers they compute
        model = as_generic_hw_layers(model)
    layers = find_mac_layers(model, input_dtypes, zero_point)
    chosen, _ = resolve_widths(model, layers, widths)
    feeds = graph_feeds(model, inputs)
    by_name = {layer.node: layer for layer in layers}
    nodes = {node.name or node.output[0]: node for node in model.graph.node}
    kernels: dict[str, _MacKernel | _ActXActKernel] = {}
    skipped: dict[str, str] = {}
    for name, bits in chosen.items():
        layer = by_name[name]
        try:
            kind = _ActXActKernel if layer.act_x_act else _MacKernel
            kernels[name] = kind(model, layer, nodes[name], bits, mode, *(stages or {}).get(name, (tile, None)),
                                 zero_point=zero_point)
        except _NotSimulated as why:
            skipped[name] = str(why)
    runner = _GraphRunner(model)
    if any(_fixes_batch(node) for node in model.graph.node):
        batch_size = max(runner.declared_batch, 1)
    total = next(iter(feeds.values())).shape[0]
    outputs_exact: dict[str, list[np.ndarray]] = {vi.name: [] for vi in model.graph.output}
    outputs_sim: dict[str, list[np.ndarray]] = {vi.name: [] for vi in model.graph.output}
    counts = {key: dict.fromkeys(kernels, 0) for key in ("accumulations", "overflows", "register_overflows")}
    for start in progress.over_layers(range(0, total, batch_size), "verify --data", unit="batch"):
        exact = dict(runner.constants)
        exact.update({name: arr[start:start + batch_size] for name, arr in feeds.items()})
        sim = dict(exact)
        batch = min(batch_size, total - start)
        for index, node in runner.pending:
            shared = all(sim[n] is exact[n] for n in node.input if n)
            runner.run_node(index, node, exact, batch)
            if shared:
                sim.update({o: exact[o] for o in node.output if o})
            else:
                runner.run_node(index, node, sim, batch)
            kernel = kernels.get(node.name or node.output[0])
            if kernel is None:
                continue
            acc, channel_axis = kernel.accumulate(sim)
            # the simulated geometry must be the executed one (block-wise: a last axis of blocks)
            if acc.values.shape[:sim[node.output[0]].ndim] != sim[node.output[0]].shape:
                raise A2QError(f"layer '{kernel.layer.node}': simulated accumulators of shape {acc.values.shape} for "
                               f"an output of shape {sim[node.output[0]].shape}; please report this model")
            counts["accumulations"][kernel.layer.node] += acc.values.size
            counts["overflows"][kernel.layer.node] += acc.overflow_count
            counts["register_overflows"][kernel.layer.node] += acc.register_overflow_count
            if acc.overflow_count:
                sim[node.output[0]] = kernel.corrected(sim[node.output[0]], acc.values - acc.exact, channel_axis)
        for name in outputs_exact:
            outputs_exact[name].append(exact[name])
            outputs_sim[name].append(sim[name])
    return SimulationResult(
        outputs={k: np.concatenate(v) for k, v in outputs_sim.items()},
        exact_outputs={k: np.concatenate(v) for k, v in outputs_exact.items()},
        widths={name: chosen[name] for name in kernels}, mode=mode, tile=tile,
        accumulations=counts["accumulations"], overflows=counts["overflows"],
        register_overflows=counts["register_overflows"], skipped=skipped,
    )
