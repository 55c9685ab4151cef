"""BENCHMARKS.md from the results of :func:`bench.run_all.run` (every number comes from the rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.anchors import SETUPS
from bench.sweep import METHODS

HEADLINE = "fmnist_cnn"
KEEP = 99.0  # "keeps 99% of float"
COLLAPSE_POINTS = 10.0  # a drop of this many points below the quantized baseline counts as a visible collapse
PAPER_RESOURCE_RATIO = 2.3
SPARSITY_GAIN = 0.05  # "induces sparsity": at least 5 points more zeros than the W4A4 baseline at the lowest P
SPARSITY_NOISE = 0.01
PIVOT_METHODS = ("unconstrained-wrap", "project-a2q", "project-exact", "axe", "qat", "qat-float", "ours-best",
                 "qat-float-eq", "ours-best-eq", "brevitas-a2q", "brevitas-a2q+", "brevitas-a2q-eq", "brevitas-a2q+-eq")
_SHORT = {"unconstrained-wrap": "unconstrained @P (wrap)", "project-a2q": "project a2q", "project-exact": "project exact",
          "axe": "AXE", "qat": "QAT (ours)", "qat-float": "QAT from float (ours)", "ours-best": "ours best",
          "qat-float-eq": "QAT from float, equal total (ours)", "ours-best-eq": "ours best, equal total",
          "brevitas-a2q": "Brevitas A2Q", "brevitas-a2q+": "Brevitas A2Q+",
          "brevitas-a2q-eq": "A2Q, equal total", "brevitas-a2q+-eq": "A2Q+, equal total"}
# (title, our rows (the first one a width has), anchor rows, what makes the budgets equal) of the "ours vs the
# better anchor" comparisons
COMPARISONS = (
    ("same budget", ("ours-best",), ("brevitas-a2q", "brevitas-a2q+"),
     "the benchmark budget on both sides; our flows may start from the committed W/A model, which had its own QAT"),
    ("equal total training", ("ours-best-eq", "ours-best"), ("brevitas-a2q-eq", "brevitas-a2q+-eq"),
     "the anchors also get the committed model's own QAT as extra epochs; ours best, equal total also chooses "
     "QAT from float with the anchors' total budget, where that row ran, else ours best"),
    ("same start", ("qat-float",), ("brevitas-a2q", "brevitas-a2q+"),
     "both from the float checkpoint, with the benchmark budget"),
    ("same start, equal total", ("qat-float-eq",), ("brevitas-a2q-eq", "brevitas-a2q+-eq"),
     "both from the float checkpoint, with the benchmark budget plus the committed model's own QAT"),
)


# --------------------------------------------------------------------------- helpers


def _row(rows: list[dict], method: str, p: int | None) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["P"] == p and r["status"] == "ok"), None)


def _widths(entry: dict) -> list[int]:
    return list(entry["config"]["widths"])


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _loss(value: float | None) -> str:
    """A validation loss (cross-entropy or MSE, the ours-best tie-break) to 4 significant digits."""
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2g}%" if 0 < value < 0.001 else f"{100 * value:.1f}%"  # rare overflows stay visible


def _spread(row: dict) -> str:
    """The range and number of the seeds a mean row (``bench.protocol.seed_means``) averages; nothing for one seed."""
    if "seeds" not in row:
        return ""
    spread = "same" if row["score_min"] == row["score_max"] else f"{row['score_min']:.2f}-{row['score_max']:.2f}"
    return f" [{spread}, n={len(row['seeds'])}]"


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    cell = f"{row['score']:.2f} ({row['pct_of_float']:.1f}%){_spread(row)}"
    if row["method"] == "ours-best":
        cell += f" {row['selected']}"
    return cell


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


# --------------------------------------------------------------------------- sections


def _setup_of(entry: dict) -> str:
    return entry.get("setup", "all")  # results written before the set-ups existed have only "all"


def _extra_epochs(entry: dict) -> str:
    extra = entry.get("extra_budget")
    if extra is None or not entry["config"].get("equal_budget_widths"):
        return "-"
    return f"+{extra['extra_epochs']} (= {extra['qat_epochs']} x {extra['qat_samples']} samples)"


def setup_table(results: dict) -> list[str]:
    """One row per model and set-up: data, budgets, widths, the constrained layers, the run time."""
    body = []
    for name, e in results["models"].items():
        c, b = e["config"], e["config"]["budget"]
        seeds = e.get("seeds", [b["seed"]])  # a merge of several seeds (bench.protocol) lists them
        body.append([f"{e.get('model', name)} {e['variant']}", _setup_of(e), e["dataset"], str(e["test_samples"]),
                     str(e["train_samples"]), str(e["val_samples"]),
                     f"{b['epochs']} x {b['batch_size']}, lr {b['lr']}, seed{'s' if len(seeds) > 1 else ''} "
                     + ", ".join(map(str, seeds)), _extra_epochs(e),
                     str(c["calibration_samples"]), ", ".join(map(str, c["widths"])),
                     ", ".join(map(str, c["train_widths"])), ", ".join(map(str, c.get("equal_budget_widths", ()))) or "-",
                     ", ".join(e["constrained_layers"]), str(e["plain_width"]), f"{e['seconds'] / 60:.1f}"])
    return _table(["model", "set-up", "data", "test", "train subset", "val", "epochs x batch",
                   "equal-total anchors: extra epochs", "AXE calib.", "P swept", "P trained", "P equal-budget",
                   "constrained layers", "plain width", "minutes"], body)


PROTOCOL_TEXT = [
    "- **Set-ups**: " + "; ".join(f"`{k}` = {v}" for k, v in SETUPS.items()) + ". In `paper` our flows give P to "
    "the hidden layers only (`--layer NAME=P` for each); the first and last layers are left to the flow (QAT "
    "still trains them) and their widest exact accumulator is reported as *free width* in the rows; the "
    "anchors keep Brevitas' plain per-channel W-bit quantizer there and the accumulator-aware one on the hidden "
    "layers. ESPCN's first and last layers are 8-bit and unconstrained in both set-ups.",
    "- **Equal budgets**, two ways, at the *P equal-budget* widths. (1) *Equal total training*: `A2Q, equal "
    "total` / `A2Q+, equal total` (`brevitas-a2q-eq`, `brevitas-a2q+-eq`) train from the float checkpoint for "
    "the benchmark's epochs plus the QAT that produced the committed W/A model (models/train.py: its "
    "`qat_epochs` over the whole training split, from models/metrics.json), converted to whole epochs of the "
    "benchmark's training subset and rounded up, so they see at least as many training samples as our flows "
    "that start from the committed model (that QAT used the recipe's batch size and learning rate; the extra "
    "epochs use the benchmark's, with one cosine schedule over all epochs). (2) *Same start*: `QAT from float` "
    "(`qat-float`) runs our QAT with the benchmark budget from the float checkpoint in the committed W/A "
    "layout exported to QONNX (per-channel round-to-nearest weights; activation scales from Brevitas' own "
    "statistics over 31 forward passes of the first training batches, no weight update), the anchors' start. "
    "(3) *Same start, equal total*: `QAT from float, equal total` (`qat-float-eq`) runs the same QAT from that "
    "start with the equal-total anchors' budget, so both sides start from the same weights and train as long.",
    "- **Ours best**: per P, the one of our rows (QAT from float included) with the best validation score; ties, "
    "common on a small validation split, go to the lower validation loss (cross-entropy of the logits; MSE for "
    "ESPCN; column *val loss*), then to the method listed first. Rows of runs made before the loss was stored "
    "have none (*val loss* `-`): their ties went to the method listed first. *Ours best, equal total* "
    "(`ours-best-eq`, derived by `bench.protocol`) applies the same rule to our rows and `qat-float-eq`; the "
    "equal-total comparison uses it at the widths where every seed has that row, else ours best.",
]


def _setup(results: dict) -> list[str]:
    lines = ["## Set-up", ""]
    lines += setup_table(results)
    lines += [
        "",
        "- **Scores** are on the held-out test split (top-1 % or PSNR dB); *% of float* divides by the float "
        "checkpoint's score. *val* is held out from the end of the training split and only chooses best "
        "epochs and the *ours best* row; nothing is chosen on the test split.",
        "- **Trained methods share one budget per model**: the same first `train subset` samples of the "
        "training split, epochs, batch size, learning rate, seed, data order and best-epoch rule; all train "
        "weights and activation scales (`a2q finetune --train-act-scales`, as Brevitas trains its QuantReLU "
        "scales). Our "
        "`qat` starts from the committed W4A4 model (what the compiler is given); the Brevitas anchors start "
        "from the float checkpoint (Brevitas' QAT flow; A2Q must not start from random weights). The W4A4 "
        "model already had its own QAT from the same float checkpoint (see models/README.md), so our "
        "flows that start from it have seen more training in total: the equal-budget rows below remove "
        "that advantage.",
        *PROTOCOL_TEXT,
        "- **Guaranteed width**: the widest exact accumulator range (`a2q analyze`, bias excluded, inputs over "
        "their whole integer box) over the constrained layers. Our rows are checked to fit P, so no input "
        "can overflow and their score is the P-bit score. Anchors: the width of the integers Brevitas' own "
        "forward pass uses; their QONNX export is measured separately below.",
        "- **unconstrained @P (wrap)**: the committed model, unchanged, with its constrained layers "
        "accumulating in P-bit two's-complement wrap-around (`simulate_model`); *overflow* is the fraction "
        "of accumulations whose P-bit result differs from the exact sum.",
        "- **Sparsity**: fraction of zero integer weights over the constrained layers.",
        "- AXE is not re-run where the committed model already fits P (rows say so). QAT is: it spends the same "
        "budget as the anchors, and the committed model, its starting point, stays a candidate for its best epoch.",
    ]
    return lines


def entry_title(name: str, entry: dict) -> str:
    return (f"{entry.get('model', name)} {entry['variant']} ({entry['dataset']}, {entry['metric']}), set-up "
            f"`{_setup_of(entry)}`")


def pivot_table(entry: dict) -> list[str]:
    rows = entry["rows"]
    quantized = _row(rows, "quantized", None)
    lines = [f"Float: {entry['float_score']:.2f} {entry['metric']}; committed {entry['variant']}: "
             f"{quantized['score']:.2f} ({quantized['pct_of_float']:.1f}% of float), widest exact accumulator "
             f"{entry['plain_width']} bits. Cells: score (% of float)"
             + ("; at a width run with several seeds, the mean over them (mean % of float) [lowest-highest "
                "score or same, n=seeds], ours best: the method each seed's run selected." if _seeded(entry) else "."),
             ""]
    methods = [m for m in PIVOT_METHODS if any(r["method"] == m for r in rows)]  # methods a run left out: no column
    body = [[str(p)] + [_cell(_row(rows, m, p)) for m in methods] for p in _widths(entry)]
    return lines + _table(["P"] + [_SHORT[m] for m in methods], body)


def _seeded(entry: dict) -> bool:
    """Whether the entry merges runs of several training seeds (``bench.protocol``)."""
    return len(entry.get("seeds", ())) > 1


def detail_table(entry: dict) -> list[str]:
    seeded = _seeded(entry)
    body = []
    for r in entry["rows"]:
        if r["status"] == "not run":
            continue
        seed = [str(r["seed"]) if r["P"] is not None else "-"] if seeded else []
        body.append([str(r["P"] if r["P"] is not None else "-"), *seed, r["method"], _fmt(r["score"]),
                     _fmt(r["pct_of_float"], 1), _fmt(r["val_score"]), _loss(r.get("val_loss")),
                     _pct(r["sparsity"]),
                     _width(r),
                     _pct(r["overflow_fraction"]) if r["overflow_fraction"] is not None else "-",
                     _fmt(r["seconds"], 1), r["status"] if r["status"] != "ok" else r["note"]])
    return _table(["P", *(["seed"] if seeded else []), "method", "score", "% float", "val", "val loss", "sparsity",
                   "width", "overflow", "s", "note"], body)


def _width(row: dict) -> str:
    """The guaranteed width, and the free (unconstrained) layers' widest accumulator where some are free."""
    if row["guaranteed_width"] is None:
        return "-"
    free = row.get("free_width")
    return str(row["guaranteed_width"]) + (f" (free {free})" if free is not None else "")


def _anchors(results: dict) -> list[str]:
    body = []
    for name, entry in results["models"].items():
        for r in entry["rows"]:
            if r["method"].startswith("brevitas") and r["status"] == "ok":
                body.append([name, str(r["P"]), _SHORT[r["method"]], _fmt(r["score"]), str(r["guaranteed_width"]),
                             str(r["export_width"]), "yes" if r["export_width"] <= r["P"] else "**no**",
                             _fmt(r["export_score_exact"]), _fmt(r["export_score_wrap"]),
                             _pct(r["export_overflow_fraction"]), _pct(r["sparsity"]), _pct(r["export_sparsity"])])
    lines = [
        "## Brevitas anchors: torch model vs QONNX export", "",
        "Brevitas' A2Q/A2Q+ guarantee holds for the integers of its own torch forward pass (round to zero, "
        "norm clamp). Its QONNX export writes a weight `Quant` with `rounding_mode=ROUND` on weights that do "
        "not reproduce those integers, so the exported model is *not* guaranteed: `a2q analyze` of the export "
        "gives the width it really needs, and `simulate_model` runs it on the test inputs with P-bit "
        "wrap-around accumulators.", "",
    ]
    return lines + _table(["model", "P", "anchor", "torch score", "torch width", "export width", "export fits P",
                           "export score (exact acc.)", "export score (P-bit wrap)", "export overflow",
                           "torch sparsity", "export sparsity"], body)


def _resources(entry: dict, fpgapart: str) -> list[str]:
    rows = [r for r in entry["rows"] if "finn" in r]
    if not rows:
        return []
    body = []
    for r in rows:
        f = r["finn"]
        bits = f["threshold_plus_acc_bits"]
        label = "quantized (FINN-minimised, exact widths)" if r["method"] == "quantized" else f"ours best ({r['selected']})"
        body.append([str(r["P"] if r["P"] is not None else "-"), label, f"{r['score']:.2f} ({r['pct_of_float']:.1f}%)",
                     ", ".join(sorted(set(f["acc_dtypes"].values()))), f"{bits['int32']:,} -> {bits['target']:,}",
                     f"**{f['threshold_plus_acc_ratio']:.2f}x**", f"{f['int32']['LUT']:,} -> {f['target']['LUT']:,}",
                     f"{f['int32']['BRAM18']} -> {f['target']['BRAM18']}"])
    return [
        "### FINN resources", "",
        f"Lowered with `LowerToFINN` (FINN's own flow; every MVAU gets the exact accumulator type of its "
        f"weights, never wider than P), estimated by `resource_report` on `{fpgapart}` (MVAU_hls, PE=SIMD=1). "
        "*Threshold + acc. bits* = threshold storage (`MH x (2^B-1)` thresholds of accumulator width + 1) "
        "plus accumulator registers, INT32 -> lowered. FINN's LUT model caps the accumulator at the "
        "data-type bound and its BRAM model counts weights only, so they barely move.", "",
    ] + _table(["P", "model", "score", "acc types", "threshold + acc. bits", "reduction", "LUT", "BRAM18"], body)


def _sparsity(results: dict) -> tuple[list[str], str]:
    body, findings = [], []
    for name, entry in results["models"].items():
        rows = entry["rows"]
        base = _row(rows, "quantized", None)["sparsity"]
        trained = sorted(entry["config"]["train_widths"])
        for p in trained:
            cells = [name, str(p), _pct(base)]
            for method in ("brevitas-a2q", "brevitas-a2q+", "project-a2q", "project-exact", "qat"):
                r = _row(rows, method, p)
                cells.append(_pct(r["sparsity"]) if r else "-")
            body.append(cells)
        a2q = {p: r["sparsity"] for p in trained if (r := _row(rows, "brevitas-a2q", p)) is not None}
        if not a2q:
            continue
        inactive = [p for p in a2q if p >= entry["plain_width"]]  # where the W4A4 model already fits P
        binding = sorted((p for p in a2q if p < entry["plain_width"]), reverse=True)
        findings.append({
            "model": name, "base": base, "inactive": (max(inactive), a2q[max(inactive)]) if inactive else None,
            "binding": [(p, a2q[p]) for p in binding],
            # non-decreasing as P shrinks, up to one point of noise (a saturated layer plateaus)
            "monotone": all(a2q[a] <= a2q[b] + SPARSITY_NOISE for a, b in zip(binding, binding[1:])),
        })
    grows = [f for f in findings
             if f["binding"] and f["binding"][-1][1] > f["base"] + SPARSITY_GAIN and f["monotone"]]
    parts = []
    for f in findings:
        text = f"{f['model']}: W4A4 baseline {_pct(f['base'])}"
        if f["inactive"]:
            text += f", A2Q {_pct(f['inactive'][1])} at P={f['inactive'][0]} (constraint inactive)"
        text += "".join(f", {_pct(v)} at P={p}" for p, v in f["binding"])
        parts.append(text)
    detail = "; ".join(parts)
    if findings and len(grows) == len(findings):
        verdict = ("**Confirmed**: on every model Brevitas A2Q's weights get sparser as P shrinks (dips of at most "
                   f"{100 * SPARSITY_NOISE:.0f} point from one width to the next), far above the unconstrained "
                   f"baseline ({detail}).")
    elif grows:
        verdict = (f"**Partly confirmed** ({len(grows)} of {len(findings)} models gain more than "
                   f"{100 * SPARSITY_GAIN:.0f} points of zeros, without dropping by more than "
                   f"{100 * SPARSITY_NOISE:.0f} point as P shrinks): {detail}.")
    else:
        verdict = f"**Not confirmed** in this run: {detail}."
    lines = [
        "## Does A2Q induce unstructured sparsity?", "", verdict, "",
        "Two causes show in the numbers. (1) Round-to-zero: where the constraint is inactive (P at or above the "
        "width the W4A4 model needs), A2Q already has more zeros than the round-to-nearest baseline. (2) The "
        "l1 budget: below that width every constraint here is met most cheaply by shrinking the small weights "
        "to zero (soft thresholding), so our projections and QAT get sparser too, for the same reason; "
        "`project exact` keeps fewer zeros than the l1-ball `project a2q` at the same P because the exact range "
        "is a looser budget. The zeros are unstructured (single weights, not whole channels). Fraction of zero "
        "weights (constrained layers):", "",
    ]
    lines += _table(["model", "P", "W4A4 baseline", "Brevitas A2Q", "Brevitas A2Q+", "project a2q", "project exact",
                     "QAT (ours)"], body)
    return lines, verdict


def _compare(entry: dict, our_methods: tuple[str, ...], anchor_methods: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Where ours (the first of ``our_methods`` with a row at P) beats / ties / loses against the better of
    ``anchor_methods`` at every trained P."""
    wins, losses = [], []
    for p in sorted(entry["config"]["train_widths"], reverse=True):
        ours = next((r for r in (_row(entry["rows"], m, p) for m in our_methods) if r), None)
        anchors = [r for r in (_row(entry["rows"], m, p) for m in anchor_methods) if r]
        if ours is None or not anchors:
            continue
        best = max(anchors, key=lambda r: r["score"])
        selected = f" ({ours['selected']})" if "selected" in ours else ""
        which = f" [{_SHORT[ours['method']]}]" if len(our_methods) > 1 else ""
        text = (f"P={p}: ours{which} {ours['score']:.2f}{_spread(ours)}{selected} vs {_SHORT[best['method']]} "
                f"{best['score']:.2f}{_spread(best)} ({ours['score'] - best['score']:+.2f})")
        (wins if ours["score"] >= best["score"] else losses).append(text)
    return wins, losses


def _targets(results: dict) -> list[str]:
    lines = ["### Targets on the headline model (fmnist_cnn W4A4)", ""]
    entry = results["models"].get(HEADLINE)
    if entry is None:
        return lines + ["Headline model not in this run."]
    rows = entry["rows"]
    a2q_keep = [r for r in rows if r["method"] == "brevitas-a2q" and r["status"] == "ok" and r["pct_of_float"] >= KEEP]
    if not a2q_keep:
        best = max((r for r in rows if r["method"] == "brevitas-a2q" and r["status"] == "ok"),
                   key=lambda r: r["pct_of_float"], default=None)
        lines.append(f"- (a) **not evaluable**: Brevitas A2Q never keeps {KEEP:.0f}% of float at any trained P "
                     f"(best: {_cell(best)} at P={best['P'] if best else '-'}).")
        p_a = None
    else:
        p_a = min(r["P"] for r in a2q_keep)
        a2q, ours = _row(rows, "brevitas-a2q", p_a), _row(rows, "ours-best", p_a)
        ok = ours is not None and ours["score"] >= a2q["score"]
        lines.append(f"- (a) lowest P where Brevitas A2Q keeps {KEEP:.0f}% of float: **P={p_a}** (A2Q {_cell(a2q)}); "
                     f"ours best {_cell(ours)}: **{'met' if ok else 'missed'}** "
                     f"({(ours['score'] - a2q['score']) if ours else float('nan'):+.2f} points).")
    p_b = None
    if p_a is not None:
        lower = [p for p in entry["config"]["train_widths"] if p < p_a]
        p_b = p_a - 1 if p_a - 1 in lower else max(lower, default=None)
        a2q, a2qp, ours = (_row(rows, m, p_b) for m in ("brevitas-a2q", "brevitas-a2q+", "ours-best"))
        if None in (a2q, a2qp, ours):
            lines.append(f"- (b) no width below P={p_a} was run for every method: not evaluable.")
        else:
            ok = ours["score"] > a2q["score"] and ours["score"] >= a2qp["score"]
            which = "one bit lower" if p_b == p_a - 1 else f"the next lower width run (P={p_a - 1} was not run)"
            lines.append(f"- (b) {which}, P={p_b}: ours best {_cell(ours)}, Brevitas A2Q {_cell(a2q)}, "
                         f"A2Q+ {_cell(a2qp)}: **{'met' if ok else 'missed'}** "
                         f"(vs A2Q {ours['score'] - a2q['score']:+.2f}, vs A2Q+ {ours['score'] - a2qp['score']:+.2f}).")
    else:
        lines.append("- (b) depends on (a): not evaluable.")
    keeping = [r for r in rows if r["method"] == "ours-best" and r["status"] == "ok" and "finn" in r
               and r["pct_of_float"] >= KEEP]
    p_c = None
    if keeping:
        best = max(keeping, key=lambda r: r["finn"]["threshold_plus_acc_ratio"])
        ratio, p_c = best["finn"]["threshold_plus_acc_ratio"], best["P"]
        lines.append(f"- (c) threshold-storage + accumulator bits at >= {KEEP:.0f}% of float: best **{ratio:.2f}x** "
                     f"vs 32-bit at P={best['P']} ({_cell(best)}): **{'met' if ratio >= PAPER_RESOURCE_RATIO else 'missed'}** "
                     f"(target >= {PAPER_RESOURCE_RATIO}x).")
        closest = [r for r in rows if r["method"] == "ours-best" and "finn" in r
                   and r["finn"]["threshold_plus_acc_ratio"] >= PAPER_RESOURCE_RATIO]
        if ratio < PAPER_RESOURCE_RATIO and closest:
            top = max(closest, key=lambda r: r["score"])
            lines.append(f"  Among the widths reaching {PAPER_RESOURCE_RATIO}x, ours keeps at most "
                         f"{top['pct_of_float']:.1f}% of float (P={top['P']}).")
    else:
        lines.append(f"- (c) no ours-best row with FINN resources keeps {KEEP:.0f}% of float: **missed**.")
    quantized = _row(rows, "quantized", None)
    # the widths our claims (b) and (c) are made at; the smallest width swept if neither was evaluable
    ps = sorted({p for p in (p_b, p_c) if p is not None and _row(rows, "unconstrained-wrap", p)}, reverse=True)
    ps = ps or [min(_widths(entry))]
    parts, collapsed = [], True
    for p in ps:
        wrap = _row(rows, "unconstrained-wrap", p)
        parts.append(f"P={p}: {_cell(wrap)}, {_pct(wrap['overflow_fraction'])} of accumulations overflow")
        collapsed &= wrap["score"] <= quantized["score"] - COLLAPSE_POINTS
    lines.append(f"- (d) at the widths of (b) and (c), the unconstrained W4A4 model with P-bit wrap-around "
                 f"accumulators (baseline "
                 f"{quantized['score']:.2f}): {'; '.join(parts)}: "
                 f"**{'collapses' if collapsed else 'does not visibly collapse'}** (criterion: at least "
                 f"{COLLAPSE_POINTS:.0f} points below the baseline).")
    wraps = sorted((r for r in rows if r["method"] == "unconstrained-wrap" and r["status"] == "ok"),
                   key=lambda r: -r["P"])
    first = next((r for r in wraps if r["score"] <= quantized["score"] - COLLAPSE_POINTS), None)
    if first is not None:
        gap = [f"{r['P']} ({r['score']:.2f})" for r in wraps if first["P"] < r["P"] < entry["plain_width"]]
        lines.append(f"  Across the sweep it first collapses at P={first['P']} ({_cell(first)}, "
                     f"{_pct(first['overflow_fraction'])} of accumulations overflow); at P={entry['plain_width']} "
                     "and above nothing can overflow."
                     + (f" At P={', '.join(gap)} overflow is possible but too rare on this data to show." if gap
                        else ""))
    return lines


def _reading(results: dict, sparsity_verdict: str) -> list[str]:
    lines = ["## Reading the results", ""]
    lines += _targets(results)
    lines += [""] + comparison_summary(results)
    lines += ["", f"Sparsity: {sparsity_verdict}"]
    return lines


def comparison_summary(results: dict) -> list[str]:
    """"Ours vs the better anchor at each P", per set-up, under each budget rule of COMPARISONS that has rows."""
    lines = ["### Ours vs the better Brevitas anchor at each trained P"]
    for setup in SETUPS:
        entries = {name: e for name, e in results["models"].items() if _setup_of(e) == setup}
        if not entries:
            continue
        lines += ["", f"#### Set-up `{setup}` ({SETUPS[setup]})", ""]
        for title, ours, anchors, meaning in COMPARISONS:
            found = [(e.get("model", name), _compare(e, ours, anchors)) for name, e in entries.items()]
            found = [(name, (wins, losses)) for name, (wins, losses) in found if wins or losses]
            if not found:
                continue
            lines.append(f"- *{title}* ({' / '.join(_SHORT[m] for m in ours)} vs the better of "
                         f"{' / '.join(_SHORT[a] for a in anchors)}; "
                         f"{meaning}):")
            for name, (wins, losses) in found:
                lines.append(f"  - **{name}**: ahead or equal at {len(wins)} of {len(wins) + len(losses)} widths."
                             + (f" Behind at: {'; '.join(losses)}." if losses else "")
                             + (f" Ahead/equal at: {'; '.join(wins)}." if wins else ""))
    return lines


REPO = Path(__file__).resolve().parent.parent
EXTRA_SECTIONS = (
    ("Projection methods on the same layers", "methods.md", ".venv/bin/python -m bench.bench_methods --out bench/methods.md"),
    ("FINN resources of the bundled model", "finn_resources.md", ".venv/bin/python -m bench.bench_finn_resources"),
    ("Fine-tuning overhead", "finetune_overhead.md", ".venv/bin/python -m bench.bench_finetune_overhead [--model ...]"),
    ("Reliability", "reliability.md", ".venv/bin/python -m scripts.fuzz --examples 2000 --markdown bench/reliability.md"),
    ("Mixed accumulator allocation", "allocate.md", ".venv/bin/python -m bench.bench_allocate"),
    ("Scale", "scale.md", ".venv/bin/python -m bench.bench_llm --layers 2 --repeats 3 --project-repeats 1 "
     "--large-layers 12 --markdown bench/scale.md"),
    ("Real-file corpus", "corpus.md", ".venv/bin/python -m scripts.corpus --out DIR --report bench/corpus.md"),
    ("Full-size MobileNet-v1 through the command line", "mobilenet.md",
     ".venv/bin/python -m bench.bench_mobilenet --out DIR --markdown bench/mobilenet.md"),
    ("AXE against the projection on every benchmark row", "axe.md", ".venv/bin/python -m bench.bench_axe"),
    ("Benchmark protocol: equal budgets and the A2Q papers' set-up", "protocol.md",
     ".venv/bin/python -m bench.protocol RESULTS_JSON... --json bench/protocol.json --out bench/protocol.md "
     "(the runs are listed in the file)"),
    ("QAT variants against Brevitas A2Q+ at equal budgets", "qat.md", ".venv/bin/python -m bench.bench_qat"),
    ("Ours best: chosen by validation score or by validation loss", "selection.md",
     ".venv/bin/python -m bench.selection_check --seeds 10-19 --out bench/selection.md"),
)


def extra_section(title: str, name: str, command: str) -> list[str]:
    """The BENCHMARKS.md section of one EXTRA_SECTIONS file (nothing when the file is absent)."""
    path = REPO / "bench" / name
    if not path.is_file():
        return []
    text = path.read_text().strip().splitlines()
    if text and text[0].startswith("# "):  # the file's own title: the section heading replaces it
        text = text[1:]
        while text and not text[0].strip():  # and the blank line under it: the heading has its own
            text = text[1:]
    body = [("#" + line if line.startswith("#") else line) for line in text]
    return ["", f"## {title}", "", f"From `{command}` (file `bench/{name}`):", "", *body]


def _concurrency(results: dict) -> str:
    """How the run used the cores; runs before ``--jobs`` ran one model at a time."""
    threads = results["threads"]
    per_model = f"{threads} torch thread{'s' if threads != 1 else ''}"
    jobs = results.get("jobs", 1)
    return f"{jobs} models at a time, {per_model} each" if jobs > 1 else per_model


def render(results: dict, layout: Any) -> str:
    total = results["total_seconds"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{results['command']}` in **{total / 60:.1f} min** ({_concurrency(results)}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "). Every number below comes from "
        "`bench/results.json` of that run; the whole file is regenerated (do not edit by hand).",
        "",
        f"![score vs P]({layout.relative_plot('accuracy_vs_P.png')})",
        f"![sparsity vs P]({layout.relative_plot('sparsity_vs_P.png')})",
        "",
        "Methods: " + "; ".join(f"`{m.key}` = {m.label}" for m in METHODS) + ".",
        "",
    ]
    lines += _setup(results)
    for name, entry in results["models"].items():
        title = "Headline: " if name == HEADLINE else ""
        lines += ["", f"## {title}{entry_title(name, entry)}", ""]
        lines += pivot_table(entry)
        lines += [""] + _resources(entry, results["fpgapart"])
        lines += ["", "<details><summary>every row</summary>", ""] + detail_table(entry) + ["", "</details>"]
    lines += [""] + _anchors(results)
    sparsity_lines, verdict = _sparsity(results)
    lines += [""] + sparsity_lines
    lines += [""] + _reading(results, verdict)
    if "speed_markdown" in results:
        lines += ["", "## Speed", "",
                  "From `bench/bench_speed.py` (`run()` + `markdown()`), in the same run:", "",
                  results["speed_markdown"]]
    for title, name, command in EXTRA_SECTIONS:  # separate benchmarks, each with its own command and file
        lines += extra_section(title, name, command)
    lines += [
        "", "## Published reference figures (context, not reproduced here)", "",
        "- A2Q: up to 2.3x FPGA resource reduction vs 32-bit accumulators at 99.2% of float accuracy, averaged "
        "over its benchmarks.",
        "- ResNet18 / CIFAR10 W4A4 (float 95.0): A2Q 94.2 / 94.2 / 92.6 / 89.8 / 83.9 and A2Q+ 94.2 / 94.1 / "
        "94.1 / 92.8 / 90.6 at P = 16 / 15 / 14 / 13 / 12.",
        "- ESPCN x2 on BSD300 (float 31.03 dB): W4A4 30.30, A2Q at 13 bits 30.24, A2Q+ at 13 bits 30.95.",
        "",
    ]
    return "\n".join(lines)
