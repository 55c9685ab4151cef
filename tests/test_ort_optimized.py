"""Files onnxruntime writes beyond its quantizer's plain formats: what an ``InferenceSession``'s graph optimizer saves
(``optimized_model_filepath``), its ``com.microsoft`` QuantizeLinear/DequantizeLinear (``UseQDQContribOps``) and
``MatMulNBitsQuantizer``'s packed weights.

Regression: the optimizer's fused and channels-last contrib ops (com.microsoft ``QLinearConv``,
``DynamicQuantizeMatMul``, ``FusedConv``) were passed over: ``a2q verify`` said "no overflow possible" (exit 0) with
those layers never read, and ``a2q project --acc-bits P`` wrote a model whose unread layers still needed more than
P bits. The channels-last ``QLinearConv`` is now read like ONNX's; each of the others is a layer reported
unsupported with what to do, so no check passes it.
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
from tests.ort_models import conv_gemm_matmul, optimized, quantize

IN_SHAPE = [1, 2, 4, 4]


def _quantized(folder, fmt: str, weight: str = "QInt8", per_channel: bool = True):
    float_path = folder / "float.onnx"
    assert conv_gemm_matmul(float_path) == IN_SHAPE
    path = folder / f"{fmt}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(float_path, path, IN_SHAPE, fmt, weight, "QUInt8", per_channel)
    return path


def _layers(path) -> dict[str, dict]:
    code, out, err = run_cli("analyze", path, "--json")
    assert code in (0, 3), err
    return {layer["node"]: layer for layer in json.loads(out)["layers"]}


@pytest.mark.parametrize("fmt, level, contrib", [("dynamic", "extended", "DynamicQuantizeMatMul")])
def test_optimizer_contrib_macs_are_reported_and_no_check_passes_them(tmp_path, fmt, level, contrib):
    source = _quantized(tmp_path, fmt)
    path = tmp_path / f"{fmt}_{level}.onnx"
    assert contrib in optimized(source, path, level)
    unread = [n.name for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft" and n.op_type == contrib]
    layers = _layers(path)
    for name in unread:
        assert layers[name]["status"].startswith(f"unsupported: com.microsoft {contrib}"), layers[name]
    assert any(layer["status"] == "ok" for layer in layers.values())  # the layers it reads are still read

    code, out, err = run_cli("verify", path, "--acc-bits", 32)
    assert code == 3 and all(name in err for name in unread), (code, out, err)

    before, out_path = digest(path), tmp_path / "out.onnx"
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 16)
    assert code == 1 and not out_path.exists() and digest(path) == before
    assert all(f"--skip {name}" in err for name in unread), err

    # skipped explicitly, the layers it reads are projected and their executed worst case fits
    skips = [arg for name in unread for arg in ("--skip", name)]
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 16, "--json", *skips)
    assert code == 0, err
    promised = [layer["node"] for layer in json.loads(out)["layers"] if layer["status"] == "projected"]
    assert promised
    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(out_path))
    for name in promised:
        ex = executed_range(model, name)
        assert width(ex.lo, ex.hi) <= 16, (name, ex.lo, ex.hi)


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


def test_standard_einsum_on_dequantized_weights_is_reported(tmp_path):
    """An ONNX Einsum (as torch exports some attention and linear layers) of a quantized activation and
    DequantizeLinear weights multiply-accumulates like a MatMul; it is reported, not passed over."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
             numpy_helper.from_array(rng.integers(-128, 128, (8, 4)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             helper.make_node("Einsum", ["xd", "W"], ["y"], name="einsum", equation="bk,kn->bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "einsum.onnx"))
    layer = _layers(tmp_path / "einsum.onnx")["einsum"]
    assert layer["status"].startswith("unsupported: ONNX Einsum on quantized 'xd', 'W'"), layer
    code, out, err = run_cli("verify", tmp_path / "einsum.onnx", "--acc-bits", 32)
    assert code == 3 and "einsum" in err, (out, err)
