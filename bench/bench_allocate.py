"""Mixed accumulator allocation vs uniform P: Pareto fronts and the 99 % target per model.

    .venv/bin/python -m bench.bench_allocate [--method project|finetune] [--models fmnist_cnn_w4a4 ...] [--pct 99]
    .venv/bin/python -m bench.bench_allocate --render   # rewrite bench/allocate.md and the plots from the saved JSON

Per model: calibration data = the first samples of the training split (per-layer sensitivities),
validation data = the last samples of the training split (end-to-end checks and the choice of the
best uniform P), test data = the test split (reported, never used to choose). ``a2q allocate``'s
pass (:class:`AllocateAccumulators`, projection ``exact``, cost = accumulator + threshold bits)
picks the allocation at ``--pct`` % of the model's own validation score; the uniform reference is
the cheapest uniform P whose projected model keeps the same % on the same validation data. Both
fronts (score vs accumulator + threshold bits, validation data) go to ``bench/plots/allocate_pareto.png``
and every number to ``bench/allocate.json``. Every allocated model is proven to fit its widths
(the pass's ``ensures``: :func:`a2q_passes.verification.verify_model`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.output_files import atomic_write_text
from a2q_passes.finetune.train import FinetuneConfig
from a2q_passes.scoring import Scorer
from a2q_passes.transforms.allocate import AllocateAccumulators, allocation_costs, pareto_curves
from a2q_passes.verification import verify_model
from models.data import load_dataset

REPO = Path(__file__).resolve().parent.parent
# model -> (dataset, calibration samples, validation samples, fine-tuning samples)
MODELS = {
    "fmnist_cnn_w4a4": ("fashion_mnist", 2000, 2000, 8000),
    "fmnist_mlp_w4a4": ("fashion_mnist", 2000, 2000, 8000),
    "espcn_x2_w4a4": ("sr", 512, 512, 512),
}
# --method finetune: every end-to-end check (allocation, refinement, uniform P, front) fine-tunes first, with
# `a2q finetune`'s defaults (method norm, init scaled). One epoch over the fine-tuning samples: on fmnist_cnn at
# P=12 it keeps 99.8% of the model's validation score with 8000 samples (48 s on one thread) against 98.6% with
# 2 epochs over 2000 (33 s); ~25 fine-tunes per model must fit the benchmark's quarter of an hour.
FINETUNE = FinetuneConfig(epochs=1, lr=1e-3, batch_size=64, seed=0, progress=False, log=lambda line: None)
RUNS = {"project": ("allocate.json", "allocate_pareto.png", "Projection (PTQ, method `exact`)"),
        "finetune": ("allocate_finetune.json", "allocate_pareto_finetune.png",
                     "With fine-tuning (`a2q finetune` defaults: norm, init scaled; 1 epoch over the first "
                     "fine-tuning samples of the training split (MODELS: 8000; 512 for espcn_x2), at every evaluated "
                     "allocation)")}


def run_model(name: str, pct: float, method: str) -> dict[str, Any]:
    dataset, n_calib, n_val, n_train = MODELS[name]
    x, y = load_dataset(dataset, "train")
    x_test, y_test = load_dataset(dataset, "test")
    model = ModelWrapper(str(REPO / "models" / f"{name}.onnx"))
    started = time.perf_counter()
    train = (x[:n_train], y[:n_train]) if method == "finetune" else None  # never the validation samples
    assert n_train <= len(x) - n_val
    step = AllocateAccumulators((x[:n_calib], y[:n_calib]), (x[-n_val:], y[-n_val:]), min_score_pct=pct,
                                method=method, early_stop=False, finetune_config=FINETUNE, train=train)
    result = step(model)
    allocate_seconds = time.perf_counter() - started
    details = result.details
    curves = pareto_curves(model, step, points=10)
    test = Scorer(model, (x_test, y_test), step.scorer.metric, "test split")
    target = details["target_val_score"]
    meeting = [u for u in curves["uniform"] if u["score"] >= target]
    uniform = min(meeting, key=lambda u: u["acc_threshold_bits"])
    uniform_model, _ = step.end_to_end(model, uniform["widths"])  # projected (or fine-tuned) as the allocation
    assert verify_model(uniform_model, uniform["widths"]).overflow_impossible
    allocation = {"widths": details["widths"], **allocation_costs(step.layers, details["widths"]),
                  "val_score": details["val_score"], "test_score": test(result.model)}
    return {
        "model": name, "method": method, "dataset": dataset, "metric": details["metric"], "samples": {
            "calibration": n_calib, "validation": n_val, "test": int(len(x_test)),
            **({"fine-tuning": n_train} if method == "finetune" else {})},
        "pct": pct, "allocate_seconds": round(allocate_seconds, 1),
        "base": {"calibration": details["base_score"], "validation": details["base_val_score"], "test": test(model)},
        "target_val_score": target, "allocation": allocation, "verified": True,  # ensures() raised otherwise
        "uniform_best": {"P": uniform["P"], "widths": uniform["widths"], "acc_threshold_bits": uniform["acc_threshold_bits"],
                         "finn_lut": uniform["finn_lut"], "val_score": uniform["score"],
                         "test_score": test(uniform_model)},
        "bits_saving_pct": 100.0 * (1.0 - allocation["acc_threshold_bits"] / uniform["acc_threshold_bits"]),
        "refinement": details["refinement"], "layers": details["layers"], "curves": curves,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from a2q_passes.cli.allocate import draw_pareto
    from a2q_passes.report import save_figure

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.3))
    for ax, entry in zip(np.atleast_1d(axes), results):
        chosen = {"acc_threshold_bits": entry["allocation"]["acc_threshold_bits"], "score": entry["allocation"]["val_score"]}
        draw_pareto(ax, entry["curves"], entry["model"], chosen, entry["target_val_score"])
        top = entry["base"]["validation"]
        ax.set_ylim(top - 0.25 * abs(top), top + 0.03 * abs(top))  # the region around the target
        ax.set_ylabel(f"{entry['metric']} (validation)")
    save_figure(fig, path)
    plt.close(fig)


def _limits(results: list[dict[str, Any]]) -> list[str]:
    """Per model: each layer's narrowest width that alone keeps the target, and the bits if all sat there."""
    lines = ["", "Why: the narrowest width at which each layer *alone* keeps the target on the calibration data "
             "(single-layer sensitivity; widths below it cost more than the whole allowed loss), and the "
             "accumulator + threshold bits if every layer sat there at once (optimistic: the losses add up):", ""]
    for r in results:
        floor = r["pct"] / 100.0 * r["base"]["calibration"]
        limits = {la["node"]: min(int(p) for p, score in la["scores"].items() if score >= floor) for la in r["layers"]}
        bound = sum(la["costs"][str(limits[la["node"]])] for la in r["layers"])
        text = ", ".join(f"{la['node']} {limits[la['node']]}/{la['exact_bits']}" for la in r["layers"])
        lines.append(f"- {r['model']} (limit/exact): {text}; {bound} bits, "
                     f"{100 * (1 - bound / r['uniform_best']['acc_threshold_bits']):.1f}% below the best uniform P.")
    return lines


def _finetune_limits(results: list[dict[str, Any]]) -> list[str]:
    """Per model: where the bits sit at the best uniform P, and what caps any allocation's saving (measured)."""
    lines = ["", "Why the saving stays below 20% (numbers from the runs above; threshold storage is MH x 15 x (P + 1) "
             "bits per layer, so a layer's share is fixed by its channel count):", ""]
    for r in results:
        u = r["uniform_best"]
        costs = {la["node"]: {int(p): c for p, c in la["costs"].items()} for la in r["layers"]}
        exact = {la["node"]: la["exact_bits"] for la in r["layers"]}
        smallest = {la["node"]: la["min_feasible_bits"] for la in r["layers"]}
        shares = ", ".join(f"{n} {100 * costs[n][w] / u['acc_threshold_bits']:.0f}%" for n, w in u["widths"].items())
        below = next((c for c in r["curves"]["uniform"] if c["P"] == u["P"] - 1), None)
        line = f"- {r['model']}: at the best uniform P={u['P']} ({u['acc_threshold_bits']} bits): {shares}."
        if below is not None:
            narrowed = [n for n, w in below["widths"].items() if w < exact[n]]
            line += (f" Uniform P={u['P'] - 1} ({below['acc_threshold_bits']} bits, "
                     f"{100 * (1 - below['acc_threshold_bits'] / u['acc_threshold_bits']):.1f}% fewer) scores "
                     f"{below['score']:.2f} < {r['target_val_score']:.2f}")
            if len(narrowed) == 1:  # only that layer is below its exact width there: it alone misses the target
                pinned = narrowed[0]
                floor = {n: (u["widths"][n] if n == pinned else smallest[n]) for n in u["widths"]}
                bound = sum(costs[n][w] for n, w in floor.items())
                line += (f", and there only {pinned} is narrower than its exact width, so {pinned} stays at "
                         f"{u['widths'][pinned]} in any allocation meeting the target (narrowing other layers too does not "
                         f"raise the score); with every other layer at its "
                         f"smallest feasible width (no score loss assumed) the saving is at most "
                         f"{100 * (1 - bound / u['acc_threshold_bits']):.1f}%.")
            else:
                per_bit = sum(costs[n][u["widths"][n]] - costs[n][u["widths"][n] - 1] for n in u["widths"]
                              if u["widths"][n] - 1 in costs[n])
                line += (f"; every layer is narrowed there. 20% of the bits means on average "
                         f"{0.2 * u['acc_threshold_bits'] / per_bit:.1f} bits below P={u['P']} per layer "
                         f"(weighted by threshold storage), where one bit below already misses.")
        rejected = [f"{step['node']}={step['widths'][step['node']]} scores {step['score']:.2f}"
                    for step in r["refinement"] if step["action"] == "lower rejected"]
        if rejected:
            line += (f" Refinement's fine-tuned trials one bit below (each rejected, target {r['target_val_score']:.3f}, "
                     "with the other layers where the search stood): " + ", ".join(rejected) + ".")
        lines.append(line)
    return lines


def markdown(results: list[dict[str, Any]], command: str, seconds: float, method: str) -> list[str]:
    _, plot_name, title = RUNS[method]
    lines = [
        f"## {title}",
        "",
        f"`{command}` ({seconds / 60:.1f} min, 1 torch thread). Calibration (sensitivities) = first samples of "
        "the training split, validation (end-to-end checks, best uniform P) = last samples of the training "
        "split, test = test split, reported only. Cost = accumulator registers + threshold storage bits "
        "(MH x (2^B - 1) thresholds of P + 1 bits, PE x P register bits, FINN lowering with PE = 1); "
        "FINN LUT = `MVAU_hls.lut_estimation` summed over the allocated layers. "
        "Every allocated model is proven to fit its widths (`verify_model`).",
        "",
        f"![allocation vs uniform P, {method}](bench/plots/{plot_name})",
        "",
        "| model | metric | model (val / test) | target (val) | allocation widths | alloc. bits | alloc. LUT "
        "| alloc. val / test | best uniform P | uniform bits | uniform LUT | uniform val / test | bits saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, u = r["allocation"], r["uniform_best"]
        widths = ", ".join(f"{k}={v}" for k, v in a["widths"].items())
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['base']['validation']:.2f} / {r['base']['test']:.2f} "
            f"| {r['target_val_score']:.2f} | {widths} | {a['acc_threshold_bits']} | {a['finn_lut']} "
            f"| {a['val_score']:.2f} / {a['test_score']:.2f} | {u['P']} | {u['acc_threshold_bits']} | {u['finn_lut']} "
            f"| {u['val_score']:.2f} / {u['test_score']:.2f} | {r['bits_saving_pct']:.1f}% |")
    met = [r["model"] for r in results if r["bits_saving_pct"] >= 20.0]
    missed = [f"{r['model']} ({r['bits_saving_pct']:.1f}%)" for r in results if r["bits_saving_pct"] < 20.0]
    lines += ["", f"Target (>= 20% fewer accumulator + threshold bits than the best uniform P at >= "
              f"{results[0]['pct']:g}% of the model's own validation score): met on "
              f"{', '.join(met) or 'none'}" + (f"; missed on {', '.join(missed)}" if missed else "") + "."]
    if method == "finetune":
        lines += ["", "Sensitivities and the knapsack use projection; the end-to-end checks (refinement, uniform P, "
                  "front points) fine-tune. Projection alone is pessimistic here, so every width down to the smallest "
                  "feasible one stays a candidate, and the refinement starts from the least uniform P whose "
                  "fine-tuned model meets the target (bisection) wherever the knapsack's pick costs as much or more, "
                  "then lowers one layer a bit at a time while the fine-tuned score still meets the target. Widths "
                  "are chosen on the validation samples; the test line below shows how much of that carries over."]
        lines += _finetune_limits(results)
    else:
        lines += _limits(results)
    below = [f"{r['model']} allocation {100 * r['allocation']['test_score'] / r['base']['test']:.2f}%, uniform "
             f"{100 * r['uniform_best']['test_score'] / r['base']['test']:.2f}%" for r in results]
    lines += ["", "Test split, % of the model's own test score: " + "; ".join(below) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--method", choices=list(RUNS), default="project")
    parser.add_argument("--pct", type=float, default=99.0)
    parser.add_argument("--render", action="store_true", help="only rewrite allocate.md and the plots from the saved JSON")
    args = parser.parse_args()
    bench = REPO / "bench"
    if not args.render:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        started = time.perf_counter()
        results = []
        command = "python -m bench.bench_allocate" + (f" --method {args.method}" if args.method != "project" else "") + (
            f" --models {' '.join(args.models)}" if args.models != list(MODELS) else "")
        for name in args.models:  # saved after each model, so a long run keeps what it finished
            results.append(run_model(name, args.pct, args.method))
            atomic_write_text(bench / RUNS[args.method][0], json.dumps(
                {"command": command, "seconds": round(time.perf_counter() - started, 1), "results": results},
                indent=1) + "\n")
    lines = ["# Mixed accumulator allocation"]
    for method, (json_name, plot_name, _) in RUNS.items():
        if (bench / json_name).is_file():
            saved = json.loads((bench / json_name).read_text())
            plot(saved["results"], bench / "plots" / plot_name)
            lines += [""] + markdown(saved["results"], saved["command"], saved["seconds"], method)
    lines += ["", "FINN's LUT estimate caps the accumulator at the data-type bound and barely moves with P (see the FINN "
              "resources section), so `--budget-lut` budgets are nearly flat; the accumulator + threshold bits are "
              "what the width decides."]
    text = "\n".join(lines)
    atomic_write_text(bench / "allocate.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
