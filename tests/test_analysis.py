"""Graph analysis on real exported models, checked against Brevitas's own integers and executed adversarial inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes import bounds
from a2q_passes.analysis import analyze_model
from a2q_passes.metadata import recorded_accumulators
from a2q_passes.transforms import AnalyzeAccumulators, AnnotateAccumulators
from tests.brevitas_nets import build_net

CONFIGS = [
    ("conv", 4, 4, False, True),
    ("conv", 2, 2, False, False),
    ("conv", 8, 8, True, True),
    ("linear", 4, 4, False, False),
    ("linear", 8, 8, True, True),
    ("linear", 3, 6, True, False),
    ("conv", 6, 5, False, True),
]


def adversarial_value(mac: torch.nn.Module, q: np.ndarray, lo: int, hi: int, channel: int, maximise: bool) -> int:
    """Run the layer's integer weights on the worst-case input for one channel (float64 holds these exactly)."""
    w = torch.tensor(q, dtype=torch.float64)
    if isinstance(mac, torch.nn.Conv2d):
        groups, c_in = mac.groups, mac.in_channels
        w = w.reshape(mac.out_channels, c_in // groups, *mac.kernel_size)
        g = channel // (mac.out_channels // groups)
        patch = torch.zeros(1, c_in, *mac.kernel_size, dtype=torch.float64)
        sel = w[channel] > 0 if maximise else w[channel] <= 0
        patch[0, g * (c_in // groups):(g + 1) * (c_in // groups)] = torch.where(sel, float(hi), float(lo))
        out = torch.nn.functional.conv2d(patch, w, groups=groups)
        return int(out[0, channel, 0, 0].item())
    x = torch.where(w[channel] > 0 if maximise else w[channel] <= 0, float(hi), float(lo)).to(torch.float64)
    return int((w @ x)[channel].item())


@pytest.mark.parametrize("kind,wbits,abits,signed_act,per_channel", CONFIGS)
def test_brevitas_export_matches_brevitas_integers(tmp_path, kind, wbits, abits, signed_act, per_channel):
    net = build_net(tmp_path, kind, wbits, abits, signed_act, per_channel)
    report = analyze_model(net.model, per_channel=True)
    assert [r.op_type for r in report.layers] == (["Conv", "Conv"] if kind == "conv" else ["Gemm", "Gemm"])
    for r, mac, (q, lo, hi) in zip(report.layers, net.module.macs(), net.expected):
        assert r.status == "ok"
        assert r.input_dtype == f"{'INT' if signed_act else 'UINT'}{abits}"
        assert r.weight_dtype == f"INT{wbits}"
        assert r.input_range == [lo, hi] and (r.channels, r.K) == q.shape
        for c in range(q.shape[0]):
            top = adversarial_value(mac, q, lo, hi, c, maximise=True)
            bottom = adversarial_value(mac, q, lo, hi, c, maximise=False)
            assert (r.per_channel["acc_min"][c], r.per_channel["acc_max"][c]) == (bottom, top)
        # the layer width is safe for the executed extremes and one bit less is not
        width = r.bounds["exact"]
        assert r.acc_min == min(r.per_channel["acc_min"]) and r.acc_max == max(r.per_channel["acc_max"])
        lo_lim, hi_lim = bounds.accumulator_limits(width, signed=r.acc_min < 0)
        assert lo_lim <= r.acc_min and r.acc_max <= hi_lim
        lo_lim, hi_lim = bounds.accumulator_limits(width - 1, signed=r.acc_min < 0)
        assert r.acc_min < lo_lim or r.acc_max > hi_lim
        assert r.bounds["exact"] <= r.bounds["l1"] <= r.bounds["datatype"]


def test_annotate_keeps_execution_and_validity(tmp_path):
    net = build_net(tmp_path, "conv", 4, 4)
    x = np.random.default_rng(0).normal(size=net.input_shape).astype(np.float32)
    name = net.model.graph.input[0].name
    before = execute_onnx(net.model, {name: x})[net.model.graph.output[0].name]
    annotated = net.model.transform(AnnotateAccumulators())
    onnx.checker.check_model(annotated.model)
    after = execute_onnx(annotated, {name: x})[annotated.graph.output[0].name]
    assert np.array_equal(before, after)
    record = recorded_accumulators(annotated)
    report = analyze_model(net.model)
    assert {k: v["acc_bits"] for k, v in record.items()} == {r.node: r.bounds["exact"] for r in report.layers}
    # no attributes were added to standard nodes, only metadata
    assert [n.SerializeToString() for n in annotated.graph.node] == [n.SerializeToString() for n in net.model.graph.node]
    again = annotated.transform(AnnotateAccumulators())
    assert again.model.SerializeToString(deterministic=True) == annotated.model.SerializeToString(deterministic=True)


def test_float_input_needs_an_input_dtype(tmp_path):
    net = build_net(tmp_path, "linear", 4, 4)
    model = net.model
    first_quant = model.graph.node[[n.op_type for n in model.graph.node].index("Quant")]
    # drop the input quantizer: the first layer now reads the float graph input
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == first_quant.output[0]:
                node.input[i] = first_quant.input[0]
    model.graph.node.remove(first_quant)
    report = analyze_model(model)
    assert report.layers[0].status.startswith("input not quantized")
    assert report.layers[1].status == "ok"
    report = analyze_model(model, input_dtypes={"*": "UINT8"}, per_channel=True)
    q = net.expected[0][0]
    assert report.layers[0].status == "ok" and report.layers[0].input_range == [0, 255]
    assert report.layers[0].per_channel["acc_max"] == [int(v) for v in 255 * np.where(q > 0, q, 0).sum(axis=1)]


def _mvau_model(weights: np.ndarray, idt: str, wdt: str, xnor: int) -> ModelWrapper:
    mw, mh = weights.shape
    node = helper.make_node(
        "MVAU", ["x", "w"], ["y"], domain="finn.custom_op.fpgadataflow", name="mvau0", backend="fpgadataflow",
        MW=mw, MH=mh, SIMD=1, PE=1, inputDataType=idt, weightDataType=wdt, outputDataType="INT32",
        binaryXnorMode=xnor, noActivation=1, accDataType="INT32")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, mw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, mh])])
    model = ModelWrapper(helper.make_model(graph))
    model.set_initializer("w", weights.astype(np.float32))
    return model


def test_mvau_exact_range_reached_by_execution():
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(24, 5))
    model = _mvau_model(w, "UINT4", "INT4", 0)
    (r,) = analyze_model(model, per_channel=True).layers
    assert (r.K, r.channels, r.status) == (24, 5, "ok")
    for c in range(5):
        x = np.where(w[:, c] > 0, 15, 0).astype(np.float32)[None]
        y = execute_onnx(model, {"x": x})["y"]
        assert int(y[0, c]) == r.per_channel["acc_max"][c]
        x = np.where(w[:, c] > 0, 0, 15).astype(np.float32)[None]
        assert int(execute_onnx(model, {"x": x})["y"][0, c]) == r.per_channel["acc_min"][c]


def test_mvau_binary_xnor_is_a_popcount():
    rng = np.random.default_rng(2)
    w = rng.integers(0, 2, size=(40, 3))
    model = _mvau_model(w, "BINARY", "BINARY", 1)
    (r,) = analyze_model(model, per_channel=True).layers
    assert (r.acc_min, r.acc_max) == (0, 40) and r.bounds["exact"] == 6 and r.acc_dtype == "UINT6"
    for c in range(3):
        match = w[:, c].astype(np.float32)[None]  # every xnor term is 1
        assert int(execute_onnx(model, {"x": match})["y"][0, c]) == 40
        assert int(execute_onnx(model, {"x": 1 - match})["y"][0, c]) == 0


@pytest.mark.parametrize("stride,group", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_conv_transpose_range_by_execution(stride, group):
    """Random and constructed vertex inputs executed in onnxruntime stay inside, and reach, the exact range."""
    import onnxruntime as ort

    rng = np.random.default_rng(stride * 10 + group)
    c_in, c_out, k = 4, 4, 3
    w = rng.integers(-7, 8, size=(c_in, c_out // group, k, k)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[stride, stride], group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = ModelWrapper(proto)
    model.set_tensor_datatype("w", DataType["INT4"])  # FINN-ONNX style integer initializer
    (r,) = analyze_model(model, input_dtypes={"*": "UINT3"}, per_channel=True).layers
    assert r.status == "ok" and r.channels == c_out
    sess = ort.InferenceSession(proto.SerializeToString())
    xs = rng.choice([0.0, 7.0], size=(300, 1, c_in, 5, 5)).astype(np.float32)
    ys = np.stack([sess.run(None, {"x": x})[0][0] for x in xs])  # (300, c_out, H, W)
    per_c_min = ys.min(axis=(0, 2, 3))
    per_c_max = ys.max(axis=(0, 2, 3))
    assert np.all(per_c_min >= np.array(r.per_channel["acc_min"]))
    assert np.all(per_c_max <= np.array(r.per_channel["acc_max"]))
    # construct the maximising input for the interior output pixel (oh, ow) of each channel
    oh = ow = 2 * stride + 1
    for co in range(c_out):
        g, local = divmod(co, c_out // group)
        best = None
        for ph in range(stride):
            for pw in range(stride):
                x = np.zeros((1, c_in, 5, 5), dtype=np.float32)
                for ci in range(g * (c_in // group), (g + 1) * (c_in // group)):
                    for kh in range(k):
                        for kw in range(k):
                            ih, iw = (oh + ph - kh), (ow + pw - kw)
                            if ih % stride or iw % stride:
                                continue
                            ih, iw = ih // stride, iw // stride
                            if 0 <= ih < 5 and 0 <= iw < 5:
                                x[0, ci, ih, iw] = 7.0 if w[ci, local, kh, kw] > 0 else 0.0
                val = sess.run(None, {"x": x})[0][0, co, oh + ph, ow + pw]
                best = val if best is None else max(best, val)
        assert int(best) == r.per_channel["acc_max"][co]


def _qdq_model(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    torch.onnx.export(net, torch.randn(1, 1, 8, 8), str(float_path), input_names=["x"], dynamo=False, opset_version=13)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": np.random.default_rng(i).random((1, 1, 8, 8), dtype=np.float32)} for i in range(8)])

        def get_next(self):
            return next(self.data, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ModelWrapper(str(qdq_path))


def test_qdq_model_from_onnxruntime_quantizer(tmp_path):
    model = _qdq_model(tmp_path)
    report = analyze_model(model, per_channel=True)
    assert [r.op_type for r in report.layers] == ["Conv", "Gemm"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for r, node in zip(report.layers, [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]):
        assert r.status == "ok" and r.input_dtype == "UINT8" and r.weight_dtype == "INT8"
        dq = model.find_producer(node.input[1])
        q = inits[dq.input[0]].astype(np.int64)
        q = q.reshape(q.shape[0], -1) if node.op_type == "Conv" else (q if any(a.name == "transB" and a.i for a in node.attribute) else q.T)
        assert r.per_channel["acc_max"] == [int(v) for v in 255 * np.where(q > 0, q, 0).sum(axis=1)]
    # the integer-kernel convention subtracts the activation zero point
    sub = analyze_model(model, zero_point="subtract")
    act_dq = model.find_producer([n for n in model.graph.node if n.op_type == "Conv"][0].input[0])
    z = int(inits[act_dq.input[2]])
    assert sub.layers[0].input_range == [-z, 255 - z]


def test_analyze_pass_leaves_model_untouched(tmp_path):
    net = build_net(tmp_path, "linear", 4, 4)
    before = net.model.model.SerializeToString(deterministic=True)
    analysis = AnalyzeAccumulators()
    out = net.model.transform(analysis)
    assert out.model.SerializeToString(deterministic=True) == before
    assert [r.status for r in analysis.report.layers] == ["ok", "ok"]


def test_finn_onnx_graph_gives_the_same_ranges(tmp_path):
    """After FINN's QONNX->FINN conversion (integer initializers, MultiThreshold + Mul activations) the
    analysis finds the same layers with the same integer ranges as on the QONNX graph."""
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    from a2q_passes.finn_runtime import ensure_finn_importable

    ensure_finn_importable()
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN

    net = build_net(tmp_path, "conv", 4, 4)
    finn_model = net.model.transform(ConvertQONNXtoFINN()).transform(InferShapes()).transform(InferDataTypes())
    assert any(n.op_type == "MultiThreshold" for n in finn_model.graph.node)
    assert not any(n.op_type == "Quant" for n in finn_model.graph.node if finn_model.get_initializer(n.input[0]) is not None)
    qonnx_layers = analyze_model(net.model, per_channel=True).layers
    finn_layers = analyze_model(finn_model, per_channel=True).layers
    assert len(finn_layers) == len(qonnx_layers)
    for a, b in zip(qonnx_layers, finn_layers):
        assert b.status == "ok" and (b.input_dtype, b.weight_dtype) == (a.input_dtype, a.weight_dtype)
        assert b.per_channel["acc_min"] == a.per_channel["acc_min"] and b.per_channel["acc_max"] == a.per_channel["acc_max"]


def test_minifloat_weights_are_refused_by_name():
    """qonnx's FloatQuant (Brevitas' minifloat quantizers, e.g. the zoo's RESNET18_8W8A_FLOAT) multiplies in floating
    point: no integer accumulator, so the layer is refused, naming the node, not read as float or as integers."""
    domain = "qonnx.custom_op.general"
    params = {"s": 1.0, "e": 4.0, "m": 3.0, "b": 7.0, "max": 240.0}
    inits = [onnx.numpy_helper.from_array(np.array(v, np.float32), p + k) for p in "aw" for k, v in params.items()]
    inits.append(onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "W"))
    nodes = [helper.make_node("FloatQuant", [src, *(p + k for k in params)], [out], domain=domain)
             for src, out, p in (("x", "xq", "a"), ("W", "Wq", "w"))]
    nodes.append(helper.make_node("MatMul", ["xq", "Wq"], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "fq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)]))
    (layer,) = analyze_model(model).layers
    assert layer.status.startswith("unsupported") and "FloatQuant node 'Wq'" in layer.status and "no integer accumulator" in layer.status


def test_gemm_with_the_weight_as_first_operand_is_refused_by_name():
    """Gemm(W, X): the message named the activation's quantizer as a weight quantizer with a non-constant input
    ("fold constants first"); it now says what the layer is and how to write it."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).integers(-7, 8, size=(4, 6)).astype(np.float32), "w")
    q = "qonnx.custom_op.general"
    params = [onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 0.5), ("z", 0.0), ("b", 4.0))]
    nodes = [helper.make_node("Quant", ["w", "s", "z", "b"], ["wq"], domain=q, signed=1),
             helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain=q, signed=0),
             helper.make_node("Gemm", ["wq", "xq"], ["y"], name="g")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], [w, *params])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)]))
    (layer,) = analyze_model(model).layers
    assert layer.status.startswith("unsupported: constant first operand times an activation (Gemm W @ X)")


def _per_channel_scaled_conv(groups: int, scale_shape: tuple[int, ...] = (1, 4, 1, 1), form: str = "quant",
                             zero_point: int = 0) -> ModelWrapper:
    """An unsigned 4-bit input quantizer with one scale per channel (``scale_shape``) feeding a 3 x 3 Conv of 4
    channels with ``groups`` groups; signed 4-bit weights with one scale. ``form``: a qonnx ``Quant``, or ``qdq``
    as Brevitas' QCDQ export writes it (``QuantizeLinear`` -> ``Clip`` to [0, 15] -> ``DequantizeLinear``, a 1-D
    scale and uint8 zero points ``zero_point`` along the scale's axis), or ``qdq_negative_axis``, the same with that
    axis counted from the end (ONNX allows -rank..rank-1)."""
    q = "qonnx.custom_op.general"
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 0.2, size=scale_shape)
    inits = [onnx.numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in (
        ("w", rng.integers(-7, 8, size=(4, 4 // groups, 3, 3))), ("sx", scale),
        ("sw", 1.0), ("z", 0.0), ("b", 4.0))]
    if form == "quant":
        source = [helper.make_node("Quant", ["x", "sx", "z", "b"], ["xq"], domain=q, signed=0, narrow=0,
                                   rounding_mode="ROUND")]
    else:
        axis = int(np.flatnonzero(np.array(scale_shape) > 1)[0]) - (len(scale_shape) if form == "qdq_negative_axis" else 0)
        inits = [i for i in inits if i.name != "sx"] + [
            onnx.numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "sx"),
            onnx.numpy_helper.from_array(np.full(scale.size, zero_point, np.uint8), "zx"),
            onnx.numpy_helper.from_array(np.array(0, np.uint8), "lo"), onnx.numpy_helper.from_array(np.array(15, np.uint8), "hi")]
        source = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xc"], axis=axis),
                  helper.make_node("Clip", ["xc", "lo", "hi"], ["xk"]),
                  helper.make_node("DequantizeLinear", ["xk", "sx", "zx"], ["xq"], axis=axis)]
    nodes = source + [helper.make_node("Quant", ["w", "sw", "z", "b"], ["wq"], domain=q, signed=1, narrow=0,
                                       rounding_mode="ROUND"),
                      helper.make_node("Conv", ["xq", "wq"], ["y"], name="conv", group=groups, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)]))


@pytest.mark.parametrize("form", ["quant", "qdq", "qdq_negative_axis"])
def test_per_channel_activation_scales_into_a_depthwise_conv_are_one_accumulation_per_channel(form):
    """Brevitas' MobileNet-v1 (brevitas_examples; FINN's MobileNet) quantizes the input of each depthwise convolution
    with one scale per channel (a ``Quant``, or in its QCDQ export a per-axis ``DequantizeLinear``). Each output of
    a depthwise Conv sums one channel, whose codes share one step: an integer accumulation, read (before: refused
    as a "per-channel scale"). Its range is checked against the sums of the executed integer weights over the input
    box [0, 15], and the independent certificate derives the same."""
    from a2q_passes.certificate import certify_layer

    model = _per_channel_scaled_conv(groups=4, form=form)
    (layer,) = analyze_model(model, per_channel=True).layers
    assert layer.status == "ok" and layer.input_range == [0, 15], layer.status
    w = model.get_initializer("w").reshape(4, -1)
    assert layer.per_channel["acc_max"] == [int(15 * w[c][w[c] > 0].sum()) for c in range(4)]
    assert layer.per_channel["acc_min"] == [int(15 * w[c][w[c] < 0].sum()) for c in range(4)]
    cert = certify_layer(model, "conv")
    assert list(cert.channel_max) == layer.per_channel["acc_max"] and list(cert.channel_min) == layer.per_channel["acc_min"]


def test_per_axis_int8_codes_of_a_relu_output_start_at_zero_in_both_readers():
    """``Relu -> QuantizeLinear(int8, per-axis) -> DequantizeLinear -> depthwise Conv``: reals >= 0 take the codes
    [0, 127] only. The certificate finds that by executing the graph's QuantizeLinear on 0 and on a real past
    saturation, which for a per-axis quantizer needs a probe with one value per channel (a 1-D probe failed in
    onnxruntime, with its error log on stderr, and left the codes at [-128, 127])."""
    from a2q_passes.certificate import certify_layer

    q = "qonnx.custom_op.general"
    rng = np.random.default_rng(0)
    w = rng.integers(-7, 8, size=(4, 1, 3, 3)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in (
        ("w", w), ("sw", 1.0), ("z", 0.0), ("b", 4.0), ("sx", rng.uniform(0.1, 0.2, 4)))]
    inits.append(onnx.numpy_helper.from_array(np.zeros(4, np.int8), "zx"))
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sx", "zx"], ["xc"], axis=1),
             helper.make_node("DequantizeLinear", ["xc", "sx", "zx"], ["xq"], axis=1),
             helper.make_node("Quant", ["w", "sw", "z", "b"], ["wq"], domain=q, signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("Conv", ["xq", "wq"], ["y"], name="conv", group=4, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)]))
    (layer,) = analyze_model(model, per_channel=True).layers
    w = w.reshape(4, -1)
    assert layer.status == "ok" and layer.input_range == [0, 127], layer.status
    assert layer.per_channel["acc_min"] == [int(127 * w[c][w[c] < 0].sum()) for c in range(4)]
    cert = certify_layer(model, "conv")
    assert list(cert.channel_min) == layer.per_channel["acc_min"] and list(cert.channel_max) == layer.per_channel["acc_max"]


@pytest.mark.parametrize("groups, scale_shape, form, zero_point, says", [
    (1, (1, 4, 1, 1), "quant", 0, "one scale per index of axis 1 (per-channel activation scales)"),  # 4 steps, 1 sum
    (4, (1, 1, 6, 1), "quant", 0, "one scale per index of axis 2, not of its channel axis 1"),  # one per image row
    (1, (1, 4, 1, 1), "qdq", 0, "one scale per index of axis 1 (per-channel activation scales)"),
    (4, (1, 1, 6, 1), "qdq", 0, "one scale per index of axis 2, not of its channel axis 1"),
    (4, (1, 4, 1, 1), "qdq", 3, "a zero point of shape [4] (per channel)"),  # each channel shifted: not read
])
def test_per_channel_activation_scales_into_other_layers_are_refused(groups, scale_shape, form, zero_point, says):
    """Where one output sums codes of several steps (a dense Conv), the scale varies along another axis than the
    channels, or each channel has its own zero point, the products are no single integer accumulation a2q reads:
    refused by both readers, naming the scale."""
    from a2q_passes.certificate import CannotCertify, certify_layer

    model = _per_channel_scaled_conv(groups, scale_shape, form, zero_point)
    (layer,) = analyze_model(model).layers
    assert layer.status.startswith("input not quantized") and says in layer.status, layer.status
    with pytest.raises(CannotCertify):
        certify_layer(model, "conv")


@pytest.mark.parametrize("rounding", ["UP", "ROUND"])
def test_quant_with_a_float64_scale_reads_the_codes_qonnx_executes(rounding):
    """qonnx's ``Quant`` divides float32 weights by a float64 scale in float64 (numpy's promotion). Over the scale 0.1
    (float64) the float32 weights 0.1, 0.2, 0.3, 0.4 lie just above 1, 2, 3, 4, which rounding UP makes 2 to 5; in
    float32 they divide to exactly 1 to 4, which the reader took: its range fell below the executed one (found by the
    fuzzer through finetune's own check on its output, float64 scales as qonnx's QKeras converter writes them). With
    ROUND the float32 weight 0.35 lies below 3.5 in float64 and on it in float32 (rounded to the even 4)."""
    from qonnx.core.onnx_exec import execute_onnx as run
    from qonnx.transformation.infer_shapes import InferShapes

    q = "qonnx.custom_op.general"
    values = [0.1, 0.2, 0.3, 0.4] if rounding == "UP" else [0.35, 0.1, 0.2, 0.3]
    w = np.array(values, np.float32).reshape(4, 1)
    inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array(0.1, np.float64), "sw"),
             *(onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("one", 1.0), ("z", 0.0),
                                                                                       ("b4", 4.0), ("b5", 5.0)))]
    nodes = [helper.make_node("Quant", ["x", "one", "z", "b4"], ["xq"], domain=q, signed=0, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Quant", ["w", "sw", "z", "b5"], ["wq"], domain=q, signed=1, narrow=0,
                              rounding_mode=rounding),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "f64", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)]))
    model = model.transform(InferShapes())
    codes = np.rint(run(model, {"x": np.zeros((1, 4), np.float32)}, return_full_exec_context=True)["wq"] / 0.1)
    (layer,) = analyze_model(model).layers
    assert [layer.acc_min, layer.acc_max] == [int(15 * codes[codes < 0].sum()), int(15 * codes[codes > 0].sum())]
    executed = run(model, {"x": np.full((1, 4), 15.0, np.float32)})["y"].item() / 0.1
    assert round(executed) == layer.acc_max
