"""Per-layer accumulator analysis: joins graph discovery (:mod:`layers`) with the bound math (:mod:`bounds`).

Bias is added after the accumulator (FINN and Brevitas), so no bound here includes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.layers import KIND_WEIGHTS, MacLayer, find_mac_layers
from a2q_passes.read_only_model import ReadOnlyModel
from a2q_passes.weight_sources import saturated_weights

@dataclass
class LayerReport:
    """Accumulator facts of one MAC layer; JSON-ready through :meth:`to_json`."""

    node: str
    op_type: str
    K: int
    channels: int
    input_dtype: str | None
    weight_dtype: str | None  # act x act: the second operand's datatype
    status: str
    kind: str = KIND_WEIGHTS  # or KIND_ACT_X_ACT: a product of two activations, reported per output
    input_range: list[int] | None = None
    operand_range: list[int] | None = None  # act x act: the second operand's codes
    zero_point_convention: str | None = None
    acc_min: int | None = None
    acc_max: int | None = None
    acc_dtype: str | None = None
    bounds: dict[str, int | None] = field(default_factory=dict)
    per_channel: dict[str, list[int | None]] | None = None
    weight_block: int | None = None  # block-wise weight scales: terms per block (each block its own accumulator)
    # multi-stage datapath (analyze --tile T): every partial sum within a K-tile, every running sum of tile results
    tile: int | None = None
    tile_range: list[int] | None = None
    tile_bits: int | None = None
    outer_range: list[int] | None = None
    outer_bits: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelReport:
    layers: list[LayerReport]
    warnings: list[str]
    zero_point_convention: str
    input_ranges: str = "exact"

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "warnings": list(self.warnings),
            "zero_point_convention": self.zero_point_convention,
            "input_ranges": self.input_ranges,
            "notes": "bounds exclude the bias, which FINN and Brevitas add after the accumulator",
        }

    def by_node(self) -> dict[str, LayerReport]:
        return {layer.node: layer for layer in self.layers}


def _format_of(dtype_name: str | None, r: bounds.IntRange) -> tuple[int, bool]:
    """The paper's (bits, signed) for a datatype, falling back to the narrowest type holding ``r``."""
    if dtype_name:
        dt = DataType[dtype_name]
        if dt.min() <= r.lo and r.hi <= dt.max():
            return dt.bitwidth(), dt.signed()
    return bounds.integer_format(r)


def channel_ranges(layer: MacLayer, rows: np.ndarray,
                   sums: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel ``(acc_min, acc_max)`` of a layer given its integer rows.

    ``sums``: the rows' :func:`bounds.positive_negative_sums`, when the caller has them already.
    """
    if layer.binary_xnor:
        # popcount of K xnor terms: every count in [0, K] is reachable by choosing the inputs
        zeros = np.zeros(rows.shape[0], dtype=np.int64)
        row_min, row_max = zeros, zeros + rows.shape[1]
    elif sums is not None:
        row_min, row_max = bounds.range_from_sums(*sums, layer.grid.range)
    else:
        row_min, row_max = bounds.exact_accumulator_range(rows, layer.grid.range)
    return layer.layout.rows_to_channels(row_min, np.min), layer.layout.rows_to_channels(row_max, np.max)


def integer_view(model: ModelWrapper, layer: MacLayer) -> tuple[np.ndarray, bounds.IntRange]:
    """The layer as integer weight rows ``(rows, K)`` over the input codes ``x`` they multiply.

    The rows are :meth:`MacLayer.code_rows`: the stored integer codes where the MAC multiplies them unchanged (a
    view, no int64 copy of an int8 layer), so consumers widen what they need themselves.
    An activation x activation MatMul sums K products, each reaching both ends of
    :func:`bounds.product_range` independently of the others: every sum and partial sum then has
    the extremes of K unit weights on codes in that range, which is the view returned for it.
    """
    if layer.act_x_act:
        return np.ones((1, layer.K), dtype=np.int64), bounds.product_range(layer.grid.range, layer.operand_grid.range)
    return layer.code_rows(model), layer.grid.range


def stage_ranges(rows: np.ndarray, x: bounds.IntRange, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Layer-wide ``(inner, outer)`` ranges of a multi-stage datapath with K-tiles of ``tile`` terms
    (:func:`bounds.tile_stage_ranges`): every partial sum within a tile, every running sum of tile results.
    Both registers start at 0, so 0 is in both ranges."""
    inner_min, inner_max, outer_min, outer_max = bounds.tile_stage_ranges(rows, x, tile)
    return ((int(np.min(inner_min, initial=0)), int(np.max(inner_max, initial=0))),
            (int(np.min(outer_min, initial=0)), int(np.max(outer_max, initial=0))))


def xnor_stage_ranges(K: int, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(inner, outer)`` ranges of an xnor popcount's tiled datapath: a tile counts up to its own ``tile`` matches,
    the running sum up to all ``K`` (each reachable: every input bit equal to its weight bit)."""
    return (0, min(tile, K)), (0, K)


def _analyze_stages(model: ModelWrapper, layer: MacLayer, report: LayerReport, tile: int) -> None:
    """Both stages of a tiled datapath: ``tile_*`` for the inner accumulators, ``outer_*`` for the one summing them."""
    if layer.binary_xnor:
        inner, outer = xnor_stage_ranges(layer.K, tile)
    else:
        inner, outer = stage_ranges(*integer_view(model, layer), tile)
    report.tile, report.tile_range, report.outer_range = tile, list(inner), list(outer)
    report.tile_bits = int(bounds.accumulator_width(*inner))
    report.outer_bits = int(bounds.accumulator_width(*outer))


def analyze_layer(model: ModelWrapper, layer: MacLayer, per_channel: bool = False,
                  zero_point_convention: str = "fold", tile: int | None = None, compiled: bool = False) -> LayerReport:
    """Bounds and exact range of one layer (only the header for layers that are not ``ok``).

    ``tile``: also the ranges and widths of both stages of a multi-stage datapath with K-tiles of that many terms.
    ``compiled``: sum 8-bit weights with :mod:`a2q_passes.sum_kernels` (numba; the same results).
    """
    report = LayerReport(layer.node, layer.op_type, layer.K, layer.channels, layer.input_dtype,
                         layer.weight_dtype, layer.status, layer.kind)
    if layer.layout is not None and layer.layout.kind == "blocks":
        report.weight_block = layer.layout.block
    if not layer.ok:
        return report
    if tile is not None:
        _analyze_stages(model, layer, report, tile)
    x = layer.grid.range
    report.input_range = [x.lo, x.hi]
    weight_zero_point = layer.source is not None and (layer.source.zero_offset is not None
                                                      or layer.source.raw_zero_point)
    report.zero_point_convention = zero_point_convention if layer.grid.zero_code or weight_zero_point else None
    if layer.act_x_act:
        _analyze_act_x_act(layer, report, per_channel, zero_point_convention)
        return report
    rows = layer.code_rows(model)  # one pass over the weights: every figure below derives from pos/neg
    pos, neg = bounds.positive_negative_sums(rows, compiled=compiled)
    acc_min, acc_max = channel_ranges(layer, rows, (pos, neg))
    report.acc_min, report.acc_max = int(acc_min.min()), int(acc_max.max())
    report.acc_dtype = bounds.accumulator_datatype_name(report.acc_min, report.acc_max)
    exact_per_channel = bounds.accumulator_width(acc_min, acc_max)
    l1_rows = pos + neg
    l1 = layer.layout.rows_to_channels(l1_rows, np.max)
    if layer.binary_xnor:
        popcount = bounds.unsigned_accumulator_width(layer.K)
        l1_bits = np.full(acc_min.shape, popcount)
        datatype_bits, zc_bits = popcount, None
    else:
        n_bits, x_signed = _format_of(layer.input_dtype, x)
        w = layer.source.weight_range
        m_bits, w_signed = _format_of(layer.weight_dtype, w)
        datatype_bits = bounds.datatype_bound_bits(layer.K, n_bits, x_signed, m_bits, w_signed)
        l1_bits = bounds.l1_bound_bits(l1, n_bits, x_signed)
        zero_sum = layer.layout.rows_to_channels(pos == neg, np.all)  # sum q = pos - neg
        zc_rows = bounds.zero_centered_bound_bits(l1, x) if x.hi > x.lo else l1_bits
        zc_bits = int(np.max(zc_rows)) if zero_sum.all() else None
    report.bounds = {
        "datatype": int(datatype_bits),
        "l1": int(np.max(l1_bits)),
        "zero_centered": zc_bits,
        "exact": int(bounds.accumulator_width(report.acc_min, report.acc_max)),
    }
    if per_channel:
        report.per_channel = {
            "acc_min": [int(v) for v in acc_min],
            "acc_max": [int(v) for v in acc_max],
            "exact": [int(v) for v in exact_per_channel],
            "l1_norm": [int(v) for v in l1],
            "l1": [int(v) for v in np.broadcast_to(l1_bits, acc_min.shape)],
        }
    return report


def _analyze_act_x_act(layer: MacLayer, report: LayerReport, per_channel: bool, zero_point_convention: str) -> None:
    """One range for every output of an activation x activation MatMul (no channels, no weights).

    The l1 bound (``|acc| <= ||w||_1 max|x|`` for constant weights ``w``) has no weights to measure
    here: the tightest bound of its kind over the second operand's codes is the exact range itself,
    so the report gives the exact width under ``l1`` too. The A2Q+ zero-centred bound needs weights
    that sum to zero: not applicable.
    """
    a, b = layer.grid.range, layer.operand_grid.range
    report.operand_range = [b.lo, b.hi]
    if layer.operand_grid.zero_code:
        report.zero_point_convention = zero_point_convention
    report.acc_min, report.acc_max = layer.act_x_act_range()
    report.acc_dtype = bounds.accumulator_datatype_name(report.acc_min, report.acc_max)
    exact = int(bounds.accumulator_width(report.acc_min, report.acc_max))
    n_bits, a_signed = _format_of(layer.input_dtype, a)
    m_bits, b_signed = _format_of(layer.weight_dtype, b)
    report.bounds = {"datatype": int(bounds.datatype_bound_bits(layer.K, n_bits, a_signed, m_bits, b_signed)),
                     "l1": exact, "zero_centered": None, "exact": exact}
    if per_channel:  # one "channel": every output shares the range
        report.per_channel = {"acc_min": [report.acc_min], "acc_max": [report.acc_max], "exact": [exact], "l1": [exact]}


# Weights (over every layer read) from which analyze sums 8-bit weights with numba's kernels: numpy sums them about
# 0.26 s/GB slower on the benchmark machine, and importing numba with the cached kernels takes about 0.7 s, i.e.
# break-even near 2.7e9 int8 weights (a 14-layer Llama-7B-shaped stack); smaller models never import numba.
COMPILED_SUMS_MIN_WEIGHTS = 3 << 30


def analyze_model(
    model: ModelWrapper,
    input_dtypes: dict[str, str] | None = None,
    zero_point: str = "fold",
    per_channel: bool = False,
    input_ranges: str = "exact",
    tile: int | None = None,
) -> ModelReport:
    """Analyse every MAC layer of ``model``; never raises for a single unsupported layer.

    ``input_ranges``: the quantizers' exact codes or FINN's DataType of them (:data:`a2q_passes.layers.INPUT_RANGES`).
    ``tile``: also report both stages of a multi-stage datapath with K-tiles of ``tile`` terms.
    """
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of terms, got {tile}")
    model = ReadOnlyModel(model.model)  # graph lookups in dicts: the analysis changes nothing
    layers = find_mac_layers(model, input_dtypes, zero_point, input_ranges)
    compiled = sum(layer.K * layer.channels for layer in layers if layer.ok and not layer.act_x_act) \
        >= COMPILED_SUMS_MIN_WEIGHTS
    reports = [analyze_layer(model, layer, per_channel, zero_point, tile, compiled) for layer in layers]
    warnings = []
    quantized = [r for r in reports if r.status != "weights not quantized"]
    if not quantized:
        warnings.append("no quantized MAC layer found (Conv/ConvTranspose/Gemm/MatMul with quantized "
                        "constant weights, QLinearConv/QLinearMatMul/QGemm/ConvInteger/MatMulInteger, "
                        "a MatMul of two quantized activations, or FINN MVAU/VVAU)")
    warnings.extend(f"{r.node}: {r.status}" for r in reports if r.status.startswith("unsupported"))
    warnings.extend(saturation_warnings(model, layers))
    return ModelReport(reports, warnings, zero_point, input_ranges)


# Share of a layer's weights its quantizer may saturate before analyze says so: a weight quantizer whose scale was
# computed from the weights saturates none (Brevitas, onnxruntime) or a few outliers (QKeras' quantized_bits)
SATURATED_WARNING_FRACTION = 0.01


def saturation_warnings(model: ModelWrapper, layers: list[MacLayer]) -> list[str]:
    """A warning for each layer whose weight quantizer saturates many of the weights it is given.

    Why: Brevitas (0.13, both exporters) writes an accumulator-aware weight quantizer (A2Q, A2Q+) as its latent,
    unnormalised weights under the scale of the normalised ones, so the file's quantizer clips most of them to the
    largest codes: the file then computes other weights than the trained model, and the width Brevitas promised
    does not hold for it. The widths reported are the file's, which is what runs; the user should know why.
    """
    warnings = []
    for layer in layers:
        if not layer.ok or layer.act_x_act or layer.source is None:
            continue
        saturated, total, peak = saturated_weights(model, layer.source)
        if saturated > SATURATED_WARNING_FRACTION * total:
            codes = layer.source.storage_range or layer.source.weight_range
            warnings.append(
                f"{layer.node}: its weight quantizer saturates {saturated} of {total} weights "
                f"({100 * saturated / total:.1f}%; |weight / scale| reaches {peak:.1f} for codes in [{codes.lo}, "
                f"{codes.hi}]); the widths above are those of the saturated weights this file computes. Brevitas "
                "exports accumulator-aware weight quantizers (A2Q, A2Q+) this way, latent weights under the scale "
                "of the normalised ones: such a file does not compute the trained model's weights, and the "
                "accumulator width Brevitas trained for does not hold for it; compare the file's outputs with the "
                "torch model's")
    return warnings


INNER_REGISTER = "partial sum within a tile"  # the inner stage of a tiled datapath; every other register is outer


def register_ranges(layer: MacLayer, rows: np.ndarray, x: bounds.IntRange, mode: str,
                    tile: int | None) -> dict[str, tuple[int, int]]:
    """Layer-wide extremes of every accumulator register the datapath holds, over the input box ``x``."""
    acc_min, acc_max = bounds.exact_accumulator_range(rows, x) if layer.act_x_act else channel_ranges(layer, rows)
    ranges = {"final sum": (int(acc_min.min()), int(acc_max.max()))}
    if tile is not None:
        ranges[INNER_REGISTER], ranges["running sum of tile results"] = (
            xnor_stage_ranges(rows.shape[1], tile) if layer.binary_xnor else stage_ranges(rows, x, tile))
    elif mode == "saturate" and not layer.binary_xnor:  # a popcount's every prefix lies between 0 and the final count
        lo, hi = bounds.partial_sum_range(rows, x)
        ranges["prefix of the sum"] = (int(lo.min()), int(hi.max()))
    return ranges
