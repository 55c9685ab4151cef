"""``--input-ranges``: a narrow-range signed quantizer as FINN sees it (issue 10, item 7).

A narrow signed 2-bit activation produces codes [-1, 1]; FINN's conversion annotates its MVAU
``inputDataType`` INT2 = [-2, 1] and sizes accumulators from that. ``project``/``verify`` with
``--input-ranges finn`` must agree with ``lower``; with the default exact codes ``lower`` refuses by name.

Expected values come from Brevitas' integer weights, qonnx's ``DataType`` ranges and from executing
the lowered MVAU nodes with qonnx on worst-case inputs (including the -2 code FINN's type allows),
never from the readers under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import CannotCertify, Claim, certify_claims, certify_layer
from a2q_passes.errors import PostconditionError
from a2q_passes.finn_accumulators import iterate_mac_nodes
from a2q_passes.finn_flow import lower_to_finn_hw
from a2q_passes.layers import find_mac_layers
from tests.cli_helpers import run_cli

P = 7  # the first layer (K = 64) needs 7 bits on the exact codes [-1, 1] and 8 on FINN's INT2
QONNX_DOMAIN = "qonnx.custom_op.general"


def _narrow_act():
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat

    return qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=2, narrow_range=True, return_quant_tensor=True)


class TinyTFC(torch.nn.Module):
    """TFC-2W2A-like: narrow signed 2-bit activations in front of every layer, 2-bit weights."""

    def __init__(self) -> None:
        import brevitas.nn as qnn
        from brevitas.quant import Int8WeightPerTensorFloat

        super().__init__()
        sizes = [(64, 32), (32, 32), (32, 10)]
        self.acts = torch.nn.ModuleList(_narrow_act() for _ in sizes)
        self.fcs = torch.nn.ModuleList(qnn.QuantLinear(i, o, bias=False, weight_quant=Int8WeightPerTensorFloat,
                                                       weight_bit_width=2) for i, o in sizes)

    def forward(self, x):
        for act, fc in zip(self.acts, self.fcs):
            x = fc(act(x))
        return x


@pytest.fixture(scope="module")
def tfc(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """The exported QONNX file and Brevitas' own integer weights per layer as ``(out, in)`` rows."""
    from brevitas.export import export_qonnx
    from qonnx.util.cleanup import cleanup_model

    torch.manual_seed(0)
    net = TinyTFC()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 64))
    net.eval()
    path = tmp_path_factory.mktemp("tfc") / "tfc_w2a2_narrow.onnx"
    export_qonnx(net, torch.randn(1, 64), str(path))
    cleanup_model(ModelWrapper(str(path))).save(str(path))
    rows = [fc.quant_weight().int().detach().numpy().astype(np.int64) for fc in net.fcs]
    return path, rows


def _range(rows: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Brute force over the input box corners that matter: each term's min/max independently."""
    terms = np.stack([rows * lo, rows * hi])
    return int(terms.min(axis=0).sum(axis=1).min()), int(terms.max(axis=0).sum(axis=1).max())


def _executed_mvau_extremes(hw: ModelWrapper, node) -> tuple[int, int]:
    """Run the MVAU's own kernel (qonnx/FINN numpy execution) on worst-case inputs of its inputDataType.

    The node is copied with ``noActivation=1`` so its output is the accumulator itself; the inputs
    put each term at its minimum or maximum over the whole of FINN's input type (e.g. -2 for INT2).
    """
    inst = getCustomOp(node)
    idt = DataType[inst.get_nodeattr("inputDataType")]
    weights = hw.get_initializer(node.input[1])  # (MW, MH)
    mw, mh = weights.shape
    lo, hi = int(idt.min()), int(idt.max())
    positive = weights.T > 0  # (MH, MW)
    worst = np.concatenate([np.where(positive, hi, lo), np.where(positive, lo, hi)]).astype(np.float32)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.update(noActivation=1, outputDataType=inst.get_nodeattr("accDataType"))
    single = helper.make_node(node.op_type, ["x", "w"], ["acc"], domain=node.domain, **attrs)
    graph = helper.make_graph([single], "mvau", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, mw])],
                              [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, mh])],
                              initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_tensor_datatype("x", idt)
    model.set_tensor_datatype("w", DataType[inst.get_nodeattr("weightDataType")])
    outputs = [execute_onnx(model, {"x": row[None, :]})["acc"] for row in worst]
    assert (worst == lo).any(), "the worst cases must use the low end of FINN's type"
    values = np.concatenate(outputs)
    return int(values.min()), int(values.max())


def test_finn_ranges_make_project_verify_and_lower_agree(tfc, tmp_path):
    path, _ = tfc
    projected, lowered = tmp_path / "p.onnx", tmp_path / "l.onnx"
    code, out, err = run_cli("project", path, projected, "--acc-bits", P, "--input-ranges", "finn", "--json")
    assert code == 0, err
    assert json.loads(out)["input_ranges"] == "finn"
    # verify defaults to the ranges project recorded
    code, out, err = run_cli("verify", projected, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["input_ranges"] == "finn" and report["overflow_impossible"]
    assert all(layer["acc_bits"] == P for layer in report["layers"])
    code, out, err = run_cli("lower", projected, lowered, "--acc-bits", P, "--json")
    assert code == 0, err
    assert json.loads(out)["input_ranges"] == "finn"
    hw = ModelWrapper(str(lowered))
    nodes = list(iterate_mac_nodes(hw))
    assert len(nodes) == 3
    for node in nodes:
        inst = getCustomOp(node)
        assert inst.get_nodeattr("inputDataType") == "INT2"
        adt = DataType[inst.get_nodeattr("accDataType")]
        lo, hi = _executed_mvau_extremes(hw, node)
        assert adt.min() <= lo and hi <= adt.max(), (node.name, adt.name, lo, hi)
        assert adt.bitwidth() <= P


def test_exact_ranges_pass_project_and_verify_but_lower_refuses_by_name(tfc, tmp_path):
    path, _ = tfc
    projected, lowered = tmp_path / "p.onnx", tmp_path / "l.onnx"
    code, out, err = run_cli("project", path, projected, "--acc-bits", P)
    assert code == 0, err
    assert "input ranges: exact quantizer codes" in out
    code, out, err = run_cli("verify", projected, "--json")
    assert code == 0 and json.loads(out)["input_ranges"] == "exact", err
    code, out, err = run_cli("lower", projected, lowered, "--acc-bits", P)
    assert code == 1 and not lowered.exists()
    message = " ".join(err.split())
    assert "MVAU_0 (QONNX layer Gemm_0)" in message
    assert "INT2 = [-2, 1]" in message and "codes are [-1, 1]" in message
    assert "--input-ranges finn" in message
    # the refusal is warranted: FINN's own graph of this model, executed on FINN's input type, leaves P bits
    hw, _ = lower_to_finn_hw(ModelWrapper(str(projected)))
    first = next(iterate_mac_nodes(hw))
    lo, hi = _executed_mvau_extremes(hw, first)
    assert lo < -(1 << (P - 1)) or hi > (1 << (P - 1)) - 1
    # and the finn-range analysis of the QONNX model says so before lowering
    verdict = run_cli("verify", projected, "--input-ranges", "finn")
    assert verdict[0] == 3 and "Gemm_0" in verdict[2]


def test_ranges_follow_brevitas_weights_and_finn_datatype_in_reader_and_certificate(tfc):
    path, rows = tfc
    model = ModelWrapper(str(path))
    exact_codes = (-1, 1)  # narrow signed 2 bits
    finn_codes = (int(DataType["INT2"].min()), int(DataType["INT2"].max()))
    for ranges, codes in (("exact", exact_codes), ("finn", finn_codes)):
        reports = [r for r in analyze_model(model, input_ranges=ranges).layers]
        assert [r.input_range for r in reports] == [list(codes)] * 3
        for report, weights in zip(reports, rows):
            expected = _range(weights, *codes)
            assert (report.acc_min, report.acc_max) == expected
            cert = certify_layer(model, report.node, input_ranges=ranges)
            assert cert.input_codes == codes and (cert.acc_min, cert.acc_max) == expected
    # a claim made for the exact codes is refused by a certificate asked about FINN's ranges
    exact = analyze_model(model).layers[0]
    claim = {exact.node: Claim(exact.acc_min, exact.acc_max, exact.bounds["exact"])}
    certify_claims(model, claim, what="test")
    with pytest.raises(PostconditionError, match="under-reports"):
        certify_claims(model, claim, what="test", input_ranges="finn")


def test_analyze_reports_name_the_ranges(tfc):
    path, _ = tfc
    for option, title in ((None, "input ranges: exact quantizer codes"), ("finn", "input ranges: FINN DataType")):
        extra = ("--input-ranges", option) if option else ()
        code, out, _ = run_cli("analyze", path, *extra)
        assert code == 0 and title in " ".join(out.split())
        code, out, _ = run_cli("analyze", path, *extra, "--json")
        assert json.loads(out)["input_ranges"] == (option or "exact")
    code, _, err = run_cli("analyze", path, "--input-ranges", "wide")
    assert code == 1 and "--input-ranges must be one of exact, finn" in err


def _matmul_model(activation: list, act_inputs: list[str], initializers: list) -> ModelWrapper:
    """x -> (activation quantizer nodes) -> MatMul with 2-bit Quant weights (4 x 3)."""
    w = np.array([[1, -1, 0], [1, 1, -1], [-1, 0, 1], [1, 1, 1]], dtype=np.float32) * 0.5
    nodes = activation + [
        helper.make_node("Quant", ["w", "w_scale", "zero", "w_bits"], ["wq"], domain=QONNX_DOMAIN,
                         signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("MatMul", [act_inputs[-1], "wq"], ["y"], name="MatMul_0"),
    ]
    inits = initializers + [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.5), "w_scale"),
                            numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(2), "w_bits")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    imports = [helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)]
    return ModelWrapper(qonnx_make_model(graph, opset_imports=imports))


def test_fractional_bit_width_is_refused_under_finn_ranges():
    """ConvertQONNXtoFINN truncates 4.5 bits to INT4 = [-8, 7], narrower than the narrow codes [-10, 10]."""
    quant = helper.make_node("Quant", ["x", "s", "zero", "bits"], ["xq"], domain=QONNX_DOMAIN, signed=1, narrow=1,
                             rounding_mode="ROUND")
    model = _matmul_model([quant], ["xq"], [numpy_helper.from_array(np.float32(0.1), "s"),
                                           numpy_helper.from_array(np.float32(4.5), "bits")])
    extremes = {"x": np.array([[-1e9, 1e9, 0, 0]], dtype=np.float32)}
    codes = execute_onnx(model.transform(InferShapes()), extremes, return_full_exec_context=True)["xq"] / 0.1
    (exact,) = find_mac_layers(model)
    assert exact.ok
    assert (exact.grid.range.lo, exact.grid.range.hi) == (round(codes.min()), round(codes.max())) == (-10, 10)
    (finn,) = find_mac_layers(model, input_ranges="finn")
    assert not finn.ok and "4.5" in finn.status and "INT4" in finn.status
    with pytest.raises(CannotCertify, match="INT4"):
        certify_layer(model, "MatMul_0", input_ranges="finn")


def test_qcdq_clip_takes_the_type_finn_gives_after_qcdq_to_quant():
    """int8 codes clipped to [-1, 1]: qonnx's QCDQToQuant and FINN's conversion annotate the MatMul input INT2."""
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.qcdq_to_qonnx import QCDQToQuant

    from a2q_passes.finn_runtime import ensure_finn_importable

    activation = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq8"]),
        helper.make_node("Clip", ["xq8", "lo", "hi"], ["xc"]),
        helper.make_node("DequantizeLinear", ["xc", "s", "zp"], ["xd"]),
    ]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "zp"),
             numpy_helper.from_array(np.int8(-1), "lo"), numpy_helper.from_array(np.int8(1), "hi")]
    model = _matmul_model(activation, ["xd"], inits)
    ranges = {}
    for option in ("exact", "finn"):
        (layer,) = find_mac_layers(model, input_ranges=option)
        cert = certify_layer(model, "MatMul_0", input_ranges=option)
        assert (layer.grid.range.lo, layer.grid.range.hi) == cert.input_codes
        ranges[option] = cert.input_codes
    assert ranges["exact"] == (-1, 1)
    # what the real tools make of it: QCDQToQuant, then FINN's conversion to a MultiThreshold
    ensure_finn_importable()
    converted = model.transform(InferShapes()).transform(QCDQToQuant()).transform(InferDataTypes())
    converted = converted.transform(ConvertQONNXtoFINN()).transform(InferDataTypes())
    matmul = converted.get_nodes_by_op_type("MatMul")[0]
    producer = converted.find_producer(matmul.input[0])
    while producer is not None and producer.op_type != "MultiThreshold":
        producer = converted.find_producer(producer.input[0])
    dt = DataType[getCustomOp(producer).get_nodeattr("out_dtype")]
    assert ranges["finn"] == (int(dt.min()), int(dt.max())) == (-2, 1)
    onnx.checker.check_model(model.model)
