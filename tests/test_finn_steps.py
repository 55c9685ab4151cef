"""The a2q build steps inside FINN's real ``build_dataflow_cfg`` (estimate-only flow) and on their own.

Expected widths come from brute-force worst-case sums of the final MVAU weights and from the
widths the layers were projected to; the layer -> MVAU correspondence from graph order.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from a2q_passes.analysis import analyze_model
from a2q_passes.errors import A2QError, PostconditionError
from a2q_passes.finn_accumulators import iterate_mac_nodes
from a2q_passes.finn_flow import lower_to_finn_hw
from a2q_passes.finn_runtime import ESTIMATE_REPORT_FILES, estimate_only_steps, run_estimate_build
from a2q_passes.finn_steps import (REPORT_FILE, make_a2q_steps, step_a2q_project, step_a2q_set_accumulators,
                                   step_a2q_verify, with_a2q_steps)
from a2q_passes.metadata import recorded_accumulators
from a2q_passes.model_io import load_model
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.test_finn_flow import MLP, _brute_force_range, _mac_rows, export_net, random_inputs

torch.set_num_threads(1)
PART = "xczu3eg-sbva484-1-e"
MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS_CNN = MODELS / "digits_cnn_w4a4.onnx"  # conv, pool, conv, pool, fc
QONNX_LAYERS = ["Conv_0", "Conv_1", "Gemm_0"]


def _step_names(steps) -> list[str]:
    return [s if isinstance(s, str) else s.__name__ for s in steps]


def _check_final_model(final: ModelWrapper, targets: dict[str, int]) -> None:
    """Every MVAU holds the brute-force range of its weights, within the target of the layer it came from."""
    nodes = list(iterate_mac_nodes(final))
    assert [n.op_type.split("_")[0] for n in nodes] == ["MVAU"] * 3
    record = recorded_accumulators(final)
    assert [record[n.name]["qonnx_node"] for n in nodes] == QONNX_LAYERS  # graph order is kept in this net
    for node in nodes:
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(final, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max()
        assert adt.bitwidth() <= targets[record[node.name]["qonnx_node"]]


def test_estimate_build_with_a2q_steps(tmp_path):
    steps = with_a2q_steps(acc_bits=12)
    result = run_estimate_build(DIGITS_CNN, tmp_path / "build", PART, steps=steps)
    assert result.steps_completed == _step_names(steps)
    report_dir = tmp_path / "build" / "report"
    for name in ESTIMATE_REPORT_FILES:
        assert (report_dir / name).is_file()
    layers = result.reports["estimate_layer_resources.json"]
    assert sum(key.startswith("MVAU") for key in layers) == 3 and layers["total"]["LUT"] > 0
    final = ModelWrapper(str(result.final_model))
    _check_final_model(final, dict.fromkeys(QONNX_LAYERS, 12))
    # before projection the convs needed 15 and 14 bits (see `a2q analyze`); FINN would have kept them
    assert [r.bounds["exact"] for r in analyze_model(load_model(DIGITS_CNN)).layers] == [15, 14, 11]
    a2q_report = json.loads((report_dir / REPORT_FILE).read_text())
    assert a2q_report["overflow_impossible"] and {v["node"] for v in a2q_report["layers"]} == \
        {n.name for n in iterate_mac_nodes(final)}
    # the project step's output is what ProjectToAccumulator gives on its own
    projected = load_model(tmp_path / "build" / "intermediate_models" / "step_a2q_project.onnx")
    alone = load_model(DIGITS_CNN).transform(ProjectToAccumulator(12))
    assert {i.name: i.raw_data for i in projected.graph.initializer} == {i.name: i.raw_data for i in alone.graph.initializer}


def test_estimate_build_of_a_brevitas_graph_ptq_model(tmp_path):
    """Brevitas' graph-mode PTQ puts a signed Quant after each ReLU, which FINN's step_qonnx_to_finn refuses ("FINN
    only supports unsigned and non-narrow Quant nodes for Relu activations"); step_a2q_finn_preparation rewrites it
    into the equal unsigned Quant first, and the whole FINN build runs."""
    from tests.brevitas_graph_ptq import GraphPtqSpec, export_graph_ptq

    path = export_graph_ptq(tmp_path, GraphPtqSpec("mlp", "fx", 4, 4))
    steps = with_a2q_steps(acc_bits=12)
    result = run_estimate_build(path, tmp_path / "build", PART, steps=steps)
    assert result.steps_completed == _step_names(steps)
    final = ModelWrapper(str(result.final_model))
    nodes = list(iterate_mac_nodes(final))
    assert len(nodes) == 3 and all(DataType[getCustomOp(n).get_nodeattr("accDataType")].bitwidth() <= 12 for n in nodes)
    for node in nodes:  # every accDataType holds the brute-force range of its weights over its input type
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(final, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max()
    assert json.loads((tmp_path / "build" / "report" / REPORT_FILE).read_text())["overflow_impossible"]


def test_preparation_step_refuses_quantizers_finn_cannot_convert_by_name(tmp_path):
    """The build step refuses what `a2q lower` refuses, before FINN's conversion: onnxruntime's QDQ file with int4
    weights (Q/DQ nodes qonnx's QCDQToQuant leaves) by its Q/DQ nodes. QDQ files it converts whole (their stored
    integer weights and biases given their QuantizeLinear first) whose int8 or uint8 activations have zero points
    get those as thresholds, INT9 ones: with FINN's default requant_bitwidth_threshold (9) the step names the setting
    that keeps them Thresholding layers, and with it the thresholds are there; a QONNX model passes, and the same
    model with a batch of 4 images is refused by name (FINN's sliding windows take one image)."""
    from a2q_passes.errors import A2QError
    from a2q_passes.finn_flow import LoweringError
    from a2q_passes.finn_steps import step_a2q_finn_preparation
    from tests.ort_models import conv_gemm_matmul, matmul_conv, quantize

    float_path, path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    quantize(float_path, path, matmul_conv(float_path), "QDQ", "QInt4", act="QInt8", per_channel=True)
    with pytest.raises(LoweringError, match=r"DequantizeLinear/QuantizeLinear nodes \('W1_DequantizeLinear'"):
        step_a2q_finn_preparation(load_model(path), None)
    quantize(float_path, path, conv_gemm_matmul(float_path), "QDQ", "QInt8", act="QInt8", per_channel=True)
    for qdq in (path, MODELS / "digits_cnn_qdq.onnx"):
        with pytest.raises(A2QError, match="requant_bitwidth_threshold=10"):
            step_a2q_finn_preparation(load_model(qdq), None)
        prepared = step_a2q_finn_preparation(load_model(qdq), SimpleNamespace(requant_bitwidth_threshold=10))
        assert "MultiThreshold" in {n.op_type for n in prepared.graph.node}
    prepared = step_a2q_finn_preparation(load_model(DIGITS_CNN), None)
    assert [n.op_type for n in prepared.graph.node].count("Quant") > 0
    batched = load_model(DIGITS_CNN)  # FINN's sliding windows take one image at a time: named, as `lower` does
    batched.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    batched.graph.value_info.clear()
    with pytest.raises(LoweringError, match=r"one image at a time; Conv 'Conv_0' \(batch 4\)"):
        step_a2q_finn_preparation(batched, None)


def test_plain_steps_use_the_widths_recorded_per_layer(tmp_path):
    """No width in the config: each MVAU gets the width `a2q project` recorded for its own layer."""
    widths = {"Conv_0": 13, "Conv_1": 12, "Gemm_0": 10}
    path = tmp_path / "projected.onnx"
    load_model(DIGITS_CNN).transform(ProjectToAccumulator(layer_bits=widths)).save(str(path))
    result = run_estimate_build(path, tmp_path / "build", PART, steps=with_a2q_steps())
    final = ModelWrapper(str(result.final_model))
    _check_final_model(final, widths)
    record = recorded_accumulators(final)
    assert {entry["qonnx_node"]: entry["target_bits"] for entry in record.values()} == widths


def test_steps_read_the_config_attributes():
    model = load_model(DIGITS_CNN)
    projected = step_a2q_project(model, SimpleNamespace(a2q_acc_bits=11, a2q_method="a2q"))
    assert all(r.bounds["exact"] <= 11 for r in analyze_model(projected).layers)
    assert {info["method"] for info in recorded_accumulators(projected).values()} == {"a2q"}
    with pytest.raises(A2QError, match="no accumulator width. Set cfg.a2q_acc_bits"):
        step_a2q_project(model, SimpleNamespace())


@pytest.fixture(scope="module")
def mlp_hw(tmp_path_factory):
    torch.manual_seed(0)
    model = export_net(MLP(), tmp_path_factory.mktemp("mlp") / "mlp.onnx")
    projected = model.transform(ProjectToAccumulator(9))  # records widths, but no weight signatures
    return lower_to_finn_hw(projected)[0]


def test_set_accumulators_and_verify_on_their_own(mlp_hw, tmp_path):
    with pytest.raises(A2QError, match="no weight signatures"):
        step_a2q_set_accumulators(mlp_hw, SimpleNamespace())
    cfg = SimpleNamespace(a2q_acc_bits=10, output_dir=str(tmp_path))
    hw = step_a2q_set_accumulators(mlp_hw, cfg)
    assert all(DataType[getCustomOp(n).get_nodeattr("accDataType")].bitwidth() <= 9 for n in iterate_mac_nodes(hw))
    assert step_a2q_verify(hw, cfg) is hw
    assert json.loads((tmp_path / "report" / REPORT_FILE).read_text())["overflow_impossible"]
    with pytest.raises(A2QError, match="MVAU_0: .* wider than the target 8 bits"):
        make_a2q_steps(acc_bits=8)[1](mlp_hw, SimpleNamespace())
    # an accumulator one bit too narrow is caught by the verify step
    broken = ModelWrapper(hw.model.SerializeToString())
    node = next(iterate_mac_nodes(broken))
    adt = DataType[getCustomOp(node).get_nodeattr("accDataType")]
    getCustomOp(node).set_nodeattr("accDataType", adt.name.replace(str(adt.bitwidth()), str(adt.bitwidth() - 1)))
    with pytest.raises(PostconditionError, match=f"{node.name}: accDataType .* cannot hold the exact accumulator range"):
        step_a2q_verify(broken, SimpleNamespace())


def test_step_placement():
    finn_steps = estimate_only_steps()
    names = _step_names(with_a2q_steps(finn_steps))
    assert names[:3] == ["step_a2q_project", "step_a2q_finn_preparation", "step_qonnx_to_finn"]
    assert names[names.index("step_convert_to_hw") + 1] == "step_a2q_round_ties"
    assert names[names.index("step_streamline") - 2:names.index("step_streamline")] == [
        "step_a2q_clips_into_thresholds", "step_a2q_depthwise_scales"]
    assert names[names.index("step_convert_to_hw") - 3:names.index("step_convert_to_hw")] == [
        "step_a2q_conv_transposes", "step_a2q_global_pools", "step_a2q_upsampling"]
    at = names.index("step_a2q_set_accumulators")
    assert names[at - 1] == "step_minimize_bit_width" and names[at + 1] == "step_a2q_verify"
    assert [n for n in names if not n.startswith("step_a2q")] == finn_steps
    short = ["step_qonnx_to_finn", "step_tidy_up", "step_streamline", "step_convert_to_hw", "step_hw_codegen"]
    assert _step_names(with_a2q_steps(short, acc_bits=10)) == [
        "step_a2q_project", "step_a2q_finn_preparation", "step_qonnx_to_finn", "step_tidy_up",
        "step_a2q_clips_into_thresholds", "step_a2q_depthwise_scales", "step_streamline",
        "step_a2q_conv_transposes", "step_a2q_global_pools", "step_a2q_upsampling", "step_convert_to_hw",
        "step_a2q_round_ties",
        "step_a2q_set_accumulators", "step_a2q_verify", "step_hw_codegen"]
    with pytest.raises(A2QError, match="needs step_qonnx_to_finn and step_convert_to_hw"):
        with_a2q_steps(["step_tidy_up"])


@pytest.mark.parametrize("exporter", ["qonnx", "qcdq_ts"])
def test_estimate_build_of_brevitas_mobilenet_with_per_channel_depthwise_inputs(exporter, tmp_path):
    """Brevitas' MobileNet-v1 class (small) quantizes each depthwise Conv's input with one scale per channel, a Mul
    in front of the Conv after FINN's conversion. FINN's plain step_streamline lowers the Conv first and the Mul
    stopped the dataflow partition ("Unsupported/unmapped layer(s)"); step_a2q_depthwise_scales moves it behind the
    depthwise Conv first, as finn-examples' MobileNet build and `a2q lower` do. The whole build runs, and every
    MVAU/VVAU holds the brute-force range of its weights over its input type within 16 bits."""
    import warnings

    from tests.brevitas_example_models import EXAMPLES, export_example

    spec = next(e for e in EXAMPLES if e.family == "mobilenet_v1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_example(tmp_path, spec, exporter)
    model = ModelWrapper(str(path))
    model.set_tensor_datatype(model.graph.input[0].name, DataType[spec.input_dtype])  # the image's declared type
    model.save(str(path))
    steps = with_a2q_steps(acc_bits=16)
    result = run_estimate_build(path, tmp_path / "build", PART, steps=steps)
    assert result.steps_completed == _step_names(steps)
    final = ModelWrapper(str(result.final_model))
    nodes = list(iterate_mac_nodes(final))
    assert sum(n.op_type.startswith("VVAU") for n in nodes) >= 3 and len(nodes) >= 8
    for node in nodes:
        inst = getCustomOp(node)
        adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(final, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= 16


class UpsamplingCNN(torch.nn.Module):
    """conv -> max-pool -> nn.Upsample(2, nearest) -> conv -> fc: the Resize between two quantized convolutions."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        from tests.test_finn_flow import _conv, _input_quant, _linear, _relu

        self.inp, self.conv1, self.relu1 = _input_quant(), _conv(3, 4, 3, padding=1), _relu()
        self.pool, self.up = torch.nn.MaxPool2d(2), torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.conv2, self.relu2, self.fc = _conv(4, 4, 1), _relu(), _linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = self.up(self.pool(self.relu1(self.conv1(self.inp(x)))))
        return self.fc(torch.flatten(self.relu2(self.conv2(x)), 1))


def test_nearest_upsampling_lowers_to_finns_upsampling_layer(tmp_path):
    """FINN's builder left a Brevitas net's ``nn.Upsample`` (a Resize between transposes after streamlining) a float
    node, which `lower` reported as not lowered and the dataflow partition refused; the flow and the build step
    step_a2q_upsampling make it FINN's UpsampleNearestNeighbour. The lowered model computes the QONNX model's
    outputs, and the whole estimate build runs."""
    from a2q_passes.finn_execution import compare_execution

    path = tmp_path / "upsampling.onnx"
    torch.manual_seed(0)
    net = UpsamplingCNN()
    model = export_net(net, path)
    assert model.get_nodes_by_op_type("Resize")
    hw, report = lower_to_finn_hw(model)
    assert [n.op_type for n in hw.graph.node if n.op_type.startswith("Upsample")] == ["UpsampleNearestNeighbour"]
    assert not [n for n in hw.graph.node if n.op_type in ("Resize", "Upsample")]
    assert compare_execution(model, hw, random_inputs(net, 4), attribute=False)["within_tolerance"]
    steps = with_a2q_steps(acc_bits=14)
    result = run_estimate_build(path, tmp_path / "build", PART, steps=steps)
    assert result.steps_completed == _step_names(steps)
    final = ModelWrapper(str(result.final_model))
    assert any(n.op_type.startswith("UpsampleNearestNeighbour") for n in final.graph.node)
    assert len(list(iterate_mac_nodes(final))) == 3
