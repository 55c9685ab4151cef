"""One MAC layer's certificate: its exact per-channel accumulator range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.certificate.execution import CannotCertify, node_attr, node_label, reads_graph_input
from a2q_passes.certificate.input_codes import InputCodes, dtype_grid, mac_codes
from a2q_passes.certificate.integer_ops import (DATA_ZERO_POINT, INTEGER_MAC_DOMAINS, INTEGER_MACS, elem_types,
                                                integer_act_x_act, integer_codes, integer_operands)
from a2q_passes.certificate.pixel_windows import pixel_masks
from a2q_passes.certificate.ranges import (accumulations, conv_ranges, conv_transpose_ranges, masked_row_ranges,
                                           row_ranges, stage_ranges)
from a2q_passes.certificate.shapes import inferred_shapes
from a2q_passes.certificate.weights import finn_weights, weight_view
from a2q_passes.read_only_model import ReadOnlyModel

_MVAU = ("MVAU", "MVAU_hls", "MVAU_rtl", "MatrixVectorActivation")
_VVAU = ("VVAU", "VVAU_hls", "VVAU_rtl", "VectorVectorActivation")


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


def _certify_act_x_act(model: ModelWrapper, node: NodeProto, codes: "InputCodes | None",
                       zero_point: str) -> LayerCertificate:
    """A MatMul of two activations: each output sums K products of independent codes of both operands.

    ``codes`` None: a QLinearMatMul/MatMulInteger of two integer activations, each operand's codes from its
    own type and zero point (:func:`integer_codes`).
    """
    a = node.input[0]
    b = node.input[INTEGER_MACS[node.op_type][1]] if codes is None else node.input[1]
    if not reads_graph_input(model, a):
        raise CannotCertify(f"{node_label(node)} multiplies a constant left operand by an activation")
    inferred = inferred_shapes(model)
    shape_a, shape_b = inferred.get_tensor_shape(a), inferred.get_tensor_shape(b)
    if not shape_a or not shape_a[-1] or not shape_b:
        raise CannotCertify(f"{node_label(node)}: the operand shapes are unknown ({shape_a}, {shape_b})")
    K = int(shape_a[-1])
    if int(shape_b[-2] if len(shape_b) > 1 else shape_b[0]) not in (K, 0):  # 0: a dimension left symbolic
        raise CannotCertify(f"{node_label(node)}: operand shapes {shape_a} and {shape_b} do not share K")
    if codes is None:
        types = elem_types(model)
        operands = ((0, DATA_ZERO_POINT.get(node.op_type, 2)), INTEGER_MACS[node.op_type][1:])
        (a_lo, a_hi, _), (b_lo, b_hi, _) = (integer_codes(model, node, data, zp, zero_point, types)
                                            for data, zp in operands)
    else:
        a_lo, a_hi, _ = mac_codes(codes.grid(a), zero_point)
        b_lo, b_hi, _ = mac_codes(codes.grid(b), zero_point)
    acc_min, acc_max = bounds.act_x_act_range(K, bounds.IntRange(a_lo, a_hi), bounds.IntRange(b_lo, b_hi))
    return LayerCertificate(node.name or node.output[0], (int(a_lo), int(a_hi)), None, (acc_min,), (acc_max,),
                            (int(b_lo), int(b_hi)))


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
    counted = None  # an xnor popcount's K: each of its terms is a match (0 or 1), whatever the weight
    if op in _MVAU or op in _VVAU:
        xnor = bool(node_attr(node, "binaryXnorMode", 0))
        w = finn_weights(model, node, xnor)
        rows = w.T if op in _MVAU else w.reshape(w.shape[0], -1)
        if xnor:  # popcount of K xnor matches
            lo, hi, counted = 0, 1, rows.shape[1]
            acc_min, acc_max = np.zeros(rows.shape[0], dtype=np.int64), np.full(rows.shape[0], rows.shape[1])
        else:
            idt = node_attr(node, "inputDataType", "")
            annotated = model.get_tensor_datatype(node.input[0])
            if annotated.is_integer() and annotated.name != idt:
                raise CannotCertify(f"{node_label(node)} has inputDataType {idt}, its input '{node.input[0]}' is "
                                    f"annotated {annotated.name}")
            lo, hi, _ = mac_codes(dtype_grid(idt, f"inputDataType of {node_label(node)}"), zero_point)
            masks = pixel_masks(model, node) if op in _MVAU else None
            if masks is None:
                parts = [rows]
                acc_min, acc_max = row_ranges(rows, lo, hi)
            elif masks.shape[1] != rows.shape[1]:
                raise CannotCertify(f"{node_label(node)} reads {masks.shape[1]} pixel-padded inputs, not its "
                                    f"{rows.shape[1]}")
            else:
                acc_min, acc_max = masked_row_ranges(rows, lo, hi, masks)
    elif op == "XnorPopcountMatMul" and node.domain in ("qonnx.custom_op.general", "onnx.brevitas"):
        # qonnx computes (bipolar(x) @ bipolar(W) + K) / 2: a count of matching bits only for inputs of 0 and 1
        lo, hi, _ = mac_codes(InputCodes(model, input_dtypes, zero_point, input_ranges).grid(node.input[0]), zero_point)
        if lo < 0 or hi > 1:
            raise CannotCertify(f"{node_label(node)} counts 0/1 inputs; its input's codes span [{lo}, {hi}]")
        rows = finn_weights(model, node, True).T
        counted = rows.shape[1]
        acc_min, acc_max = np.zeros(rows.shape[0], dtype=np.int64), np.full(rows.shape[0], rows.shape[1])
    elif op == "MatMul" and reads_graph_input(model, node.input[1]) or integer_act_x_act(model, node):
        if tile is not None:
            raise CannotCertify(f"{node_label(node)} multiplies two activations; tiled ranges are not certified for it")
        codes = None if op in INTEGER_MACS else InputCodes(model, input_dtypes, zero_point, input_ranges)
        return _certify_act_x_act(model, node, codes, zero_point)
    elif op in ("Conv", "ConvTranspose", "Gemm", "MatMul") or op in INTEGER_MACS:
        blocks = None
        if op in INTEGER_MACS:
            if node.domain not in INTEGER_MAC_DOMAINS.get(op, ("", "ai.onnx")):
                raise CannotCertify(f"{node_label(node)} is from domain '{node.domain}', not the integer op of that name")
            w, lo, hi, pad = integer_operands(model, node, zero_point)
            op = INTEGER_MACS[op][0]
        else:
            w, blocks = weight_view(model, node.input[1], zero_point)
            codes = InputCodes(model, input_dtypes, zero_point, input_ranges)
            # a depthwise Conv (one input channel per output channel) sums codes of one step with per-channel scales
            depthwise = op == "Conv" and node.domain in ("", "ai.onnx") and w.ndim > 2 and w.shape[1] == 1
            grid = codes.grid(node.input[0], per_channel_scale=depthwise)
            if grid.scale_axis not in (None, 1):
                raise CannotCertify(f"the input of {node_label(node)} has one scale per index of axis "
                                    f"{grid.scale_axis}, not of its channels")
            lo, hi, pad = mac_codes(grid, zero_point)
        if op == "Gemm" and node_attr(node, "transA", 0):
            raise CannotCertify(f"{node_label(node)} transposes its data input")
        if blocks is not None and op in ("Conv", "ConvTranspose") and not np.all(
                blocks.reshape(blocks.shape[0], -1) == blocks.reshape(blocks.shape[0], -1)[:, :1]):
            raise CannotCertify(f"the block-wise weight scales of {node_label(node)} split its accumulation")
        if op == "Conv":
            acc_min, acc_max, pad_code = conv_ranges(model, node, w, lo, hi, pad)
            parts = [w.reshape(w.shape[0], -1)]
        elif op == "ConvTranspose":
            acc_min, acc_max = conv_transpose_ranges(node, w, lo, hi)
        elif w.ndim != 2:
            raise CannotCertify(f"{node_label(node)} has a {w.ndim}-D weight")
        else:
            transposed = op == "Gemm" and node_attr(node, "transB", 0)
            rows = w if transposed else w.T
            parts = accumulations(rows, None if blocks is None else (blocks if transposed else blocks.T), node)
            ranges = [row_ranges(part, lo, hi) for part in parts]
            acc_min = np.min(np.stack([r[0] for r in ranges]), axis=0)
            acc_max = np.max(np.stack([r[1] for r in ranges]), axis=0)
    else:
        raise CannotCertify(f"{node_label(node)} is not a MAC layer")
    tile_range = running_range = None
    if tile is not None and counted is not None:  # a tile counts at most its own terms, the running sum all K
        tile_range, running_range = (0, min(tile, counted)), (0, counted)
    elif tile is not None:
        if parts is None:
            raise CannotCertify(f"{node_label(node)}: tiled partial sums are certified for MatMul, Gemm, Conv and FINN "
                                "MVAU/VVAU only")
        # a padded tap holds pad_code: with it among the codes every tile's terms range over a box holding all
        # they take (the reader's view of such a Conv; exact once every tile can reach a border pattern)
        box = (lo, hi) if pad_code is None else (min(lo, pad_code), max(hi, pad_code))
        tile_range, running_range = stage_ranges(parts, int(box[0]), int(box[1]), tile)
    return LayerCertificate(node_name, (int(lo), int(hi)), pad_code,
                            tuple(int(v) for v in acc_min), tuple(int(v) for v in acc_max),
                            tile=tile, tile_range=tile_range, running_range=running_range)
