"""AXE against the plain projection on every benchmark row (issue 11: AXE never below ``a2q project``).

    .venv/bin/python -m bench.bench_axe                      # every model and set-up of bench.run_all.FULL
    .venv/bin/python -m bench.bench_axe --models fmnist_mlp --setups paper --seeds 0-9 --out FILE --json RUN.json
    .venv/bin/python -m bench.bench_axe --render RUN.json RUN2.json   # one table from several runs

For each model, set-up, seed and trained P of :data:`bench.run_all.FULL` where the committed model does not
already fit, on the test split: ``a2q project`` (``exact``), AXE with every row kept (no held-out
check, no statistics refresh) and AXE as ``a2q finetune --method axe`` runs it by default (per-row
and per-layer choice on a held-out split of the training data, kept only where clearly better there, statistics
refresh likewise). Calibration and held-out samples come from the benchmark's training subset, drawn with the
seed, as in :mod:`bench.sweep`. Every output is checked with :func:`a2q_passes.verification.verify_model` against
its recorded widths (what ``a2q verify OUT`` does). The ``axe`` rows of ``bench/protocol.json`` (the merged
benchmark runs, made before this change) give the "before" column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from bench.protocol import row_seed
from bench.sweep import Context, ModelBench, OnnxScorer, _project, load_context

REPO = Path(__file__).resolve().parent.parent


def _axe(ctx: Context, acc_bits: int, seed: int, **options: Any) -> tuple[Any, list]:
    """``a2q finetune --method axe --seed SEED`` on the benchmark's training subset; ``options`` as
    FinetuneAccumulators'."""
    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.transforms.finetune import FinetuneAccumulators

    config = FinetuneConfig(method="axe", loss="mse" if ctx.dataset == "sr" else "ce", seed=seed,
                            device="cpu", progress=False, log=lambda line: None)
    step = FinetuneAccumulators(None, ctx.train, None, config, overrides={n: acc_bits for n in ctx.constrained},
                                calibration_samples=ctx.bench.calibration_samples, **options)
    return ctx.base.transform(step), step.result.details["axe"]


def _verified(model) -> bool:
    from a2q_passes.verification import verify_model

    return bool(verify_model(model).overflow_impossible)


def _choice(reports: list) -> str:
    return ", ".join(f"{r.node} {r.rows_axe}/{r.rows}" for r in reports)


def run(benches: tuple[ModelBench, ...], seeds: list[int], before: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for bench in benches:
        ctx = load_context(bench)
        scorer = OnnxScorer(ctx)
        old = {(r["P"], row_seed(r)): r["score"] for r in before.get(bench.key, {}).get("rows", [])
               if r["method"] == "axe"}
        for acc_bits in bench.train_widths:
            if ctx.plain_width <= acc_bits:
                continue  # fits already: every method returns the committed model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                projected = _project(ctx, "exact", acc_bits)
            project_score, project_verified = scorer.measure(projected)["score"], _verified(projected)
            for seed in seeds:
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axe_all, _ = _axe(ctx, acc_bits, seed, held_out_samples=0, refresh="off")
                    axe_safe, reports = _axe(ctx, acc_bits, seed)
                row = {"model": bench.name, "setup": bench.setup, "P": acc_bits, "seed": seed, "metric": ctx.metric,
                       "project": project_score, "axe_before": old.get((acc_bits, seed)),
                       "axe_all_rows": scorer.measure(axe_all)["score"], "axe": scorer.measure(axe_safe)["score"],
                       "axe_rows_kept": _choice(reports), "refresh_kept": any(r.refreshed for r in reports),
                       "verified": project_verified and _verified(axe_all) and _verified(axe_safe),
                       "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], commands: list[str]) -> str:
    lines = [
        f"{', '.join(f'`{c}`' for c in commands)} (test split; AXE calibrates on the benchmark's calibration samples and, by default, checks "
        "itself on up to 2048 other training samples (at most half of the subset), both drawn with the seed; "
        "`axe rows kept` = rows per constrained layer that kept their AXE weights, the others hold the exact "
        "projection's; `AXE before` is the `axe` row of `bench/protocol.json` (the benchmark runs, before AXE's "
        "held-out choice asked for a clear gain), `-` where that row did not run).",
        "",
        "| model | set-up | P | seed | project (exact) | AXE before | AXE, every row | AXE (default: held-out choice) | "
        "AXE >= project | axe rows kept | statistics refresh kept | verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = f"{r['axe_before']:.2f}" if r["axe_before"] is not None else "-"
        lines.append(f"| {r['model']} | {r['setup']} | {r['P']} | {r['seed']} | {r['project']:.2f} | {before} | "
                     f"{r['axe_all_rows']:.2f} | {r['axe']:.2f} | {'yes' if r['axe'] >= r['project'] else '**no**'} | "
                     f"{r['axe_rows_kept']} | {'yes' if r['refresh_kept'] else 'no'} | "
                     f"{'yes' if r['verified'] else '**no**'} |")
    lines += ["", summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> str:
    """How many rows and seed means have AXE at or above the projection, now and before."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["setup"], r["P"]), []).append(r)
    mean_ok = sum(statistics.fmean(r["axe"] for r in g) >= g[0]["project"] for g in groups.values())
    with_before = [g for g in groups.values() if all(r["axe_before"] is not None for r in g)]
    before_ok = sum(statistics.fmean(r["axe_before"] for r in g) >= g[0]["project"] for g in with_before)
    return (f"AXE (default) >= project on {sum(r['axe'] >= r['project'] for r in rows)} of {len(rows)} rows and on "
            f"{mean_ok} of {len(groups)} (model, set-up, P) means over their seeds; before, on {before_ok} of the "
            f"{len(with_before)} means that ran. Every output verified: "
            f"{'yes' if all(r['verified'] for r in rows) else '**no**'}.")


def seed_list(text: str) -> list[int]:
    """``0-9`` or ``0,3,5``."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import sys

    import torch

    from bench.run_all import FULL

    parser = argparse.ArgumentParser(prog="python -m bench.bench_axe", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset of bench.run_all.FULL")
    parser.add_argument("--setups", help="comma-separated subset of the set-ups (all, paper; default both)")
    parser.add_argument("--seeds", type=seed_list, default=[0], help="seeds of AXE's data draw: 0-9 or 0,3 (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "axe.md")
    parser.add_argument("--json", type=Path, help="also write the command and its rows here")
    parser.add_argument("--render", type=Path, nargs="+", metavar="RUN_JSON",
                        help="only write --out from the --json files of earlier runs, their rows in the order given")
    args = parser.parse_args(argv)
    if args.render:
        runs = [json.loads(path.read_text()) for path in args.render]
        rows = [row for run in runs for row in run["rows"]]
        args.out.write_text(markdown(rows, [run["command"] for run in runs]))
        print(f"wrote {args.out}")
        return rows
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    benches = tuple(b for b in FULL if (not args.models or b.name in args.models.split(","))
                    and (not args.setups or b.setup in args.setups.split(",")))
    before = json.loads((REPO / "bench" / "protocol.json").read_text())["models"]
    rows = run(benches, args.seeds, before)
    command = " ".join(["python -m bench.bench_axe", *(sys.argv[1:] if argv is None else argv)])
    args.out.write_text(markdown(rows, [command]))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
