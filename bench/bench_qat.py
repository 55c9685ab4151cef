"""QAT variants of ``a2q finetune`` against Brevitas A2Q+ at equal budgets (issue 11), written to bench/qat.md.

    .venv/bin/python -m bench.bench_qat                        # every configured point, then the longer budget
    .venv/bin/python -m bench.bench_qat --models digits_cnn --no-long --out /tmp/qat.md
    .venv/bin/python -m bench.bench_qat --render A.json B.json    # bench/qat.md from the rows of separate runs

For each (model, P) of :data:`POINTS` (budgets of :data:`bench.run_all.FULL`: samples, epochs, batch,
lr, seed; the best epoch on the same validation samples; weights and activation scales trained, as
:mod:`bench.sweep` does): every variant of :data:`VARIANTS` through :class:`FinetuneAccumulators` from
the committed W4A4 model, and Brevitas A2Q+ (:func:`bench.anchors.train_anchor`, from the float
checkpoint) with the same budget. After all of them, :data:`LONG` repeats the new default (where
``--variants`` holds it) and A2Q+ with ``LONG_EPOCHS`` epochs. Scores: test split, ``models.evaluate`` (ONNX for ours, torch for the anchor).
Every output of ours is checked with :func:`a2q_passes.verification.verify_model` against the widths it
records (what ``a2q verify OUT`` does); ``verified`` must be yes. Rows are kept in ``--json`` as they
finish, so the Markdown can be rendered again (``--render``) from a partial run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

from bench.anchors import ANCHOR_QUANTIZERS, integer_layers, predict, train_anchor
from bench.sweep import MODELS_DIR, Context, OnnxScorer, load_context

REPO = Path(__file__).resolve().parent.parent
POINTS: dict[str, tuple[int, ...]] = {"fmnist_cnn": (12, 11, 13), "digits_cnn": (12, 11), "fmnist_mlp": (16, 15)}
# key -> (label, FinetuneConfig fields); "old" is what `a2q finetune` did before issue 11
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "old": ("old default (qat, init project)", dict(method="qat", init="project")),
    "scaled": ("qat, init scaled", dict(method="qat", init="scaled")),
    "norm": ("norm, init scaled (new default)", dict(method="norm", init="scaled")),
    "axe": ("qat, init axe", dict(method="qat", init="axe")),
    "distill": ("qat, init scaled, distill", dict(method="qat", init="scaled", distill=True)),
    "warmup": ("qat, init scaled, warm-up 0.1", dict(method="qat", init="scaled", warmup=0.1)),
}
NEW_DEFAULT = "norm"
ANCHOR = "brevitas-a2q+"
# rows that --committed takes from the committed benchmark run (same budget, same code) instead of training again
COMMITTED = {"old": "qat", ANCHOR: ANCHOR}
LONG: dict[str, tuple[int, ...]] = {"fmnist_cnn": (11,)}
LONG_EPOCHS = 5


def _ours(ctx: Context, scorer: OnnxScorer, acc_bits: int, fields: dict[str, Any]) -> dict[str, Any]:
    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.transforms.finetune import FinetuneAccumulators
    from a2q_passes.verification import verify_model

    budget = ctx.bench.budget
    config = FinetuneConfig(loss="mse" if ctx.dataset == "sr" else "ce", epochs=budget.epochs, lr=budget.lr,
                            batch_size=budget.batch_size, seed=budget.seed, device="cpu", train_act_scales=True,
                            progress=False, log=lambda line: None, **fields)
    step = FinetuneAccumulators(None, ctx.train, ctx.val, config, overrides={n: acc_bits for n in ctx.constrained},
                                calibration_samples=ctx.bench.calibration_samples)
    out = ctx.base.transform(step)
    measured = scorer.measure(out)
    return {**measured, "best_epoch": step.result.details["best_epoch"],
            "verified": bool(verify_model(out).overflow_impossible) and measured["guaranteed_width"] <= acc_bits}


def _anchor(ctx: Context, acc_bits: int) -> dict[str, Any]:
    bench = ctx.bench
    quantizer = ANCHOR_QUANTIZERS[ANCHOR]
    run = train_anchor(bench.name, quantizer, acc_bits, bench.weight_bits, bench.act_bits, ctx.train, ctx.val,
                       ctx.score, bench.budget, MODELS_DIR / "checkpoints" / f"{bench.name}_float.pt",
                       desc=f"{ANCHOR} P={acc_bits}")
    width = max(layer.exact_width for layer in integer_layers(run.model, quantizer, ctx.test[0]))
    return {"score": ctx.score(predict(run.model, ctx.test[0]), ctx.test[1]), "val_score": max(run.val_history),
            "best_epoch": run.best_epoch, "guaranteed_width": width, "verified": None}


def _with_epochs(ctx: Context, epochs: int) -> Context:
    bench = dataclasses.replace(ctx.bench, budget=dataclasses.replace(ctx.bench.budget, epochs=epochs))
    return dataclasses.replace(ctx, bench=bench)


def _key(row: dict[str, Any]) -> tuple:
    return row["model"], row["P"], row["variant"], row["epochs"]


def _committed(ctx: Context, acc_bits: int, method: str) -> dict[str, Any]:
    """A row of bench/results.json (the committed `make bench` run) for ``method`` at ``acc_bits``."""
    results = json.loads((REPO / "bench" / "results.json").read_text())["models"][ctx.bench.name]
    row = next(r for r in results["rows"] if r["method"] == method and r["P"] == acc_bits)
    return {"score": row["score"], "val_score": row["val_score"], "best_epoch": row.get("best_epoch", "-"),
            "guaranteed_width": row["guaranteed_width"], "verified": None, "source": "bench/results.json"}


def run(models: list[str], variants: list[str], committed: bool, long: bool, short: bool, store: Path,
        out: Path, widths: set[int] | None = None) -> None:
    rows: list[dict[str, Any]] = json.loads(store.read_text()) if store.is_file() else []

    def record(ctx: Context, acc_bits: int, variant: str, started: float, fields: dict[str, Any]) -> None:
        budget = ctx.bench.budget
        row = {"model": ctx.bench.name, "P": acc_bits, "variant": VARIANTS[variant][0] if variant in VARIANTS else variant,
               "epochs": budget.epochs,
               "samples": len(ctx.train[0]), "float": ctx.float_score, "seconds": round(time.perf_counter() - started, 1),
               **fields}
        rows[:] = [r for r in rows if _key(r) != _key(row)] + [row]
        store.write_text(json.dumps(rows, indent=1) + "\n")
        out.write_text(render(rows))
        print(f"{row['model']} P={acc_bits} {budget.epochs} ep {variant}: {row['score']:.2f} "
              f"(val {row['val_score']:.2f}, width {row['guaranteed_width']}, verified {row['verified']}, "
              f"{row['seconds']:.0f} s)", flush=True)

    contexts = {name: load_context(_bench(name)) for name in models}
    for name, ctx in contexts.items() if short else ():
        scorer = OnnxScorer(ctx)
        for acc_bits in [p for p in POINTS[name] if widths is None or p in widths]:
            for key in [*variants, ANCHOR]:
                started = time.perf_counter()
                if committed and key in COMMITTED:
                    fields = _committed(ctx, acc_bits, COMMITTED[key])
                elif key == ANCHOR:
                    fields = _anchor(ctx, acc_bits)
                else:
                    fields = _ours(ctx, scorer, acc_bits, VARIANTS[key][1])
                record(ctx, acc_bits, key, started, fields)
    for name in [name for name in models if long and name in LONG]:  # after every short run: the longest last
        longer = _with_epochs(contexts[name], LONG_EPOCHS)
        scorer = OnnxScorer(longer)
        for acc_bits in [p for p in LONG[name] if widths is None or p in widths]:
            if NEW_DEFAULT in variants:
                started = time.perf_counter()
                record(longer, acc_bits, NEW_DEFAULT, started, _ours(longer, scorer, acc_bits, VARIANTS[NEW_DEFAULT][1]))
            started = time.perf_counter()
            record(longer, acc_bits, ANCHOR, started, _anchor(longer, acc_bits))


def _bench(name: str):
    from bench.run_all import FULL

    return {b.name: b for b in FULL}[name]


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["# QAT variants against Brevitas A2Q+ at equal budgets", "",
             "Test-split scores (top-1 %) from `a2q finetune` (library: `FinetuneAccumulators`) on the committed W4A4 "
             "model, every MAC layer constrained to P, with each model's benchmark budget (bench/run_all.py: "
             "samples x epochs, batch, lr, seed 0, weights and activation scales trained, best epoch on the "
             "benchmark's validation samples), and Brevitas A2Q+ trained from the float checkpoint with the same "
             "budget. `verified`: `a2q verify` (recorded widths) proves every constrained layer fits P. "
             "Seconds are wall time on the shared 2-core machine (other jobs running).", "",
             "| model | P | budget | variant | test | % of float | val | width | verified | best epoch | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate([*(label for label, _ in VARIANTS.values()), ANCHOR])}
    for row in sorted(rows, key=lambda r: (list(POINTS).index(r["model"]), r["epochs"], -r["P"], order[r["variant"]])):
        verified = "-" if row["verified"] is None else ("yes" if row["verified"] else "**NO**")
        lines.append(f"| {row['model']} | {row['P']} | {row['samples']} x {row['epochs']} | {row['variant']} | "
                     f"{row['score']:.2f} | {100 * row['score'] / row['float']:.1f}% | {row['val_score']:.2f} | "
                     f"{row['guaranteed_width']} | {verified} | {row['best_epoch']} | "
                     + (f"{row['seconds']:.0f} |" if "source" not in row else f"from {row['source']} |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(POINTS), help="comma-separated subset of " + ", ".join(POINTS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--committed", action="store_true",
                        help="take the old default and A2Q+ rows from bench/results.json (the committed benchmark run, "
                             "same budget) instead of training them again")
    parser.add_argument("--widths", help="comma-separated subset of each model's P (default: all configured)")
    parser.add_argument("--no-long", action="store_true", help=f"skip the {LONG_EPOCHS}-epoch runs")
    parser.add_argument("--long-only", action="store_true", help=f"only the {LONG_EPOCHS}-epoch runs")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "qat.json", help="rows kept here as they finish")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "qat.md")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only write --out from the rows of these files (runs of other --models)")
    args = parser.parse_args(argv)
    if args.render:
        rows = {_key(row): row for path in args.render for row in json.loads(path.read_text())}  # a later file wins
        args.out.write_text(render(list(rows.values())))
        return
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    models, variants = args.models.split(","), args.variants.split(",")
    for option, chosen, known in (("--models", models, POINTS), ("--variants", variants, VARIANTS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"{option}: {unknown} not configured; choose from {list(known)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(models, variants, args.committed, not args.no_long, not args.long_only, args.json, args.out,
            {int(p) for p in args.widths.split(",")} if args.widths else None)


if __name__ == "__main__":
    main()
