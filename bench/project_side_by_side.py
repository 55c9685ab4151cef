"""``a2q project`` from two checkouts, side by side in one run, on the synthetic Llama-style stack of ``bench_llm``.

``python -m bench.project_side_by_side --baseline /work/main --layers 1`` builds the stack (full Llama-7B layer
shapes by default), then runs ``project --acc-bits P`` once from the baseline checkout and once from this one
(each a fresh process with its own ``.venv``, started in its checkout so it imports that checkout's package),
the numpy read floor measured before each; prints seconds, ratio to the floor and peak RSS of both as JSON,
and whether the two projected models (graph and external data) are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import onnx

from bench.bench_llm import add_side_by_side_arguments, build_decoder_stack, read_floor, run_measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(parser, layers=1)
    parser.add_argument("--acc-bits", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/a2q_side"))
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / f"llama_L{args.layers}_h{args.hidden}.onnx"
    weights = build_decoder_stack(model, args.layers, args.hidden, args.mlp, args.heads)
    data = model.with_name(model.name + ".data")
    skips = [arg for n in onnx.load(str(model), load_external_data=False).graph.node
             if n.op_type == "MatMul" and n.name.startswith(("qk", "pv")) for arg in ("--skip", n.name)]
    read_floor(data, weights)  # warm the page cache
    floors, results = [], {}
    for tag, checkout in (("baseline", args.baseline.resolve()), ("this", here)):
        floors.append(read_floor(data, weights))
        out = args.out / tag / "projected.onnx"  # same file name: the graph names its data file
        out.parent.mkdir(exist_ok=True)
        os.chdir(checkout)
        seconds, rss, code = run_measured([str(checkout / ".venv/bin/python"), "-m", "a2q_passes", "project", str(model),
                                           str(out), "--acc-bits", str(args.acc_bits), *skips])
        results[tag] = {"checkout": str(checkout), "seconds": seconds, "peak_rss_mb": rss / 1e6, "exit": code}
    floor = statistics.median(floors)
    total, largest = sum(n for _, n in weights), max(n for _, n in weights)
    for figures in results.values():
        figures.update(x_floor=figures["seconds"] / floor, gb_per_s=total / figures["seconds"] / 1e9,
                       rss_over_largest=figures["peak_rss_mb"] * 1e6 / largest)
    identical = _graph_and_data(args.out / "baseline" / "projected.onnx") == _graph_and_data(
        args.out / "this" / "projected.onnx")
    json.dump({"layers": args.layers, "weight_gb": total / 1e9, "largest_tensor_mb": largest / 1e6, "floor_s": floor,
               "outputs_identical": identical, "load_average": os.getloadavg(), **results}, sys.stdout, indent=1)
    print()


def _graph_and_data(path: Path) -> tuple[bytes, bytes]:
    """The model's bytes with its data file's name left out (checkouts may name it differently), and that file's bytes."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = ""
    [location] = locations
    return proto.SerializeToString(deterministic=True), (path.parent / location).read_bytes()


if __name__ == "__main__":
    main()
