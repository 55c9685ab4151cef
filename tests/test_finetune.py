"""a2q finetune: every training step fits P, the output verifies, it beats plain projection, bad inputs, determinism.

The model is a tiny Brevitas CNN trained for a few seconds on scikit-learn's digits (QAT, 4-bit
weights and activations, 8-bit input), exported to QONNX. Accuracies are measured with qonnx's
own executor, fits with a brute-force per-term exact range, independently of the code under test.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from brevitas.export import export_qonnx
from brevitas.core.scaling import ScalingImplType
from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.change_batchsize import ChangeBatchSize
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model
from qonnx.util.cleanup import cleanup_model
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from a2q_passes import cli
from a2q_passes.analysis import analyze_model
from a2q_passes.finetune.data import Dataset
from a2q_passes.finetune.selection import select_layers
from a2q_passes.finetune.train import FinetuneConfig, finetune
from a2q_passes.model_io import load_model
from a2q_passes.transforms.finetune import FinetuneAccumulators
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.verification import verify_model
from models.data import load_digits_split
from tests.brevitas_nets import build_net
from tests.cli_helpers import digest

torch.set_num_threads(1)
QUIET = dict(progress=False, log=lambda line: None)


# ---------------------------------------------------------------- a tiny trained digits model


class UnitInterval(Uint8ActPerTensorFloat):
    """8-bit unsigned input with the fixed scale 1/255 (images in [0, 1])."""

    scaling_impl_type = ScalingImplType.CONST
    scaling_init = 1.0


class FastStatsAct(Uint8ActPerTensorFloat):
    collect_stats_steps = 30  # Brevitas' default of 300 steps is longer than this whole training


class TinyDigitsNet(nn.Module):
    """8x8 -> conv 3x3 (K=9, 8-bit input) -> pool -> conv 3x3 (K=144) -> pool -> linear (K=32)."""

    def __init__(self) -> None:
        super().__init__()
        weights = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4)
        self.inp = qnn.QuantIdentity(act_quant=UnitInterval, bit_width=8, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(1, 16, 3, padding=1, **weights)
        self.act1 = qnn.QuantReLU(act_quant=FastStatsAct, bit_width=4, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(16, 32, 3, **weights)
        self.act2 = qnn.QuantReLU(act_quant=FastStatsAct, bit_width=4, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(32, 10, bias=True, **weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act1(self.conv1(self.inp(x))), 2)
        x = F.max_pool2d(self.act2(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


@functools.lru_cache(maxsize=1)
def _digits_model_bytes() -> bytes:
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in load_digits_split("train"))
    net = TinyDigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            idx = order[start:start + 32]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_qonnx(net, args=torch.zeros(1, 1, 8, 8), dynamo=False, opset_version=13)
    model = cleanup_model(ModelWrapper(proto))
    model.model.ir_version = min(model.model.ir_version, 10)  # what onnxruntime 1.32 accepts
    return model.model.SerializeToString()


def digits_model() -> ModelWrapper:
    """A fresh copy of the trained tiny digits model (about 95 % top-1)."""
    return ModelWrapper(onnx.load_from_string(_digits_model_bytes()))


def digits_data(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_split(split)
    return x[:limit], y[:limit]


def qonnx_outputs(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    """Outputs from qonnx's own executor (independent of the torch bridge)."""
    batched = model.transform(ChangeBatchSize(len(x))).transform(InferShapes())
    return execute_onnx(batched, {model.graph.input[0].name: x.astype(np.float32)})[model.graph.output[0].name]


def accuracy(model: ModelWrapper, split: str = "test") -> float:
    x, y = digits_data(split)
    return float(np.mean(qonnx_outputs(model, x).argmax(axis=1) == y) * 100.0)


def fits_brute_force(q: np.ndarray, lo: int, hi: int, bits: int) -> bool:
    """Per-term extremes summed (each term of a box input is independent), then the P-bit range check."""
    terms = np.stack([q * lo, q * hi])
    acc_min, acc_max = terms.min(axis=0).sum(axis=1), terms.max(axis=0).sum(axis=1)
    if acc_min.min() >= 0:
        return int(acc_max.max()) <= (1 << bits) - 1
    return int(acc_min.min()) >= -(1 << (bits - 1)) and int(acc_max.max()) <= (1 << (bits - 1)) - 1


# ---------------------------------------------------------------- the constraint holds at every step

NARROW = 12  # the trained model needs 14-15 bits in its conv layers


@pytest.mark.parametrize("method", ["qat", "a2q"])
def test_every_training_step_fits(method):
    model = digits_model()
    selection = select_layers(model, NARROW)
    layers = selection.by_node()
    original = {n: layers[n].mac.integer_rows(model) for n in layers}
    assert not all(fits_brute_force(q, layers[n].x.lo, layers[n].x.hi, NARROW) for n, q in original.items())
    seen_steps, snapshots = [], []

    def check(step, constraint):
        rows = constraint.integer_rows()
        assert rows.keys() == layers.keys()
        for node, q in rows.items():
            assert fits_brute_force(q, layers[node].x.lo, layers[node].x.hi, NARROW), f"step {step}, {node}"
        seen_steps.append(step)
        snapshots.append(np.concatenate([q.ravel() for q in rows.values()]))

    x, y = digits_data("train", 192)
    result = finetune(model, selection, Dataset(x, y, "train"), None,
                      FinetuneConfig(method=method, epochs=1, batch_size=32, lr=3e-3, **QUIET), check)
    assert seen_steps == list(range(1, 7))
    assert any(not np.array_equal(snapshots[0], s) for s in snapshots[1:])  # training did change the integers
    assert verify_model(result.model, NARROW).overflow_impossible


def test_trained_scales_keep_their_sign_and_a_floor_of_their_size():
    """With trained activation and weight scales and a learning rate far too large, no Quant scale crosses 0 (a
    ReLU quantizer whose scale turns negative outputs only zeros and never recovers: digits_cnn at P=10 collapsed to
    chance so) or shrinks below 2^-10 of where it started, at any step or in the written model."""
    model = digits_model()
    selection = select_layers(model, NARROW)
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    start = {n.input[1]: model.get_initializer(n.input[1]).astype(np.float64) for n in quants}
    assert all(np.all(s > 0) for s in start.values())
    seen = {name: [] for name in start}

    def record(step, constraint):
        for name in start:
            seen[name].append(constraint.module.tensor(name).detach().numpy().astype(np.float64).copy())

    x, y = digits_data("train", 192)
    result = finetune(model, selection, Dataset(x, y, "train"), None,
                      FinetuneConfig(epochs=1, batch_size=32, lr=1.0, train_act_scales=True, **QUIET), record)
    assert any(not np.allclose(seen[name][-1], start[name]) for name in start)  # the scales did train
    for name, values in seen.items():
        for step, value in enumerate(values, 1):
            assert np.all(value >= start[name] * 2.0 ** -10), (name, step, value.min())
    for name in start:
        assert np.all(result.model.get_initializer(name) >= start[name] * 2.0 ** -10), name


def transposed_matmul_model(seed: int = 0) -> ModelWrapper:
    """x (1, 12) -> signed 4-bit Quant -> MatMul whose (12, 6) weight is a Transpose of a per-row-scaled Quant."""
    rng = np.random.default_rng(seed)
    quant = "qonnx.custom_op.general"
    nodes = [
        helper.make_node("Quant", ["x", "s_x", "zero", "bits"], ["xq"], domain=quant, signed=1, narrow=0,
                         rounding_mode="ROUND"),
        helper.make_node("Quant", ["w_t", "s_w", "zero", "bits"], ["wq_t"], domain=quant, signed=1, narrow=0,
                         rounding_mode="ROUND"),
        helper.make_node("Transpose", ["wq_t"], ["wq"], perm=[1, 0]),
        helper.make_node("MatMul", ["xq", "wq"], ["y"], name="matmul"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("s_x", np.array(0.25, np.float32)), ("zero", np.array(0.0, np.float32)), ("bits", np.array(4.0, np.float32)),
        ("w_t", rng.normal(0, 0.4, (6, 12)).astype(np.float32)),
        ("s_w", rng.uniform(0.05, 0.1, (6, 1)).astype(np.float32)))]
    graph = helper.make_graph(nodes, "transposed_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    return model.transform(InferShapes())


@pytest.mark.parametrize("kind", ["grouped conv", "transposed matmul"])
def test_signed_inputs_and_other_layouts_fit_every_step(tmp_path, kind):
    """Signed inputs (the general latent projection), groups=3 convs, and weights behind a Transpose."""
    if kind == "grouped conv":
        model = build_net(tmp_path, "conv", signed_act=True, per_channel=True).model
    else:
        model = transposed_matmul_model()
    widest = max(r.bounds["exact"] for r in analyze_model(model).layers)
    bits = widest - 3
    selection = select_layers(model, bits)
    assert all(layer.x.lo < 0 for layer in selection.layers)
    layers = selection.by_node()
    steps = []

    def check(step, constraint):
        for node, q in constraint.integer_rows().items():
            assert fits_brute_force(q, layers[node].x.lo, layers[node].x.hi, bits), f"step {step}, {node}"
        steps.append(step)

    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    x = np.random.default_rng(1).normal(0, 1.5, (48, *shape)).astype(np.float32)
    result = finetune(model, selection, Dataset(x, None, "random"), None,
                      FinetuneConfig(loss="mse", distill=True, epochs=1, batch_size=16, lr=3e-3, **QUIET), check)
    assert steps == [1, 2, 3]
    assert verify_model(result.model, bits).overflow_impossible


def test_finetune_beats_projection_and_verifies():
    model = digits_model()
    projected = model.transform(ProjectToAccumulator(NARROW, method="exact"))
    x_train, y_train = digits_data("train")
    x_val, y_val = digits_data("test")
    step = FinetuneAccumulators(NARROW, (x_train, y_train), (x_val, y_val),
                                FinetuneConfig(epochs=3, lr=2e-3, **QUIET))
    result = step(model)
    tuned = result.model
    report = verify_model(tuned, NARROW)
    assert report.overflow_impossible
    for layer in analyze_model(tuned).layers:
        assert layer.bounds["exact"] <= NARROW
    before, plain, after = accuracy(model), accuracy(projected), accuracy(tuned)
    assert before > 85.0
    assert after >= plain + 10.0, (before, plain, after)
    # the reported metric of the chosen epoch is what the written graph scores (val = the test split here)
    details = result.details
    assert details["history"][details["best_epoch"]].val_metric == pytest.approx(after, abs=1e-6)
    assert details["original_metric"] == pytest.approx(before, abs=1e-6)
    # same graph, only initializers changed; the targets are recorded for `a2q verify` without widths
    assert [n.SerializeToString() for n in tuned.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert verify_model(tuned, None).overflow_impossible


def test_validation_ties_go_to_the_lower_validation_loss():
    # four validation images: top-1 can only be 0/25/50/75/100 %, so epochs tie and the loss must decide
    model = digits_model()
    x_train, y_train = digits_data("train", 256)
    x_val, y_val = digits_data("test", 4)
    result = FinetuneAccumulators(NARROW, (x_train, y_train), (x_val, y_val),
                                  FinetuneConfig(epochs=4, lr=2e-3, batch_size=32, **QUIET))(model)
    history, best = result.details["history"], result.details["best_epoch"]
    top = max(r.val_metric for r in history)
    tied = [r for r in history if r.val_metric == top]
    assert len(tied) > 1, [(r.val_metric, r.val_loss) for r in history]  # else this test checks nothing
    assert best == min(tied, key=lambda r: (r.val_loss, r.epoch)).epoch
    # the recorded loss is the written graph's cross-entropy, executed by qonnx
    logits = qonnx_outputs(result.model, x_val).astype(np.float64)
    log_softmax = logits - logits.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    assert history[best].val_loss == pytest.approx(-log_softmax[np.arange(len(y_val)), y_val].mean(), rel=1e-3)


def test_regression_loss_reports_psnr_of_the_written_model():
    model = digits_model()
    x, _ = digits_data("train", 128)
    targets = 1.0 / (1.0 + np.exp(-qonnx_outputs(model, x) / 4.0))  # regression targets in [0, 1]
    step = FinetuneAccumulators(NARROW, (x, targets), (x[:64], targets[:64]),
                                FinetuneConfig(loss="l1", epochs=2, **QUIET))
    tuned = step(model).model
    details = step.result.details
    assert details["metric"] == "PSNR dB"
    mse = np.mean((qonnx_outputs(tuned, x[:64]).astype(np.float64) - targets[:64]) ** 2)
    assert details["history"][details["best_epoch"]].val_metric == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_distillation_without_labels_and_regression_losses():
    model = digits_model()
    x, _ = digits_data("train", 128)
    for loss in ("ce", "mse"):
        batches = (torch.from_numpy(x[i:i + 32]) for i in range(0, len(x), 32))  # a Python iterable of batches
        step = FinetuneAccumulators(NARROW, batches, None, FinetuneConfig(loss=loss, distill=True, epochs=1, **QUIET))
        tuned = step(model).model
        assert verify_model(tuned, NARROW).overflow_impossible
        history = step.result.details["history"]
        assert [h.epoch for h in history] == [0, 1] and history[1].train_loss > 0
        assert len(step.train) == len(x)


# ---------------------------------------------------------------- command line


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``a2q`` in-process (same code path as the console script); returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["a2q", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture()
def files(tmp_path):
    model_path = tmp_path / "in.onnx"
    digits_model().save(str(model_path))
    x, y = digits_data("train", 64)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    return tmp_path, model_path


BAD_DATA = {
    "wrong shape": (dict(x=np.zeros((4, 1, 7, 7), np.float32), y=np.zeros(4, np.int64)),
                    "expects samples of shape (1, 8, 8)"),
    "labels out of range": (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 10, 2])),
                            "outside [0, 9]"),
    "empty": (dict(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), "no samples"),
    "nan": (dict(x=np.full((4, 1, 8, 8), np.nan, np.float32), y=np.zeros(4, np.int64)), "NaN"),
    "missing x": (dict(inputs=np.zeros((4, 1, 8, 8), np.float32)), "no array named 'x'"),
    "no labels": (dict(x=np.zeros((4, 1, 8, 8), np.float32)), "--distill"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_cli_bad_data_fails_before_training(files, monkeypatch, capsys, case):
    tmp_path, model_path = files
    arrays, message = BAD_DATA[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out.onnx"
    code, err = run_cli(monkeypatch, capsys, "finetune", model_path, out, "--acc-bits", NARROW,
                        "--data", tmp_path / "bad.npz", "--no-progress")
    assert code == 1 and message in err and "bad.npz" in err
    assert not out.exists()


def test_cli_other_bad_inputs(files, monkeypatch, capsys):
    tmp_path, model_path = files
    train = tmp_path / "train.npz"
    cases = [
        (["finetune", model_path, model_path, "--acc-bits", NARROW, "--data", train], "equals the input path"),
        (["finetune", model_path, tmp_path / "o.onnx", "--acc-bits", NARROW, "--data", tmp_path / "none.npz"],
         "no such data file"),
        (["finetune", model_path, tmp_path / "o.onnx", "--acc-bits", 3, "--data", train], "infeasible"),
        (["finetune", model_path, tmp_path / "o.onnx", "--acc-bits", NARROW, "--data", train, "--layer", "nope=9"],
         "not a constrainable MAC layer"),
        (["finetune", model_path, tmp_path / "o.onnx", "--acc-bits", NARROW, "--data", train, "--tile", 4],
         "--method axe only"),
    ]
    before = digest(model_path)
    for args, message in cases:
        code, err = run_cli(monkeypatch, capsys, *args, "--no-progress")
        assert code == 1 and message in err, (args, err)
    assert not (tmp_path / "o.onnx").exists() and digest(model_path) == before


def test_cli_is_deterministic_and_verifies(files):
    """Two processes with the same seed write byte-identical models that `a2q verify` accepts."""
    tmp_path, model_path = files
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        done = subprocess.run([sys.executable, "-m", "a2q_passes", "finetune", str(model_path), str(out),
                               "--acc-bits", str(NARROW), "--data", str(tmp_path / "train.npz"), "--epochs", "1",
                               "--batch-size", "16", "--seed", "3", "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "epoch 1/1" in done.stdout and f"wrote {out}" in done.stdout
        outputs.append(out)
    assert digest(outputs[0]) == digest(outputs[1])
    assert digest(outputs[0]) != digest(model_path)
    check = subprocess.run([sys.executable, "-m", "a2q_passes", "verify", str(outputs[0]), "--acc-bits", str(NARROW)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    load_model(outputs[0])  # a valid ONNX model


def test_cli_layer_targets_never_widen_untargeted_layers(tmp_path):
    """Issue 11: `finetune --layer` trains every layer; one without a target may not come out needing a wider accumulator."""
    from tests.cli_helpers import run_cli as a2q

    root = Path(__file__).resolve().parents[1]
    data, start, out = tmp_path / "t.npz", tmp_path / "start.onnx", tmp_path / "out.onnx"
    subprocess.run([sys.executable, str(root / "scripts" / "demo_data.py"), "npz", "digits", "200", str(data), "train"],
                   check=True, capture_output=True, timeout=120)
    # Conv_1 projected to 11 bits first: its zeroed weights regrow, so before the fix this run left it at INT13
    assert a2q("project", root / "models" / "digits_cnn_w4a4.onnx", start, "--layer", "Conv_1=11")[0] == 0
    code, stdout, stderr = a2q("finetune", start, out, "--layer", "Gemm_0=9", "--data", data, "--epochs", 1,
                               "--lr", 0.01, "--seed", 0, "--device", "cpu", "--no-progress")
    assert code == 0, stderr
    before, after = analyze_model(load_model(start)).by_node(), analyze_model(load_model(out)).by_node()
    assert after["Gemm_0"].bounds["exact"] <= 9
    for node in ("Conv_0", "Conv_1"):
        assert after[node].bounds["exact"] <= before[node].bounds["exact"], node
    assert "untargeted layer Conv_1: INT11 -> INT11 (training widened it: projected back" in stdout
    # the record holds Gemm_0 only: verify checks the untargeted layers at their own width and passes
    code, stdout, _ = a2q("verify", out)
    assert code == 0 and stdout.count("no target: own exact width") >= 2


def test_cli_refuses_a_graph_the_torch_bridge_cannot_run_before_training(files, monkeypatch, capsys):
    """An op the torch bridge lacks (here Erf after the logits) is refused up front, naming the node, with exit 1 and
    nothing written, for every method (AXE runs the graph in torch too); before, training died with a traceback."""
    tmp_path, _ = files
    model = digits_model()
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Erf", [logits], ["erf_out"], name="Erf_after_logits"))
    model.graph.output[0].name = "erf_out"
    path = tmp_path / "erf.onnx"
    model.save(str(path))
    before = digest(path)
    for method in ("norm", "axe"):
        code, err = run_cli(monkeypatch, capsys, "finetune", path, tmp_path / "o.onnx", "--acc-bits", NARROW,
                            "--data", tmp_path / "train.npz", "--method", method, "--no-progress")
        assert code == 1 and "torch bridge" in err and "Erf_after_logits" in err and "a2q project" in err, err
    assert not (tmp_path / "o.onnx").exists() and digest(path) == before


def test_weights_finetune_cannot_train_are_named_with_what_they_are(tmp_path, monkeypatch, capsys):
    """A FINN-style layer (weights: a constant annotated INT4) cannot be trained: the refusal names the layer, says what
    its weights are in words (it said "weights come from a initializer source") and how to go on (--skip)."""
    from tests.test_lower_inputs import tiny_model

    path = tiny_model(tmp_path / "finn_style.onnx", input_scale=0.5)
    model = ModelWrapper(str(path))
    model.graph.node.remove(next(n for n in model.graph.node if n.output[0] == "Wq"))
    next(n for n in model.graph.node if n.op_type == "MatMul").input[1] = "W"
    model.set_initializer("W", np.round(model.get_initializer("W") * 4).clip(-8, 7).astype(np.float32))
    model.set_tensor_datatype("W", DataType["INT4"])
    model.save(str(path))
    np.savez(tmp_path / "train.npz", x=np.random.default_rng(0).uniform(0, 100, size=(16, 8)).astype(np.float32))
    code, err = run_cli(monkeypatch, capsys, "finetune", path, tmp_path / "out.onnx", "--acc-bits", 12,
                        "--data", tmp_path / "train.npz", "--distill", "--no-progress")
    message = " ".join(err.split())
    assert code == 1 and "MatMul_0" in message, err
    assert "its weights are a constant (integers annotated with a FINN DataType), not a trainable QONNX Quant" in message
    assert not (tmp_path / "out.onnx").exists()
