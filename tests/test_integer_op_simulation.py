"""``verify --data`` on onnxruntime's integer MAC ops (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul).

Each simulation is checked against accumulators computed here from the op's definition by brute force (loops over
output pixels, int64 products of the codes as the op reads them: raw codes with the zero point in padded taps under
``fold``, ``code - z`` under ``subtract``), wrapped to P bits, and against the outputs ONNX's reference
implementation executes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.data_simulation import simulate_model


def _model(nodes, inputs, output, initializers, opset: int = 13) -> ModelWrapper:
    graph = helper.make_graph(nodes, "integer_ops", inputs, [output],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _wrap(acc: np.ndarray, bits: int, signed: bool = True) -> np.ndarray:
    """``acc`` wrapped into a P-bit register (two's complement, or unsigned where no sum can be negative)."""
    offset = 2 ** (bits - 1) if signed else 0
    return (acc + offset) % 2 ** bits - offset


def _conv_by_loops(x: np.ndarray, w: np.ndarray, padding: int, pad: int) -> np.ndarray:
    """``sum x * w`` over each 3x3 window of ``x`` padded by ``pad`` pixels holding ``padding``, stride 1, int64."""
    x = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=padding)
    n, _, h, v = x.shape
    k = w.shape[-1]
    out = np.zeros((n, w.shape[0], h - k + 1, v - k + 1), dtype=np.int64)
    for i in range(h - k + 1):
        for j in range(v - k + 1):
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", x[:, :, i:i + k, j:j + k], w.astype(np.int64))
    return out


def _requantized(acc: np.ndarray, multiplier: np.ndarray, zero: int, dtype) -> np.ndarray:
    scaled = np.rint(acc.astype(np.float32) * multiplier.astype(np.float32))
    return np.clip(scaled.astype(np.float64) + zero, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


RNG = np.random.default_rng(7)
X = RNG.integers(0, 256, size=(3, 3, 5, 5)).astype(np.uint8)
X[0] = 255  # the largest sums
W = RNG.integers(-128, 128, size=(4, 3, 3, 3)).astype(np.int8)
W[0] = 127
WZ = np.array([0, 3, -2, 5], np.int8)  # one weight zero point per output channel
XZ = np.uint8(17)


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_conv_integer_wraps_as_its_codes_accumulate(zero_point):
    model = _model([helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, [3, 3, 5, 5])],
                   helper.make_tensor_value_info("y", TensorProto.INT32, [3, 4, 5, 5]),
                   {"w": W, "xz": XZ, "wz": WZ})
    of_op = _conv_by_loops(X.astype(np.int64) - XZ, W.astype(np.int64) - WZ.reshape(4, 1, 1, 1), 0, 1)
    np.testing.assert_array_equal(ReferenceEvaluator(model.model).run(None, {"x": X})[0], of_op)
    acc = _conv_by_loops(X, W, XZ, 1) if zero_point == "fold" else of_op
    for bits in (16, 14):
        wrapped = _wrap(acc, bits)
        assert np.any(wrapped != acc)
        result = simulate_model(model, X, {"conv": bits}, zero_point=zero_point)
        assert not result.skipped and result.accumulations["conv"] == acc.size
        assert result.overflows["conv"] == int(np.count_nonzero(wrapped != acc))
        np.testing.assert_array_equal(result.exact_outputs["y"], of_op)
        np.testing.assert_array_equal(result.outputs["y"], of_op + (wrapped - acc))


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_matmul_integer_after_dynamic_quantization_uses_each_runs_zero_point(zero_point):
    """``DynamicQuantizeLinear`` picks the scale and zero point per run from the whole tensor: the codes (and the
    fold convention's zero point) are those of each run of the declared batch of one sample, not of a batch."""
    x = np.random.default_rng(3).standard_normal((6, 1, 16)).astype(np.float32) * 3 + 2
    x *= np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1)  # each sample its own range, so its own codes
    w = np.random.default_rng(4).integers(-128, 128, size=(16, 5)).astype(np.int8)
    model = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                    helper.make_node("MatMulInteger", ["q", "w", "z"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                   helper.make_tensor_value_info("y", TensorProto.INT32, [1, 5]), {"w": w})
    runs = [ReferenceEvaluator(model.model).run(["q", "z"], {"x": sample}) for sample in x]
    assert len({int(z) for _, z in runs}) > 1
    q = np.concatenate([q for q, _ in runs]).astype(np.int64)
    z = np.array([int(z) for _, z in runs]).reshape(6, 1)
    of_op = (q - z) @ w.astype(np.int64)
    acc = q @ w.astype(np.int64) if zero_point == "fold" else of_op
    bits = 15
    wrapped = _wrap(acc, bits)
    assert np.any(wrapped != acc)
    result = simulate_model(model, x[:, 0], {"mm": bits}, zero_point=zero_point)
    assert result.overflows["mm"] == int(np.count_nonzero(wrapped != acc))
    np.testing.assert_array_equal(result.exact_outputs["y"], of_op)
    np.testing.assert_array_equal(result.outputs["y"], of_op + (wrapped - acc))


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_qlinear_conv_requantizes_the_overflowed_accumulators(zero_point):
    """Outputs whose accumulator overflowed are the P-bit accumulator (plus the int32 bias) requantized; the others
    are what the op executes."""
    sx, sw, sy = np.float32(0.02), np.array([0.01, 0.02, 0.005, 0.03], np.float32), np.float32(0.05)
    bias = np.array([1000, -2000, 0, 700], np.int32)  # several output steps
    zy = np.int8(-3)
    model = _model([helper.make_node("QLinearConv", ["x", "sx", "xz", "w", "sw", "wz", "sy", "zy", "b"], ["y"],
                                     name="conv", pads=[1, 1, 1, 1])],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, [3, 3, 5, 5])],
                   helper.make_tensor_value_info("y", TensorProto.INT8, [3, 4, 5, 5]),
                   {"w": W, "xz": XZ, "wz": WZ, "sx": sx, "sw": sw, "sy": sy, "zy": zy, "b": bias})
    executed = ReferenceEvaluator(model.model).run(None, {"x": X})[0]
    of_op = _conv_by_loops(X.astype(np.int64) - XZ, W.astype(np.int64) - WZ.reshape(4, 1, 1, 1), 0, 1)
    acc = _conv_by_loops(X, W, XZ, 1) if zero_point == "fold" else of_op
    bits = 15
    wrapped = _wrap(acc, bits)
    overflowed = wrapped != acc
    assert np.any(overflowed) and not np.all(overflowed)
    multiplier = (sx * sw / sy).reshape(1, 4, 1, 1)
    expected = np.where(overflowed, _requantized(of_op + (wrapped - acc) + bias.reshape(1, 4, 1, 1), multiplier, -3,
                                                 np.int8), executed)
    assert np.any(expected != executed)
    result = simulate_model(model, X, {"conv": bits}, zero_point=zero_point)
    assert result.overflows["conv"] == int(np.count_nonzero(overflowed))
    np.testing.assert_array_equal(result.exact_outputs["y"], executed)
    np.testing.assert_array_equal(result.outputs["y"], expected)


@pytest.mark.parametrize("op", ["MatMulInteger", "QLinearMatMul"])
def test_integer_matmul_of_two_activations(op):
    """Attention's integer MatMul: both operands are executed codes with their own zero points."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(2, 4, 32)).astype(np.uint8)
    b = rng.integers(0, 256, size=(2, 32, 3)).astype(np.uint8)
    a[0] = 250
    b[0] = 240
    za, zb = np.uint8(128), np.uint8(7)
    inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, list(v.shape)) for n, v in (("a", a), ("b", b))]
    if op == "MatMulInteger":
        node = helper.make_node(op, ["a", "b", "za", "zb"], ["y"], name="mm")
        inits, out_type = {"za": za, "zb": zb}, TensorProto.INT32
    else:
        node = helper.make_node(op, ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], name="mm")
        inits = {"za": za, "zb": zb, "sa": np.float32(0.1), "sb": np.float32(0.05), "sy": np.float32(8.0),
                 "zy": np.uint8(100)}
        out_type = TensorProto.UINT8
    model = _model([node], inputs, helper.make_tensor_value_info("y", out_type, [2, 4, 3]), inits)
    executed = ReferenceEvaluator(model.model).run(None, {"a": a, "b": b})[0]
    of_op = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)
    for zero_point in ("fold", "subtract"):
        acc = a.astype(np.int64) @ b.astype(np.int64) if zero_point == "fold" else of_op
        bits = 20 if zero_point == "fold" else 18
        wrapped = _wrap(acc, bits, signed=zero_point == "subtract")  # raw uint8 codes: an unsigned register
        overflowed = wrapped != acc
        assert np.any(overflowed) and not np.all(overflowed)
        result = simulate_model(model, {"a": a, "b": b}, {"mm": bits}, zero_point=zero_point)
        assert result.overflows["mm"] == int(np.count_nonzero(overflowed))
        np.testing.assert_array_equal(result.exact_outputs["y"], executed)
        if op == "MatMulInteger":
            expected = of_op + (wrapped - acc)
        else:
            expected = np.where(overflowed, _requantized(of_op + (wrapped - acc), np.float32(0.1 * 0.05 / 8.0), 100,
                                                         np.uint8), executed)
        np.testing.assert_array_equal(result.outputs["y"], expected)


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_channels_last_qlinear_conv_of_onnxruntimes_optimizer(zero_point):
    """onnxruntime's com.microsoft QLinearConv (``ORT_ENABLE_ALL``) reads NHWC data with OIHW weights: executed
    exactly and simulated as the ONNX QLinearConv on the same data transposed to NCHW, its outputs transposed
    back."""
    sx, sw, sy = np.float32(0.02), np.array([0.01, 0.02, 0.005, 0.03], np.float32), np.float32(0.05)
    inits = {"w": W, "xz": XZ, "wz": np.zeros(4, np.int8), "sx": sx, "sw": sw, "sy": sy, "zy": np.int8(-3),
             "b": np.array([1000, -2000, 0, 700], np.int32)}
    inputs = ["x", "sx", "xz", "w", "sw", "wz", "sy", "zy", "b"]

    def model(domain: str, shape: list[int], out: list[int], **attrs) -> ModelWrapper:
        node = helper.make_node("QLinearConv", inputs, ["y"], name="conv", domain=domain, pads=[1, 1, 1, 1], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.INT8, out)],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
        return ModelWrapper(helper.make_model(graph, opset_imports=opsets))

    nchw = model("", [3, 3, 5, 5], [3, 4, 5, 5])
    nhwc = model("com.microsoft", [3, 5, 5, 3], [3, 5, 5, 4], channels_last=1)
    executed = ReferenceEvaluator(nchw.model).run(None, {"x": X})[0]
    of_op = _conv_by_loops(X.astype(np.int64) - XZ, W, 0, 1)
    acc = _conv_by_loops(X, W, XZ, 1) if zero_point == "fold" else of_op
    bits = 15
    wrapped = _wrap(acc, bits)
    overflowed = wrapped != acc
    assert np.any(overflowed) and not np.all(overflowed)
    expected = np.where(overflowed, _requantized(of_op + (wrapped - acc) + inits["b"].reshape(1, 4, 1, 1),
                                                 (sx * sw / sy).reshape(1, 4, 1, 1), -3, np.int8), executed)
    result = simulate_model(nhwc, X.transpose(0, 2, 3, 1), {"conv": bits}, zero_point=zero_point)
    assert not result.skipped and result.overflows["conv"] == int(np.count_nonzero(overflowed))
    np.testing.assert_array_equal(result.exact_outputs["y"], executed.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(result.outputs["y"], expected.transpose(0, 2, 3, 1))


def test_allocate_scores_a_dynamically_quantized_graph_one_sample_at_a_time(tmp_path):
    """onnxruntime's ``quantize_dynamic`` output with a symbolic batch: ``allocate``'s onnxruntime scoring gives each
    sample the outputs one-sample inference gives it (a batch would quantize every sample with the batch's range)."""
    import onnx
    import onnxruntime as ort

    from a2q_passes.scoring import onnxruntime_outputs
    from tests.ort_models import conv_gemm_matmul, quantize

    float_path, dynamic = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    conv_gemm_matmul(float_path)
    proto = onnx.load(str(float_path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a symbolic batch, as exporters write it
    onnx.save(proto, str(float_path))
    quantize(float_path, dynamic, [1, 2, 4, 4], "dynamic", "QInt8")
    x = np.random.default_rng(2).normal(size=(12, 2, 4, 4)).astype(np.float32)
    x *= np.linspace(0.1, 10, 12, dtype=np.float32).reshape(12, 1, 1, 1)  # each sample its own range
    session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])
    one_at_a_time = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert not np.allclose(session.run(None, {"x": x})[0], one_at_a_time)  # batching changes the results
    np.testing.assert_array_equal(onnxruntime_outputs(ModelWrapper(str(dynamic)), x).numpy(), one_at_a_time)


def _qgemm_model(b: np.ndarray, requantized: bool, a_type=TensorProto.UINT8, m: int = 8) -> ModelWrapper:
    """onnxruntime's com.microsoft QGemm (transB, per-column weight scales, int32 bias), output requantized to uint8
    or (no y_scale, no y_zero_point) float."""
    inits = {"sa": np.float32(0.05), "za": np.uint8(11), "b": b, "sb": np.linspace(0.01, 0.04, b.shape[0], dtype=np.float32),
             "zb": np.zeros(b.shape[0], np.int8), "c": np.arange(b.shape[0], dtype=np.int32) * 300 - 600}
    inputs = ["a", "sa", "za", "b", "sb", "zb", "c"]
    out_type = TensorProto.FLOAT
    if requantized:
        inits.update(sy=np.float32(3.0), zy=np.uint8(128))
        inputs += ["sy", "zy"]
        out_type = TensorProto.UINT8
    node = helper.make_node("QGemm", inputs, ["y"], name="gemm", domain="com.microsoft", transB=1, alpha=0.5)
    graph = helper.make_graph([node], "qgemm", [helper.make_tensor_value_info("a", a_type, [m, b.shape[1]])],
                              [helper.make_tensor_value_info("y", out_type, [m, b.shape[0]])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid("com.microsoft", 1)]))


def _qgemm_outputs(acc: np.ndarray, requantized: bool, n: int) -> np.ndarray:
    """QGemm's output for accumulators ``acc`` (bias not included) of ``_qgemm_model``: as onnxruntime's kernel
    scales them (float32: ``alpha * s_a * s_b / s_y``, rounding half to even)."""
    scale = np.float32(0.5) * np.float32(0.05) * np.linspace(0.01, 0.04, n, dtype=np.float32)
    total = (acc + np.arange(n) * 300 - 600).astype(np.float32)
    if not requantized:
        return total * scale
    return np.clip(np.rint(total * (scale / np.float32(3.0))).astype(np.float64) + 128, 0, 255).astype(np.uint8)


def test_exact_qgemm_is_onnxruntimes_kernel_without_its_int16_saturation():
    """Where onnxruntime's kernel is exact (small codes) the exact QGemm gives its outputs bit for bit, requantized
    and float; on codes whose pairs of products pass int16 it gives the exact sums, which the kernel on AVX2 CPUs
    without VNNI does not."""
    import onnxruntime as ort

    from a2q_passes.exact_integer_ops import ExactQGemm

    rng = np.random.default_rng(11)
    b = rng.integers(-60, 61, size=(5, 24)).astype(np.int8)
    small = rng.integers(0, 50, size=(8, 24)).astype(np.uint8)
    for requantized in (False, True):
        model = _qgemm_model(b, requantized).model
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"a": small})[0]
        np.testing.assert_array_equal(ExactQGemm(model).run(None, {"a": small})[0], expected)
    big = np.full((8, 24), 255, np.uint8)
    wide = np.full((5, 24), 127, np.int8)
    exact = (big.astype(np.int64) - 11) @ wide.astype(np.int64).T
    np.testing.assert_array_equal(ExactQGemm(_qgemm_model(wide, False).model).run(None, {"a": big})[0],
                                  _qgemm_outputs(exact, False, 5))


@pytest.mark.parametrize("requantized", [False, True])
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_qgemm_overflowed_outputs_come_from_the_p_bit_accumulator(requantized, zero_point):
    rng = np.random.default_rng(12)
    b = rng.integers(-128, 128, size=(5, 24)).astype(np.int8)
    a = rng.integers(0, 256, size=(8, 24)).astype(np.uint8)
    a[0] = 255
    model = _qgemm_model(b, requantized)
    of_op = (a.astype(np.int64) - 11) @ b.astype(np.int64).T
    acc = a.astype(np.int64) @ b.astype(np.int64).T if zero_point == "fold" else of_op
    bits = 17
    wrapped = _wrap(acc, bits)
    overflowed = wrapped != acc
    assert np.any(overflowed) and not np.all(overflowed)
    result = simulate_model(model, a, {"gemm": bits}, zero_point=zero_point)
    assert not result.skipped and result.overflows["gemm"] == int(np.count_nonzero(overflowed))
    np.testing.assert_array_equal(result.exact_outputs["y"], _qgemm_outputs(of_op, requantized, 5))
    np.testing.assert_array_equal(result.outputs["y"], _qgemm_outputs(of_op + (wrapped - acc), requantized, 5))


def _padding(size: list[int], kernel: list[int], strides: list[int], dilations: list[int], auto_pad: str,
             pads: list[int]) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial axis, as ONNX's Conv defines ``auto_pad``."""
    n = len(size)
    if auto_pad == "NOTSET":
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    total = [max((-(-s // st) - 1) * st + (k - 1) * d + 1 - s, 0) for s, k, st, d in zip(size, kernel, strides, dilations)]
    small = [t // 2 for t in total]
    begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
    return begin, [t - b for t, b in zip(total, begin)]


def _grouped_conv_by_loops(x: np.ndarray, w: np.ndarray, padding: int, begin, end, strides, dilations,
                           group: int) -> np.ndarray:
    """ONNX's Conv on integer codes, one output element at a time (any spatial rank), in int64."""
    x = np.pad(x.astype(np.int64), [(0, 0), (0, 0), *zip(begin, end)], constant_values=padding)
    w = w.astype(np.int64)
    per_in, per_out = w.shape[1], w.shape[0] // group
    kernel = w.shape[2:]
    spatial = [(s - ((k - 1) * d + 1)) // st + 1 for s, k, d, st in zip(x.shape[2:], kernel, dilations, strides)]
    out = np.zeros((x.shape[0], w.shape[0], *spatial), dtype=np.int64)
    for o in range(w.shape[0]):
        g = o // per_out
        for position in itertools.product(*(range(s) for s in spatial)):
            window = tuple(slice(p * st, p * st + (k - 1) * d + 1, d)
                           for p, st, k, d in zip(position, strides, kernel, dilations))
            patch = x[(slice(None), slice(g * per_in, (g + 1) * per_in), *window)]
            out[(slice(None), o, *position)] = (patch * w[o]).reshape(len(x), -1).sum(axis=1)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_random_conv_integer_geometries_against_brute_force(seed):
    """Random ConvInteger layers (1-D and 2-D, strides, dilations, explicit or automatic padding, groups, per-tensor
    or per-channel weight zero points, both conventions): P-bit wrap-around counts and outputs against ONNX's Conv
    computed one output at a time, and the exact outputs against ONNX's reference implementation."""
    rng = np.random.default_rng(100 + seed)
    rank = int(rng.integers(1, 3))
    group = int(rng.choice([1, 2]))
    c_in, c_out = 2 * group, 2 * group
    kernel = [int(k) for k in rng.integers(1, 4, size=rank)]
    strides = [int(s) for s in rng.integers(1, 3, size=rank)]
    dilations = [int(d) for d in rng.integers(1, 3, size=rank)]
    auto_pad = str(rng.choice(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = [int(p) for p in rng.integers(0, 3, size=2 * rank)]
    size = [int(s) for s in rng.integers(5, 9, size=rank)]
    x = rng.integers(0, 256, size=(3, c_in, *size)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(c_out, c_in // group, *kernel)).astype(np.int8)
    # per-channel weight zero points on 2-D convolutions only: ONNX's reference ConvInteger expands them to 4-D
    # weights (and onnxruntime's takes one per tensor), so nothing executes a 1-D one
    per_channel = rank == 2 and rng.integers(0, 2)
    wz = (rng.integers(-5, 6, size=c_out) if per_channel else np.array(int(rng.integers(-5, 6)))).astype(np.int8)
    xz = np.uint8(rng.integers(0, 256))
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "group": group}
    attrs.update(auto_pad=auto_pad) if auto_pad != "NOTSET" else attrs.update(pads=pads)
    begin, end = _padding(size, kernel, strides, dilations, auto_pad, pads)
    spatial = [(s + b + e - ((k - 1) * d + 1)) // st + 1
               for s, b, e, k, d, st in zip(size, begin, end, kernel, dilations, strides)]
    model = _model([helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], name="conv", **attrs)],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                   helper.make_tensor_value_info("y", TensorProto.INT32, [3, c_out, *spatial]),
                   {"w": w, "xz": xz, "wz": wz})
    shifted = w.astype(np.int64) - wz.astype(np.int64).reshape(-1, *[1] * (w.ndim - 1))
    of_op = _grouped_conv_by_loops(x.astype(np.int64) - int(xz), shifted, 0, begin, end, strides, dilations, group)
    np.testing.assert_array_equal(ReferenceEvaluator(model.model).run(None, {"x": x})[0], of_op)
    for zero_point in ("fold", "subtract"):
        acc = _grouped_conv_by_loops(x, w, int(xz), begin, end, strides, dilations, group) if zero_point == "fold" \
            else of_op
        bits = max(int(np.abs(acc).max()).bit_length() - 1, 2)  # below the widest result: some overflow
        wrapped = _wrap(acc, bits)
        result = simulate_model(model, x, {"conv": bits}, zero_point=zero_point)
        assert not result.skipped and result.accumulations["conv"] == acc.size
        assert result.overflows["conv"] == int(np.count_nonzero(wrapped != acc)) > 0
        np.testing.assert_array_equal(result.exact_outputs["y"], of_op)
        np.testing.assert_array_equal(result.outputs["y"], of_op + (wrapped - acc))


def _dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """``x`` through onnxruntime's own DynamicQuantizeLinear op: codes, scale, zero point."""
    import onnxruntime as ort

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_empty_tensor_value_info(n) for n in ("y", "s", "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y, s, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return y.astype(np.int64), np.float32(s), int(z)


def test_dynamic_quantization_is_onnxruntimes():
    """The codes DynamicQuantizeMatMul multiplies (computed inside the op) are DynamicQuantizeLinear's, bit for bit:
    mixed, all-positive, all-negative, all-zero tensors, values on half steps, tiny and huge ranges."""
    from a2q_passes.exact_integer_ops import dynamic_quantization

    rng = np.random.default_rng(21)
    cases = [np.zeros(7, np.float32), np.full(5, -3.0, np.float32), np.array([0.5, 1.5, 2.5, -0.5], np.float32)]
    for i in range(400):
        x = rng.normal(size=int(rng.integers(1, 300))) * 10.0 ** rng.uniform(-4, 4)
        x = [x, np.abs(x), -np.abs(x), np.round(x * 2) / 2][i % 4]
        cases.append(x.astype(np.float32))
    for x in cases:
        codes, scale, zero = dynamic_quantization(x)
        expected = _dynamic_quantize_linear(x)
        np.testing.assert_array_equal(codes, expected[0])
        assert (scale, zero) == expected[1:], x


def _matmul_to_float_model(op: str, b: np.ndarray, m: int) -> ModelWrapper:
    """onnxruntime's com.microsoft DynamicQuantizeMatMul, or MatMulIntegerToFloat fed by DynamicQuantizeLinear (the
    two forms its optimizer fuses a dynamically quantized MatMul into), weight zero point 3, float bias."""
    inits = {"b": b, "sb": np.float32(0.02), "zb": np.int8(3), "bias": np.linspace(-2, 2, b.shape[1], dtype=np.float32)}
    if op == "DynamicQuantizeMatMul":
        nodes = [helper.make_node(op, ["x", "b", "sb", "zb", "bias"], ["y"], name="mm", domain="com.microsoft")]
    else:
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "sx", "zx"]),
                 helper.make_node(op, ["q", "b", "sx", "sb", "zx", "zb", "bias"], ["y"], name="mm", domain="com.microsoft")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, b.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, b.shape[1]])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid("com.microsoft", 1)]))


def _matmul_to_float_outputs(acc: np.ndarray, scale: np.float32, n: int) -> np.ndarray:
    """The fused op's float output for accumulators ``acc``: ``acc * (s_x * s_b) + bias`` in float32."""
    return acc.astype(np.float32) * (scale * np.float32(0.02)) + np.linspace(-2, 2, n, dtype=np.float32)


@pytest.mark.parametrize("op", ["DynamicQuantizeMatMul", "MatMulIntegerToFloat"])
def test_exact_matmul_to_float_is_onnxruntimes_kernel_without_its_int16_saturation(op):
    """Where onnxruntime's kernel is exact (weights small enough that no pair of uint8 x int8 products passes
    int16) the exact fused op gives its outputs bit for bit; with full-range weights it gives the exact sums."""
    import onnxruntime as ort

    from a2q_passes.exact_integer_ops import ExactMatMulToFloat

    rng = np.random.default_rng(22)
    for trial in range(20):
        k, n, m = (int(v) for v in rng.integers(1, 40, size=3))
        x = (rng.normal(size=(m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
        model = _matmul_to_float_model(op, rng.integers(-60, 61, size=(k, n)).astype(np.int8), m).model
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        single = helper.make_model(helper.make_graph([model.graph.node[-1]], "one", [
            helper.make_tensor_value_info(name, elem, None) for name, elem in (
                (("x", TensorProto.FLOAT),) if op == "DynamicQuantizeMatMul" else
                (("q", TensorProto.UINT8), ("sx", TensorProto.FLOAT), ("zx", TensorProto.UINT8)))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(model.graph.initializer)),
            opset_imports=list(model.opset_import))
        codes, scale, zero = _dynamic_quantize_linear(x)
        feeds = {"x": x} if op == "DynamicQuantizeMatMul" else {"q": codes.astype(np.uint8), "sx": np.array(scale),
                                                                  "zx": np.array(zero, np.uint8)}
        np.testing.assert_array_equal(ExactMatMulToFloat(single).run(None, feeds)[0], session.run(None, {"x": x})[0])
    wide = np.full((24, 5), 127, np.int8)
    x = np.tile(np.linspace(-1, 4, 24, dtype=np.float32), (8, 1))
    codes, scale, zero = _dynamic_quantize_linear(x)
    single = _matmul_to_float_model("DynamicQuantizeMatMul", wide, 8).model
    exact = (codes - zero) @ (wide.astype(np.int64) - 3)
    np.testing.assert_array_equal(ExactMatMulToFloat(single).run(None, {"x": x})[0],
                                  _matmul_to_float_outputs(exact, scale, 5))


@pytest.mark.parametrize("op", ["DynamicQuantizeMatMul", "MatMulIntegerToFloat"])
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_fused_dynamic_matmul_overflowed_outputs_come_from_the_p_bit_accumulator(op, zero_point):
    """onnxruntime's fused dynamic MatMuls: the codes (DynamicQuantizeLinear's, computed inside the op for
    DynamicQuantizeMatMul) wrap in a P-bit accumulator, and each overflowed output is the P-bit accumulator scaled by
    ``s_x * s_b`` plus the bias."""
    rng = np.random.default_rng(23)
    b = rng.integers(-128, 128, size=(24, 5)).astype(np.int8)
    x = rng.normal(size=(8, 24)).astype(np.float32) * 3
    x[0] = x.max()  # the largest sums
    codes, scale, zero = _dynamic_quantize_linear(x)
    of_op = (codes - zero) @ (b.astype(np.int64) - 3)
    acc = codes @ b.astype(np.int64) if zero_point == "fold" else of_op
    bits = 16
    wrapped = _wrap(acc, bits)
    overflowed = wrapped != acc
    assert np.any(overflowed) and not np.all(overflowed)
    result = simulate_model(_matmul_to_float_model(op, b, 8), x, {"mm": bits}, zero_point=zero_point)
    assert not result.skipped and result.overflows["mm"] == int(np.count_nonzero(overflowed))
    np.testing.assert_array_equal(result.exact_outputs["y"], _matmul_to_float_outputs(of_op, scale, 5))
    np.testing.assert_array_equal(result.outputs["y"], _matmul_to_float_outputs(of_op + (wrapped - acc), scale, 5))
