"""Global average pooling as FINN lowers it.

Brevitas' graph-mode PTQ (``brevitas_examples``' ``quantize_model``) exports a network's ``x.mean((2, 3),
keepdim=True)`` or ``AdaptiveAvgPool2d(1)`` as ``ReduceMean`` over the two spatial axes. FINN lowers global
average pooling only as ``GlobalAveragePool`` (its ``InferGlobalAccPoolLayer``: an integer ``GlobalAccPool``
and a scalar ``Mul`` by 1 / (H W)); its ``InferPoolFromReduce`` takes a ``ReduceMean`` only behind an
``Im2Col``, so such a ``ReduceMean`` stayed a float node and everything behind it unlowered.

Two steps, used by the lowering flow (:mod:`a2q_passes.finn_flow`) and the FINN build steps
(``step_a2q_finn_preparation``, ``step_a2q_global_pools``):

- :class:`ReduceMeanAsGlobalAveragePool`, before FINN's conversion, makes that ``ReduceMean`` a
  ``GlobalAveragePool`` (and a ``Flatten`` where it drops the reduced axes);
- :func:`integer_global_pools` (the flow) / :func:`accumulate_global_pools` (the build step), after
  streamlining: FINN's builder infers the ``GlobalAccPool`` only in ``step_convert_to_hw``, after the thresholds
  behind it were made hardware, so the ``Mul`` by 1 / (H W) would stay a float multiply in front of them.
  Inferring it once the pool reads integers, and streamlining again, moves that ``Mul`` into the thresholds as FINN
  moves every other scale.
"""

from __future__ import annotations

from onnx import NodeProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.graph_values import node_attr, node_axes

_SPATIAL_AXES = {2, 3}  # of a 4-D NCHW tensor, ONNX's layout for GlobalAveragePool


class ReduceMeanAsGlobalAveragePool(Transformation):
    """``ReduceMean`` of a 4-D tensor over axes 2 and 3 becomes ``GlobalAveragePool`` (``keepdims=0``: followed by
    ``Flatten``, which drops the two axes of size 1).

    Why it is exact: both take the mean of each (n, c) plane of the NCHW tensor; only the order of the float sum may
    differ, which the lowering's equivalence check bounds. Any other ``ReduceMean`` (other axes, axes not constant,
    unknown rank) is left as it is.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        shaped = None
        changed = False
        for node in list(model.graph.node):
            if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
                continue
            if model.get_tensor_shape(node.input[0]) is None and shaped is None:
                shaped = model.transform(InferShapes())
            shape = (shaped or model).get_tensor_shape(node.input[0])
            if shape is None or len(shape) != 4 or _reduced_axes(model, node) != _SPATIAL_AXES:
                continue
            keep = bool(node_attr(node, "keepdims", 1))
            pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
            replacement = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name)]
            if not keep:
                model.set_tensor_shape(pooled, [*shape[:2], 1, 1])  # qonnx's executor wants every shape
                replacement.append(helper.make_node("Flatten", [pooled], [node.output[0]], axis=1,
                                                    name=f"{node.name}_flatten"))
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            for offset, new in enumerate(replacement):
                model.graph.node.insert(index + offset, new)
            changed = True
        return model, changed


def _reduced_axes(model: ModelWrapper, node: NodeProto) -> set[int] | None:
    """The axes ``node`` reduces, non-negative for a 4-D input: the ``axes`` input (opset 18) or attribute; ``None``
    where they are not constant or not given (all axes)."""
    axes = node_axes(model, node)
    return None if axes is None else {a % 4 for a in axes}


def accumulate_global_pools(model: ModelWrapper) -> ModelWrapper:
    """``model`` with each ``GlobalAveragePool`` on integers a ``GlobalAccPool`` and a scalar ``Mul``, streamlined
    again (FINN's ``Streamline``) so that ``Mul`` moves into the thresholds behind it: the build step
    ``step_a2q_global_pools`` between FINN's ``step_streamline`` and ``step_convert_to_hw``."""
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline import Streamline

    if not integer_global_pools(model):
        return model
    return model.transform(InferGlobalAccPoolLayer()).transform(Streamline())


def integer_global_pools(model: ModelWrapper) -> bool:
    """Whether ``model`` holds a ``GlobalAveragePool`` on integers, which FINN's ``InferGlobalAccPoolLayer`` makes a
    ``GlobalAccPool`` and a scalar ``Mul`` (the flow then streamlines again)."""
    return any(model.get_tensor_datatype(node.input[0]).is_integer()
               for node in model.get_nodes_by_op_type("GlobalAveragePool"))
