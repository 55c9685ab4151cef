"""Average pooling (``AveragePool``) as a depthwise convolution with unit weights, which FINN lowers.

FINN lowers average pooling only as Brevitas' QONNX export writes ``TruncAvgPool2d`` (``AveragePool`` + a FLOOR
``Trunc``: its ``QuantAvgPool2d``); its ``InferPool`` takes no ``AveragePool``. Brevitas' QCDQ export writes the
same layer as ``AveragePool`` followed by an activation quantizer (``QuantizeLinear -> Clip -> DequantizeLinear``),
which FINN left a float node, and everything behind it unlowered. :class:`AveragePoolAsDepthwiseConv` makes it a
depthwise ``Conv`` whose weights are a ``Quant`` of ``1 / (kh kw)`` with that step, i.e. codes 1: FINN's conversion
folds the step into a ``Mul`` behind the layer, streamlining moves it into the thresholds of the quantizer there,
and the layer becomes a VVAU summing each window's integer codes.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.graph_values import get_constant, node_attr, node_str_attr

_QONNX_DOMAIN = "qonnx.custom_op.general"


def _window(node, rank: int) -> dict | None:
    """The Conv attributes that sum the windows this ``AveragePool`` averages, or None where its average is not a
    window sum over a fixed count (ceil_mode, dilations, SAME padding, pads without count_include_pad)."""
    kernel = list(node_attr(node, "kernel_shape", []))
    pads = list(node_attr(node, "pads", [0] * 2 * len(kernel)))
    if (rank != 4 or len(kernel) != 2 or node_attr(node, "ceil_mode", 0)
            or any(d != 1 for d in node_attr(node, "dilations", [1, 1]))
            or node_str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
            or (any(pads) and not node_attr(node, "count_include_pad", 0))):
        return None
    return {"kernel_shape": kernel, "strides": list(node_attr(node, "strides", [1, 1])), "pads": pads}


class AveragePoolAsDepthwiseConv(Transformation):
    """A 2-D ``AveragePool`` of an NCHW tensor becomes a depthwise ``Conv`` (group = channels) with weights
    ``Quant(1 / (kh kw))`` at step ``1 / (kh kw)``: every window's sum times ``1 / (kh kw)``, which is its average.

    Why it is exact: both sum each window's values (zeros for the padding ``count_include_pad`` counts) and divide
    by the window size; only the float order of the sum differs, which the lowering's equivalence check bounds.
    Left as they are: an ``AveragePool`` a ``Trunc`` reads (FINN's own form), other ranks, ``ceil_mode``,
    dilations, SAME padding, and padding not counted in the average (the count then differs at the border).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        shaped = None
        changed = False
        for node in list(model.graph.node):
            if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
                continue
            if any(reader.op_type == "Trunc" for reader in model.find_consumers(node.output[0])):
                continue  # Brevitas' TruncAvgPool2d, which FINN's conversion makes its QuantAvgPool2d
            if shaped is None:
                shaped = model.transform(InferShapes())
            shape = shaped.get_tensor_shape(node.input[0])
            attrs = _window(node, len(shape or ()))
            if attrs is None:
                continue
            channels, size = int(shape[1]), int(np.prod(attrs["kernel_shape"]))
            name = node.name or node.output[0]
            values = {f"{name}_unit": np.full([channels, 1, *attrs["kernel_shape"]], 1 / size, np.float32),
                      f"{name}_step": np.float32(1 / size), f"{name}_zero": np.float32(0),
                      f"{name}_bits": np.float32(2)}
            for tensor, value in values.items():
                model.graph.initializer.append(numpy_helper.from_array(value, tensor))
            weight = helper.make_node("Quant", list(values), [f"{name}_weights"], name=f"{name}_weight_quant",
                                      domain=_QONNX_DOMAIN, signed=1, narrow=0, rounding_mode="ROUND")
            conv = helper.make_node("Conv", [node.input[0], weight.output[0]], list(node.output), name=name,
                                    group=channels, dilations=[1, 1], **attrs)
            model.set_tensor_shape(weight.output[0], [channels, 1, *attrs["kernel_shape"]])
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            model.graph.node.insert(index, conv)
            model.graph.node.insert(index, weight)
            changed = True
        return model, changed


class QonnxDomainAtResolvedVersion(Transformation):
    """An import of ``qonnx.custom_op.general`` (or Brevitas' ``onnx.brevitas``) at a version newer than any its
    nodes resolve to becomes the newest version they do resolve to.

    Why: FINN's ``AvgPoolAndTruncToQuantAvgPool`` dispatches on that import and converts only versions 1 and 2 of
    ``Trunc``; qonnx's ``QuantToQCDQ`` writes the domain at version 13, and FINN stopped there (NotImplementedError).
    Why it is exact: qonnx executes a node at the newest version of its op not above the import ("since version"),
    and no op of the model's nodes has a version between the one it resolves to and the old import, so every node
    resolves to the same version under the new import. Left as it is: a domain with an op qonnx does not know.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.custom_op.registry import get_supported_versions

        changed = False
        for entry in model.model.opset_import:
            if entry.domain not in (_QONNX_DOMAIN, "onnx.brevitas"):
                continue
            try:
                resolved = [max(v for v in get_supported_versions(entry.domain, op_type) if v <= entry.version)
                            for op_type in {n.op_type for n in model.graph.node if n.domain == entry.domain}]
            except (KeyError, ValueError):  # an op qonnx does not define, or none at or below the import
                continue
            if resolved and max(resolved) < entry.version:
                entry.version = max(resolved)
                changed = True
        return model, changed


class TruncDroppingNoBitsAsFloor(Transformation):
    """A ``Trunc`` that drops no bits (zero point 0, output scale equal to its scale, output bit width equal to its
    input bit width) gets ``rounding_mode`` FLOOR, the only mode FINN's ``AvgPoolAndTruncToQuantAvgPool`` converts.

    Why it is exact: qonnx's ``Trunc`` (both versions) first rounds ``x / scale`` to an integer, divides it by the
    truncation scale (here 1), clamps to the output range and only then applies the rounding mode, to an integer,
    which every mode leaves as it is. Brevitas' ``TruncAvgPool2d`` defaults to ``RoundTo8bit`` (ROUND) and drops no
    bits where the window sum fits its bit width (4-bit codes, a 2 x 2 window, ``bit_width=6`` or more): FINN refused
    such files. A ``Trunc`` that does drop bits keeps its mode (FINN's layer floors; a rounding one stays refused).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for node in model.graph.node:
            if (node.op_type != "Trunc" or node_str_attr(node, "rounding_mode", "FLOOR").upper() == "FLOOR"
                    or not _drops_no_bits(model, node)):
                continue
            for attr in node.attribute:
                if attr.name == "rounding_mode":
                    attr.s = b"FLOOR"
            changed = True
        return model, changed


def _drops_no_bits(model: ModelWrapper, trunc) -> bool:
    """Whether every parameter of ``trunc`` is a constant and it divides by 1, read as the version qonnx executes
    (its domain's opset in the model, the newest where none: v1 ``x, scale, zero point, input bits, output bits``;
    v2 ``x, scale, zero point, input bits, output scale, output bits``); inputs of the other version: left."""
    version = model.get_opset_imports().get(trunc.domain)
    params = [get_constant(model, name) for name in trunc.input[1:]]
    if len(params) != (4 if version == 1 else 5) or any(p is None or np.size(p) != 1 for p in params):
        return False
    scale, zero, in_bits, *rest = (float(np.asarray(p).reshape(-1)[0]) for p in params)
    if zero != 0:
        return False
    if len(rest) == 1:
        return rest[0] == in_bits
    out_scale, out_bits = rest
    return out_scale == scale and out_bits == in_bits
