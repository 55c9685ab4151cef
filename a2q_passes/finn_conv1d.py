"""TensorFlow's 1-D convolution and max pooling made the 1-D ``Conv`` and ``MaxPool`` FINN's 1-D step lowers.

TensorFlow computes ``conv1d`` as a 2-D convolution on an inserted axis, and tf2onnx (so qonnx's QKeras converter)
writes it so: ``x [N, W, C] -> Unsqueeze(axis 1) -> Transpose(0, 3, 1, 2) -> Conv (kernel 1 x k) -> Squeeze(axis
2)``. FINN lowers the ``Conv`` but has no layer for the ``Squeeze`` (its ``InferSqueeze`` fails on the axes
input), so the lowering stopped there. :class:`ExpandedConv2DAsConv1D` rewrites the chain as ``Transpose(0, 2, 1)
-> Conv (kernel k)`` with the weights' unit axis dropped, which computes the same values in the same layout, and
which FINN's 1-D step (``Change3DTo4DTensors``) lowers like a Brevitas ``QuantConv1d``. tf2onnx writes a
``MaxPooling1D`` behind it as ``Unsqueeze -> Reshape [N, C, W, 1] -> MaxPool (k x 1) -> Squeeze``, which that step
refuses (it knows neither ``Unsqueeze`` nor ``Squeeze``): :class:`ExpandedMaxPoolAsMaxPool1D` makes it the 1-D
``MaxPool`` it computes.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from a2q_passes.graph_values import get_constant, node_attr, node_axes


def _sole_reader(model: ModelWrapper, tensor: str, op_type: str) -> NodeProto | None:
    readers = model.find_consumers(tensor) or []
    outputs = {o.name for o in model.graph.output}
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type and tensor not in outputs else None


def _past_tensor_quantizers(model: ModelWrapper, tensor: str, op_type: str) -> tuple[NodeProto | None, list[str]]:
    """The sole reader of ``tensor`` of type ``op_type``, passing per-tensor ``Quant`` nodes on the way (onnxruntime
    quantizes a Transpose's and a Conv's output: elementwise with scalar parameters, they read any layout alike);
    and the tensors between."""
    between = []
    reader = _sole_reader(model, tensor, "Quant") or _sole_reader(model, tensor, "IntQuant")
    while reader is not None and reader.input[0] == tensor and all(
            (value := get_constant(model, name)) is not None and np.size(value) == 1 for name in reader.input[1:]):
        tensor = reader.output[0]
        between.append(tensor)
        reader = _sole_reader(model, tensor, "Quant") or _sole_reader(model, tensor, "IntQuant")
    return _sole_reader(model, tensor, op_type), between


def _chain(model: ModelWrapper, unsqueeze: NodeProto) -> tuple[NodeProto, NodeProto, NodeProto, list[str]] | None:
    """(Transpose, Conv, Squeeze, the quantized tensors between them) behind ``unsqueeze`` when they form
    TensorFlow's conv1d, else None."""
    shape = model.get_tensor_shape(unsqueeze.input[0])
    if shape is None or len(shape) != 3 or node_axes(model, unsqueeze) not in ([1], [-3]):
        return None
    transpose = _sole_reader(model, unsqueeze.output[0], "Transpose")
    if transpose is None or list(node_attr(transpose, "perm", [])) != [0, 3, 1, 2]:
        return None
    conv, before = _past_tensor_quantizers(model, transpose.output[0], "Conv")
    if conv is None or conv.input[0] != (before[-1] if before else transpose.output[0]):
        return None
    squeeze, after = _past_tensor_quantizers(model, conv.output[0], "Squeeze")
    if squeeze is None or node_axes(model, squeeze) not in ([2], [-2]):
        return None
    weights = model.get_tensor_shape(conv.input[1])
    if weights is None or len(weights) != 4 or weights[2] != 1:
        return None
    ones = {"strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0]}
    if node_attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or any(
            list(node_attr(conv, name, default))[i] != default[i] for name, default in ones.items()
            for i in ((0,) if name != "pads" else (0, 2))):
        return None
    return transpose, conv, squeeze, before + after


def _unit_axis_dropped(model: ModelWrapper, conv: NodeProto) -> bool:
    """The Conv's weights ``[O, I, 1, k]`` (an initializer, or the constant a ``Quant``/``IntQuant`` of its own reads,
    with its 4-D parameters) stored as ``[O, I, k]``; False, changing nothing, where they are held otherwise."""
    tensor = conv.input[1]
    quant = model.find_producer(tensor)
    if quant is None:
        names = [tensor]
    elif quant.op_type in ("Quant", "IntQuant") and len(model.find_consumers(tensor) or []) == 1:
        names = list(quant.input)
    else:
        return False
    values = {name: model.get_initializer(name) for name in names}
    if values[names[0]] is None:
        return False
    # the 4-D tensors: [O, I, 1, k] and per-channel parameters [O, 1, 1, 1], each read by this chain alone
    reshaped = {name: value for name, value in values.items() if value is not None and value.ndim == 4}
    if any(value.shape[2] != 1 or sum(name in n.input for n in model.graph.node) != 1
           for name, value in reshaped.items()):
        return False
    for name, value in reshaped.items():
        model.set_initializer(name, value[:, :, 0, :])
    return True


def _keep_spatial_axis(node: NodeProto, axis: int) -> None:
    """A 2-D window node's ``kernel_shape``, ``strides``, ``dilations`` and ``pads`` reduced to their entries for
    spatial ``axis`` (a 1-D node; the other axis has a unit kernel, stride and dilation and no pads, as the chains
    checked); ``auto_pad`` (checked NOTSET) dropped, every other attribute kept."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "auto_pad"}
    for name in ("kernel_shape", "strides", "dilations"):
        if name in attributes:
            attributes[name] = [attributes[name][axis]]
    if "pads" in attributes:
        attributes["pads"] = [attributes["pads"][axis], attributes["pads"][2 + axis]]
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(name, value) for name, value in attributes.items())


class ExpandedConv2DAsConv1D(Transformation):
    """``Unsqueeze(axis 1) -> Transpose(0, 3, 1, 2) -> Conv (1 x k) -> Squeeze(axis 2)`` on ``[N, W, C]`` becomes
    ``Transpose(0, 2, 1) -> Conv (k)``: the same values, the Conv's weights without their unit axis (see the module
    docstring). Chains whose tensors other nodes also read, whose Conv pads or strides along the unit axis, or whose
    weights are held otherwise than as an initializer or behind their own ``Quant`` are left as they are."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for unsqueeze in [n for n in model.graph.node if n.op_type == "Unsqueeze"]:
            chain = _chain(model, unsqueeze)
            if chain is None:
                continue
            transpose, conv, squeeze, quantized = chain
            if not _unit_axis_dropped(model, conv):
                continue
            transpose.input[0] = unsqueeze.input[0]
            del transpose.attribute[:]
            transpose.attribute.append(helper.make_attribute("perm", [0, 2, 1]))
            _keep_spatial_axis(conv, 1)
            # the Conv, or the last quantizer behind it, writes what the Squeeze wrote
            model.find_producer(squeeze.input[0]).output[0] = squeeze.output[0]
            model.graph.node.remove(unsqueeze)
            model.graph.node.remove(squeeze)
            # shapes that changed: shape inference gives them again
            stale = {transpose.output[0], conv.input[1], conv.output[0], *quantized}
            for info in [i for i in model.graph.value_info if i.name in stale]:
                model.graph.value_info.remove(info)
            changed = True
        if changed:
            from qonnx.transformation.infer_shapes import InferShapes

            model = model.transform(InferShapes())
        return model, changed


def _pool_chain(model: ModelWrapper, unsqueeze: NodeProto) -> tuple[NodeProto, NodeProto, NodeProto] | None:
    """(Reshape, MaxPool, Squeeze) behind ``unsqueeze`` when they pool a ``[N, C, W]`` tensor along W, else None."""
    shape = model.get_tensor_shape(unsqueeze.input[0])
    if shape is None or len(shape) != 3 or node_axes(model, unsqueeze) not in ([1], [-3]):
        return None
    reshape = _sole_reader(model, unsqueeze.output[0], "Reshape")
    if reshape is None or model.get_tensor_shape(reshape.output[0]) != [*shape, 1]:
        return None
    pool = _sole_reader(model, reshape.output[0], "MaxPool")
    squeeze = None if pool is None else _sole_reader(model, pool.output[0], "Squeeze")
    if squeeze is None or node_axes(model, squeeze) not in ([3], [-1]):
        return None
    kernel = list(node_attr(pool, "kernel_shape", []))
    strides, dilations = list(node_attr(pool, "strides", [1, 1])), list(node_attr(pool, "dilations", [1, 1]))
    pads = list(node_attr(pool, "pads", [0, 0, 0, 0]))
    if (node_attr(pool, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or len(kernel) != 2 or kernel[1] != 1
            or strides[1] != 1 or dilations[1] != 1 or pads[1] != 0 or pads[3] != 0 or len(pool.output) != 1):
        return None
    return reshape, pool, squeeze


class ExpandedMaxPoolAsMaxPool1D(Transformation):
    """``Unsqueeze(axis 1) -> Reshape [N, C, W, 1] -> MaxPool (k x 1) -> Squeeze(axis 3)`` on ``[N, C, W]`` becomes
    ``MaxPool (k)`` on it: the same windows over W, so the same values (see the module docstring)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for unsqueeze in [n for n in model.graph.node if n.op_type == "Unsqueeze"]:
            chain = _pool_chain(model, unsqueeze)
            if chain is None:
                continue
            reshape, pool, squeeze = chain
            _keep_spatial_axis(pool, 0)
            pool.input[0] = unsqueeze.input[0]
            pool.output[0] = squeeze.output[0]
            for node in (unsqueeze, reshape, squeeze):
                model.graph.node.remove(node)
            changed = True
        return model, changed
