"""The benchmark protocol's figures (equal budgets, both set-ups) from saved ``bench.run_all`` results.

    .venv/bin/python -m bench.protocol RESULTS_JSON [RESULTS_JSON ...] --json bench/protocol.json --out bench/protocol.md \
        [--note TEXT] [--replace RESULTS_JSON ...]

Each RESULTS_JSON is the ``results.json`` of one ``python -m bench.run_all ... --out DIR`` run (for
example one model and set-up at a few widths) or an earlier ``--json`` output (its runs count as given
one by one, so new runs can be added to the committed bench/protocol.json); their models are merged (a
model and set-up at a width P may come from several runs with different training seeds, ``bench.run_all
--seed``, but from one run per seed), written together to ``--json`` and rendered to ``--out``: the set-up
table, each model's table of scores, every row, and "ours vs the better anchor" per set-up and budget rule.
Where a width has several seeds, the tables and the comparison show per method the mean over the seeds,
their range and their number (:func:`seed_means`); ``ours best`` is chosen per seed (each run's own rule)
and then averaged, and the better anchor is the one with the higher mean. ``--replace`` runs re-ran a method
after a change to it: their rows take the place of the same method's at the same width and seed, and the
``ours-best`` row there is chosen again (:func:`replace_rows`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean
from typing import Any

from bench.markdown import PROTOCOL_TEXT, comparison_summary, detail_table, entry_title, pivot_table, setup_table
from bench.sweep import EQUAL_TOTAL_METHODS, best_row


_WIDTH_LISTS = ("widths", "train_widths", "equal_budget_widths")
_RUN_FIELDS = ("command", "threads", "versions", "total_seconds")
SEEDS_TEXT = (
    "- **Seeds**: a width run with several training seeds (`bench.run_all --seed N`: our fine-tuning's seed, the "
    "anchors' torch seed and data order, the float start's torch seed; the same splits and budgets) shows per "
    "method the mean test score over the seeds, `[lowest-highest, n=seeds]` (`same` where every seed scored the "
    "same). *Ours best* is chosen in each seed's run by the rule above and then averaged (the methods each seed "
    "selected are listed); the better anchor is the one with the higher mean, and *ahead or equal* compares the "
    "means.")


def row_seed(row: dict[str, Any]) -> int:
    """The training seed of a row; rows written before ``bench.run_all --seed`` existed have none: seed 0."""
    return row.get("seed", 0)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict with every run's models and the list of the runs' commands; a run may itself be an
    earlier merge (with ``runs``), whose runs are listed in place.

    A model and set-up run several times, at disjoint widths (``--widths``), with different seeds
    (``--seed``) or with other methods (``--methods``: a row added to an earlier run), becomes one entry: its rows
    of every width, seed and method, each with its ``seed`` (the width-free ``float`` / ``quantized`` rows of the
    first run), the union of its width lists, its ``seeds`` and the sum of its run times. The same method at the
    same width with the same seed from two runs is refused.
    """
    models: dict[str, Any] = {}
    listed: list[dict[str, Any]] = []  # the runs' commands, an earlier merge's in its own order
    for run in runs:
        listed += run["runs"] if "runs" in run else [{key: run[key] for key in _RUN_FIELDS}]
        for key, entry in run["models"].items():
            rows = [{**row, "seed": row_seed(row)} for row in entry["rows"]]
            if key not in models:
                models[key] = {**entry, "config": dict(entry["config"]), "rows": rows}
                continue
            merged = models[key]
            overlap = _ran(merged["rows"]) & _ran(rows)
            if overlap:
                raise ValueError(f"{key}: P={sorted({p for p, _, _ in overlap})} with seed "
                                 f"{sorted({seed for _, seed, _ in overlap})} ran "
                                 f"{sorted({method for _, _, method in overlap})} in more than one run")
            merged["rows"] += [row for row in rows if row["P"] is not None and row.get("status") != "not run"]
            for field in _WIDTH_LISTS:
                merged["config"][field] = sorted({*merged["config"][field], *entry["config"][field]}, reverse=True)
            merged["seconds"] += entry["seconds"]
    for entry in models.values():
        # stable: each run's method order kept within a width and seed
        entry["rows"].sort(key=lambda row: (-1000, 0) if row["P"] is None else (-row["P"], row["seed"]))
        entry["seeds"] = sorted(_seeds(entry["rows"]))
    return {"runs": listed, "models": models}


def replace_rows(results: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``results`` (a :func:`merge`) with every row that ``runs`` ran in place of the row of the same method, width
    and seed, the ``ours-best`` row there chosen again by its rule (:func:`bench.sweep.best_row`), and the runs
    listed as replacing. A row with nothing to replace is refused: these runs re-run, they do not add."""
    models = {key: {**entry, "rows": list(entry["rows"])} for key, entry in results["models"].items()}
    listed = list(results["runs"])
    for run in runs:
        listed.append({**{key: run[key] for key in _RUN_FIELDS}, "replaces": True})
        for key, entry in run["models"].items():
            rows = models[key]["rows"]
            for new in entry["rows"]:
                if new["P"] is None or new.get("status") == "not run":
                    continue
                new = {**new, "seed": row_seed(new)}
                at = [i for i, row in enumerate(rows) if row["P"] == new["P"] and row_seed(row) == new["seed"]]
                where = [i for i in at if rows[i]["method"] == new["method"]]
                if len(where) != 1:
                    raise ValueError(f"{key}: P={new['P']} seed {new['seed']} {new['method']}: no single earlier row "
                                     "to replace")
                rows[where[0]] = new
                best = best_row([rows[i] for i in at])
                for i in at:
                    if rows[i]["method"] == "ours-best" and best is not None:
                        rows[i] = {**rows[i], **best}
    return {"runs": listed, "models": models}


def _ran(rows: list[dict[str, Any]]) -> set[tuple[int, int, str]]:
    """(P, seed, method) of every row that ran (a run's ``not run`` rows leave the method to another run)."""
    return {(row["P"], row_seed(row), row["method"]) for row in rows
            if row["P"] is not None and row.get("status") != "not run"}


def with_equal_total_best(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with an ``ours-best-eq`` row per width and seed: the best of our rows and ``qat-float-eq`` by
    ours-best's rule (:func:`bench.sweep.best_row`), at the widths where every seed has a ``qat-float-eq`` row
    (a mean over fewer seeds than the anchors' would compare unlike things)."""
    by_width: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for row in entry["rows"]:
        if row["P"] is not None:
            by_width.setdefault(row["P"], {}).setdefault(row_seed(row), []).append(row)
    derived = []
    for p, seeds in by_width.items():
        if not all(any(r["method"] == "qat-float-eq" and r["status"] == "ok" for r in rows) for rows in seeds.values()):
            continue
        for seed, rows in seeds.items():
            best = best_row(rows, EQUAL_TOTAL_METHODS)
            if best is not None:
                derived.append({**rows[0], **best, "method": "ours-best-eq", "P": p, "seed": seed, "status": "ok",
                                "seconds": None})
    return {**entry, "rows": entry["rows"] + derived}


def _seeds(rows: list[dict[str, Any]]) -> set[int]:
    return {row_seed(row) for row in rows if row["P"] is not None}


def seed_means(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with one row per method and width: where a width has one seed, its row as it is; where it has
    several, the mean over the seeds' ``ok`` rows of ``score`` and ``pct_of_float``, with ``score_min``,
    ``score_max``, the ``seeds`` averaged and, for ``ours best``, the method each seed selected.

    The rows of one seed come from one run, so every method at a width is averaged over the same seeds.
    """
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for row in entry["rows"]:
        groups.setdefault((row["P"], row["method"]), []).append(row)
    rows = []
    for group in groups.values():
        ok = [row for row in group if row["status"] == "ok"]
        if len(group) == 1 or not ok:
            rows.append(group[0])
            continue
        ok.sort(key=row_seed)
        scores = [row["score"] for row in ok]
        mean = {**ok[0], "score": fmean(scores), "pct_of_float": fmean(row["pct_of_float"] for row in ok),
                "score_min": min(scores), "score_max": max(scores), "seeds": [row_seed(row) for row in ok]}
        if "selected" in ok[0]:
            mean["selected"] = "/".join(row["selected"] for row in ok)
        rows.append(mean)
    return {**entry, "rows": rows}


def render(results: dict[str, Any], note: str | None = None) -> str:
    lines = ["# Benchmark protocol: equal budgets and the A2Q papers' set-up", ""]
    lines += [note, ""] if note else []
    lines += ["Runs (each writes one results.json; merged by `python -m bench.protocol`):", ""]
    for run in results["runs"]:
        lines.append(f"- `{run['command']}` ({run['total_seconds'] / 60:.1f} min, {run['threads']} torch thread(s); "
                     + ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + ")"
                     + (": replaces the earlier rows of its methods at its widths and seed" if run.get("replaces")
                        else ""))
    lines += ["", *setup_table(results), "", *PROTOCOL_TEXT]
    if any(len(entry.get("seeds", ())) > 1 for entry in results["models"].values()):
        lines.append(SEEDS_TEXT)
    lines.append("")
    entries = {name: with_equal_total_best(entry) for name, entry in results["models"].items()}
    means = {name: seed_means(entry) for name, entry in entries.items()}
    lines += comparison_summary({"models": means})
    for name, entry in entries.items():
        lines += ["", f"## {entry_title(name, entry)}", "", *pivot_table(means[name]), "",
                  "<details><summary>every row</summary>", "", *detail_table(entry), "", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.protocol", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of bench.run_all runs")
    parser.add_argument("--json", type=Path, help="also write the merged results here")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    parser.add_argument("--note", help="a paragraph under the title (where and how the runs ran)")
    parser.add_argument("--replace", type=Path, nargs="+", default=[], metavar="RESULTS_JSON",
                        help="results.json files of runs that re-ran a method after a change: their rows replace "
                             "that method's earlier rows at the same width and seed")
    args = parser.parse_args(argv)
    results = replace_rows(merge([json.loads(path.read_text()) for path in args.results]),
                           [json.loads(path.read_text()) for path in args.replace])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.out.write_text(render(results, args.note))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
