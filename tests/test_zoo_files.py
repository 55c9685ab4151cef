"""Real public QONNX files (tests/data, from the QONNX model zoo) checked against qonnx execution.

The zoo's Brevitas TFC exports use the custom domain ``onnx.brevitas`` without an opset import; a2q
reads them as published (one test), and most tests use them after qonnx's own ``cleanup_model`` (what
``qonnx-cleanup`` and FINN's flow run on such files: readable layer names). Every claim is checked with the fuzzer's oracle
(``tests/fuzz/oracle.py``): worst-case inputs per output channel, executed by qonnx.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model

from tests.fuzz.generate import Case, LayerInfo
from tests.fuzz.oracle import fits, layer_range, width

DATA = Path(__file__).resolve().parent / "data"
FILES = ["TFC_2W2A.onnx", "TFC_1W2A.onnx", "TFC_1W1A.onnx"]
MAC_OPS = ("MatMul", "Gemm", "Conv")
BITS_BELOW_WIDEST = 2


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name in FILES:
        paths[name] = folder / name
        cleanup_model(ModelWrapper(str(DATA / name))).save(str(paths[name]))
    return paths


def _quant_grid(model: ModelWrapper, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the quantizer that produces ``tensor``, read from the graph itself."""
    producer = model.find_producer(tensor)
    assert producer is not None and producer.op_type in ("Quant", "IntQuant", "BipolarQuant"), f"{tensor}: no quantizer"
    if producer.op_type == "BipolarQuant":  # codes -1 and +1: no zero point input
        return model.get_initializer(producer.input[1]), np.zeros(1)
    return model.get_initializer(producer.input[1]), model.get_initializer(producer.input[2])


def _oracle_case(model: ModelWrapper) -> Case:
    """The oracle's description of every MAC node: Quant -> MAC on both inputs, as the zoo's MLPs are built."""
    layers = []
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        act_scale, act_zero = _quant_grid(model, node.input[0])
        weight_scale, weight_zero = _quant_grid(model, node.input[1])
        assert act_scale.size == 1 and act_zero.size == 1 and not np.any(weight_zero), node.name
        # a Quant feeding the MAC directly: its scale broadcasts to the weight as the MAC consumes it
        layers.append(LayerInfo(node.name, node.op_type, weight_scale, float(np.ravel(act_scale)[0]),
                                int(np.ravel(act_zero)[0])))
    return Case(model, layers)


def _analyze(a2q, path: Path) -> dict[str, dict]:
    run = a2q("analyze", path, "--json", "--per-channel")
    assert run.returncode == 0, run.stderr
    return {layer["node"]: layer for layer in json.loads(run.stdout)["layers"]}


@pytest.mark.parametrize("name", FILES)
def test_zoo_file_exact_ranges_are_the_executed_ones(a2q, cleaned, name):
    path = cleaned[name]
    case = _oracle_case(ModelWrapper(str(path)))
    reported = _analyze(a2q, path)
    assert set(reported) == {info.node for info in case.layers}
    assert all(layer["status"] == "ok" for layer in reported.values()), reported

    # every input element of these MLPs is free, so each channel's worst case is reachable: equality
    for info in case.layers:
        executed = layer_range(case.model, case, info)
        per_channel = reported[info.node]["per_channel"]
        np.testing.assert_array_equal(executed.acc_min, per_channel["acc_min"], err_msg=info.node)
        np.testing.assert_array_equal(executed.acc_max, per_channel["acc_max"], err_msg=info.node)
        assert reported[info.node]["bounds"]["exact"] == width(executed.lo, executed.hi)


def test_zoo_tfc_projection_fits_when_executed(a2q, cleaned, tmp_path):
    path = cleaned["TFC_2W2A.onnx"]
    reported = _analyze(a2q, path)
    # FINN models: projected for the codes FINN's DataTypes allow (a superset of the executed ones)
    bits = max(layer["bounds"]["exact"] for layer in reported.values()) - BITS_BELOW_WIDEST
    out = tmp_path / "projected.onnx"
    run = a2q("project", path, out, "--acc-bits", bits, "--input-ranges", "finn")
    assert run.returncode == 0, run.stderr
    run = a2q("verify", out)
    assert run.returncode == 0, run.stdout + run.stderr
    projected = _oracle_case(ModelWrapper(str(out)))
    for info in projected.layers:
        executed = layer_range(projected.model, projected, info)
        assert fits(executed.lo, executed.hi, bits, signed=True), (info.node, executed.lo, executed.hi, bits)


# TFC_1W2A has bipolar weights only: nothing to shrink, and FINN's INT2 view of its narrow 2-bit input
# ([-2, 1] over 784 taps) keeps its first layer at 12 bits
def test_zoo_bipolar_layer_below_its_floor_is_refused(a2q, cleaned, tmp_path):
    out = tmp_path / "projected.onnx"
    run = a2q("project", cleaned["TFC_1W2A.onnx"], out, "--acc-bits", 9, "--input-ranges", "finn")
    assert run.returncode == 1 and "MatMul_0" in run.stderr and "bipolar" in run.stderr, run.stderr
    assert not out.exists()


# FINN's streamlining negates the weight columns whose BatchNorm scale is negative (FactorOutMulSignMagnitude,
# Absorb1BitMulIntoMatMul): MVAU_0..2 hold MatMul_0..2 with some channels negated, which lower must still pair
def test_zoo_tfc_lowers_to_finn_from_annotations(a2q, cleaned, tmp_path):
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.finn_accumulators import iterate_mac_nodes

    projected, hw_path = tmp_path / "projected.onnx", tmp_path / "hw.onnx"
    assert a2q("project", cleaned["TFC_2W2A.onnx"], projected, "--acc-bits", 8, "--input-ranges", "finn").returncode == 0
    run = a2q("lower", projected, hw_path, "--from-annotations", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["unmapped"] == []
    nodes = list(iterate_mac_nodes(ModelWrapper(str(hw_path))))
    assert len(nodes) == 4
    for node in nodes:
        assert DataType[getCustomOp(node).get_nodeattr("accDataType")].bitwidth() <= 8, node.name


def test_zoo_bipolar_layers_that_fit_are_promised_and_verified(a2q, cleaned, tmp_path):
    """Bipolar layers cannot be shrunk, but those that already fit P are recorded like any other layer."""
    out = tmp_path / "projected.onnx"
    run = a2q("project", cleaned["TFC_1W2A.onnx"], out, "--acc-bits", 9, "--input-ranges", "finn",
              "--skip", "MatMul_0", "--json")
    assert run.returncode == 0, run.stderr
    statuses = {layer["node"]: layer["status"] for layer in json.loads(run.stdout)["layers"]}
    assert statuses["MatMul_0"].startswith("skipped") and {statuses[f"MatMul_{i}"] for i in (1, 2, 3)} == {"unchanged"}
    verified = a2q("verify", out, "--json")
    assert verified.returncode == 0, verified.stderr
    checked = {layer["node"]: layer["acc_bits"] for layer in json.loads(verified.stdout)["layers"]}
    assert all(checked[f"MatMul_{i}"] == 9 for i in (1, 2, 3)), checked


def test_zoo_file_as_published_is_read_without_cleanup(a2q, cleaned, tmp_path):
    """The raw export uses the undeclared domain ``onnx.brevitas`` (qonnx aliases it to its own ops)."""
    raw = DATA / "TFC_2W2A.onnx"
    before = raw.read_bytes()
    ranges = []
    for path in (raw, cleaned["TFC_2W2A.onnx"]):
        run = a2q("analyze", path, "--json")
        assert run.returncode == 0, run.stderr
        ranges.append([(layer["acc_min"], layer["acc_max"]) for layer in json.loads(run.stdout)["layers"]])
    assert ranges[0] == ranges[1]
    out = tmp_path / "projected.onnx"
    assert a2q("project", raw, out, "--acc-bits", 9).returncode == 0
    assert a2q("verify", out).returncode == 0
    assert raw.read_bytes() == before


def test_zoo_tfc_1w1a_lowers_to_xnor_popcount_layers_that_hold_their_sums(a2q, cleaned, tmp_path):
    """Bipolar weights and activations: FINN's MVAU counts XNOR matches (0..MW), an unsigned accumulator. Each MVAU
    lower writes is executed (qonnx, without its thresholds) on the inputs that match every weight of a column and
    on their complement: every such popcount lies inside the node's accDataType."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.core.datatype import DataType
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.util.basic import qonnx_make_model

    from a2q_passes.finn_accumulators import iterate_mac_nodes

    hw_path = tmp_path / "hw.onnx"
    run = a2q("lower", cleaned["TFC_1W1A.onnx"], hw_path, "--acc-bits", 12)
    assert run.returncode == 0 and "equivalent" in run.stdout, run.stdout[-600:] + run.stderr
    hw = ModelWrapper(str(hw_path))
    nodes = list(iterate_mac_nodes(hw))
    assert len(nodes) == 4
    for node in nodes:
        inst = getCustomOp(node)
        assert inst.get_nodeattr("binaryXnorMode") == 1, node.name
        acc = DataType[inst.get_nodeattr("accDataType")]
        w = hw.get_initializer(node.input[1])  # (MW, MH) bits
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(noActivation=1, outputDataType=acc.name)
        bare = helper.make_node(node.op_type, ["x", "w"], ["acc"], domain=node.domain, **attrs)
        graph = helper.make_graph([bare], "mvau",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                                  [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, w.shape[1]])],
                                  [numpy_helper.from_array(w.astype(np.float32), "w")])
        one = ModelWrapper(qonnx_make_model(graph))
        for column in range(w.shape[1]):
            for x, expected in ((w[:, column], w.shape[0]), (1 - w[:, column], 0)):
                out = execute_onnx(one, {"x": x[None].astype(np.float32)})["acc"][0, column]
                assert out == expected and acc.allowed(out), (node.name, column, out, acc.name)
