"""The benchmark protocol's figures (equal budgets, both set-ups) from saved ``bench.run_all`` results.

    .venv/bin/python -m bench.protocol RESULTS_JSON [RESULTS_JSON ...] --json bench/protocol.json --out bench/protocol.md \
        [--note TEXT]

Each RESULTS_JSON is the ``results.json`` of one ``python -m bench.run_all ... --out DIR`` run (for
example one model and set-up at a few widths) or an earlier ``--json`` output (its runs count as given
one by one, so new runs can be added to the committed bench/protocol.json); their models are merged (a
model and set-up at a width P may come from one run only), written together to ``--json`` and rendered
to ``--out``: the set-up table, each model's table of scores, every row, and "ours vs the better anchor"
per set-up and budget rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.markdown import PROTOCOL_TEXT, comparison_summary, detail_table, entry_title, pivot_table, setup_table


_WIDTH_LISTS = ("widths", "train_widths", "equal_budget_widths")
_RUN_FIELDS = ("command", "threads", "versions", "total_seconds")


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict with every run's models and the list of the runs' commands; a run may itself be an
    earlier merge (with ``runs``), whose runs are listed in place.

    A model and set-up run several times at disjoint widths (``--widths``) becomes one entry: its rows of
    every width (the width-free ``float`` / ``quantized`` rows of the first run), the union of its width
    lists and the sum of its run times.
    """
    models: dict[str, Any] = {}
    listed: list[dict[str, Any]] = []  # the runs' commands, an earlier merge's in its own order
    for run in runs:
        listed += run["runs"] if "runs" in run else [{key: run[key] for key in _RUN_FIELDS}]
        for key, entry in run["models"].items():
            if key not in models:
                models[key] = {**entry, "config": dict(entry["config"]), "rows": list(entry["rows"])}
                continue
            merged = models[key]
            overlap = set(merged["config"]["widths"]) & set(entry["config"]["widths"])
            if overlap:
                raise ValueError(f"{key}: P={sorted(overlap)} is in more than one run")
            merged["rows"] += [row for row in entry["rows"] if row["P"] is not None]
            merged["rows"].sort(key=lambda row: -1000 if row["P"] is None else -row["P"])  # stable: method order kept
            for field in _WIDTH_LISTS:
                merged["config"][field] = sorted({*merged["config"][field], *entry["config"][field]}, reverse=True)
            merged["seconds"] += entry["seconds"]
    return {"runs": listed, "models": models}


def render(results: dict[str, Any], note: str | None = None) -> str:
    lines = ["# Benchmark protocol: equal budgets and the A2Q papers' set-up", ""]
    lines += [note, ""] if note else []
    lines += ["Runs (each writes one results.json; merged by `python -m bench.protocol`):", ""]
    for run in results["runs"]:
        lines.append(f"- `{run['command']}` ({run['total_seconds'] / 60:.1f} min, {run['threads']} torch thread(s); "
                     + ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + ")")
    lines += ["", *setup_table(results), "", *PROTOCOL_TEXT, ""]
    lines += comparison_summary(results)
    for name, entry in results["models"].items():
        lines += ["", f"## {entry_title(name, entry)}", "", *pivot_table(entry), "",
                  "<details><summary>every row</summary>", "", *detail_table(entry), "", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.protocol", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of bench.run_all runs")
    parser.add_argument("--json", type=Path, help="also write the merged results here")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    parser.add_argument("--note", help="a paragraph under the title (where and how the runs ran)")
    args = parser.parse_args(argv)
    results = merge([json.loads(path.read_text()) for path in args.results])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.out.write_text(render(results, args.note))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
