"""The lowering's exact rewrites of quantizer forms FINN's conversion refuses (:mod:`a2q_passes.finn_quant_forms`).

Each rewrite is checked by executing the graph before and after with qonnx on adversarial inputs (rounding ties,
values past the clamp, negative values in front of the ReLU), and end to end on files Brevitas' graph-mode PTQ
writes, which ``a2q lower`` could not lower before (FINN: "FINN only supports unsigned and non-narrow Quant nodes
for Relu activations"; qonnx's ``ExtractBiasFromConv``: "cannot reshape array of size 1 into shape (1,8,1,1)").
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.extract_conv_bias import ExtractBiasFromConv
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.finn_quant_forms import (FoldBiasQuantizers, GemmFactorsAsFloat32, ReluAfterQuantIntoQuant,
                                         UnsignedQuantAfterRelu)
from a2q_passes.graph_values import node_attr
from tests.brevitas_graph_ptq import GraphPtqSpec, export_graph_ptq
from tests.cli_helpers import run_a2q
from tests.fuzz.real_files import MVAU_OPS, VVAU_OPS, executed_range

QONNX = "qonnx.custom_op.general"
ROUNDING = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")


def _relu_quant(scale: np.ndarray, zero: float, bits: float, signed: int, narrow: int, mode: str,
                producer: str = "Relu") -> ModelWrapper:
    nodes = [helper.make_node(producer, ["x"], ["r"]),
             helper.make_node("Quant", ["r", "s", "z", "b"], ["y"], domain=QONNX, signed=signed, narrow=narrow,
                              rounding_mode=mode)]
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(np.asarray(zero, np.float32), "z"),
             numpy_helper.from_array(np.asarray(bits, np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid(QONNX, 1)]))


def _adversarial_inputs(scale: np.ndarray, bits: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Exact ties k + 1/2 steps around every code, values far past the clamp, zeros and negative values."""
    step = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, 1), (4, 64))
    top = 2.0 ** (bits - 1)
    ties = (np.arange(64) % (int(top) + 3) - 1.5 + 0.5 * (np.arange(64) % 2)).astype(np.float32)
    return [(ties * step)[None].astype(np.float32),
            (rng.uniform(-2 * top, 2 * top, size=(4, 64)) * step)[None].astype(np.float32),
            np.where(rng.random((1, 4, 64)) < 0.5, 0.0, 1e6).astype(np.float32)]


def _execute(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    return execute_onnx(model.transform(InferShapes()), {"x": x})["y"]


def _outputs(model: ModelWrapper, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return [_execute(model, x) for x in inputs]


@pytest.mark.parametrize("mode,narrow,bits", [(m, n, b) for m, n, b in itertools.product(ROUNDING, (0, 1), (2, 3, 4, 8))])
def test_signed_quant_after_relu_becomes_unsigned_with_the_same_outputs(mode, narrow, bits):
    """b signed bits become b - 1 unsigned ones; 2 (codes 0 and 1; FINN lowers 1 unsigned bit as bipolar) become 2
    unsigned bits of Clip(x, 0, s) in place of the Relu, which needs one scale. The same values on ties, past the
    clamp and below 0, in every rounding mode."""
    rng = np.random.default_rng(bits)
    scale = np.array([0.1, 0.25, 3.0, 1 / 7], np.float32).reshape(1, 4, 1) if bits > 2 else np.float32(1 / 7)
    model = _relu_quant(scale, 0.0, bits, 1, narrow, mode)
    inputs = _adversarial_inputs(scale, bits, rng)
    before = _outputs(model, inputs)
    rewritten, changed = UnsignedQuantAfterRelu().apply(ModelWrapper(model.model.SerializeToString()))
    quant = getCustomOp(rewritten.graph.node[1])
    assert changed and quant.get_nodeattr("signed") == 0 and quant.get_nodeattr("narrow") == 0
    assert float(rewritten.get_initializer(rewritten.graph.node[1].input[3])) == max(bits - 1, 2)
    assert rewritten.graph.node[0].op_type == ("Relu" if bits > 2 else "Clip")
    after = _outputs(rewritten, inputs)
    for b, a in zip(before, after):
        assert np.array_equal(b, a)
    assert any(np.any(b != 0) for b in before)  # the inputs reach non-zero codes


@pytest.mark.parametrize("case", ["negative scale", "zero point", "not after Relu", "one bit", "unsigned",
                                  "two bits, per channel"])
def test_other_quant_forms_are_left_alone(case):
    scale = np.float32(-0.5 if case == "negative scale" else 0.5)
    if case == "two bits, per channel":  # no Clip can cap each channel at its own scale
        scale = np.array([0.1, 0.25, 3.0, 1 / 7], np.float32).reshape(1, 4, 1)
    model = _relu_quant(scale, 1.0 if case == "zero point" else 0.0, {"one bit": 1, "two bits, per channel": 2}.get(case, 4),
                        0 if case == "unsigned" else 1, 0, "ROUND", "Sigmoid" if case == "not after Relu" else "Relu")
    before = model.model.SerializeToString()
    rewritten, changed = UnsignedQuantAfterRelu().apply(model)
    assert not changed and rewritten.model.SerializeToString() == before


def _quant_relu(scale: np.ndarray, zero: float, bits: float, signed: int, narrow: int, mode: str,
                reader: str = "Sigmoid") -> ModelWrapper:
    """x -> Quant -> q -> Relu -> r -> ``reader`` -> y (``reader`` "Quant": a 4-bit unsigned Quant of scale 0.5)."""
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["q"], domain=QONNX, signed=signed, narrow=narrow,
                              rounding_mode=mode),
             helper.make_node("Relu", ["q"], ["r"])]
    nodes.append(helper.make_node("Quant", ["r", "half", "zero", "four"], ["y"], domain=QONNX, signed=0, narrow=0,
                                  rounding_mode="ROUND") if reader == "Quant" else helper.make_node(reader, ["r"], ["y"]))
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for v, n in
             ((scale, "s"), (zero, "z"), (bits, "b"), (0.5, "half"), (0.0, "zero"), (4.0, "four"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid(QONNX, 1)]))


@pytest.mark.parametrize("mode,narrow,bits,signed", [
    (m, n, b, s) for m, n, b, s in itertools.product(("ROUND", "FLOOR", "CEIL", "HALF_UP"), (0, 1), (2, 4, 8), (0, 1))])
def test_a_relu_behind_a_quantizer_folds_into_it_with_the_same_outputs(mode, narrow, bits, signed):
    """Quant -> Relu (Brevitas' graph-mode PTQ in front of its global pooling): the Relu goes, a signed Quant becomes
    the unsigned non-narrow one of a bit less (a signed 2-bit one, with one scale, the unsigned 2-bit Quant of
    Clip(x, 0, s)), and qonnx executes the same values on ties, past the clamp and below 0."""
    rng = np.random.default_rng(bits + 10 * signed)
    two_bit_signed = bits == 2 and signed
    scale = np.float32(1 / 7) if two_bit_signed else np.array([0.1, 0.25, 3.0, 1 / 7], np.float32).reshape(1, 4, 1)
    model = _quant_relu(scale, 0.0, bits, signed, narrow, mode)
    inputs = _adversarial_inputs(scale, bits, rng)
    before = _outputs(model, inputs)
    rewritten, changed = ReluAfterQuantIntoQuant().apply(ModelWrapper(model.model.SerializeToString()))
    assert changed and [n.op_type for n in rewritten.graph.node] == ["Clip"] * two_bit_signed + ["Quant", "Sigmoid"]
    quant = getCustomOp(rewritten.graph.node[int(two_bit_signed)])
    assert quant.get_nodeattr("signed") == 0 and quant.get_nodeattr("narrow") == (0 if signed else narrow)
    assert float(rewritten.get_initializer(quant.onnx_node.input[3])) == (2 if two_bit_signed else bits - signed)
    after = _outputs(rewritten, inputs)
    for b, a in zip(before, after):
        assert np.array_equal(b, a)
    assert any(np.any(b > 0.5) for b in before)  # the inputs reach positive codes (Sigmoid(0) = 0.5)


@pytest.mark.parametrize("case", ["negative scale", "zero point", "read twice", "read by a Quant", "one bit"])
def test_relus_the_fold_does_not_take_are_left(case):
    """A negative scale or a zero point (the Relu then cuts inside the codes), a Quant also read by another node, a
    one-bit Quant (bipolar), and a Relu only Quant nodes read (FINN's own conversion takes that form) stay."""
    model = _quant_relu(np.float32(-0.5 if case == "negative scale" else 0.5), 1.0 if case == "zero point" else 0.0,
                        1 if case == "one bit" else 4, 1, 0, "ROUND", "Quant" if case == "read by a Quant" else "Sigmoid")
    if case == "read twice":
        model.graph.node.append(helper.make_node("Neg", ["q"], ["n"]))
        model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 4, 64]))
    before = model.model.SerializeToString()
    rewritten, changed = ReluAfterQuantIntoQuant().apply(model)
    assert not changed and rewritten.model.SerializeToString() == before


def _conv_with_quantized_bias(listed_as_input: bool) -> ModelWrapper:
    rng = np.random.default_rng(3)
    w = rng.integers(-7, 8, size=(8, 3, 3, 3)).astype(np.float32) * 0.05
    bias = rng.normal(size=8).astype(np.float32)
    bias_scale = (rng.uniform(0.5, 2.0, size=8) * 1e-3).astype(np.float32)  # per channel, zero point per tensor
    nodes = [helper.make_node("Quant", ["bias", "bias_scale", "zero", "bias_bits"], ["qbias"], domain=QONNX,
                              signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("Conv", ["x", "w", "qbias"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(bias_scale, "bias_scale"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.float32(32), "bias_bits")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    if listed_as_input:  # as older exporters (Brevitas' export_qonnx among them) list initializers
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [8]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX, 1)]))
    return model.transform(InferShapes())


@pytest.mark.parametrize("listed_as_input", [False, True])
def test_bias_quantizer_folds_to_its_value_and_qonnx_then_extracts_the_bias(listed_as_input):
    model = _conv_with_quantized_bias(listed_as_input)
    with pytest.raises(ValueError, match="cannot reshape"):  # why the pass exists (qonnx's ExtractBiasFromConv)
        ModelWrapper(model.model.SerializeToString()).transform(ExtractBiasFromConv())
    x = np.random.default_rng(4).normal(size=(1, 3, 6, 6)).astype(np.float32)
    before = _execute(model, x)
    folded, changed = FoldBiasQuantizers().apply(ModelWrapper(model.model.SerializeToString()))
    assert changed and [n.op_type for n in folded.graph.node] == ["Conv"]
    assert [i.name for i in folded.graph.input] == ["x"] and folded.get_initializer("bias") is None
    assert np.array_equal(_execute(folded, x), before)
    extracted = folded.transform(ExtractBiasFromConv())
    assert [n.op_type for n in extracted.graph.node] == ["Conv", "Add"]
    assert np.allclose(_execute(extracted, x), before, rtol=1e-6, atol=1e-6)


def test_a_quantizer_read_also_as_weights_is_not_folded():
    model = _conv_with_quantized_bias(False)
    model.graph.node.append(helper.make_node("Add", ["qbias", "qbias"], ["twice"]))
    model.graph.output.append(helper.make_tensor_value_info("twice", TensorProto.FLOAT, [8]))
    assert not FoldBiasQuantizers().apply(model)[1]


@pytest.mark.parametrize("spec", [GraphPtqSpec("mlp", "fx", 4, 4, (("bias_bit_width", 32),)),
                                  GraphPtqSpec("mlp", "layerwise", 8, 8)], ids=lambda s: s.name)
def test_lower_takes_brevitas_graph_ptq_mlps(tmp_path, spec):
    """The whole flow on the files Brevitas' graph PTQ writes: lowered, executed equal to the QONNX model, every
    MVAU reading the unsigned codes the ReLU gives."""
    path = export_graph_ptq(tmp_path, spec)
    signed_after_relu = [n for n in onnx.load(path).graph.node if n.op_type == "Quant" and any(
        a.name == "signed" and a.i == 1 for a in n.attribute) and any(
        p.op_type == "Relu" and p.output[0] == n.input[0] for p in onnx.load(path).graph.node)]
    assert signed_after_relu  # the form FINN refuses is in the file
    out = tmp_path / "hw.onnx"
    result = run_a2q("lower", str(path), str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    lowered = ModelWrapper(str(out))
    mvaus = [n for n in lowered.graph.node if n.op_type.startswith("MVAU")]
    assert len(mvaus) == 3
    assert [getCustomOp(n).get_nodeattr("inputDataType") for n in mvaus[1:]] == [f"UINT{spec.act_bits - 1}"] * 2
    equivalence = json.loads(result.stdout)["equivalence"]
    assert equivalence["within_tolerance"] and equivalence["samples"] > 0


def test_finn_ranges_size_graph_ptq_layers_for_the_unsigned_codes_lower_gives(tmp_path):
    """``--input-ranges finn`` reads a signed Quant after a ReLU as the ``UINT(b-1)`` FINN converts after the
    rewrite, so the hidden layers of a graph-PTQ MLP are sized one bit narrower than its signed type: projected to
    10 bits in that view, the model lowers with every MVAU at INT10 (FINN's own pick agrees), and the oracle's
    executed worst case of each MVAU of the FINN graph fits its accDataType."""
    from tests.fuzz.real_files import executed_range

    path = export_graph_ptq(tmp_path, GraphPtqSpec("mlp", "fx", 4, 4, (("bias_bit_width", 32),)))
    finn = json.loads(run_a2q("analyze", str(path), "--input-ranges", "finn", "--json").stdout)["layers"]
    exact = json.loads(run_a2q("analyze", str(path), "--json").stdout)["layers"]
    assert [layer["input_dtype"] for layer in finn[1:]] == ["UINT3", "UINT3"]
    assert [layer["bounds"]["exact"] for layer in finn] == [layer["bounds"]["exact"] for layer in exact]
    projected, lowered = tmp_path / "p10.onnx", tmp_path / "hw.onnx"
    result = run_a2q("project", str(path), str(projected), "--acc-bits", "10", "--input-ranges", "finn")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_a2q("lower", str(projected), str(lowered), "--from-annotations", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    layers = json.loads(result.stdout)["layers"]
    assert [(layer["acc_dtype"], layer["finn_acc_dtype"]) for layer in layers] == [("INT10", "INT10")] * 3
    model = ModelWrapper(str(lowered))
    for node in (n for n in model.graph.node if n.op_type.startswith("MVAU")):
        executed = executed_range(model, node.name, "fold")
        assert -(1 << 9) <= executed.lo and executed.hi < (1 << 9), (node.name, executed)


def test_conv_defaults_are_filled_in_and_lower_takes_quantize_graph_files(tmp_path):
    """qonnx's QuantizeGraph over a float net whose Conv leaves every attribute at its ONNX default: FINN's
    LowerConvsToMatMul failed ("'NoneType' object has no attribute 'ints'"). The defaults are written out (the same
    outputs), and the file lowers with every MVAU holding its executed worst case."""
    from a2q_passes.finn_quant_forms import WindowDefaultAttributes

    model = _quantize_graph_without_conv_defaults(tmp_path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert not {a.name for a in conv.attribute} & {"kernel_shape", "strides", "pads", "dilations", "group"}
    filled = ModelWrapper(model.model.SerializeToString()).transform(WindowDefaultAttributes())
    conv = next(n for n in filled.graph.node if n.op_type == "Conv")
    weights = filled.get_tensor_shape(conv.input[1])
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute} == {
        "kernel_shape": weights[2:], "strides": [1, 1], "dilations": [1, 1], "group": 1, "pads": [0, 0, 0, 0]}
    name, output = model.graph.input[0].name, model.graph.output[0].name
    x = np.random.default_rng(0).normal(0, 1, [1, *model.get_tensor_shape(name)[1:]]).astype(np.float32)
    assert np.array_equal(execute_onnx(model, {name: x})[output], execute_onnx(filled, {name: x})[output])
    _assert_lowers(model, tmp_path / "quantized.onnx")


def test_conv_defaults_are_filled_in_where_the_weight_shape_is_only_inferred(tmp_path):
    """The same file without its shape annotations (as a writer may leave it): the Conv's weights come out of a
    Quant node no annotation shapes, so the defaults were left out and FINN failed as above; the weight shape now
    comes from shape inference, and the file lowers."""
    model = _quantize_graph_without_conv_defaults(tmp_path)
    del model.graph.value_info[:]
    _assert_lowers(model, tmp_path / "unshaped.onnx")


@pytest.mark.parametrize("net,act,dedicated", [("conv_gemm_matmul", "QInt8", False), ("residual_depthwise", "QInt8", False),
                                               ("residual_depthwise", "QUInt8", False),
                                               ("residual_depthwise", "QInt8", True)])
def test_onnxruntime_qdq_with_symmetric_activations_lowers(net, act, dedicated, tmp_path):
    """onnxruntime's QDQ file with symmetric activations (int8 with zero point 0, or uint8 with zero point 128, which
    becomes int8 with zero point 0), per-channel int8 weights stored as integers behind DequantizeLinear (and an int32
    bias so stored), and a Conv that leaves its defaults out: every Q/DQ node becomes a QONNX Quant (the stored
    integers get their QuantizeLinear first), and `lower` gives MVAUs that hold their worst case, the lowered graph
    computing what the file computes. Before, `lower` refused the file naming its Q/DQ nodes or zero points (and
    earlier still, FINN's LowerConvsToMatMul failed: "'NoneType' object has no attribute 'ints'"). conv_gemm_matmul's
    Flatten had no FINN HW layer (exit 3) until the requantizer onnxruntime puts after it was dropped
    (:class:`~a2q_passes.finn_requantization.RedundantRequantization`). With ``DedicatedQDQPair`` the residual's fork
    is quantized twice, one QuantizeLinear per reader: `lower` failed with "lowered model fails onnx.checker: Graph
    must be in single static assignment (SSA) form" (qonnx's QCDQToQuant named both Quant nodes after their input)."""
    from tests.ort_models import FLOAT_NETS, quantize

    float_path, path, out = tmp_path / "float.onnx", tmp_path / "qdq.onnx", tmp_path / "hw.onnx"
    shape = FLOAT_NETS[net](float_path)
    quantize(float_path, path, shape, "QDQ", "QInt8", act=act, per_channel=True,
             extra_options={"ActivationSymmetric": True, "DedicatedQDQPair": dedicated})
    quantized = [n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert (len(quantized) > len(set(quantized))) == dedicated  # a tensor two QuantizeLinear nodes read
    result = run_a2q("lower", str(path), str(out), "--acc-bits", "24")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "equivalent" in result.stdout and "NOT equivalent" not in result.stdout, result.stdout[-2000:]
    lowered = ModelWrapper(str(out))
    nodes = [n for n in lowered.graph.node if n.op_type in MVAU_OPS + VVAU_OPS]
    assert len(nodes) == 3 and ("VVAU" in {n.op_type for n in nodes}) == (net == "residual_depthwise")
    for node in nodes:  # the worst case driven through the node in qonnx's executor, against its accDataType
        done, acc = executed_range(lowered, node.name, "fold"), DataType[getCustomOp(node).get_nodeattr("accDataType")]
        assert acc.min() <= done.lo and done.hi <= acc.max() and acc.bitwidth() <= 24, (node.name, done, acc.name)


def test_ties_explain_a_qdq_files_difference_from_finn(tmp_path):
    """onnxruntime's symmetric uint8 QDQ file with per-tensor weights: FINN's graph differs from the file on exact
    ties, which `lower` now says for Q/DQ files too (the ties are checked on the file as FINN's preparation makes
    it, Q/DQ chains as Quant nodes); before, it said only that the outputs differ."""
    from tests.ort_models import residual_depthwise, quantize

    float_path, path, out = tmp_path / "float.onnx", tmp_path / "qdq.onnx", tmp_path / "hw.onnx"
    quantize(float_path, path, residual_depthwise(float_path), "QDQ", "QInt8", act="QUInt8",
             extra_options={"ActivationSymmetric": True})
    result = run_a2q("lower", str(path), str(out), "--acc-bits", "24")
    message = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 3 and "NOT equivalent" in message, message[-2000:]
    assert "all of it from FINN rounding exact ties up" in message


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("stale_type", [False, True])
def test_a_symmetric_uint8_qdq_pair_becomes_signed_with_the_same_outputs(per_channel, stale_type):
    """QuantizeLinear -> DequantizeLinear with uint8 zero point 128 (per tensor or per channel), executed in
    onnxruntime before and after ``signed_mid_zero_points``: equal on exact ties, past both clamps and at zero, and
    ``QuantFromQDQ`` then makes a signed Quant that qonnx executes alike, also where the file states the codes'
    uint8 type in a value_info (which would otherwise win over shape inference and make the Quant unsigned)."""
    import onnxruntime as ort

    from a2q_passes.finn_quant_forms import QuantFromQDQ, signed_mid_zero_points

    scale = np.array([0.1, 0.25, 3.0, 1 / 7], np.float32) if per_channel else np.float32(1 / 7)
    zero = np.full(4, 128, np.uint8) if per_channel else np.uint8(128)
    axis = {"axis": 1} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q", **axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ", **axis)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    if stale_type:
        graph.value_info.append(helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4, 64]))
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    inputs = _adversarial_inputs(scale.reshape(1, 4, 1) if per_channel else scale, 8, np.random.default_rng(0))

    def run(m: ModelWrapper) -> list[np.ndarray]:
        session = ort.InferenceSession(m.model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [session.run(None, {"x": x})[0] for x in inputs]

    before = run(model)
    signed = signed_mid_zero_points(ModelWrapper(model.model.SerializeToString()))
    assert signed.get_initializer(signed.graph.node[0].input[2]).dtype == np.int8
    for b, a in zip(before, run(signed)):
        assert np.array_equal(b, a)
    assert any(np.any(b < 0) for b in before) and any(np.any(b > 0) for b in before)
    quant = model.transform(QuantFromQDQ()).graph.node[0]
    assert quant.op_type == "Quant" and node_attr(quant, "signed") == 1
    converted = model.transform(QuantFromQDQ())
    for b, x in zip(before, inputs):
        assert np.array_equal(b, _execute(converted, x)), "QCDQToQuant's Quant differs from the Q/DQ pair"


def test_two_quantizers_of_one_tensor_become_two_quant_nodes_with_the_same_outputs():
    """One tensor read by an 8-bit QuantizeLinear -> DequantizeLinear and by a 4-bit one (QuantizeLinear -> Clip ->
    DequantizeLinear): after ``QuantFromQDQ`` two Quant nodes of distinct names and bit widths that qonnx executes as
    onnxruntime executes the pairs. qonnx's QCDQToQuant alone names both after the tensor and gives both the bit-width
    initializer written last."""
    import onnxruntime as ort

    from a2q_passes.finn_quant_forms import QuantFromQDQ

    nodes = [helper.make_node("QuantizeLinear", ["x", "s8", "z"], ["q8"], name="Q8"),
             helper.make_node("DequantizeLinear", ["q8", "s8", "z"], ["y8"], name="DQ8"),
             helper.make_node("QuantizeLinear", ["x", "s4", "z"], ["q4"], name="Q4"),
             helper.make_node("Clip", ["q4", "lo", "hi"], ["c4"], name="Clip4"),
             helper.make_node("DequantizeLinear", ["c4", "s4", "z"], ["y4"], name="DQ4")]
    consts = {"s8": np.float32(0.05), "s4": np.float32(0.3), "z": np.int8(0), "lo": np.int8(-8), "hi": np.int8(7)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 64]) for y in ("y8", "y4")],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = np.linspace(-4, 4, 64, dtype=np.float32).reshape(1, 64)
    session = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = session.run(["y8", "y4"], {"x": x})
    converted = model.transform(QuantFromQDQ())
    quants = [n for n in converted.graph.node if n.op_type == "Quant"]
    assert len(quants) == 2 and len({n.name for n in quants}) == 2 and len(converted.graph.node) == 2
    assert sorted(float(converted.get_initializer(n.input[3])) for n in quants) == [4.0, 8.0]
    after = execute_onnx(converted, {"x": x})
    assert np.array_equal(before[0], after["y8"]) and np.array_equal(before[1], after["y4"])
    assert not np.array_equal(before[0], before[1])


def _assert_lowers(model: ModelWrapper, path: Path) -> None:
    """``model`` saved to ``path`` lowers (`a2q lower --acc-bits 24`) with every MVAU holding its worst case."""
    out = path.with_suffix(".hw.onnx")
    model.save(str(path))
    result = run_a2q("lower", str(path), str(out), "--acc-bits", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_every_mvau_holds_its_worst_case(ModelWrapper(str(out)))


def _quantize_graph_without_conv_defaults(tmp_path: Path) -> ModelWrapper:
    """qonnx's QuantizeGraph over a float net whose Conv leaves every attribute at its ONNX default."""
    from qonnx.transformation.quantize_graph import QuantizeGraph
    from qonnx.util.cleanup import cleanup_model

    from tests.ort_models import FLOAT_NETS

    float_path = tmp_path / "float.onnx"
    FLOAT_NETS["matmul_conv"](float_path, opset=13)
    positions = [(("input", 0), (0.05, 0, 8, 0, 1, "ROUND")), (("input", 1), (0.02, 0, 8, 1, 1, "ROUND"))]
    return cleanup_model(ModelWrapper(str(float_path))).transform(
        QuantizeGraph({"op_type": {op: positions for op in ("Conv", "Gemm", "MatMul")}}))


def _assert_every_mvau_holds_its_worst_case(lowered: ModelWrapper, bits: int | None = None) -> None:
    """Every MVAU's worst case over its inputDataType, summed in int64 from its integer weights (far from overflow
    at these sizes), lies in its accDataType, of at most ``bits`` bits where given."""
    from tests.fuzz.real_files import MVAU_OPS, VVAU_OPS

    nodes = [n for n in lowered.graph.node if n.op_type in MVAU_OPS + VVAU_OPS]
    assert nodes and all(n.op_type in MVAU_OPS for n in nodes)
    for node in nodes:
        op = getCustomOp(node)
        x = DataType[op.get_nodeattr("inputDataType")]
        weights = lowered.get_initializer(node.input[1]).astype(np.int64)  # (MW, MH)
        products = np.stack([weights * int(x.min()), weights * int(x.max())])
        lo, hi = int(products.min(axis=0).sum(axis=0).min()), int(products.max(axis=0).sum(axis=0).max())
        acc = DataType[op.get_nodeattr("accDataType")]
        assert acc.min() <= lo and hi <= acc.max(), (node.name, lo, hi, acc.name)
        assert bits is None or acc.bitwidth() <= bits, (node.name, acc.name, bits)


@pytest.mark.parametrize("exporter", ["qcdq_dynamo", "qcdq_ts"])
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_brevitas_qcdq_exports_lower_through_qonnx_qcdq_to_quant(kind, exporter, tmp_path):
    """Brevitas' QCDQ exports, dynamo (QuantizeLinear -> Clip -> DequantizeLinear everywhere) and TorchScript (weights
    stored as integers behind Clip -> DequantizeLinear, which first get their QuantizeLinear): ``QuantFromQDQ`` makes
    QONNX Quant nodes of every chain (qonnx executes both graphs alike), and ``a2q project --input-ranges finn`` then
    ``a2q lower --from-annotations`` give MVAUs that hold their worst case within the projected width; before, FINN
    lowered no layer of the dynamo files, and `lower` refused the TorchScript ones."""
    from a2q_passes.finn_quant_forms import QuantFromQDQ, is_qdq_node
    from a2q_passes.model_io import load_model
    from tests.brevitas_nets import NetSpec, build_corpus_net

    path = build_corpus_net(tmp_path, NetSpec(kind), exporter)
    model = load_model(path)  # as the commands read it (the TorchScript export's Constant nodes become initializers)
    converted = ModelWrapper(model.model.SerializeToString()).transform(QuantFromQDQ())
    assert not any(is_qdq_node(n) for n in converted.graph.node)
    assert [n.op_type for n in converted.graph.node].count("Quant") == sum(
        n.op_type == "DequantizeLinear" for n in model.graph.node)
    model = model.transform(InferShapes())
    name, output = model.graph.input[0].name, model.graph.output[0].name
    x = np.random.default_rng(0).normal(0, 2, [1, *model.get_tensor_shape(name)[1:]]).astype(np.float32)
    np.testing.assert_allclose(execute_onnx(converted, {name: x})[output], execute_onnx(model, {name: x})[output],
                               rtol=0, atol=1e-5)
    widest = max(layer["bounds"]["exact"] for layer in json.loads(run_a2q("analyze", str(path), "--json").stdout)["layers"])
    projected, lowered = tmp_path / "projected.onnx", tmp_path / "hw.onnx"
    result = run_a2q("project", str(path), str(projected), "--acc-bits", str(widest - 2), "--input-ranges", "finn")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_a2q("lower", str(projected), str(lowered), "--from-annotations")
    assert result.returncode == 0 and "equivalent" in result.stdout, (result.stdout + result.stderr)[-2000:]
    _assert_every_mvau_holds_its_worst_case(ModelWrapper(str(lowered)), widest - 2)


def test_a_qdq_file_qcdq_to_quant_converts_only_in_part_is_left_whole_and_named(tmp_path):
    """onnxruntime's QDQ file with 4-bit weights (opset 21 int4 storage, which QCDQToQuant does not convert) and int8
    activations: the graph stays as it is (a half-converted graph fails inside FINN's steps with messages that name
    no cause), and ``a2q lower`` refuses, naming the Q/DQ nodes and what to export instead."""
    from a2q_passes.finn_quant_forms import QuantFromQDQ
    from tests.ort_models import matmul_conv, quantize

    float_path, path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    shape = matmul_conv(float_path)
    quantize(float_path, path, shape, "QDQ", "QInt4", act="QInt8", per_channel=True,
             extra_options={"ActivationSymmetric": True})
    model = ModelWrapper(str(path))
    kept = model.transform(QuantFromQDQ())
    assert sorted(n.op_type for n in kept.graph.node) == sorted(n.op_type for n in model.graph.node)  # no Quant
    result = run_a2q("lower", str(path), str(tmp_path / "hw.onnx"))
    assert result.returncode == 1 and not (tmp_path / "hw.onnx").exists()
    message = result.stdout + result.stderr
    assert "FINN converts QONNX Quant nodes only" in message and "not of 4-bit storage" in message
    assert "W1_DequantizeLinear" in message and "export_qonnx" in message and "Traceback" not in message

def _gemm_model(alpha: float, beta: float, bias: bool, trans_b: int, mode: str = "ROUND") -> ModelWrapper:
    """A 4-bit activation Quant into a Gemm with 4-bit per-channel Quant weights, alpha, beta and a bias C."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (6, 10) if trans_b else (10, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(np.float32(0.125), "xs"), numpy_helper.from_array(np.float32(0), "z"),
             numpy_helper.from_array(np.float32(4), "b"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full((6, 1) if trans_b else (1, 6), 0.25, np.float32), "ws"),
             numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "c")]
    nodes = [helper.make_node("Quant", ["x", "xs", "z", "b"], ["xq"], name="act", domain=QONNX, signed=1, narrow=0,
                              rounding_mode=mode),
             helper.make_node("Quant", ["w", "ws", "z", "b"], ["wq"], domain=QONNX, signed=1, narrow=1,
                              rounding_mode="ROUND"),
             helper.make_node("Gemm", ["xq", "wq", *(["c"] if bias else [])], ["y"], name="fc", alpha=alpha,
                              beta=beta, transB=trans_b)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid(QONNX, 1)])).transform(InferShapes())


@pytest.mark.parametrize("alpha,beta,bias,trans_b", [(0.5, 2.0, True, 1), (3.0, 1.0, True, 0), (0.75, 1.0, False, 1),
                                                     (1.0, -0.5, True, 0)])
def test_gemm_factors_become_float32_muls_and_lower_takes_them(alpha, beta, bias, trans_b, tmp_path):
    """qonnx's GemmToMatMul (inside FINN's conversion) stores alpha/beta as float64: onnxruntime then refuses
    the converted graph (Mul of float and double), so lower failed on any Gemm with alpha or beta other than 1."""
    model = _gemm_model(alpha, beta, bias, trans_b)
    rewritten = model.transform(GemmFactorsAsFloat32())
    gemm = next(n for n in rewritten.graph.node if n.op_type == "Gemm")
    assert node_attr(gemm, "alpha", 1.0) == 1.0 and node_attr(gemm, "beta", 1.0) == 1.0 and len(gemm.input) == 2
    assert all(i.data_type == TensorProto.FLOAT for i in rewritten.graph.initializer)
    rng = np.random.default_rng(0)
    for x in (rng.normal(0, 1, (1, 10)), np.full((1, 10), 0.0625), np.full((1, 10), 1e3)):
        x = x.astype(np.float32)
        want, got = execute_onnx(model, {"x": x})["y"], execute_onnx(rewritten, {"x": x})["y"]
        assert np.allclose(got, want, rtol=1e-6, atol=1e-6), (got, want)
    path = tmp_path / "gemm.onnx"
    model.save(str(path))
    out = run_a2q("lower", path, tmp_path / "hw.onnx", "--acc-bits", "16")
    assert out.returncode == 0 and "equivalent" in out.stdout, out.stdout[-800:] + out.stderr


@pytest.mark.parametrize("mode", ["CEIL", "FLOOR", "UP", "DOWN"])
def test_activation_quantizers_finn_would_round_wrongly_are_refused_by_name(mode, tmp_path, monkeypatch):
    """FINN thresholds every activation Quant halfway between codes, whatever its rounding_mode."""
    from a2q_passes import finn_refusals
    from tests.cli_helpers import run_cli

    path = tmp_path / "act.onnx"
    _gemm_model(1.0, 1.0, True, 1, mode).save(str(path))
    code, out, err = run_cli("lower", path, tmp_path / "hw.onnx", "--acc-bits", "16")
    assert code == 1 and "'act'" in err and mode in err and "ROUND" in err, err
    assert not (tmp_path / "hw.onnx").exists()
    # the refusal is what stands between the user and a graph that differs: without it, the equivalence check fails
    # where the quantizer reads a tensor inside the graph (here through an Identity, which FINN's tidy-up removes);
    # one reading the graph input directly gets its thresholds placed on its exact boundaries whatever the mode
    monkeypatch.setattr(finn_refusals, "refuse_rounding_modes", lambda model: None)
    interior = _gemm_model(1.0, 1.0, True, 1, mode)
    interior.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_copy"]))
    interior.graph.node[1].input[0] = "x_copy"
    interior.save(str(tmp_path / "interior.onnx"))
    code, out, err = run_cli("lower", tmp_path / "interior.onnx", tmp_path / "hw.onnx", "--acc-bits", "16")
    assert code == 3 and "NOT equivalent" in out, out[-600:] + err
    code, out, err = run_cli("lower", path, tmp_path / "hw_input.onnx", "--acc-bits", "16")
    assert code == 0 and "equivalent" in out, out[-600:] + err


def _requantized(first: dict, second: dict, between: str) -> ModelWrapper:
    """x -> Quant(first) -> ``between`` -> Quant(second) -> y on (1, 4, 8, 8) inputs."""
    def quant(name: str, inp: str, out: str, p: dict) -> list:
        attrs = {"signed": p.get("signed", 0), "narrow": 0, "rounding_mode": p.get("mode", "ROUND")}
        return [helper.make_node("Quant", [inp, f"{name}_s", f"{name}_z", f"{name}_b"], [out], domain=QONNX,
                                 name=name, **attrs)]

    nodes = quant("first", "x", "q1", first)
    shape = [1, 4, 8, 8]
    if between == "MaxPool":
        nodes.append(helper.make_node("MaxPool", ["q1"], ["m"], kernel_shape=[2, 2], strides=[2, 2]))
        shape = [1, 4, 4, 4]
    elif between == "Flatten":
        nodes.append(helper.make_node("Flatten", ["q1"], ["m"]))
        shape = [1, 256]
    else:
        nodes.append(helper.make_node("Identity", ["q1"], ["m"]))
    nodes += quant("second", "m", "q2", second)
    nodes.append(helper.make_node("Relu", ["q2"], ["y"]))
    inits = [numpy_helper.from_array(np.asarray(p[key], np.float32), f"{name}_{key}") for name, p in
             (("first", first), ("second", second)) for key in ("s", "z", "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid(QONNX, 1)])).transform(InferShapes())


@pytest.mark.parametrize("between", ["MaxPool", "Flatten", "Identity"])
@pytest.mark.parametrize("first,second,removed", [
    ({"s": 0.0731, "z": 141, "b": 8}, {"s": 0.0731, "z": 141, "b": 8}, True),  # onnxruntime's requantizer
    ({"s": 0.25, "z": 0, "b": 4, "signed": 1}, {"s": 0.25, "z": 0, "b": 4, "signed": 1}, True),
    ({"s": 0.0731, "z": 141, "b": 8}, {"s": 0.0731, "z": 140, "b": 8}, False),  # another grid: it requantizes
    ({"s": 0.25, "z": 0, "b": 4}, {"s": 0.25, "z": 0, "b": 3}, False),  # a narrower clamp
    ({"s": 0.25, "z": 0, "b": 4}, {"s": 0.25, "z": 0, "b": 4, "mode": "CEIL"}, False),  # CEIL of a value a hair up
])
def test_a_requantizer_of_its_own_grid_is_dropped_with_the_same_outputs(between, first, second, removed):
    """A Quant reading, through a MaxPool, Flatten or Identity, the output of a Quant with the same parameters gives its
    input back: dropped, the graph computes the same on values around every code and past both clamps. A different
    grid, clamp or a CEIL rounding is kept."""
    from a2q_passes.finn_requantization import RedundantRequantization

    model = _requantized(first, second, between)
    dropped = ModelWrapper(model.model.SerializeToString()).transform(RedundantRequantization())
    assert [n.name for n in dropped.graph.node].count("second") == (0 if removed else 1)
    rng = np.random.default_rng(0)
    steps = (np.arange(-300, 300) * 0.5 + rng.uniform(-0.2, 0.2, 600)) * first["s"]
    for sample in (steps[:256], steps[256:512], np.concatenate([steps[512:], [1e6, -1e6] * 84])):
        x = {"x": sample.reshape(1, 4, 8, 8).astype(np.float32)}
        assert np.array_equal(execute_onnx(dropped, x)["y"], execute_onnx(model, x)["y"])


def test_maxpool_defaults_are_filled_in_as_onnx_defines_them():
    """tf2onnx writes a QKeras model's MaxPool with kernel_shape and strides only: FINN's MaxPoolNHWC requires
    pads ("Required attribute pads unspecified"). The missing attributes get their ONNX defaults, which compute the
    same outputs (executed with onnxruntime before and after)."""
    from a2q_passes.finn_quant_forms import WindowDefaultAttributes

    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])
    graph = helper.make_graph([pool], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    filled = ModelWrapper(model.model.SerializeToString()).transform(WindowDefaultAttributes())
    node = filled.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "kernel_shape": [2, 2], "strides": [1, 1], "pads": [0, 0, 0, 0]}
    x = np.random.default_rng(0).normal(0, 1, [1, 2, 5, 5]).astype(np.float32)
    assert np.array_equal(execute_onnx(model, {"x": x})["y"], execute_onnx(filled, {"x": x})["y"])


@pytest.mark.parametrize("op", ["Conv", "MaxPool"])
def test_explicit_auto_pads_execute_as_the_auto_pad_they_replace(op):
    """``ExplicitAutoPads`` gives every VALID/SAME_* window the pads onnxruntime's own auto_pad computes: the same
    outputs on random inputs, over odd and even sizes, kernels and strides (where qonnx's formula, used by FINN's
    convolution lowering, pads a 4 x 3 input to 7 x 5 at stride 2)."""
    import onnxruntime as ort

    from a2q_passes.finn_quant_forms import ExplicitAutoPads

    rng = np.random.default_rng(0)
    cases = itertools.product(("SAME_UPPER", "SAME_LOWER", "VALID"), (3, 4, 5), (1, 2, 3), (1, 2, 3))
    checked = 0
    for auto_pad, size, k, s in cases:
        if k > size:
            continue
        shape = (1, 2, size, size + 1)
        attrs = dict(kernel_shape=[k, k], strides=[s, s], auto_pad=auto_pad)
        inits = [numpy_helper.from_array(rng.normal(size=(3, 2, k, k)).astype(np.float32), "w")] if op == "Conv" else []
        node = helper.make_node(op, ["x", "w"] if op == "Conv" else ["x"], ["y"], **attrs)
        graph = helper.make_graph([node], "window", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).transform(InferShapes())
        explicit = ModelWrapper(model.model.SerializeToString()).transform(ExplicitAutoPads())
        assert node_attr(explicit.graph.node[0], "auto_pad") is None and node_attr(explicit.graph.node[0], "pads")
        x = rng.normal(size=shape).astype(np.float32)
        sessions = [ort.InferenceSession(m.model.SerializeToString(), providers=["CPUExecutionProvider"])
                    for m in (model, explicit)]
        try:
            before = sessions[0].run(None, {"x": x})[0]
        except Exception:  # onnxruntime's MaxPool pads SAME negatively where the stride passes the size: no oracle
            assert op == "MaxPool" and auto_pad.startswith("SAME") and s > k, (auto_pad, size, k, s)
            continue
        after = sessions[1].run(None, {"x": x})[0]
        assert before.shape == after.shape and np.array_equal(before, after), (auto_pad, size, k, s)
        checked += 1
    assert checked > 50


def test_a_strided_same_padded_conv_lowers_within_its_width(tmp_path):
    """A Conv with auto_pad SAME_LOWER at stride 2 over a 4 x 3 input (a random model the fuzzer drew): FINN's lowering
    padded it as if its stride were 1 and its sliding window failed to execute ("cannot reshape array of size 36
    into shape (1,2,2,3)"); with explicit pads it lowers, equivalent, every MVAU holding its worst case."""
    rng = np.random.default_rng(1)
    consts = {"s": np.float32(0.5), "z": np.float32(0), "b": np.float32(4), "ws": np.float32(0.25),
              "w": (rng.integers(-8, 8, size=(2, 3, 3, 3)) * 0.25).astype(np.float32)}
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain=QONNX, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Quant", ["w", "ws", "z", "b"], ["wq"], domain=QONNX, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Conv", ["xq", "wq"], ["y"], auto_pad="SAME_LOWER", kernel_shape=[3, 3], strides=[2, 2])]
    _assert_graph_lowers(nodes, consts, [1, 3, 4, 3], [1, 2, 2, 2], tmp_path / "strided_same.onnx")


def _assert_graph_lowers(nodes: list, consts: dict[str, np.ndarray], x_shape: list[int], y_shape: list[int],
                         path: Path) -> None:
    """``nodes`` over the initializers ``consts`` as a QONNX model ``x -> y`` lower as :func:`_assert_lowers` checks."""
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX, 1)]))
    _assert_lowers(model.transform(InferShapes()), path)


def _clip_quant(high: float, scale: np.ndarray, bits: float, signed: int, narrow: int, mode: str) -> ModelWrapper:
    """x -> Clip(0, high) -> Quant (zero point 0), opset 13 (Clip's bounds as inputs)."""
    model = _relu_quant(scale, 0.0, bits, signed, narrow, mode, producer="Clip")
    clip = model.graph.node[0]
    clip.input.extend(["lo", "hi"])
    model.set_initializer("lo", np.float32(0.0))
    model.set_initializer("hi", np.float32(high))
    return model


@pytest.mark.parametrize("mode,signed,narrow", [(m, s, n) for m in ROUNDING for s in (0, 1) for n in (0, 1)])
def test_a_clip_above_the_top_code_becomes_a_relu_computing_the_same(mode, signed, narrow):
    """``ClipAboveTheCodesAsRelu``: Clip(0, c) before a Quant becomes a Relu where c gets the top code in every channel
    (c at the top code's real, or beyond), never where c clips the top code away in one (a step or more below it, in
    every rounding mode); before and after execute alike on ties, values past c and past the clamp, per-tensor and
    per-channel scales."""
    from a2q_passes.finn_quant_forms import ClipAboveTheCodesAsRelu

    rng = np.random.default_rng(0)
    bits = 4
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1 - narrow
    for scale in (np.float32(0.25), np.array([0.5, 0.25, 0.1, 6 / 15], np.float32).reshape(1, 4, 1)):
        widest = float(np.max(scale))  # the channel whose top code lies highest
        for high, kept in ((widest * top, True), (widest * top * 3, True), (widest * (top - 1), False),
                           (widest * (top - 1.01), False)):
            model = _clip_quant(high, scale, bits, signed, narrow, mode)
            rewritten = ModelWrapper(model.model.SerializeToString()).transform(ClipAboveTheCodesAsRelu())
            assert (rewritten.graph.node[0].op_type == "Relu") == kept, (scale, high)
            inputs = _adversarial_inputs(scale, bits, rng) + [np.full((1, 4, 64), high, np.float32),
                                                              np.full((1, 4, 64), high * 1.5, np.float32)]
            for before, after in zip(_outputs(model, inputs), _outputs(rewritten, inputs)):
                np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("high", [6.0, 3.0], ids=["at_the_top_code", "below_the_top_code"])
def test_a_relu6_before_an_activation_quantizer_lowers(high, tmp_path):
    """Quant -> Conv -> Clip(0, high) -> Quant (4 unsigned bits at 6 / 15, as a calibrated quantizer behind a float
    ReLU6) -> Conv: FINN left the Clip a float node, so `lower` exited 3. At 6 (the top code) it is a Relu there; at
    3 (codes 8..15 clipped away) it folds into FINN's thresholds. Either way the whole model lowers, equivalent,
    every MVAU holding its worst case."""
    rng = np.random.default_rng(2)
    consts = {"s": np.float32(0.5), "z": np.float32(0), "b": np.float32(4), "ws": np.float32(0.25),
              "w1": (rng.integers(-8, 8, size=(3, 2, 3, 3)) * 0.25).astype(np.float32),
              "w2": (rng.integers(-8, 8, size=(2, 3, 1, 1)) * 0.25).astype(np.float32),
              "lo": np.float32(0.0), "hi": np.float32(high), "s6": np.float32(6.0 / 15)}
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain=QONNX, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Quant", ["w1", "ws", "z", "b"], ["w1q"], domain=QONNX, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Conv", ["xq", "w1q"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r6"], name="ReLU6"),
             helper.make_node("Quant", ["r6", "s6", "z", "b"], ["aq"], domain=QONNX, signed=0, narrow=0,
                              rounding_mode="HALF_UP"),  # FINN's thresholds round its exact ties up as well
             helper.make_node("Quant", ["w2", "ws", "z", "b"], ["w2q"], domain=QONNX, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Conv", ["aq", "w2q"], ["y"], kernel_shape=[1, 1])]
    _assert_graph_lowers(nodes, consts, [1, 2, 5, 5], [1, 2, 5, 5], tmp_path / "relu6.onnx")


def test_a_clip_before_multithresholds_folds_into_their_thresholds_computing_the_same():
    """``clips_into_thresholds``: x -> Clip(lo, hi) -> MultiThreshold (two readers, per-channel thresholds below,
    inside and above the bounds) against x -> MultiThreshold with the moved thresholds, on the bounds, between and on
    the thresholds, far outside, -inf and NaN (+inf alone reaches the +inf thresholds); a Clip another node also reads,
    or with a non-constant bound, stays."""
    from a2q_passes.finn_clip_thresholds import clips_into_thresholds

    thresholds = np.array([[-2.0, -0.5, 0.0, 0.5, 1.0, 2.5, 3.0, 7.0], [-1.0, 0.25, 0.75, 1.5, 2.0, 2.9, 3.1, 9.0]],
                          np.float32)
    consts = {"lo": np.float32(0.0), "hi": np.float32(3.0), "t1": thresholds, "t2": thresholds[:, ::2].copy()}
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("MultiThreshold", ["c", "t1"], ["m1"], domain=QONNX, out_dtype="UINT4"),
             helper.make_node("MultiThreshold", ["c", "t2"], ["m2"], domain=QONNX, out_dtype="UINT3"),
             helper.make_node("Add", ["m1", "m2"], ["y"])]
    graph = helper.make_graph(nodes, "clip_mt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 8])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX, 1)]))
    folded = clips_into_thresholds(model)
    assert [n.op_type for n in folded.graph.node] == ["MultiThreshold", "MultiThreshold", "Add"]
    assert [n.op_type for n in model.graph.node][0] == "Clip"  # the model given is left as it is
    special = np.array([0.0, 3.0, -1e30, 1e30, 3e38, -np.inf, np.nan, 2.9, 3.1, -0.5], np.float32)
    values = np.concatenate([thresholds.reshape(-1), np.nextafter(thresholds.reshape(-1), np.float32(-np.inf)),
                             special, np.random.default_rng(0).uniform(-5, 10, 8).astype(np.float32)])
    for x in (np.resize(values, (1, 2, 5, 8)), np.resize(values[::-1], (1, 2, 5, 8))):
        np.testing.assert_array_equal(_execute(model, x), _execute(folded, x))

    also_read = ModelWrapper(model.model.SerializeToString())
    also_read.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    assert clips_into_thresholds(also_read).graph.node[0].op_type == "Clip"
    computed = ModelWrapper(model.model.SerializeToString())
    computed.graph.node[0].input[2] = "x"  # a bound computed at run time
    assert clips_into_thresholds(computed).graph.node[0].op_type == "Clip"



def test_a_flatten_before_a_classifiers_input_quantizer_becomes_a_reshape_and_lowers(tmp_path):
    """Brevitas' QCDQ (TorchScript) export writes ``torch.flatten`` as ``Flatten``, read by the classifier's own input
    quantizer. After streamlining that ``Flatten`` reads a ``Transpose`` back from NHWC and feeds thresholds, which
    FINN's ``RemoveCNVtoFCFlatten`` does not take (it needs an MVAU behind), so `lower` left it a float node; as the
    ``Reshape`` the QONNX export writes, FINN's ``InferShuffle`` joins it with the ``Transpose``. The rewrite computes
    the same values, and the QCDQ file lowers whole and equivalent."""
    import brevitas.nn as qnn
    import torch
    from brevitas.export import export_onnx_qcdq
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    from a2q_passes.finn_quant_forms import SpatialFlattenAsReshape

    layer = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4, input_quant=Int8ActPerTensorFloat,
                 input_bit_width=4, output_quant=Int8ActPerTensorFloat, output_bit_width=6)

    class ConvThenClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = qnn.QuantConv2d(3, 4, 3, stride=2, bias=True, **layer)
            self.fc = qnn.QuantLinear(4 * 3 * 3, 5, bias=True, **layer)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    net = ConvThenClassifier()
    with torch.no_grad():
        net.train()
        net(torch.randn(8, 3, 8, 8))
    net.eval()
    path = tmp_path / "flatten_qcdq.onnx"
    export_onnx_qcdq(net, torch.randn(1, 3, 8, 8), str(path), dynamo=False)
    model = ModelWrapper(str(path)).transform(InferShapes())
    assert model.get_nodes_by_op_type("Flatten")
    rewritten = model.transform(SpatialFlattenAsReshape())
    assert not rewritten.get_nodes_by_op_type("Flatten") and rewritten.get_nodes_by_op_type("Reshape")
    name, output = model.graph.input[0].name, model.graph.output[0].name
    x = np.random.default_rng(0).normal(0, 2, [1, 3, 8, 8]).astype(np.float32)
    np.testing.assert_array_equal(execute_onnx(rewritten, {name: x})[output], execute_onnx(model, {name: x})[output])
    result = run_a2q("lower", str(path), str(tmp_path / "hw.onnx"))
    assert result.returncode == 0 and "equivalent" in result.stdout and "not lowered" not in result.stdout + result.stderr, \
        (result.stdout + result.stderr)[-2000:]
