"""AXE: every partial sum fits P (brute force over all vertex inputs, with and without tiles), and it beats
plain projection in output error, per layer on synthetic data and end to end on a trained digits model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from a2q_passes.analysis import analyze_model
from a2q_passes.bounds import IntRange
from a2q_passes.finetune.axe import axe_quantize, gram_matrices
from a2q_passes.finetune.train import FinetuneConfig
from a2q_passes.projection import InfeasibleTarget, plain_round, project_exact
from a2q_passes.transforms.finetune import FinetuneAccumulators
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.verification import verify_model
from tests.brevitas_nets import build_net
from tests.test_finetune import accuracy, digits_data, digits_model, qonnx_outputs

torch.set_num_threads(1)


def vertex_partial_sums(q: np.ndarray, x: IntRange, tile: int | None) -> np.ndarray:
    """Every running sum of every row over every vertex of the input box ({lo, hi}^K), restarting per tile."""
    K = q.shape[1]
    vertices = np.array(list(itertools.product((x.lo, x.hi), repeat=K)), dtype=np.int64)  # (2^K, K)
    terms = vertices[None, :, :] * q[:, None, :]  # (rows, 2^K, K)
    step = tile or K
    sums = [np.cumsum(terms[:, :, s:s + step], axis=2) for s in range(0, K, step)]
    return np.concatenate(sums + [np.cumsum(terms, axis=2)], axis=2)


def in_range(values: np.ndarray, bits: int) -> bool:
    if values.min() >= 0:
        return int(values.max()) <= (1 << bits) - 1
    return int(values.min()) >= -(1 << (bits - 1)) and int(values.max()) <= (1 << (bits - 1)) - 1


RANGES = [IntRange(0, 15), IntRange(-8, 7), IntRange(0, 255), IntRange(2, 9)]


@pytest.mark.parametrize("x", RANGES, ids=str)
@pytest.mark.parametrize("tile", [None, 3])
@pytest.mark.parametrize("seed", range(3))
def test_every_partial_sum_fits(x, tile, seed):
    rng = np.random.default_rng(seed)
    rows, K, weights = 6, 9, IntRange(-8, 7)
    v = rng.normal(0, 4, (rows, K))
    data = rng.integers(x.lo, x.hi + 1, (200, K)).astype(np.float64)
    plain = vertex_partial_sums(plain_round(v, weights), x, tile)
    for bits in range(4, 20):
        try:
            q = axe_quantize(v, *gram_matrices(data, data), x, bits, weights, tile)
        except InfeasibleTarget:
            assert bits <= 10  # only the smallest widths can be infeasible here
            continue
        assert q.dtype == np.int64 and q.min() >= weights.lo and q.max() <= weights.hi
        assert in_range(vertex_partial_sums(q, x, tile), bits), bits
        if in_range(plain, bits) and tile is None:
            break  # wide enough for plain rounding: nothing left to constrain
    assert not in_range(plain, 8)  # the small widths above did constrain


def test_beats_projection_on_correlated_inputs():
    """Error feedback: on correlated inputs AXE's output error is well below the exact projection's."""
    rng = np.random.default_rng(0)
    x = IntRange(0, 15)
    base = rng.uniform(0, 15, (600, 1))
    data = np.clip(np.rint(base + rng.normal(0, 3, (600, 48))), 0, 15)  # strongly correlated 4-bit codes
    v = rng.normal(0, 2.5, (16, 48))
    weights = IntRange(-8, 7)
    bits = 10
    plain = plain_round(v, weights)
    worst = np.stack([plain * x.lo, plain * x.hi])
    assert not in_range(np.concatenate([worst.min(0).sum(1), worst.max(0).sum(1)]), bits)  # plain rounding overflows
    q_axe = axe_quantize(v, *gram_matrices(data, data), x, bits, weights)
    q_projection = project_exact(v, x, bits, weights).weights

    def error(q):
        return float(np.sum((data @ v.T - data @ q.T) ** 2))

    assert error(q_axe) < 0.7 * error(q_projection), (error(q_axe), error(q_projection))


def test_model_axe_fits_verifies_and_beats_projection():
    model = digits_model()
    bits = 13
    x_cal, _ = digits_data("train", 256)
    axe = FinetuneAccumulators(bits, x_cal, None, FinetuneConfig(method="axe", progress=False,
                                                                     log=lambda line: None))
    quantized = axe(model).model
    projected = model.transform(ProjectToAccumulator(bits, method="exact"))
    assert verify_model(quantized, bits).overflow_impossible
    assert all(r.method == "axe" for r in axe.result.details["axe"])
    # lower output error against the original model, measured with qonnx's executor on the calibration data
    reference = qonnx_outputs(model, x_cal)
    axe_error = np.sum((qonnx_outputs(quantized, x_cal) - reference) ** 2)
    projection_error = np.sum((qonnx_outputs(projected, x_cal) - reference) ** 2)
    assert axe_error < 0.5 * projection_error, (axe_error, projection_error)
    assert accuracy(quantized) > accuracy(projected) + 5.0


def test_model_axe_with_tiles_verifies_tiled():
    model = digits_model()
    bits, tile = 12, 8
    x_cal, _ = digits_data("train", 128)
    tiled = FinetuneAccumulators(bits, x_cal, None, FinetuneConfig(method="axe", progress=False,
                                                                       log=lambda line: None), tile=tile)(model).model
    assert verify_model(tiled, bits, tile=tile).overflow_impossible
    assert verify_model(tiled, bits, mode="saturate").overflow_impossible  # every prefix fits as well


def test_axe_grouped_conv_with_signed_inputs(tmp_path):
    """Groups=3 conv and signed 4-bit inputs: per-group calibration patches, fits, beats projection.

    The inputs share a per-sample component, so neighbouring terms correlate as in real activations
    (on uncorrelated inputs there is no error to feed back and AXE falls back to the projection).
    """
    model = build_net(tmp_path, "conv", signed_act=True, per_channel=True).model
    bits = max(r.bounds["exact"] for r in analyze_model(model).layers) - 3
    rng = np.random.default_rng(0)
    x_cal = (rng.normal(0, 1.5, (96, 1, 1, 1)) + rng.normal(0, 0.4, (96, 2, 6, 6))).astype(np.float32)
    quantized = FinetuneAccumulators(bits, x_cal, None, FinetuneConfig(method="axe", progress=False,
                                                                       log=lambda line: None))(model).model
    projected = model.transform(ProjectToAccumulator(bits, method="exact"))
    assert verify_model(quantized, bits).overflow_impossible
    reference = qonnx_outputs(model, x_cal)
    axe_error = np.sum((qonnx_outputs(quantized, x_cal) - reference) ** 2)
    projection_error = np.sum((qonnx_outputs(projected, x_cal) - reference) ** 2)
    assert axe_error < 0.95 * projection_error, (axe_error, projection_error)
