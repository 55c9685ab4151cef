"""Speed and memory of the passes on a ResNet-50-sized model, side by side with FINN in one run.

    .venv/bin/python -m bench.bench_speed [--repeats 5] [--json out.json]

Medians over ``--repeats`` alternating runs; peak memory by tracemalloc (numpy allocations
included) relative to the model's float32 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from typing import Callable

from bench.resnet50_synth import build_resnet50_qonnx, finn_mvau_equivalent, weight_count


def _fresh(model):
    from qonnx.core.modelwrapper import ModelWrapper

    return ModelWrapper(model.model.SerializeToString())


Case = tuple[Callable[[], object], Callable[[object], object]]  # (untimed set-up, timed work on its result)


def _timed(case: Case) -> float:
    prepared = case[0]()
    start = time.perf_counter()
    case[1](prepared)
    return time.perf_counter() - start


def _peak_bytes(case: Case) -> int:
    prepared = case[0]()
    tracemalloc.start()
    case[1](prepared)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def run(repeats: int = 5) -> dict:
    from finn.transformation.fpgadataflow.minimize_accumulator_width import MinimizeAccumulatorWidth

    from a2q_passes.analysis import analyze_model
    from a2q_passes.transforms.project import ProjectToAccumulator

    model = build_resnet50_qonnx()
    mvau = finn_mvau_equivalent(model)
    n_weights = weight_count(model)
    same = lambda: None  # noqa: E731 - cases that do not modify their model need no set-up
    cases: dict[str, Case] = {
        "a2q analyze (QONNX graph)": (same, lambda _: analyze_model(model)),
        "a2q analyze (FINN MVAU graph)": (same, lambda _: analyze_model(mvau)),
        # 14 bits makes every wide layer project (plain widths are 15-17 bits); on a fresh copy, in place
        "a2q project --acc-bits 14 (exact, QONNX graph)": (lambda: _fresh(model),
                                                           lambda m: ProjectToAccumulator(14).apply(m)),
        # in place (no deep copy of the 100 MB model), so only FINN's own work is timed
        "FINN MinimizeAccumulatorWidth (MVAU graph)": (same, lambda _: mvau.transform(
            MinimizeAccumulatorWidth(), make_deepcopy=False, cleanup=False)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # alternate so machine noise hits every case alike
        for name, case in cases.items():
            times[name].append(_timed(case))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    finn = medians["FINN MinimizeAccumulatorWidth (MVAU graph)"]
    return {
        "weights": n_weights,
        "layers": len(mvau.graph.node),
        "repeats": repeats,
        "cases": {
            name: {
                "median_s": round(m, 4),
                "weights_per_s": round(n_weights / m),
                "ratio_vs_finn": round(m / finn, 3),
                "peak_mem_over_weight_bytes": round(_peak_bytes(cases[name]) / (4 * n_weights), 2),
            }
            for name, m in medians.items()
        },
    }


def markdown(results: dict) -> str:
    lines = [
        f"ResNet-50-sized layer set: {results['weights']:,} weights in {results['layers']} layers, "
        f"median of {results['repeats']} alternating runs.",
        "",
        "| case | median s | weights/s | time vs FINN | peak memory / fp32 weight bytes |",
        "|---|---|---|---|---|",
    ]
    for name, c in results["cases"].items():
        lines.append(f"| {name} | {c['median_s']:.3f} | {c['weights_per_s']:.3g} | {c['ratio_vs_finn']:.2f}x | "
                     f"{c['peak_mem_over_weight_bytes']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run(args.repeats)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
