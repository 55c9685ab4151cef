"""``a2q lower``'s equivalence check on the inputs a model really gets: annotated integer inputs, float64
scales, data on the input quantizer's grid (issue 10 item 8 and the digits ``--data`` bug).

Expected values come from executing the QONNX model and the lowered graph with qonnx, and from the
float32 arithmetic of the input quantizer (``int_quant``), never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.intquant import int_quant
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.model_io import load_model
from a2q_passes.finn_execution import check_equivalence, equivalence_inputs
from a2q_passes.transforms.lower import LowerToFINN
from tests.test_lower import MODELS, run_cli

torch.set_num_threads(1)
QONNX_DOMAIN = "qonnx.custom_op.general"


def _quant(inp: str, out: str, scale: str, bits: str, signed: int, narrow: int) -> helper.NodeProto:
    return helper.make_node("Quant", [inp, scale, "zero", bits], [out], domain=QONNX_DOMAIN, name=f"Quant_{out}",
                            signed=signed, narrow=narrow, rounding_mode="ROUND")


def save_graph(path: Path, nodes: list, inits: list, x_shape: list[int], y_shape: list[int],
               input_dtype: str | None = None) -> Path:
    """``nodes`` over ``inits`` as a QONNX model ``x -> y``, ``x`` annotated ``input_dtype``, saved to ``path``."""
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX_DOMAIN, 1)]))
    if input_dtype is not None:
        model.set_tensor_datatype("x", DataType[input_dtype])
    model.save(str(path))
    return path


def _printed_json(output: str) -> dict:
    """The JSON object a command printed with --json (notes around it on the same stream)."""
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


def tiny_model(path: Path, input_dtype: str | None = None, input_scale: float | None = None,
               scale_dtype: type = np.float32) -> Path:
    """x (1, 8) -> [Quant 8 bit unsigned at ``input_scale``] -> MatMul (INT4 weights) -> Mul 0.5 -> y.

    ``input_dtype`` annotates x instead of quantizing it; ``scale_dtype`` is the type of the input
    scale and of the output Mul's constant (QKeras exports write float64 there).
    """
    weights = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array(0.25, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(4.0, np.float32), "w_bits"),
             numpy_helper.from_array(np.array(0.5, scale_dtype), "out_scale")]
    nodes = [_quant("W", "Wq", "w_scale", "w_bits", 1, 1)]
    first = "x"
    if input_scale is not None:
        inits += [numpy_helper.from_array(np.array(input_scale, scale_dtype), "x_scale"),
                  numpy_helper.from_array(np.array(8.0, np.float32), "x_bits")]
        nodes.append(_quant("x", "xq", "x_scale", "x_bits", 0, 0))
        first = "xq"
    nodes += [helper.make_node("MatMul", [first, "Wq"], ["m"], name="MatMul_0"),
              helper.make_node("Mul", ["m", "out_scale"], ["y"], name="Mul_out")]
    return save_graph(path, nodes, inits, [1, 8], [1, 4], input_dtype)


@pytest.mark.parametrize("dtype", ["BIPOLAR", "INT4", "UINT3"])
def test_annotated_integer_input_is_checked_on_its_allowed_values(tmp_path, dtype):
    """Before: uniform reals in [min, max] -> qonnx "Rounding error is too high", an internal error (exit 4)."""
    model = load_model(tiny_model(tmp_path / "m.onnx", input_dtype=dtype))
    inputs = equivalence_inputs(model, samples=16, seed=3)
    allowed = DataType[dtype].allowed
    assert all(allowed(v) for v in inputs.ravel())
    assert len(np.unique(inputs)) > 1  # not a degenerate draw
    hw = model.transform(LowerToFINN(), cleanup=False)
    assert check_equivalence(model, hw, inputs)["within_tolerance"]


def test_inputs_off_the_annotated_datatype_are_a_clear_error(tmp_path):
    path = tiny_model(tmp_path / "m.onnx", input_dtype="INT4")
    np.savez(tmp_path / "d.npz", x=np.full((2, 8), 0.3, np.float32))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--data", tmp_path / "d.npz")
    assert code == 1, output
    assert "executing the QONNX model failed" in output and "INT4" in output and "--data" in output
    assert not (tmp_path / "out.onnx").exists()


def test_an_inner_tensor_finn_misannotates_is_named_not_blamed_on_the_data(tmp_path):
    """An integer MatMul clipped to [0, 0.5] in float, then reshaped, before an activation quantizer (a random model
    the fuzzer drew, with a Reshape so that the Clip does not fold into FINN's thresholds): FINN's datatype inference
    keeps the MVAU's integer type through the Clip, so its graph fails qonnx's datatype check on the clipped values.
    `lower` exits 1, writes nothing, and names FINN's annotation of that Clip's output, not the inputs (the hint
    used to ask for --data on the graph input's datatype)."""
    weights = np.random.default_rng(0).integers(-8, 8, size=(8, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(0.5, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(4.0, np.float32), "a_bits"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="MatMul_0"),
             helper.make_node("Clip", ["m", "zero", "half"], ["c"], name="Clip_half"),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="Reshape_0"),
             _quant("r", "y", "a_scale", "a_bits", 0, 0)]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 8], [1, 4], input_dtype="INT4")
    model = ModelWrapper(str(path))
    model.set_tensor_datatype("W", DataType["INT4"])
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "16")
    message = " ".join(output.split())
    assert code == 1 and "(Clip), as an integer datatype its values do not have" in message, output
    assert "graph input" not in message and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("rounding, scale", [("ROUND", 0.3), ("HALF_UP", 0.5)])
@pytest.mark.parametrize("form", ["relu_then_quant", "quant_then_relu"])
def test_a_signed_two_bit_activation_next_to_a_relu_lowers_computing_the_same(form, rounding, scale, tmp_path):
    """x -> Quant -> MatMul -> Relu -> Quant (2 signed bits: codes 0 and 1 behind the Relu) -> MatMul, or the Quant
    before the Relu (Brevitas' graph-mode PTQ writes both at 2 bits): FINN's conversion needs an unsigned Quant
    there, and the unsigned 1-bit one of the old rewrite FINN lowers as bipolar, so `lower` refused the model. It is
    now the unsigned 2-bit Quant of Clip(x, 0, s), whose Clip folds into FINN's thresholds: the lowered graph
    computes the model's outputs (on exact ties too where the quantizer rounds them up, as FINN does: one finite
    threshold shows no step from which a tie could be told exact), its MVAU reads UINT2 (as analyze's FINN view
    says) and holds its worst case. With one scale per channel (no Clip can cap them) it stays refused by name."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.integers(-7, 8, size=(8, 6)) * 0.25).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.integers(-7, 8, size=(6, 4)) * 0.25).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(0.5, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array(0.25, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(4.0, np.float32), "b4"),
             numpy_helper.from_array(np.array(2.0, np.float32), "b2")]
    two_bit = _quant("r" if form == "relu_then_quant" else "m", "aq", "scale", "b2", 1, 0)
    next(a for a in two_bit.attribute if a.name == "rounding_mode").s = rounding.encode()
    middle = [helper.make_node("Relu", ["m"], ["r"], name="Relu_0"), two_bit] if form == "relu_then_quant" else \
        [two_bit, helper.make_node("Relu", ["aq"], ["r"], name="Relu_0")]
    nodes = [_quant("x", "xq", "x_scale", "b4", 1, 0), _quant("W1", "w1q", "w_scale", "b4", 1, 0),
             helper.make_node("MatMul", ["xq", "w1q"], ["m"], name="MatMul_0"), *middle,
             _quant("W2", "w2q", "w_scale", "b4", 1, 0),
             helper.make_node("MatMul", ["aq" if form == "relu_then_quant" else "r", "w2q"], ["y"], name="MatMul_1")]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 8], [1, 4])
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "16")
    assert code == 0 and "equivalent" in output, output
    model, hw = load_model(path).transform(InferShapes()), ModelWrapper(str(tmp_path / "out.onnx"))
    # codes of the input quantizer: MatMul_0's outputs are multiples of 0.5 * 0.25, at scale 0.5 ties of the 2-bit one
    inputs = (rng.integers(-16, 17, size=(256, 8)) * 0.5).astype(np.float32)
    assert check_equivalence(model, hw, inputs)["max_abs_diff"] < 1e-5  # float rounding of the folded scales only
    second = [n for n in hw.graph.node if n.op_type.startswith("MVAU")][-1]  # MatMul_1's
    assert getCustomOp(second).get_nodeattr("inputDataType") == "UINT2"
    (layer,) = [entry for entry in json.loads(run_cli("analyze", path, "--input-ranges", "finn", "--json")[1])["layers"]
                if entry["node"] == "MatMul_1"]
    assert layer["input_dtype"] == "UINT2" and layer["input_range"] == [0, 3]
    # one scale per channel: not made unsigned; `lower` names what FINN cannot take and exits non-zero
    model = ModelWrapper(str(path))
    model.set_initializer("channel_scales", np.full((1, 6), 0.5, np.float32))
    next(n for n in model.graph.node if n.name == "Quant_aq").input[1] = "channel_scales"
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out2.onnx", "--acc-bits", "16")
    assert code != 0 and ("Quant_aq" in output or "not lowered" in output), output


def test_exact_ties_behind_a_relu6_folded_into_thresholds_round_as_the_quantizer(tmp_path):
    """x -> Quant -> MatMul -> Clip(0, 2) (a ReLU6 below the 4-bit quantizer's top code) -> Quant (ROUND: ties to even)
    -> MatMul, on power-of-two scales: the Clip folds into FINN's thresholds as +inf, which made the rows no
    progression, so the exact ties on the integer accumulator were left rounding up as FINN does (outputs 0.875
    off on the codes' ties); the finite thresholds are now checked and the ties round as the quantizer does."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.integers(-7, 8, size=(8, 6)) * 0.25).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.integers(-7, 8, size=(6, 4)) * 0.25).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
             numpy_helper.from_array(np.array(0.25, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(4.0, np.float32), "b4")]
    nodes = [_quant("x", "xq", "scale", "b4", 1, 0), _quant("W1", "w1q", "w_scale", "b4", 1, 0),
             helper.make_node("MatMul", ["xq", "w1q"], ["m"], name="MatMul_0"),
             helper.make_node("Clip", ["m", "zero", "two"], ["r"], name="Relu6"), _quant("r", "aq", "scale", "b4", 0, 0),
             _quant("W2", "w2q", "w_scale", "b4", 1, 0), helper.make_node("MatMul", ["aq", "w2q"], ["y"], name="MatMul_1")]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 8], [1, 4])
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "16")
    assert code == 0, output
    inputs = (rng.integers(-16, 17, size=(256, 8)) * 0.5).astype(np.float32)
    model, hw = load_model(path).transform(InferShapes()), ModelWrapper(str(tmp_path / "out.onnx"))
    assert check_equivalence(model, hw, inputs)["max_abs_diff"] == 0.0


def test_a_one_bit_unsigned_activation_is_refused_by_name(tmp_path, monkeypatch):
    """x -> Quant (1 unsigned bit: codes 0 and 1) -> MatMul: FINN lowers the Quant as bipolar (-1/+1), so `lower`
    refuses it by name and writes nothing; with the refusal switched off, FINN's graph differs from the model."""
    import a2q_passes.finn_refusals as refusals

    inits = [numpy_helper.from_array(np.random.default_rng(0).integers(-8, 8, size=(8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "x_bits")]
    nodes = [_quant("x", "xq", "x_scale", "x_bits", 0, 0), helper.make_node("MatMul", ["xq", "W"], ["y"], name="MatMul_0")]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 8], [1, 4])
    model = ModelWrapper(str(path))
    model.set_tensor_datatype("W", DataType["INT4"])
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "16")
    assert code == 1 and "'Quant_xq' (1 unsigned bit" in " ".join(output.split()), output
    assert not (tmp_path / "out.onnx").exists()
    monkeypatch.setattr(refusals, "refuse_unsigned_one_bit_activations", lambda model: None)
    model = load_model(path)
    inputs = np.random.default_rng(1).uniform(-1, 2, size=(8, 8)).astype(np.float32)
    hw = model.transform(LowerToFINN(acc_bits=16), cleanup=False)
    assert not check_equivalence(model, hw, inputs)["within_tolerance"]


def test_a_bipolar_depthwise_conv_on_bipolar_inputs_is_refused_by_name(tmp_path, monkeypatch):
    """BipolarQuant -> depthwise Conv with BipolarQuant weights: qonnx lowers the Conv to a MatMul with zeros between
    the channels and FINN's XNOR-popcount conversion makes those zeros 0.5, so `lower` names the layer and writes
    nothing; with the refusal off, the lowering fails on FINN's own graph instead."""
    import a2q_passes.finn_refusals as refusals

    inits = [numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 1, 2, 2)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("BipolarQuant", ["x", "one"], ["xq"], domain=QONNX_DOMAIN, name="BipolarX"),
             helper.make_node("BipolarQuant", ["W", "one"], ["Wq"], domain=QONNX_DOMAIN, name="BipolarW"),
             helper.make_node("Conv", ["xq", "Wq"], ["y"], name="DepthwiseConv", group=2, kernel_shape=[2, 2])]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 2, 3, 3], [1, 2, 2, 2])
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "8")
    assert code == 1 and "depthwise Conv 'DepthwiseConv' multiplies bipolar weights" in " ".join(output.split())
    assert not (tmp_path / "out.onnx").exists()
    monkeypatch.setattr(refusals, "_bipolar", lambda model, tensor: False)
    with pytest.raises(Exception, match="BINARY but holds non-integers"):
        load_model(path).transform(LowerToFINN(acc_bits=8), cleanup=False)


def test_a_bipolar_activation_finn_cannot_fold_is_named_when_finn_fails(tmp_path):
    """BipolarQuant -> Conv with zero padding (2-bit weights): FINN's HW conversion fails on its own node
    ("MultiThreshold_0: MultiThreshold out_scale must be 1"); `lower` adds which quantizer and which reader are the
    likely cause, by their names in the model."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.integers(-2, 2, size=(3, 2, 3, 3)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2.0, np.float32), "w_bits")]
    nodes = [helper.make_node("BipolarQuant", ["x", "one"], ["xq"], domain=QONNX_DOMAIN, name="BipolarX"),
             _quant("W", "Wq", "w_scale", "w_bits", 1, 0),
             helper.make_node("Conv", ["xq", "Wq"], ["y"], name="PaddedConv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 2, 4, 4], [1, 3, 4, 4])
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--acc-bits", "12")
    message = " ".join(output.split())
    assert code == 1 and "out_scale" in message, output
    assert "the bipolar activation 'BipolarX' is read by Conv 'PaddedConv' with zero padding" in message, output
    assert not (tmp_path / "out.onnx").exists()


def test_float64_scales_are_cast_and_said_so(tmp_path):
    """Before: onnxruntime "Mul bound to different types (float and double)", an internal error (exit 4)."""
    path = tiny_model(tmp_path / "m.onnx", input_scale=0.1, scale_dtype=np.float64)
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--samples", "4")
    assert code == 0, output
    assert "2 float64 initializer(s) stored as float32" in output and "x_scale" in output and "out_scale" in output
    lowered = load_model(tmp_path / "out.onnx")
    assert all(t.data_type != TensorProto.DOUBLE for t in lowered.graph.initializer)


def test_an_unused_initializer_listed_as_graph_input_stays_a_constant(tmp_path):
    """Before: qonnx's cleanup (in the equivalence check and in FINN's conversion) dropped the unused initializer
    before its graph input entry, which became a second, dynamic input: "expected a single-input model", an
    internal error (exit 4)."""
    path = tiny_model(tmp_path / "m.onnx", input_scale=0.1)
    model = ModelWrapper(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [3]))
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--samples", "4")
    assert code == 0, output
    assert "equivalent" in output and "NOT equivalent" not in output
    assert [i.name for i in load_model(tmp_path / "out.onnx").graph.input] == ["global_in"]


def test_a_dynamic_batch_is_lowered_with_batch_one(tmp_path):
    """Before: shape inference gave the batch as 0 and the equivalence check could not feed the FINN graph
    ("cannot match shape (1, 8) to the graph's (0, 8)"), an internal error (exit 4)."""
    path = tiny_model(tmp_path / "m.onnx", input_scale=0.1)
    model = ModelWrapper(str(path))
    for info in (model.graph.input[0], model.graph.output[0]):
        info.type.tensor_type.shape.dim[0].dim_param = "batch"
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--samples", "4")
    assert code == 0, output
    assert "'x' is dynamic; lowered with batch 1" in output and "NOT equivalent" not in output


def test_an_initializer_described_as_another_shape_is_taken_as_it_is(tmp_path):
    """A scale stored as shape (1,) but described as a scalar (the checker and onnxruntime accept it). Before: ONNX
    shape inference in lower stopped at the contradiction, an internal error (exit 4)."""
    path = tiny_model(tmp_path / "m.onnx", input_scale=0.1)
    model = ModelWrapper(str(path))
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).reshape(1), "w_scale"))
    described = [v for v in model.graph.value_info if v.name != "w_scale"]
    del model.graph.value_info[:]
    model.graph.value_info.extend([*described, helper.make_tensor_value_info("w_scale", TensorProto.FLOAT, [])])
    model.save(str(path))
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--samples", "4")
    assert code == 0, output
    assert "equivalent" in output and "NOT equivalent" not in output


def test_a_negative_input_scale_draws_inputs_from_its_real_range(tmp_path):
    """Quant with scale -0.1 on 8-bit unsigned codes: reals in [-25.5, 0]. Before: numpy's "high - low < 0" leaked as
    a traceback (found by the fuzzer's lower property)."""
    model = load_model(tiny_model(tmp_path / "m.onnx", input_scale=-0.1))
    inputs = equivalence_inputs(model, samples=16, seed=1)
    assert inputs.min() >= np.float32(-25.5) and inputs.max() <= 0 and inputs.min() < -1
    code, output = run_cli("lower", tmp_path / "m.onnx", tmp_path / "out.onnx", "--samples", "4")
    assert code in (0, 3), output


def test_all_zero_weights_lower_where_finns_own_sizing_fails(tmp_path):
    """The fuzzer's case: a 1-bit unsigned narrow weight quantizer (its only code is 0) in a MatMul whose output is the
    graph's. FINN's MinimizeAccumulatorWidth asks for a 0-bit output type and stops ("Factor and x are <= 0"); before,
    that leaked from the "FINN picks" column as a traceback. a2q's own accDataType holds the exact range [0, 0]."""
    inits = [numpy_helper.from_array(np.array([[0.4]], np.float32), "w"),
             numpy_helper.from_array(np.array([[1.0]], np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(1.0, np.float32), "bits")]
    nodes = [helper.make_node("Quant", ["w", "w_scale", "zero", "bits"], ["wq"], domain=QONNX_DOMAIN, name="Quant_w",
                              signed=0, narrow=1, rounding_mode="CEIL"),
             helper.make_node("MatMul", ["x", "wq"], ["y"], name="MatMul_0")]
    path = save_graph(tmp_path / "m.onnx", nodes, inits, [1, 1], [1, 1], "INT2")
    code, output = run_cli("lower", path, tmp_path / "out.onnx", "--samples", "4", "--json")
    assert code == 0, output
    layer = _printed_json(output)["layers"][0]
    assert (layer["acc_min"], layer["acc_max"]) == (0, 0) and layer["finn_acc_dtype"].startswith("fails"), layer


def test_an_affine_finn_moves_behind_the_layer_is_refused_with_the_widths_it_needs(tmp_path):
    """A BIPOLAR input mapped to {0, 1} by (x + 1) / 2 before the first layer (the QONNX zoo's UNSW-NB15 MLP does this):
    a2q reads codes [0, 1], but FINN's streamlining moves the Add/Div behind the MAC and its MVAU multiplies BIPOLAR
    codes. A model sized with --input-ranges finn at the [0, 1] width is refused with the width FINN needs (before:
    the advice was to re-run with --input-ranges finn, which it already was); given that width, it lowers."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(2.0), "two"),
             numpy_helper.from_array((rng.integers(-2, 2, size=(16, 4)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.float32(0.5), "w_scale"), numpy_helper.from_array(np.float32(0.0), "zero"),
             numpy_helper.from_array(np.float32(2.0), "w_bits")]
    nodes = [helper.make_node("Add", ["x", "one"], ["shifted"], name="Add_in"),
             helper.make_node("Div", ["shifted", "two"], ["halved"], name="Div_in"),
             _quant("W", "Wq", "w_scale", "w_bits", 1, 0),
             helper.make_node("MatMul", ["halved", "Wq"], ["y"], name="MatMul_0")]
    save_graph(tmp_path / "m.onnx", nodes, inits, [1, 16], [1, 4], "BIPOLAR")
    code, output = run_cli("analyze", tmp_path / "m.onnx", "--input-ranges", "finn", "--json")
    layer = _printed_json(output)["layers"][0]
    assert layer["input_range"] == [0, 1]
    narrow = layer["bounds"]["exact"]
    assert run_cli("project", tmp_path / "m.onnx", tmp_path / "p.onnx", "--layer", f"MatMul_0={narrow}",
                   "--input-ranges", "finn")[0] == 0
    code, output = run_cli("lower", tmp_path / "p.onnx", tmp_path / "hw.onnx", "--from-annotations")
    assert code == 1 and "streamlining moved" in output, output
    needed = int(output.split("--layer MatMul_0=")[1].split("`")[0])
    assert needed > narrow
    assert run_cli("project", tmp_path / "m.onnx", tmp_path / "p2.onnx", "--layer", f"MatMul_0={needed}",
                   "--input-ranges", "finn")[0] == 0
    code, output = run_cli("lower", tmp_path / "p2.onnx", tmp_path / "hw2.onnx", "--from-annotations", "--samples", "4")
    assert code == 0 and "NOT equivalent" not in output, output


def test_input_thresholds_sit_on_the_quantizers_float32_boundaries(tmp_path):
    """s = float32(1/255), x = 0.5: x / s = 127.49999 in float32, so Quant gives code 127. FINN's threshold
    127.5 * s = 0.50000003 rounds to float32 0.5, and x >= 0.5 gave code 128 (the digits --data bug)."""
    scale = np.float32(1 / 255)
    model = load_model(tiny_model(tmp_path / "m.onnx", input_scale=float(scale)))
    half = np.array([0.5], np.float32)
    assert int_quant(half, scale, np.float32(0), np.float32(8), 0, 0, "ROUND")[0] == np.float32(127) * scale
    hw = model.transform(LowerToFINN(), cleanup=False)
    thresholds = hw.get_initializer(hw.graph.node[0].input[1]).ravel()
    reference = int_quant(np.float32(thresholds), scale, np.float32(0), np.float32(8), 0, 0, "ROUND") / scale
    below = int_quant(np.nextafter(np.float32(thresholds), np.float32(-1)), scale, np.float32(0), np.float32(8), 0, 0,
                      "ROUND") / scale
    np.testing.assert_allclose(reference, np.arange(1, 256), atol=1e-3)  # threshold j reaches code j + 1 ...
    np.testing.assert_allclose(below, np.arange(0, 255), atol=1e-3)  # ... and the float32 just below does not
    grid = np.float32(np.arange(16)[:, None] / 16 + np.zeros(8, np.float32))  # k/16, as the digits pixels
    result = check_equivalence(model, hw, grid)
    assert result["max_abs_diff"] <= result["tolerance"], result


def test_digits_cnn_with_its_own_pixels(tmp_path):
    """models/digits_cnn_w4a4.onnx on raw digits test images (pixels k/16, 0.5 among them): was NOT
    equivalent (max |diff| about 1), since the first thresholds put 0.5 on code 128 instead of 127."""
    from models.data import load_dataset

    images, _ = load_dataset("digits", "test")
    images = images[:12].astype(np.float32)
    assert np.any(images == 0.5)
    model = load_model(MODELS / "digits_cnn_w4a4.onnx")
    hw = model.transform(LowerToFINN(), cleanup=False)
    result = check_equivalence(model, hw, images)
    assert result["within_tolerance"] and result["top1_agreement"] == 1.0, result


def two_input_model(path: Path) -> Path:
    """Two graph inputs, each through its own 8-bit Quant into its own MatMul (INT4 weights, different in each) and
    Mul: ``x1 -> y1``, ``x2 -> y2``."""
    rng = np.random.default_rng(0)
    inits, nodes = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")], []
    for i in (1, 2):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(np.array(0.25, np.float32), f"w_scale{i}"),
                  numpy_helper.from_array(np.array(4.0, np.float32), f"w_bits{i}"),
                  numpy_helper.from_array(np.array(0.1 * i, np.float32), f"x_scale{i}"),
                  numpy_helper.from_array(np.array(8.0, np.float32), f"x_bits{i}"),
                  numpy_helper.from_array(np.array(0.5, np.float32), f"out_scale{i}")]
        nodes += [_quant(f"W{i}", f"Wq{i}", f"w_scale{i}", f"w_bits{i}", 1, 1),
                  _quant(f"x{i}", f"xq{i}", f"x_scale{i}", f"x_bits{i}", 0, 0),
                  helper.make_node("MatMul", [f"xq{i}", f"Wq{i}"], [f"m{i}"], name=f"MatMul_{i}"),
                  helper.make_node("Mul", [f"m{i}", f"out_scale{i}"], [f"y{i}"], name=f"Mul_out{i}")]
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 8]) for i in (1, 2)],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 4]) for i in (1, 2)], inits)
    ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                        helper.make_opsetid(QONNX_DOMAIN, 1)])).save(str(path))
    return path


def test_a_model_with_two_inputs_is_lowered_and_checked_on_both(tmp_path):
    """Each data input gets its own inputs on its own grid (and --data one array per input), fed to the FINN graph
    by position (different weights and scales behind each input: a swap would not be equivalent). Before: refused ("the equivalence check needs a single-input model ...; pass --data"), and --data with two
    arrays was refused too."""
    path = two_input_model(tmp_path / "two.onnx")
    model = load_model(path)
    x1, x2 = equivalence_inputs(model, samples=6, seed=2)
    assert x1.shape == x2.shape == (6, 8) and x1.max() <= 25.5 + 1e-5 and x2.max() > 25.5  # each on its own scale
    code, output = run_cli("lower", path, tmp_path / "hw.onnx", "--samples", "6")
    assert code == 0 and "equivalent" in output and "NOT equivalent" not in output, output
    hw = load_model(tmp_path / "hw.onnx")
    assert [n.op_type for n in hw.graph.node if n.op_type.startswith("MVAU")] == ["MVAU", "MVAU"]
    hw_inputs, shaped = [i.name for i in hw.graph.input], model.transform(InferShapes())
    for sample in range(len(x1)):  # qonnx's executor on both, by position: y1 comes from x1 alone, y2 from x2
        want = execute_onnx(shaped, {"x1": x1[sample:sample + 1], "x2": x2[sample:sample + 1]})
        got = execute_onnx(hw, {hw_inputs[0]: x1[sample:sample + 1], hw_inputs[1]: x2[sample:sample + 1]})
        for mine, theirs in zip(("y1", "y2"), (o.name for o in hw.graph.output)):
            assert np.allclose(got[theirs], want[mine], atol=1e-4), (mine, got[theirs], want[mine])
    np.savez(tmp_path / "data.npz", x1=x1, x2=x2)
    code, output = run_cli("lower", path, tmp_path / "hw2.onnx", "--data", tmp_path / "data.npz")
    assert code == 0 and "equivalent" in output and "NOT equivalent" not in output, output
