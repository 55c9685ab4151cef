"""Models after qonnx's ``ExtractQuantScaleZeroPt``: each ``Quant(x, s, 0, b)`` written as ``Quant(x / s, 1, 0, b) * s``.

finn-plus' ``Requant`` conversion reads the unit-scale ``Quant`` that transformation leaves.
The weights' integers lie behind the ``Div``, the grid of the products behind the ``Mul``: ``analyze`` must read
the same ranges as on the model before the transformation, ``project`` must write weights whose executed worst case
fits (and keep the graph's form), ``verify`` must prove it with its own reader, and ``lower`` must hand FINN a
graph it converts (FINN fails on the extracted form itself). Every check executes the graphs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.extract_quant_scale_zeropt import ExtractQuantScaleZeroPt
from qonnx.util.basic import qonnx_make_model
from qonnx.util.cleanup import cleanup_model

from a2q_passes import bounds
from a2q_passes.finn_quant_forms import DefaultDomainFirst, ScaleIntoQuant
from tests.cli_helpers import run_a2q
from tests.fuzz.real_files import executed_range

QONNX = "qonnx.custom_op.general"
MODEL = Path(__file__).resolve().parent.parent / "models" / "fmnist_mlp_w4a4.onnx"
ROUNDING = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")


def _extracted(model: ModelWrapper) -> ModelWrapper:
    return cleanup_model(model).transform(ExtractQuantScaleZeroPt())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """The committed Brevitas QONNX MLP after qonnx's cleanup, and the same after ExtractQuantScaleZeroPt."""
    folder = tmp_path_factory.mktemp("extracted")
    plain, extracted = folder / "plain.onnx", folder / "extracted.onnx"
    cleanup_model(ModelWrapper(str(MODEL))).save(str(plain))
    _extracted(ModelWrapper(str(MODEL))).save(str(extracted))
    ops = [n.op_type for n in onnx.load(str(extracted)).graph.node]
    assert ops.count("Div") >= 3 and ops.count("Mul") >= 3  # the weights' scales were extracted
    return plain, extracted


def _quant_model(scale: np.ndarray, bits: float, signed: int, narrow: int, mode: str) -> ModelWrapper:
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], domain=QONNX, signed=signed, narrow=narrow,
                            rounding_mode=mode)
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(np.zeros((), np.float32), "z"),
             numpy_helper.from_array(np.asarray(bits, np.float32), "b")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], inits)
    return ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid(QONNX, 2),
                                                               helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("mode", ROUNDING)
@pytest.mark.parametrize("per_channel", [False, True])
def test_scale_into_quant_undoes_the_extraction_exactly(mode, per_channel):
    rng = np.random.default_rng(ROUNDING.index(mode))
    scale = (rng.uniform(0.01, 0.3, size=(4, 1)) if per_channel else np.float32(0.37)).astype(np.float32)
    original = _quant_model(scale, 4, 1, 0, mode)
    extracted = original.transform(ExtractQuantScaleZeroPt())
    assert [n.op_type for n in extracted.graph.node] == ["Div", "Quant", "Mul"]
    folded = extracted.transform(ScaleIntoQuant())
    assert [n.op_type for n in folded.graph.node] == ["Quant"]
    step = np.broadcast_to(scale, (4, 64)).astype(np.float32)
    ties = (np.arange(64) % 20 - 10.5 + 0.5 * (np.arange(64) % 2)).astype(np.float32)  # k + 1/2 steps, past the clamp
    for x in (ties * step, rng.normal(0, 3, (4, 64)) * step, np.full((4, 64), 1e6)):
        x = np.asarray(x, np.float32)[None]
        want = execute_onnx(original, {"x": x})["y"]
        assert np.array_equal(execute_onnx(extracted, {"x": x})["y"], want)
        assert np.array_equal(execute_onnx(folded, {"x": x})["y"], want)


def test_scale_into_quant_leaves_other_factors_alone():
    extracted = _quant_model(np.float32(0.5), 4, 1, 0, "ROUND").transform(ExtractQuantScaleZeroPt())
    mul = next(n for n in extracted.graph.node if n.op_type == "Mul")
    extracted.set_initializer(mul.input[1], np.float32(0.25))  # no longer the Div's scale: another grid
    assert [n.op_type for n in extracted.transform(ScaleIntoQuant()).graph.node] == ["Div", "Quant", "Mul"]


def test_default_domain_first_lets_qonnx_fold_a_constant_div():
    """qonnx's FoldConstants runs constant nodes at the first opset import's version: Div-2 has no kernel."""
    div = helper.make_node("Div", ["w", "s"], ["ws"])
    add = helper.make_node("Add", ["x", "ws"], ["y"])
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
             numpy_helper.from_array(np.float32(0.5), "s")]
    graph = helper.make_graph([div, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid(QONNX, 2),
                                                                helper.make_opsetid("", 13)]))
    with pytest.raises(Exception, match="Div"):
        cleanup_model(ModelWrapper(model.model.SerializeToString()))
    folded = cleanup_model(model.transform(DefaultDomainFirst()))
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    x = np.ones(4, np.float32)
    inp, out = folded.graph.input[0].name, folded.graph.output[0].name  # cleanup gives them readable names
    assert np.array_equal(execute_onnx(folded, {inp: x})[out], x + np.arange(4) / 0.5)


def _analysis(path: Path) -> dict[str, tuple]:
    out = run_a2q("analyze", path, "--json")
    assert out.returncode == 0, out.stderr
    return {layer["node"]: (layer["status"], layer["bounds"]["exact"], layer["acc_min"], layer["acc_max"])
            for layer in json.loads(out.stdout)["layers"]}


def test_analyze_reads_the_extracted_weights_as_the_original_ones(files):
    plain, extracted = files
    assert _analysis(extracted) == _analysis(plain)
    model = ModelWrapper(str(extracted))
    for name, (status, width, lo, hi) in _analysis(extracted).items():
        ran = executed_range(model, name)  # the oracle executes the Div, the unit-scale Quant and the Mul
        assert status == "ok" and lo <= ran.lo and ran.hi <= hi, (name, lo, hi, ran.lo, ran.hi)


def test_project_keeps_the_form_and_its_executed_worst_case_fits(files, tmp_path):
    plain, extracted = files
    widths = _analysis(extracted)
    bits = max(width for _, width, _, _ in widths.values()) - 2
    outputs = {}
    for tag, path in (("plain", plain), ("extracted", extracted)):
        outputs[tag] = tmp_path / f"{tag}.onnx"
        out = run_a2q("project", path, outputs[tag], "--acc-bits", bits)
        assert out.returncode == 0, out.stderr
    projected = ModelWrapper(str(outputs["extracted"]))
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert ops(projected) == ops(ModelWrapper(str(extracted)))
    lo, hi = bounds.accumulator_limits(bits, signed=True)
    changed = 0
    for name in widths:
        ran = executed_range(projected, name)
        assert lo <= ran.lo and ran.hi <= hi, (name, ran.lo, ran.hi, bits)
    # the same integers as projecting the model before the transformation (the weights are stored in w itself)
    reference = ModelWrapper(str(outputs["plain"]))
    for init in reference.graph.initializer:
        if projected.get_initializer(init.name) is not None and init.name.endswith("param0"):
            theirs = projected.get_initializer(init.name)
            ours = reference.get_initializer(init.name)
            if ours.shape == theirs.shape and ours.ndim == 2:
                assert np.array_equal(ours, theirs), init.name
                changed += not np.array_equal(ours, ModelWrapper(str(plain)).get_initializer(init.name))
    assert changed  # some weights were projected
    verified = run_a2q("verify", outputs["extracted"])
    assert verified.returncode == 0 and "no overflow possible" in verified.stdout, verified.stdout + verified.stderr


def test_lower_takes_the_extracted_form(files, tmp_path):
    _, extracted = files
    out = run_a2q("lower", extracted, tmp_path / "hw.onnx", "--acc-bits", 20)
    assert out.returncode == 0, out.stderr
    assert "equivalent" in out.stdout and (tmp_path / "hw.onnx").exists()


def test_a_factor_other_than_the_divisor_is_refused_by_name(files, tmp_path):
    _, extracted = files
    model = ModelWrapper(str(extracted))
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and model.get_initializer(n.input[1]) is not None
               and (model.find_producer(n.input[0]) or n).op_type == "Quant"
               and model.find_consumers(n.output[0])[0].op_type in ("Gemm", "MatMul")
               and model.find_consumers(n.output[0])[0].input[1] == n.output[0])
    model.set_initializer(mul.input[1], model.get_initializer(mul.input[1]) * np.float32(2))
    path = tmp_path / "other_factor.onnx"
    model.save(str(path))
    out = run_a2q("analyze", path)
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert "ExtractQuantScaleZeroPt" in out.stdout + out.stderr and "another scale" in out.stdout + out.stderr
