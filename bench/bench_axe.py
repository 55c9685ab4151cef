"""AXE against the plain projection on every benchmark row (issue 11: AXE never below ``a2q project``).

    .venv/bin/python -m bench.bench_axe                      # every model of bench.run_all.FULL, writes bench/axe.md
    .venv/bin/python -m bench.bench_axe --models espcn_x2    # a subset; --out FILE for the Markdown elsewhere

For each model and each trained P of :data:`bench.run_all.FULL` where the committed model does not
already fit, on the test split: ``a2q project`` (``exact``), AXE with every row kept (no held-out
check, no statistics refresh) and AXE as ``a2q finetune --method axe`` runs it by default (per-row
and per-layer choice on a held-out split of the training data, statistics refresh kept where it wins there). Calibration and held-out samples
come from the benchmark's training subset, as in :mod:`bench.sweep`. Every output is checked with
:func:`a2q_passes.verification.verify_model` against its recorded widths (what ``a2q verify OUT``
does). The committed results (``bench/results.json``, run before this change) give the "before" column.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from bench.sweep import Context, ModelBench, OnnxScorer, _project, load_context

REPO = Path(__file__).resolve().parent.parent


def _axe(ctx: Context, acc_bits: int, **options: Any) -> tuple[Any, list]:
    """``a2q finetune --method axe`` on the benchmark's training subset; ``options`` as FinetuneAccumulators'."""
    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.transforms.finetune import FinetuneAccumulators

    config = FinetuneConfig(method="axe", loss="mse" if ctx.dataset == "sr" else "ce", seed=ctx.bench.budget.seed,
                            device="cpu", progress=False, log=lambda line: None)
    step = FinetuneAccumulators(None, ctx.train, None, config, overrides={n: acc_bits for n in ctx.constrained},
                                calibration_samples=ctx.bench.calibration_samples, **options)
    return ctx.base.transform(step), step.result.details["axe"]


def _verified(model) -> bool:
    from a2q_passes.verification import verify_model

    return bool(verify_model(model).overflow_impossible)


def _choice(reports: list) -> str:
    return ", ".join(f"{r.node} {r.rows_axe}/{r.rows}" for r in reports)


def run(benches: tuple[ModelBench, ...], before: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for bench in benches:
        ctx = load_context(bench)
        scorer = OnnxScorer(ctx)
        old = {(r["method"], r["P"]): r["score"] for r in before.get(bench.name, {}).get("rows", [])}
        for acc_bits in bench.train_widths:
            if ctx.plain_width <= acc_bits:
                continue  # fits already: every method returns the committed model
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                projected = _project(ctx, "exact", acc_bits)
                axe_all, _ = _axe(ctx, acc_bits, held_out_samples=0, refresh="off")
                axe_safe, reports = _axe(ctx, acc_bits)
            row = {"model": bench.name, "P": acc_bits, "metric": ctx.metric,
                   "project": scorer.measure(projected)["score"], "axe_before": old.get(("axe", acc_bits)),
                   "axe_all_rows": scorer.measure(axe_all)["score"], "axe": scorer.measure(axe_safe)["score"],
                   "axe_rows_kept": _choice(reports), "refresh_kept": any(r.refreshed for r in reports),
                   "verified": all(_verified(m) for m in (projected, axe_all, axe_safe)),
                   "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}` (test split; AXE calibrates on the benchmark's calibration samples and, by default, checks "
        "itself on up to 2048 other training samples (at most half of the subset); `axe rows kept` = rows per constrained layer that kept "
        "their AXE weights, the others hold the exact projection's; `AXE before` is the `axe` row of "
        "`bench/results.json`, the last full `make bench`, whose per-model tables above still show it until the next "
        "full run).",
        "",
        "| model | P | project (exact) | AXE before (main) | AXE, every row | AXE (default: held-out choice) | "
        "AXE >= project | axe rows kept | statistics refresh kept | verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = f"{r['axe_before']:.2f}" if r["axe_before"] is not None else "-"
        lines.append(f"| {r['model']} | {r['P']} | {r['project']:.2f} | {before} | {r['axe_all_rows']:.2f} | "
                     f"{r['axe']:.2f} | {'yes' if r['axe'] >= r['project'] else '**no**'} | {r['axe_rows_kept']} | "
                     f"{'yes' if r['refresh_kept'] else 'no'} | "
                     f"{'yes' if r['verified'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import sys

    import torch

    from bench.run_all import FULL

    parser = argparse.ArgumentParser(prog="python -m bench.bench_axe", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset of bench.run_all.FULL")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "axe.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    benches = FULL if not args.models else tuple(b for b in FULL if b.name in args.models.split(","))
    before = json.loads((REPO / "bench" / "results.json").read_text())["models"]
    rows = run(benches, before)
    command = " ".join(["python -m bench.bench_axe", *(sys.argv[1:] if argv is None else argv)])
    args.out.write_text(markdown(rows, command))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
