"""``a2q analyze`` of streamed int8 MatMul weights, checked by executing each channel's worst-case input.

The weights are read memory-mapped in their stored int8 type and summed in narrower integers where
that cannot overflow (``bounds.positive_negative_sums``): rows stored as columns (``[K, N]`` MatMul
weights) and stored rows (``[N, K]`` weights behind a ``Transpose``, as onnxruntime's quantizer
writes q/k/v/o) take different paths. Both are checked here against onnxruntime executing the graph:
with unit scales and zero points 0 the MatMul output is the integer accumulator itself (exact in
float32: every value stays below 2^24), so each channel's claimed extremes must be reached exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from a2q_passes import analysis, bounds, model_io

K, N = 300, 24  # K spans two of the column path's 255-row slabs; 255 * 128 * 300 < 2^24


def _weights(seed: int) -> np.ndarray:
    """int8 ``[K, N]`` with every extreme: rows of -128 (whose int8 ``abs`` wraps), of 127, and random ones."""
    w = np.random.default_rng(seed).integers(-128, 128, size=(K, N), dtype=np.int8)
    w[:, 0], w[:, 1], w[::2, 2], w[:, 3] = -128, 127, -128, 0
    return w


def _qdq_matmul(path: Path, w: np.ndarray, transposed: bool, act: type) -> None:
    """``x -> Q -> DQ -> MatMul(DQ(W))`` with unit scales; ``transposed``: W stored ``[N, K]`` behind a Transpose."""
    zero = np.array(0, dtype=act)
    inits = [numpy_helper.from_array(np.float32(1), "one"), numpy_helper.from_array(zero, "x_zp"),
             numpy_helper.from_array(np.int8(0), "w_zp"),
             numpy_helper.from_array(np.ascontiguousarray(w.T) if transposed else w, "W")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "one", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W", "one", "w_zp"], ["wd"])]
    if transposed:
        nodes.append(helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["xd", "wt" if transposed else "wd"], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    # weights in an external data file, as large models store them
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows-are-columns", "behind-transpose"])
@pytest.mark.parametrize("act", [np.uint8, np.int8])
def test_streamed_int8_ranges_are_reached_by_executed_worst_cases(tmp_path, a2q, monkeypatch, transposed, act):
    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 1024)  # the weights stay memory-mapped in their file
    w = _weights(seed=int(transposed))
    path = tmp_path / "mm.onnx"
    _qdq_matmul(path, w, transposed, act)
    result = a2q("analyze", path, "--json", "--per-channel")
    assert result.returncode == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    lo, hi = (0, 255) if act == np.uint8 else (-128, 127)
    assert layer["input_range"] == [lo, hi]
    # the graph as written, in float (sums below 2^24, exact): with its optimizations onnxruntime fuses the Q/DQ
    # MatMul into a u8s8 integer kernel, which on AVX2 CPUs without VNNI saturates pairs of products in 16 bits
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    columns = w.astype(np.int64).T  # one row of K weights per output channel
    x_max = np.where(columns > 0, hi, lo).astype(np.float32)  # the input that drives each channel to its maximum
    x_min = np.where(columns > 0, lo, hi).astype(np.float32)
    reached_max = np.array([session.run(None, {"x": x[None]})[0][0, j] for j, x in enumerate(x_max)])
    reached_min = np.array([session.run(None, {"x": x[None]})[0][0, j] for j, x in enumerate(x_min)])
    assert layer["per_channel"]["acc_max"] == reached_max.astype(np.int64).tolist()
    assert layer["per_channel"]["acc_min"] == reached_min.astype(np.int64).tolist()
    assert [layer["acc_min"], layer["acc_max"]] == [int(reached_min.min()), int(reached_max.max())]
    assert layer["per_channel"]["l1_norm"] == np.abs(columns).sum(axis=1).tolist()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_compiled_sums_match_numpy_and_brute_force(dtype):
    """``positive_negative_sums(compiled=True)`` (numba) on stored rows, rows stored as columns and a strided view."""
    w = _weights(seed=2)
    q = w if dtype == np.int8 else w.view(np.uint8)
    wide = q.astype(np.int64)
    for rows, expected in ((np.ascontiguousarray(q.T), wide.T), (q.T, wide.T), (q[::2], wide[::2])):
        pos, neg = bounds.positive_negative_sums(rows, compiled=True)
        assert pos.dtype == neg.dtype == np.int64
        assert pos.tolist() == np.maximum(expected, 0).sum(axis=1).tolist()
        assert neg.tolist() == np.maximum(-expected, 0).sum(axis=1).tolist()
        numpy_pos, numpy_neg = bounds.positive_negative_sums(rows)
        assert np.array_equal(pos, numpy_pos) and np.array_equal(neg, numpy_neg)


@pytest.mark.parametrize("dtype, extreme", [(np.int8, -128), (np.uint8, 255)])
def test_compiled_sums_stay_exact_at_the_longest_rows_of_extreme_weights(dtype, extreme):
    """Rows of the most terms the int32 registers take, every weight at the type's largest magnitude, sum exactly,
    stored as rows and as columns; one term more and the sums still come out exact (the numpy path takes them)."""
    from a2q_passes import sum_kernels

    for K in (sum_kernels.MAX_TERMS[np.dtype(dtype)] - 1, sum_kernels.MAX_TERMS[np.dtype(dtype)]):
        stored = np.full((2, K), extreme, dtype=dtype)
        for rows in (stored, stored.reshape(K, 2).T):  # C-ordered rows; rows stored as columns
            pos, neg = bounds.positive_negative_sums(rows, compiled=True)
            expected = (K * extreme, 0) if extreme > 0 else (0, -K * extreme)
            assert [(int(p), int(n)) for p, n in zip(pos, neg)] == [expected, expected], K


def test_analyze_with_compiled_sums_reports_the_same(tmp_path, monkeypatch):
    """A model past ``COMPILED_SUMS_MIN_WEIGHTS`` (lowered here) gets the same report, per channel too."""
    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 1024)
    reports = []
    for transposed in (False, True):
        path = tmp_path / f"mm{transposed}.onnx"
        _qdq_matmul(path, _weights(seed=3), transposed, np.uint8)
        for threshold in (analysis.COMPILED_SUMS_MIN_WEIGHTS, 0):
            monkeypatch.setattr(analysis, "COMPILED_SUMS_MIN_WEIGHTS", threshold)
            report = analysis.analyze_model(model_io.load_model(path), per_channel=True).to_json()
            reports.append(json.dumps(report, sort_keys=True))
    assert reports[0] == reports[1] and reports[2] == reports[3]
