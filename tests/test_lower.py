"""``LowerToFINN``, ``a2q lower``, ``a2q report`` and ``a2q verify --against`` on Brevitas exports and committed models.

Expected values come from brute-force worst-case accumulator sums of the lowered weights, from
FINN's own ``MinimizeAccumulatorWidth``, from graph order (which layer became which MVAU in
these nets) and from executing both graphs with qonnx; never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from torch import nn
from typer.testing import CliRunner

from a2q_passes.errors import A2QError
from a2q_passes.finn_accumulators import iterate_mac_nodes
from a2q_passes.finn_execution import check_equivalence, equivalence_inputs
from a2q_passes.finn_flow import LoweringError
from a2q_passes.hw_accumulators import QONNX_ACCUMULATORS_KEY
from a2q_passes.layer_mapping import match_layers, weight_signature
from a2q_passes.layers import find_mac_layers
from a2q_passes.metadata import ACCUMULATORS_KEY, recorded_accumulators
from a2q_passes.model_io import load_model
from a2q_passes.transforms import AnnotateAccumulators
from a2q_passes.transforms.lower import LowerToFINN
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.verification import verify_model
from models.export import export_float_onnx
from tests.cli_helpers import run_a2q
from tests.test_finn_flow import MLP, ResidualCNN, _brute_force_range, _linear, _mac_rows, export_net

torch.set_num_threads(1)
PART = "xczu3eg-sbva484-1-e"
MODELS = Path(__file__).resolve().parents[1] / "models"
# per-layer targets for the residual CNN (exact widths before projection: 10, 11, 10, 14, 11)
CNN_LAYER_BITS = {"Conv_0": 10, "Conv_1": 11, "Conv_2": 9, "Conv_3": 12, "Gemm_0": 10}


def run_cli(*args) -> tuple[int, str]:
    """``a2q ARGS`` in this process (FINN imported once), exit codes as ``a2q_passes.cli.main`` gives them."""
    from a2q_passes.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    error = result.exception
    if isinstance(error, A2QError):
        return error.exit_code, result.output + str(error)
    if error is not None and not isinstance(error, SystemExit):
        raise error
    return result.exit_code, result.output


def _ordered_qonnx_layers(model: ModelWrapper) -> list[str]:
    return [layer.node for layer in find_mac_layers(model)]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    net = ResidualCNN()
    folder = tmp_path_factory.mktemp("cnn")
    model = export_net(net, folder / "cnn.onnx")
    return net, model, folder


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    net = MLP()
    folder = tmp_path_factory.mktemp("mlp")
    model = export_net(net, folder / "mlp.onnx")
    projected = model.transform(ProjectToAccumulator(9))
    projected.save(str(folder / "mlp_p9.onnx"))
    return net, model, projected, folder


@pytest.fixture(scope="module")
def lowered_cnn(cnn):
    """The residual CNN projected two ways (one P for all, a different P per layer), each lowered."""
    _, model, folder = cnn
    cases = {}
    for label, projection in (("P12", ProjectToAccumulator(12)), ("per-layer", ProjectToAccumulator(layer_bits=CNN_LAYER_BITS))):
        projected = model.transform(projection)
        lowering = LowerToFINN()
        hw = projected.transform(lowering)
        targets = {p.node: p.target_bits for p in projection.projections}
        cases[label] = (projected, hw, lowering, targets)
    return cases


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["P12", "per-layer"])
def test_accumulators_hold_exact_range_within_the_projected_width(lowered_cnn, label):
    from finn.transformation.fpgadataflow.minimize_accumulator_width import MinimizeAccumulatorWidth

    projected, hw, lowering, targets = lowered_cnn[label]
    hw_nodes = list(iterate_mac_nodes(hw))
    assert sorted(n.op_type for n in hw_nodes) == ["MVAU"] * 4 + ["VVAU"]  # conv1, pw, conv3, fc; depthwise
    # the MAC layers keep their graph order through FINN's flow in this net: that is the expected mapping
    expected = dict(zip((n.name for n in hw_nodes), _ordered_qonnx_layers(projected)))
    assert {layer.node: layer.qonnx_node for layer in lowering.layers} == expected
    finn = ModelWrapper(hw.model.SerializeToString()).transform(MinimizeAccumulatorWidth())
    last = hw.graph.node[-1].name
    for node in hw_nodes:
        inst = getCustomOp(node)
        adt = DataType[inst.get_nodeattr("accDataType")]
        idt = DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(hw, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max()  # every reachable accumulator value fits
        narrower = DataType[adt.name.replace(str(adt.bitwidth()), str(adt.bitwidth() - 1))]
        assert lo < narrower.min() or hi > narrower.max()  # and it is minimal
        target = targets[expected[node.name]]
        assert adt.bitwidth() <= target  # never wider than the width the layer was projected to
        finn_adt = DataType[getCustomOp(finn.get_node_from_name(node.name)).get_nodeattr("accDataType")]
        assert finn_adt.bitwidth() >= adt.bitwidth()  # FINN's minimiser never finds a narrower type
        if not (node.name == last and inst.get_nodeattr("noActivation")):
            assert finn_adt == adt and finn_adt.bitwidth() <= target
        reported = next(layer for layer in lowering.layers if layer.node == node.name)
        assert (reported.finn_acc_dtype, reported.target_bits, reported.acc_min, reported.acc_max) == \
            (finn_adt.name, target, lo, hi)
        if not inst.get_nodeattr("noActivation"):
            thresholds = hw.get_initializer(node.input[2])
            assert np.array_equal(thresholds, np.round(thresholds))
            assert thresholds.min() >= adt.min() and thresholds.max() <= adt.max() + 1


def test_per_layer_targets_follow_the_mapping(lowered_cnn):
    """With a different P per layer, each HW node carries the P of its own QONNX layer."""
    _, _, lowering, targets = lowered_cnn["per-layer"]
    assert {layer.qonnx_node: layer.target_bits for layer in lowering.layers} == CNN_LAYER_BITS == targets
    assert any(DataType[layer.acc_dtype].bitwidth() == CNN_LAYER_BITS[layer.qonnx_node] for layer in lowering.layers)


def test_lowered_graph_executes_like_the_qonnx_model(lowered_cnn, cnn):
    net = cnn[0]
    projected, hw, _, _ = lowered_cnn["per-layer"]
    x = equivalence_inputs(projected, samples=6, seed=3)
    result = check_equivalence(projected, hw, x)
    assert result["within_tolerance"] and "stages" not in result  # no replay when nothing differs
    name_q, name_hw = projected.graph.input[0].name, hw.graph.input[0].name
    ref = np.concatenate([execute_onnx(projected, {name_q: x[i:i + 1]})[projected.graph.output[0].name] for i in range(6)])
    got = np.concatenate([execute_onnx(hw, {name_hw: x[i:i + 1]})[hw.graph.output[0].name] for i in range(6)])
    assert np.max(np.abs(ref - got)) <= result["max_abs_diff"] + 1e-12
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, np.max(np.abs(ref)))
    # the inputs lie inside the input quantizer's range: Brevitas rounds them without clipping
    with torch.no_grad():
        quantized = net.inp(torch.from_numpy(x))
    codes = x / float(quantized.scale)
    assert np.max(np.abs(codes - quantized.int().numpy())) <= 0.5 + 1e-4
    assert codes.min() < -4 and codes.max() > 3  # and spread over it (4-bit signed codes -8..7)
    assert np.array_equal(x, equivalence_inputs(projected, samples=6, seed=3))  # deterministic


def test_metadata_survives_and_is_keyed_by_hw_node(lowered_cnn):
    projected, hw, lowering, _ = lowered_cnn["P12"]
    before = {p.key: p.value for p in projected.model.metadata_props}
    after = {p.key: p.value for p in hw.model.metadata_props}
    assert after[QONNX_ACCUMULATORS_KEY] == before[ACCUMULATORS_KEY]  # the QONNX record, verbatim
    record = recorded_accumulators(hw)
    qonnx_record = json.loads(before[ACCUMULATORS_KEY])["layers"]
    for node in iterate_mac_nodes(hw):
        entry = record[node.name]
        adt = DataType[getCustomOp(node).get_nodeattr("accDataType")]
        assert entry["acc_bits"] == adt.bitwidth() and entry["acc_dtype"] == adt.name
        assert entry["method"] == qonnx_record[entry["qonnx_node"]]["method"]
        assert entry["target_bits"] == qonnx_record[entry["qonnx_node"]]["acc_bits"] == 12
    onnx.checker.check_model(hw.model)  # FINN's HW domain is declared
    report = verify_model(hw)  # the lowered graph proves overflow freedom at its recorded widths
    assert report.overflow_impossible and {v.node for v in report.layers} == set(record)


def test_signature_ignores_reordering_and_tells_layers_apart():
    rng = np.random.default_rng(0)
    rows = rng.integers(-8, 8, size=(6, 9))
    permuted = rows[rng.permutation(6)][:, rng.permutation(9)]
    assert weight_signature(permuted) == weight_signature(rows)
    changed = rows.copy()
    changed[2, 4] += 1
    assert weight_signature(changed) != weight_signature(rows)
    assert weight_signature(rows.reshape(9, 6)) != weight_signature(rows)
    a, b = weight_signature(rows), weight_signature(changed)
    assert match_layers({"q1": a, "q2": a, "q3": b}, {"h1": b, "h2": a, "h3": a, "h4": b}) == \
        {"h1": "q3", "h2": "q1", "h3": "q2"}


def test_global_target_and_too_narrow_width(mlp):
    _, model, projected, _ = mlp
    lowering = LowerToFINN(acc_bits=12)
    hw = model.transform(lowering)  # unprojected: widths 11 and 10 fit 12
    assert lowering.result.details["targets"] == "global"
    assert all(layer.target_bits == 12 and DataType[layer.acc_dtype].bitwidth() <= 12 for layer in lowering.layers)
    assert len(lowering.layers) == len(list(iterate_mac_nodes(hw))) == 2
    with pytest.raises(A2QError, match=r"MVAU_0: accumulator range \[-?\d+, \d+\] needs INT\d+, wider than the target 8"):
        model.transform(LowerToFINN(acc_bits=8))
    with pytest.raises(A2QError, match="records no accumulator widths"):
        model.transform(LowerToFINN(from_annotations=True))
    annotated = LowerToFINN(from_annotations=True)
    projected.transform(annotated)
    assert [layer.target_bits for layer in annotated.layers] == [9, 9]


class FloatInputLinear(nn.Module):
    """A quantized layer fed by an unquantized input: FINN cannot absorb the float scale in front."""

    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = _linear(16, 10)

    def forward(self, x):
        return self.fc(x)


def test_layers_finn_cannot_lower(tmp_path, mlp):
    torch.manual_seed(0)
    partly = export_net(MLP(quantized_input=False), tmp_path / "float_in.onnx")
    lowering = LowerToFINN()
    hw = partly.transform(lowering)
    (blocking,) = [n for n in lowering.lowering.blocking]
    assert blocking.op_type == "MatMul" and hw.get_node_from_name(blocking.name).op_type == "MatMul"
    assert [layer.qonnx_node for layer in lowering.layers] == ["Gemm_1"]  # the second layer still lowered
    with pytest.raises(LoweringError, match=f"node '{blocking.name}' \\(MatMul\\)"):
        partly.transform(LowerToFINN(strict=True))
    # CLI: written, exit 3 (not lowered); --strict: exit 1, nothing written
    code, out = run_cli("lower", tmp_path / "float_in.onnx", tmp_path / "partly.onnx", "--samples", 2)
    assert code == 3 and "1 node(s) not lowered" in out and (tmp_path / "partly.onnx").is_file()
    code, out = run_cli("lower", tmp_path / "float_in.onnx", tmp_path / "strict.onnx", "--strict")
    assert code == 1 and blocking.name in out and not (tmp_path / "strict.onnx").exists()
    # nothing lowers at all: a bad input, naming the node
    torch.manual_seed(0)
    export_net(FloatInputLinear(), tmp_path / "nothing.onnx")
    code, out = run_cli("lower", tmp_path / "nothing.onnx", tmp_path / "nothing_hw.onnx")
    assert code == 1 and "FINN lowered no layer" in out and "MatMul" in out and "FLOAT32" in out
    assert "QDQ" not in out  # the QONNX advice below is for Q/DQ models only
    assert not (tmp_path / "nothing_hw.onnx").exists()


def test_the_bundled_qdq_model_with_asymmetric_activations_lowers_its_layers(tmp_path):
    """onnxruntime's QDQ model trained on real data (uint8 activations; the output's with a calibrated zero point):
    its three layers become MVAUs whose exact ranges, from their lowered weights and input types, lie within their
    accDataType, the output quantizer becomes the last MVAU's thresholds with output bias -z, and the lowered graph
    computes what the file computes. The requantizers onnxruntime puts after each MaxPool and after the Flatten
    (same scale and zero point as the quantizer in front) are dropped, so FINN takes the Flatten into the classifier's
    MVAU. Before, `lower` refused the file naming the output's zero point, and then stopped at the Flatten."""
    from a2q_passes import bounds

    code, out = run_cli("lower", MODELS / "digits_cnn_qdq.onnx", tmp_path / "hw.onnx")
    text = " ".join(out.split())
    assert code == 0 and "not lowered" not in text and "NOT equivalent" not in text, text[-2000:]
    assert "max |QONNX - FINN| = 0 " in text, text[-2000:]
    lowered = ModelWrapper(str(tmp_path / "hw.onnx"))
    nodes = list(iterate_mac_nodes(lowered))
    assert len(nodes) == 3
    for node in nodes:  # brute-force range of the lowered integer weights over the node's input type
        inst = getCustomOp(node)
        idt, adt = (DataType[inst.get_nodeattr(a)] for a in ("inputDataType", "accDataType"))
        weights = lowered.get_initializer(node.input[1]).T.astype(np.int64)
        low = np.where(weights > 0, weights * int(idt.min()), weights * int(idt.max())).sum(axis=1)
        high = np.where(weights > 0, weights * int(idt.max()), weights * int(idt.min())).sum(axis=1)
        assert adt.min() <= low.min() and high.max() <= adt.max(), (node.name, adt.name)
        assert adt.bitwidth() == bounds.accumulator_width(int(low.min()), int(high.max()))
    # the output quantizer (uint8, zero point z) became the last MVAU's thresholds, giving q - z in INT9
    source = onnx.load(str(MODELS / "digits_cnn_qdq.onnx"))
    last_quantize = [n for n in source.graph.node if n.op_type == "QuantizeLinear"][-1]
    zero = int(next(onnx.numpy_helper.to_array(t) for t in source.graph.initializer if t.name == last_quantize.input[2]))
    last = getCustomOp(nodes[-1])
    assert zero != 0 and last.get_nodeattr("ActVal") == -zero and last.get_nodeattr("outputDataType") == "INT9"


def test_a_residual_add_of_unquantized_activations_is_named_when_finn_fails_on_it(tmp_path, cnn):
    """qonnx's QuantizeGraph quantizes only the MAC inputs of a float residual net: its Add sums a float Conv output
    and a float Relu, on which FINN's streamlining fails with a bare assertion naming no node. The error names the
    Add and its unquantized inputs and says what to export; a residual FINN lowers (both Add inputs re-quantized)
    is not called into question."""
    from qonnx.transformation.quantize_graph import QuantizeGraph
    from qonnx.util.cleanup import cleanup_model

    from a2q_passes.finn_refusals import explain_streamline_failure
    from tests.ort_models import residual_depthwise

    residual_depthwise(tmp_path / "float.onnx")
    positions = [(("input", 0), (0.05, 0, 8, 0, 1, "ROUND")), (("input", 1), (0.02, 0, 8, 1, 1, "ROUND"))]
    quantized = cleanup_model(ModelWrapper(str(tmp_path / "float.onnx"))).transform(
        QuantizeGraph({"op_type": {"Conv": positions}}))
    quantized.save(str(tmp_path / "residual.onnx"))
    before = (tmp_path / "residual.onnx").read_bytes()
    code, out = run_cli("lower", tmp_path / "residual.onnx", tmp_path / "hw.onnx")
    text = " ".join(out.split())
    assert code == 1 and "FINN transformation step_streamline/" in text, text
    add = next(n for n in quantized.graph.node if n.op_type == "Add")
    conv, relu = (quantized.find_producer(t) for t in add.input)
    assert f"Add '{add.name}' adds '{add.input[0]}' (from Conv '{conv.name}') and '{add.input[1]}' (from Relu " \
           f"'{relu.name}')" in text, text
    assert "QuantIdentity on each branch" in text
    assert not (tmp_path / "hw.onnx").exists() and (tmp_path / "residual.onnx").read_bytes() == before
    _, cnn_model, _ = cnn
    assert explain_streamline_failure(cnn_model) == ""


def test_the_streamline_hint_follows_a_float_graph_input_through_ops_that_move_values():
    """An Add whose operand is a float graph input reshaped on the way is named with that input, as one that reads
    the input directly is; a quantized input reshaped the same way is not named."""
    from onnx import TensorProto, helper
    from qonnx.util.basic import qonnx_make_model

    from a2q_passes.finn_refusals import explain_streamline_failure

    def model_with(input_type: DataType) -> ModelWrapper:
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["x_flat"], name="Reshape_0"),
                 helper.make_node("Relu", ["y"], ["y_relu"], name="Relu_0"),
                 helper.make_node("Add", ["x_flat", "y_relu"], ["out"], name="Add_0")]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [1, 2, 2]),
                                                                                          ("y", [1, 4]))],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])])
        model = ModelWrapper(qonnx_make_model(graph))
        model.set_tensor_datatype("x", input_type)
        return model

    text = explain_streamline_failure(model_with(DataType["FLOAT32"]))
    assert "Add 'Add_0' adds the float graph input 'x' (through 'x_flat') and 'y_relu' (from Relu 'Relu_0')" in text
    assert "'x'" not in explain_streamline_failure(model_with(DataType["UINT4"]))


def test_cli_bad_inputs_write_nothing(tmp_path, mlp):
    _, _, _, folder = mlp
    src = folder / "mlp.onnx"
    out = tmp_path / "out.onnx"
    export_float_onnx(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (16,), tmp_path / "float.onnx")
    cases = [
        (("lower", tmp_path / "float.onnx", out), "no quantized MAC layer"),
        (("lower", src, out, "--fpgapart", "xc-not-a-part"), "unknown FPGA part 'xc-not-a-part'"),
        (("lower", src, out, "--acc-bits", 6), "MVAU_0: accumulator range"),
        (("lower", src, out, "--from-annotations"), "records no accumulator widths"),
        (("lower", src, out, "--plot", tmp_path / "p.png"), "--plot draws the resource report"),
        (("lower", src, src), "output path equals the input path"),
        (("lower", tmp_path / "missing.onnx", out), "no such file"),
        (("report", src, "--fpgapart", "nope"), "unknown FPGA part 'nope'"),
    ]
    for args, message in cases:
        code, text = run_cli(*args)
        assert code == 1 and message in text, (args, text)
        assert not out.exists() and not (tmp_path / "p.png").exists()


def test_cli_lower_report_and_verify_against(tmp_path, mlp):
    net, _, projected, folder = mlp
    src, hw_path = folder / "mlp_p9.onnx", tmp_path / "mlp_hw.onnx"
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(5).normal(size=(5, 16)).astype(np.float32))
    code, text = run_cli("lower", src, hw_path, "--fpgapart", "Pynq-Z1", "--json", "--report-json",
                         tmp_path / "lower.json", "--plot", tmp_path / "res.png", "--data", tmp_path / "x.npz")
    assert code == 0, text
    payload = json.loads((tmp_path / "lower.json").read_text())
    assert json.loads(text[text.index("{"):]) == payload
    assert payload["targets"] == "model metadata" and payload["equivalence"]["within_tolerance"]
    assert payload["equivalence"]["samples"] == 5
    hw = load_model(hw_path)  # the written graph passes onnx.checker and a2q's loader
    acc = {n.name: getCustomOp(n).get_nodeattr("accDataType") for n in iterate_mac_nodes(hw)}
    assert all(DataType[dt].bitwidth() <= 9 for dt in acc.values())
    assert {layer["node"]: layer["target"]["acc_dtype"] for layer in payload["resources"]["layers"]} == acc
    assert (tmp_path / "res.png").read_bytes()[:4] == b"\x89PNG"
    # report on the HW graph and on the QONNX model (lowered first): same layers, same widths
    code, text = run_cli("report", hw_path, "--fpgapart", "Pynq-Z1", "--json")
    assert code == 0, text
    from_hw = json.loads(text)
    code, text = run_cli("report", src, "--fpgapart", "xc7z020clg400-1", "--json", "--plot", tmp_path / "r.png")
    assert code == 0, text
    from_qonnx = json.loads(text)
    assert from_hw["totals"] == from_qonnx["totals"] == payload["resources"]["totals"]
    assert from_hw["totals"]["int32"]["acc_register_bits"] == 2 * 32  # PE = 1 in both layers
    assert from_hw["totals"]["target"]["acc_register_bits"] == sum(DataType[dt].bitwidth() for dt in acc.values())
    # verify: the projected QONNX model (recorded widths) and the lowered graph against it
    code, text = run_cli("verify", src)
    assert code == 0, text
    code, text = run_cli("verify", hw_path, "--against", src)
    assert code == 0 and "equivalent" in text, text
    # the lowered projected graph is not the unprojected model: a real CLI run, exit 3, stage named
    result = run_a2q("verify", hw_path, "--against", folder / "mlp.onnx", "--json")
    assert result.returncode == 3, result.stderr
    equivalence = json.loads(result.stdout)["equivalence"]
    assert not equivalence["within_tolerance"] and equivalence["max_abs_diff"] > 1e-3
    assert equivalence["introduced_by"][-1]["stage"].startswith("after_lowering")
    assert "does not compute what" in result.stderr


def test_committed_residual_model_lowers_within_target(tmp_path):
    """models/digits_resdw_w4a4.onnx (conv, max-pool, depthwise, residual add) projected to 2 bits below its widest layer."""
    from models.data import load_dataset

    model = load_model(MODELS / "digits_resdw_w4a4.onnx")
    widest = max(r["acc_bits"] for r in recorded_accumulators(model.transform(AnnotateAccumulators())).values())
    target = widest - 2
    projected = model.transform(ProjectToAccumulator(target))
    lowering = LowerToFINN()
    hw = projected.transform(lowering)
    assert {n.op_type for n in iterate_mac_nodes(hw)} == {"MVAU", "VVAU"}
    assert lowering.lowering.blocking == []
    for node in iterate_mac_nodes(hw):
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(hw, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= target
    # raw digits pixels are k/16; 0.5 lies within a float32 step of the boundary between two input
    # codes, which FINN's float32 thresholds alone put on the wrong side (finn_input_thresholds.exact_input_thresholds)
    images, _ = load_dataset("digits", "test")
    result = check_equivalence(projected, hw, images[:8].astype(np.float32))
    assert result["within_tolerance"] and result["top1_agreement"] == 1.0



class Conv1dNet(nn.Module):
    """Brevitas' QuantConv1d (with BatchNorm1d, a strided one, a depthwise one), MaxPool1d and a QuantLinear on
    ``[C, L]`` inputs: a 1-D model as FINN's 1-D examples build them. ``head="conv"``: a QuantConv1d instead of the
    QuantLinear, so the output is ``[N, C, L]`` too."""

    input_shape = (4, 16)

    def __init__(self, head: str = "linear") -> None:
        super().__init__()
        self.head = head
        weights = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4)
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv1d(4, 8, 3, padding=1, bias=False, **weights)
        self.bn1, self.relu1 = nn.BatchNorm1d(8), qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv1d(8, 8, 3, stride=2, padding=1, bias=True, **weights)
        self.relu2 = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.dw = qnn.QuantConv1d(8, 8, 3, padding=1, groups=8, bias=False, **weights)
        self.relu3, self.pool = qnn.QuantReLU(bit_width=4, return_quant_tensor=True), nn.MaxPool1d(2)
        self.fc = _linear(8 * 4, 5) if head == "linear" else qnn.QuantConv1d(8, 3, 3, padding=1, bias=True, **weights)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.inp(x))))
        x = self.pool(self.relu3(self.dw(self.relu2(self.conv2(x)))))
        return self.fc(x.flatten(1) if self.head == "linear" else x)


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_a_1d_model_lowers_through_finns_1d_step_within_its_projected_widths(tmp_path, head):
    """FINN lowers 1-D convolutions once its 1-D step (qonnx's Change3DTo4DTensors) has made every ``[N, C, L]``
    tensor ``[N, C, L, 1]``; `lower` runs that step, so a Brevitas 1-D model projected to P lowers to MVAUs and a
    VVAU whose accumulators hold every reachable value within P, and the lowered graph, fed ``[N, C, L, 1]``,
    computes what the QONNX model computes (qonnx's executor on both). Before, `lower` refused it (2-D only)."""
    torch.manual_seed(0)
    net = Conv1dNet(head)
    export_net(net, tmp_path / "conv1d.onnx")
    widest = max(r["acc_bits"] for r in recorded_accumulators(
        load_model(tmp_path / "conv1d.onnx").transform(AnnotateAccumulators())).values())
    target = widest - 2
    assert run_cli("project", tmp_path / "conv1d.onnx", tmp_path / "p.onnx", "--acc-bits", target)[0] == 0
    code, out = run_cli("lower", tmp_path / "p.onnx", tmp_path / "hw.onnx")
    assert code == 0 and "equivalent" in out, out
    hw, projected = load_model(tmp_path / "hw.onnx"), load_model(tmp_path / "p.onnx")
    nodes = list(iterate_mac_nodes(hw))
    assert sorted(n.op_type for n in nodes) == ["MVAU", "MVAU", "MVAU", "VVAU"]
    for node in nodes:
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(hw, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= target, (node.name, adt.name, lo, hi)
    x = np.random.default_rng(3).normal(size=(4, *net.input_shape)).astype(np.float32)
    assert hw.get_tensor_shape(hw.graph.input[0].name) == [1, 4, 16, 1]
    for sample in x:
        want = execute_onnx(projected, {projected.graph.input[0].name: sample[None]})[projected.graph.output[0].name]
        got = execute_onnx(hw, {hw.graph.input[0].name: sample[None, :, :, None]})[hw.graph.output[0].name]
        got = got[..., 0] if head == "conv" else got  # [N, C, L, 1], as FINN's 1-D flow leaves it
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max())), (got, want)
    assert run_cli("verify", tmp_path / "hw.onnx")[0] == 0


class SequenceMLP(nn.Module):
    """Two QuantLinear layers on ``[N, T, C]`` activations, as a sequence model applies them."""

    input_shape = (5, 16)

    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.fc1, self.fc2 = _linear(16, 8), _linear(8, 4)
        self.relu = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.inp(x))))


def test_a_lowering_finns_execution_rejects_is_refused_naming_the_3d_layers(tmp_path):
    """FINN lowers linear layers on [N, T, C] activations into HW layers of 3-D tensors that its own execution rejects
    ("Threshold shape incorrect"), so the lowering cannot be checked: `lower` writes nothing and says which HW layers
    take 3-D tensors and what to lower instead, where it said to check that the model executes with qonnx (it
    does)."""
    torch.manual_seed(0)
    export_net(SequenceMLP(), tmp_path / "seq.onnx")
    before = (tmp_path / "seq.onnx").read_bytes()
    code, out = run_cli("lower", tmp_path / "seq.onnx", tmp_path / "hw.onnx")
    text = " ".join(out.split())
    assert code == 1 and "FINN's HW layers here take 3-D tensors" in text and "MVAU_0 [1, 5, 16]" in text, text
    assert "fold the sequence axis into the batch" in text and "check that the model executes" not in text
    assert not (tmp_path / "hw.onnx").exists() and (tmp_path / "seq.onnx").read_bytes() == before


def test_an_execution_failure_names_the_node_and_the_callers_diagnosis():
    """qonnx's executor raises the kernel's own error, which does not always name the node (FINN's GlobalAccPool:
    "cannot reshape array of size 12 into shape (1,8,1,1)"): the error names the node qonnx was executing, and the
    fix the caller knows (for the lowered graph: the QONNX model executed on the same inputs), where no more
    specific diagnosis applies."""
    from onnx import TensorProto, helper, numpy_helper

    from a2q_passes.finn_execution import ExecutionError, execute_batch

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="fine"),
                               helper.make_node("Reshape", ["r", "shape"], ["y"], name="misshaped")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
                              [numpy_helper.from_array(np.array([3, 3], np.int64), "shape")],
                              value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])])
    model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(ExecutionError) as raised:
        execute_batch(model, np.zeros((2, 4), np.float32), "lowered FINN graph", hint="the caller's diagnosis")
    message = str(raised.value)
    assert "failed at node 'misshaped' (Reshape) on input sample 0" in message, message
    assert message.endswith("Fix: the caller's diagnosis"), message


@pytest.mark.parametrize("scale_axis", [0, 1])
def test_a_weight_scale_along_the_summed_axis_is_refused_by_name(scale_axis, tmp_path):
    """A MatMul whose weight Quant has one scale per row of its [K, N] weights varies along the axis it sums over: no
    MVAU computes it, and FINN moved the scale behind the layer as a Mul that broadcast [1, N] to [N, N] ("Shape
    broadcast mismatch" deep in step_convert_to_hw; found by the fuzzer). `lower` names the layer and writes nothing,
    and so does the FINN build step in front of FINN's conversion; the same layer with one scale per output column
    (axis 1) lowers."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.util.basic import qonnx_make_model

    from a2q_passes.finn_steps import step_a2q_finn_preparation

    rng = np.random.default_rng(scale_axis)
    weights = rng.integers(-3, 4, size=(6, 4)).astype(np.float32)
    scale = (0.1 * (1 + np.arange(weights.shape[scale_axis]))).astype(np.float32)
    scale = scale.reshape(-1, 1) if scale_axis == 0 else scale.reshape(1, -1)
    qonnx = "qonnx.custom_op.general"
    nodes = [helper.make_node("Quant", ["x", "s", "zero", "bits"], ["xq"], domain=qonnx, signed=0, narrow=0,
                              rounding_mode="ROUND", name="act_quant"),
             helper.make_node("Quant", ["w", "ws", "zero", "bits"], ["wq"], domain=qonnx, signed=1, narrow=0,
                              rounding_mode="ROUND", name="weight_quant"),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(v, n) for v, n in ((weights * scale, "w"), (scale, "ws"), (np.float32(0.5), "s"),
                                                        (np.float32(0), "zero"), (np.float32(4), "bits"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    path, out = tmp_path / "along.onnx", tmp_path / "hw.onnx"
    ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                        helper.make_opsetid(qonnx, 1)])).save(str(path))
    result = run_a2q("lower", str(path), str(out))
    text = " ".join((result.stdout + result.stderr).split())
    if scale_axis == 1:
        assert result.returncode == 0 and out.is_file(), text[-1500:]
        step_a2q_finn_preparation(ModelWrapper(str(path)), None)
        return
    assert result.returncode == 1 and "'mm' varies along an axis the layer sums over" in text, text[-1500:]
    assert not out.exists()
    with pytest.raises(LoweringError, match="'mm' varies along an axis the layer sums over"):
        step_a2q_finn_preparation(ModelWrapper(str(path)), None)


def test_an_mvau_whose_input_datatype_disagrees_with_its_input_is_neither_read_nor_certified(mlp):
    """FINN's InferDataTypes sets an MVAU's inputDataType to its input tensor's datatype: a node whose attribute says
    less than the tensor it reads (here UINT2 behind a 4-bit Thresholding) has no certain input range. Executed, its
    accumulators leave the range the attribute alone gives, so reading it would promise a width that overflows."""
    from a2q_passes.certificate import CannotCertify, certify_layer

    _, _, projected, _ = mlp
    hw = projected.transform(LowerToFINN())
    node = next(n for n in iterate_mac_nodes(hw) if hw.find_producer(n.input[0]) is not None
                and hw.find_producer(n.input[0]).op_type.startswith("Thresholding"))
    annotated = hw.get_tensor_datatype(node.input[0])
    assert annotated.is_integer() and annotated.max() > 3
    getCustomOp(node).set_nodeattr("inputDataType", "UINT2")

    # premise: the inputs the graph executes (its Thresholding's codes) times the weights leave the UINT2 range
    rng = np.random.default_rng(0)
    name, shape = hw.graph.input[0].name, hw.get_tensor_shape(hw.graph.input[0].name)
    rows = _mac_rows(hw, node)
    claimed = _brute_force_range(rows, 0, 3)
    inputs = np.concatenate([execute_onnx(hw, {name: rng.uniform(-4, 4, size=shape).astype(np.float32)},
                                          return_full_exec_context=True)[node.input[0]].reshape(-1, rows.shape[1])
                             for _ in range(16)])
    accumulators = inputs.astype(np.int64) @ rows.T
    assert inputs.max() > 3 and (accumulators.min() < claimed[0] or accumulators.max() > claimed[1])

    layer = next(layer for layer in find_mac_layers(hw) if layer.node == node.name)
    assert layer.status.startswith("unsupported") and "UINT2" in layer.status and annotated.name in layer.status
    with pytest.raises(CannotCertify, match=annotated.name):
        certify_layer(hw, node.name)
    report = verify_model(hw)
    assert not report.overflow_impossible and node.name in {v.node for v in report.blocking}
