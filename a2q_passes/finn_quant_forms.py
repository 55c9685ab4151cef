"""Quantizer forms FINN's conversion refuses or breaks on, rewritten into equal forms it takes.

Passes run before ``ConvertQONNXtoFINN`` (:func:`finn_preparation`, in that order): by the lowering flow
(:mod:`a2q_passes.finn_flow`) and by the FINN build step ``step_a2q_finn_preparation``
(:mod:`a2q_passes.finn_steps`). Each rewrite computes exactly what the graph computed before (the lowering's
equivalence check executes both), and each exists because real files otherwise stop the conversion: what
Brevitas' graph-mode PTQ writes (``brevitas.graph.quantize`` / ``layerwise_quantize``, as ``brevitas_examples``'
``quantize_model`` runs them), files that leave ONNX's defaults out, Q/DQ exports, qonnx's ExtractQuantScaleZeroPt
output, Gemm nodes with alpha or beta other than 1, and grouped convolutions (FINN has no grouped MVAU).
"""

from __future__ import annotations

import json

import numpy as np
import qonnx.core.data_layout as DataLayout
from onnx import NodeProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.base import Transformation

from a2q_passes.conventions import LAYOUT_OPS
from a2q_passes.finn_average_pooling import (AveragePoolAsDepthwiseConv, QonnxDomainAtResolvedVersion,
                                             TruncDroppingNoBitsAsFloor)
from a2q_passes.finn_global_pooling import ReduceMeanAsGlobalAveragePool
from a2q_passes.graph_values import (auto_pads, clip_bounds, extracted_quant_scale, get_constant, node_attr, node_axes,
                                     node_str_attr, sole_relu_reader)
from a2q_passes.metadata import QUANTIZE_LINEAR_QUANTS_KEY, set_metadata_value

_BIASED_MACS = ("Conv", "ConvTranspose", "Gemm")  # their input 2 is a bias added to the accumulator


class UnsignedQuantAfterRelu(Transformation):
    """A signed ``Quant`` of a ``Relu`` output becomes the unsigned, non-narrow ``Quant`` of one bit less; a signed
    2-bit one (codes 0 and 1 there) the unsigned 2-bit ``Quant`` of ``Clip(x, 0, s)`` in place of the ``Relu``.

    Why: FINN converts a ``Relu`` followed by a ``Quant`` only when that ``Quant`` is unsigned and not narrow
    ("FINN only supports unsigned and non-narrow Quant nodes for Relu activations"); Brevitas' graph-mode PTQ
    quantizes the input of the next layer with a signed quantizer there. FINN lowers an unsigned 1-bit ``Quant`` as
    bipolar, so the 2-bit case keeps two bits and caps the reals at the scale instead (the ``Clip`` then folds into
    FINN's thresholds, :mod:`a2q_passes.finn_clip_thresholds`). Why it is exact: with zero point 0 and positive
    scales, ``x >= 0`` rounds to a code >= 0 in every rounding mode, so the signed clamp's lower end never acts and
    its upper end, ``2^(b-1) - 1``, is the upper end of an unsigned ``b - 1``-bit clamp. For ``b = 2`` that end is
    code 1: every rounding ``r`` is monotone with ``r(1) = 1``, so ``min(r(t), 1) = r(min(t, 1))`` for ``t >= 0``,
    and ``Clip(x, 0, s) / s`` is ``min(Relu(x) / s, 1)`` (``s / s`` is exactly 1 in float32). Quant nodes of any other
    form (a 2-bit one with per-channel scales among them) are left as they are (FINN then names its own objection).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in list(model.graph.node):
            bits = unsigned_bits_after_relu(model, node)
            if bits is None:
                continue
            if _signed_codes_at_or_above_zero_bits(model, node) == 1:  # signed 2-bit: codes 0 and 1
                _clip_at_the_scale(model, node)
            _make_unsigned(model, node, bits)
            changed = True
        return model, changed


def _clip_at_the_scale(model: ModelWrapper, quant: NodeProto) -> None:
    """Read ``quant``'s input through ``Clip(0, s)`` (its scale ``s``), in place of the ``Relu`` that makes it where
    nothing else reads that ``Relu``."""
    relu = model.find_producer(quant.input[0])
    name = quant.name or quant.output[0]
    low, high = f"{name}_clip_low", f"{name}_clip_high"
    model.set_initializer(low, np.zeros((), dtype=np.float32))
    model.set_initializer(high, np.asarray(get_constant(model, quant.input[1]), dtype=np.float32).reshape(()))
    if relu is not None and relu.op_type == "Relu" and model.find_consumers(relu.output[0]) == [quant] and \
            relu.output[0] not in {o.name for o in model.graph.output}:
        relu.op_type = "Clip"
        relu.input.extend([low, high])
        return
    clipped = f"{name}_clipped"
    shape = model.get_tensor_shape(quant.input[0])
    if shape is not None:  # qonnx's executor wants every shape
        model.set_tensor_shape(clipped, shape)
    index = list(model.graph.node).index(quant)
    model.graph.node.insert(index, helper.make_node("Clip", [quant.input[0], low, high], [clipped], name=f"{name}_clip"))
    quant.input[0] = clipped


def _make_unsigned(model: ModelWrapper, quant: NodeProto, bits: int) -> None:
    """Make ``quant`` the unsigned, non-narrow ``Quant`` of ``bits`` bits."""
    name = f"{quant.name or quant.output[0]}_unsigned_bit_width"
    model.set_initializer(name, np.asarray(bits, dtype=np.float32))
    quant.input[3] = name  # a bit width initializer of its own: Brevitas shares one among many quantizers
    custom = getCustomOp(quant)
    custom.set_nodeattr("signed", 0)
    custom.set_nodeattr("narrow", 0)


def unsigned_bits_after_relu(model: ModelWrapper, node: NodeProto) -> int | None:
    """The bit width of the unsigned ``Quant`` :class:`UnsignedQuantAfterRelu` makes of ``node`` (so the FINN
    DataType of its output becomes ``UINT`` of it): b - 1, and 2 for b = 2 (behind its ``Clip``, one scale only),
    or ``None`` where it leaves ``node`` as it is."""
    producer = model.find_producer(node.input[0])
    if node.op_type != "Quant" or producer is None or producer.op_type != "Relu" or not node_attr(node, "signed", 1):
        return None
    return _unsigned_bits_of_signed(model, node)


def _unsigned_bits_of_signed(model: ModelWrapper, quant: NodeProto) -> int | None:
    """The bit width of the unsigned ``Quant`` that gives signed ``quant``'s codes >= 0: b - 1, and 2 for b = 2
    (behind a ``Clip`` at its scale, so one scale only; FINN lowers 1 unsigned bit as bipolar), else ``None``."""
    bits = _signed_codes_at_or_above_zero_bits(model, quant)
    if bits == 1:
        return 2 if np.size(get_constant(model, quant.input[1])) == 1 else None
    return bits


def _signed_codes_at_or_above_zero_bits(model: ModelWrapper, quant: NodeProto) -> int | None:
    """b - 1 where signed ``quant`` has an integer bit width b >= 2, zero point 0 and positive scales: its codes >= 0
    (those of its reals >= 0) are then exactly the codes of an unsigned, non-narrow (b - 1)-bit ``Quant``."""
    bits = _zero_point_free_bits(model, quant)
    return int(bits) - 1 if bits is not None and bits == int(bits) and bits >= 2 else None


def _zero_point_free_bits(model: ModelWrapper, quant: NodeProto) -> float | None:
    """The one bit width of ``quant`` where its scales are constants > 0 and its zero points constant 0, else
    ``None``."""
    scale, zero, bits = (get_constant(model, name) for name in quant.input[1:4])
    if scale is None or zero is None or bits is None or np.size(bits) != 1:
        return None
    if not np.all(scale > 0) or np.any(zero != 0):
        return None
    return float(np.asarray(bits).reshape(-1)[0])


class ClipAboveTheCodesAsRelu(Transformation):
    """A ``Clip(0, c)`` read only by activation ``Quant`` nodes that give every real at or above ``c`` their top code
    becomes a ``Relu``.

    Why: FINN has no HW layer for a float ``Clip``, so its lowering stopped at a ``ReLU6`` (exported as ``Clip(0, 6)``)
    in front of a quantizer (a float ``ReLU6`` before Brevitas' ``QuantIdentity``, or its graph-mode PTQ of such a
    net); it converts a ``Relu`` before a ``Quant`` (:class:`UnsignedQuantAfterRelu`). Why it is exact: with zero
    point 0 and scales ``s > 0`` a ``Quant`` is monotone in its input (it clamps, then rounds), so where it gives ``c``
    itself its top code (executed here with qonnx's own ``int_quant``, per channel), it gives every real above ``c``
    that code too: clipping the reals at ``c`` changes no code, and below ``c`` ``Clip(x, 0, c)`` is ``Relu(x)``.
    Found by the property fuzzer (the node its FINN-lowerable models left unlowered most often).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for index, node in enumerate(model.graph.node):
            if node.op_type != "Clip" or node.domain not in ("", "ai.onnx"):
                continue
            low, high = clip_bounds(model, node)
            readers = model.find_consumers(node.output[0])
            if low is None or high is None or np.size(low) != 1 or np.size(high) != 1 or float(low) != 0.0 \
                    or not readers or node.output[0] in {o.name for o in model.graph.output}:
                continue
            if all(_top_code_at(model, reader, float(high)) for reader in readers):
                model.graph.node.remove(node)
                model.graph.node.insert(index, helper.make_node("Relu", [node.input[0]], [node.output[0]],
                                                                name=node.name))
                changed = True
        return model, changed


def _top_code_at(model: ModelWrapper, quant: NodeProto, value: float) -> bool:
    """Whether ``quant`` is an activation ``Quant`` with zero point 0 and scales > 0 that gives ``value`` (float32) the
    same output as a real beyond every code, i.e. its top code, in every channel (qonnx's ``int_quant`` executes
    it)."""
    from qonnx.custom_op.general.intquant import int_quant

    bits = _zero_point_free_bits(model, quant) if quant.op_type in ("Quant", "IntQuant") else None
    if bits is None or bits != int(bits) or bits < 1:
        return False
    scale, zero, bits = (np.asarray(get_constant(model, name), np.float32) for name in quant.input[1:4])
    signed, narrow = node_attr(quant, "signed", 1), node_attr(quant, "narrow", 0)
    mode = node_str_attr(quant, "rounding_mode", "ROUND")
    beyond = scale * np.float32(2.0 ** float(bits) + 1)  # above every code, in each channel
    at_value, at_top = (int_quant(x, scale, zero, bits, signed, narrow, mode)
                        for x in (np.full(np.shape(scale), value, np.float32), beyond))
    return bool(np.array_equal(at_value, at_top))


class ReluAfterQuantIntoQuant(Transformation):
    """A ``Relu`` right after a ``Quant`` with zero point 0 and positive scales folds into that ``Quant``: a signed
    b-bit one becomes the unsigned, non-narrow ``Quant`` of b - 1 bits; an unsigned one stays as it is.

    Why: FINN's conversion makes the ``Quant`` thresholds and a float ``Mul``, and leaves the ``Relu`` behind them a
    float ``ElementwiseMax`` that stops the lowering of what follows (Brevitas' graph-mode PTQ writes this form in
    front of its global pooling). A ``Relu`` read only by ``Quant`` nodes is left: FINN's conversion takes that form
    (after :class:`UnsignedQuantAfterRelu`). Why it is exact: with codes ``k = clamp(round(x / s), lo, hi)`` and
    ``s > 0``, ``Relu(s k) = s clamp(round(x / s), max(lo, 0), hi)`` in every rounding mode; for a signed ``Quant``
    ``max(lo, 0) = 0`` and ``hi = 2^(b-1) - 1`` (narrow or not) are the ends of the unsigned (b - 1)-bit clamp, and an
    unsigned one's codes are >= 0 already. A signed 2-bit one (codes 0 and 1 after the ``Relu``) becomes the unsigned
    2-bit ``Quant`` of ``Clip(x, 0, s)`` as in :class:`UnsignedQuantAfterRelu`: ``clamp(r(t), 0, 1) = r(min(max(t, 0),
    1))`` for every monotone rounding ``r`` with ``r(0) = 0`` and ``r(1) = 1``. Only a ``Quant`` the ``Relu`` alone
    reads is folded.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for quant in model.get_nodes_by_op_type("Quant"):
            relu = sole_relu_reader(model, quant)
            bits = relu_fold_bits(model, quant)
            if relu is None or bits is None:
                continue
            if node_attr(quant, "signed", 1):
                if _signed_codes_at_or_above_zero_bits(model, quant) == 1:  # codes 0 and 1: two bits of Clip(x, 0, s)
                    _clip_at_the_scale(model, quant)
                _make_unsigned(model, quant, int(bits))
            for info in [i for i in model.graph.value_info if i.name == quant.output[0]]:
                model.graph.value_info.remove(info)
            quant.output[0] = relu.output[0]
            model.graph.node.remove(relu)
            changed = True
        return model, changed


def relu_fold_bits(model: ModelWrapper, quant: NodeProto) -> float | None:
    """The bit width of the unsigned ``Quant`` :class:`ReluAfterQuantIntoQuant` makes of ``quant`` with the ``Relu``
    behind it (so FINN's DataType of that ``Relu``'s output becomes ``UINT`` of it), or ``None`` where it folds none."""
    relu = sole_relu_reader(model, quant)
    if quant.op_type != "Quant" or relu is None:
        return None
    readers = model.find_consumers(relu.output[0]) or []
    if readers and all(r.op_type == "Quant" for r in readers):  # FINN's conversion takes that form
        return None
    if not node_attr(quant, "signed", 1):
        return _zero_point_free_bits(model, quant)
    return _unsigned_bits_of_signed(model, quant)


class DefaultDomainFirst(Transformation):
    """The ONNX default domain becomes the model's first opset import.

    Why: qonnx's ``FoldConstants`` (inside ``cleanup_model`` and FINN's tidy-up) executes every constant node at the
    version of the *first* opset import; a QONNX export that lists ``qonnx.custom_op.general`` (version 2) first
    then runs a constant ``Div`` as ``Div``-1, which onnxruntime does not implement. Why it is exact: the order of
    opset imports carries no meaning in ONNX.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        imports = list(model.model.opset_import)
        default = [i for i in imports if i.domain in ("", "ai.onnx")]
        if not default or imports[0].domain in ("", "ai.onnx"):
            return model, False
        ordered = default + [i for i in imports if i.domain not in ("", "ai.onnx")]
        copies = [type(i)(domain=i.domain, version=i.version) for i in ordered]
        del model.model.opset_import[:]
        model.model.opset_import.extend(copies)
        return model, True


class ScaleIntoQuant(Transformation):
    """``Mul(Quant(Div(x, s), 1, 0, b), s)``, the form qonnx's ``ExtractQuantScaleZeroPt`` writes, becomes
    ``Quant(x, s, 0, b)`` again.

    Why: FINN's conversion fails on the extracted form (its ``FoldQuantWeights`` executes the weights' ``Div`` as a
    node of ONNX opset 1, which onnxruntime does not implement). Why it is exact: qonnx's ``Quant`` computes
    ``x / s`` in float32, adds the zero point 0, rounds, clamps and multiplies by ``s``: the same float32 steps as
    ``Div``, the unit-scale ``Quant`` and ``Mul``. Only that form is folded: the same ``s`` (values and shape) on
    both sides, the ``Quant``'s own scale 1 and zero point 0, and nothing else reading the ``Div`` or ``Quant``
    outputs.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for mul in list(model.graph.node):
            chain = _extracted_scale(model, mul)
            if chain is None:
                continue
            div, quant = chain
            dropped = (quant.input[1], div.output[0], *mul.input)  # the unit scale, the scaled input, Mul's operands
            quant.input[0], quant.input[1] = div.input[0], div.input[1]
            quant.output[0] = mul.output[0]
            for node in (div, mul):
                model.graph.node.remove(node)
            for name in dropped:
                _remove_if_unused(model, name)
                for info in [i for i in model.graph.value_info if i.name == name]:
                    model.graph.value_info.remove(info)
            changed = True
        return model, changed


def _extracted_scale(model: ModelWrapper, mul: NodeProto) -> tuple[NodeProto, NodeProto] | None:
    """``(div, quant)`` where ``mul`` ends :class:`ScaleIntoQuant`'s form and nothing else reads the ``Div`` or
    ``Quant`` outputs, else ``None``."""
    match = extracted_quant_scale(model, mul) if mul.op_type == "Mul" else None
    if not isinstance(match, tuple):
        return None
    sole = all(len(model.find_consumers(node.output[0])) == 1 for node in match)
    return match if sole else None


class FoldBiasQuantizers(Transformation):
    """A quantizer of a constant bias (``Quant``/``IntQuant``/``BipolarQuant`` on initializers, read only as the
    bias of ``Conv``/``ConvTranspose``/``Gemm``, or only through shape ops by nodes that are no MAC) is replaced by
    the constant it computes.

    Why: qonnx's ``ExtractBiasFromConv`` (inside ``ConvertQONNXtoFINN``) reshapes such a quantizer's zero point to
    the bias' shape and fails on a per-channel scale with a per-tensor zero point ("cannot reshape array of size 1
    into shape (1,C,1,1)"), as Brevitas writes for ``Int32Bias``; FINN's ``FoldQuantWeights`` cannot fold a
    quantizer into a ``Reshape`` ("Can't constant fold Quant weight node into node type Reshape"), as tf2onnx writes
    a QKeras ``QConv1D``'s bias (``Quant -> Reshape -> Transpose -> Add``). FINN folds a quantizer of constants into
    its value anyway; executing it here with qonnx gives the same value (the shape ops behind it are left to FINN's
    constant folding). The initializers and graph inputs only it read are removed with it.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in list(model.graph.node):
            if node.op_type not in ("Quant", "IntQuant", "BipolarQuant") or not _reads_only_biases(model, node):
                continue
            values = [model.get_initializer(name) for name in node.input]
            if any(v is None for v in values):
                continue
            context = {**dict(zip(node.input, values)), node.output[0]: None}
            getCustomOp(node).execute_node(context, model.graph)
            model.graph.node.remove(node)
            model.set_initializer(node.output[0], np.asarray(context[node.output[0]], dtype=np.float32))
            for name in set(node.input):
                _remove_if_unused(model, name)
            changed = True
        return model, changed


class GemmFactorsAsFloat32(Transformation):
    """A ``Gemm`` with ``alpha`` or ``beta`` other than 1 becomes ``Gemm(A, B)`` (alpha = beta = 1, no C), a ``Mul`` by
    alpha, and the ``Add`` of C times beta: the nodes qonnx's ``GemmToMatMul`` makes of it, with float32 factors.

    Why: FINN's conversion runs ``GemmToMatMul``, which stores the float32 attributes alpha and beta as float64
    initializers of those ``Mul`` nodes; onnxruntime then refuses the graph ("Mul bound to different types
    (tensor(float) and tensor(double))"). Why it is exact: the factors are the same float32 numbers, applied by the
    same float32 ops FINN's own rewrite would add (a ``Gemm`` without C gets FINN's zero bias, which adds nothing).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for gemm in [n for n in model.graph.node if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")]:
            alpha, beta = float(node_attr(gemm, "alpha", 1.0)), float(node_attr(gemm, "beta", 1.0))
            bias = gemm.input[2] if len(gemm.input) > 2 else ""
            if alpha == 1.0 and (beta == 1.0 or not bias):
                continue
            label, out = gemm.name or gemm.output[0], gemm.output[0]
            product = f"{label}_product"
            del gemm.input[2:]
            gemm.output[0] = product
            for attribute in [a for a in gemm.attribute if a.name in ("alpha", "beta")]:
                gemm.attribute.remove(attribute)
            index = list(model.graph.node).index(gemm) + 1
            after = []
            if alpha != 1.0:
                model.set_initializer(f"{label}_alpha", np.asarray(alpha, dtype=np.float32))
                scaled = f"{label}_scaled" if bias else out
                after.append(helper.make_node("Mul", [product, f"{label}_alpha"], [scaled], name=f"{label}_alpha_mul"))
                product = scaled
            if bias:
                if beta != 1.0:
                    model.set_initializer(f"{label}_beta", np.asarray(beta, dtype=np.float32))
                    after.append(helper.make_node("Mul", [bias, f"{label}_beta"], [f"{label}_bias"],
                                                  name=f"{label}_beta_mul"))
                    bias = f"{label}_bias"
                after.append(helper.make_node("Add", [product, bias], [out], name=f"{label}_bias_add"))
            for offset, node in enumerate(after):
                model.graph.node.insert(index + offset, node)
            changed = True
        if changed:  # qonnx executes only fully shaped graphs
            from qonnx.transformation.infer_shapes import InferShapes

            model = model.transform(InferShapes())
        return model, changed


class WindowDefaultAttributes(Transformation):
    """A ``Conv``, ``ConvTranspose`` or ``MaxPool`` gets each attribute FINN reads that it leaves out, at its ONNX
    default: ``kernel_shape`` (a convolution's: the dims of its weights after the first two), ``strides`` 1,
    ``dilations`` 1, ``group`` 1 and ``pads`` 0 (``pads`` only without an ``auto_pad`` other than NOTSET), and a
    ``ConvTranspose``'s ``output_padding`` 0.

    Why: qonnx's ``LowerConvsToMatMul`` (inside FINN's streamlining), its ``Change3DTo4DTensors`` (FINN's 1-D step)
    and FINN's ``InferPixelPaddingDeconv`` read these attributes and fail without them ("'NoneType' object has no
    attribute 'ints'"), as does FINN's ``MaxPoolNHWC`` ("Required attribute pads unspecified"), though ONNX lets a
    writer leave the defaults out (the corpus' qonnx ``QuantizeGraph`` files do, and tf2onnx's ``MaxPool`` in QKeras
    exports). Why it is exact: each value is the one ONNX defines for the missing attribute.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from a2q_passes.read_only_model import with_inferred_shapes

        changed = False
        nodes = [node for node in model.graph.node if node.op_type in _WINDOW_DEFAULTS
                 and node.domain in ("", "ai.onnx")
                 and not {a.name for a in node.attribute} >= set(_WINDOW_DEFAULTS[node.op_type])]
        shaped = with_inferred_shapes(model) if any(node.op_type != "MaxPool" for node in nodes) else model
        for node in nodes:
            if node.op_type == "MaxPool":  # kernel_shape is required there
                kernel = node_attr(node, "kernel_shape", None)
            else:
                shape = weight_shape(model, shaped, node.input[1])
                kernel = None if shape is None or len(shape) < 3 else shape[2:]
            if not kernel:
                continue  # FINN names its own objection
            spatial = len(kernel)
            defaults = {"kernel_shape": [int(d) for d in kernel], "strides": [1] * spatial,
                        "dilations": [1] * spatial, "group": 1, "pads": [0] * (2 * spatial),
                        "output_padding": [0] * spatial}
            defaults = {name: defaults[name] for name in _WINDOW_DEFAULTS[node.op_type]}
            if node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                del defaults["pads"]
            present = {a.name for a in node.attribute}
            for name, value in defaults.items():
                if name not in present:
                    node.attribute.append(helper.make_attribute(name, value))
                    changed = True
        return model, changed


class ExplicitAutoPads(Transformation):
    """A ``Conv`` or ``MaxPool`` with ``auto_pad`` VALID or SAME_* gets the explicit ``pads`` ONNX defines for it.

    Why: qonnx's ``LowerConvsToMatMul`` (inside FINN's streamlining) pads SAME_* by ``(stride - 1) * size - stride +
    kernel`` in total, the spec's ``(ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size`` only at
    stride 1 and dilation 1: at stride 2 FINN's sliding window then reads a padded input its output shape does not
    fit ("cannot reshape array"). Why it is exact: the pads are the ones ONNX defines for that ``auto_pad`` (zeros for
    a Conv, and the same -inf a MaxPool pads with). Inputs of unknown size are left as they are.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in model.graph.node:
            auto_pad = node_str_attr(node, "auto_pad", "NOTSET")
            if node.op_type not in ("Conv", "MaxPool") or node.domain not in ("", "ai.onnx") or auto_pad == "NOTSET":
                continue
            shape = model.get_tensor_shape(node.input[0])
            kernel = node_attr(node, "kernel_shape", None)
            if node.op_type == "Conv" and kernel is None:
                weights = model.get_tensor_shape(node.input[1])
                kernel = None if weights is None else weights[2:]
            if not shape or not kernel or len(shape) != len(kernel) + 2 or not all(shape[2:]):
                continue
            n = len(kernel)
            begin, end = auto_pads(auto_pad, list(shape[2:]), list(kernel), list(node_attr(node, "strides", [1] * n)),
                                   list(node_attr(node, "dilations", [1] * n)))
            kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("pads", begin + end)])
            changed = True
        return model, changed


_WINDOW_DEFAULTS = {"Conv": ("kernel_shape", "strides", "dilations", "group", "pads"),
                    "ConvTranspose": ("kernel_shape", "strides", "dilations", "group", "pads", "output_padding"),
                    "MaxPool": ("strides", "pads")}


class ChannelsLastInputLayout(Transformation):
    """A 4-D graph input read only by ``Transpose(perm=[0, 3, 1, 2])`` nodes (tf2onnx's channels-last input, as a
    Keras model has it), directly or through its quantizer (:func:`_to_channels_first`), gets the data layout NHWC,
    where it has none.

    Why: FINN's streamlining absorbs that ``Transpose`` into the layers behind it, so an input quantizer's
    ``MultiThreshold`` ends up reading the graph input in NHWC, while qonnx's ``InferDataLayouts`` takes an
    unannotated 4-D input for NCHW; FINN's ``step_convert_to_hw`` then stops ("MultiThreshold input (NCHW) and
    output (NHWC) layout mismatch"), as on a tf2onnx CNN quantized by onnxruntime. Only an annotation: nothing that
    executes changes.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for graph_input in model.graph.input:
            name = graph_input.name
            readers = model.find_consumers(name) or []
            if (model.get_initializer(name) is not None or len(model.get_tensor_shape(name) or ()) != 4
                    or model.get_tensor_layout(name) is not None or not readers):
                continue
            if all(_to_channels_first(model, r) for r in readers):
                model.set_tensor_layout(name, DataLayout.NHWC)
                changed = True
        return model, changed


def _to_channels_first(model: ModelWrapper, reader: NodeProto) -> bool:
    """Whether ``reader`` is ``Transpose(perm=[0, 3, 1, 2])``, or a per-tensor ``Quant`` with zero point 0 read only
    by such (NNCF and Quark quantize the graph input before tf2onnx's Transpose; without the annotation, FINN's
    global pool after a residual block read NCHW data as NHWC). A nonzero zero point (TFLite's) is lowered as
    thresholds and an Add, after which FINN's streamlining keeps the input NCHW: annotated NHWC, its conversion
    stopped on a layout mismatch."""
    if reader.op_type == "Transpose":
        return list(node_attr(reader, "perm", [])) == [0, 3, 1, 2]
    after = model.find_consumers(reader.output[0]) or []
    params = [get_constant(model, t) for t in reader.input[1:]]
    return (reader.op_type == "Quant" and all(np.size(p) == 1 for p in params) and np.all(params[1] == 0)
            and bool(after) and all(_to_channels_first(model, r) for r in after))


class SpatialSqueezeAsFlatten(Transformation):
    """A ``Squeeze`` of both spatial axes of a ``[N, C, 1, 1]`` tensor (tf2onnx writes a Keras
    ``GlobalAveragePooling2D`` as ``GlobalAveragePool`` + ``Squeeze``) becomes ``Flatten(axis=1)``: the same
    ``[N, C]`` values in the same order.

    Why: FINN has no layer for a ``Squeeze`` (``step_convert_to_hw`` leaves it, and the lowering stops there), while
    its ``RemoveCNVtoFCFlatten`` takes the ``Flatten`` in front of a classifier, as after a Brevitas global pool.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in model.graph.node:
            if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx"):
                continue
            shape = model.get_tensor_shape(node.input[0])
            axes = node_axes(model, node)
            if shape is None or len(shape) != 4 or list(shape[2:]) != [1, 1] or axes is None:
                continue
            if sorted(a % 4 for a in axes) != [2, 3]:
                continue
            node.op_type = "Flatten"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", 1))
            changed = True
        return model, changed


class SpatialFlattenAsReshape(Transformation):
    """A ``Flatten(axis=1)`` of an ``[N, C, H, W]`` tensor with ``H W > 1`` becomes a ``Reshape`` to ``[N, C H W]``
    (the same values in the same order), as Brevitas' QONNX export writes ``torch.flatten`` before a classifier.

    Why: after FINN's streamlining the flatten reads a ``Transpose`` back from NHWC. FINN's ``RemoveCNVtoFCFlatten``
    takes such a pair only in front of an MVAU (whose weights it permutes) and its ``InferShuffle`` joins a
    ``Transpose`` with a following ``Reshape`` only; a ``Flatten`` read by thresholds (the classifier's input
    quantizer, as Brevitas' QCDQ export writes it) stayed a float node that stopped the lowering. ``[N, C, 1, 1]``
    stays a ``Flatten`` (see :class:`SpatialSqueezeAsFlatten`).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in model.graph.node:
            if node.op_type != "Flatten" or node.domain not in ("", "ai.onnx") or node_attr(node, "axis", 1) != 1:
                continue
            shape = model.get_tensor_shape(node.input[0])
            if shape is None or len(shape) != 4 or shape[2] * shape[3] == 1 or not all(d > 0 for d in shape):
                continue
            target = f"{node.output[0]}_shape"
            model.set_initializer(target, np.array([shape[0], int(np.prod(shape[1:]))], dtype=np.int64))
            node.op_type = "Reshape"
            node.input.append(target)
            del node.attribute[:]
            changed = True
        return model, changed


class GroupedConvAsDense(Transformation):
    """A grouped ``Conv`` that is not depthwise becomes a ``group=1`` ``Conv`` with block-diagonal weights: each output
    channel keeps its weights at its own group's input channels and has zeros at all others.

    Why: qonnx's ``LowerConvsToMatMul`` (inside FINN's streamlining) lowers only ``group=1`` and depthwise
    convolutions, and FINN has no grouped MVAU. Why it is exact: a zero weight adds nothing to any sum (a ``Quant``
    with zero point 0 keeps 0 at 0), so every output channel accumulates the same products and its accumulator range
    is unchanged. The cost: the MVAU stores and multiplies ``group`` times as many weights. Weights in any other form
    than those :func:`grouped_conv_obstacle` accepts are left; the lowering refuses them by name
    (:func:`~a2q_passes.finn_refusals.refuse_grouped_convs`).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in model.graph.node:
            shape = _constant_shape(model, node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if not is_grouped_conv(node, shape) or grouped_conv_obstacle(model, node) is not None:
                continue
            producer = model.find_producer(node.input[1])
            stored = node.input[1] if producer is None else producer.input[0]
            group = int(node_attr(node, "group", 1))
            dense = _block_diagonal(model.get_initializer(stored), group)
            model.set_initializer(stored, dense)
            if producer is not None:
                model.set_tensor_shape(node.input[1], list(dense.shape))
            next(a for a in node.attribute if a.name == "group").i = 1
            changed = True
        return model, changed


def is_grouped_conv(node: NodeProto, shape: list[int] | tuple[int, ...] | None) -> bool:
    """Whether ``node`` is a default-domain ``Conv`` with ``group`` > 1 that is not depthwise (FINN's VVAU takes
    ``group`` = input channels = output channels, weights of one input channel each), given its weight ``shape``
    (``None``: unknown, and then not taken for grouped)."""
    group = int(node_attr(node, "group", 1))
    return (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and group > 1 and shape is not None
            and not (shape[1] == 1 and shape[0] == group))


def grouped_conv_obstacle(model: ModelWrapper, node: NodeProto) -> str | None:
    """Why :class:`GroupedConvAsDense` cannot make grouped ``node`` dense, or ``None``: its weights must be a
    constant that holds 0 (not bipolar), or a QONNX ``Quant`` of one with zero point 0 and a scale per tensor or per
    output channel, read by this ``Conv`` alone."""
    weight = node.input[1]
    producer = model.find_producer(weight)
    if producer is None:
        if model.get_initializer(weight) is None:
            return f"its weights {weight!r} are not a constant"
        if not model.get_tensor_datatype(weight).allowed(0):
            return f"its weights {weight!r} are {model.get_tensor_datatype(weight).name}, which has no 0"
        return _shared(model, weight)
    if producer.op_type != "Quant" or not producer.domain.startswith("qonnx"):
        label = producer.name or producer.output[0]
        return f"its weights come from {producer.op_type} {label!r}, not from a QONNX Quant"
    values, scale, zero_point = (model.get_initializer(name) for name in producer.input[:3])
    if values is None or scale is None or zero_point is None:
        return f"its weight Quant {producer.name or weight!r} does not quantize constants"
    if np.any(zero_point != 0):
        return f"its weight Quant {producer.name or weight!r} has a zero point other than 0"
    if any(dim != 1 for dim in np.shape(scale)[1:]):
        return f"its weight Quant {producer.name or weight!r} has a scale per weight, not per output channel"
    return _shared(model, weight) or _shared(model, producer.input[0])


def _shared(model: ModelWrapper, tensor: str) -> str | None:
    readers = model.find_consumers(tensor) or []
    return f"its weights {tensor!r} are also read by other nodes" if len(readers) > 1 else None


def _block_diagonal(weights: np.ndarray, group: int) -> np.ndarray:
    """Grouped ``Conv`` weights ``(O, I / group, *kernel)`` as dense ``(O, I, *kernel)`` weights: output channel ``o``
    of group ``g = o // (O / group)`` keeps its weights at input channels ``g * I / group ...``, zeros elsewhere."""
    out_channels, group_inputs = weights.shape[:2]
    dense = np.zeros((out_channels, group_inputs * group, *weights.shape[2:]), dtype=weights.dtype)
    per_group = out_channels // group
    for g in range(group):
        rows = slice(g * per_group, (g + 1) * per_group)
        dense[rows, g * group_inputs:(g + 1) * group_inputs] = weights[rows]
    return dense


def weight_shape(model: ModelWrapper, shaped: ModelWrapper, tensor: str) -> list[int] | None:
    """The shape of a MAC's weight tensor: annotated or inferred (``shaped``: ``model`` with inferred shapes; a
    weight behind a Q/DQ chain, or behind the ``Quant`` node qonnx's QCDQToQuant made of one, is shaped only
    there), or that of the constant its quantizer reads."""
    shape = shaped.get_tensor_shape(tensor)
    return shape if shape is not None else _constant_shape(model, tensor)


def _constant_shape(model: ModelWrapper, tensor: str) -> list[int] | None:
    """The shape of the constant behind weight ``tensor``: the initializer, or the one its quantizer reads."""
    producer = model.find_producer(tensor)
    constant = model.get_initializer(producer.input[0]) if producer is not None else model.get_initializer(tensor)
    return None if constant is None else list(constant.shape)


def _reads_only_biases(model: ModelWrapper, node) -> bool:
    consumers = model.find_consumers(node.output[0]) or []
    out = node.output[0]
    return bool(consumers) and out not in {o.name for o in model.graph.output} and (all(
        c.op_type in _BIASED_MACS and list(c.input).index(out) == 2 and list(c.input).count(out) == 1
        for c in consumers) or _reaches_no_mac_through_shape_ops(model, consumers, out))


_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _reaches_no_mac_through_shape_ops(model: ModelWrapper, consumers: list, tensor: str) -> bool:
    """Whether ``tensor`` is read only by shape ops (their other inputs constant), and their outputs in turn, ending
    at nodes that are no MAC: a constant those nodes add or scale by, never a layer's weights."""
    from a2q_passes.layers import MAC_OP_TYPES  # layers reads grids through input_grids, which imports this module

    outputs = {o.name for o in model.graph.output}
    pending, shaped = [(c, tensor) for c in consumers], False
    while pending:
        node, read = pending.pop()
        if node.op_type not in _SHAPE_OPS:
            if node.op_type in MAC_OP_TYPES:
                return False
            continue
        if list(node.input).index(read) != 0 or any(model.get_initializer(t) is None for t in node.input[1:] if t):
            return False
        if node.output[0] in outputs:
            return False
        shaped = True
        pending += [(c, node.output[0]) for c in model.find_consumers(node.output[0]) or []]
    return shaped


def _remove_if_unused(model: ModelWrapper, name: str) -> None:
    """Drop initializer ``name`` (and its graph input entry, where an exporter listed one) once no node reads it."""
    if any(name in n.input for n in model.graph.node) or name in {o.name for o in model.graph.output}:
        return
    for tensor in [t for t in model.graph.initializer if t.name == name]:
        model.graph.initializer.remove(tensor)
    for info in [i for i in model.graph.input if i.name == name]:
        model.graph.input.remove(info)


class QuantFromQDQ(Transformation):
    """A graph quantized with QuantizeLinear -> [Clip] -> DequantizeLinear chains (Brevitas' QCDQ export, qonnx's
    QuantToQCDQ, onnxruntime's QDQ format) becomes one with QONNX ``Quant`` nodes, by qonnx's own ``QCDQToQuant``,
    where that converts every Q/DQ node; any other graph is left as it is. A ``DequantizeLinear`` of stored integers
    (weights, as the TorchScript QCDQ export and onnxruntime write them) first gets the ``QuantizeLinear`` that gives
    them back (:func:`quantize_stored_integers`), a per-tensor one that reads the codes through layout ops moves in
    front of them (:func:`dequantize_before_layout_ops`), symmetric unsigned pairs become signed ones with zero
    point 0 (:func:`signed_mid_zero_points`), and per-tensor nodes lose the ``axis`` they ignore
    (:func:`per_tensor_without_axis`). The ``Quant`` nodes it makes are listed in the model's metadata
    (:data:`~a2q_passes.metadata.QUANTIZE_LINEAR_QUANTS_KEY`): a ``QuantizeLinear`` rounds ``x / s`` before it adds
    the zero point, a ``Quant`` after, which differs near ties, and the thresholds of a zero point follow the former.

    Why: FINN's conversion reads ``Quant`` nodes only, and ``QCDQToQuant`` is qonnx's way to them. Where it converts
    part of a graph (4-bit storage, block-wise ``DequantizeLinear``, onnxruntime's QOperator nodes) or fails, FINN's
    own steps fail later with messages that name no cause, so the graph stays whole and the lowering names the Q/DQ
    nodes instead. The lowering's equivalence check executes the graph before and after, so a conversion that
    changed what the graph computes is caught there.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.infer_shapes import InferShapes
        from qonnx.transformation.qcdq_to_qonnx import QCDQToQuant

        if not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
            return model, False
        try:
            chains = per_tensor_without_axis(ModelWrapper(model.model.SerializeToString()))
            chains = signed_mid_zero_points(quantize_stored_integers(dequantize_before_layout_ops(chains)))
            copies = _one_quantizer_per_tensor(chains)
            converted = chains.transform(InferShapes()).transform(QCDQToQuant())  # it reads the shapes it rewrites
        except Exception:  # qonnx raises plain numpy/ONNX errors on chains it cannot read
            return model, False
        if any(is_qdq_node(node) for node in converted.graph.node):
            return model, False
        for node in list(converted.graph.node):  # each Quant reads the tensor itself again
            if node.op_type == "Identity" and node.output[0] in copies:
                converted.graph.node.remove(node)
            elif node.input and node.input[0] in copies:
                node.input[0] = copies[node.input[0]]
        converted = _merge_equal_quants(converted)
        given = {n.output[0] for n in model.graph.node if n.op_type == "Quant"}
        made = sorted(n.output[0] for n in converted.graph.node if n.op_type == "Quant" and n.output[0] not in given)
        if made:
            set_metadata_value(converted, QUANTIZE_LINEAR_QUANTS_KEY, json.dumps(made))
        return converted, False


def _merge_equal_quants(model: ModelWrapper) -> ModelWrapper:
    """Quant nodes reading one tensor with equal constants and attributes (a tensor onnxruntime's
    ``DedicatedQDQPair`` quantized once per reader) become the first of them, its output read in their place.

    Why: they compute the same values, and FINN's conversion folds a ``Relu`` into the ``Quant`` behind it, removing
    the ``Relu`` that another ``Quant`` still reads (its graph then fails the checker). ``model`` is changed in place."""
    kept: dict[str, list] = {}
    outputs = {o.name for o in model.graph.output}
    for node in [n for n in model.graph.node if n.op_type == "Quant"]:
        if node.output[0] in outputs or any(get_constant(model, name) is None for name in node.input[1:]):
            continue
        same = next((first for first in kept.get(node.input[0], []) if _same_parameters(model, first, node)), None)
        if same is None:
            kept.setdefault(node.input[0], []).append(node)
            continue
        for reader in model.graph.node:
            reader.input[:] = [same.output[0] if name == node.output[0] else name for name in reader.input]
        model.graph.node.remove(node)
        for name in node.input[1:4]:
            _remove_if_unused(model, name)
    return model


def _one_quantizer_per_tensor(model: ModelWrapper) -> dict[str, str]:
    """Each tensor more than one ``QuantizeLinear`` reads (onnxruntime's ``DedicatedQDQPair`` option writes such)
    reaches all but the first through an ``Identity`` of its own; returns each copy's name -> the tensor.

    Why: qonnx's ``QCDQToQuant`` names a ``Quant`` node and its bit-width initializer after the tensor it reads, so
    two of them would share a node name (the layers and the lowering's tensors are named after nodes) and one
    bit-width initializer (the last written: wrong for a quantizer of another width). ``model`` is changed in place."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and not node.domain:
            readers.setdefault(node.input[0], []).append(node)
    copies = {}
    for tensor, nodes in readers.items():
        for node in nodes[1:]:
            copy = f"{node.output[0]}_input"
            model.graph.node.insert(list(model.graph.node).index(node), helper.make_node("Identity", [tensor], [copy]))
            node.input[0], copies[copy] = copy, tensor
    return copies


# the storage types qonnx's QCDQToQuant converts (extract_elem_type)
_STORED_INTEGERS = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)


def quantize_stored_integers(model: ModelWrapper) -> ModelWrapper:
    """Each ``DequantizeLinear`` of a stored integer tensor ``q`` (scale ``s``, zero point ``z``), directly or through
    a ``Clip`` (as onnxruntime's QDQ quantizer and Brevitas' TorchScript QCDQ export write weights), reads instead the
    ``QuantizeLinear`` of the reals ``(q - z) s``, which gives back ``q`` exactly (checked here, else the node is left
    as it is): a QuantizeLinear -> [Clip] -> DequantizeLinear chain, the form ``QCDQToQuant`` converts. Block-wise
    ones are left as they are. ``model`` is changed in place and returned."""
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and not n.domain]:
        clip = model.find_producer(node.input[0])
        reader = clip if clip is not None and clip.op_type == "Clip" else node  # the node that reads the codes
        codes = model.get_initializer(reader.input[0])
        if codes is None or codes.dtype.type not in _STORED_INTEGERS or node_attr(node, "block_size"):
            continue
        zero_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        scale = get_constant(model, node.input[1])
        zero = get_constant(model, zero_name) if zero_name else np.zeros((), codes.dtype)
        if scale is None or zero is None:
            continue
        along = [1] * codes.ndim  # a per-channel scale and zero point run along the node's axis
        if codes.ndim:
            along[node_attr(node, "axis", 1) % codes.ndim] = -1
        s, z = (np.asarray(v, np.float32).reshape(along if np.ndim(v) == 1 else ()) for v in (scale, zero))
        reals = ((codes.astype(np.float32) - z) * s).astype(np.float32)
        if not np.array_equal(np.rint(reals / s) + z, codes.astype(np.float32)):  # what QuantizeLinear computes
            continue
        base = node.name or node.output[0]
        model.set_initializer(f"{base}_stored_reals", reals)
        if zero_name is None:  # QuantizeLinear's output type is its zero point's (uint8 without one)
            zero_name = f"{base}_stored_zero"
            model.set_initializer(zero_name, np.zeros((), codes.dtype))
            if len(node.input) == 2:
                node.input.append(zero_name)
            else:
                node.input[2] = zero_name
        stored = reader.input[0]
        quantize = helper.make_node("QuantizeLinear", [f"{base}_stored_reals", node.input[1], zero_name],
                                    [f"{base}_stored_codes"], name=f"{base}_quantize", axis=node_attr(node, "axis", 1))
        model.graph.node.insert(list(model.graph.node).index(reader), quantize)
        reader.input[0] = quantize.output[0]
        _remove_if_unused(model, stored)
    return model


def per_tensor_without_axis(model: ModelWrapper) -> ModelWrapper:
    """An ``axis`` attribute dropped from each ONNX QuantizeLinear/DequantizeLinear whose scale is one value: ONNX
    ignores it there, and qonnx's ``QCDQToQuant`` reshapes the scale along it and fails (PyTorch's dynamo exporter
    writes ``axis=1`` on the per-tensor Q/DQ of a ``torchao`` PT2E model). ``model`` is changed in place and
    returned."""
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not node.domain and node_attr(node, "axis") is not None:
            scale = get_constant(model, node.input[1])
            if scale is not None and np.ndim(scale) == 0:
                kept = [a for a in node.attribute if a.name != "axis"]
                del node.attribute[:]
                node.attribute.extend(kept)
    return model


def dequantize_before_layout_ops(model: ModelWrapper) -> ModelWrapper:
    """Each ``DequantizeLinear`` with one scale and one zero point that reads ``QuantizeLinear`` codes only through
    layout ops and ``Concat`` (tf2onnx's conversion of TFLite models moves and joins the int8 codes: ``Transpose``,
    ``Squeeze``, ``Reshape``, ``Concat``) is replaced by one copy of it right behind each of those
    ``QuantizeLinear``, the layout ops then moving reals: chains Q -> DQ, the form ``QCDQToQuant`` converts. Exact:
    with one scale and zero point the dequantization is the same function of every element, and these ops only move
    elements. Where a tensor between the two has another reader or is a graph output, nothing changes. ``model`` is
    changed in place and returned."""
    outputs = {o.name for o in model.graph.output}

    def quantizers(tensor: str, region: list) -> list | None:
        """The QuantizeLinear nodes whose codes reach ``tensor`` only through the region's ops (appended), or None."""
        producer = model.find_producer(tensor)
        if producer is not None and producer.op_type == "QuantizeLinear" and not producer.domain:
            return [producer]  # its codes stay for other readers: the copy is a reader of its own
        if producer is None or producer.domain or len(model.find_consumers(tensor)) != 1 or tensor in outputs:
            return None
        inputs = producer.input[:1] if producer.op_type in LAYOUT_OPS else producer.input
        if producer.op_type not in (*LAYOUT_OPS, "Concat"):
            return None
        region.append(producer)
        found = [quantizers(t, region) for t in inputs]
        return None if any(q is None for q in found) else [q for qs in found for q in qs]

    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and not n.domain]:
        params = [get_constant(model, name) for name in dq.input[1:3] if name]
        region: list = []
        sources = quantizers(dq.input[0], region) if all(p is not None and np.size(p) == 1 for p in params) else None
        if not region or sources is None:
            continue
        base = dq.name or dq.output[0]
        for i, quantize in enumerate(sources):
            copy = helper.make_node("DequantizeLinear", [quantize.output[0], *dq.input[1:]],
                                    [f"{base}_of_{quantize.output[0]}"], name=f"{base}_{i}")
            copy.attribute.extend(dq.attribute)
            # one that the codes' other readers already have serves (QCDQToQuant converts one DequantizeLinear
            # per QuantizeLinear)
            same = next((n for n in model.find_consumers(quantize.output[0])
                         if n.op_type == copy.op_type and not n.domain and _same_parameters(model, n, copy)), None)
            if same is None:
                model.graph.node.insert(list(model.graph.node).index(quantize) + 1, copy)
            reals = (same or copy).output[0]
            reader = next(n for n in region if quantize.output[0] in n.input)
            reader.input[:] = [reals if t == quantize.output[0] else t for t in reader.input]
        moved = {t for node in region for t in node.output}
        region[0].output[0] = dq.output[0]  # the op that fed the DequantizeLinear now gives its reals
        model.graph.node.remove(dq)
        for info in [i for i in model.graph.value_info if i.name in moved | {dq.output[0]}]:  # now reals
            model.graph.value_info.remove(info)
    return model


def _same_parameters(model: ModelWrapper, node: NodeProto, other: NodeProto) -> bool:
    """Whether two nodes have equal attributes, and after their first input constants of equal type and values."""
    if len(node.input) != len(other.input) or sorted(map(str, node.attribute)) != sorted(map(str, other.attribute)):
        return False
    pairs = [(get_constant(model, a), get_constant(model, b)) for a, b in zip(node.input[1:], other.input[1:])]
    return all(a is not None and b is not None and np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
               for a, b in pairs)


def signed_mid_zero_points(model: ModelWrapper) -> ModelWrapper:
    """Each QuantizeLinear -> DequantizeLinear pair of unsigned b-bit codes with zero point ``2^(b-1)`` everywhere
    (onnxruntime's symmetric ``QUInt8`` quantizers: zero point 128) uses the signed b-bit type with zero point 0
    instead. ``model`` is changed in place and returned.

    Why: FINN converts only zero points of 0. Why it is exact: ONNX's QuantizeLinear rounds ``x / s`` first and then
    adds the zero point and saturates, so ``round(x / s) + 2^(b-1)`` clamped to ``[0, 2^b - 1]``, less the zero point,
    is ``round(x / s)`` clamped to ``[-2^(b-1), 2^(b-1) - 1]``: the signed codes. (A QONNX ``Quant`` adds its zero point
    before rounding, which in float arithmetic can move a value next to a tie, so the rewrite is made here, on the
    Q/DQ nodes.) A pair with anything between the two nodes, or another consumer, is left as it is.
    """
    signed_types = {np.dtype(np.uint8): np.int8, np.dtype(np.uint16): np.int16}
    for quantize in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and not n.domain]:
        zero = model.get_initializer(quantize.input[2]) if len(quantize.input) > 2 and quantize.input[2] else None
        if zero is None or zero.dtype not in signed_types or not np.all(zero == 1 << (8 * zero.itemsize - 1)):
            continue
        readers = model.find_consumers(quantize.output[0]) or []
        if not readers or quantize.output[0] in {o.name for o in model.graph.output} or any(
                r.op_type != "DequantizeLinear" or r.domain or len(r.input) < 3
                or not np.array_equal(model.get_initializer(r.input[2]), zero) for r in readers):
            continue
        unsigned, name = quantize.input[2], f"{quantize.name or quantize.output[0]}_signed_zero"
        model.set_initializer(name, np.zeros(zero.shape, signed_types[zero.dtype]))
        for node in (quantize, *readers):
            node.input[2] = name
        _remove_if_unused(model, unsigned)
        # the codes' type changes: a value_info naming the unsigned one would win over shape inference (QCDQToQuant
        # reads the signedness from it)
        for info in [i for i in model.graph.value_info if i.name == quantize.output[0]]:
            model.graph.value_info.remove(info)
    return model


def is_qdq_node(node: NodeProto) -> bool:
    """An ONNX quantization node FINN does not convert: Q/DQ, onnxruntime's QLinear* and *Integer operators."""
    return (node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
            or node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"))


def finn_preparation() -> list[Transformation]:
    """The passes to run, in order, before FINN's conversion: initializers listed as graph inputs become plain
    constants (qonnx's cleanup drops an unused one's initializer before its input entry, which leaves a second,
    dynamic input), the default domain is listed first, scales qonnx's ExtractQuantScaleZeroPt moved out of
    ``Quant`` nodes go back in, Q/DQ chains become ``Quant`` nodes, a pixel shuffle moves behind its quantizer
    (:mod:`a2q_passes.finn_pixel_shuffle`), then the rewrites above, a ``ReduceMean`` over
    the spatial axes (:mod:`a2q_passes.finn_global_pooling`) and an ``AveragePool`` as a depthwise ``Conv``
    (:mod:`a2q_passes.finn_average_pooling`) among them."""
    from qonnx.transformation.general import RemoveStaticGraphInputs

    from a2q_passes.finn_conv1d import ExpandedConv2DAsConv1D, ExpandedMaxPoolAsMaxPool1D
    from a2q_passes.finn_pixel_shuffle import PixelShuffleAfterPerValueOps
    from a2q_passes.finn_requantization import RedundantRequantization  # it reads grids through input_grids

    return [RemoveStaticGraphInputs(), DefaultDomainFirst(), ScaleIntoQuant(), QuantFromQDQ(),
            PixelShuffleAfterPerValueOps(), RedundantRequantization(), ClipAboveTheCodesAsRelu(),
            UnsignedQuantAfterRelu(), ReluAfterQuantIntoQuant(), ReduceMeanAsGlobalAveragePool(),
            AveragePoolAsDepthwiseConv(), QonnxDomainAtResolvedVersion(), TruncDroppingNoBitsAsFloor(),
            FoldBiasQuantizers(), ExplicitAutoPads(), ExpandedConv2DAsConv1D(), ExpandedMaxPoolAsMaxPool1D(),
            WindowDefaultAttributes(), GroupedConvAsDense(), GemmFactorsAsFloat32(), ChannelsLastInputLayout(),
            SpatialSqueezeAsFlatten(), SpatialFlattenAsReshape()]


def prepare_for_finn(model: ModelWrapper) -> ModelWrapper:
    """``model`` after every pass of :func:`finn_preparation`, in order (a new model: ``transform`` copies)."""
    for transformation in finn_preparation():
        model = model.transform(transformation)
    return model
