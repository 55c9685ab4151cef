"""Every model committed to models/ passes analysis, and after projection to 16 bits, verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from a2q_passes.analysis import analyze_model
from a2q_passes.model_io import load_model
from a2q_passes.transforms import ProjectToAccumulator
from a2q_passes.verification import verify_model
from tests.cli_helpers import run_a2q

MODELS = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.onnx"))


def test_the_zoo_is_there():
    names = {p.name for p in MODELS}
    assert {"fmnist_cnn_w4a4.onnx", "digits_cnn_w4a4.onnx", "digits_cnn_qdq.onnx", "espcn_x2_w4a4.onnx"} <= names


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_zoo_model_analyses_projects_and_verifies(path):
    model = load_model(path)
    layers = analyze_model(model).layers
    assert layers and all(r.status == "ok" for r in layers), [(r.node, r.status) for r in layers]
    projected = model.transform(ProjectToAccumulator(16))
    assert all(r.bounds["exact"] <= 16 for r in analyze_model(projected).layers)
    assert verify_model(projected).overflow_impossible  # the widths `project` recorded in the model


def test_zoo_cli_round_trip(tmp_path):
    model = MODELS[[p.name for p in MODELS].index("fmnist_cnn_w4a4.onnx")]
    assert run_a2q("analyze", model).returncode == 0
    out = tmp_path / "p16.onnx"
    assert run_a2q("project", model, out, "--acc-bits", "16").returncode == 0
    assert run_a2q("verify", out).returncode == 0
