"""Integer grids FINN's conversion and streamlining leave in front of MAC layers (issue 10, item 6).

MultiThreshold followed by scalar Add/Mul (codes out_scale * k + out_bias, bipolar from thresholds),
the ``(x + 1) / 2`` preprocessing of a BIPOLAR graph input, and qonnx ``Trunc``. Every case checks the
per-channel range against qonnx's execution of every vertex of the input box, the independent
certificate, and that ProjectToAccumulator at a tight width gives a model whose executed worst case fits.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes import bounds
from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import CannotCertify, certify_layer
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.test_verify import W_SCALE, _quant

Q = "qonnx.custom_op.general"
K, C = 4, 3
Q_W = np.array([[7, -8, 3], [-5, 6, 0], [2, 7, -8], [-1, -3, 5]])


def _model(nodes, inits, qonnx_opset: int = 1) -> ModelWrapper:
    qw, iw = _quant("qw", "w", W_SCALE, 0, 4, True)
    mm = helper.make_node("MatMul", [nodes[-1].output[0], "qw_out"], ["y"], name="mm")
    graph = helper.make_graph([*nodes, qw, mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [*inits, numpy_helper.from_array((Q_W * W_SCALE).astype(np.float32), "w"), *iw])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(Q, qonnx_opset)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return ModelWrapper(proto).transform(InferShapes())


def _const(name: str, value) -> object:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _executed(model: ModelWrapper, xs: list[float], x_scale: float) -> np.ndarray:
    """Executed accumulators (MAC output / both scales) for every input whose elements are each one of ``xs``."""
    out = []
    for vertex in itertools.product(xs, repeat=K):
        y = execute_onnx(model, {"x": np.array([vertex], dtype=np.float32)})["y"].astype(np.float64)
        acc = y / (x_scale * W_SCALE)
        assert np.allclose(acc, np.rint(acc), atol=1e-4)
        out.append(np.rint(acc).reshape(-1))
    return np.array(out, dtype=np.int64)


def _check(model: ModelWrapper, xs: list[float], x_scale: float, codes: tuple[int, int], dtype: str,
           input_dtypes: dict | None = None) -> None:
    report = analyze_model(model, per_channel=True, input_dtypes=input_dtypes).layers[0]
    assert report.status == "ok", report.status
    assert report.input_dtype == dtype
    executed = _executed(model, xs, x_scale)
    # exact: the reported per-channel range is what the box's vertices execute to
    assert report.per_channel["acc_min"] == executed.min(axis=0).tolist()
    assert report.per_channel["acc_max"] == executed.max(axis=0).tolist()
    cert = certify_layer(model, "mm", input_dtypes)
    assert cert.input_codes == codes
    assert list(cert.channel_min) == report.per_channel["acc_min"] and list(cert.channel_max) == report.per_channel["acc_max"]
    width = bounds.accumulator_width(min(cert.channel_min), max(cert.channel_max)) - 2
    projection = ProjectToAccumulator(width, input_dtypes=input_dtypes) if input_dtypes else ProjectToAccumulator(width)
    projected = model.transform(projection)
    after = _executed(projected, xs, x_scale)
    signed = projection.projections[0].acc_dtype_after.startswith("INT")
    lo, hi = bounds.accumulator_limits(width, signed=signed)
    assert lo <= after.min() and after.max() <= hi


def _status(model: ModelWrapper, input_dtypes: dict | None = None) -> str:
    return analyze_model(model, input_dtypes=input_dtypes).layers[0].status


def test_bipolar_from_thresholds_mul_then_add():
    """MultiThreshold (1 step) -> Mul(2) -> Add(-1): codes {-1, +1}."""
    nodes = [helper.make_node("MultiThreshold", ["x", "thr"], ["k"], domain=Q, out_dtype="BINARY"),
             helper.make_node("Mul", ["k", "two"], ["k2"]), helper.make_node("Add", ["k2", "minus1"], ["b"])]
    model = _model(nodes, [_const("thr", [[0.5]]), _const("two", 2.0), _const("minus1", -1.0)])
    _check(model, [0.0, 1.0], 1.0, (-1, 1), "BIPOLAR")


def test_bipolar_from_threshold_attributes():
    """out_scale 2, out_bias -1: out_bias / out_scale is no integer, yet the codes are {-1, +1}."""
    nodes = [helper.make_node("MultiThreshold", ["x", "thr"], ["b"], domain=Q, out_dtype="BIPOLAR",
                              out_scale=2.0, out_bias=-1.0)]
    _check(_model(nodes, [_const("thr", [[0.5]])]), [0.0, 1.0], 1.0, (-1, 1), "BIPOLAR")


def test_finn_signed_activation_add_then_mul_and_a_wrong_out_dtype():
    """ConvertQONNXtoFINN: MultiThreshold counting 0..3 (annotated INT2, which it does not hold) -> Add(-2) -> Mul(s)."""
    nodes = [helper.make_node("MultiThreshold", ["x", "thr"], ["k"], domain=Q, out_dtype="INT2"),
             helper.make_node("Add", ["k", "minus2"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["a"])]
    model = _model(nodes, [_const("thr", [[0.5, 1.5, 2.5]]), _const("minus2", -2.0), _const("scale", 0.5)])
    model.set_tensor_datatype("k", DataType["INT2"])
    _check(model, [0.0, 3.0], 0.5, (-2, 1), "INT2")


def test_half_step_offset_refines_the_grid():
    """codes 0..3 + 1.5: step halves, codes {3, 5, 7, 9} read as [3, 9] (the extremes are exact)."""
    nodes = [helper.make_node("MultiThreshold", ["x", "thr"], ["k"], domain=Q, out_dtype="UINT2"),
             helper.make_node("Add", ["half3", "k"], ["a"])]
    model = _model(nodes, [_const("thr", [[0.5, 1.5, 2.5]]), _const("half3", 1.5)])
    _check(model, [0.0, 3.0], 0.5, (3, 9), "UINT4")


def test_cybersecurity_preprocessing_of_a_bipolar_input():
    """FINN's cybersecurity example: (x + 1) / 2 on a BIPOLAR input gives {0, 1}."""
    nodes = [helper.make_node("Add", ["x", "one"], ["p"]), helper.make_node("Div", ["p", "two"], ["h"])]
    model = _model(nodes, [_const("one", 1.0), _const("two", 2.0)])
    model.set_tensor_datatype("x", DataType["BIPOLAR"])
    _check(model, [-1.0, 1.0], 1.0, (0, 1), "BINARY")
    # the same through --input-dtype, and Sub of a constant on an INT4 input
    plain = _model(nodes, [_const("one", 1.0), _const("two", 2.0)])
    _check(plain, [-1.0, 1.0], 1.0, (0, 1), "BINARY", input_dtypes={"x": "BIPOLAR"})
    sub = _model([helper.make_node("Sub", ["x", "three"], ["s"])], [_const("three", 3.0)])
    _check(sub, [-8.0, 7.0], 1.0, (-11, 4), "INT5", input_dtypes={"x": "INT4"})


def test_offsets_off_the_grid_are_refused_by_name():
    """0.3 would be fine (step 1/10); 0.1234567 is no whole number of up to 256 times finer steps."""
    nodes = [helper.make_node("MultiThreshold", ["x", "thr"], ["k"], domain=Q, out_dtype="UINT2"),
             helper.make_node("Add", ["k", "off"], ["a"], name="odd_add")]
    model = _model(nodes, [_const("thr", [[0.5, 1.5, 2.5]]), _const("off", 0.1234567)])
    assert "odd_add" in _status(model) and _status(model).startswith("input not quantized")
    with pytest.raises(CannotCertify, match="odd_add"):
        certify_layer(model, "mm")
    # per-channel offsets are not read (yet): refused
    per_channel = _model(nodes, [_const("thr", [[0.5, 1.5, 2.5]]), _const("off", [1.0, 2.0, 3.0, 4.0])])
    assert _status(per_channel).startswith("input not quantized")
    with pytest.raises(CannotCertify):
        certify_layer(per_channel, "mm")


def _trunc(out_bits: float, signed: int, rounding: str, zero: float = 0.0, inputs: int = 6):
    names = ["x", "t_scale", "t_zero", "t_in_bits", "t_out_scale", "t_out_bits"][:inputs]
    node = helper.make_node("Trunc", names, ["t"], domain=Q, name="trunc", rounding_mode=rounding, signed=signed)
    inits = [_const("t_scale", 0.25), _const("t_zero", zero), _const("t_in_bits", 8.0)]
    inits += [_const("t_out_scale", 1.0), _const("t_out_bits", out_bits)] if inputs == 6 else [_const("t_out_bits", out_bits)]
    return [node], inits


@pytest.mark.parametrize("out_bits,signed,rounding,codes,dtype", [
    (4, 1, "FLOOR", (-8, 7), "INT4"), (3, 0, "ROUND", (0, 7), "UINT3"), (2, 1, "CEIL", (-2, 1), "INT2")])
def test_trunc_v2_codes_are_its_clamp(out_bits, signed, rounding, codes, dtype):
    nodes, inits = _trunc(out_bits, signed, rounding)
    model = _model(nodes, inits, qonnx_opset=2)
    lo, hi = codes
    _check(model, [lo - 3.0, hi + 3.0], 1.0, codes, dtype)  # beyond both clamps: the extreme codes


def test_trunc_v1_and_uncertain_trunc_are_refused_by_name():
    nodes, inits = _trunc(4, 1, "FLOOR", inputs=5)
    v1 = _model(nodes, inits, qonnx_opset=1)  # qonnx runs Trunc v1: no clamp, codes follow the input
    assert "Trunc node 'trunc'" in _status(v1) and "v1" in _status(v1)
    with pytest.raises(CannotCertify, match="trunc"):
        certify_layer(v1, "mm")
    nodes, inits = _trunc(4, 1, "FLOOR")
    six_inputs_v1 = _model(nodes, inits)  # qonnx domain at opset 1: qonnx executes v1 on the 6 inputs
    assert "Trunc node 'trunc'" in _status(six_inputs_v1)
    with pytest.raises(CannotCertify, match="trunc"):
        certify_layer(six_inputs_v1, "mm")
    nodes, inits = _trunc(4, 1, "FLOOR", zero=1.0)  # output zero point 1 / 4: not an integer code
    half_zero = _model(nodes, inits, qonnx_opset=2)
    assert "Trunc node 'trunc'" in _status(half_zero)
    with pytest.raises(CannotCertify, match="trunc"):
        certify_layer(half_zero, "mm")


def test_im2col_of_a_rescaled_threshold_grid_matches_execution():
    """Found by the real-file corpus: FINN's streamlined residual CNN feeds MultiThreshold -> scalar Mul ->
    Im2Col (padded) -> MatMul; the Im2Col made the layer "not on an integer grid". It moves values and pads
    with real 0: every channel's range must equal the executed worst case (the oracle cuts the graph at the
    thresholds' float input and executes it with qonnx), in the reader, the certificate and after project."""
    from tests.fuzz.real_files import executed_range

    rng = np.random.default_rng(0)
    channels, k = 2, 3
    weights = rng.integers(-8, 8, size=(k * k * channels, 3)).astype(np.float32)
    thresholds = np.arange(15, dtype=np.float32).reshape(1, 15) - 7.0
    nodes = [helper.make_node("MultiThreshold", ["x", "t"], ["codes"], domain=Q, out_dtype="UINT4"),
             helper.make_node("Mul", ["codes", "half"], ["scaled"]),
             helper.make_node("Transpose", ["scaled"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Im2Col", ["nhwc"], ["cols"], domain=Q, stride=[1, 1], kernel_size=[k, k],
                              pad_amount=[1, 1, 1, 1], input_shape="(1,4,4,2)"),
             helper.make_node("MatMul", ["cols", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_const("t", thresholds), _const("half", 0.5), _const("w", weights)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(Q, 1)])
    model = ModelWrapper(proto).transform(InferShapes())
    model.set_tensor_datatype("w", DataType["INT4"])  # FINN's integer weights carry their type
    model.set_tensor_datatype("nhwc", DataType["FLOAT32"])  # as FINN annotates it (qonnx's Im2Col reads it)
    report = analyze_model(model, per_channel=True).layers[0]
    assert report.status == "ok", report.status
    executed = executed_range(model, "mm")
    assert report.per_channel["acc_min"] == executed.acc_min.tolist()
    assert report.per_channel["acc_max"] == executed.acc_max.tolist()
    cert = certify_layer(model, "mm")
    assert list(cert.channel_min) == executed.acc_min.tolist() and list(cert.channel_max) == executed.acc_max.tolist()
    width = bounds.accumulator_width(executed.lo, executed.hi) - 2
    projected = model.transform(ProjectToAccumulator(width))
    after = executed_range(projected, "mm")
    assert bounds.accumulator_width(after.lo, after.hi) <= width
