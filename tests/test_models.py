"""Model zoo: real-data loaders, committed QONNX / QDQ artefacts, metrics, training CLI, A2Q plumbing."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from brevitas.quant.scaled_int import Int8AccumulatorAwareWeightQuant
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from sklearn.datasets import load_digits

from a2q_passes.bounds import IntRange, exact_accumulator_range, fits
from models.data import (
    SR_TEST_IMAGES, SR_TRAIN_IMAGES, DatasetMissingError, _read_idx_gz, bicubic_upscale, downscale,
    load_dataset, load_fashion_mnist,
)
from models.evaluate import accuracy, evaluate_onnx, predict_onnx, psnr
from models.nets import MODELS, build_model, load_float_weights
from models.qdq import make_digits_cnn_qdq
from models.train import fit, main as train_main

torch.set_num_threads(1)

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
METRICS = json.loads((MODELS_DIR / "metrics.json").read_text())
QUANT_ONNX = sorted(p.name for p in MODELS_DIR.glob("*_w*a*.onnx"))
EXPECTED_QUANT_ONNX = [
    "digits_cnn_w4a4.onnx", "digits_mlp_w4a4.onnx", "digits_resdw_w4a4.onnx", "espcn_x2_w4a4.onnx",
    "fmnist_cnn_w4a4.onnx", "fmnist_cnn_w8a8.onnx", "fmnist_mlp_w4a4.onnx",
]
FMNIST_SUBSET = 1000


def _parse_variant(filename: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"(.+)_w(\d+)a(\d+)\.onnx", filename)
    assert match, filename
    return match[1], int(match[2]), int(match[3])


# ---------------------------------------------------------------- loaders

def test_fashion_mnist_is_the_full_real_dataset():
    x_train, y_train = load_dataset("fashion_mnist", "train")
    x_test, y_test = load_dataset("fashion_mnist", "test")
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # 8-bit source images: every value is k/255
    assert np.array_equal(np.round(x_test * 255) / 255, x_test.astype(np.float64).astype(np.float32))
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class
    assert np.array_equal(np.bincount(y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(y_test), np.full(10, 1000))
    # real images, not noise: mean intensity of Fashion-MNIST is about 0.286
    assert 0.27 < x_train.mean() < 0.30


def test_fashion_mnist_missing_package_names_the_apt_command(tmp_path):
    with pytest.raises(DatasetMissingError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "not-installed")


def test_idx_reader_against_handwritten_file(tmp_path):
    payload = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (0x00000803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in payload.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + payload.tobytes()))
    assert np.array_equal(_read_idx_gz(path), payload)
    path.write_bytes(gzip.compress(header + payload.tobytes()[:-1]))
    with pytest.raises(ValueError, match="payload"):
        _read_idx_gz(path)


def test_digits_split_is_a_fixed_partition_of_sklearn_digits():
    x_train, y_train = load_dataset("digits", "train")
    x_test, y_test = load_dataset("digits", "test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(y_train) == set(y_test) == set(range(10))
    # the two splits together are exactly sklearn's 1797 samples (as a multiset of image+label rows)
    digits = load_digits()
    rows = lambda x, y: sorted(map(tuple, np.column_stack([np.round(x.reshape(len(x), -1) * 16), y]).tolist()))
    assert rows(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])) == rows(
        digits.images / 16.0, digits.target)
    x_again, _ = load_dataset("digits", "test")
    assert np.array_equal(x_again, x_test)


def test_super_resolution_pairs():
    lr_train, hr_train = load_dataset("sr", "train")
    lr_test, hr_test = load_dataset("sr", "test")
    assert lr_train.shape[1:] == (1, 32, 32) and hr_train.shape[1:] == (1, 64, 64)
    assert len(lr_train) == len(hr_train) and len(lr_test) == len(hr_test) > 100
    for x in (lr_train, hr_train, lr_test, hr_test):
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert np.array_equal(np.round(x * 255) / 255, x.astype(np.float64).astype(np.float32))
    assert np.array_equal(downscale(hr_test), lr_test)
    assert not set(SR_TRAIN_IMAGES) & set(SR_TEST_IMAGES)
    # held-out tiles are not crops of the training images: no test tile occurs among the train crops
    train_keys = {t.tobytes() for t in hr_train}
    assert not any(t.tobytes() in train_keys for t in hr_test)
    # bicubic is a sane, imperfect baseline on natural images
    assert 20.0 < psnr(bicubic_upscale(lr_test), hr_test) < 35.0


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10", "train")


# ---------------------------------------------------------------- committed artefacts

def test_all_expected_artefacts_are_committed():
    assert QUANT_ONNX == EXPECTED_QUANT_ONNX
    for name in MODELS:
        assert (MODELS_DIR / "checkpoints" / f"{name}_float.pt").is_file()
    for path in [*(MODELS_DIR / f for f in QUANT_ONNX), MODELS_DIR / "digits_cnn_qdq.onnx"]:
        assert path.stat().st_size < 512 * 1024, path


@pytest.mark.parametrize("filename", EXPECTED_QUANT_ONNX)
def test_committed_qonnx_matches_its_brevitas_checkpoint(filename):
    """The ONNX file is valid, runs in qonnx, and computes what the Brevitas model computes."""
    name, weight_bits, act_bits = _parse_variant(filename)
    proto = onnx.load(str(MODELS_DIR / filename))
    onnx.checker.check_model(proto)
    quant_nodes = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert quant_nodes and all(n.domain.startswith("qonnx") for n in quant_nodes)
    model = ModelWrapper(proto)
    spec = MODELS[name]
    inputs, _ = load_dataset(spec.dataset, "test")
    sample = inputs[:1]
    onnx_out = execute_onnx(model, {model.graph.input[0].name: sample})[model.graph.output[0].name]

    brevitas_model = build_model(name, weight_bits, act_bits)
    brevitas_model.load_state_dict(torch.load(MODELS_DIR / "checkpoints" / f"{name}_w{weight_bits}a{act_bits}.pt"))
    with torch.no_grad():
        torch_out = brevitas_model.eval()(torch.from_numpy(sample)).numpy()
    assert onnx_out.shape == torch_out.shape
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)


@pytest.mark.parametrize("filename", [f for f in EXPECTED_QUANT_ONNX if not f.startswith("espcn")])
def test_committed_classifier_accuracy(filename):
    name, weight_bits, act_bits = _parse_variant(filename)
    dataset = MODELS[name].dataset
    recorded = METRICS[name][f"w{weight_bits}a{act_bits}"]["score_onnx"]
    if dataset == "digits":  # the whole test split: must reproduce the recorded number exactly
        assert evaluate_onnx(MODELS_DIR / filename, dataset) == pytest.approx(recorded, abs=1e-3)
        assert recorded > 90.0
    else:  # a 1000-image subset: within ~3 standard errors of the recorded full-test accuracy
        subset = evaluate_onnx(MODELS_DIR / filename, dataset, limit=FMNIST_SUBSET)
        assert subset > 80.0  # chance is 10 %
        assert abs(subset - recorded) < 3.0


def test_committed_espcn_psnr_matches_metrics():
    recorded = METRICS["espcn_x2"]["w4a4"]["score_onnx"]
    assert evaluate_onnx(MODELS_DIR / "espcn_x2_w4a4.onnx", "sr") == pytest.approx(recorded, abs=1e-3)
    assert recorded > 20.0


def test_espcn_graph_has_subpixel_output():
    ops = [n.op_type for n in onnx.load(str(MODELS_DIR / "espcn_x2_w4a4.onnx")).graph.node]
    assert "DepthToSpace" in ops
    assert ops[-3:] == ["DepthToSpace", "Relu", "Quant"]


def test_residual_add_inputs_share_one_quantizer():
    model = ModelWrapper(str(MODELS_DIR / "digits_resdw_w4a4.onnx"))
    (add,) = model.get_nodes_by_op_type("Add")
    producers = [model.find_producer(t) for t in add.input]
    assert [p.op_type for p in producers] == ["Quant", "Quant"]
    params = [[model.get_initializer(t) for t in p.input[1:]] for p in producers]
    for a, b in zip(*params):
        assert np.array_equal(a, b)
    (dw,) = [n for n in model.get_nodes_by_op_type("Conv") if onnx.helper.get_attribute_value(n.attribute[1]) == 16]
    assert model.get_initializer(model.find_producer(dw.input[1]).input[0]).shape == (16, 1, 3, 3)


def test_qdq_model_structure_and_accuracy(tmp_path):
    committed = MODELS_DIR / "digits_cnn_qdq.onnx"
    proto = onnx.load(str(committed))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 7
    assert {"Conv", "Gemm"} <= set(ops)
    init = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]]
    assert len(weight_dq) == 3
    assert all(init[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(init[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in act_q)
    recorded = METRICS["digits_cnn"]["qdq"]["score_onnx"]
    assert evaluate_onnx(committed, "digits") == pytest.approx(recorded, abs=1e-3)
    assert recorded > METRICS["digits_cnn"]["float"]["score"] - 2.0
    regenerated = make_digits_cnn_qdq(out_path=tmp_path / "qdq.onnx")
    assert [n.op_type for n in onnx.load(str(regenerated)).graph.node] == ops


def test_metrics_record_float_baselines_and_provenance():
    for name in MODELS:
        entry = METRICS[name]
        assert entry["float"]["seed"] == METRICS["_build"]["seed"]
        for variant in [k for k in entry if re.fullmatch(r"w\d+a\d+", k)]:
            # the committed ONNX scores what the Brevitas model scored in torch
            assert entry[variant]["score_onnx"] == pytest.approx(entry[variant]["score_torch"], abs=0.05)
    assert METRICS["espcn_x2"]["float"]["score"] > METRICS["espcn_x2"]["bicubic"]


# ---------------------------------------------------------------- code paths

def test_float_checkpoint_loads_into_accumulator_aware_model():
    """weight_quant + accumulator_bit_width reach every constrainable layer: A2Q's guarantee holds."""
    acc_bits, act_bits = 12, 4
    model = build_model("fmnist_cnn", 4, act_bits, weight_quant=Int8AccumulatorAwareWeightQuant,
                        accumulator_bit_width=acc_bits)
    load_float_weights(model, MODELS_DIR / "checkpoints" / "fmnist_cnn_float.pt")
    inputs, _ = load_dataset("fashion_mnist", "test")
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m, i[0])))
             for n, m in model.named_modules() if n in ("conv2", "conv3", "conv4", "fc")]
    model.train()
    model(torch.from_numpy(inputs[:64]))  # one step initialises the activation scales
    for hook in hooks:
        hook.remove()
    for name, (layer, quant_input) in seen.items():
        q = layer.quant_weight(quant_input=quant_input)
        int_weights = q.int().detach().numpy().reshape(q.value.shape[0], -1)
        x = IntRange(0, 2 ** int(quant_input.bit_width) - 1)
        assert int(quant_input.bit_width) == act_bits and not quant_input.signed
        assert fits(*exact_accumulator_range(int_weights, x), acc_bits).all(), name
    # the same float weights under the plain quantizer need wider accumulators (the bound bites)
    plain = load_float_weights(build_model("fmnist_cnn", 4, act_bits), MODELS_DIR / "checkpoints" / "fmnist_cnn_float.pt")
    plain.train()
    plain(torch.from_numpy(inputs[:64]))
    q = plain.conv4.quant_weight()
    wide = q.int().detach().numpy().reshape(64, -1)
    assert not fits(*exact_accumulator_range(wide, IntRange(0, 15)), acc_bits).all()


def test_load_float_weights_rejects_foreign_or_incomplete_checkpoints():
    with pytest.raises(ValueError, match="tensors the model lacks"):
        load_float_weights(build_model("fmnist_cnn", 4, 4), MODELS_DIR / "checkpoints" / "digits_mlp_float.pt")
    state = torch.load(MODELS_DIR / "checkpoints" / "fmnist_cnn_float.pt")
    del state["conv3.bias"]
    with pytest.raises(ValueError, match=r"lacks weights the model needs: \['conv3.bias'\]"):
        load_float_weights(build_model("fmnist_cnn", 4, 4), state)


def test_training_is_deterministic_per_seed():
    x, y = load_dataset("digits", "train")

    def train(seed):
        torch.manual_seed(seed)
        model = build_model("digits_mlp", 4, 4)
        fit(model, "digits", x[:256], y[:256], epochs=1, batch_size=32, lr=1e-3, seed=seed, desc="t")
        return model.state_dict()

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_cli_end_to_end(tmp_path):
    train_main(["digits_mlp", "--epochs", "3", "--qat-epochs", "1", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())["digits_mlp"]
    assert (tmp_path / "checkpoints" / "digits_mlp_float.pt").is_file()
    assert (tmp_path / "checkpoints" / "digits_mlp_w4a4.pt").is_file()
    assert metrics["float"]["epochs"] == 3 and metrics["w4a4"]["qat_epochs"] == 1
    assert metrics["w4a4"]["score_onnx"] == pytest.approx(metrics["w4a4"]["score_torch"], abs=0.5)
    assert metrics["w4a4"]["score_onnx"] > 50.0
    model = ModelWrapper(str(tmp_path / "digits_mlp_w4a4.onnx"))
    assert model.model.ir_version <= 10
    x, y = load_dataset("digits", "test")
    assert accuracy(predict_onnx(model, x, batch_size=100), y) == pytest.approx(metrics["w4a4"]["score_onnx"], abs=1e-3)
