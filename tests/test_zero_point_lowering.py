"""Activation quantizers with a zero point in ``a2q lower`` and the FINN build steps (:mod:`a2q_passes.finn_zero_points`).

FINN converts only zero points of 0; onnxruntime's static quantizer writes uint8 activations with a calibrated zero
point by default, and ``a2q lower`` refused every such file. The rewrite is checked by executing the quantizer and its
thresholds with qonnx, and end to end on files onnxruntime and Brevitas' graph-mode PTQ write: the lowered graph
computes what the file computes, and every MVAU/VVAU holds its executed worst case in its ``accDataType``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.finn_runtime import ensure_finn_importable
from a2q_passes.finn_tie_thresholds import activation_tie_rule
from a2q_passes.finn_zero_points import (ZeroPointActivationsAsThresholds, partial_range_threshold_bits,
                                        zero_point_obstacle)
from tests.cli_helpers import run_a2q
from tests.fuzz.real_files import MVAU_OPS, VVAU_OPS, executed_range

QONNX = "qonnx.custom_op.general"


def _quant_model(scale: float, zero: float, bits: int, signed: int, narrow: int, producer: str | None = None,
                 mode: str = "ROUND", weight_zero: float | np.ndarray = 0.0, relu_after: bool = False) -> ModelWrapper:
    """x (1, 4, 256) -> [producer] -> Quant(scale, zero, bits) -> q -> [Relu -> r] -> MatMul with 4-bit Quant
    weights (zero point ``weight_zero``) -> y."""
    nodes = [helper.make_node(producer, ["x"], ["p"])] if producer else []
    nodes += [helper.make_node("Quant", ["p" if producer else "x", "s", "z", "b"], ["q"], domain=QONNX, signed=signed,
                               narrow=narrow, rounding_mode=mode, name="act_quant"),
              helper.make_node("Quant", ["w", "ws", "wz", "wb"], ["wq"], domain=QONNX, signed=1, narrow=0,
                               rounding_mode="ROUND", name="weight_quant")]
    nodes += [helper.make_node("Relu", ["q"], ["r"], name="relu")] if relu_after else []
    nodes += [helper.make_node("MatMul", ["r" if relu_after else "q", "wq"], ["y"], name="matmul")]
    weights = np.random.default_rng(0).integers(-8, 8, size=(256, 8)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for v, n in
             ((scale, "s"), (zero, "z"), (bits, "b"), (weights, "w"), (0.1, "ws"), (weight_zero, "wz"), (4, "wb"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid(QONNX, 1)]))


@pytest.mark.parametrize("relu", ["none", "after", "before"])
@pytest.mark.parametrize("scale,zero,bits,signed,narrow", [
    (0.05, 141, 8, 0, 0), (0.0173, 3, 8, 0, 0), (0.02, 255, 8, 0, 0), (0.02, 254, 8, 0, 0), (0.1, -17, 8, 1, 0),
    (0.25, 7, 4, 0, 0), (0.3, -128, 8, 1, 0), (0.125, 2, 3, 1, 1), (1 / 3, 6, 4, 0, 1), (0.2, -3, 4, 0, 0),
    (0.25, 20, 4, 0, 0)])
def test_the_thresholds_compute_the_quantizer_off_exact_ties(scale, zero, bits, signed, narrow, relu):
    """The rewrite (MultiThreshold with output bias qmin - z, then Mul by s) against the Quant it replaces, both
    executed by qonnx: equal on inputs a little either side of every step and far past both clamps; the thresholds'
    integer outputs are the executed codes q - z, fill exactly the range they can take, inside their DataType.

    A Relu behind the Quant (Brevitas' asymmetric graph-mode PTQ in front of its global pooling) folds in: the
    thresholds below the zero point go, the codes are max(q - z, 0) in an unsigned DataType (where no code lies above
    z the Relu is left). A Relu in front of it (FINN removes a Relu only before a zero-point-0 quantizer) folds in too:
    the thresholds at or below real 0 are always passed, so they go into the output bias, and the codes start at
    that of real 0 (where no code lies above z the quantizer's output is one constant: left, and refused by name)."""
    model = _quant_model(scale, zero, bits, signed, narrow, producer="Relu" if relu == "before" else None,
                         relu_after=relu == "after").transform(InferShapes())
    rewritten = model.transform(ZeroPointActivationsAsThresholds())
    lo = -(2 ** (bits - 1)) + narrow if signed else 0
    hi = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1 - narrow
    if relu == "before" and hi <= zero:
        assert rewritten.model.SerializeToString() == model.model.SerializeToString()
        assert "no code above its zero point" in zero_point_obstacle(model, model.get_node_from_name("act_quant"))
        return
    kept_relu = relu == "after" and hi <= zero
    assert sorted(n.op_type for n in rewritten.graph.node) == sorted(
        ["MatMul", "Mul", "MultiThreshold", "Quant"] + (["Relu"] if kept_relu else []))
    counted = next(n for n in rewritten.graph.node if n.op_type == "MultiThreshold")
    steps = (np.arange(lo - zero - 2, hi - zero + 2) + 0.5) * scale  # every step of q - z, and past both ends
    near = np.concatenate([steps - 1e-3 * scale, steps + 1e-3 * scale, [-1e6, 1e6, 0.0]])
    x = np.resize(near, 4 * 256).reshape(1, 4, 256).astype(np.float32)
    expected = execute_onnx(model, {"x": x}, return_full_exec_context=True)
    context = execute_onnx(rewritten, {"x": x}, return_full_exec_context=True)
    seen = "r" if relu == "after" else "q"
    for tensor in (seen, "y"):
        assert np.array_equal(context[tensor], expected[tensor]), np.abs(context[tensor] - expected[tensor]).max()
    codes = context[counted.output[0]]
    if not kept_relu:  # the counted codes are the executed ones (q - z, or max(q - z, 0)) themselves
        assert np.array_equal(codes * np.float32(scale), expected[seen])
    real_zero = min(max(zero, lo), hi)  # the code of real 0
    low = {"none": lo - zero, "after": max(lo - zero, 0), "before": real_zero - zero}[relu]
    assert codes.min() == (lo - zero if kept_relu else low) and codes.max() == hi - zero  # every code, none beyond
    dtype = DataType[getCustomOp(counted).get_nodeattr("out_dtype")]
    assert dtype.min() <= codes.min() and codes.max() <= dtype.max()
    assert relu != "after" or kept_relu or not dtype.signed()


def _near_ties(scale: float, zero: int, lo: int, hi: int, batch: int) -> np.ndarray:
    """Every tie ``s (k + 1/2 - z)`` between the codes ``lo..hi`` and the float32 inputs 1, 2, 10, 100, 300, 600
    and 1000 steps either side of it, in batches of ``batch`` values (the last one filled from the start)."""
    ties = ((np.arange(lo, hi) - zero + 0.5) * np.float64(scale)).astype(np.float32)
    near = [ties]
    for direction in (np.inf, -np.inf):
        walked, done = ties.copy(), 0
        for offset in (1, 2, 10, 100, 300, 600, 1000):
            for _ in range(offset - done):
                walked = np.nextafter(walked, np.float32(direction))
            done = offset
            near.append(walked.copy())
    values = np.stack(near, axis=1).reshape(-1)
    return np.resize(values, -(-values.size // batch) * batch).reshape(-1, batch).astype(np.float32)


@pytest.mark.parametrize("mode", ["ROUND", "HALF_UP"])
@pytest.mark.parametrize("scale,zero,bits,signed", [(2 ** -7, 114, 8, 0), (2 ** -7, 113, 8, 0), (0.0625, 99, 8, 0),
                                                    (0.25, -3, 4, 1), (0.05, 141, 8, 0), (1 / 3, 7, 4, 0)])
def test_the_thresholds_compute_the_quantizer_on_ties_and_near_ties(scale, zero, bits, signed, mode):
    """On every exact tie ``s (k + 1/2 - z)`` and float32 inputs up to 1000 steps either side: the Quant adds the zero
    point to ``x / s`` in float32 before it rounds, so near a tie hundreds of inputs round as the tie (Brevitas'
    ShiftedUint8 with power-of-two scales: a random net's lowering differed there by one code). The thresholds, on
    the Quant's own float32 boundaries, give its code on each of them; FINN's halfway thresholds did not."""
    model = _quant_model(scale, zero, bits, signed, 0, mode=mode).transform(InferShapes())
    rewritten = model.transform(ZeroPointActivationsAsThresholds())
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    for batch in _near_ties(scale, zero, lo, hi, 1024):
        x = batch.reshape(1, 4, 256)
        expected = execute_onnx(model, {"x": x}, return_full_exec_context=True)["q"]
        assert np.array_equal(execute_onnx(rewritten, {"x": x}, return_full_exec_context=True)["q"], expected)


@pytest.mark.parametrize("scale,zero", [(2 ** -7, 113), (2 ** -7, 114), (0.05, 141), (0.0173, 3)])
def test_the_thresholds_of_a_quantize_linear_round_as_it_does(scale, zero):
    """A uint8 QuantizeLinear rounds ``x / s`` to even and then adds the zero point; the Quant qonnx's QCDQToQuant
    makes of it adds first. The thresholds follow the file's QuantizeLinear (QuantFromQDQ lists the Quant nodes it
    made in the metadata, the rewrite reads and removes that entry): equal on every tie and near-tie."""
    from onnx import TensorProto as TP

    from a2q_passes.finn_quant_forms import prepare_for_finn
    from a2q_passes.metadata import QUANTIZE_LINEAR_QUANTS_KEY, metadata_value

    weights = np.random.default_rng(0).integers(-8, 8, size=(256, 8)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul")]
    inits = [numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.uint8(zero), "z"),
             numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.float32(0.1), "ws")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 256])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8])], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).transform(InferShapes())
    prepared = prepare_for_finn(model)
    assert metadata_value(prepared, QUANTIZE_LINEAR_QUANTS_KEY)
    rewritten = prepared.transform(ZeroPointActivationsAsThresholds())
    assert any(n.op_type == "MultiThreshold" for n in rewritten.graph.node)
    assert metadata_value(rewritten, QUANTIZE_LINEAR_QUANTS_KEY) is None
    read = next(n for n in rewritten.graph.node if n.op_type == "MatMul").input[0]
    for batch in _near_ties(scale, zero, 0, 255, 1024):
        x = batch.reshape(1, 4, 256)
        expected = execute_onnx(model, {"x": x}, return_full_exec_context=True)["xd"]
        assert np.array_equal(execute_onnx(rewritten, {"x": x}, return_full_exec_context=True)[read], expected)


@pytest.mark.parametrize("case,reason", [("per channel", "per-channel"), ("16 bits", "bit width 16"),
                                         ("weights", "non-integer zero point")])
def test_quantizers_the_rewrites_do_not_take_are_refused_by_name(case, reason, tmp_path):
    """An activation quantizer with a per-channel zero point or of more than 8 bits, and a weight quantizer with a
    zero point that is no integer: `lower` exits 1 naming the node and why, and writes nothing."""
    model = _quant_model(np.full((1, 4, 1), 0.05) if case == "per channel" else 0.05, 0 if case == "weights" else 3,
                         16 if case == "16 bits" else 8, 0, 0, weight_zero=2.5 if case == "weights" else 0.0)
    path, out = tmp_path / "zp.onnx", tmp_path / "hw.onnx"
    model.save(str(path))
    result = run_a2q("lower", str(path), str(out))
    message = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1 and "zero point of 0" in message and reason in message, message[-1500:]
    assert f"'{'weight_quant' if case == 'weights' else 'act_quant'}'" in message and not out.exists()


@pytest.mark.parametrize("mode,zero,rule", [("ROUND", 4, "even"), ("ROUND", 3, None), ("HALF_UP", 4, None),
                                            ("HALF_UP", 0, "away")])
def test_the_tie_rule_holds_only_where_codes_less_the_zero_point_keep_it(mode, zero, rule):
    """FINN's thresholds give q - z: ties to even still go where a Quant sends them for an even z, not for an odd
    one, and the away/toward-zero rules read a code's sign, which a zero point changes: no rule there."""
    assert activation_tie_rule(_quant_model(0.25, zero, 4, 0, 0, mode=mode)) == rule


def _ort_file(tmp_path, net: str, act: str):
    from tests.ort_models import FLOAT_NETS, quantize

    float_path, path = tmp_path / "float.onnx", tmp_path / f"{net}_{act}.onnx"
    quantize(float_path, path, FLOAT_NETS[net](float_path), "QDQ", "QInt8", act=act, per_channel=True)
    return path


def _assert_holds_worst_case(lowered: ModelWrapper, most_bits: int | None = None) -> int:
    ensure_finn_importable()  # qonnx executes FINN's HW layers once FINN has registered them
    nodes = [n for n in lowered.graph.node if n.op_type in MVAU_OPS + VVAU_OPS]
    for node in nodes:  # the worst case driven through the node in qonnx's executor, against its accDataType
        done, acc = executed_range(lowered, node.name, "fold"), DataType[getCustomOp(node).get_nodeattr("accDataType")]
        assert acc.min() <= done.lo and done.hi <= acc.max(), (node.name, done, acc.name)
        assert most_bits is None or acc.bitwidth() <= most_bits, (node.name, acc.name, most_bits)
    return len(nodes)


@pytest.mark.parametrize("net,act", [("residual_depthwise", "QUInt8"), ("residual_depthwise", "QInt8"),
                                     ("matmul_conv", "QUInt8")])
def test_onnxruntime_qdq_files_with_asymmetric_activations_lower(net, act, tmp_path):
    """onnxruntime's default QDQ activations (uint8, or int8, each with a calibrated zero point; the graph input's
    zero point 141 and a residual branch's) lower: the lowered graph computes what the file computes and every MVAU
    and VVAU holds its executed worst case. The residual file's thresholds on the sum of the branches are a
    standalone INT9 layer, which FINN's default configuration would make a Requant clamping to all of INT9 (the
    outputs then differed by 0.58): `lower` keeps such layers Thresholding. Before, `lower` refused these files."""
    path = _ort_file(tmp_path, net, act)
    result = run_a2q("lower", str(path), str(tmp_path / "hw.onnx"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "equivalent" in result.stdout and "NOT equivalent" not in result.stdout, result.stdout[-2000:]
    lowered = ModelWrapper(str(tmp_path / "hw.onnx"))
    assert _assert_holds_worst_case(lowered) == (3 if net == "residual_depthwise" else 2)
    assert not [n for n in lowered.graph.node if n.op_type.startswith("Requant")]


def test_projected_for_finn_input_ranges_a_zero_point_file_lowers_within_its_widths(tmp_path):
    """`a2q project --input-ranges finn` sizes each layer for the codes q - z FINN's MVAU reads (INT9 for uint8
    with a zero point), so the lowered graph meets the recorded widths, `a2q verify` passes it, and its executed
    worst case stays inside them; projected for the exact codes, `lower` refuses by name and says to re-run
    `project --input-ranges finn`."""
    path = _ort_file(tmp_path, "residual_depthwise", "QUInt8")
    report = json.loads(run_a2q("analyze", str(path), "--input-ranges", "finn", "--json").stdout)
    widest = max(layer["bounds"]["exact"] for layer in report["layers"])
    target = widest - 2
    projected, lowered = tmp_path / "projected.onnx", tmp_path / "hw.onnx"
    for ranges, code in (("exact", 1), ("finn", 0)):
        done = run_a2q("project", str(path), str(projected), "--acc-bits", str(target), "--input-ranges", ranges)
        assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
        result = run_a2q("lower", str(projected), str(lowered), "--from-annotations")
        message = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == code, message[-2000:]
        if ranges == "exact":
            assert "--input-ranges finn" in message and "INT9" in message and not lowered.exists()
    assert "NOT equivalent" not in result.stdout and "equivalent" in result.stdout
    assert _assert_holds_worst_case(ModelWrapper(str(lowered)), target) == 3
    assert run_a2q("verify", str(lowered)).returncode == 0


def test_finn_build_steps_take_zero_points_and_name_the_requant_setting(tmp_path):
    """`step_a2q_finn_preparation` makes the zero-point quantizers thresholds, and with FINN's default
    `requant_bitwidth_threshold` (9), which would make the INT9 input thresholds a Requant layer clamping to all of
    INT9, it says which setting to use; with that setting FINN's own steps give a HW graph that computes what the
    file computes."""
    ensure_finn_importable()
    import finn.builder.build_dataflow_steps as steps
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    from a2q_passes.errors import A2QError
    from a2q_passes.finn_steps import step_a2q_finn_preparation, step_a2q_round_ties
    from a2q_passes.model_io import load_model

    source = load_model(_ort_file(tmp_path, "matmul_conv", "QUInt8"))
    cfg = DataflowBuildConfig(output_dir=str(tmp_path / "build"), synth_clk_period_ns=10.0, generate_outputs=[],
                              steps=[])
    with pytest.raises(A2QError, match="requant_bitwidth_threshold=10"):
        step_a2q_finn_preparation(ModelWrapper(source.model.SerializeToString()), cfg)
    cfg.requant_bitwidth_threshold = 10
    model = step_a2q_finn_preparation(ModelWrapper(source.model.SerializeToString()), cfg)
    assert partial_range_threshold_bits(model) == 9
    for step in (steps.step_qonnx_to_finn, steps.step_tidy_up, steps.step_streamline, steps.step_convert_to_hw,
                 step_a2q_round_ties):
        model = step(model, cfg)
    assert sum(n.op_type == "MVAU" for n in model.graph.node) == 2
    assert not [n for n in model.graph.node if n.op_type.startswith("Requant")]
    x = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32) * 3
    source = source.transform(InferShapes())
    for sample in x:
        ref = execute_onnx(source, {"x": sample[None]})["y"]
        got = execute_onnx(model, {model.graph.input[0].name: sample[None]})[model.graph.output[0].name]
        assert np.allclose(ref, got.reshape(ref.shape), atol=1e-4), np.abs(ref - got.reshape(ref.shape)).max()


@pytest.mark.parametrize("zero,bits,signed,narrow,relu", [
    (1, 8, 1, 1, None), (3, 8, 0, 0, None), (-5, 4, 1, 0, None), (3, 8, 0, 0, "before"), (-5, 4, 1, 0, "before"),
    (3, 8, 0, 0, "after"), (4, 4, 1, 1, "after")])
def test_a_qonnx_model_with_a_zero_point_is_projected_for_finn_and_lowered_within_its_widths(zero, bits, signed, narrow,
                                                                                           relu, tmp_path):
    """A QONNX activation quantizer with a zero point (narrow and signed ones too, with a Relu in front or behind) in
    front of a MatMul: `project --input-ranges finn` at one bit below its widest width passes its own certificate
    (which derives the codes q - z from qonnx's clamp, not from the reader), `lower --from-annotations` meets the
    width, and the lowered MVAU holds its executed worst case."""
    path, projected, lowered = tmp_path / "zp.onnx", tmp_path / "projected.onnx", tmp_path / "hw.onnx"
    _quant_model(0.05, zero, bits, signed, narrow, producer="Relu" if relu == "before" else None,
                 relu_after=relu == "after").save(str(path))
    report = json.loads(run_a2q("analyze", str(path), "--input-ranges", "finn", "--json").stdout)
    target = report["layers"][0]["bounds"]["exact"] - 1
    done = run_a2q("project", str(path), str(projected), "--acc-bits", str(target), "--input-ranges", "finn")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    result = run_a2q("lower", str(projected), str(lowered), "--from-annotations")
    assert result.returncode == 0 and "NOT equivalent" not in result.stdout, (result.stdout + result.stderr)[-2000:]
    assert _assert_holds_worst_case(ModelWrapper(str(lowered)), target) == 1


@pytest.mark.parametrize("weight_zero", [2.0, np.arange(-3, 5, dtype=np.float32).reshape(1, 8)])
def test_weights_with_a_zero_point_are_lowered_as_their_codes_less_it(weight_zero, tmp_path):
    """A 4-bit weight quantizer with a zero point per tensor or per output channel (Brevitas' ShiftedUint8 weights):
    `project --zero-point subtract --input-ranges finn` sizes the MatMul for the weights q - z, and `lower` gives
    FINN a zero-point-0 quantizer of the same values (FINN's FoldQuantWeights takes no other), so the MVAU holds
    q - z, meets the width and holds its executed worst case; the lowered graph computes what the file computes."""
    from a2q_passes.finn_zero_points import ZeroPointWeightsAsCodes

    model = _quant_model(0.05, 3, 8, 0, 0, weight_zero=weight_zero).transform(InferShapes())
    rewritten = ModelWrapper(model.model.SerializeToString()).transform(ZeroPointWeightsAsCodes())
    weights = next(n for n in rewritten.graph.node if n.name == "weight_quant")
    assert not np.any(rewritten.get_initializer(weights.input[2]))
    x = {"x": np.random.default_rng(1).normal(size=(1, 4, 256)).astype(np.float32) * 4}
    assert np.array_equal(execute_onnx(rewritten, x)["y"], execute_onnx(model, x)["y"])
    path, projected, lowered = tmp_path / "zp.onnx", tmp_path / "projected.onnx", tmp_path / "hw.onnx"
    model.save(str(path))
    options = ["--input-ranges", "finn", "--zero-point", "subtract"]
    report = json.loads(run_a2q("analyze", str(path), "--json", *options).stdout)
    target = report["layers"][0]["bounds"]["exact"] - 1
    done = run_a2q("project", str(path), str(projected), "--acc-bits", str(target), *options)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    result = run_a2q("lower", str(projected), str(lowered), "--from-annotations")
    assert result.returncode == 0 and "NOT equivalent" not in result.stdout, (result.stdout + result.stderr)[-2000:]
    assert _assert_holds_worst_case(ModelWrapper(str(lowered)), target) == 1
