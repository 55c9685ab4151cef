"""Global average pooling in ``a2q lower`` (:mod:`a2q_passes.finn_global_pooling`).

Brevitas' graph-mode PTQ exports ``AdaptiveAvgPool2d(1)`` as ``ReduceMean`` over the spatial axes behind a
``Quant -> Relu``; FINN has a layer for neither form, and ``a2q lower`` left that ``ReduceMean`` and everything behind
it unlowered (exit 3). The rewrite is checked by executing the graph before and after, and end to end on the files
Brevitas writes: lowered whole, executed equal to the QONNX model, every MVAU/VVAU holding its executed worst case.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from qonnx.util.basic import qonnx_make_model

from a2q_passes.finn_global_pooling import ReduceMeanAsGlobalAveragePool
from tests.brevitas_graph_ptq import GraphPtqSpec, export_graph_ptq
from tests.cli_helpers import run_a2q
from tests.test_zero_point_lowering import _assert_holds_worst_case


def _reduce_mean(shape: list[int], axes: list[int] | None, keepdims: int, opset: int,
                 axes_as_input: bool = False) -> ModelWrapper:
    """x -> ReduceMean(axes, keepdims) -> y; opset 18 takes the axes as an input (a constant, or the graph input
    ``axes`` where ``axes_as_input``), opset 13 as an attribute."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    inits, attrs, node_inputs = [], {"keepdims": keepdims}, ["x"]
    if axes is not None and opset >= 18:
        node_inputs.append("axes")
        if axes_as_input:
            inputs.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [len(axes)]))
        else:
            inits.append(numpy_helper.from_array(np.asarray(axes, np.int64), "axes"))
    elif axes is not None:
        attrs["axes"] = axes
    node = helper.make_node("ReduceMean", node_inputs, ["y"], name="mean", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.mark.parametrize("axes", [[2, 3], [3, 2], [-1, -2], [2, -1]])
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_over_the_spatial_axes_becomes_global_average_pool(axes, keepdims, opset):
    """Every spelling of the two spatial axes, kept or dropped: the same values (up to the float sum's order) and
    the same shape, from GlobalAveragePool (and Flatten where the axes are dropped)."""
    model = _reduce_mean([2, 3, 5, 7], axes, keepdims, opset)
    x = np.random.default_rng(len(axes) + keepdims).normal(size=(2, 3, 5, 7)).astype(np.float32)
    before = execute_onnx(model, {"x": x})["y"]
    rewritten, changed = ReduceMeanAsGlobalAveragePool().apply(ModelWrapper(model.model.SerializeToString()))
    assert changed
    assert [n.op_type for n in rewritten.graph.node] == ["GlobalAveragePool"] + ([] if keepdims else ["Flatten"])
    after = execute_onnx(rewritten, {"x": x})["y"]
    assert before.shape == after.shape == ((2, 3, 1, 1) if keepdims else (2, 3))
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,axes,opset,axes_as_input", [
    ([2, 3, 5, 7], [1], 13, False), ([2, 3, 5, 7], [3], 18, False), ([2, 3, 5, 7], [1, 2, 3], 13, False),
    ([2, 3, 5], [2], 13, False), ([2, 3, 5, 7, 4], [2, 3], 13, False), ([2, 3, 5, 7], None, 13, False),
    ([2, 3, 5, 7], [2, 3], 18, True)])
def test_other_reductions_are_left(shape, axes, opset, axes_as_input):
    """Other axes, other ranks, all axes (none given) and axes that are no constant are not global pooling of an
    NCHW tensor: left as they are."""
    model = _reduce_mean(shape, axes, 1, opset, axes_as_input)
    before = model.model.SerializeToString()
    rewritten, changed = ReduceMeanAsGlobalAveragePool().apply(model)
    assert not changed and rewritten.model.SerializeToString() == before


@pytest.mark.parametrize("options", [(("weight_quant_granularity", "per_tensor"),), (("act_quant_type", "asym"),)],
                         ids=["per_tensor", "asymmetric_activations"])
def test_lower_takes_the_global_pooling_of_brevitas_graph_ptq(options, tmp_path):
    """The residual net of Brevitas' graph-mode PTQ (Conv/BN/ReLU, a residual Add whose first branch also feeds the
    next Conv, a depthwise Conv, global average pooling, Linear), symmetric activations and asymmetric ones (a zero
    point in front of each Relu): lowered whole (exit 0, nothing unlowered; the fork's Mul moved past the fork
    before FINN's MoveLinearPastEltwiseAdd, which alone left the Conv unfed), the pooling a GlobalAccPool on integers
    whose 1 / (H W) went into the thresholds behind it, executed equal to the QONNX model, and every MVAU/VVAU
    holding its executed worst case."""
    path = export_graph_ptq(tmp_path, GraphPtqSpec("residual", "fx", 8, 8, options))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "ReduceMean" in ops and "GlobalAveragePool" not in ops  # the form Brevitas writes
    out = tmp_path / "hw.onnx"
    result = run_a2q("lower", str(path), str(out), "--json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    report = json.loads(result.stdout)
    assert [n["op_type"] for n in report["lowering"]["mac_nodes"]] == ["MVAU", "MVAU", "VVAU", "MVAU"]
    assert not [n for n in report["lowering"]["unlowered"] if n["blocking"]]
    assert report["equivalence"]["within_tolerance"] and report["equivalence"]["samples"] > 0
    lowered = ModelWrapper(str(out))
    pool = lowered.get_nodes_by_op_type("GlobalAccPool")
    assert len(pool) == 1 and DataType[getCustomOp(pool[0]).get_nodeattr("inputDataType")].is_integer()
    floats = [n.op_type for n in lowered.graph.node if n.op_type in ("ElementwiseMul", "ElementwiseMax")]
    assert floats == ["ElementwiseMul"] and lowered.find_consumer(lowered.graph.node[-1].output[0]) is None
    assert lowered.graph.node[-1].op_type == "ElementwiseMul"  # only the output scale stays a float multiply
    assert _assert_holds_worst_case(lowered) == 4


def _cnn_with_global_pool(path) -> None:
    """Quant(uint8) -> Conv (4-bit weights) -> Quant(int4) -> Relu -> ReduceMean(H, W) -> Reshape -> Quant(int4)
    -> Gemm, the form of a Brevitas graph-mode PTQ classifier head, saved to ``path``."""
    from qonnx.transformation.infer_shapes import InferShapes

    qonnx = "qonnx.custom_op.general"
    rng = np.random.default_rng(0)
    quant = {"domain": qonnx, "narrow": 0, "rounding_mode": "ROUND"}
    nodes = [helper.make_node("Quant", ["x", "s_in", "z", "b8"], ["xq"], signed=0, **quant),
             helper.make_node("Quant", ["w1", "s_w", "z", "b4"], ["w1q"], signed=1, **quant),
             helper.make_node("Conv", ["xq", "w1q"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Quant", ["c1", "s_a", "z", "b4"], ["a1"], signed=1, **quant),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("ReduceMean", ["r1"], ["m"], axes=[2, 3], keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["f"]),
             helper.make_node("Quant", ["f", "s_f", "z", "b4"], ["fq"], signed=1, **quant),
             helper.make_node("Quant", ["w2", "s_w", "z", "b4"], ["w2q"], signed=1, **quant),
             helper.make_node("Gemm", ["fq", "w2q"], ["y"], transB=1)]
    values = {"s_in": 1 / 255, "z": 0, "b8": 8, "b4": 4, "s_w": 0.05, "s_a": 0.1, "s_f": 0.05,
              "w1": rng.integers(-7, 8, size=(8, 3, 3, 3)) * 0.05, "w2": rng.integers(-7, 8, size=(10, 8)) * 0.05}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in values.items()]
    inits.append(numpy_helper.from_array(np.array([1, 8], np.int64), "shape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(qonnx, 1)]))
    model.transform(InferShapes()).save(str(path))


def test_finn_build_steps_take_global_pooling(tmp_path):
    """FINN's own builder with the a2q steps on a classifier head with global pooling: step_a2q_global_pools makes
    the pool a GlobalAccPool before step_convert_to_hw (FINN infers it only after the thresholds behind it, and its
    plain Mul by 1 / (H W) stopped the dataflow partition: "Unsupported/unmapped layer(s)"), and the thresholds of
    the signed quantizer behind it, on the pool's unsigned sums, are raised from below 0 to 0 (FINN's
    step_minimize_bit_width_initial asserted they are not negative). Every step runs, and each MVAU's accDataType
    holds the brute-force range of its weights over its input type within the target."""
    from a2q_passes.finn_accumulators import iterate_mac_nodes
    from a2q_passes.finn_runtime import run_estimate_build
    from a2q_passes.finn_steps import with_a2q_steps
    from tests.test_finn_flow import _brute_force_range, _mac_rows

    _cnn_with_global_pool(tmp_path / "gap.onnx")
    steps = with_a2q_steps(acc_bits=14)
    result = run_estimate_build(tmp_path / "gap.onnx", tmp_path / "build", "xczu3eg-sbva484-1-e", steps=steps)
    assert result.steps_completed == [s if isinstance(s, str) else s.__name__ for s in steps]
    final = ModelWrapper(str(result.final_model))
    assert [n.op_type for n in final.graph.node if n.op_type.startswith("GlobalAccPool")]
    nodes = list(iterate_mac_nodes(final))
    assert len(nodes) == 2
    for node in nodes:
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(final, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= 14


def test_lower_takes_global_pooling_and_its_output_meets_finns_threshold_checks(tmp_path):
    """`lower` on the same head: lowered whole and executed equal, every MVAU holding its executed worst case; FINN's
    MinimizeWeightBitWidth (what its step_minimize_bit_width_initial runs on a lowered graph) accepts every
    Thresholding layer of the output (lower's own RoundAndClipThresholds already raised the signed quantizer's
    thresholds on the pool's unsigned sums to 0)."""
    from finn.transformation.fpgadataflow.minimize_weight_bit_width import MinimizeWeightBitWidth

    _cnn_with_global_pool(tmp_path / "gap.onnx")
    result = run_a2q("lower", str(tmp_path / "gap.onnx"), str(tmp_path / "hw.onnx"), "--json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    report = json.loads(result.stdout)
    blocking = [n for n in report["lowering"]["unlowered"] if n["blocking"]]
    assert report["equivalence"]["within_tolerance"] and not blocking
    lowered = ModelWrapper(str(tmp_path / "hw.onnx"))
    assert lowered.get_nodes_by_op_type("GlobalAccPool")
    unsigned = [n for n in lowered.graph.node if n.op_type == "Thresholding"
                and not DataType[getCustomOp(n).get_nodeattr("inputDataType")].signed()]
    assert unsigned and all(np.all(lowered.get_initializer(n.input[1]) >= 0) for n in unsigned)
    lowered.transform(MinimizeWeightBitWidth())
    assert _assert_holds_worst_case(lowered) == 2
