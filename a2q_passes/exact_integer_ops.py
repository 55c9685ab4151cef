"""Exact execution of ONNX's integer MAC ops where onnxruntime's kernels are not exact on this CPU.

onnxruntime multiplies uint8 by int8 with AVX2's ``vpmaddubsw`` on CPUs without VNNI (AVX512-VNNI / AVX-VNNI), which
adds each pair of products in int16 with saturation: ``255 * 127 + 255 * 127`` gives 32767, not 64770
(onnxruntime's documented reason for ``reduce_range``). That is an overflow inside the runtime, below any accumulator
a2q reasons about, so an "exact" reference computed by those kernels is not exact. A one-node probe tells whether
this CPU does it; where it does, these ops run in ONNX's reference implementation (exact integer arithmetic, slower).
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

# the standard-domain ops that multiply integer operands (onnxruntime's com.microsoft ones have no reference kernel)
INTEGER_MAC_OPS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")


@functools.cache
def onnxruntime_saturates_integer_products() -> bool:
    """Whether onnxruntime's uint8 x int8 ``MatMulInteger`` on this CPU saturates a pair of products in int16."""
    import onnxruntime as rt

    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                              [numpy_helper.from_array(np.full((2, 1), 127, np.int8), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = rt.SessionOptions()
    options.log_severity_level = 3
    session = rt.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"a": np.full((1, 2), 255, np.uint8)})
    return int(y.reshape(-1)[0]) != 2 * 255 * 127


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


class ReferenceSession:
    """A one-node model in ONNX's reference implementation, with the part of ``InferenceSession``'s interface that
    node-by-node runners use (``get_inputs``, ``run``)."""

    def __init__(self, model: ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)
        self.inputs = [_Input(vi.name) for vi in model.graph.input]

    def get_inputs(self) -> list[_Input]:
        return self.inputs

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.evaluator.run(outputs, feeds)


def needs_reference(domain: str, op_type: str) -> bool:
    """Whether a node of this op must run in the reference implementation to be exact on this CPU."""
    return domain in ("", "ai.onnx") and op_type in INTEGER_MAC_OPS and onnxruntime_saturates_integer_products()
