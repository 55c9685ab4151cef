"""Soundness fuzzer: random QONNX/FINN/QDQ models against analyze/annotate/verify/project, checked by execution.

The generator (``tests/fuzz/generate.py``), the executed worst-case oracle (``tests/fuzz/oracle.py``) and the
properties (``tests/fuzz/properties.py``) are shared with ``make fuzz`` (``scripts/fuzz.py``), which runs them on
many more examples. ``A2Q_FUZZ_EXAMPLES`` sets the number of examples here (default 300, about 40 s of CPU).

Every generator switch is on and every property strict: a failure here is a soundness bug.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper

import a2q_passes.analysis
import a2q_passes.transforms.project
from tests.fuzz.generate import OPSET, QONNX_DOMAIN, Case, LayerInfo, cases
from tests.fuzz.oracle import executed_ranges, width
from tests.fuzz.properties import FINETUNE_VARIANTS, FINETUNE_REFUSED, LAYER_DELTAS, TILES, check_case, run_cli

EXAMPLES = int(os.environ.get("A2Q_FUZZ_EXAMPLES", "300"))
FINETUNE_EXAMPLES = int(os.environ.get("A2Q_FUZZ_FINETUNE_EXAMPLES", "100"))
LOWER_EXAMPLES = int(os.environ.get("A2Q_FUZZ_LOWER_EXAMPLES", "24"))
FIXED = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(FIXED, max_examples=EXAMPLES)
@given(case=cases(), verify_delta=st.integers(-2, 0), project_delta=st.integers(0, 3), layer_deltas=LAYER_DELTAS)
def test_random_models_keep_every_soundness_promise(case: Case, verify_delta: int, project_delta: int,
                                                    layer_deltas: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outcome = check_case(case, Path(tmp), verify_delta, project_delta, layer_deltas=tuple(layer_deltas), data=True)
    assert not outcome.failures, "\n".join([f"{f.category}: {f.message}" for f in outcome.failures] + case.description)


@settings(FIXED, max_examples=FINETUNE_EXAMPLES)
@given(case=cases(exclude=FINETUNE_REFUSED), project_delta=st.integers(0, 3),
       variant=st.sampled_from(FINETUNE_VARIANTS))
def test_random_models_keep_finetunes_promise(case: Case, project_delta: int, variant: str) -> None:
    """Property (g) with every other: `finetune` at project's P, each method and init, on random QONNX models."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome = check_case(case, Path(tmp), 0, project_delta, finetune=variant)
    assert not outcome.failures, "\n".join([f"{f.category}: {f.message}" for f in outcome.failures] + case.description)


def test_random_lowerable_models_keep_lowers_promise() -> None:
    """Property (f) with every other, on random models drawn from what FINN lowers: each MVAU/VVAU `lower` writes
    executes (FINN's own graph, worst-case inputs) within its accDataType. Not vacuous: `lower` must write a graph
    (exit 0, or 3 with some nodes left to the host) for at least a third of the examples."""
    lower_exits: list[int | None] = []

    @settings(FIXED, max_examples=LOWER_EXAMPLES)
    @given(case=cases(finn_lowerable=True), verify_delta=st.integers(-2, 0), project_delta=st.integers(0, 3))
    def lowerable(case: Case, verify_delta: int, project_delta: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            outcome = check_case(case, Path(tmp), verify_delta, project_delta, lower=True)
        lower_exits.append(outcome.exit_codes.get("lower"))
        assert not outcome.failures, "\n".join([f"{f.category}: {f.message}" for f in outcome.failures]
                                               + case.description)

    lowerable()
    assert sum(code in (0, 3) for code in lower_exits) >= len(lower_exits) / 3, lower_exits


@pytest.fixture(scope="module")
def gemm_case() -> Case:
    """A hand-built integer Gemm: 4-bit signed input codes (scale 0.5) times 4-bit weights (scale 0.25)."""
    weights = np.array([[3, -7], [-8, 5], [1, 0], [6, -2]], dtype=np.float32) * 0.25
    consts = {"s": np.float32(0.5), "z": np.float32(0), "b": np.float32(4), "w": weights, "ws": np.float32(0.25)}
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], name="QuantX", domain=QONNX_DOMAIN,
                         signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("Quant", ["w", "ws", "z", "b"], ["wq"], name="QuantW", domain=QONNX_DOMAIN,
                         signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("Gemm", ["xq", "wq"], ["y"], name="Gemm0"),
    ]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
                              value_info=[helper.make_tensor_value_info("xq", TensorProto.FLOAT, [1, 4]),
                                          helper.make_tensor_value_info("wq", TensorProto.FLOAT, [4, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)])
    return Case(ModelWrapper(proto), [LayerInfo("Gemm0", "Gemm", np.full((1, 1), 0.25, np.float32), 0.5, 0)])


def test_oracle_reaches_the_exact_range_of_a_plain_dense_layer(gemm_case: Case, tmp_path: Path) -> None:
    # every input box corner is reachable, so the executed worst cases must hit exactly the extremes:
    # channel 0 weights (3, -8, 1, 6) on codes [-8, 7]: max 7*10 + 8*8 = 134, min -8*10 - 7*8 = -136
    assert executed_ranges(gemm_case.model, gemm_case)["Gemm0"].acc_max.tolist()[0] == 134
    assert executed_ranges(gemm_case.model, gemm_case)["Gemm0"].acc_min.tolist()[0] == -136
    # and agree with analyze, an independent implementation, on every channel
    path = tmp_path / "m.onnx"
    gemm_case.model.save(str(path))
    result = run_cli("analyze", path, "--json", "--per-channel")
    assert result.code == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    executed = executed_ranges(gemm_case.model, gemm_case)[layer["node"]]
    assert executed.acc_min.tolist() == layer["per_channel"]["acc_min"]
    assert executed.acc_max.tolist() == layer["per_channel"]["acc_max"]


def test_properties_catch_an_analysis_that_halves_the_range(gemm_case: Case, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = a2q_passes.analysis.channel_ranges

    def halved(layer, rows):
        lo, hi = real(layer, rows)
        return np.asarray(lo) // 2, np.asarray(hi) // 2

    for module in (a2q_passes.analysis, a2q_passes.transforms.project):  # verification reads analysis.register_ranges
        monkeypatch.setattr(module, "channel_ranges", halved)
    outcome = check_case(gemm_case, tmp_path, verify_delta=-1, project_delta=1)
    found = {f.category for f in outcome.failures}
    # an independent self-check may instead stop a command with exit 4; either way the lie is caught
    assert found & {"too_small_analysis", "internal_error"}, outcome.failures
    assert found & {"too_small_annotation", "internal_error"}, outcome.failures
    assert found & {"false_no_overflow", "internal_error"}, outcome.failures


def test_properties_catch_a_leaked_traceback(gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(a2q_passes.analysis, "analyze_layer", broken)
    outcome = check_case(gemm_case, tmp_path)
    assert any(f.category == "traceback" and "RuntimeError: boom" in f.message for f in outcome.failures)


def test_lower_property_passes_an_honest_lowering_and_catches_a_too_narrow_accumulator(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (f): the plain dense layer lowers to one MVAU whose accDataType holds its executed range; with lower's
    own checks switched off and every accDataType forced to INT2, the property (the oracle executing the FINN graph)
    reports it."""
    import a2q_passes.transforms.lower as lower_module
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.finn_accumulators import iterate_mac_nodes

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", lower=True)
    assert honest.exit_codes.get("lower") == 0 and not honest.failures, honest.failures
    real = lower_module.set_accumulator_datatypes

    def too_narrow(hw, **kwargs):
        hw = real(hw, **kwargs)
        for node in iterate_mac_nodes(hw):
            getCustomOp(node).set_nodeattr("accDataType", "INT2")
        return hw

    monkeypatch.setattr(lower_module, "set_accumulator_datatypes", too_narrow)
    monkeypatch.setattr(lower_module.LowerToFINN, "ensures", lambda self, result: None)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", lower=True)
    assert any(f.category == "unsafe_lowering" and "INT2" in f.message for f in outcome.failures), outcome.failures


@pytest.mark.parametrize("variant", FINETUNE_VARIANTS)
def test_finetune_property_passes_each_variant_and_catches_an_untrained_output(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Property (g): every variant fine-tunes the plain dense layer one bit below its width (exit 0, no violation);
    with training replaced by the input model and the pass's own checks off, the oracle finds the overflow."""
    import a2q_passes.transforms.finetune as finetune_module
    from a2q_passes.finetune.train import FinetuneResult, metric_name

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", finetune=variant)
    assert honest.exit_codes.get("finetune") == 0 and not honest.failures, honest.failures

    def untouched(model: ModelWrapper) -> ModelWrapper:
        return ModelWrapper(copy.deepcopy(model.model))

    def untrained(model, selection, train, val, config, callback=None):
        return FinetuneResult(untouched(model), [], 0, metric_name(config.loss), None, {}, True)

    monkeypatch.setattr(finetune_module, "finetune", untrained)
    monkeypatch.setattr(finetune_module, "run_axe", lambda model, *args, **kwargs: (untouched(model), []))
    monkeypatch.setattr(finetune_module, "enforce_widths", lambda model, selection: {})
    monkeypatch.setattr(finetune_module.FinetuneAccumulators, "ensures", lambda self, result: None)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", finetune=variant)
    assert outcome.exit_codes.get("finetune") == 0
    assert any(f.category == "unsafe_output" and f.message.startswith("finetune") for f in outcome.failures), \
        outcome.failures


def test_finetune_property_with_per_layer_widths_passes_and_catches_an_untrained_output(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Properties (g) and (h) together: `finetune --layer Gemm0=8` (one bit below the dense layer's width) passes;
    with training replaced by the input model and the pass's own checks off, the oracle finds the overflow of that
    per-layer run too."""
    import a2q_passes.transforms.finetune as finetune_module
    from a2q_passes.finetune.train import FinetuneResult, metric_name

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", finetune="norm", layer_deltas=(1,))
    assert honest.exit_codes.get("finetune") == 0 and not honest.failures, honest.failures

    def untrained(model, selection, train, val, config, callback=None):
        return FinetuneResult(ModelWrapper(copy.deepcopy(model.model)), [], 0, metric_name(config.loss), None, {}, True)

    monkeypatch.setattr(finetune_module, "finetune", untrained)
    monkeypatch.setattr(finetune_module, "enforce_widths", lambda model, selection: {})
    monkeypatch.setattr(finetune_module.FinetuneAccumulators, "ensures", lambda self, result: None)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", finetune="norm", layer_deltas=(1,))
    assert any(f.category == "unsafe_output" and f.message.startswith('finetune --layer {"Gemm0": 8}')
               for f in outcome.failures), outcome.failures


def test_finetune_tile_check_reads_every_k_tile(gemm_case: Case, tmp_path: Path) -> None:
    """Property (g) with `axe --tile 2`: the honest run passes; the same tile check asked for a width below what a
    K-tile of the output executes to reports that tile (the check can fail: with input codes holding 0 no tile
    exceeds a full sum that fits, so an untiled AXE cannot show it on this layer)."""
    from tests.fuzz.oracle import tile_ranges
    from tests.fuzz.properties import Checker, Outcome

    honest = check_case(gemm_case, tmp_path, finetune="axe --tile 2")
    assert honest.exit_codes.get("finetune") == 0 and not honest.failures, honest.failures
    out = tmp_path / "finetuned_8.onnx"
    model = ModelWrapper(str(out))
    widest = max(width(r.lo, r.hi) for r in tile_ranges(model, gemm_case, gemm_case.layers[0], 2)[0])
    outcome = Outcome()
    Checker(gemm_case, tmp_path, outcome)._check_tiles_within(out, model, gemm_case, gemm_case.layers, 2, widest - 1,
                                                              "finetune (check asked for one bit less)")
    assert any(f.category == "unsafe_output" and "K-tile" in f.message for f in outcome.failures), outcome.failures


def test_per_layer_property_passes_honest_commands_and_catches_a_misread_width_map(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (h): the dense layer (executed width 9) at 8 bits from a width map projects and verifies honestly; a
    CLI that reads every width of the map 2 bits wider is caught on both commands by execution."""
    import a2q_passes.cli.project as project_cli
    import a2q_passes.cli.verify as verify_cli

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", layer_deltas=(1,))
    assert honest.exit_codes.get("project") == 0 and not honest.failures, honest.failures
    real = project_cli.parse_layer_widths

    def widened(acc_bits, layer_specs, widths_json):
        bits, overrides = real(acc_bits, layer_specs, widths_json)
        return bits, {name: p + 2 for name, p in overrides.items()}

    for module in (project_cli, verify_cli):
        monkeypatch.setattr(module, "parse_layer_widths", widened)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", layer_deltas=(1,))
    found = {(f.category, f.message.split()[0]) for f in outcome.failures}
    assert ("false_no_overflow", "verify") in found and ("unsafe_output", "project") in found, outcome.failures


def test_allocate_property_passes_an_honest_map_and_catches_an_unproven_one(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (h) with ``allocate``: the map allocate writes for the dense layer is one project meets; a map of
    1-bit widths written with the pass's own proof switched off is caught (project must refuse it)."""
    from a2q_passes.transforms.allocate import AllocateAccumulators

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", allocate=True)
    assert honest.exit_codes.get("allocate") == 0 and not honest.failures, honest.failures
    real = AllocateAccumulators.call

    def unproven(self, model):
        result = real(self, model)
        self.widths = {node: 1 for node in self.widths}
        return result

    monkeypatch.setattr(AllocateAccumulators, "call", unproven)
    monkeypatch.setattr(AllocateAccumulators, "ensures", lambda self, result: None)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", allocate=True)
    assert outcome.exit_codes.get("allocate") == 0
    assert any(f.category == "bad_refusal" and "allocate's map" in f.message for f in outcome.failures), \
        outcome.failures


def test_tile_property_passes_an_honest_projection_and_catches_untiled_weights(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (i): `project --tile 2` of the dense layer keeps every executed K-tile and running sum within the
    recorded widths; with the multi-stage projection asked for 3 bits more than its record says and the pass's own
    checks off, the oracle (the layer executed with the weights outside a tile set to 0) finds the tile that
    overflows."""
    import a2q_passes.transforms.project as project_module

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", tile=2)
    assert honest.exit_codes.get("project") == 0 and not honest.failures, honest.failures
    real = project_module.project_multistage
    monkeypatch.setattr(project_module, "project_multistage",
                        lambda v, x, groups, tile, bits, *rest: real(v, x, groups, tile, bits + 3, *rest))
    monkeypatch.setattr(project_module.ProjectToAccumulator, "ensures", lambda self, result: None)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", tile=2)
    assert any(f.category == "unsafe_output" and "K-tile" in f.message for f in outcome.failures), outcome.failures


def test_tile_property_catches_a_verify_that_misreads_its_inner_width(gemm_case: Case, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (i) on `verify --tile 3`: the tiles are probed one bit below what they execute to (an honest verify
    refuses); a verify that reads --acc-bits 2 bits wider says "no overflow", which the executed K-tile contradicts."""
    import a2q_passes.cli.verify as verify_cli

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", tile=3)
    assert not honest.failures, honest.failures
    real = verify_cli.parse_layer_widths

    def widened(acc_bits, layer_specs, widths_json):
        bits, overrides = real(acc_bits, layer_specs, widths_json)
        return (None if bits is None else bits + 2), overrides

    monkeypatch.setattr(verify_cli, "parse_layer_widths", widened)
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", tile=3)
    assert any(f.category == "false_no_overflow" and f.message.startswith("verify --tile 3") and "K-tile" in f.message
               for f in outcome.failures), outcome.failures


def test_tile_property_catches_an_analysis_that_halves_the_stages(gemm_case: Case, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (i) on `analyze --tile`: with the K-tile and running-sum ranges halved, the reported ranges miss what
    executes (project is stopped by the independent certificate, exit 4)."""
    real = a2q_passes.analysis.stage_ranges
    monkeypatch.setattr(a2q_passes.analysis, "stage_ranges",
                        lambda rows, x, tile: tuple((lo // 2, hi // 2) for lo, hi in real(rows, x, tile)))
    outcome = check_case(gemm_case, tmp_path, tile=2)
    assert any(f.category == "too_small_analysis" and f.message.startswith("analyze --tile 2") for f in outcome.failures)
    assert any(f.category == "internal_error" and "project" in f.message for f in outcome.failures), outcome.failures


def test_data_property_passes_an_honest_simulation_and_catches_a_wider_register(
        gemm_case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property (j): `verify --data --layer Gemm0=P` counts exactly the accumulations the executed model has outside
    P bits (at its width on the data, none; one bit below, some); a simulator whose register is one bit wider than
    asked misses them."""
    import a2q_passes.data_simulation as data_simulation

    (tmp_path / "honest").mkdir()
    honest = check_case(gemm_case, tmp_path / "honest", data=True)
    assert not honest.failures, honest.failures
    assert honest.checked["data simulations (wrap)"] == 2 and honest.checked["data simulations (saturate)"] == 1
    assert honest.checked["data simulations with overflows"] >= 2  # one bit below the data's width, both modes
    real = data_simulation.accumulate_dot
    monkeypatch.setattr(data_simulation, "accumulate_dot",
                        lambda x, q, bits, *rest, **kwargs: real(x, q, bits + 1, *rest, **kwargs))
    (tmp_path / "sabotaged").mkdir()
    outcome = check_case(gemm_case, tmp_path / "sabotaged", data=True)
    assert any(f.category == "wrong_simulation" and "Gemm0" in f.message and "--mode wrap" in f.message
               for f in outcome.failures), outcome.failures


@settings(FIXED, max_examples=int(os.environ.get("A2Q_FUZZ_TILE_EXAMPLES", "150")))
@given(case=cases(), tile=TILES)
def test_random_models_keep_the_multistage_promise(case: Case, tile: int) -> None:
    """Property (i) on random models: `project --tile T` (with the --skip or width its refusals name)."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome = check_case(case, Path(tmp), tile=tile)
    assert not outcome.failures, "\n".join([f"{f.category}: {f.message}" for f in outcome.failures] + case.description)


def test_extracted_scales_switch_leaves_fold_cases_with_a_zero_point_behind_an_identity() -> None:
    """Found by the fuzzer (seed 206): under ``--zero-point fold`` the ``extracted_scales`` switch must leave a model
    whose activation zero point is not 0, also where the zero point reaches its ``Quant`` through an ``Identity``
    (switch ``constant_forms``): qonnx extracts it all the same, into an Add/Sub pair whose values a2q reads as codes
    ``q - z``, where the generated grid says raw codes ``q``. Without zero point the model is extracted."""
    from tests.fuzz.generate import _extract_scales

    def case(zero: float) -> Case:
        nodes = [helper.make_node("Identity", ["z_init"], ["z"]),
                 helper.make_node("Quant", ["x", "s", "z", "bits"], ["q"], domain=QONNX_DOMAIN, signed=0, narrow=0,
                                  rounding_mode="ROUND"),
                 helper.make_node("Quant", ["w", "ws", "wz", "bits"], ["wq"], domain=QONNX_DOMAIN, signed=1, narrow=0,
                                  rounding_mode="ROUND"),
                 helper.make_node("MatMul", ["q", "wq"], ["y"], name="mm")]
        inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n) for n, v in (
            ("z_init", zero), ("s", 0.5), ("bits", 4.0), ("w", np.ones((3, 2))), ("ws", 0.25), ("wz", 0.0))]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
        model = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                                     helper.make_opsetid(QONNX_DOMAIN, 1)]))
        return Case(model, [])

    shifted, plain = case(-6.0), case(0.0)
    _extract_scales(shifted)
    _extract_scales(plain)
    assert "extracted_scales" not in shifted.used and not any(n.op_type == "Div" for n in shifted.model.graph.node)
    assert "extracted_scales" in plain.used
