"""Files onnxruntime writes beyond its quantizer's plain formats: what an ``InferenceSession``'s graph optimizer saves
(``optimized_model_filepath``), its ``com.microsoft`` QuantizeLinear/DequantizeLinear (``UseQDQContribOps``) and
``MatMulNBitsQuantizer``'s packed weights.

Regression: the optimizer's fused and channels-last contrib ops (com.microsoft ``QLinearConv``,
``DynamicQuantizeMatMul``, ``FusedConv``) were passed over: ``a2q verify`` said "no overflow possible" (exit 0) with
those layers never read, and ``a2q project --acc-bits P`` wrote a model whose unread layers still needed more than
P bits. The channels-last ``QLinearConv`` and the dynamic fusions are now read like the ops they stand for; each
fused float op (``FusedConv``, ``FusedMatMul``, ...) is a layer reported unsupported with what to do, so no check
passes it.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli_helpers import digest, run_cli
from tests.fuzz.oracle import width
from tests.fuzz.real_files import executed_range
from tests.ort_models import attention, conv_gemm_matmul, optimized, quantize

def _quantized(folder, fmt: str, net=conv_gemm_matmul, weight: str = "QInt8", per_channel: bool = True):
    float_path = folder / f"float_{net.__name__}.onnx"
    x_shape = net(float_path)
    path = folder / f"{fmt}_{net.__name__}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(float_path, path, x_shape, fmt, weight, "QUInt8", per_channel)
    return path


def _layers(path, *options: str) -> dict[str, dict]:
    code, out, err = run_cli("analyze", path, "--json", *options)
    assert code in (0, 3), err
    return {layer["node"]: layer for layer in json.loads(out)["layers"]}


def test_optimizer_contrib_macs_it_cannot_read_are_reported_and_no_check_passes_them(tmp_path):
    """A dynamic attention model as an InferenceSession saves it: the scores product becomes a com.microsoft
    FusedMatMul of two float activations, which is not read."""
    source = _quantized(tmp_path, "dynamic", attention)
    path = tmp_path / "dynamic_extended.onnx"
    assert "FusedMatMul" in optimized(source, path, "extended")
    layers = _layers(path)
    unread = [name for name, layer in layers.items() if layer["status"] != "ok"]
    fused = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "FusedMatMul"]
    assert fused and set(fused) <= set(unread)
    for name in fused:
        assert layers[name]["status"].startswith("unsupported: com.microsoft FusedMatMul"), layers[name]
    assert sum(layer["status"] == "ok" for layer in layers.values()) == 4  # q, k, v, o: still read

    code, out, err = run_cli("verify", path, "--acc-bits", 32)
    assert code == 3 and all(name in err for name in fused), (code, out, err)

    before, out_path = digest(path), tmp_path / "out.onnx"
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 16)
    assert code == 1 and not out_path.exists() and digest(path) == before
    assert all(f"--skip {name}" in err for name in unread), err

    # skipped explicitly, the layers it reads are projected and their executed worst case fits
    skips = [arg for name in unread for arg in ("--skip", name)]
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 16, "--json", *skips)
    assert code == 0, err
    promised = [layer["node"] for layer in json.loads(out)["layers"] if layer["status"] == "projected"]
    assert len(promised) == 4
    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(out_path))
    for name in promised:
        ex = executed_range(model, name)
        assert width(ex.lo, ex.hi) <= 16, (name, ex.lo, ex.hi)


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_dynamic_fusions_are_read_like_the_ops_they_fuse(tmp_path, zero_point):
    """The optimizer fuses a dynamic model's DynamicQuantizeLinear -> MatMulInteger into com.microsoft
    DynamicQuantizeMatMul (the op quantizes its float input to uint8 itself) or, where the codes are shared,
    MatMulIntegerToFloat (data zero point at input 4). Each is read with the ranges of the unfused layer, and the
    corpus check handles the file end to end."""
    from scripts.corpus import ORT_OPTIMIZED, Entry, check

    for net, fused in ((conv_gemm_matmul, "DynamicQuantizeMatMul"), (attention, "MatMulIntegerToFloat")):
        source = _quantized(tmp_path, "dynamic", net)
        path = tmp_path / f"{net.__name__}_extended.onnx"
        assert fused in optimized(source, path, "extended")
        before, after = _layers(source, "--zero-point", zero_point), _layers(path, "--zero-point", zero_point)
        read = {name: layer for name, layer in after.items() if layer["status"] == "ok"}
        assert fused in {layer["op_type"] for layer in read.values()}
        for name, layer in read.items():
            assert (layer["acc_min"], layer["acc_max"]) == (before[name]["acc_min"], before[name]["acc_max"]), name
    entry = Entry("conv_gemm_matmul_extended", ORT_OPTIMIZED, tmp_path / "conv_gemm_matmul_extended.onnx",
                  zero_point=zero_point)
    result = check(entry, tmp_path)
    assert (result.status, result.detail, result.tight) == ("handled", "", 3)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_channels_last_qlinearconv_is_read_like_the_onnx_one(tmp_path, fmt):
    """ORT_ENABLE_ALL (an InferenceSession's default) rewrites every QLinearConv into com.microsoft's channels-last
    form (NHWC data, OIHW weights; padded, depthwise and strided convolutions here). Each is read with the ranges of
    the file before optimisation, and the corpus check (the oracle executes each layer as an NCHW Conv, project at
    the widest width - 2, verify, the projected file executed) handles the file end to end."""
    from scripts.corpus import ORT_OPTIMIZED, Entry, check
    from tests.ort_models import residual_depthwise

    float_path = tmp_path / "float.onnx"
    source = tmp_path / f"{fmt}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(float_path, source, residual_depthwise(float_path), fmt, "QInt8", "QUInt8", True)
    path = tmp_path / f"{fmt}_all.onnx"
    assert "QLinearConv" in optimized(source, path, "all")
    before, after = _layers(source), _layers(path)
    assert len(after) == len(before) == 3
    for name, layer in after.items():
        original = before[name.replace("_token_1", "").replace("_token_4", "").replace("_token_8", "")]
        assert layer["status"] == "ok" and (layer["acc_min"], layer["acc_max"]) == (original["acc_min"],
                                                                                   original["acc_max"]), name
    result = check(Entry(path.stem, ORT_OPTIMIZED, path), tmp_path)
    assert (result.status, result.detail, result.tight) == ("handled", "", 3)


def _qdq_conv_relu(path, relu: bool = True, quantized: bool = True) -> None:
    """x -> Q -> DQ -> Conv(DQ(int8 W)) [-> Relu] -> float output: onnxruntime fuses Conv + Relu into FusedConv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.uint8(128), "xz")]
    nodes = []
    if quantized:
        inits += [numpy_helper.from_array(rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), "Wq"),
                  numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"])]
    else:
        inits += [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    nodes.append(helper.make_node("Conv", ["xd" if quantized else "x", "W"], ["c" if relu else "y"], name="conv",
                                  pads=[1, 1, 1, 1]))
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_fused_float_mac_is_a_layer_only_on_quantized_operands(tmp_path):
    _qdq_conv_relu(tmp_path / "q.onnx")
    assert optimized(tmp_path / "q.onnx", tmp_path / "q_opt.onnx", "extended") == ["FusedConv"]
    layer = _layers(tmp_path / "q_opt.onnx")["conv"]
    assert layer["status"].startswith("unsupported: com.microsoft FusedConv on quantized 'xd', 'W'"), layer
    code, out, err = run_cli("verify", tmp_path / "q_opt.onnx", "--acc-bits", 32)
    assert code == 3 and "conv" in err

    _qdq_conv_relu(tmp_path / "f.onnx", quantized=False)
    assert optimized(tmp_path / "f.onnx", tmp_path / "f_opt.onnx", "extended") == ["FusedConv"]
    assert _layers(tmp_path / "f_opt.onnx") == {}  # float operands: no integer accumulator, no layer


def test_matmul_nbits_names_the_qdq_form_a2q_reads(tmp_path):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weights = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    statuses = {}
    for fmt in (QuantFormat.QOperator, QuantFormat.QDQ):
        # the quantizer rewrites the proto it is given
        quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), block_size=32, is_symmetric=True, quant_format=fmt)
        quantizer.process()
        path = tmp_path / f"{fmt.name}.onnx"
        quantizer.model.save_model_to_file(str(path))
        (statuses[fmt.name],) = [layer["status"] for layer in _layers(path).values()]
    assert statuses["QOperator"].startswith("unsupported: com.microsoft MatMulNBits")
    assert "quant_format=QuantFormat.QDQ" in statuses["QOperator"]
    # the QDQ form is read: its block-wise INT4 weights are found, only its float input keeps it from a width
    assert statuses["QDQ"].startswith("input not quantized"), statuses["QDQ"]


def test_contrib_qdq_is_verified_by_the_certificate(tmp_path):
    """com.microsoft DequantizeLinear weights: ONNX's shape inference cannot type them, so the certificate could not
    execute their constant subgraph and every check stopped (exit 4); onnxruntime now runs it."""
    path = _quantized(tmp_path, "QDQ_contrib")
    assert {n.domain for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"} == {"com.microsoft"}
    layers = _layers(path)
    assert layers and all(layer["status"] == "ok" for layer in layers.values())
    widest = max(layer["bounds"]["exact"] for layer in layers.values())
    code, out, err = run_cli("verify", path, "--acc-bits", widest)
    assert code == 0, err
    code, out, err = run_cli("verify", path, "--acc-bits", widest - 1)
    assert code == 3, (out, err)


@pytest.mark.parametrize("op,domain,attrs", [("Einsum", "", {"equation": "bk,kn->bn"}),
                                             ("CDist", "com.microsoft", {}),
                                             ("CausalConvWithState", "com.microsoft", {})])
def test_other_macs_on_dequantized_weights_are_reported(op, domain, attrs, tmp_path):
    """An ONNX Einsum (as torch exports some attention and linear layers), or an onnxruntime contrib op that
    multiply-accumulates (a distance matrix, a causal convolution), of a quantized activation and DequantizeLinear
    weights: reported, not passed over (the contrib ops were, until they were listed)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
             numpy_helper.from_array(rng.integers(-128, 128, (8, 4)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             helper.make_node(op, ["xd", "W"], ["y"], name="mac", domain=domain, **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "mac.onnx"))
    layer = _layers(tmp_path / "mac.onnx")["mac"]
    assert layer["status"].startswith(f"unsupported: {domain or 'ONNX'} {op} on quantized 'xd', 'W'"), layer
    code, out, err = run_cli("verify", tmp_path / "mac.onnx", "--acc-bits", 32)
    assert code == 3 and "mac" in err, (out, err)


def test_weight_scales_along_the_summed_axis_are_refused(tmp_path):
    """quantize_static with QDQOpTypePerChannelSupportToAxis={"MatMul": 0} gives a MatMul's weights one scale per
    row of K: every product has its own step, so the sum of the codes is no accumulator any datapath computes. It
    was analysed (and projected) as if it were; it is now refused by name, and the default axis is still read."""
    float_path = tmp_path / "float.onnx"
    x_shape = conv_gemm_matmul(float_path)
    for axis in (0, 1):
        path = tmp_path / f"axis{axis}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize(float_path, path, x_shape, "QDQ", "QInt8", "QUInt8", True,
                     extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": axis}})
        status = _layers(path)["mm"]["status"]
        if axis == 1:
            assert status == "ok"
        else:
            assert status.startswith("unsupported: the weight scale of MatMul node 'mm' varies along axis 0"), status
            code, out, err = run_cli("project", path, tmp_path / "out.onnx", "--acc-bits", 16)
            assert code == 1 and "--skip mm" in err and not (tmp_path / "out.onnx").exists()
