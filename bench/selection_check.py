"""Ours best chosen by the validation score (the benchmark's rule) or by the validation loss, on the same rows.

    .venv/bin/python -m bench.selection_check [--seeds 10-19] [--out bench/selection.md]

``bench/protocol.json`` holds, per model, set-up, width and seed, every one of our rows with its validation
score, validation loss and test score. For both candidate sets (ours best: :data:`bench.sweep.OUR_METHODS`;
ours best, equal total: with ``qat-float-eq``) this compares the test score of the row the benchmark's rule picks
(:func:`bench.sweep.best_row`: validation score, ties to the lower validation loss) with the row of the lowest
validation loss. The rule was not changed on these figures: ``--seeds 10-19`` restricts the check to the seeds
run after it was first looked at (seeds 0 to 9), as a check on unseen runs.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.bench_axe import seed_list
from bench.protocol import row_seed
from bench.sweep import EQUAL_TOTAL_METHODS, OUR_METHODS, best_row

REPO = Path(__file__).resolve().parent.parent


def by_loss(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any] | None:
    """The ``ok`` row of ``methods`` with the lowest validation loss (ties: the method listed first)."""
    candidates = [r for r in rows if r["method"] in methods and r["status"] == "ok" and r.get("val_loss") is not None]
    return min(candidates, key=lambda r: (r["val_loss"], methods.index(r["method"]))) if candidates else None


def compare(models: dict[str, Any], methods: tuple[str, ...], seeds: set[int] | None) -> dict[str, Any]:
    """Per (model, P): the mean test-score difference (by loss minus by the rule) over its seeds; and the counts of
    (width, seed) points where choosing by the loss scores higher, lower or the same on the test split."""
    counts: Counter = Counter()
    differences: dict[tuple[str, int], list[float]] = defaultdict(list)
    for key, entry in models.items():
        points: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for row in entry["rows"]:
            if row["P"] is not None and (seeds is None or row_seed(row) in seeds):
                points[row["P"], row_seed(row)].append(row)
        for (p, _), rows in points.items():
            rule, loss = best_row(rows, methods), by_loss(rows, methods)
            if rule is None or loss is None or (methods == EQUAL_TOTAL_METHODS
                                                and not any(r["method"] == "qat-float-eq" for r in rows)):
                continue
            difference = loss["score"] - rule["score"]
            differences[key, p].append(difference)
            counts["higher" if difference > 0 else "lower" if difference < 0 else "same"] += 1
    return {"counts": counts, "differences": differences}


def markdown(models: dict[str, Any], seeds: set[int] | None, command: str) -> str:
    """Every seed's points, then (with ``seeds``) those seeds' alone."""
    lines = [f"`{command}`: test score of ours best chosen by the lowest validation loss minus that chosen by the "
             "benchmark's rule (the highest validation score, ties to the lower loss), per (width, seed) point of "
             "`bench/protocol.json`. The rule is unchanged; the seeds named last ran after these figures were first "
             "looked at on the earlier seeds.", ""]
    for subset in ([None, seeds] if seeds else [None]):
        lines.append("Every seed:" if subset is None else f"Seeds {min(subset)} to {max(subset)} only:")
        lines.append("")
        for methods, name in ((OUR_METHODS, "ours best"), (EQUAL_TOTAL_METHODS, "ours best, equal total")):
            result = compare(models, methods, subset)
            counts, differences = result["counts"], result["differences"]
            every = [d for values in differences.values() for d in values]
            mean = sum(every) / len(every) if every else 0.0
            lines.append(f"- **{name}**: by the loss higher at {counts['higher']}, lower at {counts['lower']}, the "
                         f"same at {counts['same']} points; mean {mean:+.3f} points. Per model and P where it differs "
                         "(mean over seeds, seeds): " + "; ".join(
                             f"{key} P={p} {sum(v) / len(v):+.3f} ({len(v)})"
                             for (key, p), v in sorted(differences.items()) if any(v)) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.selection_check", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, help="only these seeds: 10-19 or 0,3")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "protocol.json")
    parser.add_argument("--out", type=Path, help="write the Markdown here (else print it)")
    args = parser.parse_args(argv)
    models = json.loads(args.results.read_text())["models"]
    seeds = set(args.seeds) if args.seeds else None
    text = markdown(models, seeds, " ".join(["python -m bench.selection_check", *(sys.argv[1:] if argv is None else argv)]))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main()
