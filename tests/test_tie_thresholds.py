"""``a2q lower`` rounds exact ties as the QONNX ``Quant`` nodes do (``finn_tie_thresholds``), where FINN's thresholds
(``x >= t``) round every tie up.

Power-of-two scales (Brevitas' ``*FixedPoint`` quantizers) make ties inside the net common. Expected values come
from executing the file as given with qonnx (its own ``Quant`` nodes, at their rounding mode) on many inputs; the
lowered graph must give exactly the same outputs. The same check run on FINN's thresholds as they are shows that it
can fail.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

import a2q_passes.finn_flow as finn_flow
from a2q_passes.finn_execution import equivalence_inputs
from a2q_passes.finn_flow import lower_to_finn_hw
from a2q_passes.finn_tie_thresholds import activation_tie_rule
from tests.brevitas_nets import NetSpec, build_corpus_net

SAMPLES = 48


@pytest.fixture(scope="module")
def fixed_point(tmp_path_factory):
    """A Brevitas MLP with power-of-two weight and signed activation scales (QONNX export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path_factory.mktemp("fixed_point"), NetSpec(
            "mlp", 5, 4, signed_act=True, per_channel=False, weight_quant="Int8WeightPerTensorFixedPoint",
            act_quant="Int8ActPerTensorFixedPoint"), "qonnx")
    return ModelWrapper(str(path))


def _with_rounding(model: ModelWrapper, mode: str) -> ModelWrapper:
    copy = ModelWrapper(model.model.SerializeToString())
    for node in copy.graph.node:
        if node.op_type == "Quant" and copy.get_initializer(node.input[0]) is None:
            for attribute in [a for a in node.attribute if a.name == "rounding_mode"]:
                node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute("rounding_mode", mode))
    return copy


def _largest_difference(model: ModelWrapper) -> float:
    """Max |file - lowered graph| over :data:`SAMPLES` inputs, both executed one sample at a time by qonnx."""
    hw, _ = lower_to_finn_hw(model)
    x = equivalence_inputs(model, samples=SAMPLES, seed=5)
    differences = []
    for i in range(SAMPLES):
        ref = execute_onnx(model, {model.graph.input[0].name: x[i:i + 1]})[model.graph.output[0].name]
        got = execute_onnx(hw, {hw.graph.input[0].name: x[i:i + 1]})[hw.graph.output[0].name]
        differences.append(float(np.max(np.abs(ref - got.reshape(ref.shape)))))
    return max(differences)


@pytest.mark.parametrize("mode", ["ROUND", "HALF_DOWN", "HALF_UP"])
def test_lowered_graph_rounds_ties_as_the_file(fixed_point, mode):
    model = _with_rounding(fixed_point, mode)
    assert activation_tie_rule(model) == {"ROUND": "even", "HALF_UP": "away", "HALF_DOWN": "toward"}[mode]
    assert _largest_difference(model) == 0.0


@pytest.mark.parametrize("mode", ["ROUND", "HALF_UP", "HALF_DOWN"])
def test_check_sees_finn_rounding_ties_up(fixed_point, mode, monkeypatch):
    """The same comparison on FINN's own thresholds (no tie rule applied) fails: the ties are there."""
    monkeypatch.setattr(finn_flow, "activation_tie_rule", lambda model: None)
    assert _largest_difference(_with_rounding(fixed_point, mode)) > 0.01


def test_mixed_rounding_modes_get_no_rule(fixed_point):
    model = _with_rounding(fixed_point, "ROUND")
    quants = [n for n in model.graph.node if n.op_type == "Quant" and model.get_initializer(n.input[0]) is None]
    assert len(quants) > 1
    next(a for a in quants[-1].attribute if a.name == "rounding_mode").s = b"HALF_UP"
    assert activation_tie_rule(model) is None


def test_a_negative_activation_scale_gets_no_rule(fixed_point):
    model = _with_rounding(fixed_point, "ROUND")
    assert activation_tie_rule(model) == "even"
    quant = next(n for n in model.graph.node if n.op_type == "Quant" and model.get_initializer(n.input[0]) is None)
    model.set_initializer(quant.input[1], -model.get_initializer(quant.input[1]))
    assert activation_tie_rule(model) is None


@pytest.mark.parametrize("round_ties", [True, False])
def test_build_steps_round_ties_as_the_file(fixed_point, round_ties, tmp_path):
    """FINN's own builder steps with a2q's preparation and ``step_a2q_round_ties`` after ``step_convert_to_hw``: the
    HW graph gives the file's outputs exactly on off-grid inputs (FINN's float input thresholds are then exact);
    without the step it does not."""
    from a2q_passes.finn_runtime import ensure_finn_importable
    from a2q_passes.finn_steps import step_a2q_finn_preparation, step_a2q_round_ties

    ensure_finn_importable()
    import finn.builder.build_dataflow_steps as finn_steps
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    cfg = DataflowBuildConfig(output_dir=str(tmp_path), synth_clk_period_ns=10.0, generate_outputs=[], steps=[])
    model = step_a2q_finn_preparation(ModelWrapper(fixed_point.model.SerializeToString()), cfg)
    for name in ("step_qonnx_to_finn", "step_tidy_up", "step_streamline", "step_convert_to_hw"):
        model = getattr(finn_steps, name)(model, cfg)
    if round_ties:
        model = step_a2q_round_ties(model, cfg)
    x = np.random.default_rng(3).uniform(-2.0, 2.0, size=(SAMPLES, *fixed_point.get_tensor_shape(
        fixed_point.graph.input[0].name)[1:])).astype(np.float32)
    worst = 0.0
    for i in range(SAMPLES):
        ref = execute_onnx(fixed_point, {fixed_point.graph.input[0].name: x[i:i + 1]})[fixed_point.graph.output[0].name]
        got = execute_onnx(model, {model.graph.input[0].name: x[i:i + 1]})[model.graph.output[0].name]
        worst = max(worst, float(np.max(np.abs(ref - got.reshape(ref.shape)))))
    assert (worst == 0.0) if round_ties else (worst > 0.01)


def test_float_scales_keep_finns_thresholds(monkeypatch):
    """With float (not power-of-two) scales an integer float32 threshold is a rounding accident, not a tie: FINN's
    thresholds stay as they are. Regression: the bundled fmnist_mlp had 7 thresholds above 2^14 moved."""
    from pathlib import Path

    from a2q_passes.finn_accumulators import iterate_mac_nodes
    from a2q_passes.model_io import load_model

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "fmnist_mlp_w4a4.onnx")
    assert activation_tie_rule(model) == "even"
    with_rule, _ = lower_to_finn_hw(model)
    monkeypatch.setattr(finn_flow, "activation_tie_rule", lambda model: None)
    without, _ = lower_to_finn_hw(model)
    thresholds = [(with_rule.get_initializer(a.input[2]), without.get_initializer(b.input[2]))
                  for a, b in zip(iterate_mac_nodes(with_rule), iterate_mac_nodes(without)) if len(a.input) > 2]
    assert thresholds and all(np.array_equal(a, b) for a, b in thresholds)
    assert any(np.any(a == np.floor(a)) for a, _ in thresholds)  # integer thresholds are there


def test_exact_rows_take_power_of_two_progressions_only():
    from a2q_passes.finn_tie_thresholds import exact_rows

    rows = np.array([[-12.0, -4.0, 4.0, 12.0],       # step 8: exact
                     [-1.5, -1.25, -1.0, -0.75],     # step 1/4: exact
                     [3.0, 6.0, 9.0, 12.0],          # integers, step 3 (a scale 3 x the accumulator's)
                     [3.5, 6.5, 9.5, 12.5],          # step 3, no integer: no tie either way
                     [1.0, 2.0, 4.0, 5.0],           # steps differ
                     [2.0 ** 22, 2.0 ** 22 + 2, 2.0 ** 22 + 4, 2.0 ** 22 + 6],   # too large for float32 halves
                     [2.0 ** 16, 2.0 ** 16 + 3, 2.0 ** 16 + 6, 2.0 ** 16 + 9]],  # integers where float32 has few
                    dtype=np.float32)
    assert exact_rows(rows).tolist() == [True, True, True, False, False, False, False]
    assert exact_rows(np.array([[3.0]], dtype=np.float32)).tolist() == [False]
    assert exact_rows(np.array([[3.0, 6.0]], dtype=np.float32)).tolist() == [False]  # two integers may be chance
    # a Clip folded into the thresholds: the finite ones are checked (a step of 1/2 among them), infinite ends pass
    inf = np.inf
    folded = np.array([[-inf, 1.0, 1.5, 2.0, inf], [-inf, -inf, 1.0, inf, inf], [-inf, 1.0, 1.5, 2.5, inf],
                       [inf, inf, inf, inf, inf]], dtype=np.float32)
    assert exact_rows(folded).tolist() == [True, False, False, False]
