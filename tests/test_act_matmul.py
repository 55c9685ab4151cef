"""Activation x activation MatMul (attention's Q.K^T and softmax(.).V): analyse, verify, project, certify.

Every range claimed here is checked against execution: the graph's own quantizers run in qonnx on
inputs that saturate them, and the MatMul node itself runs on the executed integer codes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes import bounds
from a2q_passes.bounds import IntRange
from a2q_passes.certificate import certify_layer
from a2q_passes.errors import A2QError, PreconditionError
from a2q_passes.finetune.selection import select_layers
from a2q_passes.layers import MacLayer
from a2q_passes.metadata import recorded_widths
from a2q_passes.transforms.lower import LowerToFINN

QONNX = "qonnx.custom_op.general"
M, K, N = 2, 5, 3
SATURATE = 1.0e4  # far beyond every quantizer's range below: the clamp yields the extreme codes


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("a, b", [((0, 3), (0, 3)), ((-4, 3), (0, 7)), ((-2, 1), (-8, 7)), ((2, 5), (-3, -1)),
                                  ((-1, 1), (-1, 1)), ((-5, -2), (-4, -3)), ((0, 0), (-3, 2))])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_bound_is_the_brute_force_range_of_every_input_pair(a: tuple[int, int], b: tuple[int, int], k: int) -> None:
    xs = range(a[0], a[1] + 1)
    ys = range(b[0], b[1] + 1)
    sums = [sum(x * y for x, y in zip(xv, yv)) for xv in itertools.product(xs, repeat=k)
            for yv in itertools.product(ys, repeat=k)]
    assert bounds.act_x_act_range(k, IntRange(*a), IntRange(*b)) == (min(sums), max(sums))


def test_bound_stays_exact_beyond_int64() -> None:
    big = IntRange(-(1 << 40), 1 << 40)
    lo, hi = bounds.act_x_act_range(1 << 20, big, big)
    assert (lo, hi) == (-(1 << 100), 1 << 100)


# --------------------------------------------------------------------------- graphs


def _operand(nodes: list, inits: dict, name: str, shape: tuple[int, ...], fmt: str, spec: dict) -> tuple[str, tuple]:
    """A float graph input ``name`` quantized per ``spec`` (QONNX Quant or QuantizeLinear -> DequantizeLinear)."""
    out = f"{name}_q"
    if fmt == "qonnx":
        for key in ("scale", "zero_point", "bits"):
            inits[f"{name}_{key}"] = np.float32(spec[key])
        nodes.append(helper.make_node("Quant", [name, f"{name}_scale", f"{name}_zero_point", f"{name}_bits"], [out],
                                      name=f"Quant_{name}", domain=QONNX, signed=int(spec["signed"]),
                                      narrow=int(spec.get("narrow", 0)), rounding_mode="ROUND"))
    else:
        inits[f"{name}_scale"] = np.float32(spec["scale"])
        inits[f"{name}_zero_point"] = np.array(spec["zero_point"], dtype=np.int8 if spec["signed"] else np.uint8)
        args = [f"{name}_scale", f"{name}_zero_point"]
        nodes.append(helper.make_node("QuantizeLinear", [name, *args], [f"{name}_codes"], name=f"QuantizeLinear_{name}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_codes", *args], [out], name=f"DequantizeLinear_{name}"))
    return out, shape


def attention_model(fmt: str, a: dict, b: dict, transpose_b: bool = True) -> ModelWrapper:
    """``Q @ K^T``-style graph: ``A (1, M, K)`` times ``B (1, K, N)``, B quantized as ``(1, N, K)`` and transposed."""
    nodes, inits = [], {}
    qa, _ = _operand(nodes, inits, "a", (1, M, K), fmt, a)
    b_shape = (1, N, K) if transpose_b else (1, K, N)
    qb, _ = _operand(nodes, inits, "b", b_shape, fmt, b)
    if transpose_b:
        nodes.append(helper.make_node("Transpose", [qb], ["b_t"], name="Transpose_b", perm=[0, 2, 1]))
        qb = "b_t"
    nodes.append(helper.make_node("MatMul", [qa, qb], ["y"], name="Attention"))
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, M, K]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, M, N])],
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(QONNX, 1)] if fmt == "qonnx" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return ModelWrapper(model)


def executed_range(model: ModelWrapper, a: dict, b: dict, zero_point: str) -> tuple[int, int]:
    """Smallest and largest accumulator over the four saturating input corners, by execution only.

    The codes the MatMul multiplies are the executed operands over their scale, plus the zero
    point under ``fold`` (the MAC sees raw codes); the MatMul node then runs alone on those codes.
    """
    model = model.transform(InferShapes())  # qonnx executes only shape-annotated graphs; the file keeps none
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    sums = []
    for sa, sb in itertools.product((-SATURATE, SATURATE), repeat=2):
        feed = {"a": np.full(model.get_tensor_shape("a"), sa, np.float32),
                "b": np.full(model.get_tensor_shape("b"), sb, np.float32)}
        context = execute_onnx(model, feed, return_full_exec_context=True)
        codes = []
        for tensor, spec in ((matmul.input[0], a), (matmul.input[1], b)):
            t = context[tensor].astype(np.float64) / np.float32(spec["scale"])
            assert np.allclose(t, np.round(t), rtol=0, atol=1e-3)  # float32 (code - z) * s / s: a few ulps off
            t = np.round(t)
            codes.append((t + (spec["zero_point"] if zero_point == "fold" else 0)).astype(np.float32))
        single = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["acc"])], "mm",
                                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(codes[0].shape)),
                                    helper.make_tensor_value_info("w", TensorProto.FLOAT, list(codes[1].shape))],
                                   [helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)])
        mm = ModelWrapper(helper.make_model(single, opset_imports=[helper.make_opsetid("", 13)])).transform(InferShapes())
        sums.append(execute_onnx(mm, {"x": codes[0], "w": codes[1]})["acc"])
    every = np.concatenate([s.reshape(-1) for s in sums])
    return int(every.min()), int(every.max())


CASES = {
    # signed x signed, with zero points: fold sees raw codes, subtract centred codes
    "qonnx-signed-zp": ("qonnx", dict(scale=0.5, zero_point=2, bits=4, signed=True),
                        dict(scale=0.25, zero_point=-3, bits=3, signed=True, narrow=True)),
    # softmax(.) . V: unsigned probabilities times signed values
    "qonnx-unsigned-signed": ("qonnx", dict(scale=1 / 255, zero_point=0, bits=8, signed=False),
                              dict(scale=0.125, zero_point=0, bits=4, signed=True)),
    "qdq-uint8-int8": ("qdq", dict(scale=0.02, zero_point=128, signed=False), dict(scale=0.05, zero_point=-5, signed=True)),
    "qdq-int8-int8": ("qdq", dict(scale=0.1, zero_point=0, signed=True), dict(scale=0.1, zero_point=3, signed=True)),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path: Path) -> tuple[Path, ModelWrapper, dict, dict]:
    fmt, a, b = CASES[request.param]
    model = attention_model(fmt, a, b, transpose_b=request.param != "qdq-int8-int8")
    path = tmp_path / "attention.onnx"
    model.save(str(path))
    return path, model, a, b


@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_analyze_reports_the_executed_range_at_both_ends(a2q, case, zero_point: str) -> None:
    path, model, a, b = case
    result = a2q("analyze", path, "--json", "--per-channel", "--zero-point", zero_point)
    assert result.returncode == 0, result.stderr
    (layer,) = json.loads(result.stdout)["layers"]
    assert (layer["node"], layer["kind"], layer["status"], layer["K"]) == ("Attention", "act x act", "ok", K)
    assert (layer["acc_min"], layer["acc_max"]) == executed_range(model, a, b, zero_point)
    assert layer["bounds"]["l1"] == layer["bounds"]["exact"] <= layer["bounds"]["datatype"]
    assert layer["per_channel"]["acc_min"] == [layer["acc_min"]]
    # the independent certificate derives the same range from the graph's own quantizers
    cert = certify_layer(model, "Attention", zero_point=zero_point)
    assert (cert.acc_min, cert.acc_max) == (layer["acc_min"], layer["acc_max"])


def test_table_names_the_kind(a2q, case) -> None:
    result = a2q("analyze", case[0])
    assert result.returncode == 0, result.stderr
    assert "act x act" in result.stdout and "per output" in result.stdout


def _exact_width(model: ModelWrapper, a: dict, b: dict) -> int:
    return int(bounds.accumulator_width(*executed_range(model, a, b, "fold")))


def test_project_refuses_a_target_below_the_range_and_writes_nothing(a2q, case, tmp_path: Path) -> None:
    path, model, a, b = case
    width = _exact_width(model, a, b)
    out = tmp_path / "out.onnx"
    result = a2q("project", path, out, "--acc-bits", width - 1)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "'Attention' needs at least" in message and f"{width} bits" in message
    assert "activation x activation" in message and "cannot be projected" in message and "--skip Attention" in message
    assert not out.exists()
    # skipped on purpose: nothing else to project, so nothing is promised for it
    skipped = a2q("project", path, out, "--acc-bits", width - 1, "--skip", "Attention")
    assert skipped.returncode == 1 and "nothing to project" in skipped.stderr


def test_project_at_the_exact_width_records_it_and_verify_proves_it(a2q, case, tmp_path: Path) -> None:
    path, model, a, b = case
    width = _exact_width(model, a, b)
    out = tmp_path / "out.onnx"
    result = a2q("project", path, out, "--acc-bits", width, "--json")
    assert result.returncode == 0, result.stderr
    assert recorded_widths(ModelWrapper(str(out))) == {"Attention": width}
    # the weights-free graph is untouched apart from the record
    assert ModelWrapper(str(out)).graph == model.graph
    verified = a2q("verify", out, "--json")
    assert verified.returncode == 0, verified.stderr
    (verdict,) = json.loads(verified.stdout)["layers"]
    assert (verdict["proof"], verdict["kind"], verdict["adversarial_register_overflows"]) == ("pass", "act x act", 0)


@pytest.mark.parametrize("mode", [["--mode", "wrap"], ["--mode", "saturate"], ["--tile", "2"]])
def test_verify_fails_one_bit_below_and_the_worst_case_overflows(a2q, case, mode: list[str]) -> None:
    path, model, a, b = case
    width = _exact_width(model, a, b)
    result = a2q("verify", path, "--acc-bits", width - 1, "--json", *mode)
    assert result.returncode == 3
    (verdict,) = json.loads(result.stdout)["layers"]
    assert verdict["proof"] == "fail" and verdict["adversarial_register_overflows"] > 0
    assert a2q("verify", path, "--acc-bits", width, *mode).returncode == 0


def test_annotate_records_the_exact_width(a2q, case, tmp_path: Path) -> None:
    path, model, a, b = case
    out = tmp_path / "annotated.onnx"
    assert a2q("annotate", path, out).returncode == 0
    assert recorded_widths(ModelWrapper(str(out))) == {"Attention": _exact_width(model, a, b)}


@pytest.mark.parametrize("mode,tile", [("wrap", None), ("saturate", None), ("saturate", 2)])
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_verify_data_simulates_the_product_as_sequential_accumulation(case, mode: str, tile: int | None,
                                                                      zero_point: str) -> None:
    """``verify --data``'s simulation against each output's products of the executed codes (qonnx), added one at a
    time in K order, two bits below the exact width: overflow counts and every simulated output."""
    from a2q_passes.data_simulation import simulate_model
    from a2q_passes.verification import verify_model
    from tests.test_simulate import sequential_accumulation

    _, model, a, b = case
    rng = np.random.default_rng(3)
    feeds = {}
    for name in ("a", "b"):  # mostly saturating values, so that sums reach their extremes
        shape = (6, *model.get_tensor_shape(name)[1:])
        feeds[name] = (rng.choice([-SATURATE, SATURATE], size=shape) * (rng.random(shape) < 0.7)
                       + rng.normal(size=shape)).astype(np.float32)
    bits = int(bounds.accumulator_width(*executed_range(model, a, b, zero_point))) - 2
    result = simulate_model(model, feeds, bits, mode, tile, zero_point=zero_point)
    signed = verify_model(model, bits, mode, tile, zero_point=zero_point).layers[0].signed
    shaped = model.transform(InferShapes())
    matmul = next(n for n in shaped.graph.node if n.op_type == "MatMul")
    overflows = 0
    for i in range(6):
        context = execute_onnx(shaped, {name: feeds[name][i:i + 1] for name in feeds}, return_full_exec_context=True)
        codes = [np.round(context[tensor].astype(np.float64) / np.float32(spec["scale"])).astype(np.int64)
                 + (spec["zero_point"] if zero_point == "fold" else 0)
                 for tensor, spec in ((matmul.input[0], a), (matmul.input[1], b))]
        for m, n in itertools.product(range(M), range(N)):
            terms = [int(codes[0][0, m, k]) * int(codes[1][0, k, n]) for k in range(K)]
            sim, _ = sequential_accumulation(terms, bits, signed, mode, tile)
            overflows += sim != sum(terms)
            expected = result.exact_outputs["y"][i, m, n] + (sim - sum(terms)) * np.float32(a["scale"]) * np.float32(b["scale"])
            assert result.outputs["y"][i, m, n] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert overflows > 0 and result.overflows == {"Attention": overflows}
    assert result.accumulations == {"Attention": 6 * M * N}


def test_a_float_second_operand_is_named_and_blocks_project(a2q, tmp_path: Path) -> None:
    model = attention_model("qonnx", CASES["qonnx-signed-zp"][1], CASES["qonnx-signed-zp"][2])
    quant_b = next(n for n in model.graph.node if n.name == "Quant_b")
    model.graph.node.remove(quant_b)
    model.graph.node[[n.name for n in model.graph.node].index("Transpose_b")].input[0] = "b"
    path = tmp_path / "float_b.onnx"
    model.save(str(path))
    result = a2q("analyze", path, "--json")
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["status"].startswith("input not quantized: second operand")
    refused = a2q("project", path, tmp_path / "out.onnx", "--acc-bits", 16)
    assert refused.returncode == 1 and "--skip Attention" in refused.stderr


# --------------------------------------------------------------------------- a file onnxruntime's quantizer writes


class _Calibration(CalibrationDataReader):
    """A few normal samples for ``q`` and ``k``."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.samples = iter([{"q": rng.normal(size=(1, M, K)).astype(np.float32),
                              "k": rng.normal(size=(1, N, K)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict | None:
        return next(self.samples, None)


def _float_scores(path: Path) -> None:
    """The float ``Q @ K^T`` of (1, M, K) and (1, N, K) inputs that onnxruntime's quantizer starts from."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="Scores")]
    graph = helper.make_graph(nodes, "scores", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, M, K]),
                                                helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, N, K])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, M, N])])
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    float_model.ir_version = 8
    ModelWrapper(float_model).save(str(path))


@pytest.mark.parametrize("activation_type", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_onnxruntime_quantized_attention_scores(a2q, tmp_path: Path, activation_type: str, zero_point: str) -> None:
    """``Q @ K^T`` quantized by onnxruntime (QDQ on both operands); executed extremes through its own nodes."""
    _float_scores(tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), _Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation_type))
    result = a2q("analyze", tmp_path / "q.onnx", "--json", "--zero-point", zero_point)
    assert result.returncode == 0, result.stderr
    (layer,) = json.loads(result.stdout)["layers"]
    assert (layer["kind"], layer["status"]) == ("act x act", "ok")

    model = ModelWrapper(str(tmp_path / "q.onnx")).transform(InferShapes())
    scores = next(n for n in model.graph.node if n.name == "Scores")
    sums = []
    for sq, sk in itertools.product((-SATURATE, SATURATE), repeat=2):
        context = execute_onnx(model, {"q": np.full((1, M, K), sq, np.float32), "k": np.full((1, N, K), sk, np.float32)},
                               return_full_exec_context=True)
        codes = []
        for tensor in scores.input:  # the executed QuantizeLinear codes each DequantizeLinear reads
            dq = model.find_producer(tensor)
            raw = context[dq.input[0]].astype(np.int64)
            codes.append(raw - (context[dq.input[2]].astype(np.int64) if zero_point == "subtract" else 0))
        sums.append(codes[0] @ codes[1])
    every = np.concatenate([s.reshape(-1) for s in sums])
    assert (layer["acc_min"], layer["acc_max"]) == (int(every.min()), int(every.max()))


@pytest.mark.parametrize("activation_type", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("zero_point", ["fold", "subtract"])
def test_onnxruntime_qoperator_attention_scores(a2q, tmp_path: Path, activation_type: str, zero_point: str) -> None:
    """``Q @ K^T`` in onnxruntime's QOperator format: a QLinearMatMul of two integer activations, each operand's
    codes its own type's, less its zero point under subtract. Executed extremes through onnxruntime; verify proves
    the exact width and fails one bit below; project cannot shrink it below."""
    import onnxruntime as ort

    _float_scores(tmp_path / "float.onnx")
    path = tmp_path / "q.onnx"
    quantize_static(str(tmp_path / "float.onnx"), str(path), _Calibration(), quant_format=QuantFormat.QOperator,
                    activation_type=getattr(QuantType, activation_type))
    result = a2q("analyze", path, "--json", "--zero-point", zero_point)
    assert result.returncode == 0, result.stderr
    (layer,) = json.loads(result.stdout)["layers"]
    assert (layer["op_type"], layer["kind"], layer["status"]) == ("QLinearMatMul", "act x act", "ok")

    model = ModelWrapper(str(path))
    mac = next(n for n in model.graph.node if n.op_type == "QLinearMatMul")
    probe = ModelWrapper(str(path))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in (mac.input[0], mac.input[3]))
    session = ort.InferenceSession(probe.model.SerializeToString(), providers=["CPUExecutionProvider"])
    zero = [int(model.get_initializer(mac.input[i])) if zero_point == "subtract" else 0 for i in (2, 5)]
    sums = []
    for sq, sk in itertools.product((-SATURATE, SATURATE), repeat=2):
        _, a, b = session.run(None, {"q": np.full((1, M, K), sq, np.float32), "k": np.full((1, N, K), sk, np.float32)})
        sums.append((a.astype(np.int64) - zero[0]) @ (b.astype(np.int64) - zero[1]))
    every = np.concatenate([s.reshape(-1) for s in sums])
    assert (layer["acc_min"], layer["acc_max"]) == (int(every.min()), int(every.max()))

    exact = layer["bounds"]["exact"]
    assert a2q("verify", path, "--acc-bits", exact, "--zero-point", zero_point).returncode == 0
    below = a2q("verify", path, "--acc-bits", exact - 1, "--zero-point", zero_point)
    assert below.returncode == 3 and mac.name in below.stderr
    refused = a2q("project", path, tmp_path / "out.onnx", "--acc-bits", exact - 1, "--zero-point", zero_point)
    assert refused.returncode == 1 and "activation x activation" in refused.stderr and not (tmp_path / "out.onnx").exists()


def test_certificate_catches_a_reader_that_under_reports(a2q, case, tmp_path: Path, monkeypatch) -> None:
    path = case[0]
    real = MacLayer.act_x_act_range
    monkeypatch.setattr(MacLayer, "act_x_act_range", lambda self: tuple(v // 2 for v in real(self)))
    result = a2q("annotate", path, tmp_path / "out.onnx")
    assert result.returncode == 4 and "under-reports" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def _attention_then_dense() -> ModelWrapper:
    """The signed attention graph followed by a dense layer with QONNX weights (something to fine-tune)."""
    model = attention_model(*CASES["qonnx-signed-zp"])
    graph = model.graph
    graph.output.pop()
    consts = {"d_scale": np.float32(0.5), "d_zero": np.float32(0), "d_bits": np.float32(4),
              "d_w": np.random.default_rng(0).normal(size=(N, 2)).astype(np.float32)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    quant = dict(domain=QONNX, signed=1, narrow=0, rounding_mode="ROUND")
    graph.node.extend([helper.make_node("Quant", ["y", "d_scale", "d_zero", "d_bits"], ["yq"], **quant),
                       helper.make_node("Quant", ["d_w", "d_scale", "d_zero", "d_bits"], ["wq"], **quant),
                       helper.make_node("MatMul", ["yq", "wq"], ["out"], name="Dense")])
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, M, 2]))
    return model


def test_finetune_checks_the_layer_and_refuses_a_target_below_it() -> None:
    model = _attention_then_dense()
    width = _exact_width(model, *CASES["qonnx-signed-zp"][1:])
    selection = select_layers(model, width, skip=frozenset())
    assert [layer.node for layer in selection.layers] == ["Dense"] and "Attention" in selection.skipped
    with pytest.raises(A2QError, match=rf"'Attention' \(activation x activation.*needs {width} bits.*--skip Attention"):
        select_layers(model, width - 1, skip=frozenset())
    assert [layer.node for layer in select_layers(model, width - 1, skip=frozenset({"Attention"})).layers] == ["Dense"]


def test_lower_refuses_by_name() -> None:
    # the pass's own check, before FINN's flow
    with pytest.raises(PreconditionError, match="Attention: activation x activation MatMul"):
        LowerToFINN(acc_bits=16).requires(_attention_then_dense())
