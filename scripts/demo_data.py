"""Demo helpers: export held-out inputs as ``.npz`` and score ONNX models on them.

    python scripts/demo_data.py npz fashion_mnist 1000 out/test_inputs.npz [train|test]
    python scripts/demo_data.py score fashion_mnist MODEL.onnx [MODEL.onnx ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import load_dataset  # noqa: E402
from models.evaluate import evaluate_onnx  # noqa: E402


def main(argv: list[str]) -> None:
    command, dataset, *rest = argv
    if command == "npz":
        limit, out = int(rest[0]), Path(rest[1])
        split = rest[2] if len(rest) > 2 else "test"
        x, y = load_dataset(dataset, split)
        np.savez(out, x=x[:limit].astype(np.float32), y=y[:limit])
        print(f"wrote {out}: {min(limit, len(x))} {'held-out ' if split == 'test' else ''}{dataset} {split} inputs")
    elif command == "score":
        for path in rest:
            print(f"{path}: {evaluate_onnx(path, dataset):.2f} (test split, {dataset})")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
