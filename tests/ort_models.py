"""Tiny seeded float nets and onnxruntime's quantizer, shared by the QDQ/QOperator tests and ``scripts/corpus.py``.

Every quantized file is written by onnxruntime's own ``quantize_static`` (QDQ or QOperator) or ``quantize_dynamic``
from one of the float nets below, calibrated on seeded normal data; :func:`optimized` saves what an
``InferenceSession``'s graph optimizer makes of one (fused and channels-last contrib ops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _save(path: Path, nodes: list, x_shape: list[int], inits: list, opset: int) -> None:
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10 if opset >= 21 else 8
    onnx.save(proto, str(path))


def conv_gemm_matmul(path: Path, opset: int = 13) -> list[int]:
    """Conv with padding -> Relu -> Flatten -> Gemm(transB) -> MatMul on (1, 2, 4, 4) inputs; returns the input shape."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "W2", "B2"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "W3"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.normal(size=(6, 64)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "B2"),
             numpy_helper.from_array(rng.normal(size=(6, 5)).astype(np.float32), "W3")]
    _save(path, nodes, [1, 2, 4, 4], inits, opset)
    return [1, 2, 4, 4]


def matmul_conv(path: Path, opset: int = 21) -> list[int]:
    """MatMul -> Relu -> Reshape -> Conv on (1, 8) inputs; returns the input shape."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["r4"]), helper.make_node("Conv", ["r4", "W2"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W2")]
    _save(path, nodes, [1, 8], inits, opset)
    return [1, 8]


def residual_depthwise(path: Path, opset: int = 13) -> list[int]:
    """Conv -> Relu -> depthwise Conv -> Add(skip) -> Relu -> strided Conv on (1, 3, 6, 6) inputs."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Add", ["c2", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3"], ["y"], name="conv3", strides=[2, 2])]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B2"),
             numpy_helper.from_array(rng.normal(size=(5, 4, 2, 2)).astype(np.float32), "W3")]
    _save(path, nodes, [1, 3, 6, 6], inits, opset)
    return [1, 3, 6, 6]


def attention(path: Path, opset: int = 13) -> list[int]:
    """One attention head on (1, 6, 8) inputs: q, k, v projections (MatMul), softmax(q @ k^T) @ v, output MatMul;
    the two products of activations are what QOperator writes as QLinearMatMul of two integer tensors."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
             helper.make_node("MatMul", ["ctx", "Wo"], ["y"], name="o_proj")]
    inits = [numpy_helper.from_array((rng.normal(size=(8, 8)) / 3).astype(np.float32), name)
             for name in ("Wq", "Wk", "Wv", "Wo")]
    _save(path, nodes, [1, 6, 8], inits, opset)
    return [1, 6, 8]


FLOAT_NETS = {"conv_gemm_matmul": conv_gemm_matmul, "matmul_conv": matmul_conv, "residual_depthwise": residual_depthwise,
              "attention": attention}


def quantize(float_path: Path, out_path: Path, x_shape: list[int], fmt: str, weight: str, act: str = "QUInt8",
             per_channel: bool = False, extra_options: dict | None = None, seed: int = 0,
             reduce_range: bool = False) -> None:
    """onnxruntime's quantizer: ``fmt`` is ``QDQ`` or ``QOperator`` (``quantize_static``) or ``dynamic``
    (``quantize_dynamic``); ``weight``/``act`` are ``QuantType`` names. ``QDQ_contrib``: QDQ in onnxruntime's own
    ``com.microsoft`` QuantizeLinear/DequantizeLinear (``extra_options={"UseQDQContribOps": True}``);
    ``reduce_range``: 7-bit weights, onnxruntime's remedy for the int16 saturation of its kernels on CPUs without VNNI."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if fmt == "dynamic":
        quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType[weight], per_channel=per_channel,
                         op_types_to_quantize=["Conv", "Gemm", "MatMul"], reduce_range=reduce_range)
        return

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.data = iter([{"x": rng.normal(size=x_shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    if fmt == "QDQ_contrib":
        fmt, extra_options = "QDQ", {**(extra_options or {}), "UseQDQContribOps": True}
    quantize_static(str(float_path), str(out_path), Reader(), quant_format=QuantFormat[fmt], per_channel=per_channel,
                    weight_type=QuantType[weight], activation_type=QuantType[act], extra_options=extra_options,
                    reduce_range=reduce_range)


OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def optimized(path: Path, out_path: Path, level: str) -> list[str]:
    """The model an onnxruntime ``InferenceSession`` saves after its graph optimizer ran at ``level`` (one of
    :data:`OPTIMIZATION_LEVELS`): ``extended`` fuses QDQ groups into QLinear ops and com.microsoft QGemm,
    DynamicQuantizeMatMul or FusedConv; ``all`` also writes channels-last com.microsoft QLinearConv. Returns the
    saved model's contrib op types."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    options.optimized_model_filepath = str(out_path)
    options.log_severity_level = 3  # the warning that an ``all`` model is tied to this machine's CPU
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sorted({n.op_type for n in onnx.load(str(out_path)).graph.node if n.domain == "com.microsoft"})
