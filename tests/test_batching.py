"""``batching.batch_free_reshapes``: the copy of a batch-1 export that runs on batches (also exercised through
fine-tuning and allocation of such exports in their own tests)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.batching import batch_free_reshapes


def _model(reshape: object, opset: int, inits: list) -> ModelWrapper:
    graph = helper.make_graph([reshape], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_a_constant_batch_one_shape_copies_the_batch_and_the_original_is_untouched():
    model = _model(helper.make_node("Reshape", ["x", "shape"], ["y"]), 13,
                   [numpy_helper.from_array(np.array([1, 2, 2], np.int64), "shape")])
    before = model.model.SerializeToString()
    free = batch_free_reshapes(model)
    assert model.model.SerializeToString() == before
    free.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # onnxruntime checks the declared batch
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    session = ort.InferenceSession(free.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x.reshape(3, 2, 2))


def test_an_opset_1_reshape_with_its_shape_as_attribute_is_left_alone():
    """FINN's older graphs (the zoo's TFC after FINN's steps) hold Reshape-1, whose shape is an attribute: once an
    IndexError (found by the corpus through `a2q allocate`)."""
    model = _model(helper.make_node("Reshape", ["x"], ["y"], shape=[1, 2, 2]), 1, [])
    assert batch_free_reshapes(model) is model
