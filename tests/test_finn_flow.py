"""Lowering Brevitas exports to FINN HW layers: structure, numpy execution, attribution, accumulator types.

The networks are built and exported here (tiny, seeded); expected values come from Brevitas
modules, brute-force evaluation of worst-case inputs, FINN's own builder steps and execution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import pytest
import torch
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from torch import nn

from a2q_passes import bounds
from a2q_passes.errors import A2QError
from a2q_passes.finn_accumulators import hw_accumulator_ranges, iterate_mac_nodes, set_accumulator_datatypes
from a2q_passes.finn_execution import compare_execution
from a2q_passes.finn_flow import LoweringError, lower_to_finn_hw
from a2q_passes.finn_runtime import ensure_finn_importable, run_estimate_build
from models.export import export_qonnx_model

torch.set_num_threads(1)
ACT_BITS = 4


def _relu() -> nn.Module:
    return qnn.QuantReLU(bit_width=ACT_BITS, return_quant_tensor=True)


def _conv(cin: int, cout: int, k: int, **kw) -> nn.Module:
    return qnn.QuantConv2d(cin, cout, k, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4, bias=True, **kw)


def _linear(cin: int, cout: int) -> nn.Module:
    return qnn.QuantLinear(cin, cout, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4, bias=True)


def _input_quant() -> nn.Module:
    return qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=ACT_BITS, return_quant_tensor=True)


class ResidualCNN(nn.Module):
    """conv -> max-pool -> [depthwise 3x3 -> pointwise 1x1] + skip -> conv 4x4 -> fc on 8x8 inputs.

    ``add_quant`` re-quantizes both Add inputs with one scale (the FINN-friendly residual pattern).
    """

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.inp = _input_quant()
        self.conv1, self.relu1, self.pool = _conv(1, 8, 3, padding=1), _relu(), nn.MaxPool2d(2)
        self.dw, self.relu_dw = _conv(8, 8, 3, padding=1, groups=8), _relu()
        self.pw = _conv(8, 8, 1)
        self.add_quant, self.relu_add = _relu(), _relu()
        self.conv3, self.relu3 = _conv(8, 16, 4), _relu()
        self.fc = _linear(16, 10)

    def forward(self, x):
        skip = self.pool(self.relu1(self.conv1(self.inp(x))))
        branch = self.pw(self.relu_dw(self.dw(skip)))
        x = self.relu_add(self.add_quant(skip) + self.add_quant(branch))
        return self.fc(torch.flatten(self.relu3(self.conv3(x)), 1))

    def thresholded_convs(self) -> list[nn.Module]:
        """MAC layers followed by a QuantReLU (FINN absorbs it as thresholds into the MVAU/VVAU).

        ``pw`` counts: its output is re-quantized by ``add_quant`` before the Add.
        """
        return [self.conv1, self.dw, self.pw, self.conv3]


class MLP(nn.Module):
    input_shape = (16,)

    def __init__(self, quantized_input: bool = True) -> None:
        super().__init__()
        self.inp = _input_quant() if quantized_input else nn.Identity()
        self.fc1, self.relu1, self.fc2 = _linear(16, 12), _relu(), _linear(12, 10)

    def forward(self, x):
        return self.fc2(self.relu1(self.fc1(self.inp(x))))


def export_net(net: nn.Module, path: Path, seed: int = 0) -> ModelWrapper:
    """Calibrate the activation scales on seeded data, then export to cleaned-up QONNX."""
    torch.manual_seed(seed)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(16, *net.input_shape))
    net.eval()
    return export_qonnx_model(net, net.input_shape, path)


def random_inputs(net: nn.Module, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *net.input_shape)).astype(np.float32)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    net = ResidualCNN()
    model = export_net(net, tmp_path_factory.mktemp("cnn") / "cnn.onnx")
    hw, report = lower_to_finn_hw(model)
    return net, model, hw, report


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    net = MLP()
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    model = export_net(net, path)
    return net, model, path


def _brute_force_range(rows: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Evaluate each channel's worst-case input vectors (x = hi where q > 0 else lo, and the mirror)."""
    tops = [int(np.where(q > 0, hi, lo) @ q) for q in rows]
    bottoms = [int(np.where(q > 0, lo, hi) @ q) for q in rows]
    return min(bottoms), max(tops)


def _mac_rows(model: ModelWrapper, node) -> np.ndarray:
    w = model.get_initializer(node.input[1]).astype(np.int64)
    return w.reshape(w.shape[0], -1) if node.op_type.startswith("VVAU") else w.T


# ---------------------------------------------------------------------------------------------


def test_residual_cnn_lowers_to_mvau_and_vvau(cnn):
    net, _, hw, report = cnn
    ops = [n.op_type for n in hw.graph.node]
    assert ops.count("VVAU") == 1  # the depthwise conv
    assert ops.count("MVAU") == 4  # conv1, pointwise, conv3, fc
    assert {"ConvolutionInputGenerator", "Pool", "DuplicateStreams", "ElementwiseAdd"} <= set(ops)
    assert report.blocking == []
    assert [n.op_type for n in report.unlowered] == ["Transpose"]  # NCHW -> NHWC at the input, on the host
    # every MAC layer of the Brevitas net is there, with its channel count
    channels = sorted(getCustomOp(n).get_nodeattr("Channels" if n.op_type == "VVAU" else "MH")
                      for n in iterate_mac_nodes(hw))
    assert channels == sorted(m.out_channels if hasattr(m, "out_channels") else m.out_features
                              for m in (net.conv1, net.dw, net.pw, net.conv3, net.fc))
    # the residual rounds were needed: FINN's own streamlining stops at the fork
    assert any(s.group == "residual" and s.changed for s in report.stages)


def test_numpy_execution_matches_qonnx_and_brevitas(cnn):
    net, model, hw, _ = cnn
    n = 6
    x = random_inputs(net, n)
    result = compare_execution(model, hw, x, attribution_samples=2)
    # independent execution of both graphs, one sample at a time
    name_q, name_hw = model.graph.input[0].name, hw.graph.input[0].name
    ref = np.concatenate([execute_onnx(model, {name_q: x[i:i + 1]})[model.graph.output[0].name] for i in range(n)])
    got = np.concatenate([execute_onnx(hw, {name_hw: x[i:i + 1]})[hw.graph.output[0].name] for i in range(n)])
    assert result["max_abs_diff"] == pytest.approx(float(np.max(np.abs(ref - got))), abs=1e-12)
    assert result["within_tolerance"] and result["introduced_by"] == []
    with torch.no_grad():
        torch_out = net(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(torch_out - got)) < 1e-4 * max(1.0, np.max(np.abs(torch_out)))
    # per-stage rows cover the flow in order and end at the lowered graph's difference
    stages = [row["stage"] for row in result["stages"]]
    assert stages[0] == "conversion/step_qonnx_to_finn" and stages[-1] == "convert_to_hw/step_convert_to_hw"
    assert result["stages"][-1]["max_abs_diff_vs_original"] == pytest.approx(
        float(np.max(np.abs(ref[:2] - got[:2]))), abs=1e-12)


def test_attribution_names_the_transformation_that_changes_outputs(cnn, monkeypatch):
    """A lossy AbsorbMulIntoMultiThreshold (thresholds shifted once) must be reported as the culprit."""
    from finn.transformation.streamline.absorb import AbsorbMulIntoMultiThreshold

    net, model, hw, _ = cnn
    original_apply = AbsorbMulIntoMultiThreshold.apply
    state = {"done": False}

    def lossy_apply(self, m):
        m, changed = original_apply(self, m)
        if changed and not state["done"]:
            state["done"] = True
            node = m.get_nodes_by_op_type("MultiThreshold")[1]
            m.set_initializer(node.input[1], m.get_initializer(node.input[1]) + 3.0)
        return m, changed

    monkeypatch.setattr(AbsorbMulIntoMultiThreshold, "apply", lossy_apply)
    result = compare_execution(model, hw, random_inputs(net, 2), attribution_samples=1)
    culprits = [row["stage"] for row in result["introduced_by"]]
    assert culprits[0] == "step_streamline/AbsorbMulIntoMultiThreshold"
    assert any(label.startswith("MultiThreshold") for label in result["introduced_by"][0]["nodes_added"])
    # the given (unharmed) lowered model now differs from the replayed (harmed) flow: reported too
    assert culprits[-1].startswith("after_lowering")


def _residual_at_two_scales() -> ModelWrapper:
    """x -> Quant(0.5) -> a; a -> Conv -> Relu -> Quant(0.25) -> b; Quant(0.5)(a + b) -> Conv, as a hand-written
    file writes it: no value_info for the tensors inside (ONNX does not ask for it)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def quant(name: str, x: str, scale: float, signed: int) -> str:
        inits.extend(numpy_helper.from_array(np.float32(v), f"{name}_{k}") for k, v in
                     (("s", scale), ("z", 0), ("b", 4)))
        nodes.append(helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [name],
                                      domain="qonnx.custom_op.general", signed=signed, narrow=0, rounding_mode="ROUND"))
        return name

    for w in ("w1", "w2"):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"{w}_float"))
        quant(w, f"{w}_float", 0.25, 1)
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    quant("a", "x", 0.5, 0)
    nodes += [helper.make_node("Conv", ["a", "w1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"])]
    quant("b", "r1", 0.25, 0)
    nodes.append(helper.make_node("Add", ["a", "b"], ["sum"]))
    quant("sum_q", "sum", 0.5, 0)
    nodes.append(helper.make_node("Conv", ["sum_q", "w2"], ["y"], **conv))
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid("qonnx.custom_op.general", 1)]))


def test_attribution_executes_stages_of_a_file_without_inner_shapes():
    """A residual Add of two branches at different scales: FINN leaves the Add float and its thresholds behind it
    round ties up, while the MVAU's ties are rounded to even, so the lowered graph differs. The attribution replays
    the flow and executes every stage; on a file without value_info for its inner tensors that died at the first
    stage ("Found unspecified tensor shapes") and hid the report; now each stage is executed on a shaped copy."""
    model = _residual_at_two_scales()
    assert all(model.get_tensor_shape(name) is None for name in ("c1", "r1", "sum"))
    hw, _ = lower_to_finn_hw(model)
    inputs = (np.arange(2 * 4 * 36, dtype=np.float32).reshape(2, 4, 6, 6) % 17) * 0.25
    result = compare_execution(model, hw, inputs, attribution_samples=2)
    assert not result["within_tolerance"]
    assert result["stages"][0]["stage"].startswith("preparation/")
    assert result["introduced_by"] and all(row["max_abs_diff"] > 0 for row in result["introduced_by"])


def _canonical(m: ModelWrapper) -> list:
    """Nodes in order with attributes and constant inputs; tensor names (partly random in FINN) left out."""
    return [(n.op_type, sorted((a.name, a.SerializeToString()) for a in n.attribute),
             [None if m.get_initializer(t) is None else m.get_initializer(t).tobytes() for t in n.input])
            for n in m.graph.node]


def _finn_steps(model: ModelWrapper, *names: str) -> ModelWrapper:
    ensure_finn_importable()
    import finn.builder.build_dataflow_steps as steps
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    cfg = DataflowBuildConfig(output_dir="unused", fpga_part="xc7z020clg400-1", steps=[])
    for name in names:
        model = getattr(steps, name)(model, cfg)
    return model


def test_flow_equals_finn_builder_steps_on_a_plain_graph(mlp):
    """Without forks the decomposed streamlining must give exactly what FINN's own steps give, plus our one
    deliberate change after step_qonnx_to_finn: the input thresholds moved onto the input Quant's boundaries."""
    from a2q_passes.finn_input_thresholds import exact_input_thresholds

    _, model, _ = mlp
    hw, report = lower_to_finn_hw(model)
    converted = exact_input_thresholds(_finn_steps(model, "step_qonnx_to_finn"), model)
    finn_model = _finn_steps(converted, "step_tidy_up", "step_streamline", "step_convert_to_hw")
    assert _canonical(hw) == _canonical(finn_model)
    assert [n.op_type for n in hw.graph.node if n.op_type == "MVAU"] == ["MVAU", "MVAU"]
    assert not any(s.group == "residual" for s in report.stages)


def test_decomposed_streamline_is_finns_streamline(cnn):
    """STREAMLINE_TRANSFORMATIONS applied one by one == FINN's Streamline() (on the residual CNN)."""
    from finn.transformation.streamline import Streamline

    from a2q_passes.finn_flow import _Runner, _streamline_all

    _, model, _, _ = cnn
    tidy = _finn_steps(model, "step_qonnx_to_finn", "step_tidy_up")
    runner = _Runner(tidy, observer=None)
    assert _streamline_all(runner, "streamline")
    assert _canonical(runner.model) == _canonical(tidy.transform(Streamline()))


def test_unquantized_first_layer_is_reported_and_strict_raises(tmp_path):
    torch.manual_seed(0)
    model = export_net(MLP(quantized_input=False), tmp_path / "float_in.onnx")
    hw, report = lower_to_finn_hw(model)
    (blocking,) = report.blocking
    assert blocking.op_type == "MatMul" and "FLOAT32" in blocking.reason
    assert hw.get_node_from_name(blocking.name).op_type == "MatMul"
    assert len(report.mac_nodes) == 1  # the second layer still became an MVAU
    with pytest.raises(LoweringError, match=f"node '{blocking.name}' \\(MatMul\\)"):
        lower_to_finn_hw(model, strict=True)


def test_accumulator_datatypes_exact_minimal_and_consistent(cnn):
    from finn.transformation.fpgadataflow.minimize_accumulator_width import MinimizeAccumulatorWidth

    net, model, hw, _ = cnn
    ours = set_accumulator_datatypes(hw)
    finn = hw.transform(MinimizeAccumulatorWidth())
    last = hw.graph.node[-1].name
    for node in iterate_mac_nodes(ours):
        inst = getCustomOp(node)
        adt = DataType[inst.get_nodeattr("accDataType")]
        idt = DataType[inst.get_nodeattr("inputDataType")]
        lo, hi = _brute_force_range(_mac_rows(ours, node), int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max()  # holds every reachable accumulator value
        narrower = DataType[adt.name.replace(str(adt.bitwidth()), str(adt.bitwidth() - 1))]
        assert lo < narrower.min() or hi > narrower.max()  # and is minimal
        finn_adt = DataType[getCustomOp(finn.get_node_from_name(node.name)).get_nodeattr("accDataType")]
        assert finn_adt.bitwidth() >= adt.bitwidth()
        if node.name != last:
            assert finn_adt == adt
        if inst.get_nodeattr("noActivation"):
            assert DataType[inst.get_nodeattr("outputDataType")] == adt
            assert ours.get_tensor_datatype(node.output[0]) == adt
        else:
            thresholds = ours.get_initializer(node.input[2])
            assert np.array_equal(thresholds, np.ceil(thresholds))
            assert thresholds.min() >= adt.min() and thresholds.max() <= adt.max() + 1
    # thresholds rounded/clipped, types narrowed: execution unchanged
    result = compare_execution(model, ours, random_inputs(net, 4), attribute=False)
    assert result["within_tolerance"]
    # the project's analysis gives the same ranges as this module's glue
    from a2q_passes.analysis import analyze_model

    assert {r.node: (r.acc_min, r.acc_max) for r in analyze_model(hw).layers} == hw_accumulator_ranges(hw)


def test_accumulator_targets_and_unsafe_ranges_raise(cnn):
    _, _, hw, _ = cnn
    ranges = hw_accumulator_ranges(hw)
    name, (lo, hi) = next(iter(ranges.items()))
    need = DataType[bounds.accumulator_datatype_name(lo, hi)].bitwidth()
    with pytest.raises(A2QError, match=f"{name}: .* wider than the target {need - 1} bits"):
        set_accumulator_datatypes(hw, target_bits={name: need - 1})
    narrowed = dict(ranges, **{name: (lo, hi - 1)})
    with pytest.raises(A2QError, match=f"{name}: given accumulator range .* narrower than the exact range"):
        set_accumulator_datatypes(hw, acc_ranges=narrowed)
    wider = dict(ranges, **{name: (lo * 4, hi * 4)})  # a looser (safe) range: a wider type, still checked
    widened = set_accumulator_datatypes(hw, acc_ranges=wider, target_bits=32)
    assert getCustomOp(widened.get_node_from_name(name)).get_nodeattr("accDataType") == \
        bounds.accumulator_datatype_name(lo * 4, hi * 4)
    assert DataType[bounds.accumulator_datatype_name(lo * 4, hi * 4)].bitwidth() > need


def test_estimate_only_build_writes_reports(mlp, tmp_path):
    _, _, path = mlp
    stdout, stderr = sys.stdout, sys.stderr
    result = run_estimate_build(path, tmp_path / "build", "xc7z020clg400-1")
    assert sys.stdout is stdout and sys.stderr is stderr  # FINN's stream redirection undone
    assert result.steps_completed[-1] == "step_generate_estimate_reports"
    for name in ("estimate_layer_resources.json", "estimate_network_performance.json", "op_and_param_counts.json"):
        assert (tmp_path / "build" / "report" / name).is_file()
    layers = result.reports["estimate_layer_resources.json"]
    assert sum(key.startswith("MVAU") for key in layers) == 2 and layers["total"]["LUT"] > 0
    # FINN's own minimisation ran in the build: the final model's accumulators are no longer INT32
    final = ModelWrapper(str(result.final_model))
    assert all(getCustomOp(n).get_nodeattr("accDataType") != "INT32" for n in iterate_mac_nodes(final))


def _one_quant(scale: float, rounding_mode: str = "ROUND", width: int = 6) -> ModelWrapper:
    """x -> Quant(scale, zero point 0, 8 bits, signed) -> y, of shape (1, width)."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {"s": np.float32(scale), "z": np.float32(0), "b": np.float32(8)}
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="QuantX", domain="qonnx.custom_op.general",
                            signed=1, narrow=0, rounding_mode=rounding_mode)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    return ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                 helper.make_opsetid("qonnx.custom_op.general", 1)]))


def test_activation_ties_rounded_up_rounds_exact_ties_as_thresholds_do():
    """The rewrite used to explain FINN's differences: a tie goes up (as ``x >= threshold``), everything else rounds
    as before; compared with numpy's floor(x / s + 1/2) and, for the ties, with ROUND's half-to-even."""
    from a2q_passes.finn_execution import activation_ties_rounded_up

    model = _one_quant(0.5)
    x = np.array([[0.25, 0.75, -0.25, -0.75, 1.25, 0.3]], dtype=np.float32)
    even = execute_onnx(model, {"x": x})["y"]
    up = execute_onnx(activation_ties_rounded_up(model), {"x": x})["y"]
    assert np.array_equal(up, np.floor(x / 0.5 + 0.5) * 0.5)
    assert np.array_equal(even[0, :5], [0.0, 1.0, -0.0, -1.0, 1.0]) and np.array_equal(up[0, :5], [0.5, 1.0, 0.0, -0.5, 1.5])
    assert activation_ties_rounded_up(_one_quant(0.5, "FLOOR")) is None  # nothing rounds half to even there


def test_activation_ties_rounded_up_finds_the_ties_the_quant_itself_computes():
    """With a scale of 0.1 the ties are the values whose ``x / s`` float32 computes as half an odd integer, as the
    Quant node sees them: all go up, everything else rounds as before (numpy, float32). Before, the rewrite took the
    FLOOR of ``(x + s/2) / s``, which rounds differently and sent some of those ties down."""
    from a2q_passes.finn_execution import activation_ties_rounded_up

    s = np.float32(0.1)
    x = ((np.arange(-40, 40, dtype=np.float32) + np.float32(0.5)) * s)[None, :]
    t = x / s
    ties = t == np.floor(t) + np.float32(0.5)
    old = np.floor((x + s / np.float32(2)) / s)
    assert ties.sum() > 10 and np.any(ties & (old != np.floor(t + np.float32(0.5))))  # where the old form erred
    model = _one_quant(float(s), width=80)
    up = execute_onnx(activation_ties_rounded_up(model), {"x": x})["y"]
    assert np.array_equal(up, np.clip(np.floor(t + np.float32(0.5)), -128, 127) * s)
    even = execute_onnx(model, {"x": x})["y"]
    assert np.array_equal(up[~ties], even[~ties]) and np.all(up[ties] > even[ties] - s / 2)


def test_equivalence_says_tie_rounding_explains_a_difference_only_where_it_does():
    """compare_execution against the ties-up model: different outputs, all of it from ties (claimed); against a
    model with another scale: different outputs, not explained (not claimed)."""
    from a2q_passes.finn_execution import activation_ties_rounded_up

    model = _one_quant(0.5)
    x = np.array([[0.25, 0.75, -0.25, -0.75, 1.25, 0.3]] * 2, dtype=np.float32)
    ties = compare_execution(model, activation_ties_rounded_up(model), x, attribute=False)
    assert not ties["within_tolerance"] and ties["explained_by_tie_rounding"]
    other = compare_execution(model, _one_quant(0.25), x, attribute=False)
    assert not other["within_tolerance"] and not other["explained_by_tie_rounding"]


def test_lower_of_a_power_of_two_model_names_tie_rounding_as_the_whole_difference(tmp_path, monkeypatch):
    """Brevitas' FixedPoint quantizers (power-of-two scales) make exact ties inside the net; FINN's thresholds round
    them up where QONNX rounds to even. Where `lower` keeps FINN's thresholds (as it does for mixed rounding modes:
    simulated here, ``tests/test_tie_thresholds.py`` has the real rule) it exits 3 (the outputs differ) and says the
    difference is that alone; the report records it."""
    import json

    import a2q_passes.finn_flow as finn_flow
    from tests.brevitas_nets import NetSpec, build_corpus_net
    from tests.fuzz.properties import run_cli

    monkeypatch.setattr(finn_flow, "activation_tie_rule", lambda model: None)

    spec = NetSpec("cnn", 5, 4, signed_act=True, per_channel=False, weight_quant="Int8WeightPerTensorFixedPoint",
                   act_quant="Int8ActPerTensorFixedPoint")
    path = build_corpus_net(tmp_path, spec, "qonnx")
    report = tmp_path / "lower.json"
    result = run_cli("lower", path, tmp_path / "hw.onnx", "--report-json", report)
    assert result.code == 3 and "all of it from FINN rounding exact ties up" in result.stderr, result.stderr
    equivalence = json.loads(report.read_text())["equivalence"]
    assert equivalence["explained_by_tie_rounding"] and equivalence["ties_rounded_up_max_abs_diff"] == 0.0
