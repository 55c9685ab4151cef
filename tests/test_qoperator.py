"""onnxruntime QOperator (QLinearConv, QLinearMatMul, com.microsoft QGemm) and dynamic (DynamicQuantizeLinear ->
ConvInteger / MatMulInteger) files, and weight zero points (QUInt8 weights, also in QDQ files), issue 10 items 4-5.

Every file is written at test time by onnxruntime's quantizer from one tiny float net (Conv with padding -> Relu ->
Flatten -> Gemm(transB) -> MatMul). The oracle reads nothing through the project's readers: it takes each layer's
integer operands straight from the file (weight initializer, weight zero point, the input's storage type and zero
point) and EXECUTES the integer op itself (ConvInteger / MatMulInteger, onnxruntime) on each output channel's
worst-case input codes, reading the int32 accumulator. ``subtract`` passes the zero points to the op (the ONNX
semantics, ``(x - x_zp)(w - w_zp)``); ``fold`` leaves them out, so the op multiplies the raw codes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import certify_layer
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.cli_helpers import run_cli
from tests.ort_models import conv_gemm_matmul, quantize
from tests.test_soundness_regressions import assert_fits

IN_SHAPE = (1, 2, 4, 4)
# op -> (layout it computes like, weight input, weight zero point input); input 0 is the data, input 2 its zero point
INTEGER_OPS = {"QLinearConv": ("Conv", 3, 5), "ConvInteger": ("Conv", 1, 3), "QLinearMatMul": ("MatMul", 3, 5),
               "MatMulInteger": ("MatMul", 1, 3), "QGemm": ("Gemm", 3, 5)}


VARIANTS = {  # name -> how onnxruntime quantizes the float net
    "qop_int8": dict(fmt="QOperator", weight="QInt8", act="QInt8", per_channel=False),
    "qop_int8_pc": dict(fmt="QOperator", weight="QInt8", act="QUInt8", per_channel=True),
    "qop_uint8_pc": dict(fmt="QOperator", weight="QUInt8", act="QUInt8", per_channel=True),
    "qop_uint8": dict(fmt="QOperator", weight="QUInt8", act="QUInt8", per_channel=False),
    "qdq_uint8_pc": dict(fmt="QDQ", weight="QUInt8", act="QUInt8", per_channel=True),
    "dynamic_int8": dict(fmt="dynamic", weight="QInt8", per_channel=False),
    "dynamic_uint8_pc": dict(fmt="dynamic", weight="QUInt8", per_channel=True),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("qoperator")
    float_path = folder / "float.onnx"
    assert conv_gemm_matmul(float_path) == list(IN_SHAPE)
    paths = {}
    for name, v in VARIANTS.items():
        path = folder / f"{name}.onnx"
        quantize(float_path, path, list(IN_SHAPE), v["fmt"], v["weight"], v.get("act", "QUInt8"), v["per_channel"])
        paths[name] = str(path)
    return paths


# --------------------------------------------------------------------------- the oracle


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if name in n.output), None)


def integer_operands(model: onnx.ModelProto, node: onnx.NodeProto) -> dict:
    """The file's own integer operands of one MAC node: weights as ``(K, N)`` (MatMul) or ``(M, C, kh, kw)`` (Conv),
    the weight zero point per output channel, the input's storage type and zero point (None: computed at run time)."""
    inits = _inits(model)
    if node.op_type in INTEGER_OPS:
        layout, wi, wzi = INTEGER_OPS[node.op_type]
        w, wz = inits[node.input[wi]], inits.get(node.input[wzi]) if len(node.input) > wzi else None
        x_zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        x_dtype = x_zp.dtype if x_zp is not None else np.dtype(np.uint8)  # DynamicQuantizeLinear writes uint8
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    else:  # QDQ: the DequantizeLinear nodes in front of the float op
        layout = node.op_type
        w_dq, x_dq = _producer(model, node.input[1]), _producer(model, node.input[0])
        w, wz = inits[w_dq.input[0]], inits[w_dq.input[2]]
        x_zp = inits[x_dq.input[2]]
        x_dtype = x_zp.dtype
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if layout == "Gemm" and trans_b:  # (N, K) -> (K, N); per-row zero points become per-column
        w = w.T
    channels = w.shape[0] if layout == "Conv" else w.shape[1]
    wz = np.zeros(channels, w.dtype) if wz is None else np.broadcast_to(np.asarray(wz).reshape(-1), (channels,))
    return dict(conv=layout == "Conv", w=np.ascontiguousarray(w), wz=np.ascontiguousarray(wz), x_dtype=x_dtype,
                x_zp=None if x_zp is None else np.asarray(x_zp).reshape(()), attrs=node.attribute)


def _run_integer_op(ops: dict, x: np.ndarray, x_zp: np.ndarray | None, subtract: bool) -> np.ndarray:
    """int32 accumulator of ConvInteger / MatMulInteger on codes ``x`` (ONNX's reference implementation: onnxruntime's
    u8s8 kernels on AVX2 CPUs without VNNI saturate pairs of products in 16 bits, so they are no exact oracle)."""
    if ops["conv"] and subtract and np.unique(ops["wz"]).size > 1:
        # onnxruntime's ConvInteger takes one weight zero point: run each output channel on its own
        return np.concatenate([_run_integer_op({**ops, "w": ops["w"][c:c + 1], "wz": ops["wz"][c:c + 1]}, x, x_zp, True)
                               for c in range(ops["wz"].size)], axis=1)
    inputs = ["x", "w"] + (["x_zp", "w_zp"] if subtract else [])
    inits = [numpy_helper.from_array(ops["w"], "w")]
    if subtract:
        inits += [numpy_helper.from_array(np.asarray(x_zp, ops["x_dtype"]).reshape(()), "x_zp"),
                  numpy_helper.from_array(ops["wz"][0].reshape(()) if ops["conv"] else ops["wz"], "w_zp")]
    if ops["conv"]:
        node = helper.make_node("ConvInteger", inputs, ["acc"])
        node.attribute.extend(a for a in ops["attrs"] if a.name in ("pads", "strides", "dilations", "group", "kernel_shape"))
    else:
        node = helper.make_node("MatMulInteger", inputs, ["acc"])
    elem = helper.np_dtype_to_tensor_dtype(ops["x_dtype"])
    graph = helper.make_graph([node], "integer_op", [helper.make_tensor_value_info("x", elem, list(x.shape))],
                              [helper.make_tensor_value_info("acc", onnx.TensorProto.INT32, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(proto).run(None, {"x": x})[0]


def executed_extremes(model: onnx.ModelProto, node_name: str, zero_point: str,
                      input_zero_points: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (min, max) of the executed accumulator over each channel's worst-case input codes.

    ``input_zero_points``: the values a run-time input zero point is executed with (DynamicQuantizeLinear).
    """
    node = next(n for n in model.graph.node if (n.name or n.output[0]) == node_name)
    ops = integer_operands(model, node)
    subtract = zero_point == "subtract"
    info = np.iinfo(ops["x_dtype"])
    w = ops["w"].astype(np.int64)
    w_eff = (w - ops["wz"].reshape((-1, 1, 1, 1) if ops["conv"] else (1, -1))) if subtract else w
    channels = ops["wz"].size
    lows, highs = np.full(channels, np.inf), np.full(channels, -np.inf)
    zero_points = input_zero_points or (0 if ops["x_zp"] is None else int(ops["x_zp"]),)
    for z in zero_points:
        batch = []
        for c in range(channels):
            for sign in (1, -1):  # codes that maximise (+1) or minimise (-1) channel c
                row = w_eff[c] if ops["conv"] else w_eff[:, c]
                codes = np.where(sign * row > 0, info.max, info.min)
                if ops["conv"]:  # output pixel (1, 1) of the padded 3x3 Conv reads input rows/cols 0..2
                    x = np.full(IN_SHAPE[1:], info.min, ops["x_dtype"])
                    x[:, :3, :3] = codes
                else:
                    x = codes
                batch.append(x.astype(ops["x_dtype"]))
        acc = _run_integer_op(ops, np.stack(batch), np.asarray(z), subtract).astype(np.int64)
        acc = acc[:, :, 1, 1] if ops["conv"] else acc
        per_channel = acc[np.arange(2 * channels), np.repeat(np.arange(channels), 2)].reshape(channels, 2)
        highs, lows = np.maximum(highs, per_channel[:, 0]), np.minimum(lows, per_channel[:, 1])
    return lows.astype(np.int64), highs.astype(np.int64)


def _mac_nodes(model: ModelWrapper) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in (*INTEGER_OPS, "Conv", "Gemm", "MatMul")]


def _structure(model: ModelWrapper) -> list[tuple[str, ...]]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    return sorted((n.domain, n.op_type, *(str(types.get(x, "")) for x in n.input)) for n in model.graph.node)


def _dynamic(name: str) -> bool:
    return name.startswith("dynamic")


# --------------------------------------------------------------------------- analyze against execution


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_analyze_matches_executed_integer_op(quantized, name, zero_point):
    model = ModelWrapper(quantized[name])
    report = analyze_model(model, zero_point=zero_point, per_channel=True)
    assert [r.node for r in report.layers] == _mac_nodes(model)
    for layer in report.layers:
        assert layer.status == "ok", (layer.node, layer.status)
        r_lo, r_hi = np.array(layer.per_channel["acc_min"]), np.array(layer.per_channel["acc_max"])
        if _dynamic(name) and zero_point == "subtract":
            # the zero point is chosen per run: x - z spans [-z, 255 - z]; the analysis covers every z in 0..255
            # (the extremes are at z = 0 and z = 255, executed here), within one bit of any single run
            lo, hi = executed_extremes(model.model, layer.node, zero_point, input_zero_points=(0, 255))
            assert (r_lo <= lo).all() and (r_hi >= hi).all(), (layer.node, r_lo, lo, r_hi, hi)
            assert (np.maximum(-r_lo, r_hi) <= 2 * np.maximum(-lo, hi)).all()
        else:
            lo, hi = executed_extremes(model.model, layer.node, zero_point)
            assert np.array_equal(r_lo, lo) and np.array_equal(r_hi, hi), (layer.node, r_lo, lo, r_hi, hi)
        # the independent certificate (what every promise is checked against) agrees channel by channel
        certificate = certify_layer(model, layer.node, zero_point=zero_point)
        assert certificate.channel_min == tuple(r_lo) and certificate.channel_max == tuple(r_hi)


def test_weight_zero_points_are_read_not_refused(quantized):
    """QUInt8 weights carry non-zero per-channel zero points (the case layers.py refused before)."""
    for name in ("qop_uint8_pc", "qdq_uint8_pc", "dynamic_uint8_pc"):
        model = onnx.load(quantized[name])
        nodes = [n for n in model.graph.node if n.name in _mac_nodes(ModelWrapper(model))]
        with_zero_point = {n.name for n in nodes if np.any(integer_operands(model, n)["wz"] != 0)}
        assert with_zero_point, name
        for zero_point in ("fold", "subtract"):  # each report says which convention its numbers follow
            reports = analyze_model(ModelWrapper(model), zero_point=zero_point).by_node()
            assert all(reports[n].zero_point_convention == zero_point for n in with_zero_point)


# --------------------------------------------------------------------------- project, then execute


@pytest.mark.parametrize("name,zero_point", [
    ("qop_int8", "fold"), ("qop_int8_pc", "subtract"), ("qop_uint8_pc", "subtract"), ("qop_uint8", "subtract"),
    ("qdq_uint8_pc", "subtract"), ("dynamic_int8", "fold"), ("dynamic_uint8_pc", "subtract"),
])
def test_project_in_place_fits_when_executed(quantized, tmp_path, name, zero_point):
    model = ModelWrapper(quantized[name])
    target = min(r.bounds["exact"] for r in analyze_model(model, zero_point=zero_point).layers) - 3
    before = _structure(model)
    projection = ProjectToAccumulator(target, zero_point=zero_point)
    projected = model.transform(projection)
    assert all(p.status == "projected" and p.width_after <= target for p in projection.projections)
    assert _structure(projected) == before  # same ops, same initializer dtypes: written back in place
    zps = (0, 255) if _dynamic(name) and zero_point == "subtract" else None
    for p in projection.projections:
        lo, hi = executed_extremes(projected.model, p.node, zero_point, input_zero_points=zps)
        assert_fits(np.concatenate([lo, hi]), target, p.acc_dtype_after)
    out = tmp_path / "projected.onnx"
    projected.save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.random.default_rng(2).normal(size=IN_SHAPE).astype(np.float32)})[0]
    assert np.all(np.isfinite(y))
    # the CLI's verify proves the projected file at the target and refuses the original there
    code, stdout, stderr = run_cli("verify", out, "--acc-bits", target, "--zero-point", zero_point)
    assert code == 0, stdout + stderr
    code, stdout, stderr = run_cli("verify", quantized[name], "--acc-bits", target, "--zero-point", zero_point)
    assert code == 3, stdout + stderr


@pytest.mark.parametrize("name", ["qop_uint8_pc", "qdq_uint8_pc"])
def test_project_refuses_weight_zero_points_under_fold(quantized, tmp_path, name):
    """Under fold the MAC multiplies raw weight codes, whose 0 is not a zero weight: project refuses by name."""
    out = tmp_path / "p.onnx"
    code, stdout, stderr = run_cli("project", quantized[name], out, "--acc-bits", 16)
    assert code == 1 and "Traceback" not in stdout + stderr
    assert "zero point" in stderr and "--zero-point subtract" in stderr
    unread = [n for n in _mac_nodes(ModelWrapper(quantized[name]))
              if np.any(integer_operands(onnx.load(quantized[name]),
                                         next(x for x in onnx.load(quantized[name]).graph.node if x.name == n))["wz"])]
    assert unread and all(f"'{n}'" in stderr for n in unread)
    assert not out.exists()
    # analyze and annotate still read them (raw codes)
    assert run_cli("annotate", quantized[name], tmp_path / "a.onnx")[0] == 0


# --------------------------------------------------------------------------- refusals, by name


def _matmul_integer_model(zp_axis: int | None, op: str = "MatMulInteger", domain: str = "") -> ModelWrapper:
    """uint8 graph input (no zero point given: 0) -> integer MatMul of (3, 2) uint8 weights; ``zp_axis`` 0 puts the
    weight zero points along K through a QDQ MatMul instead (one per input row, not per output channel)."""
    w = np.array([[3, 250], [128, 0], [7, 99]], np.uint8)
    if zp_axis is None:
        nodes = [helper.make_node(op, ["x", "w", "", "wz"], ["y"], name="mm", domain=domain)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([128, 100], np.uint8), "wz")]
        x = helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 3])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 2])
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=zp_axis),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.1), "s"),
                 numpy_helper.from_array(np.uint8(3), "xz"), numpy_helper.from_array(np.full(3, 0.5, np.float32), "ws"),
                 numpy_helper.from_array(np.array([128, 100, 9], np.uint8), "wz")]
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    return ModelWrapper(proto)


def test_integer_input_without_zero_point_matches_execution():
    model = _matmul_integer_model(None)
    for zero_point in ("fold", "subtract"):
        layer = analyze_model(model, zero_point=zero_point, per_channel=True).layers[0]
        assert layer.status == "ok" and layer.input_range == [0, 255]
        lo, hi = executed_extremes(model.model, "mm", zero_point)
        assert layer.per_channel["acc_min"] == list(lo) and layer.per_channel["acc_max"] == list(hi)


def test_qgemm_outside_com_microsoft_is_not_read_as_one():
    model = _matmul_integer_model(None, op="QGemm", domain="com.example")
    assert analyze_model(model).layers == []


def test_weight_zero_points_along_the_accumulation_axis_are_analysed_but_not_projected(tmp_path):
    """DequantizeLinear zero points along K (axis 0 of a MatMul weight): each term has its own ``w - z``, which analyze
    reads elementwise; project needs one zero point per output channel and refuses by name."""
    model = _matmul_integer_model(zp_axis=0)
    layer = analyze_model(model, zero_point="subtract", per_channel=True).layers[0]
    assert layer.status == "ok"
    w_eff = np.array([[3, 250], [128, 0], [7, 99]]) - np.array([[128], [100], [9]])
    codes = np.array([0 - 3, 255 - 3])  # uint8 activation codes minus the activation zero point 3
    brute = [[int(sum(max(w * codes) if s > 0 else min(w * codes) for w in w_eff[:, c])) for c in range(2)]
             for s in (-1, 1)]
    assert layer.per_channel["acc_min"] == brute[0] and layer.per_channel["acc_max"] == brute[1]
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    model.save(str(path))
    code, stdout, stderr = run_cli("project", path, out, "--acc-bits", 12, "--zero-point", "subtract")
    assert code == 1 and "'mm'" in stderr and "accumulation axis" in stderr and not out.exists()


@pytest.mark.parametrize("seed", range(8))
def test_random_integer_matmuls_match_execution_and_project(seed):
    """Random QLinearMatMul / MatMulInteger layers: int8 or uint8 weights and inputs, random per-tensor or per-column
    weight zero points and input zero point; analyze and the certificate equal execution under both conventions,
    and a projection (subtract) below the exact width executes within its promise."""
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(1, 24)), int(rng.integers(1, 5))
    w_dtype, x_dtype = (np.dtype(rng.choice([np.int8, np.uint8])) for _ in range(2))
    w_info, x_info = np.iinfo(w_dtype), np.iinfo(x_dtype)
    w = rng.integers(w_info.min, w_info.max + 1, (k, n)).astype(w_dtype)
    wz = rng.integers(w_info.min, w_info.max + 1, n if rng.random() < 0.5 else 1).astype(w_dtype)
    xz = np.asarray(rng.integers(x_info.min, x_info.max + 1), x_dtype)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wz if wz.size > 1 else wz.reshape(()), "wz"),
             numpy_helper.from_array(xz, "xz")]
    if rng.random() < 0.5:
        inits += [numpy_helper.from_array(np.float32(0.02), s) for s in ("xs", "ws", "ys")]
        inits.append(numpy_helper.from_array(np.asarray(0, x_dtype), "yz"))
        node = helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="mm")
        out_type = helper.np_dtype_to_tensor_dtype(x_dtype)
    else:
        node = helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"], name="mm")
        out_type = onnx.TensorProto.INT32
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x_dtype), [1, k])],
                              [helper.make_tensor_value_info("y", out_type, [1, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = ModelWrapper(proto)
    for zero_point in ("fold", "subtract"):
        layer = analyze_model(model, zero_point=zero_point, per_channel=True).layers[0]
        lo, hi = executed_extremes(model.model, "mm", zero_point)
        assert layer.per_channel["acc_min"] == list(lo) and layer.per_channel["acc_max"] == list(hi), zero_point
        certificate = certify_layer(model, "mm", zero_point=zero_point)
        assert certificate.channel_min == tuple(lo) and certificate.channel_max == tuple(hi)
    exact = analyze_model(model, zero_point="subtract").layers[0].bounds["exact"]
    projection = ProjectToAccumulator(max(exact - 2, 12), zero_point="subtract")
    projected = model.transform(projection)
    p = projection.projections[0]
    lo, hi = executed_extremes(projected.model, "mm", "subtract")
    assert_fits(np.concatenate([lo, hi]), p.target_bits, p.acc_dtype_after)
    assert _onnxruntime_loads(projected.model) == _onnxruntime_loads(proto)  # some type pairs have no kernel at all


def _onnxruntime_loads(proto: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except ort.capi.onnxruntime_pybind11_state.NotImplemented:
        return False
    return True


def test_per_channel_zero_points_share_one_signed_accumulator():
    """Channel 0 (zero point 0, all weights positive) never goes below 0 on uint8 inputs, channel 1 (zero point 200)
    does: the layer's accumulator is INT P, so channel 0 must fit INT P's non-negative half, not UINT P."""
    w = np.array([[200, 10], [200, 250], [200, 190]], np.uint8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 200], np.uint8), "wz"),
             numpy_helper.from_array(np.uint8(0), "xz")]
    node = helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = ModelWrapper(proto)
    lo, hi = executed_extremes(model.model, "mm", "subtract")
    assert lo[0] == 0 and hi[0] == 3 * 200 * 255 and lo[1] < 0  # channel 0 needs UINT18, not INT17
    projection = ProjectToAccumulator(17, zero_point="subtract")
    projected = model.transform(projection)
    lo, hi = executed_extremes(projected.model, "mm", "subtract")
    assert_fits(np.concatenate([lo, hi]), 17, projection.projections[0].acc_dtype_after)
    assert projection.projections[0].acc_dtype_after == "INT17"


def test_shapes_after_a_contrib_op_come_from_onnxruntime(quantized):
    """ONNX's shape inference knows no com.microsoft op, so nothing after a QGemm had a shape (an act x act
    QLinearMatMul there had no K); onnxruntime types those tensors when it builds a session."""
    from a2q_passes.read_only_model import with_inferred_shapes

    model = ModelWrapper(quantized["qop_int8_pc"])
    qgemm = next(n for n in model.graph.node if n.op_type == "QGemm")
    onnx_only = onnx.shape_inference.infer_shapes(model.model)
    assert qgemm.output[0] not in {vi.name for vi in onnx_only.graph.value_info}
    inferred = with_inferred_shapes(model)
    assert inferred.get_tensor_shape(qgemm.output[0]) == [1, 6]
    assert inferred.get_tensor_datatype(qgemm.output[0]) is not None
