"""``a2q allocate``: exact knapsack, cost models, and the allocation flow on the committed digits CNN."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes.allocation import (
    Choice, FunctionCost, LayerShape, get_cost_model, layer_cost, pareto_front, register_cost_model, solve_max_score,
    solve_min_cost,
)
from a2q_passes.allocation_layers import LayerCandidates
from a2q_passes.cli import main
from a2q_passes.errors import A2QError
from a2q_passes.finn_steps import step_a2q_allocate
from a2q_passes.metadata import recorded_widths
from a2q_passes.finetune.train import FinetuneConfig
from a2q_passes.transforms.allocate import AllocateAccumulators
from models.data import load_dataset
from models.evaluate import accuracy, predict_onnx

MODEL = Path(__file__).resolve().parent.parent / "models" / "digits_cnn_w4a4.onnx"
# digits_cnn (models/README.md): conv 1->16 and conv 16->32 feed 4-bit activations, fc 32->10 gives logits
CHANNELS = {"Conv_0": 16, "Conv_1": 32, "Gemm_0": 10}
ACT_BITS = {"Conv_0": 4, "Conv_1": 4, "Gemm_0": None}


def _hand_cost(widths: dict[str, int]) -> int:
    """Accumulator + threshold bits written out from the issue: PE x P + MH x (2^B - 1) x (P + 1), PE = 1."""
    total = 0
    for name, p in widths.items():
        total += p
        if ACT_BITS[name] is not None:
            total += CHANNELS[name] * (2 ** ACT_BITS[name] - 1) * (p + 1)
    return total


def _shapes(model: ModelWrapper, widths: dict[str, list[int]]) -> dict[str, LayerShape]:
    """The digits CNN's cost facts by hand, in place of the (slow) FINN lowering."""
    return {name: LayerShape(name, CHANNELS[name], 1, ACT_BITS[name]) for name in widths}



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("allocate_data")
    x, y = load_dataset("digits", "train")
    x_val, y_val = load_dataset("digits", "test")
    np.savez(folder / "calib.npz", x=x[:300], y=y[:300])
    np.savez(folder / "val.npz", x=x_val, y=y_val)
    return SimpleNamespace(calib=folder / "calib.npz", val=folder / "val.npz", x_val=x_val, y_val=y_val,
                           calib_xy=(x[:300], y[:300]), val_xy=(x_val, y_val))


# --------------------------------------------------------------------------- pure core


def _brute_force(groups):
    picks = list(itertools.product(*[range(len(g)) for g in groups]))
    return [(sum(g[j].cost for g, j in zip(groups, p)), sum(g[j].loss for g, j in zip(groups, p))) for p in picks]


def test_knapsack_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        groups = [[Choice(b, rng.randint(0, 40), round(rng.random() * 5, 3)) for b in range(rng.randint(1, 4))]
                  for _ in range(rng.randint(1, 4))]
        every = _brute_force(groups)
        max_loss = rng.random() * 8
        pick = solve_min_cost(groups, max_loss)
        feasible = [c for c, loss in every if loss <= max_loss + 1e-9]
        assert (pick is None) == (not feasible)
        if pick is not None:
            assert pick.cost == min(feasible) and pick.loss <= max_loss + 1e-9
            assert pick.cost == sum(g[j].cost for g, j in zip(groups, pick.picks))
        budget = rng.randint(0, 100)
        pick = solve_max_score(groups, budget)
        within = [loss for c, loss in every if c <= budget]
        assert (pick is None) == (not within)
        if pick is not None:
            assert pick.cost <= budget and pick.loss == pytest.approx(min(within), abs=1e-9)
        front = pareto_front(groups)
        assert [p.cost for p in front] == sorted(p.cost for p in front)
        for point in front:  # nothing dominates a front point, and the cheapest-best point is on it
            assert not any(c <= point.cost and loss < point.loss - 1e-9 for c, loss in every)
        assert front[0].cost == min(c for c, _ in every)
        assert front[-1].loss == pytest.approx(min(loss for _, loss in every), abs=1e-9)


def test_bits_cost_model_and_registry():
    bits = get_cost_model("bits")
    assert layer_cost(bits, LayerShape("a", channels=16, pe=2, output_bits=4), 10) == 2 * 10 + 16 * 15 * 11
    assert layer_cost(bits, LayerShape("b", channels=10, pe=1, output_bits=None), 12) == 12
    with pytest.raises(ValueError, match="no FINN LUT estimate at 9 bits"):
        layer_cost(get_cost_model("finn-lut"), LayerShape("c", 8, finn_lut={10: 300}), 9)
    with pytest.raises(ValueError, match="unknown cost model 'nope'; available: .*bits"):
        get_cost_model("nope")
    register_cost_model("test-half", FunctionCost("test-half", "half a bit", lambda layer, p: p / 2), replace=True)
    with pytest.raises(ValueError, match="non-negative integers"):
        layer_cost(get_cost_model("test-half"), LayerShape("d", 1), 5)


# --------------------------------------------------------------------------- flow through the CLI


def _input_range(model: ModelWrapper, tensor: str) -> tuple[int, int]:
    """Integer code range of a tensor, read from the Quant node above it (through MaxPool/Reshape/...)."""
    node = model.find_producer(tensor)
    while node.op_type != "Quant":
        node = model.find_producer(node.input[0])
    bits = int(model.get_initializer(node.input[3]))
    signed = next(a.i for a in node.attribute if a.name == "signed")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _worst_case_widths_by_execution(path: Path) -> dict[str, int]:
    """Each MAC layer's exact width from the integer weights qonnx's executor produces (Python ints)."""
    model = ModelWrapper(str(path))
    x = np.zeros([1, *model.get_tensor_shape(model.graph.input[0].name)[1:]], dtype=np.float32)
    context = execute_onnx(model, {model.graph.input[0].name: x}, return_full_exec_context=True)
    widths = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        quant = model.find_producer(node.input[1])
        scale = model.get_initializer(quant.input[1])
        codes = context[node.input[1]] / scale
        q = np.rint(codes).astype(np.int64)
        assert np.allclose(codes, q, atol=1e-3)
        rows = q.reshape(q.shape[0], -1)
        lo, hi = _input_range(model, node.input[0])
        acc_max = max(sum(max(int(w) * lo, int(w) * hi) for w in row) for row in rows)
        acc_min = min(sum(min(int(w) * lo, int(w) * hi) for w in row) for row in rows)
        p = 1
        if acc_min >= 0:
            while acc_max > (1 << p) - 1:
                p += 1
        else:
            while acc_max > (1 << (p - 1)) - 1 or acc_min < -(1 << (p - 1)):
                p += 1
        widths[node.name] = p
    return widths


@pytest.fixture(scope="module")
def allocated(data, tmp_path_factory) -> SimpleNamespace:
    """One real run of the CLI (FINN lowering included) at 99 % of the model's validation score."""
    import sys
    from unittest import mock

    folder = tmp_path_factory.mktemp("allocated")
    out = folder / "w.json"
    argv = ["a2q", "allocate", str(MODEL), "--data", str(data.calib), "--val", str(data.val),
            "--min-score-pct", "99", "-o", str(out), "--json", "--no-progress", "--plot", str(folder / "p.png")]
    with mock.patch.object(sys, "argv", argv), mock.patch("typer.echo") as echo:
        with pytest.raises(SystemExit) as stop:
            main()
    assert (stop.value.code or 0) == 0
    details = json.loads(echo.call_args_list[-1].args[0])
    return SimpleNamespace(folder=folder, widths_path=out, details=details)


def test_allocation_meets_the_target_and_is_verified(allocated, data, a2q, tmp_path):
    widths = json.loads(allocated.widths_path.read_text())
    details = allocated.details
    assert widths == details["widths"] and all(isinstance(v, int) for v in widths.values())
    for layer in details["layers"]:
        assert layer["min_feasible_bits"] <= widths[layer["node"]] <= layer["exact_bits"]
    assert details["cost"] == _hand_cost(widths) < _hand_cost({la["node"]: la["exact_bits"] for la in details["layers"]})
    assert (allocated.folder / "p.png").read_bytes()[:4] == b"\x89PNG"
    # the documented flow: project with the map, then score with qonnx's executor (not the torch bridge)
    projected = tmp_path / "projected.onnx"
    assert a2q("project", MODEL, projected, "--widths-json", allocated.widths_path).returncode == 0
    assert recorded_widths(ModelWrapper(str(projected))) == widths
    base = accuracy(predict_onnx(MODEL, data.x_val), data.y_val)
    score = accuracy(predict_onnx(projected, data.x_val), data.y_val)
    assert score >= 0.99 * base
    assert score == pytest.approx(details["val_score"])
    verified = a2q("verify", projected, "--widths-json", allocated.widths_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    executed = _worst_case_widths_by_execution(projected)
    assert all(executed[name] <= bits for name, bits in widths.items()), (executed, widths)
    # the original model does not fit: the allocation narrowed something
    assert any(_worst_case_widths_by_execution(MODEL)[name] > bits for name, bits in widths.items())


def test_budget_mode_respects_the_budget(data):
    model = ModelWrapper(str(MODEL))
    exact = {"Conv_0": 15, "Conv_1": 14, "Gemm_0": 11}  # `a2q analyze` of the committed model
    budget = int(0.9 * _hand_cost(exact))
    step = AllocateAccumulators(data.calib_xy, data.val_xy, budget=budget, shapes=_shapes, progress=False)
    result = step(model)
    assert _hand_cost(step.widths) <= budget and result.details["cost"] == _hand_cost(step.widths)
    assert recorded_widths(result.model) == step.widths
    # optimality of the pick: one more bit for a layer either breaks the budget or predicts no better score
    room = budget - _hand_cost(step.widths)
    scores = {layer["node"]: layer["scores"] for layer in result.details["layers"]}
    for name, bits in step.widths.items():
        if bits < exact[name] and _hand_cost({**step.widths, name: bits + 1}) - _hand_cost(step.widths) <= room:
            assert scores[name][str(bits + 1)] <= scores[name][str(bits)]
    with pytest.raises(A2QError, match="below the least cost any allocation reaches"):
        AllocateAccumulators(data.calib_xy, budget=100, shapes=_shapes, progress=False)(model)


def test_deterministic(data):
    runs = []
    for _ in range(2):
        step = AllocateAccumulators(data.calib_xy, data.val_xy, min_score_pct=98, shapes=_shapes, progress=False)
        runs.append((step(ModelWrapper(str(MODEL))).details, step.widths))
    assert runs[0] == runs[1]


def test_finn_step_projects_and_records(data, tmp_path, monkeypatch):
    monkeypatch.setattr("a2q_passes.transforms.allocate.finn_layer_shapes", lambda model, widths, part: _shapes(model, widths))
    cfg = SimpleNamespace(a2q_allocate_data=str(data.calib), a2q_allocate_val=str(data.val), a2q_min_score_pct=98,
                          output_dir=str(tmp_path))
    out = step_a2q_allocate(ModelWrapper(str(MODEL)), cfg)
    report = json.loads((tmp_path / "report" / "a2q_allocation.json").read_text())
    assert recorded_widths(out) == report["widths"] and report["meets_target"]
    with pytest.raises(A2QError, match="cfg.a2q_allocate_data"):
        step_a2q_allocate(ModelWrapper(str(MODEL)), SimpleNamespace())


# --------------------------------------------------------------------------- fine-tuning's search


def _stub_layers() -> list[LayerCandidates]:
    """Three layers whose projection sensitivities are pessimistic: alone, each loses 4 points per bit below exact."""
    layers = []
    for name, exact, smallest, channels in (("a", 14, 6, 16), ("b", 13, 5, 32), ("c", 12, 5, 64)):
        layer = LayerCandidates(name, exact, smallest, LayerShape(name, channels, 1, 4))
        layer.scores = {p: 90.0 - 4.0 * (exact - p) for p in range(exact, smallest - 1, -1)}
        layer.costs = {p: layer_cost(get_cost_model("bits"), layer.shape, p) for p in layer.scores}
        layers.append(layer)
    return layers


# what fine-tuning "really" keeps: each layer tolerates its own number of bits below exact at no loss
_TOLERANCE = {"a": 2, "b": 5, "c": 1}


def _stub_score(widths: dict[str, int]) -> float:
    exact = {"a": 14, "b": 13, "c": 12}
    return 90.0 - sum(3.0 * max(0, exact[n] - widths[n] - _TOLERANCE[n]) for n in widths)


@pytest.mark.parametrize("knapsack_widths", [{"a": 14, "b": 13, "c": 12}, {"a": 12, "b": 8, "c": 11}])
def test_finetune_refinement_starts_no_dearer_than_the_best_uniform_width(data, knapsack_widths):
    """With fine-tuning the search may beat the projection sensitivities: brute force over every allocation and P."""
    layers = _stub_layers()
    step = AllocateAccumulators(data.calib_xy, data.val_xy, min_score_pct=99, method="finetune", progress=False)
    step.cost_model = get_cost_model("bits")
    calls: list[dict[str, int]] = []

    def stub(model, widths):
        calls.append(dict(widths))
        return None, _stub_score(widths)

    step.end_to_end = stub
    target = 0.99 * 90.0
    widths, _, score, history = step._refine(None, layers, dict(knapsack_widths), 90.0, target)
    cost = sum(la.costs[widths[la.node]] for la in layers)
    assert score == _stub_score(widths) >= target
    every = [dict(zip("abc", w)) for w in itertools.product(*[sorted(la.scores) for la in layers])]
    meeting_uniform = [sum(la.costs[min(p, la.exact_bits)] for la in layers) for p in range(6, 15)
                       if _stub_score({la.node: min(p, la.exact_bits) for la in layers}) >= target]
    assert cost <= min(meeting_uniform)
    # here one bit less per layer at a time reaches the true optimum (the tolerances are independent)
    best = min(sum(la.costs[w[la.node]] for la in layers) for w in every if _stub_score(w) >= target)
    assert cost == best
    assert all(la.min_feasible_bits <= w[la.node] <= la.exact_bits for w in calls for la in layers)
    assert history[0].action == ("uniform" if knapsack_widths["b"] == 13 else "knapsack")


def test_finetune_allocation_fits_and_scores_by_execution(data, tmp_path):
    """A real fine-tuned allocation: every width proven by executing worst-case integer weights, score by qonnx."""
    config = FinetuneConfig(epochs=1, seed=0, progress=False, log=lambda line: None)
    step = AllocateAccumulators(data.calib_xy, data.val_xy, min_score_pct=97, method="finetune", shapes=_shapes,
                                finetune_config=config, train=tuple(a[:100] for a in data.calib_xy), refine=False,
                                progress=False)
    result = step(ModelWrapper(str(MODEL)))
    for layer in result.details["layers"]:  # fine-tuning keeps every feasible width as a candidate
        assert sorted(map(int, layer["scores"])) == list(range(layer["min_feasible_bits"], layer["exact_bits"] + 1))
    path = tmp_path / "allocated.onnx"
    result.model.save(str(path))
    executed = _worst_case_widths_by_execution(path)
    assert all(executed[name] <= bits for name, bits in step.widths.items()), (executed, step.widths)
    base = accuracy(predict_onnx(MODEL, data.x_val), data.y_val)
    assert accuracy(predict_onnx(path, data.x_val), data.y_val) >= 0.97 * base


@pytest.mark.parametrize("args, expect", [
    (["--min-score-pct", "99", "--train", "calib.npz"], "only used by --method finetune"),
    (["--min-score-pct", "99", "--budget-bits", "10"], "exactly one of"),
    ([], "exactly one of"),
    (["--budget-bits", "10", "--cost", "finn-lut"], "drop --cost"),
    (["--min-score-pct", "150"], "must be in (0, 100]"),
    (["--min-score-pct", "99", "--method", "magic"], "--method must be one of"),
])
def test_bad_options_are_clear_errors(args, expect, data, a2q, tmp_path):
    out = tmp_path / "w.json"
    result = a2q("allocate", MODEL, "--data", data.calib, "-o", out, "--no-progress", *args)
    assert result.returncode == 1 and expect in result.stderr.replace("\n", " ") and not out.exists()


def test_bad_data_is_a_clear_error(a2q, tmp_path):
    out = tmp_path / "w.json"
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 3), dtype=np.float32))
    result = a2q("allocate", MODEL, "--data", tmp_path / "bad.npz", "--min-score-pct", "99", "-o", out, "--no-progress")
    assert result.returncode == 1 and "bad.npz" in result.stderr and "shape" in result.stderr and not out.exists()
    result = a2q("allocate", MODEL, "--data", tmp_path / "missing.npz", "--min-score-pct", "99", "-o",
                 tmp_path / "no_dir" / "w.json")
    assert result.returncode == 1 and "no_dir" in result.stderr


def test_qdq_model_is_allocated_under_the_finn_cost_model(data, a2q, tmp_path):
    """The default cost model costs FINN's lowering: of this QDQ file (uint8 activations, the output's with a zero
    point, which FINN's conversion refuses and a2q lowers as thresholds with an output bias) every layer becomes an
    MVAU and is costed; the map covers the three layers, is met by ``project --widths-json`` and proven by
    ``verify``. Before, allocate refused the file with FINN's reason (the zero point)."""
    out, projected = tmp_path / "w.json", tmp_path / "projected.onnx"
    qdq = MODEL.with_name("digits_cnn_qdq.onnx")
    result = a2q("allocate", qdq, "--data", data.calib, "--min-score-pct", "99", "-o", out, "--no-progress")
    assert result.returncode == 0 and out.exists(), result.stderr
    widths = json.loads(out.read_text())
    assert set(widths) == {"/conv1/Conv", "/conv2/Conv", "/fc/Gemm"}, widths
    assert a2q("project", qdq, projected, "--widths-json", out).returncode == 0
    verified = a2q("verify", projected, "--widths-json", out)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_qdq_model_is_allocated_with_the_register_cost(data, a2q, tmp_path):
    """onnxruntime's QDQ file (DequantizeLinear weights, uint8 activations): ``--cost acc-bits`` needs no FINN. The
    map is met by ``project --widths-json``, proven by ``verify``, executed within its widths by the real-file oracle
    (qonnx's executor, not a2q's reader), and the projected file, run in onnxruntime, keeps the target; a budget in
    register bits is respected (the cost is P per layer, counted here from the map)."""
    from tests.fuzz.oracle import width
    from tests.fuzz.real_files import executed_range

    qdq = MODEL.with_name("digits_cnn_qdq.onnx")
    base = accuracy(predict_onnx(qdq, data.x_val), data.y_val)
    original = ModelWrapper(str(qdq))
    exact_bits = {name: width(ran.lo, ran.hi) for name in ("/conv1/Conv", "/conv2/Conv", "/fc/Gemm")
                  for ran in [executed_range(original, name)]}
    budget = sum(exact_bits.values()) - 6
    for objective in (["--min-score-pct", "99"], ["--budget-bits", str(budget)]):
        out, projected = tmp_path / "w.json", tmp_path / "projected.onnx"
        result = a2q("allocate", qdq, "--data", data.calib, "--val", data.val, *objective, "--cost", "acc-bits",
                     "-o", out, "--no-progress")
        assert result.returncode == 0, result.stderr
        widths = json.loads(out.read_text())
        assert set(widths) == set(exact_bits) and all(widths[n] <= exact_bits[n] for n in widths), widths
        assert a2q("project", qdq, projected, "--widths-json", out).returncode == 0
        verified = a2q("verify", projected, "--widths-json", out)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        model = ModelWrapper(str(projected))
        for name, bits in widths.items():
            ran = executed_range(model, name)
            assert width(ran.lo, ran.hi) <= bits, (name, ran.lo, ran.hi, bits)
        if objective[0] == "--min-score-pct":
            assert accuracy(predict_onnx(projected, data.x_val), data.y_val) >= 0.99 * base
        else:
            assert sum(widths.values()) <= budget


@pytest.mark.parametrize("net, weight, act", [("matmul_conv", "QInt8", "QUInt8"), ("conv_gemm_matmul", "QInt4", "QUInt4")])
def test_qdq_files_the_corpus_found_failing_are_allocated(net, weight, act, a2q, tmp_path):
    """Found by the corpus: onnxruntime's QDQ ``matmul_conv`` reshapes a Q/DQ output (no shape annotation) to a
    constant ``[1, 1, 4, 4]``, and the int4 files store initializers torch cannot convert; allocate stopped with an
    internal error on both. The batch-1 Reshape now runs on batches (its input's shape is inferred), an int4 graph
    is scored in onnxruntime; each map is met by project and executed within its widths by the oracle."""
    from tests.fuzz.oracle import width
    from tests.fuzz.real_files import executed_range
    from tests.ort_models import FLOAT_NETS, quantize

    opset = 21 if weight == "QInt4" else 13
    shape = FLOAT_NETS[net](tmp_path / "float.onnx", opset=opset)
    source = tmp_path / "qdq.onnx"
    quantize(tmp_path / "float.onnx", source, shape, "QDQ", weight, act)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, *shape[1:])).astype(np.float32))
    out, projected = tmp_path / "w.json", tmp_path / "projected.onnx"
    result = a2q("allocate", source, "--data", tmp_path / "calib.npz", "--min-score-pct", "95", "--cost", "acc-bits",
                 "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    widths = json.loads(out.read_text())
    assert widths and a2q("project", source, projected, "--widths-json", out).returncode == 0
    model = ModelWrapper(str(projected))
    for name, bits in widths.items():
        ran = executed_range(model, name)
        assert width(ran.lo, ran.hi) <= bits, (name, ran.lo, ran.hi, bits)


def test_a_batch_one_reshape_of_a_qdq_output_runs_on_a_batch_in_the_torch_bridge(tmp_path):
    """The bridge's batch-free copy infers the shape the Q/DQ chain leaves unannotated: on a batch of 4 the bridge
    gives what onnxruntime gives one sample at a time."""
    import onnxruntime as ort
    import torch

    from a2q_passes.torch_bridge import QonnxModule
    from tests.ort_models import matmul_conv, quantize

    shape = matmul_conv(tmp_path / "float.onnx", opset=13)
    quantize(tmp_path / "float.onnx", tmp_path / "qdq.onnx", shape, "QDQ", "QInt8", "QUInt8")
    x = np.random.default_rng(1).normal(size=(4, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        batched = QonnxModule(ModelWrapper(str(tmp_path / "qdq.onnx")), trainable_scales="none")(torch.from_numpy(x))
    session = ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"])
    one_by_one = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batched.numpy(), one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["QOperator", "dynamic"])
def test_onnxruntime_operator_files_are_allocated_scoring_in_onnxruntime(fmt, a2q, tmp_path):
    """QOperator (QLinearConv, QLinearMatMul) and dynamic (MatMulInteger/ConvInteger) files hold ops the torch bridge
    lacks: allocate scores them in onnxruntime (no y: agreement with the file's own outputs). The map is met by
    project, proven by verify and executed within its widths by the oracle; at 100 % of the file's own score the
    projected file, run in onnxruntime, still gives the file's own top-1 on every sample."""
    from tests.ort_models import conv_gemm_matmul, quantize

    shape = conv_gemm_matmul(tmp_path / "float.onnx")
    source = tmp_path / f"{fmt}.onnx"
    quantize(tmp_path / "float.onnx", source, shape, fmt, "QInt8")
    x = np.random.default_rng(0).normal(size=(64, *shape[1:])).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    projected = tmp_path / "projected.onnx"
    assert _allocated_and_proven(a2q, source, tmp_path / "calib.npz", "100", projected)
    import onnxruntime as ort

    def top1(path: Path) -> np.ndarray:  # one sample per run: the file fixes a batch of 1
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.array([session.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])

    assert (top1(projected) == top1(source)).all()


def test_a_graph_the_torch_bridge_cannot_run_is_refused_naming_the_node(data, a2q, tmp_path):
    """allocate scores every candidate in PyTorch, else in onnxruntime or qonnx's executor: an op none of them runs
    (here onnxruntime's contrib Rfft, which its CPU build lacks, after the logits) is refused by name before any
    work, each executor's reason given. Before, a traceback."""
    from onnx import helper

    model = ModelWrapper(str(MODEL))
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Rfft", [logits], ["erf_out"], name="Rfft_after_logits",
                                             domain="com.microsoft"))
    model.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.graph.output[0].name = "erf_out"
    path, out = tmp_path / "erf.onnx", tmp_path / "w.json"
    model.save(str(path))
    result = a2q("allocate", path, "--data", data.calib, "--min-score-pct", "99", "-o", out, "--no-progress")
    message = result.stderr.replace("\n", " ")
    assert result.returncode == 1 and not out.exists(), message
    assert "torch bridge" in message and "Rfft_after_logits" in message and "a2q project" in message
    assert "onnxruntime cannot run it" in message and "qonnx's executor cannot run it" in message


def test_a_layer_finn_leaves_unlowered_is_named():
    """The cost model needs FINN's MVAU/VVAU for each layer: a Conv FINN leaves as a float MatMul (its input scale
    is per channel, which streamlining cannot move behind it) is named as not lowered, not reported as an unknown
    MVAU name."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.util.basic import qonnx_make_model

    from a2q_passes.allocation_layers import finn_layer_shapes

    consts = {"s_in": np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(1, 4, 1, 1), "z": np.float32(0),
              "b": np.float32(4), "w": np.random.default_rng(0).normal(size=(3, 4, 3, 3)).astype(np.float32),
              "s_w": np.float32(0.1)}
    quant = dict(domain="qonnx.custom_op.general", signed=1, narrow=0, rounding_mode="ROUND")
    nodes = [helper.make_node("Quant", ["x", "s_in", "z", "b"], ["qx"], **quant),
             helper.make_node("Quant", ["w", "s_w", "z", "b"], ["qw"], **quant),
             helper.make_node("Conv", ["qx", "qw"], ["y"], name="conv", kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    with pytest.raises(A2QError, match="FINN did not lower layer.s. conv to an MVAU/VVAU"):
        finn_layer_shapes(ModelWrapper(qonnx_make_model(graph)), {"conv": [12]}, "xczu3eg-sbva484-1-e")


def test_a_conv_transpose_is_costed_as_the_mvau_finn_makes(tmp_path):
    """A ConvTranspose is lowered to pixel padding, a sliding window and an MVAU (it was named as not lowered):
    the cost model gets that MVAU's channels and a LUT estimate at each width."""
    import warnings

    from a2q_passes.allocation_layers import finn_layer_shapes
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec("convtranspose", 4, 4, per_channel=True), "qonnx")
        shapes = finn_layer_shapes(ModelWrapper(str(path)), {"ConvTranspose_0": [10, 16]}, "xczu3eg-sbva484-1-e")
    shape = shapes["ConvTranspose_0"]
    assert shape.channels == 4 and sorted(shape.finn_lut) == [10, 16] and min(shape.finn_lut.values()) > 0, shape


def test_an_activation_by_activation_matmul_is_named_before_lowering():
    """FINN makes such a MatMul an MVAU with streamed weights, which has no static cost: named, as `lower` does (it
    was FINN's node name, 'weights are not an initializer')."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.util.basic import qonnx_make_model

    from a2q_passes.allocation_layers import finn_layer_shapes

    consts = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in
              {"s": 0.1, "z": 0.0, "b": 4.0}.items()]
    graph = helper.make_graph(
        [helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain="qonnx.custom_op.general", signed=1,
                          narrow=0, rounding_mode="ROUND"),
         helper.make_node("Transpose", ["xq"], ["xt"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["xq", "xt"], ["y"], name="scores")],
        "attention_scores", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])], consts)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(A2QError, match="scores: activation x activation MatMul"):
        finn_layer_shapes(model, {}, "xczu3eg-sbva484-1-e")


@pytest.mark.parametrize("fpgapart", [None, "xczu3eg-sbva484-1-e"])
def test_a_finn_hw_graph_is_allocated_scoring_in_qonnx(a2q, tmp_path, fpgapart):
    """A graph of FINN's HW layers (here `a2q lower`'s output: MVAU, Thresholding) runs neither in the torch bridge
    nor in onnxruntime: allocate scores it with qonnx's executor (the corpus' 33 FINN HW files were refused). The map
    is met by project, proven by verify and executed within its widths by the oracle, and the projected graph keeps
    the target score when qonnx executes it. After FINN's specialisation (MVAU_hls, Thresholding_rtl, which execute
    only in cppsim/rtlsim: 18 corpus files were refused) each layer is scored as the HW layer it was specialised
    from."""
    from a2q_passes.scoring import Scorer, qonnx_outputs

    x, y = load_dataset("digits", "train")
    np.savez(tmp_path / "calib.npz", x=x[:60], y=y[:60])
    hw, projected = tmp_path / "hw.onnx", tmp_path / "projected.onnx"
    source = Path(__file__).resolve().parent.parent / "models" / "digits_mlp_w4a4.onnx"
    assert a2q("lower", source, hw, "--acc-bits", "20").returncode == 0
    if fpgapart:  # FINN's step_specialize_layers, as a FINN build runs it
        from a2q_passes.finn_runtime import ensure_finn_importable

        ensure_finn_importable()
        from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers

        ModelWrapper(str(hw)).transform(SpecializeLayers(fpgapart)).save(str(hw))
    scorer = Scorer(ModelWrapper(str(hw)), (x[:60], y[:60]), fallback=True)
    assert scorer.outputs is qonnx_outputs
    widths = _allocated_and_proven(a2q, hw, tmp_path / "calib.npz", "99", projected)
    macs = {node.name: node.op_type for node in ModelWrapper(str(hw)).graph.node if node.op_type.startswith("MVAU")}
    assert set(widths) == set(macs) and len(macs) == 3, (widths, macs)
    assert all(kind.endswith(("_hls", "_rtl")) if fpgapart else kind == "MVAU" for kind in macs.values()), macs
    assert scorer(ModelWrapper(str(projected))) >= 0.99 * scorer(ModelWrapper(str(hw)))


def _allocated_and_proven(a2q, source: Path, calib: Path, pct: str, projected: Path) -> dict[str, int]:
    """``allocate --cost acc-bits`` on ``source``; its map met by project (written to ``projected``), proven by verify
    and executed within its widths by the oracle. Returns the map."""
    from tests.fuzz.oracle import width
    from tests.fuzz.real_files import executed_range

    out = projected.with_name("widths.json")
    result = a2q("allocate", source, "--data", calib, "--min-score-pct", pct, "--cost", "acc-bits", "-o", out,
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    widths = json.loads(out.read_text())
    assert widths, result.stdout
    assert a2q("project", source, projected, "--widths-json", out).returncode == 0
    assert a2q("verify", projected, "--widths-json", out).returncode == 0
    model = ModelWrapper(str(projected))
    for name, bits in widths.items():
        ran = executed_range(model, name)
        assert width(ran.lo, ran.hi) <= bits, (name, ran.lo, ran.hi, bits)
    return widths


def test_a_layer_of_zero_weights_is_allocated_the_narrowest_width_project_takes(a2q, tmp_path):
    """A layer whose weights all quantize to 0 sums to [0, 0], 1 bit: allocate offered that width and then failed
    proving its own map ("accumulator width 1 is out of range; use an integer from 2 to 64 bits", an option the user
    never gave; found by the property fuzzer). Now its candidates start at 2 bits, which `project` meets."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.util.basic import qonnx_make_model

    qonnx = "qonnx.custom_op.general"
    consts = {"s": np.float32(0.5), "z": np.float32(0), "b": np.float32(4), "ws": np.float32(0.5),
              "w": np.full((4, 3), 0.1, np.float32)}  # 0.1 / 0.5 rounds to code 0
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain=qonnx, signed=0, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Quant", ["w", "ws", "z", "b"], ["wq"], domain=qonnx, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="ZeroLayer")]
    graph = helper.make_graph(nodes, "zeros", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    path, out, projected = tmp_path / "zeros.onnx", tmp_path / "w.json", tmp_path / "p.onnx"
    ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                        helper.make_opsetid(qonnx, 1)])).save(str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).uniform(0, 8, size=(16, 4)).astype(np.float32))
    result = a2q("allocate", path, "--data", tmp_path / "calib.npz", "--min-score-pct", "90", "--cost", "acc-bits",
                 "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {"ZeroLayer": 2}
    assert a2q("project", path, projected, "--widths-json", out).returncode == 0
