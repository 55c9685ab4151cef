"""The benchmark suite: every model x accumulator width x method, against Brevitas A2Q / A2Q+ and FINN.

    .venv/bin/python -m bench.run_all                 # full run: BENCHMARKS.md, bench/results.json, bench/plots/*.png
    .venv/bin/python -m bench.run_all --quick --out DIR   # CI-sized run (digits_cnn, 3 widths), written under DIR

Options: ``--models a,b`` (a subset of the configured models), ``--setups all,paper`` (a subset of
the set-ups, :data:`bench.anchors.SETUPS`), ``--widths P,...`` (a subset of the configured widths),
``--equal-budget-widths P,...`` (where the equal-budget rows run instead of the configured widths),
``--seed N`` (the training seed of every trained row, ours and the anchors'; the splits and budgets stay
as configured), ``--threads N`` (torch threads per model, default 1), ``--jobs N`` (models run at once, each in
its own process; default 2), ``--no-speed`` (skip the ResNet-50-sized speed benchmark),
``--no-finn`` (skip FINN resource estimates), ``--render RESULTS_JSON`` (rewrite BENCHMARKS.md and the
plots from a saved run, without running anything). Quick mode never writes the committed results: it
needs ``--out`` elsewhere (a fresh temporary folder when omitted). One torch thread per model is the default
because two ran 4x slower per training step on the shared 2-core machine, with other processes
competing for the cores; two models at once use both cores without that contention. Every model runs in a fresh
process, so ``--jobs`` does not change any row (a test checks this).

Run time: the whole configuration (both set-ups, the equal-budget rows, QAT also at widths the committed model
fits) took 44.1 min on 2026-12-04 with two models at a time (BENCHMARKS.md; only low-priority jobs beside it),
against 104.9 min one at a time the same day with other jobs sharing the 2 cores. fmnist_cnn's set-up ``all`` is
the longest model (28 min): no number of jobs brings the run below that. ``--models``/``--setups``/``--widths``
run a part; ``bench.protocol`` merges parts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.anchors import SETUPS, TrainBudget
from bench.sweep import EQUAL_BUDGET_METHODS, METHODS, ModelBench, finn_resources, run_model

REPO = Path(__file__).resolve().parent.parent
FPGA_PART = "xczu3eg-sbva484-1-e"  # Ultra96 (ZU3EG), the part the project's other FINN reports use
SPEED_REPEATS = 3

FMNIST_CNN = ModelBench("fmnist_cnn", widths=(32, 20, 16, 15, 14, 13, 12, 11, 10),
                        train_widths=(32, 16, 15, 14, 13, 12, 11, 10),
                        budget=TrainBudget(samples=40000, epochs=1, batch_size=64, lr=5e-4), val_samples=2000,
                        calibration_samples=512, resources=True, equal_budget_widths=(12, 11))
DIGITS_CNN = ModelBench("digits_cnn", widths=(32, 16, 15, 14, 13, 12, 11, 10),
                        train_widths=(32, 15, 14, 13, 12, 11, 10),
                        budget=TrainBudget(samples=1077, epochs=15, batch_size=32, lr=1e-3), val_samples=360,
                        calibration_samples=512, equal_budget_widths=(32, 15, 14, 13, 12, 11, 10))
FMNIST_MLP = ModelBench("fmnist_mlp", widths=(32, 20, 18, 16, 15, 14, 13, 12),
                        train_widths=(20, 18, 16, 15, 14, 13, 12),
                        budget=TrainBudget(samples=40000, epochs=2, batch_size=64, lr=5e-4), val_samples=2000,
                        calibration_samples=512, equal_budget_widths=(16, 15))

FULL: tuple[ModelBench, ...] = (
    FMNIST_CNN,
    DIGITS_CNN,
    FMNIST_MLP,
    ModelBench("espcn_x2", widths=(32, 16, 15, 14, 13, 12, 11),
               train_widths=(16, 15, 14, 13, 12, 11),
               budget=TrainBudget(samples=1792, epochs=2, batch_size=16, lr=5e-4), val_samples=256,
               calibration_samples=128),
    # the A2Q papers' set-up; ESPCN's is the one above already (its first and last layers are 8-bit, unconstrained)
    replace(FMNIST_CNN, setup="paper", widths=(32, 13, 12, 11), train_widths=(12, 11), resources=False),
    replace(DIGITS_CNN, setup="paper"),
    # its one hidden layer (Gemm_1) needs 13 bits: at 16 and 15 only the anchors retrain, 12 and 11 bind
    replace(FMNIST_MLP, setup="paper", widths=(32, 16, 15, 13, 12, 11), train_widths=(16, 15, 12, 11),
            equal_budget_widths=(16, 15, 12, 11)),
)

_DIGITS_QUICK = ModelBench("digits_cnn", widths=(32, 12, 10), train_widths=(12, 10),
                           budget=TrainBudget(samples=256, epochs=1, batch_size=32, lr=1e-3), val_samples=120,
                           calibration_samples=64, test_limit=None, resources=True, equal_budget_widths=(12,))
QUICK: tuple[ModelBench, ...] = (
    _DIGITS_QUICK,
    # the equal-budget rows once (set-up all): their anchors train the W4A4 model's 21,555 QAT samples more
    replace(_DIGITS_QUICK, setup="paper", widths=(32, 12), train_widths=(12,), resources=False, equal_budget_widths=()),
)


def only_widths(bench: ModelBench, widths: set[int]) -> ModelBench:
    """``bench`` restricted to the widths P in ``widths`` (its trained and equal-budget widths too)."""
    keep = lambda values: tuple(p for p in values if p in widths)  # noqa: E731  (keeps the configured order)
    return replace(bench, widths=keep(bench.widths), train_widths=keep(bench.train_widths),
                   equal_budget_widths=keep(bench.equal_budget_widths))


@dataclass(frozen=True)
class Layout:
    """Where one run writes: the Markdown report, the JSON of all rows and the plots."""

    markdown: Path
    results: Path
    plots: Path

    @classmethod
    def committed(cls) -> "Layout":
        return cls(REPO / "BENCHMARKS.md", REPO / "bench" / "results.json", REPO / "bench" / "plots")

    @classmethod
    def under(cls, folder: Path) -> "Layout":
        return cls(folder / "BENCHMARKS.md", folder / "results.json", folder / "plots")

    def relative_plot(self, name: str) -> str:
        return (self.plots / name).relative_to(self.markdown.parent).as_posix()


def _versions() -> dict[str, str]:
    names = ("torch", "brevitas", "qonnx", "finn-plus", "onnx", "onnxruntime", "numpy")
    return {"python": platform.python_version(), **{name: version(name) for name in names}}


def _resources(bench: ModelBench, ctx, rows: list[dict[str, Any]], best_models: dict) -> None:
    """FINN estimates of the quantized baseline (exact widths) and of every ours-best row, stored in the rows."""
    targets = [(row, ctx.base) for row in rows if row["method"] == "quantized"]
    targets += [(row, best_models[row["P"]]) for row in rows
                if row["method"] == "ours-best" and row["status"] == "ok" and row["P"] in best_models]
    done: dict[int, dict[str, Any]] = {}
    for row, model in tqdm(targets, desc=f"{bench.name} FINN resources", unit="model", disable=not ctx.progress):
        key = id(model)
        if key not in done:
            done[key] = finn_resources(model, FPGA_PART)
        row["finn"] = done[key]


def with_seed(bench: ModelBench, seed: int) -> ModelBench:
    """``bench`` with training seed ``seed``: our fine-tuning's, the anchors' and the float start's (its torch seed);
    the data splits, budgets and widths are unchanged."""
    return replace(bench, budget=replace(bench.budget, seed=seed))


def measure_bench(bench: ModelBench, threads: int, finn: bool, progress: bool) -> dict[str, Any]:
    """Every row of one model and set-up, with its FINN estimates: the run's ``results["models"]`` entry.

    :func:`run` calls it in a fresh process per model, so no model's rows depend on what ran before it in the same
    interpreter (random state, caches) and ``--jobs`` cannot change a result."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    ctx, rows, best_models = run_model(bench, on_row=partial(_log_row, bench.key),
                                       keep_models=finn and bench.resources, progress=progress)
    if finn and bench.resources:
        _resources(bench, ctx, rows, best_models)
    return {
        "model": bench.name, "setup": bench.setup, "plain_modules": list(ctx.plain_modules),
        "extra_budget": asdict(ctx.extra_budget), "config": asdict(bench), "variant": bench.variant,
        "dataset": ctx.dataset, "metric": ctx.metric,
        "float_score": ctx.float_score, "plain_width": ctx.plain_width, "constrained_layers": ctx.constrained,
        "train_samples": len(ctx.train[0]), "val_samples": len(ctx.val[0]), "test_samples": len(ctx.test[0]),
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }


def run(benches: tuple[ModelBench, ...], layout: Layout, threads: int, speed: bool, finn: bool,
        command: str, jobs: int = 1) -> dict[str, Any]:
    """Each model in its own process, ``jobs`` at a time, in the configured order; the speed benchmark alone after."""
    from bench import bench_speed

    started = time.perf_counter()
    results: dict[str, Any] = {"command": command, "threads": threads, "jobs": jobs, "versions": _versions(),
                               "fpgapart": FPGA_PART, "models": {}}
    # spawn, one task per process: a fresh interpreter per model (fork would copy this one's torch state);
    # concurrent models' progress bars would overwrite each other, so they show only their rows and this bar
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = {bench.key: pool.submit(measure_bench, bench, threads, finn, jobs == 1) for bench in benches}
        with tqdm(total=len(futures), desc=f"models ({jobs} at a time)", unit="model", disable=jobs == 1) as bar:
            try:
                for done in as_completed(futures.values()):
                    done.result()  # a failed model: its traceback, once the models already running have ended
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the models not started yet are not run
                raise
        results["models"] = {key: future.result() for key, future in futures.items()}
    if speed:
        tqdm.write("speed benchmark (ResNet-50-sized model) ...")
        results["speed"] = bench_speed.run(SPEED_REPEATS)
        results["speed_markdown"] = bench_speed.markdown(results["speed"])
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    layout.results.parent.mkdir(parents=True, exist_ok=True)
    layout.results.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    write_outputs(results, layout)
    return results


def write_outputs(results: dict[str, Any], layout: Layout) -> None:
    """The plots and BENCHMARKS.md of one run's results."""
    from bench.markdown import render
    from bench.plots import accuracy_plot, sparsity_plot

    layout.plots.mkdir(parents=True, exist_ok=True)
    accuracy_plot(results["models"], layout.plots / "accuracy_vs_P.png")
    sparsity_plot(results["models"], layout.plots / "sparsity_vs_P.png")
    layout.markdown.parent.mkdir(parents=True, exist_ok=True)
    layout.markdown.write_text(render(results, layout))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _log_row(key: str, row: dict[str, Any]) -> None:
    """One finished row on the log, labelled with its model and set-up (models running at once interleave)."""
    if row["status"] != "ok":
        return
    score = f"{row['score']:.2f}" if row["score"] is not None else "-"
    tqdm.write(f"  {key:<16} P={row['P']:>2} {row['method']:<18} score {score:>6}  "
               f"width {row['guaranteed_width']}  sparsity {row['sparsity']:.3f}  {row['seconds']} s  {row['note']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CI configuration (digits_cnn, 3 widths)")
    parser.add_argument("--out", type=Path, help="write BENCHMARKS.md, results.json and plots/ under this folder")
    parser.add_argument("--models", help="comma-separated subset of the configured models")
    parser.add_argument("--setups", help=f"comma-separated subset of the set-ups ({', '.join(SETUPS)}; default both): "
                                         + "; ".join(f"{k} = {v}" for k, v in SETUPS.items()))
    parser.add_argument("--widths", help="comma-separated subset of the configured widths P (every method runs "
                                         "only at these)")
    parser.add_argument("--equal-budget-widths", metavar="P,...",
                        help=f"run the equal-budget rows ({', '.join(EQUAL_BUDGET_METHODS)}) at these of "
                             "the trained widths instead of the configured ones")
    parser.add_argument("--methods", metavar="METHOD,...",
                        help="run only these methods (default: every one); e.g. qat-float-eq alone adds that row to "
                             "an earlier run of the same widths and seed (bench.protocol merges them)")
    parser.add_argument("--seed", type=int,
                        help="training seed of every trained row on both sides (our fine-tuning, the anchors, the "
                             "float start's torch seed); default: the configured one (0). Splits and budgets stay")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1: on the shared 2-core machine 2 threads ran 4x "
                             "slower)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="models run at once, each in its own process with --threads torch threads (default: "
                             "2, or 1 on a 1-core machine); the results do not depend on it")
    parser.add_argument("--no-speed", action="store_true", help="skip the ResNet-50-sized speed benchmark")
    parser.add_argument("--no-finn", action="store_true", help="skip FINN resource estimates")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="only rewrite the report and plots from a saved results.json (no benchmark run)")
    args = parser.parse_args(argv)
    benches = QUICK if args.quick else FULL
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {b.name for b in benches})
        if unknown:
            parser.error(f"--models: {unknown} not configured; choose from {[b.name for b in benches]}")
        benches = tuple(b for b in benches if b.name in wanted)
    if args.setups:
        setups = args.setups.split(",")
        unknown = sorted(set(setups) - set(SETUPS))
        if unknown:
            parser.error(f"--setups: {unknown} unknown; choose from {list(SETUPS)}")
        benches = tuple(b for b in benches if b.setup in setups)
    if args.widths:
        benches = tuple(only_widths(b, {int(p) for p in args.widths.split(",")}) for b in benches)
        benches = tuple(b for b in benches if b.widths)
    if args.equal_budget_widths:
        wanted_p = [int(p) for p in args.equal_budget_widths.split(",")]
        benches = tuple(replace(b, equal_budget_widths=tuple(p for p in wanted_p if p in b.train_widths))
                        for b in benches)
    if args.methods:
        wanted_methods = tuple(args.methods.split(","))
        unknown = sorted(set(wanted_methods) - {m.key for m in METHODS})
        if unknown:
            parser.error(f"--methods: {unknown} unknown; choose from {[m.key for m in METHODS]}")
        benches = tuple(replace(b, methods=wanted_methods) for b in benches)
    if args.seed is not None:
        benches = tuple(with_seed(b, args.seed) for b in benches)
    if not benches:
        parser.error("nothing to run: no configured model / set-up / width matches")
    if args.out is not None:
        layout = Layout.under(args.out.resolve())
    elif args.quick:
        layout = Layout.under(Path(tempfile.mkdtemp(prefix="a2q-bench-quick-")))
    else:
        layout = Layout.committed()
    committed = Layout.committed()
    if args.quick and {layout.markdown, layout.results, layout.plots} & {committed.markdown, committed.results,
                                                                          committed.plots}:
        parser.error("--quick must not overwrite the committed results; give --out a different folder")
    if args.render is not None:
        results = json.loads(args.render.read_text())
        write_outputs(results, layout)
        print(f"rewrote {layout.markdown} and {layout.plots}/ from {args.render}")
        return results
    command = shlex.join(["python", "-m", "bench.run_all", *(sys.argv[1:] if argv is None else argv)])
    results = run(benches, layout, args.threads, speed=not (args.quick or args.no_speed), finn=not args.no_finn,
                  command=command, jobs=max(1, args.jobs))
    print(f"wrote {layout.markdown}, {layout.results}, {layout.plots}/ in {results['total_seconds']} s")
    return results


if __name__ == "__main__":
    main()
