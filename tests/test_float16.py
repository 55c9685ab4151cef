"""QDQ graphs in float16 (scales, activations and outputs; the weights stored as int8 codes), as a float16 deployment
writes them: the integer codes are those of float32, only the dequantized values carry float16's rounding.

Every range is checked by onnxruntime EXECUTING the float16 graph: the codes its ``QuantizeLinear`` writes for
worst-case and random inputs, times the stored weight codes, summed in int64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

K, HIDDEN, OUT = 16, 8, 4
BIG = np.float16(6.0e4)  # saturates every quantizer below


def float16_model(seed: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Gemm (int8 codes per output channel, transB) -> Relu -> Q/DQ (uint8) -> MatMul (int8
    codes per output channel), every float tensor float16."""
    rng = np.random.default_rng(seed)
    f16 = np.float16
    inits = {
        "xs": np.array(0.05, f16), "xz": np.array(0, np.uint8), "hs": np.array(0.5, f16), "hz": np.array(0, np.uint8),
        "w1": rng.integers(-127, 128, size=(HIDDEN, K)).astype(np.int8),
        "w1s": rng.uniform(0.005, 0.02, size=HIDDEN).astype(f16), "w1z": np.zeros(HIDDEN, np.int8),
        "w2": rng.integers(-127, 128, size=(HIDDEN, OUT)).astype(np.int8),
        "w2s": rng.uniform(0.005, 0.02, size=OUT).astype(f16), "w2z": np.zeros(OUT, np.int8),
    }
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xc"], name="Qx"),
             helper.make_node("DequantizeLinear", ["xc", "xs", "xz"], ["xd"], name="DQx"),
             helper.make_node("DequantizeLinear", ["w1", "w1s", "w1z"], ["w1d"], name="DQw1", axis=0),
             helper.make_node("Gemm", ["xd", "w1d"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("QuantizeLinear", ["hr", "hs", "hz"], ["hc"], name="Qh"),
             helper.make_node("DequantizeLinear", ["hc", "hs", "hz"], ["hd"], name="DQh"),
             helper.make_node("DequantizeLinear", ["w2", "w2s", "w2z"], ["w2d"], name="DQw2", axis=1),
             helper.make_node("MatMul", ["hd", "w2d"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "f16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", OUT])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def executed_accumulators(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, the codes onnxruntime's ``QuantizeLinear`` writes for ``x`` times the stored weight codes (int64)."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in ("xc", "hc"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    _, xc, hc = session.run(None, {"x": x.astype(np.float16)})
    weights = {i.name: numpy_helper.to_array(i).astype(np.int64) for i in model.graph.initializer}
    return {"fc1": xc.astype(np.int64) @ weights["w1"].T, "fc2": hc.astype(np.int64) @ weights["w2"]}


def worst_cases(model: onnx.ModelProto) -> np.ndarray:
    """For each fc1 channel, the input driving it highest and lowest (every code at the end its weight asks for)."""
    w1 = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "w1")
    rows = [np.where(w1[c] > 0, BIG, -BIG) for c in range(HIDDEN)] + [np.where(w1[c] > 0, -BIG, BIG) for c in range(HIDDEN)]
    return np.asarray(rows, dtype=np.float16)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    out = tmp_path / "f16.onnx"
    onnx.save(float16_model(), out)
    return out


def test_analyze_reads_the_executed_range(a2q, path: Path) -> None:
    result = a2q("analyze", path, "--json", "--per-channel")
    assert result.returncode == 0, result.stderr
    layer = next(layer for layer in json.loads(result.stdout)["layers"] if layer["node"] == "fc1")
    acc = executed_accumulators(onnx.load(path), worst_cases(onnx.load(path)))["fc1"]
    assert layer["per_channel"]["acc_min"] == acc.min(axis=0).tolist()
    assert layer["per_channel"]["acc_max"] == acc.max(axis=0).tolist()


def test_project_writes_a_float16_model_whose_executed_worst_cases_fit(a2q, path: Path, tmp_path: Path) -> None:
    """Before: the independent certificate refused the float16 weights ("not integer (off by up to 0.006)", exit
    4) and nothing was written."""
    exact = json.loads(a2q("analyze", path, "--json").stdout)["layers"][0]["bounds"]["exact"]
    out = tmp_path / "p.onnx"
    result = a2q("project", path, out, "--acc-bits", exact - 2)
    assert result.returncode == 0, result.stderr
    projected = onnx.load(out)
    assert {i.name: i.data_type for i in projected.graph.initializer}["w1s"] == TensorProto.FLOAT16
    acc = executed_accumulators(projected, worst_cases(projected))["fc1"]
    assert -(1 << (exact - 3)) <= acc.min() and acc.max() < 1 << (exact - 3)
    assert a2q("verify", out).returncode == 0


def test_verify_data_counts_the_executed_overflows(a2q, path: Path, tmp_path: Path) -> None:
    """``verify --data`` on float16 data: the dequantized float16 activations are read back as their codes (float16's
    rounding is within its precision of them) and each layer's overflows are those the executed codes give."""
    rng = np.random.default_rng(1)
    x = np.concatenate([worst_cases(onnx.load(path)), rng.normal(scale=4.0, size=(8, K))]).astype(np.float16)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    executed = executed_accumulators(onnx.load(path), x)
    for node, acc in executed.items():
        bits = max(int(acc.max()).bit_length(), (-int(acc.min()) - 1).bit_length())  # one bit below its width
        result = a2q("verify", path, "--layer", f"{node}={bits}", "--data", data, "--json")
        assert result.returncode == 3, result.stderr
        verdict = next(v for v in json.loads(result.stdout)["layers"] if v["node"] == node)
        assert verdict["signed"]
        outside = int(np.count_nonzero((acc < -(1 << (bits - 1))) | (acc > (1 << (bits - 1)) - 1)))
        assert outside > 0 and verdict["data_overflows"] == outside
        assert verdict["data_accumulations"] == acc.size


def test_lower_refuses_float16_by_name_and_writes_nothing(a2q, path: Path, tmp_path: Path) -> None:
    """Before: FINN's step_convert_to_hw failed on it ("Shape broadcast mismatch")."""
    exact = json.loads(a2q("analyze", path, "--json").stdout)["layers"][0]["bounds"]["exact"]
    projected, out = tmp_path / "p.onnx", tmp_path / "hw.onnx"
    assert a2q("project", path, projected, "--acc-bits", exact - 1).returncode == 0
    result = a2q("lower", projected, out, "--from-annotations")
    assert result.returncode == 1 and "float16 tensors" in result.stderr and "'w1s'" in result.stderr
    assert not out.exists()
