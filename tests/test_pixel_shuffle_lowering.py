"""A pixel shuffle moved behind the per-value ops that read it (:mod:`a2q_passes.finn_pixel_shuffle`), so that FINN
lowers the ESPCN super-resolution nets of the A2Q papers (``Conv -> DepthToSpace -> Relu -> Quant``) whole.

The rewrite is checked by executing the graph before and after with qonnx (rounding ties, values past the clamp),
the forms it must leave alone by their graphs, and the end result by ``a2q lower`` on the committed ESPCN, whose
equivalence check executes the QONNX model and FINN's graph on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.finn_pixel_shuffle import PixelShuffleAfterPerValueOps
from tests.cli_helpers import run_a2q

MODELS = Path(__file__).resolve().parents[1] / "models"

QONNX = "qonnx.custom_op.general"
SHUFFLES = {"d2s_dcr": ("DepthToSpace", dict(blocksize=2, mode="DCR")),
            "d2s_crd": ("DepthToSpace", dict(blocksize=2, mode="CRD")),
            "s2d": ("SpaceToDepth", dict(blocksize=2))}


def _chain(kind: str) -> tuple[list, list]:
    """Per-value ops reading ``s`` and writing ``y``, with their constants."""
    c = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    if kind == "relu_quant":  # Brevitas' ESPCN tail: QuantReLU
        return ([helper.make_node("Relu", ["s"], ["r"]),
                 helper.make_node("Quant", ["r", "qs", "qz", "qb"], ["y"], domain=QONNX, signed=0, narrow=0,
                                  rounding_mode="ROUND")],
                [c("qs", 0.25), c("qz", 0.0), c("qb", 4.0)])
    if kind == "affine_clip":  # constants on either side, a Clip between single values
        return ([helper.make_node("Mul", ["s", "m"], ["a"]), helper.make_node("Sub", ["k", "a"], ["b"]),
                 helper.make_node("Clip", ["b", "lo", "hi"], ["y"])],
                [c("m", 3.0), c("k", [[[[0.5]]]]), c("lo", -2.0), c("hi", 2.5)])
    if kind == "bipolar":
        return [helper.make_node("BipolarQuant", ["s", "bs"], ["y"], domain=QONNX)], [c("bs", 0.5)]
    raise ValueError(kind)


def _model(shuffle: str, kind: str, extra_reader: bool = False) -> ModelWrapper:
    op, attrs = SHUFFLES[shuffle]
    nodes, inits = _chain(kind)
    nodes = [helper.make_node(op, ["x"], ["s"], **attrs)] + nodes
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["s"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 6])],
                              outputs, inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX, 1)]))
    return model.transform(InferShapes())


def _inputs(rng: np.random.Generator) -> list[np.ndarray]:
    ties = (np.arange(8 * 4 * 6) % 13 - 6) * 0.125  # every quarter step and the half steps between: rounding ties
    return [ties.reshape(1, 8, 4, 6).astype(np.float32), rng.normal(0, 4, size=(1, 8, 4, 6)).astype(np.float32)]


def _outputs(model: ModelWrapper, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    result = execute_onnx(model, {"x": x})
    return {n: result[n] for n in names}


@pytest.mark.parametrize("kind", ["relu_quant", "affine_clip", "bipolar"])
@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
def test_the_shuffle_moves_behind_per_value_ops_with_the_same_outputs(shuffle, kind):
    before = _model(shuffle, kind)
    after, changed = PixelShuffleAfterPerValueOps().apply(ModelWrapper(before.model.SerializeToString()))
    assert changed
    ops = [n.op_type for n in after.graph.node]
    assert ops[-1] == SHUFFLES[shuffle][0] and ops.count(SHUFFLES[shuffle][0]) == 1, ops
    assert after.graph.node[-1].output[0] == "y"
    onnx.checker.check_model(after.model)
    after = after.transform(InferShapes())
    assert after.get_tensor_shape("y") == before.get_tensor_shape("y")
    for x in _inputs(np.random.default_rng(0)):
        expected, got = _outputs(before, x), _outputs(after, x)
        assert np.array_equal(expected["y"], got["y"]), (shuffle, kind)
    again, changed_again = PixelShuffleAfterPerValueOps().apply(after)
    assert not changed_again  # idempotent


def test_shuffles_the_move_would_change_are_left():
    # the shuffled tensor has a second reader: moving would make the Relu and the Quant run on its values too
    shared = _model("d2s_crd", "relu_quant", extra_reader=True)
    assert not PixelShuffleAfterPerValueOps().apply(shared)[1]
    # one scale per channel of the shuffled tensor: the same channel is another one before the shuffle
    # (the Relu in front of it still moves)
    per_channel = _model("d2s_crd", "relu_quant")
    per_channel.set_initializer("qs", np.asarray([0.25, 0.5], np.float32).reshape(1, 2, 1, 1))
    moved = PixelShuffleAfterPerValueOps().apply(ModelWrapper(per_channel.model.SerializeToString()))[0]
    assert [n.op_type for n in moved.graph.node] == ["Relu", "DepthToSpace", "Quant"]
    for x in _inputs(np.random.default_rng(1)):
        assert np.array_equal(_outputs(per_channel, x)["y"], _outputs(moved, x)["y"])
    # a single value with more axes broadcasts the output to five axes, which no shuffle reads
    wide = _model("d2s_dcr", "affine_clip")
    wide.set_initializer("m", np.full((1, 1, 1, 1, 1), 3.0, np.float32))
    assert not PixelShuffleAfterPerValueOps().apply(wide)[1]
    # x * x reads the shuffled tensor twice: one function of each value, but not a constant operand, so left too
    squared = _model("s2d", "bipolar")
    squared.graph.node[1].CopyFrom(helper.make_node("Mul", ["s", "s"], ["y"]))
    assert not PixelShuffleAfterPerValueOps().apply(squared)[1]


def test_the_committed_espcn_lowers_whole_with_the_shuffle_on_the_host(tmp_path):
    """Before the move FINN stopped at the float ``DepthToSpace`` between the last convolution and its quantizer
    (exit 3, "not lowered"); now every convolution is an MVAU with its output thresholds, the executed worst case of
    each inside its accDataType, and the shuffle reads the graph's output codes."""
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.core.datatype import DataType

    from tests.fuzz.real_files import executed_range

    out = tmp_path / "espcn_hw.onnx"
    result = run_a2q("lower", MODELS / "espcn_x2_w4a4.onnx", out, "--acc-bits", "20", "--samples", "2", "--json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["equivalence"]["within_tolerance"] and report["equivalence"]["samples"] == 2
    lowered = ModelWrapper(str(out))
    assert lowered.graph.node[-1].op_type == "DepthToSpace" and lowered.graph.node[-1].output[0] == "global_out"
    mvaus = [n for n in lowered.graph.node if n.op_type == "MVAU"]
    assert len(mvaus) == 4
    last = getCustomOp(mvaus[-1])
    assert last.get_nodeattr("noActivation") == 0  # the output quantizer's thresholds sit in the last MVAU
    for node in mvaus:
        acc = DataType[getCustomOp(node).get_nodeattr("accDataType")]
        executed = executed_range(lowered, node.name)
        assert acc.min() <= executed.lo and executed.hi <= acc.max(), (node.name, acc, executed)
