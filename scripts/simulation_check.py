"""The corpus' step 7 alone, on ONNX files given by path, under both zero-point conventions.

    python -m scripts.simulation_check FILE.onnx ... [--layers 8] [--out DIR]

For each file and convention: the whole file runs on random inputs, the accumulators of up to ``--layers`` of its
MAC layers are read from the executed tensors (the oracle, ``tests/fuzz``), and ``verify --data --layer NAME=P`` at
their width and one bit less must count exactly the accumulations outside P (``scripts.corpus``'s step 7). One line
per file and convention; exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import scripts.corpus as corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--layers", type=int, default=8, help="at most this many layers a file (spread over it)")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    corpus.SIMULATED_LAYERS = args.layers
    work = args.out or Path(tempfile.mkdtemp(prefix="a2q_simulation_check_"))
    failed, compared = 0, 0
    for path in args.files:
        for zero_point in ("fold", "subtract"):
            analyzed = subprocess.run([sys.executable, "-m", "a2q_passes", "analyze", str(path), "--json",
                                       "--zero-point", zero_point], capture_output=True, text=True)
            if not analyzed.stdout.strip().startswith("{"):
                print(f"{path.name} {zero_point}: analyze exited {analyzed.returncode}", flush=True)
                continue
            names = [layer["node"] for layer in json.loads(analyzed.stdout)["layers"]]
            entry = corpus.Entry(path.stem, "given", path, zero_point=zero_point)
            result = corpus.Result(entry)
            ok = corpus._simulates_exactly(entry, work, names, result)
            failed += not ok
            compared += result.simulated
            print(f"{path.name} {zero_point}: {result.simulated} simulations compared, "
                  f"{'OK' if ok else 'FAILED ' + result.detail}", flush=True)
    print(f"{len(args.files)} files, {compared} simulations compared, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
