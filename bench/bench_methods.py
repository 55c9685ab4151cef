"""Projection methods side by side on the same layers: relative L2 change and reached width per P.

    .venv/bin/python -m bench.bench_methods [--model models/fmnist_cnn_w4a4.onnx] [--out bench/methods.md]

For every layer of the model and every target P below its plain exact width, each method projects
the same unrounded weights (float weight / scale). ``change`` is ||q_P - q_plain|| / ||q_plain|| on
the integer weights; ``width`` is the exact width the result needs. The last table answers the
issue's question per layer: the smallest P at which ``exact`` changes the weights no more than
``a2q`` does at P+1 (on unsigned-input layers: one bit lower at equal or smaller change).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.analysis import analyze_layer
from a2q_passes.layers import find_mac_layers
from a2q_passes.methods import project_weights
from a2q_passes.projection_stats import projection_stats

METHODS = ("a2q", "a2q+", "exact")


def compare(model_path: Path) -> list[dict]:
    model = ModelWrapper(str(model_path))
    rows = []
    for layer in find_mac_layers(model):
        if not layer.ok:
            continue
        plain = analyze_layer(model, layer).bounds["exact"]
        v, q = layer.unrounded_rows(model), layer.integer_rows(model)
        for p in range(plain - 1, max(plain - 6, 4), -1):
            row = {"layer": layer.node, "K": layer.K, "input": layer.input_dtype, "plain": plain, "P": p}
            for method in METHODS:
                result = project_weights(v, layer.grid.range, p, layer.source.weight_range, method)
                lo, hi = bounds.exact_accumulator_range(result.weights, layer.grid.range)
                row[method] = (projection_stats(q, result.weights, v)["rel_l2_change"],
                               int(bounds.accumulator_width(int(lo.min()), int(hi.max()))))
            rows.append(row)
    return rows


def markdown(rows: list[dict], model_path: Path) -> str:
    out = [f"Model `{model_path}`; change = relative L2 change of the integer weights against plain rounding; "
           "width = exact width reached.", "",
           "| layer | K | input | plain width | P | " + " | ".join(f"{m} change / width" for m in METHODS) + " |",
           "|---|---|---|---|---|" + "---|" * len(METHODS)]
    for r in rows:
        cells = " | ".join(f"{r[m][0]:.3f} / {r[m][1]}" for m in METHODS)
        out.append(f"| {r['layer']} | {r['K']} | {r['input']} | {r['plain']} | {r['P']} | {cells} |")
    never_more = all(r["exact"][0] <= r["a2q"][0] + 1e-12 for r in rows)
    out += ["", f"`exact` changes the weights no more than `a2q` at the same P in every row: **{never_more}**.", "",
            "| layer | P where exact(P-1) <= a2q(P) in change | bits saved at equal or smaller change |", "|---|---|---|"]
    by_layer: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["P"]] = r
    for name, per_p in by_layer.items():
        wins = [p for p in per_p if p - 1 in per_p and per_p[p - 1]["exact"][0] <= per_p[p]["a2q"][0] + 1e-12]
        out.append(f"| {name} | {', '.join(map(str, sorted(wins))) or '-'} | {'1' if wins else '0'} |")
    out += ["", "Data-aware AXE (`a2q finetune --method axe`) against `exact` (`a2q project`) on every benchmark model and "
                "P, before and after its held-out choice: `bench/axe.md` (`.venv/bin/python -m bench.bench_axe`)."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/fmnist_cnn_w4a4.onnx"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = markdown(compare(args.model), args.model)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
