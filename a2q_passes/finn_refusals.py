"""What FINN's flow cannot take, found before (or, for a failure inside FINN, explained after) its steps run.

FINN's transformations assume their input is in the form its own exporters write; on anything else they fail deep
inside (a numpy reshape error, a bare assertion) naming neither the node nor the construct. Each check here names the
nodes and says what to do instead, as a :class:`~a2q_passes.errors.LoweringError`.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import LoweringError
from a2q_passes.finn_deconv import conv_transpose_obstacles, refuse_conv_transposes
from a2q_passes.finn_quant_forms import grouped_conv_obstacle, is_grouped_conv, is_qdq_node, weight_shape
from a2q_passes.finn_zero_points import MIDPOINT_ROUNDING, zero_point_refusals
from a2q_passes.graph_values import get_constant, node_attr, node_str_attr
from a2q_passes.input_grids import value_origin
from a2q_passes.layers import computed_from_constants


LOW_PRECISION_FLOATS = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


def refuse_low_precision_floats(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming the float16/bfloat16 tensors of a graph: FINN's conversion, its thresholds
    and its execution compute in float32 (one fails deep inside with "Shape broadcast mismatch")."""
    typed = [(vi.name, vi.type.tensor_type.elem_type)
             for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info)]
    typed += [(init.name, init.data_type) for init in model.graph.initializer]
    found = sorted({name for name, elem in typed if elem in LOW_PRECISION_FLOATS})
    if found:
        kinds = sorted({LOW_PRECISION_FLOATS[elem] for _, elem in typed if elem in LOW_PRECISION_FLOATS})
        raise LoweringError(f"the graph holds {' and '.join(kinds)} tensors ({', '.join(map(repr, found[:6]))}"
                            f"{', ...' if len(found) > 6 else ''}); FINN's conversion and thresholds compute in "
                            "float32. Lower a float32 copy of the model (its integer codes and scales are the same)")


def refuse_before_preparation(model: ModelWrapper) -> None:
    """What ``lower`` and the FINN build steps refuse before FINN's preparation runs: float16/bfloat16 graphs,
    convolutions FINN's flow cannot lower and weight scales along a summed axis."""
    refuse_low_precision_floats(model)
    refuse_unlowerable_convs(model)
    refuse_weight_scales_along_summed_axes(model)


def refuse_unlowerable_convs(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each convolution FINN's flow cannot lower: in qonnx's channels-last form,
    not 1-D or 2-D, or reading a batch of more than one image (grouped ones: :func:`refuse_grouped_convs`), and each
    ``ConvTranspose`` FINN's pixel-padding lowering cannot compute
    (:func:`~a2q_passes.finn_deconv.conv_transpose_obstacles`).

    Why here: qonnx's ``LowerConvsToMatMul`` (inside FINN's streamlining) fails on any other with a numpy reshape
    error or "list index out of range", naming neither the node nor the construct. FINN's sliding-window
    layers take one image at a time: a batch of 4 fails only when the lowered graph executes ("cannot reshape array
    of size 1600 into shape (1,10,10,4)").
    """
    from a2q_passes.read_only_model import with_inferred_shapes

    channels_last = [node.name or node.output[0] for node in model.graph.node
                     if node.op_type == "Conv" and node.domain == "qonnx.custom_op.channels_last"]
    if channels_last:
        raise LoweringError(f"Conv {', '.join(map(repr, channels_last))} in qonnx's channels-last form "
                            "(ConvertToChannelsLastAndClean), which FINN's flow does not take (its LowerConvsToMatMul "
                            "fails on it); lower the model as exported, before that transformation: FINN's "
                            "streamlining makes its own channels-last layout")
    shaped = with_inferred_shapes(model)
    refuse_conv_transposes(conv_transpose_obstacles(model, shaped))
    other_dims, batched = [], []
    for node in model.graph.node:
        shape = weight_shape(model, shaped, node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        batch = (shaped.get_tensor_shape(node.input[0]) or [1])[0] if node.op_type in ("Conv", "ConvTranspose") else 1
        if isinstance(batch, int) and batch > 1:
            batched.append(f"{node.name or node.output[0]!r} (batch {batch})")
        if shape is not None and len(shape) not in (3, 4):  # 1-D ones go through FINN's 1-D flow (finn_flow)
            other_dims.append(f"{node.name or node.output[0]!r} ({len(shape) - 2}-D)")
    if other_dims:
        raise LoweringError(f"FINN lowers only 1-D and 2-D convolutions; Conv {', '.join(other_dims)} cannot be "
                            "lowered. Keep the layer out of the FINN part.")
    if batched:
        raise LoweringError(f"FINN's convolution layers take one image at a time; Conv {', '.join(batched)} cannot be "
                            "lowered. Export the model with batch size 1 (or set it with qonnx's ChangeBatchSize(1)) "
                            "and lower that.")


def refuse_weight_scales_along_summed_axes(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each MAC layer whose weight scale varies along an axis it sums over.

    Why: no integer MVAU computes such a layer (each product has its own step), and FINN's ``FoldQuantWeights`` moves
    the scale behind the layer as one ``Mul`` all the same, which broadcasts to another shape ("Shape broadcast
    mismatch" deep in ``step_convert_to_hw``) or computes other values.
    """
    from a2q_passes.layers import SCALE_ALONG_SUMMED_AXIS, find_mac_layers

    along = [repr(layer.node) for layer in find_mac_layers(model) if SCALE_ALONG_SUMMED_AXIS in layer.status]
    if along:
        raise LoweringError(f"the weight scale of layer {', '.join(along)} varies along an axis the layer sums over, "
                            "so its products are no single integer accumulation and no MVAU computes it; quantize "
                            "its weights per output channel or per tensor, or keep the layer out of the FINN part")


def refuse_grouped_convs(model: ModelWrapper) -> None:
    """After :func:`~a2q_passes.finn_quant_forms.finn_preparation`: raise :class:`LoweringError` naming each grouped,
    not depthwise, ``Conv`` its ``GroupedConvAsDense`` left (its weights in a form that rewrite does not take), and why;
    and each depthwise ``Conv`` of bipolar weights on bipolar inputs.

    Why: FINN lowers only ``group=1`` and depthwise convolutions; on a grouped one qonnx's ``LowerConvsToMatMul``
    fails with "cannot reshape array", naming neither the node nor the construct. A depthwise one becomes a MatMul
    with zeros between the channels, which FINN's ``ConvertBipolarMatMulToXnorPopcount`` (weights ``(w + 1) / 2``)
    turns into weights of 0.5 where both operands are bipolar (found by the property fuzzer: the lowering then
    failed reading an MVAU "annotated BINARY but holds non-integers").
    """
    from a2q_passes.read_only_model import with_inferred_shapes

    shaped = with_inferred_shapes(model)
    left = [f"{node.name or node.output[0]!r} ({grouped_conv_obstacle(model, node)})" for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 1
            and is_grouped_conv(node, weight_shape(model, shaped, node.input[1]))]
    bipolar = [repr(node.name or node.output[0]) for node in model.graph.node
               if node.op_type == "Conv" and len(node.input) > 1 and int(node_attr(node, "group", 1)) > 1
               and not is_grouped_conv(node, weight_shape(model, shaped, node.input[1]))
               and _bipolar(model, node.input[0]) and _bipolar(model, node.input[1])]
    if bipolar:
        raise LoweringError(f"depthwise Conv {', '.join(bipolar)} multiplies bipolar weights with bipolar inputs: "
                            "FINN lowers it as a MatMul with zeros between the channels, which its XNOR-popcount "
                            "conversion turns into weights of 0.5, so FINN has no correct layer for it. Give its "
                            "weights 2 or more bits, or its input other codes; a2q analyze/project/verify read it as "
                            "it is.")
    if left:
        raise LoweringError(f"FINN lowers only plain (group=1) and depthwise convolutions, and a2q lowers a grouped "
                            f"one as a group=1 Conv with block-diagonal weights only where it can rewrite them; "
                            f"grouped Conv {', '.join(left)} cannot be. Quantize its weights with a QONNX Quant (zero "
                            "point 0, scale per tensor or per output channel) or keep the layer out of the FINN part.")


def _one_bit(model: ModelWrapper, node: NodeProto) -> bool:
    """Whether ``node`` is a ``Quant`` of one constant bit (signed: executed as bipolar; unsigned: codes 0 and 1)."""
    bits = get_constant(model, node.input[3]) if node.op_type in ("Quant", "IntQuant") and len(node.input) > 3 else None
    return bits is not None and np.size(bits) == 1 and float(np.asarray(bits).reshape(-1)[0]) == 1.0


def _bipolar(model: ModelWrapper, tensor: str) -> bool:
    """Whether ``tensor`` carries bipolar values (-1/+1 times a scale) past ops that only move them: a
    ``BipolarQuant``'s, a 1-bit signed ``Quant``'s (qonnx executes it as bipolar) or a tensor annotated BIPOLAR."""
    origin = value_origin(model, tensor)
    producer = model.find_producer(origin)
    if producer is None:
        return model.get_tensor_datatype(origin).name == "BIPOLAR"
    return producer.op_type == "BipolarQuant" or (_one_bit(model, producer) and bool(node_attr(producer, "signed", 1)))


def refuse_unconvertible_quantizers(model: ModelWrapper) -> None:
    """After :func:`~a2q_passes.finn_quant_forms.finn_preparation` (Q/DQ chains are Quant nodes by then): raise
    :class:`LoweringError` naming the quantizers FINN's conversion cannot take (Q/DQ nodes left, zero points)."""
    refuse_unconverted_qdq(model)
    refuse_zero_points(model)
    refuse_rounding_modes(model)
    refuse_rounding_truncs(model)
    refuse_unsigned_one_bit_activations(model)
    refuse_signed_quants_after_relu(model)


def refuse_signed_quants_after_relu(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each signed activation ``Quant`` right after a ``Relu`` that the
    preparation left signed (``finn_quant_forms.UnsignedQuantAfterRelu`` takes zero point 0, positive scales, an
    integer bit width, and one scale at 2 bits): FINN's conversion refuses them without naming one ("FINN only
    supports unsigned and non-narrow Quant nodes for Relu activations")."""
    found = [repr(node.name or node.output[0]) for node in model.graph.node
             if node.op_type == "Quant" and node_attr(node, "signed", 1)
             and (producer := model.find_producer(node.input[0])) is not None and producer.op_type == "Relu"
             and np.all(get_constant(model, node.input[2]) == 0)]  # zero points: see finn_zero_points
    if found:
        raise LoweringError(f"FINN converts a Quant right after a Relu only when it is unsigned, and {', '.join(found)} "
                            "could not be made so exactly (a negative scale, one scale per channel at 2 bits, or a "
                            "fractional bit width). Quantize that activation unsigned (Brevitas' QuantReLU) with one "
                            "scale for FINN; a2q analyze/project/verify read the model as it is.")


def refuse_unconverted_qdq(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming the Q/DQ (and onnxruntime QOperator/dynamic) nodes the preparation left.

    Why: FINN's conversion reads QONNX ``Quant`` nodes only, and :class:`~a2q_passes.finn_quant_forms.QuantFromQDQ`
    converts a Q/DQ graph only whole. On what is left FINN's steps either lower nothing or fail with messages that
    name no cause (onnxruntime's ``com.microsoft`` Q/DQ: "At least one output should be requested" from its
    constant folding).
    """
    left = [node for node in model.graph.node if is_qdq_node(node)]
    if left:
        kinds = "/".join(sorted({f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in left}))
        names = ", ".join(repr(n.name or n.output[0]) for n in left[:4]) + (", ..." if len(left) > 4 else "")
        raise LoweringError(
            f"this model quantizes with {kinds} nodes ({names}), and FINN converts QONNX Quant nodes only: qonnx's "
            "QCDQToQuant (run first) makes them only of graphs whose every node of these is in a QuantizeLinear -> "
            "[Clip] -> DequantizeLinear chain (Brevitas' QCDQ exports; a DequantizeLinear of stored 8, 16 or 32-bit "
            "integers gets its QuantizeLinear first, as onnxruntime's QDQ weights), not of 4-bit storage, block-wise "
            "DequantizeLinear, onnxruntime's com.microsoft Q/DQ or its QOperator/dynamic nodes. Lower a QONNX export "
            "of the model (Brevitas `export_qonnx`); `a2q analyze/project/verify` read it as it is")


def refuse_zero_points(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each ``Quant`` with a non-zero zero point that
    :mod:`a2q_passes.finn_zero_points` does not rewrite into a form FINN takes, with why.

    Why here: FINN's ``ConvertQONNXtoFINN`` takes only zero points of 0 ("Only Quant nodes with zero-point == 0 are
    currently supported"), and on a per-channel one it fails with numpy's "truth value of an array ... is ambiguous".
    """
    left = zero_point_refusals(model)
    if left:
        raise LoweringError("FINN converts only Quant nodes with a zero point of 0; a2q lowers other activation "
                            "quantizers (one positive scale and integer zero point per tensor, 2 to 8 bits, ROUND) as "
                            "thresholds with an output bias and weight quantizers with integer zero points as their "
                            f"codes q - z, but not these: {'; '.join(left)}. Export the model with such quantizers "
                            "(or symmetric ones) for FINN; a2q analyze/project/verify read it as it is.")


def refuse_rounding_modes(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each activation ``Quant`` that rounds other than to the nearest code.

    Why: FINN's ``ConvertQONNXtoFINN`` makes an activation ``Quant`` into thresholds at the midpoints between codes
    whatever its ``rounding_mode``: a ``CEIL``, ``FLOOR``, ``UP`` or ``DOWN`` quantizer is lowered half a step off,
    and the lowered graph differs from the model. Weight quantizers are folded into their values
    (executed), and a 1-bit signed ``Quant`` is executed as bipolar (its sign): neither depends on the mode here.
    """
    off = []
    for node in model.graph.node:
        if node.op_type not in ("Quant", "IntQuant") or get_constant(model, node.input[0]) is not None:
            continue
        mode = node_str_attr(node, "rounding_mode", "ROUND").upper()
        bipolar = _one_bit(model, node) and node_attr(node, "signed", 1)
        if mode not in MIDPOINT_ROUNDING and not bipolar:
            off.append(f"{node.name or node.output[0]!r} ({mode})")
    if off:
        raise LoweringError(f"FINN makes an activation Quant into thresholds halfway between codes whatever its "
                            f"rounding_mode, so {', '.join(off)} would be lowered half a step off. Export those "
                            "quantizers with rounding_mode ROUND for FINN; a2q analyze/project/verify read the model "
                            "as it is.")


def refuse_rounding_truncs(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each ``Trunc`` left with a rounding mode other than FLOOR (after
    :class:`~a2q_passes.finn_average_pooling.TruncDroppingNoBitsAsFloor`: it drops bits and rounds them).

    Why: FINN's ``QuantAvgPool2d`` floors; its conversion refuses any other mode with a message that names neither the
    node nor what to change ("The Trunc node must have the rounding_mode set to 'FLOOR'")."""
    found = [f"{node.name or node.output[0]!r} ({node_str_attr(node, 'rounding_mode', 'FLOOR').upper()})"
             for node in model.graph.node
             if node.op_type == "Trunc" and node_str_attr(node, "rounding_mode", "FLOOR").upper() != "FLOOR"]
    if found:
        raise LoweringError(f"Trunc {', '.join(found)} rounds the bits it drops, and FINN's QuantAvgPool2d floors them "
                            "(its conversion takes rounding_mode FLOOR only). Export Brevitas' TruncAvgPool2d with "
                            "trunc_quant=TruncTo8bit (FLOOR), or with a bit_width that holds the whole window sum "
                            "(nothing dropped: lower takes any mode there); a2q analyze/project/verify read the model "
                            "as it is.")


def refuse_unsigned_one_bit_activations(model: ModelWrapper) -> None:
    """Raise :class:`LoweringError` naming each activation ``Quant`` of 1 unsigned bit (codes 0 and 1).

    Why: FINN's ``ConvertQONNXtoFINN`` lowers every 1-bit activation ``Quant`` as bipolar (one threshold at 0, outputs
    -1 and +1 times twice the scale) whatever its ``signed`` attribute, so an unsigned one (Brevitas' 1-bit
    ``QuantReLU``) would be lowered to other values (a signed 2-bit ``Quant`` next to a ``Relu`` is made an unsigned
    2-bit one behind a ``Clip`` instead, see ``finn_quant_forms.UnsignedQuantAfterRelu``). Found by the property
    fuzzer: `lower` wrote a graph whose outputs differed by 32.
    """
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Quant", "IntQuant") or get_constant(model, node.input[0]) is not None:
            continue
        if _one_bit(model, node) and not node_attr(node, "signed", 1):
            found.append(repr(node.name or node.output[0]))
    if found:
        raise LoweringError(f"FINN lowers every 1-bit activation Quant as bipolar (-1/+1), so {', '.join(found)} "
                            "(1 unsigned bit: codes 0 and 1) would be lowered to other values. Quantize that "
                            "activation to 2 or more unsigned bits, or bipolar, for FINN; a2q analyze/project/verify "
                            "read the model as it is.")


# Producers whose output is an activation on an integer grid FINN's conversion makes thresholds or streams of.
_QUANTIZER_OPS = ("Quant", "IntQuant", "BipolarQuant", "MultiThreshold", "DequantizeLinear")


def _unquantized_source(model: ModelWrapper, tensor: str) -> str | None:
    """How ``tensor`` is made where that is not a quantizer (through ops that only move values), else None."""
    origin = value_origin(model, tensor)
    producer = model.find_producer(origin)
    if producer is None:
        graph_inputs = {i.name for i in model.graph.input}
        if origin in graph_inputs and not model.get_tensor_datatype(origin).is_integer():
            return f"the float graph input {origin!r}" + (f" (through {tensor!r})" if origin != tensor else "")
        return None
    if producer.op_type in _QUANTIZER_OPS:
        return None
    return f"{tensor!r} (from {producer.op_type} {producer.name or producer.output[0]!r})"


def explain_streamline_failure(model: ModelWrapper) -> str:
    """Sentences naming the elementwise Adds of ``model`` (the flow's input) that add an unquantized activation and
    the bipolar activations FINN cannot fold into the layer that reads them (:func:`_unfolded_bipolar_activations`),
    or "" where there is neither.

    Why: FINN lowers an Add of two activations only as ``AddStreams`` of two quantized inputs. An Add with an
    unquantized input (a residual whose skip branch or sum is left in float, as Brevitas' layerwise PTQ and qonnx's
    ``QuantizeGraph`` leave it) reaches streamlining transformations that take every Add's second input for a
    constant (``CollapseRepeatedAdd``, ``AbsorbAddIntoMultiThreshold``), which then fail on a bare assertion
    ("Initializer for add weights is not set") naming no node. Only called once FINN has failed: a graph FINN
    lowers is never refused for this.
    """
    return " ".join(cause for cause in (_unquantized_adds(model), _unfolded_bipolar_activations(model)) if cause)


def _unquantized_adds(model: ModelWrapper) -> str:
    """The sentence of :func:`explain_streamline_failure` on Adds of unquantized activations, or ""."""
    found, known = [], {}
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        # a bias: an initializer, a Constant node, or computed from them (a Quant of one, as QKeras exports write it)
        if any(computed_from_constants(model, t, known) for t in node.input):
            continue
        sources = [s for s in (_unquantized_source(model, t) for t in node.input) if s is not None]
        if sources:
            found.append(f"Add {node.name or node.output[0]!r} adds {' and '.join(sources)}")
    if not found:
        return ""
    return (f"Likely cause: {'; '.join(found)}, which no quantizer makes. FINN lowers an Add of two activations "
            "only as AddStreams of two quantized inputs: quantize both inputs of each such Add (Brevitas: a "
            "QuantIdentity on each branch, one shared quantizer where the scales must match) and export again; "
            "a2q analyze/project/verify read the model as it is.")


def _unfolded_bipolar_activations(model: ModelWrapper) -> str:
    """The sentence of :func:`explain_streamline_failure` on bipolar activations read by a node FINN's streamlining
    cannot fold their ``2 q - 1`` into (a ``Relu``, a pooling, a ``Clip``, a padded ``Conv``), or "".

    Why: FINN lowers a bipolar activation quantizer as thresholds giving 0/1 followed by ``x 2 - 1``, and folds that
    affine map only into a MAC layer that reads it directly without padding (a padded tap adds 0, not -1 or +1);
    otherwise it stays and FINN's HW conversion fails with "MultiThreshold out_scale must be 1", naming its own node.
    """
    found = []
    for node in model.graph.node:
        if node.op_type not in ("BipolarQuant", "Quant", "IntQuant") or not _bipolar(model, node.output[0]) \
                or computed_from_constants(model, node.output[0], {}):
            continue
        for reader in model.find_consumers(node.output[0]):
            padded = reader.op_type == "Conv" and (any(node_attr(reader, "pads", [])) or node_str_attr(
                reader, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"))
            if padded or reader.op_type in ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool"):
                found.append(f"{node.name or node.output[0]!r} is read by {reader.op_type} "
                             f"{reader.name or reader.output[0]!r}" + (" with zero padding" if padded else ""))
    if not found:
        return ""
    return (f"Likely cause: the bipolar activation {'; '.join(found)}. FINN lowers a bipolar quantizer as thresholds "
            "giving 0 or 1 followed by x 2 - 1, and folds that only into a MAC layer that reads it directly without "
            "padding: quantize that activation with 2 or more bits, or place it right before such a layer; a2q "
            "analyze/project/verify read the model as it is.")
