"""A pixel shuffle (``DepthToSpace``/``SpaceToDepth``) moved behind the per-value ops that read it, for FINN.

ESPCN-style super-resolution nets (the A2Q papers' models, as Brevitas exports them) end in
``Conv -> DepthToSpace -> Relu -> Quant``: the last convolution's output is shuffled before its quantizer. FINN has
no layer for a ``DepthToSpace``; a float one between a convolution and its quantizer keeps the convolution's scale
from being absorbed into the thresholds, and the lowering stopped there. A shuffle only moves values, and an op that
applies one function to every value gives the same result before or after it: a ``Relu``, a ``Quant``/
``BipolarQuant`` whose parameters are single values, a ``Clip`` between single values, an ``Add``/``Sub``/``Mul``/
``Div`` with a single-value constant. Moved behind them, the quantizer follows its convolution as everywhere else in
FINN's flow, and the shuffle reads the output codes at the graph's end, where it runs on the host like a layout op.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from a2q_passes.graph_values import clip_bounds, get_constant

PIXEL_SHUFFLES = ("DepthToSpace", "SpaceToDepth")
_UNARY = ("Relu", "Identity")
_QUANTIZERS = ("Quant", "BipolarQuant")  # every input after the first a parameter
_BINARY = ("Add", "Sub", "Mul", "Div")


def _applies_one_function_to_every_value(model: ModelWrapper, node: NodeProto, tensor: str, rank: int) -> bool:
    """Whether ``node`` reads ``tensor`` (of ``rank`` axes) value by value with the same function for each: its other
    inputs single-value constants that broadcast to no more axes, and it writes one output."""
    standard = node.domain in ("", "ai.onnx")
    if len(node.output) != 1 or not (standard or node.op_type in _QUANTIZERS):
        return False
    if node.op_type in _UNARY:
        return list(node.input) == [tensor]
    if node.op_type == "Clip":
        bounds = clip_bounds(model, node)
        present = [i for i in node.input[1:] if i]
        constant = all(get_constant(model, i) is not None for i in present)
        return node.input[0] == tensor and constant and all(b is None or np.size(b) == 1 for b in bounds)
    if node.op_type in _QUANTIZERS and node.input[0] == tensor:
        others = list(node.input[1:])
    elif node.op_type in _BINARY and len(node.input) == 2:
        others = [t for t in node.input if t != tensor]  # either operand: c - x is one function of x too
    else:
        return False
    if len(others) != len(node.input) - 1:  # the tensor read more than once (x * x), or not at all
        return False
    values = [get_constant(model, t) for t in others]
    return all(v is not None and np.size(v) == 1 and np.ndim(v) <= rank for v in values)


class PixelShuffleAfterPerValueOps(Transformation):
    """Each ``DepthToSpace``/``SpaceToDepth`` read by one per-value op (see the module) swaps places with it, until
    its reader is none or several or another op: ``x -> shuffle -> f -> z`` becomes ``x -> f -> shuffle -> z`` (the
    tensor ``z`` keeps its name, its values and its annotations)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        changed = False
        for index in [i for i, n in enumerate(model.graph.node)
                      if n.op_type in PIXEL_SHUFFLES and n.domain in ("", "ai.onnx")]:
            while (moved_to := _swap_with_reader(model, index)) is not None:
                index, changed = moved_to, True
        return model, changed


def _swap_with_reader(model: ModelWrapper, index: int) -> int | None:
    """Swap the shuffle at ``index`` of the node list with its reader if it has one per-value reader; the shuffle's
    new index, else ``None``."""
    nodes = model.graph.node
    shuffle = nodes[index]
    shuffled = shuffle.output[0]
    readers = model.find_consumers(shuffled) or []
    shape = model.get_tensor_shape(shuffle.input[0])
    if (len(readers) != 1 or shape is None or shuffled in {o.name for o in model.graph.output}
            or not _applies_one_function_to_every_value(model, readers[0], shuffled, len(shape))):
        return None
    reader = readers[0]
    result = reader.output[0]
    second = next(i for i, n in enumerate(nodes) if result in n.output)
    between = model.make_new_valueinfo_name()
    for i, name in enumerate(reader.input):
        if name == shuffled:
            reader.input[i] = shuffle.input[0]
    reader.output[0] = between
    shuffle.input[0], shuffle.output[0] = between, result
    for entries, key in ((model.graph.value_info, "name"), (model.graph.quantization_annotation, "tensor_name")):
        for entry in [e for e in entries if getattr(e, key) == shuffled]:  # the shuffled tensor is gone
            entries.remove(entry)
    model.set_tensor_shape(between, list(shape))
    # the reader now runs where the shuffle ran (its inputs exist there), the shuffle where the reader ran
    moved_reader, moved_shuffle = NodeProto(), NodeProto()
    moved_reader.CopyFrom(reader)
    moved_shuffle.CopyFrom(shuffle)
    nodes[index].CopyFrom(moved_reader)
    nodes[second].CopyFrom(moved_shuffle)
    return second
