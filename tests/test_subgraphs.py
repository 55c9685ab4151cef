"""MAC layers inside subgraphs (If branches, Loop and Scan bodies): a2q reads the main graph only.

Regression: a quantized MatMul inside an If branch was passed over, so a model with one read layer in the main
graph and quantized layers in its branches passed ``a2q verify`` with the branches never checked. Each MAC of a
quantized subgraph is now reported unsupported, naming the subgraph; a float-only subgraph has no integer
accumulator and reports nothing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

from tests.cli_helpers import digest, run_cli
from tests.fuzz.oracle import width
from tests.fuzz.real_files import executed_range


def _branch(name: str, rng: np.random.Generator, quantized: bool) -> onnx.GraphProto:
    weights = rng.integers(-128, 128, (4, 4))
    if quantized:
        inits = [numpy_helper.from_array(weights.astype(np.int8), f"Wq_{name}"),
                 numpy_helper.from_array(np.array(0.01, np.float32), f"ws_{name}")]
        nodes = [helper.make_node("DequantizeLinear", [f"Wq_{name}", f"ws_{name}"], [f"W_{name}"])]
    else:
        inits, nodes = [numpy_helper.from_array(weights.astype(np.float32), f"W_{name}")], []
    nodes.append(helper.make_node("MatMul", ["h", f"W_{name}"], [f"y_{name}"], name=f"mm_{name}"))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 4])],
                             inits)


def _model(path, quantized_branches: bool) -> None:
    """x -> Q/DQ -> MatMul (int8 weights, main graph) -> If(then: MatMul, else: MatMul) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
             numpy_helper.from_array(rng.integers(-128, 128, (8, 4)).astype(np.int8), "W0q"),
             numpy_helper.from_array(np.array(0.01, np.float32), "w0s"), numpy_helper.from_array(np.array(True), "c")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W0q", "w0s"], ["W0"]),
             helper.make_node("MatMul", ["xd", "W0"], ["h"], name="mm_main"),
             helper.make_node("If", ["c"], ["y"], name="choose", then_branch=_branch("then", rng, quantized_branches),
                              else_branch=_branch("else", rng, quantized_branches))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a model onnxruntime runs


def test_quantized_macs_in_if_branches_are_reported_and_no_check_passes_them(tmp_path):
    path = tmp_path / "if.onnx"
    _model(path, quantized_branches=True)
    code, out, err = run_cli("analyze", path, "--json")
    layers = {layer["node"]: layer for layer in json.loads(out)["layers"]}
    assert layers["mm_main"]["status"] == "ok"
    for branch in ("then", "else"):
        assert layers[f"mm_{branch}"]["status"].startswith(
            f"unsupported: in the '{branch}_branch' subgraph of If node 'choose'"), layers

    code, out, err = run_cli("verify", path, "--acc-bits", 32)
    assert code == 3 and "mm_then" in err and "mm_else" in err, (out, err)

    before, out_path = digest(path), tmp_path / "out.onnx"
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 12)
    assert code == 1 and "--skip mm_then" in err and not out_path.exists() and digest(path) == before
    code, out, err = run_cli("project", path, out_path, "--acc-bits", 12, "--skip", "mm_then", "--skip", "mm_else")
    assert code == 0, err
    executed = executed_range(ModelWrapper(str(out_path)), "mm_main")
    assert width(executed.lo, executed.hi) <= 12


def test_float_subgraphs_report_nothing(tmp_path):
    path = tmp_path / "if_float.onnx"
    _model(path, quantized_branches=False)
    code, out, err = run_cli("analyze", path, "--json")
    assert code == 0, err
    assert [layer["node"] for layer in json.loads(out)["layers"]] == ["mm_main"]
