"""Every command gives byte-identical output when run again, on every bundled model.

The commands run twice, each time in a fresh interpreter with a different ``PYTHONHASHSEED``
(so neither Python's global ``random`` state nor set/dict iteration order can carry over);
both runs write a manifest of digests (files written, ``--json`` output, exit code) that must be
equal. Run as a script, this module is that driver: ``python tests/test_reproducible.py FOLDER``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the driver runs as a script: make `tests` and `models` importable
    sys.path.insert(0, str(ROOT))

from models.data import load_digits_split  # noqa: E402
from tests.cli_helpers import run_cli  # noqa: E402

MODELS = sorted((ROOT / "models").glob("*.onnx"))
LOWERED = ROOT / "models" / "digits_mlp_w4a4.onnx"  # the smallest model FINN lowers completely
FINETUNED = ROOT / "models" / "digits_cnn_w4a4.onnx"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file(path: Path) -> str:
    return _sha(path.read_bytes()) if path.exists() else "absent"


def _graph_unchanged(original: Path, written: Path) -> bool:
    return written.exists() and onnx.load(str(written)).graph == onnx.load(str(original)).graph


def run_all(folder: Path) -> dict[str, object]:
    """Run every command; paths are relative to ``folder`` so the two runs print the same text."""
    os.chdir(folder)
    manifest: dict[str, object] = {}
    for model in MODELS:
        stem = model.stem
        code, out, _ = run_cli("analyze", model, "--json")
        manifest[f"{stem}: analyze --json"] = (code, _sha(out.encode()))
        code, out, _ = run_cli("annotate", model, f"{stem}.annotated.onnx")
        manifest[f"{stem}: annotate"] = (code, _file(Path(f"{stem}.annotated.onnx")), _sha(out.encode()))
        manifest[f"{stem}: annotate keeps the graph"] = _graph_unchanged(model, Path(f"{stem}.annotated.onnx"))
        code, out, _ = run_cli("project", model, f"{stem}.p16.onnx", "--acc-bits", "16", "--json")
        manifest[f"{stem}: project --acc-bits 16"] = (code, _file(Path(f"{stem}.p16.onnx")), _sha(out.encode()))
        code, out, _ = run_cli("verify", model, "--acc-bits", "16", "--json")
        manifest[f"{stem}: verify --json"] = (code, _sha(out.encode()))
    code, out, _ = run_cli("lower", LOWERED, "lowered.onnx", "--json", "--report-json", "lowered.json")
    manifest["lower"] = (code, _file(Path("lowered.onnx")), _file(Path("lowered.json")), _sha(out.encode()))
    x, y = load_digits_split("train")
    np.savez("train.npz", x=x[:64], y=y[:64])
    code, _, _ = run_cli("finetune", FINETUNED, "finetuned.onnx", "--data", "train.npz", "--acc-bits", "12",
                         "--epochs", "1", "--batch-size", "32", "--seed", "3", "--device", "cpu", "--no-progress")
    manifest["finetune --seed 3"] = (code, _file(Path("finetuned.onnx")))
    return manifest


def test_every_command_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    runs = []
    for seed in ("1", "2"):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        runs.append((folder, subprocess.Popen([sys.executable, __file__, str(folder)], env=env, cwd=ROOT,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    manifests = []
    for folder, process in runs:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        manifests.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = manifests
    assert first == second, {key: (first[key], second.get(key)) for key in first if first[key] != second.get(key)}
    # the runs did real work: every model was annotated with its graph untouched, lower and finetune wrote
    for model in MODELS:
        assert first[f"{model.stem}: annotate"][0] == 0 and first[f"{model.stem}: annotate keeps the graph"], model
        assert first[f"{model.stem}: analyze --json"][0] == 0, model
    assert first["lower"][0] == 0 and first["lower"][1] != "absent"
    assert first["finetune --seed 3"] == [0, first["finetune --seed 3"][1]] and first["finetune --seed 3"][1] != "absent"


if __name__ == "__main__":
    result = run_all(Path(sys.argv[1]))
    print(json.dumps(result))
