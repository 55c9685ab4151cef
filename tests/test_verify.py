"""Overflow verification: static proof and simulations against brute force, on hand-built and Brevitas models."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.errors import A2QError, PostconditionError
from a2q_passes.metadata import record_accumulators, recorded_accumulators
from a2q_passes.passes import PassResult
from a2q_passes.transforms import AnnotateAccumulators, VerifyAccumulators
from a2q_passes.data_simulation import simulate_model
from a2q_passes.verification import LayerVerdict, VerificationReport, verify_model
from tests.brevitas_nets import build_net
from tests.cli_helpers import run_a2q
from tests.test_simulate import register_limits, sequential_accumulation

torch.set_num_threads(1)
QONNX_DOMAIN = "qonnx.custom_op.general"


# --------------------------------------------------------------------------- brute force (Python ints)


def _width(lo: int, hi: int) -> int:
    """Smallest P whose accumulator holds [lo, hi]: unsigned if lo >= 0, else two's complement."""
    return next(p for p in range(1, 80) if register_limits(p, lo < 0)[0] <= lo and hi <= register_limits(p, lo < 0)[1])


def _registers(terms: list[int], mode: str, tile: int | None) -> list[int]:
    """Every value an exact accumulator register holds on the way (what must fit P bits)."""
    if tile is None:
        prefixes = list(itertools.accumulate(terms))
        return prefixes if mode == "saturate" else prefixes[-1:]
    chunks = [terms[i:i + tile] for i in range(0, len(terms), tile)]
    inner = [value for chunk in chunks for value in itertools.accumulate(chunk)]
    return inner + list(itertools.accumulate(sum(chunk) for chunk in chunks))


def _layer_width(q: np.ndarray, lo: int, hi: int) -> int:
    """Exact-range width of a layer from its integer weights, by summing per-term extremes."""
    acc_min = min(sum(min(int(w) * lo, int(w) * hi) for w in row) for row in q)
    acc_max = max(sum(max(int(w) * lo, int(w) * hi) for w in row) for row in q)
    return _width(acc_min, acc_max)


# --------------------------------------------------------------------------- hand-built QONNX models


def _quant(name: str, tensor: str, scale, zero_point: float, bits: int, signed: bool, narrow: bool = False):
    inits = [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), f"{name}_scale"),
             numpy_helper.from_array(np.asarray(zero_point, dtype=np.float32), f"{name}_zp"),
             numpy_helper.from_array(np.asarray(bits, dtype=np.float32), f"{name}_bits")]
    node = helper.make_node("Quant", [tensor, f"{name}_scale", f"{name}_zp", f"{name}_bits"], [f"{name}_out"],
                            name=name, domain=QONNX_DOMAIN, signed=int(signed), narrow=int(narrow),
                            rounding_mode="ROUND")
    return node, inits


def _model(nodes, inits, input_shape, output: str) -> ModelWrapper:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 10
    return ModelWrapper(proto).transform(InferShapes())


X_SCALE, W_SCALE = 0.5, 0.25  # powers of two: float execution of small integers is exact


def _matmul_model(q: np.ndarray, in_bits: int, in_signed: bool, zero_point: int = 0) -> ModelWrapper:
    """x -> Quant -> MatMul(Quant(W)) with integer weights ``q`` of shape (K, C)."""
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qx, ix = _quant("qx", "x", X_SCALE, zero_point, in_bits, in_signed)
    qw, iw = _quant("qw", "w", np.full((1, q.shape[1]), W_SCALE), 0, 8, True, narrow=True)
    mm = helper.make_node("MatMul", ["qx_out", "qw_out"], ["y"], name="mm")
    return _model([qx, qw, mm], [weights, *ix, *iw], [1, q.shape[0]], "y")


def _conv_model(q: np.ndarray, in_shape, groups: int, strides, pads, dilations, zero_point: int) -> ModelWrapper:
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qx, ix = _quant("qx", "x", X_SCALE, zero_point, 3, False)
    qw, iw = _quant("qw", "w", np.full((q.shape[0], 1, 1, 1), W_SCALE), 0, 4, True)
    conv = helper.make_node("Conv", ["qx_out", "qw_out"], ["y"], name="conv", group=groups, strides=strides,
                            pads=pads, dilations=dilations, kernel_shape=list(q.shape[2:]))
    return _model([qx, qw, conv], [weights, *ix, *iw], list(in_shape), "y")


# --------------------------------------------------------------------------- static proof vs brute force


def _threshold_matmul_model(q: np.ndarray) -> ModelWrapper:
    """x -> MultiThreshold (3 steps, out_bias 1: codes 1..4, a box without 0) -> MatMul with INT4 weights."""
    thresholds = numpy_helper.from_array(np.array([[0.5, 1.5, 2.5]], dtype=np.float32), "thresholds")
    weights = numpy_helper.from_array(q.astype(np.float32), "w")
    mt = helper.make_node("MultiThreshold", ["x", "thresholds"], ["codes"], name="mt", domain=QONNX_DOMAIN,
                          out_dtype="UINT3", out_bias=1.0)
    mm = helper.make_node("MatMul", ["codes", "w"], ["y"], name="mm")
    model = _model([mt, mm], [thresholds, weights], [1, q.shape[0]], "y")
    model.set_tensor_datatype("w", DataType["INT4"])
    return model


# input boxes: 2-bit unsigned, 2-bit signed, unsigned with non-negative weights (an unsigned
# accumulator), and codes 1..4, where partial sums can leave the range of the final sum
INPUT_BOXES = {"uint2": (0, 3), "int2": (-2, 1), "uint2-nonneg-weights": (0, 3), "codes1to4": (1, 4)}


@pytest.mark.parametrize("mode,tile", [("wrap", None), ("saturate", None), ("wrap", 2), ("saturate", 3)])
@pytest.mark.parametrize("box,seed", [("uint2", 0), ("int2", 1), ("uint2-nonneg-weights", 2), ("codes1to4", 3),
                                      ("codes1to4", 4), ("codes1to4", 5)])
def test_static_proof_is_safe_and_minimal_over_the_whole_input_box(mode, tile, box, seed):
    rng = np.random.default_rng(seed)
    K, C = 4, 3
    q = rng.integers(-7, 8, size=(K, C))
    if box == "uint2-nonneg-weights":
        q = np.abs(q)
    if seed == 4:  # large terms of one sign first: partial sums overshoot the final sum's range
        q = np.array([[7, -7]] * 3 + [[-7, 7]] * 3)
        K = 6
    if seed == 5:  # tiles of 2: the prefix 7 + 6 + 4 overshoots, no register of the tiled datapath does
        q = np.array([[7], [6], [4], [-7]])
    model = _threshold_matmul_model(q) if box == "codes1to4" else _matmul_model(q, 2, box == "int2")
    lo, hi = INPUT_BOXES[box]
    values = [v for x in itertools.product(range(lo, hi + 1), repeat=K) for c in range(q.shape[1])
              for v in _registers([int(x[i]) * int(q[i, c]) for i in range(K)], mode, tile)]
    needed = _width(min(values), max(values))
    if seed == 4 and (mode, tile) != ("wrap", None):
        finals = [sum(int(x[i]) * int(q[i, c]) for i in range(K)) for x in itertools.product(range(lo, hi + 1), repeat=K)
                  for c in range(q.shape[1])]
        assert needed > _width(min(finals), max(finals))  # the case exercises the partial-sum registers
    at_p = verify_model(model, needed, mode, tile).layers[0]
    below = verify_model(model, needed - 1, mode, tile).layers[0]
    assert at_p.required_bits == needed and at_p.signed == (min(values) < 0)
    assert at_p.proof == "pass" and at_p.adversarial_register_overflows == 0 and at_p.adversarial_overflows == 0
    assert below.proof == "fail" and below.adversarial_register_overflows > 0
    if tile is None:  # one register, or clamping: a register overflow corrupts the worst-case result
        assert below.adversarial_overflows > 0



@pytest.mark.parametrize("mode,tile", [("wrap", None), ("saturate", None), ("wrap", 2), ("saturate", 3)])
@pytest.mark.parametrize("signed_input", [False, True])
@pytest.mark.parametrize("simulator", ["numpy", "kernel"])
def test_adversarial_simulation_in_blocks_of_rows_counts_every_row(mode, tile, signed_input, simulator, monkeypatch):
    """Large layers are simulated a block of rows at a time (numpy) or by the compiled kernel (from
    ``_ADVERSARIAL_KERNEL_TERMS`` terms): the counts are those of every row's two worst cases."""
    if simulator == "kernel":
        monkeypatch.setattr("a2q_passes.verification._ADVERSARIAL_KERNEL_TERMS", 0)
    rng = np.random.default_rng(7)
    K, C = 7, 5
    q = rng.integers(-7, 8, size=(K, C))
    model = _matmul_model(q, 2, signed_input)
    lo, hi = (-2, 1) if signed_input else (0, 3)
    # each output column's worst-case inputs, by hand: the input's end whose product with the weight is largest
    # (smallest), and every register the datapath holds on them
    cases = [_registers([max(int(w) * lo, int(w) * hi) if top else min(int(w) * lo, int(w) * hi) for w in q[:, c]],
                        mode, tile) for c in range(C) for top in (False, True)]
    values = [v for registers in cases for v in registers]
    bits = _width(min(values), max(values)) - 2
    limits = register_limits(bits, min(values) < 0)
    expected = sum(any(not limits[0] <= v <= limits[1] for v in registers) for registers in cases)
    assert 0 < expected < 2 * C  # some worst cases overflow, some do not
    whole = verify_model(model, bits, mode, tile).layers[0]
    monkeypatch.setattr("a2q_passes.verification._ADVERSARIAL_BLOCK_TERMS", 2 * K)  # blocks of two rows
    blocked = verify_model(model, bits, mode, tile).layers[0]
    assert blocked.adversarial_cases == whole.adversarial_cases == 2 * C
    assert blocked.adversarial_register_overflows == whole.adversarial_register_overflows == expected
    assert blocked.adversarial_overflows == whole.adversarial_overflows

@pytest.mark.parametrize("mode,tile,outer", [("wrap", None, None), ("saturate", None, None), ("wrap", 3, None),
                                             ("saturate", 4, None), ("wrap", 3, (9, True)), ("saturate", 5, (8, False))])
@pytest.mark.parametrize("stored", ["rows", "columns"])
@pytest.mark.parametrize("dtype,xnor", [(np.int8, False), (np.int16, False), (np.int64, False), (np.int8, True)])
def test_adversarial_kernel_counts_what_numpy_accumulation_counts(mode, tile, outer, stored, dtype, xnor):
    """The compiled worst-case simulation against simulate.accumulate_terms on the same worst-case terms, for rows
    stored as rows and as columns (MatMul's layout), narrow and wide weights, signed and unsigned accumulators."""
    from a2q_passes.adversarial_kernels import count_adversarial_overflows
    from a2q_passes.bounds import IntRange, adversarial_inputs
    from a2q_passes.simulate import accumulate_terms

    rng = np.random.default_rng(11)
    rows = (rng.integers(0, 2, size=(13, 17)) if xnor else rng.integers(-90, 91, size=(13, 17))).astype(dtype)
    rows[3] = np.abs(rows[3])  # a row of non-negative weights: its worst cases stay small
    if stored == "columns":
        rows = np.ascontiguousarray(rows.T).T
        assert not rows.flags.c_contiguous
    for lo, hi in ((0, 15), (-8, 7), (3, 9)):
        x_for_min, x_for_max = adversarial_inputs(rows, IntRange(lo, hi))
        inputs, weights = np.concatenate([x_for_min, x_for_max]), np.concatenate([rows, rows]).astype(np.int64)
        terms = (inputs == weights).astype(np.int64) if xnor else inputs * weights
        for bits, signed in ((6, True), (9, True), (11, False), (14, True)):
            expected = accumulate_terms(terms, bits, signed, mode, tile, outer)
            counts = count_adversarial_overflows(rows, lo, hi, xnor, bits, signed, mode, tile, outer)
            assert counts == (expected.overflow_count, expected.register_overflow_count), (lo, hi, bits, signed)


# --------------------------------------------------------------------------- data simulation vs brute force


@pytest.mark.parametrize("mode,tile,bits", [("wrap", None, 7), ("saturate", None, 7), ("wrap", 3, 6),
                                            ("saturate", 2, 7)])
@pytest.mark.parametrize("in_signed,zero_point", [(False, 0), (True, 0), (False, 5)])
def test_matmul_data_simulation_matches_sequential_accumulation(mode, tile, bits, in_signed, zero_point):
    rng = np.random.default_rng(bits)
    K, C, N = 6, 4, 40
    q = rng.integers(-7, 8, size=(K, C))
    model = _matmul_model(q, 4, in_signed, zero_point)
    lo, hi = register_limits(4, in_signed)
    codes = rng.integers(lo, hi + 1, size=(N, K))
    x = ((codes - zero_point) * X_SCALE).astype(np.float32)
    result = simulate_model(model, x, bits, mode, tile, batch_size=16)
    signed = verify_model(model, bits, mode, tile).layers[0].signed
    recovered = result.outputs["y"].astype(np.float64) / (X_SCALE * W_SCALE)
    overflows = 0
    for n, c in itertools.product(range(N), range(C)):
        terms = [int(codes[n, i]) * int(q[i, c]) for i in range(K)]
        sim = sequential_accumulation(terms, bits, signed, mode, tile)[0]
        overflows += sim != sum(terms)
        centred = sum(int(codes[n, i] - zero_point) * int(q[i, c]) for i in range(K))
        assert recovered[n, c] == pytest.approx(centred + sim - sum(terms), abs=1e-3)
    assert overflows > 0 and result.overflows == {"mm": overflows}
    assert result.accumulations == {"mm": N * C}
    np.testing.assert_allclose(result.exact_outputs["y"], (codes - zero_point) @ q * X_SCALE * W_SCALE, atol=1e-4)


CONV_CASES = [  # groups, strides, pads, dilations, zero point, convention, mode, tile
    (1, [1, 1], [1, 1, 1, 1], [1, 1], 0, "fold", "saturate", None),
    (2, [2, 1], [1, 0, 2, 1], [1, 2], 3, "fold", "wrap", None),
    (2, [1, 2], [0, 1, 1, 0], [2, 1], 3, "subtract", "saturate", 4),
    (4, [1, 1], [1, 1, 1, 1], [1, 1], 2, "fold", "wrap", 5),
]


@pytest.mark.parametrize("groups,strides,pads,dilations,zero_point,convention,mode,tile", CONV_CASES)
def test_conv_data_simulation_matches_brute_force_im2col(groups, strides, pads, dilations, zero_point, convention,
                                                         mode, tile):
    rng = np.random.default_rng(groups + zero_point)
    B, cin, cout, H, W, kh, kw = 3, 4, 4, 6, 5, 3, 2
    q = rng.integers(-8, 8, size=(cout, cin // groups, kh, kw))
    model = _conv_model(q, (1, cin, H, W), groups, strides, pads, dilations, zero_point)
    codes = rng.integers(0, 8, size=(B, cin, H, W))
    bits = 7
    result = simulate_model(model, ((codes - zero_point) * X_SCALE).astype(np.float32), bits, mode, tile,
                            zero_point=convention)
    signed = verify_model(model, bits, mode, tile, zero_point=convention).layers[0].signed
    # brute force: the codes the integer kernel sees, padded with the code of real zero
    seen = codes if convention == "fold" else codes - zero_point
    pad_code = zero_point if convention == "fold" else 0
    padded = np.pad(seen, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])], constant_values=pad_code)
    out = result.outputs["y"]
    recovered = out.astype(np.float64) / (X_SCALE * W_SCALE)
    overflows = 0
    for b, co, oy, ox in itertools.product(*(range(s) for s in out.shape)):
        g = co // (cout // groups)
        terms = [int(padded[b, g * (cin // groups) + ci, oy * strides[0] + ky * dilations[0],
                            ox * strides[1] + kx * dilations[1]]) * int(q[co, ci, ky, kx])
                 for ci in range(cin // groups) for ky in range(kh) for kx in range(kw)]
        sim = sequential_accumulation(terms, bits, signed, mode, tile)[0]
        overflows += sim != sum(terms)
        centred = sum(t - pad_code * int(w) for t, w in zip(terms, q[co].reshape(-1)))  # the float layer's value
        assert recovered[b, co, oy, ox] == pytest.approx(centred + sim - sum(terms), abs=1e-3)
    assert overflows > 0 and result.overflows == {"conv": overflows}


def test_batched_simulation_through_qonnx_im2col_runs_each_sample_as_executed(tmp_path):
    """qonnx's Im2Col (LowerConvsToMatMul, FINN's streamlined convolutions) windows the input_shape it records, so a
    batch of several images gave other windows, without an error: `verify --data` simulated accumulators and outputs
    no execution computes (found by the corpus' step 7). Against qonnx executing the graph one image at a time."""
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    model = ModelWrapper("models/digits_cnn_w4a4.onnx").transform(InferShapes()).transform(LowerConvsToMatMul())
    assert model.get_nodes_by_op_type("Im2Col")
    x = np.random.default_rng(0).uniform(0, 1, size=(5, *model.get_tensor_shape(model.graph.input[0].name)[1:]))
    x = x.astype(np.float32)
    result = simulate_model(model, x, 32)
    name = model.graph.output[0].name
    expected = np.concatenate([execute_onnx(model, {model.graph.input[0].name: x[i:i + 1]})[name] for i in range(5)])
    np.testing.assert_allclose(result.exact_outputs[name], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.outputs[name], expected, rtol=1e-5, atol=1e-5)


DECONV_CASES = [  # groups, strides, pads, dilations, output_padding, mode, tile
    (1, [2, 2], [0, 0, 0, 0], [1, 1], [0, 0], "saturate", None),
    (1, [2, 3], [1, 0, 2, 1], [1, 2], [1, 0], "wrap", None),
    (2, [3, 1], [0, 1, 1, 0], [2, 1], [1, 0], "saturate", 4),
    (2, [1, 2], [1, 1, 0, 0], [1, 1], [0, 1], "wrap", 3),
]


@pytest.mark.parametrize("groups,strides,pads,dilations,output_padding,mode,tile", DECONV_CASES)
def test_conv_transpose_data_simulation_matches_brute_force_scatter(groups, strides, pads, dilations, output_padding,
                                                                    mode, tile):
    """Each output pixel's terms from ONNX's definition of ConvTranspose (input pixel i and tap t add to output
    i * stride + t * dilation - pad), input channel first and then the taps in order, accumulated sequentially."""
    rng = np.random.default_rng(groups * 7 + strides[0])
    B, cin, cout_g, H, W, kh, kw = 2, 4, 3, 4, 3, 3, 2
    q = rng.integers(-8, 8, size=(cin, cout_g, kh, kw))
    weights = numpy_helper.from_array((q * W_SCALE).astype(np.float32), "w")
    qx, ix = _quant("qx", "x", X_SCALE, 0, 3, False)
    qw, iw = _quant("qw", "w", np.float32(W_SCALE), 0, 4, True)
    deconv = helper.make_node("ConvTranspose", ["qx_out", "qw_out"], ["y"], name="deconv", group=groups,
                              strides=strides, pads=pads, dilations=dilations, output_padding=output_padding,
                              kernel_shape=[kh, kw])
    model = _model([qx, qw, deconv], [weights, *ix, *iw], [1, cin, H, W], "y")
    codes = rng.integers(0, 8, size=(B, cin, H, W))
    bits = 6
    result = simulate_model(model, (codes * X_SCALE).astype(np.float32), bits, mode, tile)
    signed = verify_model(model, bits, mode, tile).layers[0].signed
    out = result.exact_outputs["y"]
    cout, cin_g = cout_g * groups, cin // groups
    terms: dict[tuple, list[int]] = {}
    for b, co in itertools.product(range(B), range(cout)):
        g, local = divmod(co, cout_g)
        for ci, ky, kx, iy, ix_ in itertools.product(range(cin_g), range(kh), range(kw), range(H), range(W)):
            oy = iy * strides[0] + ky * dilations[0] - pads[0]
            ox = ix_ * strides[1] + kx * dilations[1] - pads[1]
            if 0 <= oy < out.shape[2] and 0 <= ox < out.shape[3]:
                term = int(codes[b, g * cin_g + ci, iy, ix_]) * int(q[g * cin_g + ci, local, ky, kx])
                terms.setdefault((b, co, oy, ox), []).append(term)
    recovered = result.outputs["y"].astype(np.float64) / (X_SCALE * W_SCALE)
    overflows = 0
    for index in itertools.product(*(range(s) for s in out.shape)):
        pixel = terms.get(index, [])
        sim = sequential_accumulation(pixel, bits, signed, mode, tile)[0] if pixel else 0
        overflows += sim != sum(pixel)
        assert recovered[index] == pytest.approx(sim, abs=1e-3), index
    assert overflows > 0 and result.overflows == {"deconv": overflows}
    assert result.accumulations == {"deconv": out.size}


# --------------------------------------------------------------------------- Brevitas exports, CLI



NETS = [("conv", 4, 4, False), ("linear", 8, 8, True), ("conv", 8, 4, True), ("linear", 4, 4, False)]


@pytest.fixture(scope="module", params=NETS, ids=lambda p: f"{p[0]}-w{p[1]}a{p[2]}{'s' if p[3] else 'u'}")
def net(request, tmp_path_factory):
    kind, wbits, abits, signed = request.param
    exported = build_net(tmp_path_factory.mktemp("net"), kind, wbits, abits, signed)
    exported.widths = [_layer_width(q, lo, hi) for q, lo, hi in exported.expected]
    return exported


def _layer_names(net) -> list[str]:
    return [n.name for n in net.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def test_cli_passes_at_the_exact_width_and_fails_one_bit_below(net, tmp_path, a2q):
    exact = max(net.widths)
    ok = a2q("verify", net.path, "--acc-bits", exact, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert [v["required_bits"] for v in report["layers"]] == net.widths
    assert report["overflow_impossible"] is True
    bad = a2q("verify", net.path, "--acc-bits", exact - 1)
    assert bad.returncode == 3
    assert "verdict: overflow possible" in bad.stdout and "overflow possible or not proven" in bad.stderr
    # per layer: each layer at its own exact width except one bit less on the last one
    names = _layer_names(net)
    tight = [f"{name}={w}" for name, w in zip(names, net.widths)][:-1] + [f"{names[-1]}={net.widths[-1] - 1}"]
    failed = a2q("verify", net.path, *itertools.chain(*(("--layer", s) for s in tight)), "--mode", "saturate")
    assert failed.returncode == 3 and names[-1] in failed.stderr


def test_simulation_at_a_wide_width_equals_qonnx_execution(net):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, *net.input_shape[1:])) * 2).astype(np.float32)
    result = simulate_model(net.model, x, 32, batch_size=5)
    name = net.model.graph.output[0].name
    reference = np.concatenate([execute_onnx(net.model, {net.model.graph.input[0].name: x[i:i + 1]})[name]
                                for i in range(len(x))])
    np.testing.assert_allclose(result.outputs[name], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.outputs[name], result.exact_outputs[name])
    assert set(result.overflows) == set(_layer_names(net)) and not any(result.overflows.values())
    assert all(result.accumulations.values())


def test_narrow_wrap_around_changes_outputs_and_counts_overflows(net, tmp_path, a2q):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, *net.input_shape[1:])) * 2).astype(np.float32)
    narrow = min(net.widths) - 3
    result = simulate_model(net.model, x, narrow)
    assert sum(result.overflows.values()) > 0
    assert result.max_abs_deviation() > 0
    np.savez(tmp_path / "data.npz", x=x)
    out = a2q("verify", net.path, "--acc-bits", narrow, "--data", tmp_path / "data.npz", "--json")
    assert out.returncode == 3
    data = json.loads(out.stdout)["data"]
    assert data["overflows"] == result.overflows and data["max_abs_output_deviation"] > 0


def test_recorded_widths_are_picked_up(tmp_path, a2q):
    net = build_net(tmp_path, "conv", 4, 4)
    annotated = net.model.transform(AnnotateAccumulators())
    path = tmp_path / "annotated.onnx"
    annotated.save(str(path))
    ok = a2q("verify", path, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["width_source"] == "model metadata"
    widths = [_layer_width(q, lo, hi) for q, lo, hi in net.expected]
    assert [v["acc_bits"] for v in report["layers"]] == widths
    # one bit less recorded for the first layer -> overflow possible
    layers = recorded_accumulators(annotated)
    first = _layer_names(net)[0]
    layers[first] = dict(layers[first], acc_bits=layers[first]["acc_bits"] - 1)
    record_accumulators(annotated, layers, source="test")
    annotated.save(str(path))
    assert run_a2q("verify", path).returncode == 3
    # a layer missing from the record (a partial project/finetune) is checked at its own exact width
    del layers[first]
    record_accumulators(annotated, layers, source="test")
    annotated.save(str(path))
    missing = a2q("verify", path, "--json")
    assert missing.returncode == 0, missing.stdout + missing.stderr
    verdict = json.loads(missing.stdout)["layers"][0]
    assert verdict["node"] == first and verdict["acc_bits"] == widths[0] and verdict["width_note"].startswith("no target")
    # ... but asking about the other layer only passes
    second = _layer_names(net)[1]
    assert a2q("verify", path, "--layer", f"{second}={widths[1]}").returncode == 0
    # no record and no width: a clear error
    none = run_a2q("verify", net.path)
    assert none.returncode == 1 and "--acc-bits" in none.stderr


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    return build_net(tmp_path_factory.mktemp("small"), "conv", 4, 4)


@pytest.mark.parametrize("case", ["shape", "nan", "missing", "not_npz", "keys"])
def test_bad_data_is_a_clear_error(small_net, tmp_path, case, a2q):
    path = tmp_path / "data.npz"
    good = np.zeros((4, 2, 6, 6), dtype=np.float32)
    if case == "shape":
        np.savez(path, x=np.zeros((4, 2, 5, 6), dtype=np.float32))
        expect = "(N, 2, 6, 6)"
    elif case == "nan":
        good[1, 0, 2, 2] = np.nan
        np.savez(path, x=good)
        expect = "NaN"
    elif case == "missing":
        expect = "no such data file"
    elif case == "not_npz":
        path.write_bytes(b"not a zip archive")
        expect = "not a readable .npz"
    else:
        np.savez(path, a=good, b=good)
        expect = "do not match the model inputs"
    out = a2q("verify", small_net.path, "--acc-bits", 16, "--data", path)
    assert out.returncode == 1, out.stdout
    assert expect in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,expect", [
    (["--layer", "nosuch=12"], "'nosuch'"),
    (["--acc-bits", "12", "--layer", "Quant_0=12"], "not a quantized MAC layer"),
    (["--acc-bits", "0"], "--acc-bits: accumulator width 0 is out of range"),
    (["--acc-bits", "12", "--mode", "round"], "mode"),
    (["--acc-bits", "12", "--tile", "0"], "--tile"),
])
def test_bad_options_are_clear_errors(small_net, args, expect, a2q):
    out = a2q("verify", small_net.path, *args)
    assert out.returncode == 1 and expect in out.stderr, out.stderr


def test_off_grid_data_for_an_integer_input_is_refused(tmp_path):
    # an integer-typed graph input (as FINN graphs have) must receive integer codes
    q = np.array([[1, -2], [3, 4]])
    weights = numpy_helper.from_array(q.astype(np.float32), "w")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = _model([mm], [weights], [1, 2], "y")
    model.set_tensor_datatype("x", DataType["UINT4"])
    model.set_tensor_datatype("w", DataType["INT4"])
    # channel ranges [0, 60] and [-30, 60]: a signed accumulator; INT5 holds [-16, 15]
    ok = simulate_model(model, np.array([[15, 15], [0, 1]], dtype=np.float32), 5)
    assert ok.overflows == {"mm": 2}  # sample 0: 15 + 45 = 60 and -30 + 60 = 30 overflow; sample 1: 3 and 4 fit
    np.testing.assert_array_equal(ok.outputs["y"], [[60 - 64, 30 - 32], [3, 4]])
    with pytest.raises(A2QError, match="not on the integer grid"):
        simulate_model(model, np.array([[0.5, 1.0]], dtype=np.float32), 5)


def test_plot_data_and_pass_details(small_net, tmp_path):
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((8, 2, 6, 6)).astype(np.float32))
    out = run_a2q("verify", small_net.path, "--acc-bits", 16, "--plot", tmp_path / "v.png", "--data",
                  tmp_path / "data.npz")
    assert out.returncode == 0 and (tmp_path / "v.png").read_bytes().startswith(b"\x89PNG")
    assert "max |output - exact-accumulation output| = 0\n" in out.stdout
    before = small_net.model.model.SerializeToString(deterministic=True)
    check = VerifyAccumulators(16)
    result = check(small_net.model)
    assert result.model.model.SerializeToString(deterministic=True) == before and not result.modified
    assert result.details["overflow_impossible"] is True
    assert set(result.details["layers"]) == set(_layer_names(small_net))


def test_ensures_rejects_a_proof_contradicted_by_simulation(small_net):
    check = VerifyAccumulators(16)
    check(small_net.model)
    bogus = LayerVerdict("Conv_0", "Conv", 18, 6, "ok", "pass", acc_bits=16, adversarial_register_overflows=2)
    with pytest.raises(PostconditionError, match="Conv_0"):
        check.ensures(PassResult(small_net.model, False, {"report": VerificationReport([bogus], "wrap", None,
                                                                                      "global", "fold")}))
    unproven = LayerVerdict("Conv_0", "Conv", 18, 6, "ok", "fail", acc_bits=4, adversarial_register_overflows=0)
    with pytest.raises(PostconditionError, match="worst-case"):
        check.ensures(PassResult(small_net.model, False, {"report": VerificationReport([unproven], "wrap", None,
                                                                                        "global", "fold")}))


def test_tiled_wrap_around_keeps_results_exact_while_tile_registers_overflow():
    q = np.array([[7], [6], [4], [-7]])  # codes 1..4: final sum in [-11, 61], tile registers in [-24, 61]
    model = _threshold_matmul_model(q)
    x = np.array(list(itertools.product(range(4), repeat=4)), dtype=np.float32)  # codes 1..4: the whole box
    at7 = verify_model(model, 7, "wrap", 2, data=x).layers[0]
    assert at7.proof == "pass" and at7.data_overflows == 0 and at7.data_register_overflows == 0
    at6 = verify_model(model, 6, "wrap", 2, data=x).layers[0]  # INT6 holds [-32, 31]
    brute = sum(1 for codes in itertools.product(range(1, 5), repeat=4)
                if any(not -32 <= v <= 31 for v in _registers([c * int(w) for c, w in zip(codes, q[:, 0])], "wrap", 2)))
    assert at6.proof == "fail" and at6.data_register_overflows == brute > 0
    finals_out = sum(1 for codes in itertools.product(range(1, 5), repeat=4)
                     if not -32 <= sum(c * int(w) for c, w in zip(codes, q[:, 0])) <= 31)
    assert at6.data_overflows == finals_out  # wrong results only where the final sum itself does not fit


def test_onnxruntime_qdq_model_simulates_like_onnxruntime(tmp_path):
    import onnxruntime as ort

    from tests.test_analysis import _qdq_model

    model = _qdq_model(tmp_path)
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    # the graph as written (float DequantizeLinear, Conv, QuantizeLinear): onnxruntime's default optimizations fuse
    # Q/DQ into integer kernels whose requantization rounds differently on some CPUs (seen on one machine)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    output = model.graph.output[0].name
    report = verify_model(model, 32, data=x)
    np.testing.assert_allclose(report.simulation.outputs[output], reference, rtol=1e-6, atol=1e-6)
    assert [v.op_type for v in report.layers] == ["Conv", "Gemm"] and report.overflow_impossible
    narrow = verify_model(model, min(v.required_bits for v in report.layers) - 2, data=x)
    assert all(v.proof == "fail" for v in narrow.layers) and narrow.layers[0].data_overflows > 0
    assert narrow.simulation.max_abs_deviation() > 0


def test_trained_model_on_real_digits():
    """The committed w4a4 depthwise-residual digits model on the real held-out digits."""
    from models.data import load_digits_split

    from a2q_passes.layers import find_mac_layers
    from a2q_passes.model_io import load_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "digits_resdw_w4a4.onnx")
    x, labels = load_digits_split("test")
    layers = [layer for layer in find_mac_layers(model) if layer.ok]
    widths = {layer.node: _layer_width(layer.integer_rows(model), layer.grid.range.lo, layer.grid.range.hi)
              for layer in layers}
    assert any(layer.op_type == "Conv" and layer.K == 9 for layer in layers)  # the depthwise conv
    exact = verify_model(model, widths, data=x)
    assert exact.overflow_impossible and [v.required_bits for v in exact.layers] == list(widths.values())
    output = model.graph.output[0].name
    sim = exact.simulation
    np.testing.assert_array_equal(sim.outputs[output], sim.exact_outputs[output])
    reference = np.concatenate([execute_onnx(model, {model.graph.input[0].name: x[i:i + 1]})[output]
                                for i in range(0, len(x), 60)])
    np.testing.assert_allclose(sim.exact_outputs[output][::60], reference, rtol=1e-5, atol=1e-5)
    assert np.mean(np.argmax(sim.exact_outputs[output], axis=1) == labels) > 0.9
    narrow = simulate_model(model, x, min(widths.values()) - 4)
    assert narrow.changed_predictions() > 0.1 and sum(narrow.overflows.values()) > 0


MLP = Path(__file__).resolve().parents[1] / "models" / "digits_mlp_w4a4.onnx"  # Gemm_0 17, Gemm_1 13, Gemm_2 11 bits


def test_skip_leaves_a_layer_out_of_the_verdict_and_says_so(a2q):
    """At P=14 Gemm_0 (17 bits) can overflow; --skip Gemm_0 leaves it out: the verdict passes for the others, the
    layer is listed as skipped in its place, and the summary says the verdict does not cover it."""
    failing = a2q("verify", MLP, "--acc-bits", 14)
    assert failing.returncode == 3 and "Gemm_0" in failing.stderr
    passing = a2q("verify", MLP, "--acc-bits", 14, "--skip", "Gemm_0")
    assert passing.returncode == 0, passing.stderr
    assert "left out with --skip, not covered by the verdict: Gemm_0" in " ".join(passing.stdout.split())
    report = json.loads(a2q("verify", MLP, "--acc-bits", 14, "--skip", "Gemm_0", "--json").stdout)
    assert [(v["node"], v["proof"]) for v in report["layers"]] == [("Gemm_0", "skipped"), ("Gemm_1", "pass"),
                                                                     ("Gemm_2", "pass")]
    # skipping every layer proves nothing
    everything = a2q("verify", MLP, "--acc-bits", 14, "--skip", "Gemm_0", "--skip", "Gemm_1", "--skip", "Gemm_2")
    assert everything.returncode == 3 and "no quantized MAC layer was checked" in everything.stderr


@pytest.mark.parametrize("args, message", [(("--acc-bits", "14", "--skip", "Gemm_9"), "--skip Gemm_9: no MAC layer"),
                                           (("--layer", "Gemm_1=14", "--skip", "Gemm_1"), "both skipped")])
def test_skip_refuses_unknown_and_contradicting_names(a2q, args, message):
    result = a2q("verify", MLP, *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("op", ["MatMulInteger", "QLinearMatMul"])
def test_data_simulation_exact_outputs_of_integer_ops_are_exact_on_any_cpu(op):
    """The "exact" outputs of ``verify --data`` for onnxruntime's integer MAC ops: on AVX2 CPUs without VNNI,
    onnxruntime's uint8 x int8 kernels add pairs of products in int16 with saturation (255 * 127 * 2 = 64770 comes
    out as 32767), so its outputs were no exact reference there; the simulation then runs these ops in ONNX's
    reference implementation. Checked against int64 products of the same codes (the simulation runs these layers
    exactly)."""
    rng = np.random.default_rng(0)
    codes = np.concatenate([np.full((2, 8), 255), rng.integers(0, 256, size=(30, 8))]).astype(np.uint8)
    w = np.concatenate([np.full((8, 1), 127), rng.integers(-128, 128, size=(8, 3))], axis=1).astype(np.int8)
    exact = codes.astype(np.int64) @ w.astype(np.int64)
    inits = [numpy_helper.from_array(w, "w")]
    if op == "MatMulInteger":
        node = helper.make_node(op, ["x", "w"], ["y"], name="mm")
        out_type, expected = TensorProto.INT32, exact
    else:  # y = saturate(round(acc * s_x * s_w / s_y)): s_y = s_x * s_w * 2^10 keeps every output inside int8
        inits += [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in (
            ("sx", 1.0, np.float32), ("zx", 0, np.uint8), ("sw", 1.0, np.float32), ("zw", 0, np.int8),
            ("sy", 1024.0, np.float32), ("zy", 0, np.int8))]
        node = helper.make_node(op, ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"], name="mm")
        out_type, expected = TensorProto.INT8, np.clip(np.round(exact / 1024.0), -128, 127)
    graph = helper.make_graph([node], "int", [helper.make_tensor_value_info("x", TensorProto.UINT8, [32, 8])],
                              [helper.make_tensor_value_info("y", out_type, [32, 4])], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    result = simulate_model(model, codes, 32)
    np.testing.assert_array_equal(result.exact_outputs["y"].astype(np.int64), expected)
    np.testing.assert_array_equal(result.outputs["y"].astype(np.int64), expected)


@pytest.mark.parametrize("form", ["quant", "qdq"])
def test_data_simulation_of_a_depthwise_conv_with_one_input_scale_per_channel(form):
    """``verify --data`` on a depthwise Conv whose input has one scale per channel (Brevitas' MobileNet-v1): each
    channel's codes are its values over its own step, and a P-bit wrap-around result reaches the output times that
    channel's step. Checked against int64 convolutions of the codes wrapped to P bits (modular: the order of the
    additions does not matter), with inputs that overflow 7 bits."""
    from tests.test_analysis import _per_channel_scaled_conv

    model = _per_channel_scaled_conv(groups=4, form=form)
    step = model.get_initializer("sx").reshape(1, 4, 1, 1).astype(np.float64)
    codes = np.random.default_rng(1).integers(0, 16, size=(6, 4, 6, 6))
    codes[0] = 15  # every tap at the top code: the largest sums
    x = (codes * step).astype(np.float32)
    w = model.get_initializer("w").astype(np.int64)
    acc = torch.nn.functional.conv2d(torch.from_numpy(codes.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                                     padding=1, groups=4).numpy().round().astype(np.int64)
    bits = 7
    wrapped = (acc + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
    assert np.any(wrapped != acc)  # the data overflows P
    result = simulate_model(model, x, bits)
    assert result.widths == {"conv": bits} and not result.skipped
    assert result.overflows["conv"] == int(np.count_nonzero(wrapped != acc))
    np.testing.assert_allclose(result.exact_outputs["y"], acc * step, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.outputs["y"], wrapped * step, rtol=1e-5, atol=1e-5)


def _channels_last_pair() -> tuple[ModelWrapper, ModelWrapper]:
    """A QONNX Conv (uint4 input of step 0.5, int4 weights) and qonnx's channels-last form of it."""
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

    w = np.random.default_rng(0).integers(-7, 8, size=(4, 3, 3, 3)).astype(np.float32)
    w[0] = 7  # the largest sums
    quant = {"domain": "qonnx.custom_op.general", "narrow": 0, "rounding_mode": "ROUND"}
    nodes = [helper.make_node("Quant", ["x", "sx", "z", "bits"], ["xq"], signed=0, **quant),
             helper.make_node("Quant", ["w", "sw", "z", "bits"], ["wq"], signed=1, **quant),
             helper.make_node("Conv", ["xq", "wq"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                              strides=[1, 1], dilations=[1, 1], group=1)]
    inits = {"sx": 0.5, "z": 0.0, "bits": 4.0, "w": w, "sw": 1.0}
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 6])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                 helper.make_opsetid("qonnx.custom_op.general", 1)]))
    model = model.transform(InferShapes())
    channels_last = model.transform(ConvertToChannelsLastAndClean())
    assert any(n.domain == "qonnx.custom_op.channels_last" for n in channels_last.graph.node)
    return model, channels_last


def test_data_simulation_of_a_channels_last_conv():
    """qonnx's channels-last Conv (NHWC data, weights (C_out, kh, kw, C_in)): under wrap-around the same results as
    the channels-first Conv it came from; under saturation each output's taps are added in its rows' order, kernel
    position first, then input channel, checked one Python-int addition at a time."""
    model, channels_last = _channels_last_pair()
    x = np.random.default_rng(1).uniform(0, 8, size=(4, 3, 6, 6)).astype(np.float32)
    x[0] = 8.0  # every code at 15
    bits = 8
    first = simulate_model(model, x, {"conv": bits})
    last = simulate_model(channels_last, x, {"conv": bits})
    assert not last.skipped and first.overflows["conv"] > 0
    assert last.overflows == first.overflows and last.accumulations == first.accumulations
    np.testing.assert_array_equal(last.outputs["y"], first.outputs["y"])

    codes = np.pad(np.clip(np.rint(x / 0.5), 0, 15).astype(np.int64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.int64)
    expected = np.zeros((4, 4, 6, 6), dtype=np.int64)
    for b, o, i, j in itertools.product(range(4), range(4), range(6), range(6)):
        terms = [int(codes[b, c, i + p, j + q] * w[o, c, p, q]) for p, q, c in itertools.product(range(3), range(3), range(3))]
        expected[b, o, i, j] = sequential_accumulation(terms, bits, True, "saturate", None)[0]
    exact = np.rint(first.exact_outputs["y"] / 0.5).astype(np.int64)
    saturated = simulate_model(channels_last, x, {"conv": bits}, mode="saturate")
    assert saturated.overflows["conv"] == int(np.count_nonzero(expected != exact))
    np.testing.assert_allclose(saturated.outputs["y"], expected * 0.5)
    # the channels-first order gives other saturated results on these inputs: the order is what is tested
    assert simulate_model(model, x, {"conv": bits}, mode="saturate").overflows != saturated.overflows


@pytest.mark.parametrize("thresholded, specialised", [(False, False), (True, False), (True, True)])
def test_data_simulation_of_a_finn_mvau(thresholded, specialised):
    """A FINN MVAU (what `a2q lower` writes): ``x @ W`` on its input codes in P bits, then, where it thresholds, its
    own thresholds applied to the P-bit accumulator. Checked against int64 products wrapped to P and qonnx's
    multithreshold, the function FINN's execution of the node calls. ``specialised``: the MVAU_hls FINN's
    SpecializeLayers makes of it, which executes only in C++ simulation, runs as the MVAU it computes."""
    from qonnx.custom_op.general.multithreshold import multithreshold

    rng = np.random.default_rng(3)
    mw, mh = 24, 6
    w = rng.integers(-8, 8, size=(mw, mh)).astype(np.float32)
    w[:, 0] = 7
    thresholds = np.sort(rng.integers(-600, 600, size=(mh, 3)), axis=1).astype(np.float32)
    attrs = dict(MW=mw, MH=mh, SIMD=1, PE=1, inputDataType="UINT4", weightDataType="INT4", ActVal=0,
                 outputDataType="UINT2" if thresholded else "INT32", accDataType="INT32",
                 noActivation=0 if thresholded else 1, numInputVectors=[1], binaryXnorMode=0,
                 backend="fpgadataflow")
    inputs = ["x", "w", "t"] if thresholded else ["x", "w"]
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(thresholds, "t")] if thresholded else [])
    node = helper.make_node("MVAU_hls" if specialised else "MVAU", inputs, ["y"], name="mvau",
                            domain="finn.custom_op.fpgadataflow" + (".hls" if specialised else ""), **attrs)
    graph = helper.make_graph([node], "mvau", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, mw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, mh])], inits)
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.set_tensor_datatype("x", DataType["UINT4"])
    x = rng.integers(0, 16, size=(20, mw)).astype(np.float32)
    x[0] = 15
    acc = x.astype(np.int64) @ w.astype(np.int64)
    bits = 10
    wrapped = (acc + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
    assert np.any(wrapped != acc) and not np.all(wrapped != acc)

    def activation(a: np.ndarray) -> np.ndarray:
        return multithreshold(a.astype(np.float32), thresholds) if thresholded else a.astype(np.float32)

    result = simulate_model(model, x, {"mvau": bits})
    assert not result.skipped and result.accumulations["mvau"] == acc.size
    assert result.overflows["mvau"] == int(np.count_nonzero(wrapped != acc))
    np.testing.assert_array_equal(result.exact_outputs["y"], activation(acc))
    np.testing.assert_array_equal(result.outputs["y"], activation(wrapped))
    assert not np.array_equal(activation(wrapped), activation(acc))


def test_data_simulation_runs_finn_layers_registered_on_import():
    """finn-plus registers some HW layers (its ``Reshape``, as ``convert_to_hw`` writes in front of the zoo's TFC)
    only when their module is imported: `verify --data` imports them, where it raised onnxruntime's "not a registered
    function/op" as an internal error."""
    rng = np.random.default_rng(4)
    w = rng.integers(-8, 8, size=(24, 5)).astype(np.float32)
    reshape = helper.make_node("Reshape", ["x"], ["v"], name="reshape", domain="finn.custom_op.fpgadataflow",
                               inp_shape=[1, 4, 6], out_shape=[1, 24], dtype="UINT4", backend="fpgadataflow")
    mvau = helper.make_node("MVAU", ["v", "w"], ["y"], name="mvau", domain="finn.custom_op.fpgadataflow", MW=24, MH=5,
                            SIMD=1, PE=1, inputDataType="UINT4", weightDataType="INT4", outputDataType="INT32",
                            accDataType="INT32", noActivation=1, numInputVectors=[1], binaryXnorMode=0, ActVal=0,
                            backend="fpgadataflow")
    graph = helper.make_graph([reshape, mvau], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(w, "w")],
                              value_info=[helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 24])])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.set_tensor_datatype("x", DataType["UINT4"])
    model.set_tensor_datatype("v", DataType["UINT4"])
    x = rng.integers(0, 16, size=(3, 4, 6)).astype(np.float32)
    acc = x.reshape(3, 24).astype(np.int64) @ w.astype(np.int64)
    result = simulate_model(model, x, {"mvau": 32})
    assert result.overflows["mvau"] == 0 and result.accumulations["mvau"] == acc.size
    np.testing.assert_array_equal(result.outputs["y"], acc.astype(np.float32))


@pytest.mark.parametrize("pe", [1, 2, 4])
def test_data_simulation_of_a_finn_vvau(pe):
    """A FINN VVAU (depthwise layers after convert_to_hw): each channel's window taps, as FINN's execution untangles
    the input (``PE`` channels interleaved per tap), times its own kernel, in P bits, then its thresholds. The exact
    accumulators come from FINN's own execution of the node without thresholds."""
    from qonnx.custom_op.general.multithreshold import multithreshold
    from qonnx.custom_op.registry import getCustomOp

    rng = np.random.default_rng(5)
    channels, k = 4, 3
    w = rng.integers(-8, 8, size=(channels, 1, k, k)).astype(np.float32)
    w[0] = 7
    thresholds = np.sort(rng.integers(-100, 100, size=(channels, 3)), axis=1).astype(np.float32)
    attrs = dict(PE=pe, Channels=channels, Kernel=[k, k], Dim=[2, 2], inputDataType="UINT4", weightDataType="INT4",
                 outputDataType="UINT2", accDataType="INT32", ActVal=0, noActivation=0, backend="fpgadataflow")
    node = helper.make_node("VVAU", ["x", "w", "t"], ["y"], name="vvau", domain="finn.custom_op.fpgadataflow", **attrs)
    graph = helper.make_graph([node], "vvau", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 36])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, channels])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(thresholds, "t")])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.set_tensor_datatype("x", DataType["UINT4"])
    x = rng.integers(0, 16, size=(5, 2, 2, 36)).astype(np.float32)
    x[0] = 15

    plain = ModelWrapper(copy.deepcopy(model.model))
    plain.graph.node[0].CopyFrom(helper.make_node("VVAU", ["x", "w"], ["y"], name="vvau",
                                                  domain="finn.custom_op.fpgadataflow", **{**attrs, "noActivation": 1}))
    acc = []
    for sample in x:  # FINN's execution takes one image at a time
        context = {"x": sample[None], "w": w, "y": np.zeros((1, 2, 2, channels), np.float32)}
        getCustomOp(plain.graph.node[0]).execute_node(context, plain.graph)
        acc.append(context["y"])
    acc = np.rint(np.concatenate(acc)).astype(np.int64)
    bits = 7
    wrapped = (acc + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
    assert np.any(wrapped != acc) and not np.all(wrapped != acc)

    def activation(a: np.ndarray) -> np.ndarray:
        return multithreshold(a.astype(np.float32).transpose(0, 3, 1, 2), thresholds).transpose(0, 2, 3, 1)

    result = simulate_model(model, x, {"vvau": bits})
    assert not result.skipped and result.accumulations["vvau"] == acc.size
    assert result.overflows["vvau"] == int(np.count_nonzero(wrapped != acc))
    np.testing.assert_array_equal(result.exact_outputs["y"], activation(acc))
    np.testing.assert_array_equal(result.outputs["y"], activation(wrapped))


def test_data_simulation_of_a_finn_xnor_popcount_mvau():
    """A binarized MVAU (``binaryXnorMode``, BINARY input and weights, as FINN infers for BNNs such as the zoo's
    TFC_1W1A): each term is 1 where the input bit equals the weight bit, accumulated in P bits (an unsigned count),
    then thresholded. The exact counts come from FINN's own execution of the node without thresholds."""
    from qonnx.custom_op.general.multithreshold import multithreshold
    from qonnx.custom_op.registry import getCustomOp

    rng = np.random.default_rng(6)
    mw, mh = 40, 5
    w = rng.integers(0, 2, size=(mw, mh)).astype(np.float32)
    thresholds = np.sort(rng.integers(0, 40, size=(mh, 1)), axis=1).astype(np.float32)
    attrs = dict(MW=mw, MH=mh, SIMD=1, PE=1, inputDataType="BINARY", weightDataType="BINARY", ActVal=0,
                 outputDataType="BINARY", accDataType="UINT32", numInputVectors=[1], binaryXnorMode=1,
                 backend="fpgadataflow")

    def mvau(**extra) -> ModelWrapper:
        inputs = ["x", "w", "t"] if not extra.get("noActivation") else ["x", "w"]
        node = helper.make_node("MVAU", inputs, ["y"], name="mvau", domain="finn.custom_op.fpgadataflow",
                                **{"noActivation": 0, **attrs, **extra})
        inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(thresholds, "t")] if len(inputs) > 2 else [])
        graph = helper.make_graph([node], "mvau", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, mw])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, mh])], inits)
        model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
        model.set_tensor_datatype("x", DataType["BINARY"])
        return model

    x = rng.integers(0, 2, size=(30, mw)).astype(np.float32)
    x[0] = w[:, 0]  # every bit of output 0 matches: the largest count
    plain = mvau(noActivation=1)
    counts = []
    for sample in x:  # FINN's execution takes one vector at a time
        context = {"x": sample[None], "w": w, "y": np.zeros((1, mh), np.float32)}
        getCustomOp(plain.graph.node[0]).execute_node(context, plain.graph)
        counts.append(context["y"])
    acc = np.rint(np.concatenate(counts)).astype(np.int64)
    bits = 5  # an unsigned register of 0..31: counts above 31 wrap
    wrapped = acc % 2 ** bits
    assert np.any(wrapped != acc) and not np.all(wrapped != acc)
    result = simulate_model(mvau(), x, {"mvau": bits})
    assert not result.skipped and result.overflows["mvau"] == int(np.count_nonzero(wrapped != acc))
    np.testing.assert_array_equal(result.exact_outputs["y"], multithreshold(acc.astype(np.float32), thresholds))
    np.testing.assert_array_equal(result.outputs["y"], multithreshold(wrapped.astype(np.float32), thresholds))


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
def test_data_simulation_of_4_bit_activation_codes(domain):
    """Q/DQ with 4-bit activations (onnxruntime's QUInt4 QDQ, ONNX's or its own com.microsoft Q/DQ): onnxruntime's
    Python binding returns no 4-bit array, so `verify --data` stopped at the first QuantizeLinear; its 4-bit Q/DQ
    nodes now run in ONNX's reference implementation. The P-bit overflows are those of the codes ONNX's
    QuantizeLinear gives, multiplied by the int4 weight codes in int64."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(9)
    w = rng.integers(-8, 8, size=(12, 5)).astype(ml_dtypes.int4)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], domain=domain),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["xd"], domain=domain),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], domain=domain),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.array(3, ml_dtypes.uint4), "zp"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.05), "sw")]
    graph = helper.make_graph(nodes, "qdq4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = ModelWrapper(helper.make_model(graph, opset_imports=opsets))
    x = rng.uniform(-0.5, 1.5, size=(16, 12)).astype(np.float32)
    x[0] = 1.5  # every code at 15
    reference = ReferenceEvaluator(helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_empty_tensor_value_info("q")], inits[:2]), opset_imports=[helper.make_opsetid("", 21)]))
    codes = reference.run(None, {"x": x})[0].astype(np.int64)
    acc = codes @ w.astype(np.int64)  # fold: the raw codes, the zero point's share added after the sum
    bits = 9
    wrapped = (acc + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
    assert np.any(wrapped != acc) and not np.all(wrapped != acc)
    result = simulate_model(model, x, {"mm": bits})
    assert not result.skipped and result.accumulations["mm"] == acc.size
    assert result.overflows["mm"] == int(np.count_nonzero(wrapped != acc))
    exact = (codes - 3) @ w.astype(np.int64) * np.float32(0.1 * 0.05)
    np.testing.assert_allclose(result.exact_outputs["y"], exact, rtol=1e-5, atol=1e-6)
