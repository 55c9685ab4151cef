"""Regenerate every committed model artefact and models/metrics.json.

    python -m models.build_all [--seed 0] [--out models/]     (same as `python -m models.train all`)

Trains each model of models.nets.MODELS with its recipe (float, then QAT per variant), exports QONNX,
then builds the onnxruntime QDQ digits model. Bit-for-bit reproducible for the same seed and thread
count on the same software versions (recorded under "_build").
"""

from __future__ import annotations

import argparse
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from models.evaluate import evaluate_onnx
from models.nets import MODELS
from models.qdq import make_digits_cnn_qdq
from models.train import DEFAULT_SEED, MODELS_DIR, train_model, update_metrics


def build_all(out: Path = MODELS_DIR, seed: int = DEFAULT_SEED, threads: int = 1) -> None:
    started = time.perf_counter()
    for name in MODELS:
        train_model(name, out=out, seed=seed, threads=threads)
    qdq_path = make_digits_cnn_qdq(out / "checkpoints" / "digits_cnn_float.pt", out / "digits_cnn_qdq.onnx")
    qdq_score = round(evaluate_onnx(qdq_path, "digits"), 3)
    update_metrics(out / "metrics.json", "digits_cnn", {"qdq": {"score_onnx": qdq_score, "onnx": qdq_path.name}})
    print(f"digits_cnn qdq (onnxruntime): {qdq_score} top1_percent")
    build: dict[str, Any] = {
        "seed": seed, "threads": threads, "total_seconds": round(time.perf_counter() - started, 1),
        "command": "python -m models.train all", "python": platform.python_version(),
        "versions": {package: version(package) for package in ("torch", "brevitas", "onnx", "onnxruntime", "qonnx")},
    }
    update_metrics(out / "metrics.json", "_build", build)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.build_all", description=__doc__.split("\n")[1])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    build_all(out=args.out, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
