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


def auto_pads(auto_pad: str, sizes: list[int], kernel: list[int], strides: list[int],
              dilations: list[int]) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial dim that ONNX defines for ``auto_pad`` VALID or SAME_UPPER/SAME_LOWER of a
    window over inputs of ``sizes``: SAME makes ``ceil(size / stride)`` outputs, the odd pad at the end (UPPER) or the
    beginning (LOWER)."""
    if auto_pad == "VALID":
        return [0] * len(sizes), [0] * len(sizes)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad '{auto_pad}'")
    total = [max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
             for size, k, s, d in zip(sizes, kernel, strides, dilations)]
    small = [t // 2 for t in total]
    begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
    return begin, [t - b for t, b in zip(total, begin)]


def clip_bounds(model: ModelWrapper, clip: NodeProto) -> tuple[np.ndarray | float | None, np.ndarray | float | None]:
    """A ``Clip``'s lower and upper bound: its inputs 1 and 2 (opset 11 on) or its ``min``/``max`` attributes (before);
    ``None`` where a bound is absent (unbounded) or not a constant."""
    return tuple(get_constant(model, clip.input[i]) if len(clip.input) > i and clip.input[i] else node_attr(clip, name)
                 for i, name in ((1, "min"), (2, "max")))


def node_axes(model: ModelWrapper, node: NodeProto) -> list[int] | None:
    """The axes of a ``Squeeze``/``Unsqueeze``/``Reduce*`` node as given: its ``axes`` input (opset 13, for the
    reductions 18) or attribute; ``None`` where neither is a constant."""
    if len(node.input) > 1 and node.input[1]:
        axes = get_constant(model, node.input[1])
    else:
        axes = node_attr(node, "axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


def node_str_attr(node: NodeProto, name: str, default: str) -> str:
    """A string attribute, decoded."""
    value = node_attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def sole_relu_reader(model: ModelWrapper, node: NodeProto) -> NodeProto | None:
    """The ``Relu`` that alone reads ``node``'s output, where that output is no graph output (so a rewrite may fold
    the ``Relu`` into ``node``), else ``None``."""
    readers = model.find_consumers(node.output[0]) or []
    if len(readers) != 1 or (readers[0].op_type, readers[0].domain) not in (("Relu", ""), ("Relu", "ai.onnx")):
        return None
    return None if node.output[0] in {o.name for o in model.graph.output} else readers[0]


def node_label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def extracted_quant_scale(model: ModelWrapper, mul: NodeProto) -> tuple[NodeProto, NodeProto] | str:
    """``(div, quant)`` where ``mul`` ends ``Mul(Quant(Div(x, s), 1, 0, b), s)``, the form qonnx's
    ExtractQuantScaleZeroPt writes for a ``Quant(x, s, 0, b)``; else why not (a phrase naming the node that differs).

    Only that exact form: the ``Quant``'s own scale 1 and zero point 0, and the same ``s`` (values and shape) as the
    ``Div``'s divisor and the ``Mul``'s factor; any other factor after a quantizer changes the grid it outputs.
    """
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return f"{node_label(mul)} is no Mul of two inputs"
    data = 0 if get_constant(model, mul.input[1]) is not None else 1
    after = get_constant(model, mul.input[1 - data])
    quant = model.find_producer(mul.input[data])
    if after is None:
        return f"{node_label(mul)} multiplies by no constant factor"
    if quant is None or quant.op_type not in ("Quant", "IntQuant"):
        return f"{node_label(mul)} multiplies {node_label(quant) if quant is not None else 'a constant'}'s output"
    unit_scale = get_constant(model, quant.input[1]) if len(quant.input) > 1 else None
    unit_zero = get_constant(model, quant.input[2]) if len(quant.input) > 2 else None
    if unit_scale is None or unit_zero is None or np.any(unit_scale != 1) or np.any(unit_zero != 0):
        return f"{node_label(quant)} has its own scale or zero point (not the constants 1 and 0)"
    div = model.find_producer(quant.input[0])
    before = get_constant(model, div.input[1]) if div is not None and div.op_type == "Div" else None
    if before is None:
        return (f"{node_label(quant)} quantizes the output of {node_label(div) if div is not None else 'no node'}, not "
                "a tensor divided by a constant (a zero point moved out as Add/Sub is not read)")
    if np.shape(before) != np.shape(after) or not np.array_equal(before, after):
        return f"{node_label(div)} divides by another scale than {node_label(mul)} multiplies by"
    return div, quant
