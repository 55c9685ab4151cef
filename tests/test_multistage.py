"""Multi-stage (tiled) accumulators: ``project --tile T --acc-bits P_inner [--outer-bits P_outer]``.

The projection math is checked against brute force over every integer input vector of small boxes
(every partial sum within each tile and every running sum of tile results); the CLI result is checked
by EXECUTING worst-case inputs through a QONNX model with qonnx: an input at the worst-case codes on one
tile and 0 elsewhere makes the output that tile's integer sum, the worst case on every term the full sum.
"""

from __future__ import annotations

import itertools
import json
from functools import partial

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.bounds import IntRange
from a2q_passes.errors import A2QError
from a2q_passes.methods import project_weights
from a2q_passes.projection import plain_round, project_multistage


def _limits(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _fits(values: np.ndarray, bits: int) -> bool:
    lo, hi = _limits(bits, bool(values.min() < 0))
    return bool(values.min() >= lo and values.max() <= hi)


def brute_force_registers(q: np.ndarray, x: IntRange, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Every partial sum within a tile and every running sum of tile results, over every integer input vector."""
    K = q.shape[1]
    inputs = np.asarray(list(itertools.product(range(x.lo, x.hi + 1), repeat=K)))  # (M, K)
    terms = inputs[:, None, :] * q[None, :, :]  # (M, rows, K)
    inner, tile_sums = [], []
    for start in range(0, K, tile):
        prefix = np.cumsum(terms[..., start:start + tile], axis=-1)
        inner.append(prefix.reshape(-1))
        tile_sums.append(prefix[..., -1])
    running = np.cumsum(np.stack(tile_sums), axis=0)
    return np.concatenate(inner), running.reshape(-1)


@pytest.mark.parametrize("method", ["exact", "a2q", "a2q+"])
@pytest.mark.parametrize("x, tile, inner_bits, outer_bits", [
    (IntRange(-2, 2), 2, 4, 5), (IntRange(0, 3), 3, 4, None), (IntRange(-1, 3), 4, 4, 6), (IntRange(-3, 1), 3, 5, 6),
])
def test_both_stages_fit_for_every_input_vector(method, x, tile, inner_bits, outer_bits):
    rng = np.random.default_rng(7)
    weight_range = IntRange(-7, 7)
    v = rng.normal(scale=4.0, size=(24, 6))
    result = project_multistage(v, x, [(np.arange(24), weight_range)], tile, inner_bits, outer_bits,
                                partial(project_weights, method=method))
    q = result.weights
    assert q.min() >= weight_range.lo and q.max() <= weight_range.hi
    inner, running = brute_force_registers(q, x, tile)
    assert _fits(inner, inner_bits)
    if outer_bits is not None:
        assert _fits(running, outer_bits)
    plain_inner, _ = brute_force_registers(plain_round(v, weight_range), x, tile)
    assert not _fits(plain_inner, inner_bits)  # the case is not trivial: plain rounding overflows the tiles


def test_input_codes_without_zero_are_refused():
    with pytest.raises(A2QError, match="include 0"):
        project_multistage(np.ones((2, 4)), IntRange(1, 3), [(np.arange(2), IntRange(-7, 7))], 2, 6, None,
                           partial(project_weights, method="exact"))


# --------------------------------------------------------------------------- through the graph

X_SCALE, K, N, TILE = 0.25, 24, 5, 8


def qonnx_mlp(seed: int = 3) -> onnx.ModelProto:
    """x -> Quant (signed 4-bit, codes [-8, 7]) -> MatMul with Quant (signed 4-bit) weights (K, N)."""
    rng = np.random.default_rng(seed)
    w_scale = rng.uniform(0.05, 0.1, size=(1, N)).astype(np.float32)
    w = (rng.integers(-8, 8, size=(K, N)) * w_scale).astype(np.float32)
    domain = "qonnx.custom_op.general"
    nodes = [helper.make_node("Quant", ["x", "xs", "zero", "xbits"], ["xq"], domain=domain, name="Quant_x",
                              signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("Quant", ["w", "ws", "zero", "wbits"], ["wq"], domain=domain, name="Quant_w",
                              signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(np.float32(X_SCALE), "xs"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.float32(4), "xbits"), numpy_helper.from_array(np.float32(4), "wbits"),
             numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)])


def executed_stage_extremes(path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(min, max) of the tile sums and of the full sums, from qonnx executing worst-case codes."""
    model = ModelWrapper(str(path)).transform(InferShapes())
    executed = execute_onnx(model, {"x": np.zeros((1, K), np.float32)}, return_full_exec_context=True)
    scale = model.get_initializer("ws").reshape(-1).astype(np.float64)
    q = np.rint(executed["wq"] / scale)

    def integer_sums(codes: np.ndarray) -> np.ndarray:
        y = execute_onnx(model, {"x": (codes * X_SCALE).astype(np.float32)[None, :]})["y"].reshape(-1)
        sums = y / (X_SCALE * scale)
        assert np.allclose(sums, np.rint(sums), atol=1e-3)
        return np.rint(sums)

    tiles, full = [], []
    for n in range(N):
        for want_max in (True, False):
            worst = np.where((q[:, n] > 0) == want_max, 7, -8)
            full.append(integer_sums(worst)[n])
            for start in range(0, K, TILE):
                codes = np.zeros(K)
                codes[start:start + TILE] = worst[start:start + TILE]
                tiles.append(integer_sums(codes)[n])
    return (int(min(tiles)), int(max(tiles))), (int(min(full)), int(max(full)))


def _stage_fits(extremes: tuple[int, int], bits: int) -> bool:
    return _fits(np.asarray(extremes), bits)


def test_project_tile_executes_within_both_widths_and_verify_reads_the_record(a2q, tmp_path):
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(qonnx_mlp(), path)
    (tile_lo, tile_hi), full = executed_stage_extremes(path)
    analysis = json.loads(a2q("analyze", path, "--tile", TILE, "--json").stdout)["layers"][0]
    assert analysis["tile_range"] == [tile_lo, tile_hi] and analysis["outer_range"] == list(full)
    inner_bits, outer_bits = analysis["tile_bits"] - 2, analysis["outer_bits"] - 2
    run = a2q("project", path, out, "--acc-bits", inner_bits, "--tile", TILE, "--outer-bits", outer_bits, "--json")
    assert run.returncode == 0, run.stderr
    layer = json.loads(run.stdout)["layers"][0]
    assert (layer["tile"], layer["outer_bits"]) == (TILE, outer_bits)
    tiles_after, full_after = executed_stage_extremes(out)
    assert _stage_fits(tiles_after, inner_bits) and _stage_fits(full_after, outer_bits)
    assert not _stage_fits((tile_lo, tile_hi), inner_bits) and not _stage_fits(full, outer_bits)
    record = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == "a2q.accumulators"))
    assert (record["layers"]["fc"]["tile"], record["layers"]["fc"]["outer_bits"]) == (TILE, outer_bits)
    verdict = json.loads(a2q("verify", out, "--json").stdout)["layers"][0]
    assert (verdict["proof"], verdict["tile"], verdict["outer_bits"]) == ("pass", TILE, outer_bits)
    assert verdict["registers"]["partial sum within a tile"] == list(tiles_after)
    assert verdict["registers"]["final sum"] == list(full_after)
    # one bit less outside: the proof fails and the worst case overflows the outer stage
    narrower = a2q("verify", out, "--acc-bits", inner_bits, "--tile", TILE, "--outer-bits",
                   max(full_after[1].bit_length(), (-full_after[0] - 1).bit_length()), "--json")
    assert narrower.returncode == 3
    assert json.loads(narrower.stdout)["layers"][0]["adversarial_register_overflows"] > 0


def test_project_tile_without_outer_bits_records_the_measured_outer_width(a2q, tmp_path):
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(qonnx_mlp(seed=4), path)
    inner_bits = json.loads(a2q("analyze", path, "--tile", TILE, "--json").stdout)["layers"][0]["tile_bits"] - 1
    layer = json.loads(a2q("project", path, out, "--acc-bits", inner_bits, "--tile", TILE, "--json").stdout)["layers"][0]
    tiles_after, full_after = executed_stage_extremes(out)
    assert _stage_fits(tiles_after, inner_bits)
    measured = max(full_after[1].bit_length(), (-full_after[0] - 1).bit_length()) + 1  # signed two's complement
    assert layer["outer_bits"] == layer["outer_width_after"] == measured
    assert a2q("verify", out).returncode == 0


def test_certificate_catches_a_tile_range_the_analysis_under_reports(a2q, tmp_path, monkeypatch):
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(qonnx_mlp(), path)
    inner_bits = json.loads(a2q("analyze", path, "--tile", TILE, "--json").stdout)["layers"][0]["tile_bits"] - 1
    import a2q_passes.analysis as analysis

    honest = analysis.stage_ranges
    monkeypatch.setattr(analysis, "stage_ranges",
                        lambda rows, x, tile: (lambda r: ((r[0][0] // 4, r[0][1] // 4), r[1]))(honest(rows, x, tile)))
    run = a2q("project", path, out, "--acc-bits", inner_bits, "--tile", TILE)
    assert run.returncode == 4 and "under-reports" in run.stderr
    assert not out.exists()


def test_outer_bits_without_tile_is_refused(a2q, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(qonnx_mlp(), path)
    run = a2q("project", path, tmp_path / "out.onnx", "--acc-bits", 12, "--outer-bits", 14)
    assert run.returncode == 1 and "--tile" in run.stderr
