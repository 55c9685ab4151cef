"""A ``Concat`` of codes of different types in front of a layer FINN lowers.

qonnx's ``InferDataTypes`` types a standard ``Concat``'s output as its first input: a Concat of UINT2 and UINT6 codes
is UINT2, and FINN built the MVAU behind it for 2-bit inputs. `lower` then wrote an MVAU whose ``accDataType`` held
the range of 2-bit inputs (INT9) while 6-bit codes reach it (the executed worst case needs INT13): a false "no
overflow". Such an MVAU is now refused by name (exit 1, nothing written), by every reader of FINN graphs; a join
FINN makes a ``StreamingConcat`` (typed by all its inputs) lowers, its MVAU holding its executed worst case.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp
from qonnx.util.basic import qonnx_make_model

from tests.cli_helpers import run_cli

QONNX = "qonnx.custom_op.general"


def _joined(path, axis: int, first_bits: int = 2, second_bits: int = 6) -> None:
    """x -> two unsigned Quants of scale 1 (``first_bits``, ``second_bits``) -> Concat(axis) -> 3 x 3 Conv."""
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    weights = np.random.default_rng(0).integers(-7, 8, size=(3, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Quant", ["x", "one", "zero", "b_first"], ["a"], domain=QONNX, signed=0, narrow=0,
                         rounding_mode="ROUND"),
        helper.make_node("Quant", ["x", "one", "zero", "b_second"], ["b"], domain=QONNX, signed=0, narrow=0,
                         rounding_mode="ROUND"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=axis),
        helper.make_node("Quant", ["w", "one", "zero", "b4"], ["wq"], domain=QONNX, signed=1, narrow=0,
                         rounding_mode="ROUND"),
        helper.make_node("Conv", ["c", "wq"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    out = [1, 3, 8 if axis == 2 else 4, 8 if axis == 3 else 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                              [c("one", 1.0), c("zero", 0.0), c("b_first", first_bits), c("b_second", second_bits),
                               c("b4", 4.0), c("w", weights)])
    onnx.save(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX, 1)]),
              path)


def test_a_standard_concat_typed_as_its_narrower_input_is_refused_by_name(tmp_path):
    source, out = tmp_path / "joined.onnx", tmp_path / "hw.onnx"
    _joined(source, axis=2)
    code, stdout, stderr = run_cli("lower", source, out)
    assert code == 1 and not out.exists(), stdout + stderr
    assert "Concat node 'Concat_0', typed UINT2" in stderr and "(UINT6)" in stderr and "MVAU_0" in stderr, stderr


@pytest.mark.parametrize("first_bits, second_bits", [(2, 6), (6, 2)])
def test_a_join_finn_streams_lowers_with_the_mvau_holding_its_executed_range(first_bits, second_bits, tmp_path):
    from tests.fuzz.real_files import executed_range

    source, out = tmp_path / "joined.onnx", tmp_path / "hw.onnx"
    _joined(source, axis=3, first_bits=first_bits, second_bits=second_bits)
    code, stdout, stderr = run_cli("lower", source, out, "--samples", "2")
    assert code == 0, stdout + stderr
    lowered = ModelWrapper(str(out))
    assert [n.op_type for n in lowered.graph.node].count("StreamingConcat") == 1
    mvau = next(n for n in lowered.graph.node if n.op_type == "MVAU")
    assert getCustomOp(mvau).get_nodeattr("inputDataType") == "UINT6"
    acc = DataType[getCustomOp(mvau).get_nodeattr("accDataType")]
    executed = executed_range(lowered, mvau.name)
    assert acc.min() <= executed.lo and executed.hi <= acc.max(), (acc, executed.lo, executed.hi)


def test_the_harness_catches_an_mvau_typed_narrower_than_what_reaches_it(tmp_path):
    """The fuzzer's and the corpus' check of a lowered graph (tests.fuzz.real_files.mac_inputs_outside_their_types):
    the MVAU of the streamed join typed UINT2, as FINN typed it behind a standard Concat, is named; as lowered, not."""
    from tests.fuzz.real_files import mac_inputs_outside_their_types

    source, out = tmp_path / "joined.onnx", tmp_path / "hw.onnx"
    _joined(source, axis=3)
    assert run_cli("lower", source, out, "--samples", "1")[0] == 0
    lowered = ModelWrapper(str(out))
    assert mac_inputs_outside_their_types(lowered) == []
    mvau = next(n for n in lowered.graph.node if n.op_type == "MVAU")
    getCustomOp(mvau).set_nodeattr("inputDataType", "UINT2")
    problems = mac_inputs_outside_their_types(lowered)
    assert len(problems) == 1 and problems[0].startswith(f"{mvau.name}: input value") and "UINT2" in problems[0]


def test_lowers_own_execution_refuses_an_mvau_typed_narrower_than_what_reaches_it(tmp_path):
    """lower's self-check on its equivalence run (finn_execution.execute_batch(check_mac_inputs=True)): the same
    mistyped MVAU raises a LoweringError naming it; the graph as lowered passes."""
    from a2q_passes.finn_execution import execute_batch
    from a2q_passes.finn_flow import LoweringError

    source, out = tmp_path / "joined.onnx", tmp_path / "hw.onnx"
    _joined(source, axis=3)
    assert run_cli("lower", source, out, "--samples", "1")[0] == 0
    lowered = ModelWrapper(str(out))
    inputs = np.random.default_rng(0).uniform(0, 64, size=(4, 2, 4, 4)).astype(np.float32)  # both branches' ranges
    execute_batch(lowered, inputs, check_mac_inputs=True)
    mvau = next(n for n in lowered.graph.node if n.op_type == "MVAU")
    getCustomOp(mvau).set_nodeattr("inputDataType", "UINT2")
    with pytest.raises(LoweringError, match=f"{mvau.name} \\(MVAU\\) receives .* outside its inputDataType UINT2"):
        execute_batch(lowered, inputs, check_mac_inputs=True)


def test_the_finn_build_step_refuses_the_mistyped_layer_by_name(tmp_path):
    """step_a2q_set_accumulators on FINN's graph of the height-wise join (lower's flow, as FINN's steps make it): the
    MVAU behind the Concat typed UINT2 is named, with the Concat, instead of getting a 2-bit-input accumulator."""
    from types import SimpleNamespace

    from a2q_passes.errors import A2QError
    from a2q_passes.finn_flow import lower_to_finn_hw
    from a2q_passes.finn_steps import step_a2q_set_accumulators

    source = tmp_path / "joined.onnx"
    _joined(source, axis=2)
    hw, _ = lower_to_finn_hw(ModelWrapper(str(source)))
    with pytest.raises(A2QError, match="MVAU_0: unsupported: inputDataType UINT2 comes from Concat node"):
        step_a2q_set_accumulators(hw, SimpleNamespace(a2q_acc_bits=20))


def test_equivalence_inputs_cover_every_quantizer_of_a_shared_input(tmp_path):
    """lower's samples for an input two quantizers read (2 and 6 bits, scale 1): over the wider one's range too, so
    its check of the MVAU's input type sees the 6-bit codes (before, only the first quantizer's 0..3)."""
    from a2q_passes.finn_execution import equivalence_inputs

    source = tmp_path / "joined.onnx"
    _joined(source, axis=3)
    inputs = equivalence_inputs(ModelWrapper(str(source)), samples=8)
    assert inputs.min() >= 0 and inputs.max() > 40 and inputs.max() <= 63
