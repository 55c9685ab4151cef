"""Files without opset imports for qonnx/FINN custom domains (FINN outputs, the QONNX model zoo, QKeras).

FINN's transformations, its example models and the QONNX model zoo use ``qonnx.custom_op.general``
or the legacy ``finn.custom_op.general`` without an ``opset_import`` entry; the strict ONNX checker
rejects them, qonnx and FINN read them. These tests build such files from a bundled model and from
FINN's own QONNX->FINN conversion, strip their custom imports, and run analyze/project/verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes.model_io import QONNX_GENERAL_DOMAIN
from tests.cli_helpers import run_cli

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn_w4a4.onnx"


def strip_custom_imports(model: onnx.ModelProto) -> onnx.ModelProto:
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def legacy_qonnx(path: Path) -> Path:
    """The bundled QONNX model as the model zoo writes it: Quant in ``finn.custom_op.general``, no import."""
    model = onnx.load(str(MODEL))
    for node in model.graph.node:
        if node.domain == QONNX_GENERAL_DOMAIN:
            node.domain = "finn.custom_op.general"
    onnx.save(strip_custom_imports(model), str(path))
    return path


def finn_converted(path: Path) -> Path:
    """FINN's ConvertQONNXtoFINN output (MultiThreshold, integer weights) without custom imports."""
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    from a2q_passes.finn_runtime import ensure_finn_importable

    ensure_finn_importable()
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN

    model = ModelWrapper(str(MODEL)).transform(ConvertQONNXtoFINN()).transform(InferShapes()).transform(InferDataTypes())
    assert any(n.op_type == "MultiThreshold" for n in model.graph.node)
    onnx.save(strip_custom_imports(model.model), str(path))
    return path


def _ranges(path: Path) -> list[tuple[int, int]]:
    code, out, err = run_cli("analyze", path, "--json")
    assert code == 0, err
    return [(layer["acc_min"], layer["acc_max"]) for layer in json.loads(out)["layers"]]


@pytest.mark.parametrize("make", [legacy_qonnx, finn_converted])
def test_undeclared_custom_domains_are_read(make, tmp_path: Path) -> None:
    path = make(tmp_path / "in.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="No opset import for domain"):
        onnx.checker.check_model(onnx.load(str(path)))  # what a plain load used to refuse
    before = path.read_bytes()
    assert _ranges(path) == _ranges(MODEL)  # same layers, same integer ranges as the declared original

    out = tmp_path / "out.onnx"
    code, _, err = run_cli("project", path, out, "--acc-bits", "12")
    assert code == 0, err
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    declared = {o.domain for o in written.opset_import}
    assert {n.domain for n in written.graph.node} <= declared | {""}
    assert "finn.custom_op.general" not in {n.domain for n in written.graph.node}  # one domain for qonnx's ops
    assert max(hi for _, hi in _ranges(out)) < 2 ** 11 and min(lo for lo, _ in _ranges(out)) >= -2 ** 11
    code, _, err = run_cli("verify", out)  # the widths project recorded
    assert code == 0, err
    assert path.read_bytes() == before


def test_projected_legacy_model_is_accepted_by_finn(tmp_path: Path) -> None:
    """FINN converts the written file, and it computes what the declared original projects to."""
    from a2q_passes.finn_runtime import ensure_finn_importable

    ensure_finn_importable()
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN

    outs = {}
    for name, source in (("legacy", legacy_qonnx(tmp_path / "legacy.onnx")), ("declared", MODEL)):
        outs[name] = tmp_path / f"{name}.p12.onnx"
        assert run_cli("project", source, outs[name], "--acc-bits", "12")[0] == 0
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    results = []
    for path in outs.values():
        model = ModelWrapper(str(path))
        finn_model = model.transform(ConvertQONNXtoFINN())
        name = model.graph.input[0].name
        results.append((execute_onnx(model, {name: x})[model.graph.output[0].name],
                        execute_onnx(finn_model, {name: x})[finn_model.graph.output[0].name]))
    (legacy_q, legacy_f), (declared_q, declared_f) = results
    np.testing.assert_array_equal(legacy_q, declared_q)
    np.testing.assert_allclose(legacy_f, legacy_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(legacy_f, declared_f, rtol=1e-6, atol=1e-6)


def test_unknown_domain_without_import_is_still_refused(tmp_path: Path) -> None:
    model = onnx.load(str(MODEL))
    node = next(n for n in model.graph.node if n.op_type == "Flatten")
    node.op_type, node.domain = "Flatten", "com.example.ops"
    path = tmp_path / "undeclared.onnx"
    onnx.save(model, str(path))
    code, _, err = run_cli("analyze", path)
    assert code == 1
    assert "undeclared.onnx" in err and "com.example.ops" in " ".join(err.split())


@pytest.mark.parametrize("make", [legacy_qonnx, finn_converted])
def test_the_passes_take_an_in_memory_model_without_custom_imports(make, tmp_path: Path) -> None:
    """The library face on the graphs FINN's own builders make in memory (``qonnx_make_model`` declares no custom
    domain): annotate and project used to fail their own output check with onnx.checker's "No opset import"; their
    outputs now declare the domains and hold what the CLI gives for the same file."""
    from a2q_passes.metadata import recorded_widths
    from a2q_passes.transforms import AnnotateAccumulators, ProjectToAccumulator

    path = make(tmp_path / "in.onnx")
    for transformation, args in ((AnnotateAccumulators(), ()), (ProjectToAccumulator(12), ("--acc-bits", "12"))):
        written = ModelWrapper(str(path)).transform(transformation)
        onnx.checker.check_model(written.model)
        out = tmp_path / f"{type(transformation).__name__}.onnx"
        code, _, err = run_cli("annotate" if not args else "project", path, out, *args)
        assert code == 0, err
        assert recorded_widths(written) == recorded_widths(ModelWrapper(str(out)))
