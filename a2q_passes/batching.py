"""Run a model exported at batch 1 on batches of any size.

Exporters bake the export batch into constant ``Reshape`` shapes (Brevitas' ``export_qonnx``
with the dynamo exporter writes ``Reshape(x, [1, 3136])`` with ``allowzero=1``), so the graph
fails on a batch of 64. Every command that executes or trains a model works on a copy whose
batch-leading constant shapes copy dimension 0 instead; the written model is never changed.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import get_constant, node_attr
from a2q_passes.model_io import data_inputs


def batch_free_reshapes(model: ModelWrapper) -> ModelWrapper:
    """A copy in which each ``Reshape`` to a constant shape starting with the declared batch copies dim 0.

    Only a Reshape whose input also starts with the declared batch is rewritten (it keeps the
    batch where it is); ``allowzero=1`` is dropped where the shape has no other zero, since it
    only changes the meaning of zeros.
    """
    inputs = data_inputs(model.graph)
    declared = model.get_tensor_shape(inputs[0].name) if inputs else None
    if not declared:
        return model
    batch = declared[0]
    copy: ModelWrapper | None = None
    inferred: list = []  # shapes the graph does not annotate (a Q/DQ chain's outputs): inferred once, when needed
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2:  # opset < 5: the shape is an attribute, left as is
            continue
        target = get_constant(model, node.input[1])
        if target is None or target.size == 0 or target[0] != batch:
            continue
        data_shape = model.get_tensor_shape(node.input[0])
        if not data_shape:
            inferred = inferred or [_inferred_shapes(model)]
            data_shape = inferred[0].get_tensor_shape(node.input[0]) if inferred[0] is not None else None
        if not data_shape or data_shape[0] != batch:
            continue
        if node_attr(node, "allowzero", 0) and np.any(target[1:] == 0):
            continue
        copy = copy or ModelWrapper(model.model.__deepcopy__())
        fixed = target.astype(np.int64).copy()
        fixed[0] = 0  # ONNX Reshape without allowzero: 0 copies the input's dimension
        name = f"{node.input[1]}__batch_free"
        copy.graph.initializer.append(numpy_helper.from_array(fixed, name))
        rewritten = copy.graph.node[index]
        rewritten.input[1] = name
        kept = [a for a in rewritten.attribute if a.name != "allowzero"]  # its default, 0; opset < 14 has none
        del rewritten.attribute[:]
        rewritten.attribute.extend(kept)
    return copy or model


def _inferred_shapes(model: ModelWrapper):
    """``model`` with inferred shapes (a read-only copy), or None where shape inference fails on it."""
    from a2q_passes.read_only_model import with_inferred_shapes

    try:
        return with_inferred_shapes(model)
    except Exception:  # onnx's and qonnx's inference raise their own types; no shape then means no rewrite
        return None
