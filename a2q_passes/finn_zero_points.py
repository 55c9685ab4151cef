"""Activation quantizers with a zero point, made into FINN thresholds with an output bias before FINN's conversion.

FINN's ``ConvertQONNXtoFINN`` takes only ``Quant`` nodes whose zero point is 0 ("Only Quant nodes with zero-point == 0
are currently supported"), yet asymmetric activations are what onnxruntime's static quantizer writes by default
(uint8, a zero point per tensor from calibration) and what Brevitas' ``ShiftedUint8`` quantizers export. A QONNX
``Quant`` computes ``q = clip(round(x / s + z), qmin, qmax)`` and outputs ``(q - z) s``. Its code steps from
``qmin + k`` to ``qmin + k + 1`` at ``x = s (qmin + k + 1/2 - z)``, so a ``MultiThreshold`` with these thresholds
counts the steps, an output bias ``qmin - z`` makes the count the integer ``q - z``, and a ``Mul`` by ``s`` gives the
Quant's output. That is the form FINN's own conversion gives a zero-point-0 ``Quant`` once streamlining has absorbed
its bias into ``out_bias``, so FINN's streamlining and ``convert_to_hw`` take it as any other activation: the next
MVAU/VVAU reads ``q - z`` in the FINN DataType of ``[qmin - z, qmax - z]`` (``INT9`` for uint8 codes with ``z`` in
1..255), and a padded input reads 0, real 0. ``--input-ranges finn`` sizes layers for that type
(:func:`a2q_passes.weight_sources.codes_less_zero_point` serves both). A ``Relu`` that alone reads the quantizer
folds into its thresholds (the count becomes ``max(q - z, 0)``; FINN would leave it a float ``ElementwiseMax``, which
Brevitas' asymmetric graph-mode PTQ puts in front of its global pooling), and so does a ``Relu`` in front of it (FINN
removes a ``Relu`` only in front of a zero-point-0 quantizer): the thresholds at or below 0 go into the output bias.
A weight quantizer with a zero point becomes a zero-point-0 quantizer of the values ``(q - z) s`` it gives, which FINN
folds into integer weights ``q - z``.
"""

from __future__ import annotations

import json

import numpy as np
from onnx import NodeProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.base import Transformation

from a2q_passes.bounds import IntRange
from a2q_passes.finn_input_thresholds import quant_boundaries
from a2q_passes.graph_values import get_constant, node_attr, node_label, node_str_attr, sole_relu_reader
from a2q_passes.input_grids import quant_code_range
from a2q_passes.metadata import QUANTIZE_LINEAR_QUANTS_KEY, metadata_value, remove_metadata_value
from a2q_passes.read_only_model import with_inferred_shapes
from a2q_passes.weight_sources import codes_less_zero_point, dtype_for_range

# rounding modes FINN's thresholds halfway between codes compute, up to exact ties (x >= t sends every tie up;
# finn_tie_thresholds sends ties on integer accumulators where the mode does); refuse_rounding_modes names the others
MIDPOINT_ROUNDING = ("ROUND", "HALF_EVEN", "HALF_UP", "HALF_DOWN")
# MultiThreshold's data_layout by rank; FINN's streamlining reads it (an unset one is an unknown layout there)
_CHANNELS_FIRST = {2: "NC", 3: "NCW", 4: "NCHW"}
# FINN's ConvertQuantActToMultiThreshold converts activation quantizers of at most 8 bits (its default filter)
MAX_THRESHOLD_BITS = 8


def has_zero_point(model: ModelWrapper, node: NodeProto) -> bool:
    """Whether ``node`` is a ``Quant`` whose zero point is not known to be 0 everywhere."""
    if node.op_type not in ("Quant", "IntQuant") or len(node.input) < 3:
        return False
    zero = get_constant(model, node.input[2])
    return zero is None or bool(np.any(zero != 0))


def zero_point_obstacle(model: ModelWrapper, node: NodeProto) -> str | None:
    """Why :class:`ZeroPointActivationsAsThresholds` (or, for weights, :class:`ZeroPointWeightsAsCodes`) leaves
    ``Quant`` ``node`` (with a zero point) as it is, or ``None`` where it rewrites it."""
    scale, zero, bits = (get_constant(model, name) for name in node.input[1:4])
    if scale is None or zero is None or bits is None:
        return "has a scale, zero point or bit width that is not a constant"
    if get_constant(model, node.input[0]) is not None:
        if np.any(zero != np.round(zero)) or np.size(bits) != 1 or float(np.asarray(bits).reshape(-1)[0]) < 2:
            return "quantizes weights with a non-integer zero point or a bit width below 2"
        return None
    if np.size(scale) != 1 or np.size(zero) != 1 or np.size(bits) != 1:
        return "has a per-channel scale or zero point (lowered here: one per tensor)"
    s, z, b = (float(np.asarray(v).reshape(-1)[0]) for v in (scale, zero, bits))
    if not (np.isfinite(s) and s > 0):
        return f"has scale {s} (lowered here: a positive one)"
    if z != round(z):
        return f"has the non-integer zero point {z}"
    if b != int(b) or not 2 <= b <= MAX_THRESHOLD_BITS:
        return f"has bit width {b:g} (FINN makes thresholds of 2 to {MAX_THRESHOLD_BITS}-bit activations)"
    if node_str_attr(node, "rounding_mode", "ROUND").upper() not in MIDPOINT_ROUNDING:
        return f"rounds with {node_str_attr(node, 'rounding_mode', 'ROUND')} (thresholds halfway between codes need ROUND)"
    producer = model.find_producer(node.input[0])
    if producer is not None and producer.op_type == "Relu" and not _codes_above_zero_point(model, node):
        return "quantizes a Relu output and has no code above its zero point (its output would be one constant)"
    return None


def _codes_above_zero_point(model: ModelWrapper, node: NodeProto) -> bool:
    """Whether some code of the activation ``Quant`` ``node`` (constant parameters) lies above its zero point: real
    values > 0 then reach more than one code, and a ``Relu`` next to it can fold into its thresholds."""
    bits, zero = (float(np.asarray(get_constant(model, name)).reshape(-1)[0]) for name in (node.input[3], node.input[2]))
    codes = quant_code_range(bits, bool(node_attr(node, "signed", 1)), bool(node_attr(node, "narrow", 0)), "ROUND")
    return codes.hi > zero


def _rewritten(model: ModelWrapper, weights: bool) -> list[NodeProto]:
    """The ``Quant`` nodes with a zero point that :func:`zero_point_obstacle` passes, of weights (a constant input)
    or of activations."""
    return [node for node in model.graph.node if has_zero_point(model, node) and zero_point_obstacle(model, node) is None
            and (get_constant(model, node.input[0]) is not None) == weights]


def zero_point_thresholds(scale: float, zero: int, bits: int, signed: bool, narrow: bool, mode: str = "ROUND",
                          quantize_linear: bool = False, relu_before: bool = False,
                          relu_after: bool = False) -> tuple[np.ndarray, int, str]:
    """``(thresholds, out_bias, out_dtype)`` of the ``MultiThreshold`` that computes ``q - z`` of a per-tensor
    ``Quant`` rounding with ``mode``: one row of float32 thresholds ``s (qmin + k + 1/2 - z)``, computed in float64 as
    FINN computes its own, then moved onto the ``Quant``'s exact float32 decision boundaries
    (:func:`~a2q_passes.finn_input_thresholds.quant_boundaries`: an exact tie goes where ``mode`` sends it, where
    FINN's ``x >= t`` sends every tie up; with a zero point FINN's later tie repair cannot tell a code's parity), or
    with ``quantize_linear`` those of the ``QuantizeLinear`` the ``Quant`` was made from.
    ``relu_before``: of ``Relu(x)`` where it reads ``x``; ``relu_after``: ``max(q - z, 0)``, a ``Relu`` behind it.

    Why both folds are exact (the thresholds increase and count ``c = q - qmin`` of them lie at or below ``x``): a
    ``Relu`` in front makes ``x < 0`` into 0, which passes exactly the thresholds at or below 0, as every ``x >= 0``
    does, so those go into the output bias; ``max(qmin - z + c, 0)`` behind counts only the thresholds from the
    ``(z - qmin)``-th on (``s > 0`` keeps the sign). The type is then that of the codes left, within the unfolded
    one (which ``--input-ranges finn`` sizes the next layer for)."""
    codes = quant_code_range(bits, signed, narrow, "ROUND")
    shifted, dtype = codes_less_zero_point(codes, zero)
    steps = np.arange(codes.hi - codes.lo, dtype=np.float64)
    thresholds = (np.float64(scale) * (shifted.lo + steps + 0.5)).astype(np.float32).reshape(1, -1)
    exact = quant_boundaries(thresholds, scale, zero, bits, signed, narrow, mode, quantize_linear)
    thresholds = thresholds if exact is None else exact
    bias = shifted.lo
    if relu_before:
        passed = int(np.count_nonzero(thresholds <= 0))
        thresholds, bias = thresholds[:, passed:], bias + passed
    if relu_after and bias < 0:
        thresholds, bias = thresholds[:, -bias:], 0
    if bias != shifted.lo:  # FINN wants an unsigned type where the codes start at 0 or above
        dtype = dtype_for_range(IntRange(bias, shifted.hi))
    return thresholds, bias, dtype


class ZeroPointActivationsAsThresholds(Transformation):
    """Each activation ``Quant`` with a non-zero zero point that :func:`zero_point_obstacle` passes becomes
    ``MultiThreshold`` (output bias ``qmin - z``) -> ``Mul`` by its scale (see the module docstring)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed, shaped = False, with_inferred_shapes(model)
        quantize_linear = set(json.loads(metadata_value(model, QUANTIZE_LINEAR_QUANTS_KEY) or "[]"))
        for node in _rewritten(model, weights=False):
            scale, zero, bits = (float(np.asarray(get_constant(model, name)).reshape(-1)[0]) for name in node.input[1:4])
            producer = model.find_producer(node.input[0])
            before = producer if producer is not None and producer.op_type == "Relu" else None
            relu = sole_relu_reader(model, node)  # folded in: FINN would leave it a float ElementwiseMax
            if relu is not None and not _codes_above_zero_point(model, node):
                relu = None  # the Relu outputs 0 only: left as it is
            thresholds, bias, dtype = zero_point_thresholds(scale, int(zero), int(bits), bool(node_attr(node, "signed", 1)),
                                                            bool(node_attr(node, "narrow", 0)),
                                                            node_str_attr(node, "rounding_mode", "ROUND").upper(),
                                                            node.output[0] in quantize_linear, before is not None,
                                                            relu is not None)
            base = node.name or node.output[0]
            model.set_initializer(f"{base}_thresholds", thresholds)
            model.set_initializer(f"{base}_threshold_scale", np.asarray(scale, dtype=np.float32))
            source = node.input[0] if before is None else before.input[0]
            counted = helper.make_node("MultiThreshold", [source, f"{base}_thresholds"], [f"{base}_codes"],
                                       name=f"{base}_thresholds", domain="qonnx.custom_op.general",
                                       out_dtype=dtype, out_bias=float(bias))
            layout = _CHANNELS_FIRST.get(len(shaped.get_tensor_shape(node.input[0]) or ()))
            if layout is not None:  # as FINN's own conversion gives a per-tensor row: the input's (ONNX) layout
                counted.attribute.append(helper.make_attribute("data_layout", layout))
            output = node.output[0] if relu is None else relu.output[0]
            scaled = helper.make_node("Mul", [f"{base}_codes", f"{base}_threshold_scale"], [output],
                                      name=f"{base}_scale")
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            if relu is not None:
                model.graph.node.remove(relu)
            if before is not None and not model.find_consumers(before.output[0]) and before.output[0] not in {
                    o.name for o in model.graph.output}:
                model.graph.node.remove(before)
            model.graph.node.insert(index, scaled)
            model.graph.node.insert(index, counted)
            model.set_tensor_datatype(f"{base}_codes", DataType[dtype])
            model.set_tensor_datatype(output, DataType["FLOAT32"])
            changed = True
        if changed:  # qonnx's executor needs every tensor's shape
            from qonnx.transformation.infer_shapes import InferShapes

            model = model.transform(InferShapes())
        if quantize_linear:  # read here only: the thresholds keep what it said
            remove_metadata_value(model, QUANTIZE_LINEAR_QUANTS_KEY)
        return model, changed or bool(quantize_linear)


class ZeroPointWeightsAsCodes(Transformation):
    """Each weight ``Quant`` with a zero point (per tensor or per channel; Brevitas' ``ShiftedUint8`` weights) that
    :func:`zero_point_obstacle` passes becomes a zero-point-0 ``Quant`` of the values it gives, ``(q - z) s``, of the
    bit width and signedness that hold every ``q - z``: FINN folds it into the integer weights ``q - z`` (its
    ``FoldQuantWeights`` takes zero point 0 only), the weights ``--zero-point subtract`` sizes layers for. Exact:
    ``(q - z) s / s`` lies within float32 rounding of the integer ``q - z``, which rounds back to it inside the clamp.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.custom_op.general.intquant import int_quant

        changed = False
        for node in _rewritten(model, weights=True):
            weights, scale, zero, bits = (get_constant(model, name) for name in node.input[:4])
            signed, narrow = node_attr(node, "signed", 1), node_attr(node, "narrow", 0)
            mode = node_str_attr(node, "rounding_mode", "ROUND")
            values = int_quant(np.asarray(weights, np.float32), scale, zero, bits, signed, narrow, mode)
            codes = quant_code_range(float(np.asarray(bits).reshape(-1)[0]), bool(signed), bool(narrow), mode)
            every = IntRange(codes.lo - int(np.max(zero)), codes.hi - int(np.min(zero)))  # q - z over all channels
            dtype = DataType[dtype_for_range(every)]
            base = node.name or node.output[0]
            for suffix, value in (("values", values), ("zero", 0.0), ("bits", dtype.bitwidth())):  # FINN reads one 0
                model.set_initializer(f"{base}_{suffix}", np.asarray(value, dtype=np.float32))
            node.input[0], node.input[2], node.input[3] = f"{base}_values", f"{base}_zero", f"{base}_bits"
            quant = getCustomOp(node)
            for name, value in (("signed", int(dtype.signed())), ("narrow", 0), ("rounding_mode", "ROUND")):
                quant.set_nodeattr(name, value)
            changed = True
        return model, changed


def zero_point_passes() -> list[Transformation]:
    """The rewrites of this module, in order: run after :func:`~a2q_passes.finn_tie_thresholds.activation_tie_rule`
    has read the quantizers' rounding modes and zero points, right before FINN's conversion."""
    return [ZeroPointWeightsAsCodes(), ZeroPointActivationsAsThresholds()]


def zero_point_refusals(model: ModelWrapper) -> list[str]:
    """One line per ``Quant`` with a zero point that FINN's conversion will meet: each one the passes of
    :func:`zero_point_passes` leave, with why."""
    return [f"{node_label(node)} {reason}" for node in model.graph.node
            if has_zero_point(model, node) and (reason := zero_point_obstacle(model, node)) is not None]


def partial_range_threshold_bits(model: ModelWrapper) -> int | None:
    """The widest output DataType (in bits) among the ``MultiThreshold`` nodes of ``model`` whose codes
    ``[out_bias, out_bias + steps]`` are not their type's whole range, as those this module makes (``INT9`` for
    ``[-143, 112]``); ``None`` where there is none. FINN's ``InferRequantLayer`` makes a standalone ``MultiThreshold`` of
    ``requant_bitwidth_threshold`` bits or more into a ``Requant``, which clamps to the whole type: such nodes must
    stay ``Thresholding`` (a ``requant_bitwidth_threshold`` above this width)."""
    widths = []
    for node in model.graph.node:
        if node.op_type != "MultiThreshold":
            continue
        thresholds = model.get_initializer(node.input[1])
        dtype = DataType[node_str_attr(node, "out_dtype", "FLOAT32")]
        if thresholds is None or not dtype.is_integer() or dtype.bitwidth() < 2:
            continue
        lowest = float(node_attr(node, "out_bias", 0.0))
        if (lowest, lowest + thresholds.shape[-1]) != (dtype.min(), dtype.max()):
            widths.append(dtype.bitwidth())
    return max(widths, default=None)
