"""QDQ formats of issue 10: Brevitas QCDQ exports (Clip-narrowed int8/uint8 containers) and
opset-21 int4/uint4/int16/uint16 QDQ files written by onnxruntime's quantizer.

Every file is written at test time by the real exporter / quantizer. Each layer's analyzed range
is checked against onnxruntime EXECUTING the graph on the worst-case vertex of the input box of
each output channel: the input of the activation quantizer is driven to +-BIG along the signs of
that channel's executed weights, so the graph's own QuantizeLinear/Clip chain picks the extreme
codes (nothing here reads the code range from the project's readers). ``project`` at a tight P
is then executed the same way.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.analysis import analyze_model
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.brevitas_nets import build_qcdq_net
from tests.cli_helpers import run_cli
from tests.ort_models import matmul_conv, quantize
from tests.test_soundness_regressions import assert_fits

BIG = 1e4  # far beyond every quantizer's range: QuantizeLinear saturates, Clip clamps


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == name)
    return numpy_helper.to_array(init)


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if name in n.output), None)


def executed_extremes(model: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (min, max) of the integer accumulator of MAC ``node_name``, fold convention,
    from onnxruntime executing the graph from the float input of the layer's activation quantizer."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    mac = next(n for n in model.graph.node if (n.name or n.output[0]) == node_name)
    del mac.input[2:]  # the bias is no part of the accumulator's products
    dq = _producer(model, mac.input[0])
    assert dq.op_type == "DequantizeLinear"
    q = _producer(model, dq.input[0])
    while q.op_type == "Clip":
        q = _producer(model, q.input[0])
    assert q.op_type == "QuantizeLinear"
    x_scale = float(_const(model, dq.input[1]))
    x_zero = int(np.asarray(_const(model, dq.input[2])).astype(np.int64)) if len(dq.input) > 2 and dq.input[2] else 0
    # cut the graph at the quantizer's float input: it becomes the graph input "drive"
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input)}
    in_shape = [d.dim_value or 1 for d in shapes[q.input[0]].type.tensor_type.shape.dim]
    q.input[0] = "drive"
    del model.graph.output[:]
    model.graph.output.extend([helper.make_empty_tensor_value_info(mac.output[0]),
                               helper.make_empty_tensor_value_info(mac.input[1])])
    model.graph.input.append(helper.make_tensor_value_info("drive", onnx.TensorProto.FLOAT, in_shape))
    sub = model
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {vi.name: np.zeros([d.dim_value or 1 for d in vi.type.tensor_type.shape.dim], np.float32)
             for vi in sub.graph.input[:-1] if vi.name not in {i.name for i in sub.graph.initializer}}

    # the executed weights in the MAC's layout, divided by the weight DequantizeLinear's scale
    w_dq = _producer(model, mac.input[1])
    while w_dq.op_type != "DequantizeLinear":
        w_dq = _producer(model, w_dq.input[0])
    w_scale = np.asarray(_const(model, w_dq.input[1]), dtype=np.float64).reshape(-1)
    probe = session.run(None, {**feeds, "drive": np.zeros(in_shape, np.float32)})[1].astype(np.float64)
    conv = mac.op_type == "Conv"
    trans_b = any(a.name == "transB" and a.i for a in mac.attribute)
    rows = probe.reshape(probe.shape[0], -1) if conv else (probe if trans_b else probe.T)  # (C, K)
    channels = rows.shape[0]
    w_scale = np.broadcast_to(w_scale, (channels,))
    q_rows = np.rint(rows / w_scale[:, None])
    assert np.allclose(rows / w_scale[:, None], q_rows, atol=1e-3)

    groups = next((a.i for a in mac.attribute if a.name == "group"), 1)
    inputs = []
    for c in range(channels):
        for sign in (1.0, -1.0):
            if conv:  # one output pixel: the top-left window of the channel's group
                w = q_rows[c].reshape(probe.shape[1:])
                x = np.zeros(in_shape, np.float32)
                g = c // (channels // groups)
                cin = w.shape[0]
                x[0, g * cin:(g + 1) * cin, :w.shape[1], :w.shape[2]] = np.where(w > 0, sign, -sign) * BIG
            else:
                x = (np.where(q_rows[c] > 0, sign, -sign) * BIG).astype(np.float32).reshape(in_shape)
            inputs.append(x)
    lows, highs = np.zeros(channels), np.zeros(channels)
    for c in range(channels):
        accs = []
        for x in inputs[2 * c:2 * c + 2]:
            y = session.run(None, {**feeds, "drive": x})[0].astype(np.float64)
            y = y[0, c, 0, 0] if conv else y.reshape(-1)[c]
            acc = y / (x_scale * w_scale[c])
            accs.append(acc + x_zero * q_rows[c].sum())  # fold: the MAC sums raw codes
        lows[c], highs[c] = min(accs), max(accs)
    return lows, highs


def assert_matches_execution(model: ModelWrapper, report, exact: bool = True) -> None:
    """Each channel's analyzed range equals (``exact``) or, within float32 error, contains the executed one."""
    assert report.status == "ok", report.status
    lo, hi = executed_extremes(model.model, report.node)
    r_lo, r_hi = np.array(report.per_channel["acc_min"]), np.array(report.per_channel["acc_max"])
    if exact:
        assert np.allclose(lo, np.rint(lo), atol=1e-3) and np.allclose(hi, np.rint(hi), atol=1e-3)
        assert (r_lo == np.rint(lo)).all() and (r_hi == np.rint(hi)).all(), (report.node, r_lo, lo, r_hi, hi)
    else:  # int16 codes: accumulators beyond 2^24 are rounded by the float32 MAC
        assert np.allclose(r_lo, lo, rtol=1e-5) and np.allclose(r_hi, hi, rtol=1e-5), (report.node, r_lo, lo, r_hi, hi)


def check_project(model: ModelWrapper, margin: int, exact: bool = True) -> ModelWrapper:
    """Project every layer ``margin`` bits below its exact width, then execute the projected graph."""
    target = min(r.bounds["exact"] for r in analyze_model(model).layers) - margin
    projection = ProjectToAccumulator(target)
    projected = model.transform(projection)
    after = {r.node: r for r in analyze_model(projected, per_channel=True).layers}
    for p in projection.projections:
        assert_matches_execution(projected, after[p.node], exact)
        lo, hi = executed_extremes(projected.model, p.node)
        if exact:
            assert_fits(np.rint(np.concatenate([lo, hi])).astype(np.int64), target, p.acc_dtype_after)
        else:
            assert after[p.node].bounds["exact"] <= target
    return projected


def _structure(model: ModelWrapper) -> list[tuple[str, ...]]:
    """Op types and initializer element types: project must keep the file's quantizer chain and storage."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    return sorted((n.op_type, *(str(types.get(x, "")) for x in n.input)) for n in model.graph.node)


# --------------------------------------------------------------------------- Brevitas QCDQ


@pytest.mark.parametrize("kind,wbits,abits,signed_act,dynamo", [
    ("conv", 2, 2, False, True),     # uint8 clipped to [0, 3], int8 weights clipped to [-2, 1]
    ("linear", 8, 4, True, False),   # TorchScript: int8 weight constants, narrow Clip [-127, 127]
    ("conv", 4, 8, False, False),
    ("linear", 4, 2, True, True),
])
def test_brevitas_qcdq_export_reads_clip_bounds(tmp_path, kind, wbits, abits, signed_act, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_qcdq_net(tmp_path, kind, wbits, abits, signed_act, dynamo=dynamo)
    assert any(n.op_type == "Clip" for n in net.model.graph.node)
    report = analyze_model(net.model, per_channel=True)
    assert len(report.layers) == 2
    for layer, (q, lo, hi) in zip(report.layers, net.expected):
        assert layer.status == "ok", layer.status
        assert layer.input_range == [lo, hi]  # Brevitas' own activation range, not the int8/uint8 container
        assert layer.input_dtype == f"{'INT' if signed_act else 'UINT'}{abits}"
        assert_matches_execution(net.model, layer)
    before = _structure(net.model)
    projected = check_project(net.model, margin=2)
    assert _structure(projected) == before
    projected.save(str(tmp_path / "projected.onnx"))  # a valid file: onnxruntime loads it
    ort.InferenceSession(str(tmp_path / "projected.onnx"), providers=["CPUExecutionProvider"])


def test_qcdq_weight_clip_limits_projection_to_the_clip_range(tmp_path):
    """Narrow int8 weights (Clip [-127, 127]) must never be written as -128, which the Clip would change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_qcdq_net(tmp_path, "linear", 8, 4, True, dynamo=False)
    layers = analyze_model(net.model).layers
    assert all(r.weight_dtype == "INT8" for r in layers)
    from a2q_passes.layers import find_mac_layers

    for layer in find_mac_layers(net.model):
        assert (layer.source.weight_range.lo, layer.source.weight_range.hi) == (-127, 127)


def test_clip_with_min_above_max_is_refused_by_name():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(np.uint8(5), "lo"), numpy_helper.from_array(np.uint8(2), "hi"),
             numpy_helper.from_array(np.array([[1, -1], [2, 0], [-3, 1]], np.int8), "wq"),
             numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"], name="bad_clip"),
             helper.make_node("DequantizeLinear", ["xc", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "wz"], ["w"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    model = ModelWrapper(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                           opset_imports=[helper.make_opsetid("", 13)]))
    layer = analyze_model(model).layers[0]
    assert layer.status.startswith("input not quantized") and "bad_clip" in layer.status and "min" in layer.status


def _clipped_qdq_model(act_clip: tuple[int, int] | None, weight_clip: tuple[int, int] | None, zero_point: int = 0,
                       conv: bool = False) -> ModelWrapper:
    """uint8 activation QDQ (zero point ``zero_point``) and int8 constant weights, each optionally behind a
    QCDQ Clip; a MatMul (3 -> 2), or a 3x3 Conv with one pixel of padding (where padded taps carry code z)."""
    shape = [1, 1, 4, 4] if conv else [1, 3]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4] if conv else [1, 2])
    wq = np.full((1, 1, 3, 3), 127, np.int8) if conv else np.array([[1, -1], [0, 0], [-3, 127]], np.int8)
    inits = [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(zero_point), "z"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.float32(0.25), "ws"),
             numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="act_q")]
    xq, w_codes = "xq", "wq"
    if act_clip:
        inits += [numpy_helper.from_array(np.uint8(act_clip[0]), "alo"), numpy_helper.from_array(np.uint8(act_clip[1]), "ahi")]
        nodes.append(helper.make_node("Clip", ["xq", "alo", "ahi"], ["xc"], name="act_clip"))
        xq = "xc"
    if weight_clip:
        inits += [numpy_helper.from_array(np.int8(weight_clip[0]), "wlo"), numpy_helper.from_array(np.int8(weight_clip[1]), "whi")]
        nodes.append(helper.make_node("Clip", ["wq", "wlo", "whi"], ["wc"], name="weight_clip"))
        w_codes = "wc"
    nodes += [helper.make_node("DequantizeLinear", [xq, "s", "z"], ["xd"], name="act_dq"),
              helper.make_node("DequantizeLinear", [w_codes, "ws", "wz"], ["w"], name="weight_dq")]
    if conv:
        nodes.append(helper.make_node("Conv", ["xd", "w"], ["y"], name="mac", pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "w"], ["y"], name="mac"))
    return ModelWrapper(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                          opset_imports=[helper.make_opsetid("", 13)]))


def test_weight_clip_excluding_zero_is_refused_by_name(tmp_path):
    """Regression (fuzzer, qcdq_clip): int8 weights clipped to [1, 3] made ``a2q project`` leak a ValueError
    traceback ("weight range [1, 3] must contain 0"). Such a Clip turns a stored 0 into 1 (executed below), so
    project could never write the zero weights it shrinks to: the layer is refused, naming the Clip."""
    model = _clipped_qdq_model(None, (1, 3))
    session = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    executed = session.run(None, {"x": np.eye(1, 3, 1, dtype=np.float32) * 1e4})[0]  # row 1 of the weights: codes 0
    assert np.allclose(executed / (0.5 * 0.25), 255 * 1)  # the stored zeros execute as +1
    layer = analyze_model(model).layers[0]
    assert layer.status.startswith("unsupported") and "weight_clip" in layer.status and "excludes 0" in layer.status
    path = tmp_path / "m.onnx"
    model.save(str(path))
    code, out, err = run_cli("project", path, tmp_path / "p.onnx", "--acc-bits", "16")
    assert code == 1 and "Traceback" not in out + err
    assert "'mac'" in err and "weight_clip" in err and "excludes 0" in err
    assert not (tmp_path / "p.onnx").exists()
    for args in (("analyze", path), ("verify", path, "--acc-bits", "16")):
        code, out, err = run_cli(*args)
        assert code == 3 and "Traceback" not in out + err and "no overflow possible" not in out


@pytest.mark.parametrize("act_clip,zero_point", [((10, 20), 0), ((10, 20), 15), ((3, 9), 200)])
def test_activation_clip_sub_range_matches_execution(act_clip, zero_point):
    """The fuzzer's qcdq_clip violations on activations (analyze [20, 296] vs "executed" [-1528, 1532]) were an
    oracle bug: it fed the Clip's output codes directly over the whole int8 range. Executed by onnxruntime
    from the quantizer's float input, the analysed range is exact, also for a zero point outside the Clip."""
    model = _clipped_qdq_model(act_clip, None, zero_point)
    layer = analyze_model(model, per_channel=True).layers[0]
    assert layer.input_range == list(act_clip)
    assert_matches_execution(model, layer)


def test_activation_clip_excluding_the_zero_point_counts_padded_taps():
    """Conv padding under the fold convention: padded taps carry code z = 100, outside the Clip [10, 20]. The
    executed worst case (onnxruntime, raw codes) is 4 * 127 * 20 + 5 * 127 * 100 = 73660 at a corner pixel:
    analyze must cover it and verify must not promise 16 bits."""
    model = _clipped_qdq_model((10, 20), None, 100, conv=True)
    session = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    executed = [session.run(None, {"x": np.full((1, 1, 4, 4), v, np.float32)})[0] / (0.5 * 0.25) + 100 * 127 * 9
                for v in (1e4, -1e4)]
    lo, hi = min(float(e.min()) for e in executed), max(float(e.max()) for e in executed)
    assert (lo, hi) == (11430.0, 73660.0)
    layer = analyze_model(model, per_channel=True).layers[0]
    assert layer.status == "ok" and layer.acc_min <= lo and layer.acc_max >= hi
    assert layer.input_range[0] <= 10 and layer.input_range[1] >= 100


# --------------------------------------------------------------------------- onnxruntime int4 / int16 QDQ


def _ort_qdq(tmp_path, weight_type: str, activation_type: str) -> ModelWrapper:
    """MatMul -> Relu -> Reshape -> Conv, quantized by onnxruntime's quantize_static (opset 21)."""
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / f"qdq_{weight_type}_{activation_type}.onnx"
    x_shape = matmul_conv(float_path)
    quantize(float_path, qdq_path, x_shape, "QDQ", weight_type, activation_type, per_channel=True,
             extra_options={"WeightSymmetric": True})
    return ModelWrapper(str(qdq_path))


@pytest.mark.parametrize("weight_type,activation_type,wdtype,adtype,exact", [
    ("QInt4", "QUInt4", "INT4", "UINT4", True),
    ("QInt4", "QInt4", "INT4", "INT4", True),
    ("QInt16", "QUInt16", "INT16", "UINT16", False),
])
def test_onnxruntime_int4_int16_qdq(tmp_path, weight_type, activation_type, wdtype, adtype, exact):
    model = _ort_qdq(tmp_path, weight_type, activation_type)
    report = analyze_model(model, per_channel=True)
    assert [r.op_type for r in report.layers] == ["MatMul", "Conv"]
    for layer in report.layers:
        assert (layer.status, layer.weight_dtype, layer.input_dtype) == ("ok", wdtype, adtype)
        assert_matches_execution(model, layer, exact)
    before = _structure(model)
    projected = check_project(model, margin=2, exact=exact)
    assert _structure(projected) == before  # weights written back as int4 / int16 initializers


@pytest.mark.parametrize("act_type,weight_type,act_zero", [(onnx.TensorProto.INT2, onnx.TensorProto.INT2, 0),
                                                           (onnx.TensorProto.UINT2, onnx.TensorProto.INT4, 1),
                                                           (onnx.TensorProto.UINT8, onnx.TensorProto.INT2, 128)])
def test_two_bit_qdq_codes_are_read_proven_and_simulated(act_type, weight_type, act_zero, tmp_path):
    """Opset 25's 2-bit Q/DQ types (onnxruntime executes them): every range the worst case executes to (the corpus'
    oracle, on the file's own quantizers), `project`'s output executed at P, `verify --data`'s overflow counts
    against the executed accumulators, under both zero-point conventions. Before, `analyze` read 2-bit activations
    but `verify` and `project` could not certify them ("dequantizes storage type INT2"), and `verify --data` could
    not run them (onnxruntime's binding takes no 2-bit array)."""
    from scripts.corpus import Entry, check

    rng = np.random.default_rng(0)
    lo = -2 if weight_type == onnx.TensorProto.INT2 else -8
    codes = rng.integers(lo, -lo, (16, 4))
    inits = [helper.make_tensor("Wq", weight_type, [16, 4], codes.flatten().tolist()),
             helper.make_tensor("wz", weight_type, [], [0]), helper.make_tensor("xz", act_type, [], [act_zero]),
             numpy_helper.from_array(np.float32(0.3), "xs"), numpy_helper.from_array(np.float32(0.05), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits)
    path = tmp_path / "two_bit.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)]), str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # the precondition: onnxruntime runs it
    for convention in ("fold", "subtract"):
        result = check(Entry(path.stem, "2-bit QDQ", path, zero_point=convention), tmp_path / convention)
        assert result.status == "handled" and result.tight == 1 and result.simulated > 0, (result.detail, result.notes)
