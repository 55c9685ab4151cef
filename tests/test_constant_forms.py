"""Constants as exporters write them: ``Constant`` nodes, ``Identity`` nodes sharing one initializer, ``Cast`` of
int32 zero points (PyTorch's QAT export without constant folding). Each file is executed before and after
``project`` and checked against the oracle, which reads the graph with its own code.

Found by exporting PyTorch's own QAT models (``tests/torch_qat_nets.py``): the TorchScript exporter shares the
all-zero weight zero points of two layers through an Identity node, and every such layer was "unsupported:
non-constant weight zero point"; without constant folding every zero point is a Cast. A weight held in a
``Constant`` node was "could not read this layer (TypeError: 'NoneType' object is not iterable)".
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from scripts.corpus import TORCH_QAT, Entry, check
from tests.cli_helpers import digest, run_cli
from tests.fuzz.oracle import width
from tests.fuzz.real_files import executed_range
from tests.torch_qat_nets import QatSpec, export_torch_qat

K, N = 16, 8


def _qdq_matmul(path, extra_nodes, extra_inits):
    """x -> Q/DQ (uint8) -> MatMul with the int8 weight codes ``wq`` dequantized with zero point ``wz`` -> y;
    ``extra_nodes`` and ``extra_inits`` give ``wq`` and ``wz``."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["adq"]), *extra_nodes,
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"]),
             helper.make_node("MatMul", ["adq", "wdq"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "as"),
             numpy_helper.from_array(np.array(3, np.uint8), "az"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), *extra_inits]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _codes():
    return np.random.default_rng(0).integers(-127, 128, size=(K, N)).astype(np.int8)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_in_a_constant_node_are_projected_and_verified(tmp_path):
    path = _qdq_matmul(tmp_path / "m.onnx", [helper.make_node("Constant", [], ["wq"], value=numpy_helper.from_array(_codes()))],
                       [numpy_helper.from_array(np.array(0, np.int8), "wz")])
    before = digest(path)
    result = check(Entry("constant", "test", path), tmp_path)  # analyse, project 2 bits narrower, verify, oracle
    assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 1, 1)
    out = tmp_path / "p.onnx"
    code, _, err = run_cli("project", path, out, "--acc-bits", 12)
    assert code == 0, err
    projected = ModelWrapper(str(out))
    assert "Constant" not in [n.op_type for n in projected.graph.node]  # the weights are an initializer now
    executed = executed_range(projected, "mm")
    assert width(executed.lo, executed.hi) <= 12
    x = np.random.default_rng(1).normal(size=(1, K)).astype(np.float32)
    assert not np.allclose(_run(path, x), _run(out, x))  # narrower: the weights changed
    assert digest(path) == before


def test_zero_point_through_identity_and_cast_is_read(tmp_path):
    """The weight zero point an Identity of an int32 initializer cast to int8, as PyTorch writes it: read (the
    range is the one the oracle executes), projected and verified."""
    nodes = [helper.make_node("Identity", ["zp32"], ["zp_shared"]),
             helper.make_node("Cast", ["zp_shared"], ["wz"], to=TensorProto.INT8)]
    path = _qdq_matmul(tmp_path / "m.onnx", nodes, [numpy_helper.from_array(np.array(0, np.int32), "zp32"),
                                                   numpy_helper.from_array(_codes(), "wq")])
    code, out, err = run_cli("analyze", path, "--json", "--per-channel")
    (layer,) = json.loads(out)["layers"]
    assert code == 0 and layer["status"] == "ok", err
    executed = executed_range(ModelWrapper(str(path)), "mm")
    assert executed.acc_max.tolist() == layer["per_channel"]["acc_max"]
    assert executed.acc_min.tolist() == layer["per_channel"]["acc_min"]
    result = check(Entry("identity_cast", "test", path), tmp_path)
    assert (result.status, result.detail) == ("handled", "")


def test_a_zero_point_cast_out_of_range_is_not_read_as_a_constant(tmp_path):
    """ONNX leaves the result of an integer Cast that does not fit to the runtime: a zero point of 300 cast to int8
    is not guessed, the layer is refused by name."""
    path = _qdq_matmul(tmp_path / "m.onnx", [helper.make_node("Cast", ["zp32"], ["wz"], to=TensorProto.INT8)],
                       [numpy_helper.from_array(np.array(300, np.int32), "zp32"), numpy_helper.from_array(_codes(), "wq")])
    code, out, err = run_cli("analyze", path, "--json")
    (layer,) = json.loads(out)["layers"]
    assert code == 3 and "non-constant weight zero point" in layer["status"], (out, err)


def test_weights_shared_through_identity_are_refused_not_written(tmp_path):
    """Weights that are an Identity of another initializer have no initializer of their own to rewrite: refused by
    name, nothing written."""
    path = _qdq_matmul(tmp_path / "m.onnx", [helper.make_node("Identity", ["w_init"], ["wq"])],
                       [numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(_codes(), "w_init")])
    out = tmp_path / "p.onnx"
    code, _, err = run_cli("project", path, out, "--acc-bits", 12)
    assert code == 1 and "not stored as an initializer of their own" in err and "mm" in err, err
    assert not out.exists()


def test_pytorch_qat_export_without_constant_folding(tmp_path):
    """PyTorch's QAT CNN (Conv, depthwise Conv, Linear; per-channel int8 weights, uint8 activations) exported
    without constant folding: every layer read, its range the executed one, projected and verified within P."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_torch_qat(tmp_path, QatSpec("cnn", constant_folding=False))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Identity" in ops and "Cast" in ops  # the forms this test is about
    result = check(Entry(path.stem, TORCH_QAT, path), tmp_path)
    assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 3, 3)
