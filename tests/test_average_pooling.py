"""Average pooling in ``a2q lower`` (:mod:`a2q_passes.finn_average_pooling`).

Brevitas' QCDQ export writes ``TruncAvgPool2d`` as ``AveragePool`` followed by an activation quantizer, which FINN
has no layer for: ``lower`` left it a float node (exit 3). The rewrite into a depthwise convolution with unit
weights is checked by executing the graph before and after, and end to end on the files Brevitas writes: lowered
whole, executed equal to the file, every MVAU/VVAU holding its executed worst case.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.basic import qonnx_make_model

from a2q_passes.finn_average_pooling import AveragePoolAsDepthwiseConv


def _pool(shape: list[int], reader: str | None = None, **attrs) -> ModelWrapper:
    """x -> AveragePool(attrs) -> y [-> reader]."""
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], name="pool", **attrs)]
    output = "y"
    if reader is not None:
        nodes.append(helper.make_node(reader, ["y"], ["z"]))
        output = "z"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[2, 2], strides=[2, 2]), dict(kernel_shape=[3, 3]), dict(kernel_shape=[3, 2], strides=[1, 2]),
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), dict(kernel_shape=[2, 2], auto_pad="VALID"),
], ids=["k2_s2", "k3", "k3x2_s1x2", "padded_counted", "valid"])
def test_average_pool_becomes_a_depthwise_conv_of_unit_weights(attrs):
    """Every 2-D average over a fixed window count: the same values (up to the float sum's order) and shape, from a
    depthwise Conv whose weights are a Quant of 1 / (kh kw) at that step (codes 1)."""
    model = _pool([2, 3, 6, 7], **attrs)
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 7)).astype(np.float32)
    before = execute_onnx(model, {"x": x})["y"]
    rewritten, changed = AveragePoolAsDepthwiseConv().apply(ModelWrapper(model.model.SerializeToString()))
    assert changed and [n.op_type for n in rewritten.graph.node] == ["Quant", "Conv"]
    conv = rewritten.graph.node[1]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == 3
    after = execute_onnx(rewritten, {"x": x})["y"]
    assert before.shape == after.shape
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,attrs,reader", [
    ([2, 3, 6, 7], dict(kernel_shape=[2, 2], ceil_mode=1, strides=[2, 2]), None),
    ([2, 3, 6, 7], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), None),
    ([2, 3, 6, 7], dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER"), None),
    ([2, 3, 7], dict(kernel_shape=[2]), None),
    ([2, 3, 6, 7], dict(kernel_shape=[2, 2]), "Trunc"),
], ids=["ceil_mode", "pads_not_counted", "same", "1d", "trunc_reader"])
def test_other_average_pools_are_left(shape, attrs, reader):
    """A border count that differs (pads not counted, SAME, ceil_mode), another rank, and Brevitas' QONNX
    TruncAvgPool2d (a Trunc reads the pool: FINN's own QuantAvgPool2d form) are left as they are."""
    model = _pool(shape, "Identity" if reader == "Trunc" else reader, **attrs)
    if reader == "Trunc":  # only its op type matters here
        model.graph.node[1].op_type = "Trunc"
    before = model.model.SerializeToString()
    rewritten, changed = AveragePoolAsDepthwiseConv().apply(model)
    assert not changed and rewritten.model.SerializeToString() == before


@pytest.mark.parametrize("kind", ["avgpool", "avgpool_floor"])
@pytest.mark.parametrize("exporter", ["qcdq_ts", "qcdq_dynamo", "qcdq_ts_wq"])
def test_lower_takes_brevitas_qcdq_average_pooling(kind, exporter, tmp_path):
    """Brevitas' TruncAvgPool2d (ROUND and FLOOR: its QCDQ export rounds with QuantizeLinear either way) through
    every QCDQ exporter: the corpus check projects the file, lowers it whole and executes every MVAU/VVAU (the pool's
    VVAU of unit weights among them) within its accDataType. Before, `lower` left the AveragePool a float node."""
    from scripts.corpus import EXPORTERS, brevitas_entry, check
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec(kind, 4, 4), exporter)
    entry = brevitas_entry(path, EXPORTERS[exporter], exporter, "fold")
    assert entry.lower  # a Q/DQ file lower takes whole
    result = check(entry, tmp_path)
    assert (result.status, result.detail) == ("handled", ""), result


def _trunc(version: int, scale: float, out_scale: float, in_bits: float, out_bits: float, zero: float = 0.0,
           mode: str = "ROUND") -> ModelWrapper:
    """x -> Trunc (qonnx's version ``version``: v1 reads input and output bits, v2 an output scale between them)."""
    from onnx import numpy_helper

    params = {"s": scale, "z": zero, "ib": in_bits} | ({"ob": out_bits} if version == 1 else {"os": out_scale,
                                                                                          "ob": out_bits})
    node = helper.make_node("Trunc", ["x", *params], ["y"], domain="qonnx.custom_op.general", rounding_mode=mode,
                            **({"signed": 0} if version == 2 else {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(v), k) for k, v in params.items()])
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                               helper.make_opsetid("qonnx.custom_op.general", version)]))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["ROUND", "round", "CEIL", "HALF_EVEN"])
def test_a_trunc_dropping_no_bits_rounds_floor_with_the_same_outputs(version, mode):
    """No bits dropped: every rounding mode rounds integers, so FLOOR (what FINN converts) computes the same, on
    values off the grid, on ties of the grid's half steps, and past the output range (clamped first)."""
    from a2q_passes.finn_average_pooling import TruncDroppingNoBitsAsFloor

    model = _trunc(version, 0.125, 0.125, 6, 6, mode=mode)
    rewritten, changed = TruncDroppingNoBitsAsFloor().apply(ModelWrapper(model.model.SerializeToString()))
    assert changed and helper.get_attribute_value(rewritten.graph.node[0].attribute[0]) in (b"FLOOR",)
    rng = np.random.default_rng(3)
    for x in [rng.uniform(-2, 10, size=(1, 2, 4, 4)), (np.arange(32) * 0.0625 - 0.5).reshape(1, 2, 4, 4)]:
        x = x.astype(np.float32)
        expected, got = execute_onnx(model, {"x": x})["y"], execute_onnx(rewritten, {"x": x})["y"]
        assert np.array_equal(expected, got), (mode, version)


@pytest.mark.parametrize("case", ["drops_bits", "zero_point", "floor_already", "v2_inputs_at_opset_1"])
def test_other_truncs_keep_their_mode(case):
    """A Trunc that drops bits rounds its quotients (ROUND and FLOOR then differ: FINN's layer floors, so it stays
    refused); a zero point shifts the grid; a FLOOR one needs nothing; v2's six inputs in a model whose qonnx domain
    is at opset 1 (qonnx executes v1 there, reading the output scale as the output bits) are not read."""
    from a2q_passes.finn_average_pooling import TruncDroppingNoBitsAsFloor

    mixed = _trunc(2, 0.125, 0.125, 6, 6)
    next(o for o in mixed.model.opset_import if o.domain == "qonnx.custom_op.general").version = 1
    model = {"drops_bits": _trunc(2, 0.125, 0.5, 6, 4), "zero_point": _trunc(2, 0.125, 0.125, 6, 6, zero=1.0),
             "floor_already": _trunc(2, 0.125, 0.125, 6, 6, mode="FLOOR"), "v2_inputs_at_opset_1": mixed}[case]
    before = model.model.SerializeToString()
    rewritten, changed = TruncDroppingNoBitsAsFloor().apply(model)
    assert not changed and rewritten.model.SerializeToString() == before
    if case == "drops_bits":  # the mode matters there: ROUND and FLOOR compute different values
        floor = _trunc(2, 0.125, 0.5, 6, 4, mode="FLOOR")
        x = (np.arange(32) * 0.125).reshape(1, 2, 4, 4).astype(np.float32)
        assert not np.array_equal(execute_onnx(model, {"x": x})["y"], execute_onnx(floor, {"x": x})["y"])


def test_lower_takes_brevitas_qonnx_average_pooling_with_its_default_rounding(tmp_path):
    """Brevitas' TruncAvgPool2d with its default RoundTo8bit, through export_qonnx: its Trunc drops no bits (4-bit
    codes, a 2 x 2 window, 6 bits). FINN refused it ("The Trunc node must have the rounding_mode set to 'FLOOR'");
    now the corpus check lowers it whole and executes every MVAU within its accDataType."""
    from scripts.corpus import EXPORTERS, brevitas_entry, check
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec("avgpool", 4, 4), "qonnx")
    assert any(n.op_type == "Trunc" and helper.get_attribute_value(n.attribute[0]).upper() != b"FLOOR"
               for n in ModelWrapper(str(path)).graph.node if n.attribute and n.attribute[0].name == "rounding_mode")
    result = check(brevitas_entry(path, EXPORTERS["qonnx"], "qonnx", "fold"), tmp_path)
    assert (result.status, result.detail) == ("handled", ""), result


def test_a_trunc_rounding_dropped_bits_is_refused_by_name(tmp_path):
    """Brevitas' TruncAvgPool2d at its default ROUND with a bit width below the window sum (4-bit codes, 2 x 2 window,
    5 bits: one bit dropped): FINN's layer floors, so `lower` names the Trunc and what to export instead (exit 1,
    nothing written), where FINN's own message named neither."""
    import brevitas.nn as qnn
    import onnx
    import torch
    from brevitas.export import export_qonnx

    from tests.brevitas_nets import NetSpec, _CorpusNet
    from tests.cli_helpers import run_cli

    path = tmp_path / "avgpool_drops.onnx"
    torch.manual_seed(0)
    net = _CorpusNet(NetSpec("avgpool", 4, 4))
    net.pool = qnn.TruncAvgPool2d(kernel_size=2, stride=2, bit_width=5, return_quant_tensor=True)
    with torch.no_grad():
        net(torch.randn(8, 4, 8, 8) * 2)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(net, torch.randn(1, 4, 8, 8), str(path))
    truncs = [n for n in onnx.load(path).graph.node if n.op_type == "Trunc"]
    assert truncs
    out = tmp_path / "hw.onnx"
    code, stdout, stderr = run_cli("lower", path, out)
    assert code == 1 and not out.exists(), stdout + stderr
    assert f"Trunc '{truncs[0].name}' (ROUND)" in stderr and "TruncTo8bit" in stderr, stderr


@pytest.mark.parametrize("case", ["v2_at_13", "v2_at_2", "v1_at_1", "unknown_op"])
def test_qonnx_domain_import_at_the_version_its_nodes_resolve_to(case):
    """qonnx's QuantToQCDQ writes the qonnx domain at version 13, which FINN's Trunc conversion does not dispatch
    on. The import comes down to the newest version its nodes resolve to (Trunc: 2), and qonnx executes the same op
    with the same outputs; imports already there, and a domain holding an op qonnx does not define, are left."""
    from a2q_passes.finn_average_pooling import QonnxDomainAtResolvedVersion

    model = _trunc(1 if case == "v1_at_1" else 2, 0.125, 0.25, 6, 5)
    domain = next(o for o in model.model.opset_import if o.domain == "qonnx.custom_op.general")
    domain.version = {"v2_at_13": 13, "v2_at_2": 2, "v1_at_1": 1, "unknown_op": 13}[case]
    if case == "unknown_op":
        model.graph.node.append(helper.make_node("NotAQonnxOp", ["y"], ["z"], domain="qonnx.custom_op.general"))
    before = model.model.SerializeToString()
    rewritten, changed = QonnxDomainAtResolvedVersion().apply(ModelWrapper(before))
    if case != "v2_at_13":
        assert not changed and rewritten.model.SerializeToString() == before
        return
    assert changed and {o.domain: o.version for o in rewritten.model.opset_import}["qonnx.custom_op.general"] == 2
    x = (np.arange(32) * 0.1 - 0.7).reshape(1, 2, 4, 4).astype(np.float32)
    assert np.array_equal(execute_onnx(rewritten, {"x": x})["y"], execute_onnx(model, {"x": x})["y"])


def test_lower_takes_qonnx_quant_to_qcdq_average_pooling(tmp_path):
    """A Brevitas TruncAvgPool2d net (FLOOR) through qonnx's cleanup and QuantToQCDQ (the Trunc stays, the domain at
    13): FINN's conversion raised NotImplementedError ("Trunc opset version 13"); the corpus check now lowers it
    whole and executes every MVAU/VVAU within its accDataType."""
    from scripts.corpus import _qonnx_transformations, check, qonnx_files
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = build_corpus_net(tmp_path, NetSpec("avgpool_floor", 4, 4), "qonnx")
    transformations = {"QuantToQCDQ": _qonnx_transformations()["QuantToQCDQ"]}
    entries, rejected = qonnx_files(tmp_path, [source], transformations, "qonnx transformations")
    assert not rejected and len(entries) == 1 and entries[0].lower
    model = ModelWrapper(str(entries[0].path))
    assert {o.domain: o.version for o in model.model.opset_import}["qonnx.custom_op.general"] == 13
    assert any(n.op_type == "Trunc" for n in model.graph.node)
    result = check(entries[0], tmp_path)
    assert (result.status, result.detail) == ("handled", ""), result
