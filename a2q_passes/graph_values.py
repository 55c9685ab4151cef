"""Values and attributes of an ONNX graph's nodes, read without executing it: constants (initializers and what
``Constant``, ``Identity`` and exact integer ``Cast`` nodes make of them) and node attributes."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.tensor_store import initializer_value


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
        value, to = get_constant(model, producer.input[0]), node_attr(producer, "to")
        target = helper.tensor_dtype_to_np_dtype(int(to)) if to else None
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


def node_label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"
