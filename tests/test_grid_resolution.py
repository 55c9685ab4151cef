"""Walking back from a MAC input to its quantizer through ops that keep (or break) the integer grid."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.bounds import IntRange
from a2q_passes.input_grids import GridResolver

Q = "qonnx.custom_op.general"


def _model(nodes, inits, inputs=("x",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, 2, 4, 4]) for i in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32 if k not in ("shape", "pads", "sizes") else np.int64), k)
                     for k, v in inits.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def _quant(x, out, scale="s", zp="z", bits="b", signed=0, narrow=0):
    return helper.make_node("Quant", [x, scale, zp, bits], [out], domain=Q, signed=signed, narrow=narrow)


BASE = {"s": 0.5, "s2": 0.25, "z": 0.0, "z3": 3.0, "b": 4.0, "b8": 8.0, "shape": [1, 32], "pads": [0, 0, 1, 1, 0, 0, 1, 1],
        "sizes": [1, 2, 8, 8], "pv": 0.0, "pv1": 1.0, "c": 2.0}


def resolve(nodes, tensor="out", inputs=("x",), **kw):
    return GridResolver(_model(nodes, BASE, inputs), **kw).resolve(tensor)


def test_chain_of_grid_preserving_ops():
    nodes = [
        _quant("x", "q"),
        helper.make_node("Pad", ["q", "pads", "pv"], ["p"], mode="constant"),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 2]),
        helper.make_node("Resize", ["m", "", "", "sizes"], ["r"], mode="nearest"),
        helper.make_node("DepthToSpace", ["r"], ["d"], blocksize=1),
        helper.make_node("Transpose", ["d"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["t", "c"], ["out"]),
    ]
    grid, reason = resolve(nodes)
    assert reason == "" and grid.range == IntRange(0, 15) and grid.dtype == "UINT4" and grid.scale == pytest.approx(1.0)


def test_relu_after_signed_quant_drops_negative_codes():
    grid, _ = resolve([_quant("x", "q", signed=1), helper.make_node("Relu", ["q"], ["out"])])
    assert grid.range == IntRange(0, 7) and grid.dtype == "INT4"


@pytest.mark.parametrize("convention,expected", [("fold", IntRange(0, 255)), ("subtract", IntRange(-3, 252))])
def test_activation_zero_point_conventions(convention, expected):
    grid, _ = resolve([_quant("x", "out", zp="z3", bits="b8")], zero_point=convention)
    assert grid.range == expected


def test_concat_of_same_grid_and_of_different_scales():
    same = [_quant("x", "a"), _quant("y", "b"), helper.make_node("Concat", ["a", "b"], ["out"], axis=1)]
    grid, _ = resolve(same, inputs=("x", "y"))
    assert grid.range == IntRange(0, 15)
    mixed = [_quant("x", "a"), _quant("y", "b", scale="s2"), helper.make_node("Concat", ["a", "b"], ["out"], axis=1)]
    grid, reason = resolve(mixed, inputs=("x", "y"))
    assert grid is None and "different integer grids" in reason


@pytest.mark.parametrize("node,fragment", [
    (helper.make_node("Pad", ["q", "pads", "pv1"], ["out"], mode="constant"), "zero padding"),
    (helper.make_node("Resize", ["q", "", "", "sizes"], ["out"], mode="linear"), "nearest"),
    (helper.make_node("Sigmoid", ["q"], ["out"]), "not on an integer grid"),
    (helper.make_node("AveragePool", ["q"], ["out"], kernel_shape=[2, 2]), "not on an integer grid"),
])
def test_grid_breaking_ops_are_reported(node, fragment):
    grid, reason = resolve([_quant("x", "q"), node])
    assert grid is None and fragment in reason


def test_multithreshold_and_annotations():
    thresholds = np.tile(np.arange(7, dtype=np.float32), (2, 1))
    model = _model([helper.make_node("MultiThreshold", ["x", "thr"], ["out"], domain=Q, out_dtype="INT3",
                                     out_scale=1.0, out_bias=-4.0)], {**BASE, "thr": thresholds})
    grid, _ = GridResolver(model).resolve("out")
    assert grid.range == IntRange(-4, 3)
    model.set_tensor_datatype("x", DataType["INT6"])
    grid, _ = GridResolver(model).resolve("x")
    assert grid.range == IntRange(-32, 31)


def test_float_graph_input_and_user_dtype():
    grid, reason = resolve([helper.make_node("Relu", ["x"], ["out"])])
    assert grid is None and "--input-dtype" in reason
    grid, _ = resolve([helper.make_node("Relu", ["x"], ["out"])], input_dtypes={"*": "UINT8"})
    assert grid.range == IntRange(0, 255)
