"""Start-up: ``a2q --version``/``--help`` import no model reader, and ``a2q analyze`` of a QDQ model no heavy package.

Each command runs in a fresh interpreter (the test session has imported everything already), which
reports the top-level packages loaded by the time the command finished.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QDQ_CNN = ROOT / "models" / "digits_cnn_qdq.onnx"  # onnxruntime quantize_static: int8 weights -> DequantizeLinear
# packages only training, FINN, plotting, execution or other commands need
HEAVY = {"torch", "brevitas", "finn", "onnxruntime", "matplotlib", "scipy", "sklearn"}
MODEL_READERS = {"numpy", "onnx", "qonnx", "ml_dtypes"}

_REPORT_MODULES = """
import sys
from a2q_passes.cli import main
sys.argv = ["a2q", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    code = stop.code or 0
print("packages:", " ".join(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
print("exit:", code, file=sys.stderr)
"""


def _packages_after(*args: str) -> set[str]:
    run = subprocess.run([sys.executable, "-c", _REPORT_MODULES, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    lines = dict(line.split(": ", 1) for line in run.stderr.splitlines() if line.startswith(("packages: ", "exit: ")))
    assert lines.get("exit") == "0", run.stderr[-2000:]
    return set(lines["packages"].split())


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_version_and_help_import_no_model_reader(option):
    assert not _packages_after(option) & (HEAVY | MODEL_READERS)


def test_analyze_of_a_qdq_model_imports_no_heavy_package():
    loaded = _packages_after("analyze", str(QDQ_CNN), "--json")
    assert {"onnx", "qonnx"} <= loaded  # it did read the model
    assert not loaded & HEAVY


def test_analyze_of_a_small_model_imports_no_compiler():
    """analyze sums with numba only on models of ``analysis.COMPILED_SUMS_MIN_WEIGHTS`` weights or more."""
    assert not _packages_after("analyze", str(QDQ_CNN), "--json") & {"numba", "llvmlite"}


def test_project_of_a_small_model_imports_no_compiler(tmp_path):
    """numba (0.5 s and some 170 MB to import) is only for large layers (a2q_passes.kernels): the bundled
    models' layers stay below its threshold."""
    loaded = _packages_after("project", str(QDQ_CNN), str(tmp_path / "out.onnx"), "--acc-bits", "12")
    assert "a2q_passes" in loaded and (tmp_path / "out.onnx").exists()
    assert not loaded & {"numba", "llvmlite"}
