"""Regression tests for the soundness root causes of issue 9.

Every test builds a small QONNX model, asks the project for an accumulator range (analyze)
or a projected model (project), and then EXECUTES the worst-case inputs with qonnx's own
``execute_onnx``: the inputs are every vertex of the input-code box (a linear form reaches
its extremes there), and the integer weights come from executing the graph's own weight
quantizer, never from the project's readers.
"""

from __future__ import annotations

import itertools
import json

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
from a2q_passes.errors import A2QError
from a2q_passes.finetune.selection import select_layers
from a2q_passes.metadata import recorded_widths
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.test_verify import QONNX_DOMAIN, W_SCALE, X_SCALE, _model, _quant

# --------------------------------------------------------------------------- execution helpers


def box_vertices(lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    """Every input whose codes are all ``lo`` or ``hi``: shape ``(2^n, *shape)``."""
    n = int(np.prod(shape))
    return np.array(list(itertools.product((lo, hi), repeat=n)), dtype=np.float64).reshape(-1, *shape)


def executed_accumulators(model: ModelWrapper, codes: np.ndarray, zero_point: int, convention: str,
                          x_scale: float = X_SCALE, weights: str = "qw_out", w_scale: float = W_SCALE,
                          mac_axis: int = -1) -> np.ndarray:
    """The integer accumulator of the model's MAC output for input ``codes``, from qonnx's execution.

    The input is fed as the real values ``(code - zero_point) * x_scale`` that the input Quant
    maps back to ``codes``. The executed MAC output divided by both scales is
    ``sum q (code - zero_point)`` with padded taps counting 0: the ``subtract`` accumulator.
    Under ``fold`` the MAC sees the raw codes and every padded tap the code of real 0 (the
    zero point), so the fold accumulator adds ``zero_point * sum q`` over the channel's taps.
    ``mac_axis`` is the output channel axis; the weights ``weights`` are executed too.
    """
    x = ((codes - zero_point) * x_scale).astype(np.float32)
    context = execute_onnx(model, {"x": x}, return_full_exec_context=True)
    y = context[model.graph.output[0].name].astype(np.float64) / (x_scale * w_scale)
    acc = np.rint(y)
    assert np.allclose(y, acc, atol=1e-6), "the executed MAC output is not on the integer grid"
    if convention == "fold" and zero_point:
        q = np.rint(context[weights].astype(np.float64) / w_scale)
        # MatMul weights are (K, C): sum over K; Conv weights (C, ...): sum over all but C
        per_channel = q.sum(axis=0) if mac_axis == -1 else q.reshape(q.shape[0], -1).sum(axis=1)
        shape = [1] * acc.ndim
        shape[mac_axis] = per_channel.size
        acc = acc + zero_point * per_channel.reshape(shape)
    return acc.astype(np.int64)


def assert_range_holds(report, executed: np.ndarray, mac_axis: int = -1) -> None:
    """Each channel's reported range (``per_channel=True``) contains every executed accumulator of it."""
    assert report.status == "ok", report.status
    per_channel = np.moveaxis(executed, mac_axis, 0).reshape(executed.shape[mac_axis], -1)
    lo, hi = per_channel.min(axis=1).tolist(), per_channel.max(axis=1).tolist()
    reported = list(zip(report.per_channel["acc_min"], report.per_channel["acc_max"]))
    assert all(r_lo <= e_lo and e_hi <= r_hi for (r_lo, r_hi), e_lo, e_hi in zip(reported, lo, hi)), (
        f"reported per channel {reported}, executed {list(zip(lo, hi))}")


def assert_fits(executed: np.ndarray, acc_bits: int, acc_dtype: str) -> None:
    """Every executed accumulator fits ``acc_bits`` bits with the signedness of the promised ``acc_dtype``."""
    signed = acc_dtype.startswith("INT")
    assert int(acc_dtype[3 if signed else 4:]) <= acc_bits
    lo, hi = bounds.accumulator_limits(acc_bits, signed=signed)
    assert lo <= int(executed.min()) and int(executed.max()) <= hi, (
        f"executed [{executed.min()}, {executed.max()}] overflows {acc_dtype} at P={acc_bits}")


def qonnx_model(nodes, inits, input_shape, output: str) -> ModelWrapper:
    """``tests.test_verify._model`` plus the qonnx opset import that onnx.checker (project's ensures) needs."""
    model = _model(nodes, inits, input_shape, output)
    model.model.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    return model


def matmul_model(w: np.ndarray, in_bits: float, in_signed: bool, zero_point: float, batch: int,
                 w_bits: float = 4, w_signed: bool = True, x_scale: float = X_SCALE, relu: bool = False) -> ModelWrapper:
    """x -> Quant -> [Relu] -> MatMul(Quant(w)): float weights ``w`` of shape (K, C), per-channel scale."""
    weights = numpy_helper.from_array(np.asarray(w, dtype=np.float32), "w")
    qx, ix = _quant("qx", "x", x_scale, zero_point, in_bits, in_signed)
    qw, iw = _quant("qw", "w", np.full((1, w.shape[1]), W_SCALE), 0, w_bits, w_signed)
    nodes = [qx, qw]
    act = "qx_out"
    if relu:
        nodes.append(helper.make_node("Relu", ["qx_out"], ["relu_out"], name="relu"))
        act = "relu_out"
    nodes.append(helper.make_node("MatMul", [act, "qw_out"], ["y"], name="mm"))
    return qonnx_model(nodes, [weights, *ix, *iw], [batch, w.shape[0]], "y")


# --------------------------------------------------------------------------- root cause 5


@pytest.mark.parametrize("convention,zero_point,relu", [("fold", 5, True), ("subtract", -3, False)])
def test_channel_entirely_below_zero_is_analysed_and_projected(convention, zero_point, relu):
    # UINT4 codes whose accumulator view lies above 0: fold codes behind a Relu with zero point 5 are
    # [5, 15]; subtracting the zero point -3 gives [3, 18]. Channel 0 has only negative weights, so
    # its whole accumulator range lies below 0 (this crashed accumulator_width).
    q = np.array([[-3, 2], [-2, -1], [-1, 3]])
    codes = box_vertices(max(zero_point, 0) if relu else 0, 15, (3,))
    model = matmul_model(q * W_SCALE, 4, False, zero_point, len(codes), relu=relu)
    report = analyze_model(model, zero_point=convention, per_channel=True).layers[0]
    executed = executed_accumulators(model, codes, zero_point, convention)
    assert_range_holds(report, executed)
    assert report.per_channel["acc_max"][0] < 0 and report.per_channel["acc_max"][0] == executed[:, 0].max()
    projection = ProjectToAccumulator(6, zero_point=convention)
    projected = model.transform(projection)
    after = executed_accumulators(projected, codes, zero_point, convention)
    assert_fits(after, 6, projection.projections[0].acc_dtype_after)


# --------------------------------------------------------------------------- root cause 1


def test_one_bit_signed_quant_weights_are_bipolar_and_never_shrunk():
    # qonnx executes a 1-bit signed Quant as sign(w / s) with 0 -> +1: the zeros and tiny weights are +1
    w = np.array([[0.0, -0.1, 0.3], [0.0, 0.0, -0.2], [0.01, -0.3, 0.0], [-0.02, 0.0, 0.0], [0.0, 0.2, 0.0]])
    codes = box_vertices(0, 15, (5,))
    model = matmul_model(w, 4, False, 0, len(codes), w_bits=1)
    report = analyze_model(model, per_channel=True).layers[0]
    assert report.weight_dtype == "BIPOLAR"
    executed = executed_accumulators(model, codes, 0, "fold")
    assert_range_holds(report, executed)
    assert (report.acc_min, report.acc_max) == (int(executed.min()), int(executed.max()))  # exact, not just safe
    needed = report.bounds["exact"]
    with pytest.raises(A2QError, match=rf"'mm' needs at least {needed} bits \(bipolar weights.*--layer mm={needed}"):
        model.transform(ProjectToAccumulator(needed - 1))
    projection = ProjectToAccumulator(needed)
    projected = model.transform(projection)
    assert projection.projections[0].status == "unchanged"  # fits as it stands: promised and recorded
    assert recorded_widths(projected) == {"mm": needed}
    assert_fits(executed_accumulators(projected, codes, 0, "fold"), needed, projection.projections[0].acc_dtype_after)


def finn_bipolar_model(w: np.ndarray, batch: int) -> ModelWrapper:
    """x -> Quant (UINT4) -> MatMul with an initializer annotated BIPOLAR, as FINN's conversion leaves it."""
    qx, ix = _quant("qx", "x", X_SCALE, 0, 4, False)
    mm = helper.make_node("MatMul", ["qx_out", "w"], ["y"], name="mm")
    model = qonnx_model([qx, mm], [numpy_helper.from_array(w.astype(np.float32), "w"), *ix], [batch, w.shape[0]], "y")
    model.set_tensor_datatype("w", DataType["BIPOLAR"])
    return model


def test_finn_bipolar_initializer_is_refused_for_shrinking_and_checked_for_zeros():
    w = np.array([[1, -1], [1, 1], [-1, 1], [1, -1]])
    codes = box_vertices(0, 15, (4,))
    model = finn_bipolar_model(w, len(codes))
    report = analyze_model(model, per_channel=True).layers[0]
    executed = executed_accumulators(model, codes, 0, "fold", weights="w", w_scale=1.0)
    assert_range_holds(report, executed)
    # before the fix, project wrote zeros into the BIPOLAR tensor (whole layers zeroed)
    with pytest.raises(A2QError, match="'mm' needs at least .* bits \\(bipolar weights"):
        model.transform(ProjectToAccumulator(report.bounds["exact"] - 1))
    # a BIPOLAR annotation on a tensor that holds a 0 does not describe what executes: refused, named
    w_zero = w.copy()
    w_zero[0, 0] = 0
    status = analyze_model(finn_bipolar_model(w_zero, 1)).layers[0].status
    assert status.startswith("unsupported") and "'w' is annotated BIPOLAR" in status and "zeros" in status


def test_finetune_does_not_select_bipolar_layers():
    model = matmul_model(np.ones((3, 2)) * W_SCALE, 4, False, 0, 1, w_bits=1)
    with pytest.raises(A2QError, match="'?mm'?.*bipolar weights"):
        select_layers(model, 8)  # a feasible width: only the bipolar weights stop it


# --------------------------------------------------------------------------- root cause 2


def conv_model(q: np.ndarray, zero_point: float, batch: int, hw: tuple[int, int], **conv_attrs) -> ModelWrapper:
    """x -> Quant (UINT4, zero point) -> Conv(Quant(W)) with integer weights ``q`` (C, Cin, kh, kw)."""
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qx, ix = _quant("qx", "x", X_SCALE, zero_point, 4, False)
    qw, iw = _quant("qw", "w", np.full((q.shape[0], 1, 1, 1), W_SCALE), 0, 4, True)
    conv = helper.make_node("Conv", ["qx_out", "qw_out"], ["y"], name="conv", kernel_shape=list(q.shape[2:]),
                            **conv_attrs)
    return qonnx_model([qx, qw, conv], [weights, *ix, *iw], [batch, q.shape[1], *hw], "y")


@pytest.mark.parametrize("convention", ["fold", "subtract"])
@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=["pads", "auto_pad"])
def test_padded_conv_counts_the_code_of_real_zero(convention, padding):
    # UINT4 codes 0..15 with zero point 30: real 0, which the padding writes, is code 30 under fold
    # (0 under subtract, where the codes are -30..-15): outside the quantizer's codes either way
    q = np.stack([np.full((1, 3, 3), 3), np.array([[[2, -1, 3], [-4, 5, -2], [1, 1, -3]]])])
    codes = box_vertices(0, 15, (1, 2, 2))
    model = conv_model(q, 30, len(codes), (2, 2), **padding)
    report = analyze_model(model, zero_point=convention, per_channel=True).layers[0]
    executed = executed_accumulators(model, codes, 30, convention, mac_axis=1)
    assert_range_holds(report, executed, mac_axis=1)
    target = report.bounds["exact"] - 2
    projection = ProjectToAccumulator(target, zero_point=convention)
    projected = model.transform(projection)
    after = executed_accumulators(projected, codes, 30, convention, mac_axis=1)
    assert_fits(after, target, projection.projections[0].acc_dtype_after)


def padded_model(pad: "helper.NodeProto", q: np.ndarray, batch: int, opset: int, inits=()) -> ModelWrapper:
    """x -> Quant (UINT4, zero point 0) -> ``pad`` ('qx_out' -> 'padded') -> Conv(Quant(w)), at ``opset``."""
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qx, ix = _quant("qx", "x", X_SCALE, 0, 4, False)
    qw, iw = _quant("qw", "w", np.full((q.shape[0], 1, 1, 1), W_SCALE), 0, 4, True)
    conv = helper.make_node("Conv", ["padded", "qw_out"], ["y"], name="conv", kernel_shape=list(q.shape[2:]))
    graph = helper.make_graph([qx, pad, qw, conv], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, q.shape[1], 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weights, *ix, *iw, *inits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX_DOMAIN, 1)])
    return ModelWrapper(proto).transform(InferShapes())


@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_a_pad_repeating_its_input_keeps_the_grid(mode):
    q = np.stack([np.full((1, 3, 3), 3), np.array([[[2, -1, 3], [-4, 5, -2], [1, 1, -3]]])])
    codes = box_vertices(0, 15, (1, 2, 2))
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")
    model = padded_model(helper.make_node("Pad", ["qx_out", "pads"], ["padded"], name="pad", mode=mode), q,
                         len(codes), 13, [pads])
    report = analyze_model(model, per_channel=True).layers[0]
    assert_range_holds(report, executed_accumulators(model, codes, 0, "fold", mac_axis=1), mac_axis=1)


def test_an_opset_10_pad_value_attribute_is_read():
    # before opset 11 Pad takes its value as an attribute: padding with real 100 (code 200) was read as zero padding,
    # a range far below the executed one; such a pad value is off the grid's codes and is refused by name
    q = np.stack([np.full((1, 3, 3), 3), np.array([[[2, -1, 3], [-4, 5, -2], [1, 1, -3]]])])
    codes = box_vertices(0, 15, (1, 2, 2))
    for value, readable in ((100.0, False), (0.0, True)):
        pad = helper.make_node("Pad", ["qx_out"], ["padded"], name="pad", mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1],
                               value=value)
        model = padded_model(pad, q, len(codes), 10)
        report = analyze_model(model, per_channel=True).layers[0]
        if readable:
            assert_range_holds(report, executed_accumulators(model, codes, 0, "fold", mac_axis=1), mac_axis=1)
        else:
            assert report.status != "ok" and "100.0" in report.status, report.status


@pytest.mark.parametrize("value", [0.0, 50.0])
def test_a_resize_cropping_outside_its_input_counts_the_extrapolation_value(value):
    # Resize in tf_crop_and_resize mode writes extrapolation_value where the crop box leaves the input, as padding
    # does: 50 (code 100 past the UINT4 codes) was read as the input's grid, a range far below the executed one
    q = np.stack([np.full((1, 3, 3), 3), np.array([[[2, -1, 3], [-4, 5, -2], [1, 1, -3]]])])
    codes = box_vertices(0, 15, (1, 2, 2))
    inits = [numpy_helper.from_array(np.array([0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5], np.float32), "roi"),
             numpy_helper.from_array(np.array([len(codes), 1, 4, 4], np.int64), "sizes")]
    resize = helper.make_node("Resize", ["qx_out", "roi", "", "sizes"], ["padded"], name="crop", mode="nearest",
                              coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=value)
    model = padded_model(resize, q, len(codes), 13, inits)
    executed = executed_accumulators(model, codes, 0, "fold", mac_axis=1)
    report = analyze_model(model, per_channel=True).layers[0]
    if value:
        assert report.status != "ok" and "extrapolation_value 50.0" in report.status, report.status
    else:
        assert_range_holds(report, executed, mac_axis=1)
    # the certificate, reading the graph on its own, covers the executed accumulators either way
    cert = certify_layer(model, "conv")
    per_channel = np.moveaxis(executed, 1, 0).reshape(2, -1)
    assert np.all(cert.channel_min <= per_channel.min(axis=1)) and np.all(per_channel.max(axis=1) <= cert.channel_max)
    assert int(per_channel.max()) > 15 * 3 * 9 or not value  # the extrapolated code 100 was executed


def test_conv_transpose_border_pixels_count_the_code_of_real_zero():
    # border output pixels of a ConvTranspose sum fewer input pixels than a full row of taps: the absent
    # ones are real 0, code 0 under subtract, outside the codes -30..-15 of UINT4 with zero point 30
    q = np.array([[[[2, -1, 3], [1, 2, -2], [3, 1, 1]], [[-3, 2, 1], [1, -1, 2], [2, 2, -1]]]])  # (Cin, Cout, kh, kw)
    codes = box_vertices(0, 15, (1, 2, 3))
    qx, ix = _quant("qx", "x", X_SCALE, 30, 4, False)
    qw, iw = _quant("qw", "w", np.full((1, 2, 1, 1), W_SCALE), 0, 4, True)
    ct = helper.make_node("ConvTranspose", ["qx_out", "qw_out"], ["y"], name="ct", kernel_shape=[3, 3], strides=[2, 2])
    model = qonnx_model([qx, qw, ct], [numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w"), *ix, *iw],
                        [len(codes), 1, 2, 3], "y")
    report = analyze_model(model, zero_point="subtract", per_channel=True).layers[0]
    assert_range_holds(report, executed_accumulators(model, codes, 30, "subtract", mac_axis=1), mac_axis=1)
    # under fold a missing tap is neither the zero-point code (as a pad) nor nothing: refused, not guessed
    folded = analyze_model(model, zero_point="fold").layers[0]
    assert folded.status.startswith("unsupported") and "--zero-point subtract" in folded.status
    with pytest.raises(A2QError, match=r"'ct'.*--skip ct"):
        model.transform(ProjectToAccumulator(report.bounds["exact"]))


@pytest.mark.parametrize("zp_shape", [(), (1, 2, 1, 1)], ids=["per_tensor", "per_output_channel"])
def test_conv_transpose_with_a_weight_zero_point_projects_within_p(zp_shape):
    """A ConvTranspose whose weights carry a zero point (Brevitas' Shifted weight quantizers), per tensor or per
    output channel (axis 1 of its [C_in, C_out, k, k] weights), under subtract: each of its rows (one per output
    channel and stride phase, the phases of a 3 x 3 kernel at stride 2 holding 4, 2, 2 and 1 taps) holds one zero
    point, so project takes it (before, every ConvTranspose with a weight zero point was refused as if the zero point
    varied along its rows), and every input's executed accumulator of the result fits the target. A zero point per
    input channel does vary along the rows and is refused by name."""
    rng = np.random.default_rng(len(zp_shape))
    codes_w = rng.integers(0, 16, size=(1, 2, 3, 3))
    zero = np.full(zp_shape, 8.0) if not zp_shape else np.array([7.0, 9.0]).reshape(zp_shape)
    codes = box_vertices(0, 15, (1, 2, 3))
    qx, ix = _quant("qx", "x", X_SCALE, 0, 4, False)
    qw, iw = _quant("qw", "w", W_SCALE, zero, 4, False)
    ct = helper.make_node("ConvTranspose", ["qx_out", "qw_out"], ["y"], name="ct", kernel_shape=[3, 3], strides=[2, 2])
    weights = numpy_helper.from_array(((codes_w - zero) * W_SCALE).astype(np.float32), "w")
    model = qonnx_model([qx, qw, ct], [weights, *ix, *iw], [len(codes), 1, 2, 3], "y")
    report = analyze_model(model, zero_point="subtract", per_channel=True).layers[0]
    assert_range_holds(report, executed_accumulators(model, codes, 0, "subtract", mac_axis=1), mac_axis=1)
    target = report.bounds["exact"] - 2
    projection = ProjectToAccumulator(target, zero_point="subtract")
    projected = model.transform(projection)
    after = executed_accumulators(projected, codes, 0, "subtract", mac_axis=1)
    assert_fits(after, target, projection.projections[0].acc_dtype_after)
    assert int(np.abs(after).max()) < int(np.abs(executed_accumulators(model, codes, 0, "subtract", mac_axis=1)).max())
    per_input = qonnx_model([qx, qw, ct], [numpy_helper.from_array(np.zeros((2, 2, 3, 3), np.float32), "w"), *ix,
                                           *_quant("qw", "w", W_SCALE, np.array([7.0, 9.0]).reshape(2, 1, 1, 1), 4,
                                                   False)[1]], [1, 2, 2, 3], "y")
    with pytest.raises(A2QError, match="varies along its accumulation axis"):
        per_input.transform(ProjectToAccumulator(target, zero_point="subtract"))


# --------------------------------------------------------------------------- root cause 3


def set_rounding_mode(model: ModelWrapper, node_name: str, mode: str) -> None:
    node = model.get_node_from_name(node_name)
    next(a for a in node.attribute if a.name == "rounding_mode").s = mode.encode()


@pytest.mark.parametrize("bits,signed,mode", [(4.5, False, "ROUND"), (4.5, True, "CEIL"), (2.5, True, "FLOOR")])
def test_non_integer_activation_bit_width_is_read_as_qonnx_clamps_it(bits, signed, mode):
    # inputs far outside the grid: qonnx's own clamp (to 2^(bits-1) etc., then rounding) picks the extreme codes
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    x_codes = box_vertices(-1000, 1000, (3,))
    model = matmul_model(q * W_SCALE, bits, signed, 0, len(x_codes))
    set_rounding_mode(model, "qx", mode)
    report = analyze_model(model, per_channel=True).layers[0]
    executed = executed_accumulators(model, x_codes, 0, "fold")
    assert_range_holds(report, executed)
    assert (report.acc_min, report.acc_max) == (int(executed.min()), int(executed.max()))
    projection = ProjectToAccumulator(report.bounds["exact"] - 1)
    projected = model.transform(projection)
    assert_fits(executed_accumulators(projected, x_codes, 0, "fold"), report.bounds["exact"] - 1,
                projection.projections[0].acc_dtype_after)


@pytest.mark.parametrize("w_bits", [0, -1, 2.5])
def test_weight_bit_width_below_one_or_fractional_is_refused_by_name(w_bits):
    model = matmul_model(np.ones((3, 2)) * W_SCALE, 4, False, 0, 1, w_bits=w_bits)
    status = analyze_model(model).layers[0].status
    assert status.startswith("unsupported") and "'qw'" in status and f"bit width {float(w_bits)}" in status


def test_activation_bit_width_below_one_is_refused_by_name():
    model = matmul_model(np.ones((3, 2)) * W_SCALE, 0, False, 0, 1)
    status = analyze_model(model).layers[0].status
    assert status.startswith("input not quantized") and "'qx'" in status and "bit width 0.0" in status


# --------------------------------------------------------------------------- root cause 4


@pytest.mark.parametrize("convention,zero_point", [("fold", 0), ("fold", 2), ("subtract", 2)])
def test_relu_after_a_negative_activation_scale_keeps_the_codes_below_the_zero_point(convention, zero_point):
    # real = (code - z) * (-0.5) >= 0 exactly for codes <= z: the Relu keeps INT4 codes [-8, z], not [z, 7]
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    x_codes = box_vertices(-1000, 1000, (3,))
    model = matmul_model(q * W_SCALE, 4, True, zero_point, len(x_codes), x_scale=-X_SCALE, relu=True)
    report = analyze_model(model, zero_point=convention, per_channel=True).layers[0]
    executed = executed_accumulators(model, x_codes, zero_point, convention, x_scale=-X_SCALE)
    assert_range_holds(report, executed)
    assert (report.acc_min, report.acc_max) == (int(executed.min()), int(executed.max()))
    target = report.bounds["exact"] - 1
    projection = ProjectToAccumulator(target, zero_point=convention)
    projected = model.transform(projection)
    after = executed_accumulators(projected, x_codes, zero_point, convention, x_scale=-X_SCALE)
    assert_fits(after, target, projection.projections[0].acc_dtype_after)


@pytest.mark.parametrize("annotated,dtype", [("qx_out", "UINT2"), ("relu_out", "UINT2"), ("qx_out", "BINARY"),
                                             ("relu_out", "INT2")])
def test_an_annotation_narrower_than_the_quantizers_codes_does_not_narrow_the_range(annotated, dtype):
    # a unit-scale quantizer's codes [0, 15] under a narrower DataType: qonnx's executor rounds values to an annotated
    # type but never clamps them, so the codes that execute are the quantizer's, whatever the annotation says
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    x_codes = box_vertices(0, 15, (3,))
    model = matmul_model(q * W_SCALE, 4, False, 0, len(x_codes), x_scale=1.0, relu=True)
    model.set_tensor_datatype(annotated, DataType[dtype])
    report = analyze_model(model, per_channel=True).layers[0]
    executed = executed_accumulators(model, x_codes, 0, "fold", x_scale=1.0)
    assert_range_holds(report, executed)
    target = report.bounds["exact"] - 1
    projection = ProjectToAccumulator(target)
    projected = model.transform(projection)
    assert_fits(executed_accumulators(projected, x_codes, 0, "fold", x_scale=1.0), target,
                projection.projections[0].acc_dtype_after)


def _between_quant_and_matmul(model: ModelWrapper, node: "helper.NodeProto", inits=()) -> ModelWrapper:
    """``model`` (:func:`matmul_model`) with ``node`` (reading 'qx_out', writing 'between') in front of its MatMul."""
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    mm.input[0] = "between"
    model.graph.node.insert(list(model.graph.node).index(mm), node)
    model.graph.initializer.extend(inits)
    return model.transform(InferShapes())


def test_a_negative_rescaling_keeps_the_codes_whatever_its_output_annotation():
    # qonnx's ExtractQuantScaleZeroPt moves a negative activation scale into a Mul behind a unit-scale Quant: the
    # reader refused such a Mul, fell back on the UINT2 annotation of its output and reported a range a fifth of
    # the executed one (the certificate, reading the Mul, stopped annotate/project/verify)
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    x_codes = box_vertices(0, 15, (3,))
    model = matmul_model(q * W_SCALE, 4, False, 0, len(x_codes), x_scale=1.0)
    model = _between_quant_and_matmul(model, helper.make_node("Mul", ["qx_out", "minus_one"], ["between"], name="neg"),
                                      [numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one")])
    model.set_tensor_datatype("between", DataType["UINT2"])
    report = analyze_model(model, per_channel=True).layers[0]
    # the Quant reads the codes themselves (scale 1); the MatMul their negatives times the weights' scale
    y = execute_onnx(model, {"x": x_codes.astype(np.float32)})["y"].astype(np.float64) / (-1.0 * W_SCALE)
    assert np.array_equal(y, np.rint(y)) and y.min() < -15
    assert_range_holds(report, np.rint(y).astype(np.int64))
    cert = certify_layer(model, "mm")
    assert list(cert.channel_min) == report.per_channel["acc_min"] and list(cert.channel_max) == report.per_channel["acc_max"]


def test_an_integer_annotation_on_a_float_op_is_not_read():
    # qonnx executes a Softmax as it is: an integer DataType on its output states nothing the executor enforces
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    model = matmul_model(q * W_SCALE, 4, False, 0, 1, x_scale=1.0)
    model = _between_quant_and_matmul(model, helper.make_node("Softmax", ["qx_out"], ["between"], name="soft"))
    model.set_tensor_datatype("between", DataType["UINT8"])
    (report,) = analyze_model(model).layers
    assert report.status != "ok" and "UINT8 annotation is not read" in report.status, report.status
    with pytest.raises(CannotCertify, match="soft"):
        certify_layer(model, "mm")


# --------------------------------------------------------------------------- root cause 6


def test_dequantize_linear_without_zero_point_reads_the_type_of_its_input():
    # int8 codes into DequantizeLinear without a zero point: ONNX takes the type from x (int8, [-128, 127]),
    # the reader used to assume uint8 ([0, 255])
    q = np.array([[3, -2], [-1, 5], [2, 2]])
    codes = box_vertices(-128, 127, (3,)).astype(np.int8)
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qw, iw = _quant("qw", "w", np.full((1, 2), W_SCALE), 0, 4, True)
    dq = helper.make_node("DequantizeLinear", ["xq", "sx"], ["xf"], name="dq")
    mm = helper.make_node("MatMul", ["xf", "qw_out"], ["y"], name="mm")
    graph = helper.make_graph([dq, qw, mm], "g", [helper.make_tensor_value_info("xq", TensorProto.INT8, list(codes.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weights, numpy_helper.from_array(np.float32(X_SCALE), "sx"), *iw])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    proto.ir_version = 10
    model = ModelWrapper(proto).transform(InferShapes())

    def executed(m: ModelWrapper) -> np.ndarray:
        y = execute_onnx(m, {"xq": codes})["y"].astype(np.float64) / (X_SCALE * W_SCALE)
        return np.rint(y).astype(np.int64)

    report = analyze_model(model, per_channel=True).layers[0]
    assert report.input_range == [-128, 127]
    assert_range_holds(report, executed(model))
    assert (report.acc_min, report.acc_max) == (int(executed(model).min()), int(executed(model).max()))
    projection = ProjectToAccumulator(report.bounds["exact"] - 2)
    projected = model.transform(projection)
    assert_fits(executed(projected), report.bounds["exact"] - 2, projection.projections[0].acc_dtype_after)


# --------------------------------------------------------------------------- root cause 7


def two_layer_model(unreadable: str, batch: int) -> ModelWrapper:
    """x -> Quant -> mm1 (readable) -> Quant -> mm2, which project cannot read for reason ``unreadable``.

    The first graph output is mm1's accumulator view ``h`` (so the executed worst case is read there).
    """
    q1, q2 = np.array([[3, -2], [-1, 5], [2, 2]]), np.array([[1, -1], [2, 1]])
    qx, ix = _quant("qx", "x", X_SCALE, 0, 4, False)
    qw, iw = _quant("qw", "w1", np.full((1, 2), W_SCALE), 0, 4, True)
    qa, ia = _quant("qa", "h", 1.0, 0, 4, False)
    # a non-integer weight zero point: no integer weights at all (an integer one is read, as DequantizeLinear's)
    qw2, iw2 = _quant("qw2", "w2", np.full((1, 2), W_SCALE), 0.5 if unreadable == "zero point" else 0, 4, True)
    nodes = [qx, qw, helper.make_node("MatMul", ["qx_out", "qw_out"], ["h"], name="mm1"), qa, qw2]
    if unreadable == "transA":
        nodes += [helper.make_node("Transpose", ["qa_out"], ["qa_t"], name="t", perm=[1, 0]),
                  helper.make_node("Gemm", ["qa_t", "qw2_out"], ["y"], name="mm2", transA=1)]
    else:
        nodes.append(helper.make_node("MatMul", ["qa_out", "qw2_out"], ["y"], name="mm2"))
    inits = [numpy_helper.from_array((q1 * W_SCALE).astype(np.float32), "w1"),
             numpy_helper.from_array((q2 * W_SCALE).astype(np.float32), "w2"), *ix, *iw, *ia, *iw2]
    model = qonnx_model(nodes, inits, [batch, 3], "y")
    h = model.get_tensor_valueinfo("h")  # shape-inferred: move it from value_info to the outputs
    model.graph.value_info.remove(h)
    model.graph.output.insert(0, h)
    return model


@pytest.mark.parametrize("unreadable,reason", [("zero point", "zero point"), ("transA", "transposed")])
def test_project_refuses_quantized_layers_it_cannot_read_unless_skipped(tmp_path, a2q, unreadable, reason):
    codes = box_vertices(0, 15, (3,))
    model = two_layer_model(unreadable, len(codes))
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model.save(str(path))
    before = path.read_bytes()
    refused = a2q("project", path, out, "--acc-bits", "7")
    assert refused.returncode == 1 and not out.exists() and path.read_bytes() == before
    assert "'mm2'" in refused.stderr and reason in refused.stderr and "--skip mm2" in refused.stderr
    assert "'mm1'" not in refused.stderr  # only the unreadable layer is named
    assert a2q("project", path, out, "--acc-bits", "7", "--skip", "nosuch").returncode == 1 and not out.exists()
    done = a2q("project", path, out, "--acc-bits", "7", "--skip", "mm2", "--json")
    assert done.returncode == 0, done.stderr
    layers = {layer["node"]: layer for layer in json.loads(done.stdout)["layers"]}
    assert layers["mm2"]["status"].startswith("skipped: --skip") and layers["mm2"]["target_bits"] is None
    projected = ModelWrapper(str(out))
    assert_fits(executed_accumulators(projected, codes, 0, "fold", weights="qw_out"), 7, layers["mm1"]["acc_dtype_after"])


def test_finetune_refuses_quantized_layers_it_cannot_train_unless_skipped():
    # fine-tuning to a global P promises every quantized MAC layer too: mm2 (weight zero point) cannot be trained
    model = two_layer_model("zero point", 1)
    with pytest.raises(A2QError, match=r"'mm2' \(.*zero point.*--skip mm2"):
        select_layers(model, 7, skip=frozenset())
    with pytest.raises(A2QError, match="--skip nosuch: no MAC layer named 'nosuch'"):
        select_layers(model, 7, skip=frozenset({"nosuch"}))
    selection = select_layers(model, 7, skip=frozenset({"mm2"}))
    assert [layer.node for layer in selection.layers] == ["mm1"] and "mm2" in selection.skipped


def test_finn_project_step_refuses_unreadable_layers_unless_cfg_skips_them():
    from types import SimpleNamespace

    from a2q_passes.finn_steps import step_a2q_project

    codes = box_vertices(0, 15, (3,))
    model = two_layer_model("zero point", len(codes))
    with pytest.raises(A2QError, match="--skip mm2"):
        step_a2q_project(model, SimpleNamespace(a2q_acc_bits=7))
    projected = step_a2q_project(model, SimpleNamespace(a2q_acc_bits=7, a2q_skip=["mm2"]))
    assert_fits(executed_accumulators(projected, codes, 0, "fold", weights="qw_out"), 7, "INT7")


# --------------------------------------------------------------------------- fuzzer finding: smallest feasible target


def uint4_then_uint8_layers(batch: int) -> ModelWrapper:
    """x -> Quant UINT4 -> mm1 -> Quant UINT8 -> mm2: the first layer reaches 5 bits, the second only 9."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (4, 2))
    qx, ix = _quant("qx", "x", X_SCALE, 0, 4, False)
    qh, ih = _quant("qh", "h", 0.05, 0, 8, False)
    qw1, iw1 = _quant("qw1", "w1", W_SCALE, 0, 4, True)
    qw2, iw2 = _quant("qw2", "w2", W_SCALE, 0, 4, True)
    nodes = [qx, qw1, helper.make_node("MatMul", ["qx_out", "qw1_out"], ["h"], name="mm1"), qh, qw2,
             helper.make_node("MatMul", ["qh_out", "qw2_out"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2"),
             *ix, *ih, *iw1, *iw2]
    return qonnx_model(nodes, inits, [batch, 3], "y").transform(InferShapes())


def test_smallest_feasible_target_covers_every_layer():
    # Before: the refusal named the first infeasible layer's minimum (mm1: 5 bits), and --acc-bits 5 then
    # failed on mm2. A single +-1 weight on UINT8 codes spans [-255, 255]: INT9 is mm2's minimum.
    codes = box_vertices(0, 255, (4,))  # every vertex of mm2's input box
    model = uint4_then_uint8_layers(len(codes))
    with pytest.raises(A2QError, match=r"'mm1' needs at least 5 bits.*'mm2' needs at least 9 bits.*"
                                       r"smallest feasible target is 9 bits") as err:
        model.transform(ProjectToAccumulator(4))
    assert "--layer mm1=5 --layer mm2=9" in str(err.value)
    with pytest.raises(A2QError, match=r"'mm2' needs at least 9 bits") as err:
        model.transform(ProjectToAccumulator(8))
    assert "'mm1'" not in str(err.value)  # mm1 reaches 8 bits: only mm2 is named
    projected = model.transform(ProjectToAccumulator(9))
    # drive mm2's worst-case codes through its own input Quant and weight Quant (qonnx execution from 'qh')
    y = execute_onnx(projected, {"h": (codes * 0.05).astype(np.float32)}, start_node=projected.get_node_from_name("qh"))["y"]
    acc = np.rint(y.astype(np.float64) / (0.05 * W_SCALE)).astype(np.int64)
    assert -256 <= acc.min() and acc.max() <= 255, (acc.min(), acc.max())


# --------------------------------------------------------------------------- issue 11: targets on some layers only


def executed_mm1_mm2(model: ModelWrapper, codes1: np.ndarray, codes2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Executed integer accumulators of ``uint4_then_uint8_layers``' mm1 (from x) and mm2 (from its input Quant qh)."""
    h = execute_onnx(model, {"x": (codes1 * X_SCALE).astype(np.float32)}, return_full_exec_context=True)["h"]
    y = execute_onnx(model, {"h": (codes2 * 0.05).astype(np.float32)}, start_node=model.get_node_from_name("qh"))["y"]
    acc = [np.rint(v.astype(np.float64) / (s * W_SCALE)) for v, s in ((h, X_SCALE), (y, 0.05))]
    return acc[0].astype(np.int64), acc[1].astype(np.int64)


def test_partial_projection_verifies_from_the_record_with_untargeted_layers_at_their_own_width(tmp_path, a2q):
    # Before: `verify OUT` after `project --layer mm1=6` exited 3 with mm2 "unchecked"
    codes2 = box_vertices(0, 255, (4,))  # every vertex of mm2's input box (16)
    codes1 = np.tile(box_vertices(0, 15, (3,)), (2, 1))  # every vertex of mm1's (8), twice: one batch size
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    uint4_then_uint8_layers(len(codes2)).save(str(path))
    assert a2q("project", path, out, "--layer", "mm1=6").returncode == 0
    done = a2q("verify", out, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    layers = {v["node"]: v for v in report["layers"]}
    assert report["width_source"] == "model metadata" and report["overflow_impossible"]
    assert layers["mm1"]["acc_bits"] == 6 and layers["mm1"]["width_note"] == ""
    assert layers["mm2"]["width_note"] == "no target: own exact width" and layers["mm2"]["proof"] == "pass"
    assert layers["mm2"]["acc_bits"] == layers["mm2"]["required_bits"]
    table = a2q("verify", out)
    assert table.returncode == 0 and "no target: own exact width" in table.stdout
    # every reported width holds for the executed worst cases
    for name, executed in zip(("mm1", "mm2"), executed_mm1_mm2(ModelWrapper(str(out)), codes1, codes2)):
        v = layers[name]
        assert_fits(executed, v["acc_bits"], f"{'INT' if v['signed'] else 'UINT'}{v['acc_bits']}")
    # a layer the record leaves out that cannot be read is still not proven: exit 3, naming it
    model = two_layer_model("zero point", 1)
    model.save(str(path))
    assert a2q("project", path, out, "--layer", "mm1=7").returncode == 0
    unreadable = a2q("verify", out, "--json")
    assert unreadable.returncode == 3 and "mm2" in unreadable.stderr
    mm2 = {v["node"]: v for v in json.loads(unreadable.stdout)["layers"]}["mm2"]
    assert mm2["proof"] == "unchecked" and "'mm2'" in mm2["reason"] and "zero point" in mm2["reason"]
