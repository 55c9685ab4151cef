"""The independent certificate: it agrees with the analysis on every bundled model, its ranges are what
qonnx execution reaches on exhaustive worst-case inputs, and a fast path that under-reports makes
every promising command exit 4 without writing anything."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes import layers, weight_sources
from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import CannotCertify, Claim, certify_claims, certify_layer
from a2q_passes.errors import PostconditionError

Q = "qonnx.custom_op.general"
MODELS = sorted(Path(__file__).resolve().parents[1].glob("models/*.onnx"))
BIG = 1e6  # a real input this large drives every activation quantizer to one of its clamp limits


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_agrees_with_the_analysis_on_every_bundled_model(zero_point):
    assert len(MODELS) >= 8 and any("qdq" in p.name for p in MODELS)
    for path in MODELS:
        model = ModelWrapper(str(path))
        checked = 0
        for report in analyze_model(model, zero_point=zero_point, per_channel=True).layers:
            assert report.status == "ok", (path.name, report.node, report.status)
            cert = certify_layer(model, report.node, zero_point=zero_point)
            assert list(cert.input_codes) == report.input_range, (path.name, report.node)
            assert list(cert.channel_min) == report.per_channel["acc_min"], (path.name, report.node)
            assert list(cert.channel_max) == report.per_channel["acc_max"], (path.name, report.node)
            checked += 1
        assert checked, path.name


# --------------------------------------------------------------------------- exhaustive execution


def _quant(x: str, out: str, prefix: str, bits: float, signed: bool, narrow: bool = False) -> helper.NodeProto:
    return helper.make_node("Quant", [x, f"{prefix}_s", f"{prefix}_z", f"{prefix}_b"], [out], domain=Q,
                            signed=int(signed), narrow=int(narrow), rounding_mode="ROUND")


def _mac_model(op: str, w: np.ndarray, w_scale: float, w_bits: int, w_signed: bool, x_shape: tuple[int, ...],
               x_scale: float, x_zero: float, x_bits: float, x_signed: bool, *, relu: bool = False,
               **attrs) -> ModelWrapper:
    """x -> Quant [-> Relu] -> MAC(weights -> Quant) -> y, without bias, declared for a batch of x_shape[0]."""
    nodes = [_quant("x", "xq", "x", x_bits, x_signed), _quant("w", "wq", "w", w_bits, w_signed)]
    mac_in = "xq"
    if relu:
        nodes.append(helper.make_node("Relu", ["xq"], ["xr"]))
        mac_in = "xr"
    nodes.append(helper.make_node(op, [mac_in, "wq"], ["y"], name="mac", **attrs))
    inits = {"w": w * w_scale, "w_s": w_scale, "w_z": 0.0, "w_b": float(w_bits),
             "x_s": x_scale, "x_z": x_zero, "x_b": float(x_bits)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(Q, 1)])).transform(InferShapes())


def _vertices(per_sample: int, repeat: int = 1) -> np.ndarray:
    """Every -BIG/+BIG pattern of ``per_sample`` values (tiled ``repeat`` times along the sample)."""
    patterns = np.array(list(itertools.product((-BIG, BIG), repeat=per_sample)), dtype=np.float32)
    return np.tile(patterns, (1, repeat))


def _executed(model: ModelWrapper, x: np.ndarray, acc_scale: float, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel extremes of the executed accumulator ``y / (s_w s_x)`` over all samples and positions."""
    y = execute_onnx(model, {"x": x})["y"].astype(np.float64) / acc_scale
    acc = np.moveaxis(y, channel_axis, 0).reshape(y.shape[channel_axis], -1)
    assert np.array_equal(acc, np.rint(acc))  # power-of-two scales: execution is exact
    return acc.min(axis=1), acc.max(axis=1)


def _check(model: ModelWrapper, executed: tuple[np.ndarray, np.ndarray], zero_point: str, tight: bool = True) -> None:
    cert = certify_layer(model, "mac", zero_point=zero_point)
    lo, hi = executed
    assert np.all(np.asarray(cert.channel_min) <= lo) and np.all(hi <= np.asarray(cert.channel_max))
    if tight:  # exhaustive vertices reach the exact extremes
        assert list(cert.channel_min) == lo.tolist() and list(cert.channel_max) == hi.tolist()


def _fold(executed: tuple[np.ndarray, np.ndarray], zero: int, channel_weight_sums: np.ndarray):
    """Raw-code accumulator: every tap, padded ones included, holds ``code = x / s + zero``."""
    return executed[0] + zero * channel_weight_sums, executed[1] + zero * channel_weight_sums


RNG = np.random.default_rng(7)


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_conv_with_pads_and_a_zero_point_outside_the_codes(zero_point):
    # UINT4 codes [0, 15] with zero point 30: padded taps hold code 30 (fold) / 0 (subtract), outside the box
    q = RNG.integers(-8, 8, size=(3, 1, 3, 3))
    model = _mac_model("Conv", q, 0.25, 4, True, (512, 1, 3, 3), 0.5, 30, 4, False, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    executed = _executed(model, _vertices(9).reshape(512, 1, 3, 3), 0.125, 1)
    if zero_point == "fold":
        executed = _fold(executed, 30, q.sum(axis=(1, 2, 3)))
    _check(model, executed, zero_point)


def test_depthwise_conv_strided_same_upper_padding():
    q = RNG.integers(-8, 8, size=(2, 1, 2, 2))
    model = _mac_model("Conv", q, 0.5, 4, True, (512, 2, 3, 3), 0.25, -3, 4, False, group=2, kernel_shape=[2, 2],
                       strides=[2, 2], auto_pad="SAME_UPPER")
    executed = _executed(model, _vertices(9, repeat=2).reshape(512, 2, 3, 3), 0.125, 1)
    _check(model, _fold(executed, -3, q.sum(axis=(1, 2, 3))), "fold")


def test_gemm_with_one_bit_signed_weights_executes_bipolar():
    # a 1-bit signed Quant executes as sign (0 -> +1): no weight is zero, whatever the stored value
    w = np.array([[0.0, 0.1, -0.1, 0.4, -0.4, 1.0, -1.0, 0.2], [0.3, 0.0, 0.0, -0.2, 0.1, 0.1, 0.0, -1.0]])
    model = _mac_model("Gemm", w, 1.0, 1, True, (256, 8), 0.5, 0, 3, True, transB=1)
    _check(model, _executed(model, _vertices(8), 0.5, 1), "fold")
    # codes [-4, 3]; weights +1 where w >= 0 (5 and 6 of them), else -1: 3 * pos + 4 * neg
    assert certify_layer(model, "mac").channel_max == (3 * 5 + 4 * 3, 3 * 6 + 4 * 2)


def test_matmul_unsigned_weights_narrow_signed_input_with_fractional_bit_width():
    # 4.5 bits: qonnx clamps to +-(2^3.5 - 1) before rounding; the certificate takes what execution gives
    q = RNG.integers(0, 8, size=(9, 3))
    model = _mac_model("MatMul", q, 0.5, 3, False, (512, 9), 0.5, 0, 4.5, True)
    _check(model, _executed(model, _vertices(9), 0.25, 1), "fold")


def test_relu_after_a_negative_scale_keeps_the_non_positive_codes():
    q = RNG.integers(-8, 8, size=(9, 2))
    model = _mac_model("MatMul", q, 1.0, 4, True, (512, 9), -0.5, 0, 4, True, relu=True)
    _check(model, _executed(model, _vertices(9), -0.5, 1), "fold")
    assert certify_layer(model, "mac").input_codes == (-8, 0)


def test_conv_transpose_range_contains_every_output():
    q = RNG.integers(-8, 8, size=(1, 2, 3, 3))
    model = _mac_model("ConvTranspose", q, 0.5, 4, True, (16, 1, 2, 2), 0.5, 0, 4, False, kernel_shape=[3, 3],
                       strides=[2, 2])
    _check(model, _executed(model, _vertices(4).reshape(16, 1, 2, 2), 0.25, 1), "fold", tight=False)


def test_qdq_conv_with_an_activation_zero_point():
    q = RNG.integers(-127, 128, size=(2, 1, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="mac", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(np.float32(0.5), "xs"), numpy_helper.from_array(np.uint8(100), "xz"),
             numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.float32(0.25), "ws")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, 1, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(Q, 1)])).transform(InferShapes())
    executed = _executed(model, _vertices(9).reshape(512, 1, 3, 3), 0.125, 1)
    _check(model, executed, "subtract")
    _check(model, _fold(executed, 100, q.astype(np.int64).sum(axis=(1, 2, 3))), "fold")


def test_refuses_what_it_cannot_derive():
    q = RNG.integers(-8, 8, size=(4, 2))
    model = _mac_model("MatMul", q, 1.0, 4, True, (1, 4), 0.5, 0, 4, False)
    pooled = ModelWrapper(model.model.SerializeToString())
    pooled.graph.node[0].output[0] = "xp"  # Quant -> Sigmoid -> MAC: codes no longer on a grid
    pooled.graph.node.insert(1, helper.make_node("Sigmoid", ["xp"], ["xq"]))
    with pytest.raises(CannotCertify, match="Sigmoid"):
        certify_layer(pooled, "mac")
    clipped = ModelWrapper(model.model.SerializeToString())  # a Clip that cuts between grid points
    clipped.graph.node[1].output[0] = "wc"
    clipped.graph.node.insert(2, helper.make_node("Clip", ["wc", "lo", "hi"], ["wq"]))
    clipped.graph.initializer.extend([numpy_helper.from_array(np.float32(-2.5), "lo"),
                                      numpy_helper.from_array(np.float32(2.5), "hi")])
    if np.abs(q).max() > 2:
        with pytest.raises(CannotCertify, match="not integer"):
            certify_layer(clipped, "mac")
    with pytest.raises(PostconditionError, match="cannot be certified"):
        certify_claims(pooled, {"mac": Claim(-100, 100, 16)}, what="test")


def test_a_claim_narrower_than_the_certificate_is_a_postcondition_error():
    model = _mac_model("Gemm", np.ones((1, 4)), 1.0, 2, True, (1, 4), 1.0, 0, 2, False, transB=1)
    assert certify_layer(model, "mac").acc_max == 12  # 4 weights of 1, codes [0, 3]
    certify_claims(model, {"mac": Claim(0, 12, 4)}, what="test")
    with pytest.raises(PostconditionError, match=r"\[0, 11\].*\[0, 12\]"):
        certify_claims(model, {"mac": Claim(0, 11, 4)}, what="test")
    with pytest.raises(PostconditionError, match="promised 3 bits"):
        certify_claims(model, {"mac": Claim(0, 12, 3)}, what="test")


# --------------------------------------------------------------------------- a corrupted fast path



def test_under_reporting_reader_makes_project_annotate_verify_exit_4(tmp_path, monkeypatch, a2q):
    """Read 1-bit signed weights as round(clip(w / s, -1, 1)), i.e. {-1, 0, +1}, while qonnx executes +-1."""
    w = np.tile([0.8, 0.2, -0.9, 0.0, -0.3, 0.6, 0.1, -0.7], (2, 2)) * np.array([[1.0], [-1.0]])
    model = _mac_model("Gemm", w, 1.0, 1, True, (1, 16), 1.0, 0, 4, False, transB=1)
    path = tmp_path / "bipolar.onnx"
    model.save(str(path))
    # the truth, from execution: code 15 where qonnx's weight is +1 (w >= 0), else code 0
    true_max = max(float(execute_onnx(model, {"x": np.where(w[c:c + 1] >= 0, BIG, -BIG).astype(np.float32)})["y"][0, c])
                   for c in range(2))

    original = weight_sources.read_mac_weights

    def under_reporting(model_, source):
        stored = model_.get_initializer("w")
        q = original(model_, source)
        return np.rint(np.clip(stored, -1, 1)).astype(np.int64) if stored is not None and q.shape == stored.shape else q

    monkeypatch.setattr(layers, "read_mac_weights", under_reporting)  # the layer's integer rows
    monkeypatch.setattr(weight_sources, "read_mac_weights", under_reporting)  # its unrounded weights
    fast = analyze_model(ModelWrapper(str(path))).layers[0]
    assert fast.acc_max < true_max  # the corruption is real: the fast path misses part of the range
    true_max = int(true_max)
    bits = fast.bounds["exact"]
    before = path.read_bytes()
    for args, out in ((("project", path, tmp_path / "p.onnx", "--acc-bits", bits), tmp_path / "p.onnx"),
                      (("annotate", path, tmp_path / "a.onnx"), tmp_path / "a.onnx"),
                      (("verify", path, "--acc-bits", bits), None)):
        result = a2q(*args)
        assert result.returncode == 4, (args[0], result.stdout, result.stderr)
        assert "mac" in result.stderr and f"{fast.acc_max}]" in result.stderr and f"{true_max}]" in result.stderr
        assert out is None or not out.exists()
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bipolar.onnx"]  # no output, no leftover


def test_finn_integer_initializers_are_taken_as_annotated_and_checked_against_it():
    q = np.array([[1, -1, 1], [-1, 1, 1], [1, 1, -1], [-1, -1, -1]], dtype=np.float32)  # (K, N) for MatMul
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mac")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 3])],
                              [numpy_helper.from_array(q, "w")])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.set_tensor_datatype("x", DataType["UINT2"])
    model.set_tensor_datatype("w", DataType["BIPOLAR"])
    x = np.array(list(itertools.product((0.0, 3.0), repeat=4)), dtype=np.float32)  # every UINT2 vertex
    y = execute_onnx(model, {"x": x})["y"]
    cert = certify_layer(model, "mac")
    assert list(cert.channel_min) == y.min(axis=0).tolist() and list(cert.channel_max) == y.max(axis=0).tolist()
    q[0, 0] = 0.0  # a zero is not a BIPOLAR value: the annotation and the tensor disagree
    model.set_initializer("w", q)
    with pytest.raises(CannotCertify, match="BIPOLAR but holds 0"):
        certify_layer(model, "mac")


def _per_channel_weights(layout: list[helper.NodeProto], scales: np.ndarray, zeros: np.ndarray,
                         codes: np.ndarray) -> ModelWrapper:
    """int8 codes ``(out, in)`` -> per-channel (axis 0) DequantizeLinear with zero points -> ``layout`` ops -> MatMul."""
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w0"], axis=0), *layout,
             helper.make_node("MatMul", ["x", f"w{len(layout)}"], ["y"], name="mac")]
    inits = [numpy_helper.from_array(codes, "wq"), numpy_helper.from_array(scales.astype(np.float32), "ws"),
             numpy_helper.from_array(zeros, "wz"), numpy_helper.from_array(np.array([4, 3], np.int64), "shape"),
             numpy_helper.from_array(np.float32(-1e9), "lo"), numpy_helper.from_array(np.float32(1e9), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("path", ["Transpose", "Transpose, Identity, Clip", "Reshape"])
@pytest.mark.parametrize("check", ["numpy", "kernel"])
def test_per_channel_scale_and_zero_point_follow_the_weight_layout_ops(path, check, monkeypatch):
    """A per-channel scale and zero point reach the MAC through the graph's layout ops: a Transpose carries them
    in their own shape, a Reshape one value per weight; either way each weight is divided by its own channel's
    scale (channels with different scales would give non-integers otherwise) and gets its own zero point back.
    ``kernel``: the integer check of large tensors (here every tensor), whose integers are narrow (int16 here:
    codes minus zero points leave int8)."""
    from a2q_passes.certificate import weight_integers

    if check == "kernel":
        monkeypatch.setattr("a2q_passes.certificate.execution._KERNEL_VALUES", 0)

    codes = RNG.integers(-128, 128, size=(3, 4)).astype(np.int8)
    zeros = np.array([-3, 0, 5], dtype=np.int8)
    scales = np.array([0.5, 0.125, 2.0])
    layout = {"Transpose": [helper.make_node("Transpose", ["w0"], ["w1"], perm=[1, 0])],
              "Transpose, Identity, Clip": [helper.make_node("Transpose", ["w0"], ["w1"], perm=[1, 0]),
                                            helper.make_node("Identity", ["w1"], ["w2"]),
                                            helper.make_node("Clip", ["w2", "lo", "hi"], ["w3"])],
              "Reshape": [helper.make_node("Reshape", ["w0", "shape"], ["w1"])]}[path]
    model = _per_channel_weights(layout, scales, zeros, codes)
    moved = codes.reshape(4, 3) if path == "Reshape" else codes.T
    moved_zeros = np.broadcast_to(zeros[:, None], codes.shape)
    moved_zeros = moved_zeros.reshape(4, 3) if path == "Reshape" else moved_zeros.T
    assert np.array_equal(weight_integers(model, "w" + str(len(layout)), "fold"), moved)
    assert np.array_equal(weight_integers(model, "w" + str(len(layout)), "subtract"), moved.astype(np.int64) - moved_zeros)
    zero_scale = _per_channel_weights(layout, np.array([0.5, 0.0, 2.0]), zeros, codes)
    with pytest.raises(CannotCertify, match="zero or non-finite scale"):
        weight_integers(zero_scale, "w" + str(len(layout)))


@pytest.mark.parametrize("shape,divisor", [((6, 5), (1, 5)), ((6, 5), (6, 1)), ((4, 3, 2, 2), (4, 1, 1, 1)),
                                           ((7,), None), ((3, 4), (3, 4)), ((), None)])
def test_compiled_integer_check_gives_the_numpy_check_or_its_refusal(shape, divisor, monkeypatch):
    """The kernel behind large tensors (forced here for every size) returns the integers of the numpy check, in
    the narrowest signed type, and leaves each refusal (off the grid, NaN, infinite) to the numpy check's message."""
    from a2q_passes.certificate import execution

    rng = np.random.default_rng(5)
    scale = None if divisor is None else rng.choice([0.5, 0.1, 3.0, 1 / 127], size=divisor)
    for low, high in ((-128, 128), (-300, 300), (0, 1 << 20)):
        codes = rng.integers(low, high, size=shape)
        values = np.asarray(codes * (1.0 if scale is None else scale), dtype=np.float32)  # 0-d: an array, not a scalar
        cases = {"on the grid": values}
        middle = values.size // 2
        step = 1.0 if scale is None else np.broadcast_to(scale, shape).reshape(-1)[middle]
        for name, bad in (("off the grid", 1.3 * step), ("NaN", np.nan), ("infinite", np.inf)):
            cases[name] = values.copy()
            cases[name].reshape(-1)[middle] = bad  # 1.3 steps: beyond the relative allowance of small codes
        for name, case in cases.items():
            monkeypatch.setattr(execution, "_KERNEL_VALUES", 1 << 40)
            try:
                expected = execution.as_integers(case, "w", divisor=scale)
            except CannotCertify as err:
                expected = err
            monkeypatch.setattr(execution, "_KERNEL_VALUES", 0)
            if isinstance(expected, CannotCertify):
                with pytest.raises(CannotCertify, match=re.escape(str(expected))):
                    execution.as_integers(case, "w", divisor=scale)
                continue
            got = execution.as_integers(case, "w", divisor=scale)
            assert name == "on the grid" and np.array_equal(got, expected) and np.array_equal(got, codes)
            narrowest = next(t for t in (np.int8, np.int16, np.int32)
                             if np.iinfo(t).min <= codes.min() and codes.max() <= np.iinfo(t).max)
            assert got.dtype == (narrowest if got.ndim else np.int64)  # a 0-d value: the numpy check


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_give_their_codes_or_a_refusal_never_a_wrong_integer(dtype):
    """float16/bfloat16 dequantized weights carry half a unit in their last place: the codes come back wherever that
    cannot reach half an integer (int8 codes in float16), and the check refuses, naming the precision, where it can
    (int8 codes in bfloat16, whose 8-bit mantissa rounds 127 * 0.01; int16 codes in float16)."""
    import ml_dtypes

    from a2q_passes.certificate import execution

    low = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    scale = np.float64(0.0123)
    for codes in (np.arange(-128, 128), np.arange(-3000, 3000, 7)):
        values = (codes * scale).astype(low)  # what a low-precision DequantizeLinear returns
        tellable = np.abs(codes).max() * float(ml_dtypes.finfo(low).eps) + 1e-3 < 0.5
        if tellable:
            assert np.array_equal(execution.as_integers(values, "w", divisor=np.asarray(scale).astype(low)), codes)
        else:
            with pytest.raises(CannotCertify, match=f"{dtype} values cannot tell integers|is not integer"):
                execution.as_integers(values, "w", divisor=np.asarray(scale).astype(low))


def test_imports_nothing_from_the_reader():
    """The certificate's independence is structural: none of its modules imports the reader (layer discovery,
    weight sources, input grids, graph values, the analysis) or anything that does; only pure math, progress,
    errors and model access. A new import of the reader here would let writer and check be wrong together."""
    allowed = {"a2q_passes.bounds", "a2q_passes.progress", "a2q_passes.errors", "a2q_passes.model_io",
               "a2q_passes.tensor_store", "a2q_passes.read_only_model", "a2q_passes.numba_cache"}
    package = Path(__file__).resolve().parents[1] / "a2q_passes" / "certificate"
    files = sorted(package.glob("*.py"))
    assert len(files) >= 5
    seen = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("a2q_passes"):
                names = [node.module] if node.module != "a2q_passes" else [f"a2q_passes.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("a2q_passes")]
            else:
                continue
            for name in names:
                seen.add(name)
                assert name in allowed or name.startswith("a2q_passes.certificate"), f"{path.name} imports {name}"
    assert "a2q_passes.bounds" in seen  # the walk does see the package's imports
