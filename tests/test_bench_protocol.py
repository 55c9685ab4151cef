"""The benchmark protocol's building blocks, without training: the float start and the anchors' set-ups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from brevitas.quant import Int8WeightPerChannelFloat
from onnx import numpy_helper

from bench.anchors import ANCHOR_QUANTIZERS, build_anchor, end_layers, integer_layers, mac_module_names
from bench.run_all import QUICK
from bench.sweep import float_start, load_context
from models.nets import load_float_weights

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "models" / "checkpoints" / "digits_cnn_float.pt"


def test_float_start_carries_the_float_checkpoints_weights():
    """Our flows' float start holds the checkpoint's float weights under 4-bit weight Quant nodes."""
    ctx = load_context(QUICK[0])
    model = float_start(ctx).model
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quant_weights = {}
    for node in model.graph.node:
        if node.op_type == "Quant" and node.input[0] in inits and inits[node.input[0]].ndim >= 2:
            quant_weights[node.input[0]] = (inits[node.input[0]], int(inits[node.input[3]]))
    state = torch.load(CHECKPOINT, map_location="cpu")
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        expected = state[name].numpy()
        matches = [bits for weights, bits in quant_weights.values()
                   if weights.shape == expected.shape and np.array_equal(weights, expected)]
        assert matches == [4], name
    assert float_start(ctx) is float_start(ctx)  # built once per context


def test_paper_anchor_keeps_the_plain_quantizer_on_the_end_layers():
    quantizer = ANCHOR_QUANTIZERS["brevitas-a2q+"]
    names = mac_module_names(build_anchor("digits_cnn", quantizer, 12, 4, 4))
    assert names == ["conv1", "conv2", "fc"] and end_layers(names) == ("conv1", "fc")
    model = load_float_weights(build_anchor("digits_cnn", quantizer, 12, 4, 4, plain_layers=("conv1", "fc")),
                               CHECKPOINT)
    injectors = {name: model.get_submodule(name).weight_quant.quant_injector.__name__ for name in names}
    assert injectors == {"conv1": Int8WeightPerChannelFloat.__name__, "conv2": quantizer.__name__,
                         "fc": Int8WeightPerChannelFloat.__name__}
    sample = np.zeros((1, 1, 8, 8), dtype=np.float32)
    assert [layer.name for layer in integer_layers(model, quantizer, sample)] == ["conv2"]


def _run(command: str, widths: tuple[int, ...]) -> dict:
    rows = [{"method": "float", "P": None}] + [{"method": m, "P": p} for p in widths for m in ("qat", "ours-best")]
    config = {"widths": list(widths), "train_widths": list(widths), "equal_budget_widths": list(widths)}
    return {"command": command, "threads": 1, "versions": {}, "total_seconds": 60.0,
            "models": {"m": {"config": config, "rows": rows, "seconds": 30.0}}}


def test_protocol_merges_runs_of_one_model_at_disjoint_widths():
    from bench.protocol import merge

    merged = merge([_run("a", (11,)), _run("b", (13, 12))])
    entry = merged["models"]["m"]
    assert [(r["method"], r["P"]) for r in entry["rows"]] == [
        ("float", None), ("qat", 13), ("ours-best", 13), ("qat", 12), ("ours-best", 12), ("qat", 11), ("ours-best", 11)]
    assert entry["config"]["widths"] == [13, 12, 11] and entry["seconds"] == 60.0
    assert [run["command"] for run in merged["runs"]] == ["a", "b"]
    try:
        merge([_run("a", (11,)), _run("b", (11,))])
    except ValueError as error:
        assert "P=[11]" in str(error)
    else:
        raise AssertionError("overlapping widths were merged")


def test_protocol_adds_runs_to_an_earlier_merge():
    """The committed bench/protocol.json is itself an input: merging onto it equals merging every run at once."""
    from bench.protocol import merge

    runs = [_run("a", (11,)), _run("b", (13, 12)), _run("c", (15,))]
    assert merge([merge(runs[:2]), runs[2]]) == merge(runs)
    try:
        merge([merge(runs[:2]), _run("d", (12,))])
    except ValueError as error:
        assert "P=[12]" in str(error)
    else:
        raise AssertionError("a width of the earlier merge was merged again")


def test_validation_loss_is_the_training_loss():
    """Cross-entropy of the logits and MSE, as torch computes them for training."""
    from models.evaluate import loss

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(7, 10)) * 30, rng.integers(0, 10, 7)  # large logits: no overflow in exp
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert np.isclose(loss("digits", logits, labels), expected, rtol=1e-12)
    images, targets = rng.random((2, 1, 4, 4)), rng.random((2, 1, 4, 4))
    expected = torch.nn.functional.mse_loss(torch.tensor(images), torch.tensor(targets)).item()
    assert np.isclose(loss("sr", images, targets), expected, rtol=1e-12)


def test_ours_best_breaks_validation_ties_by_the_lower_loss():
    from bench.sweep import _ours_best

    def row(method: str, val_score: float, val_loss: float | None) -> dict:
        return {"method": method, "status": "ok", "score": 90.0, "val_score": val_score, "val_loss": val_loss,
                "sparsity": 0.1, "guaranteed_width": 12, "free_width": None, "overflow_fraction": 0.0}

    tied = [row("project-a2q", 99.0, 0.5), row("axe", 100.0, 0.08), row("qat", 100.0, 0.03)]
    assert _ours_best(None, tied)["selected"] == "qat"
    assert _ours_best(None, tied + [row("qat-float", 100.0, 0.01)])["selected"] == "qat-float"
    # a higher validation score wins over a lower loss
    assert _ours_best(None, [row("axe", 100.0, 0.3), row("qat", 99.72, 0.01)])["selected"] == "axe"
    # rows saved before the loss was stored: the method listed first, as before
    old = [{k: v for k, v in r.items() if k != "val_loss"} for r in tied]
    assert _ours_best(None, old)["selected"] == "axe"


def test_protocol_merges_seeds_of_one_width_and_refuses_a_seed_twice():
    """Runs of the same widths with other seeds are merged; rows without a seed (older runs) are seed 0."""
    from bench.protocol import merge

    def seeded(command: str, widths: tuple[int, ...], seed: int) -> dict:
        run = _run(command, widths)
        run["models"]["m"]["rows"] = [{**row, "seed": seed} for row in run["models"]["m"]["rows"]]
        return run

    merged = merge([_run("a", (12, 11)), seeded("b", (12,), 1), seeded("c", (12, 11), 2)])
    entry = merged["models"]["m"]
    assert entry["seeds"] == [0, 1, 2] and entry["config"]["widths"] == [12, 11]
    assert [(r["method"], r["P"], r["seed"]) for r in entry["rows"]] == [
        ("float", None, 0), ("qat", 12, 0), ("ours-best", 12, 0), ("qat", 12, 1), ("ours-best", 12, 1),
        ("qat", 12, 2), ("ours-best", 12, 2), ("qat", 11, 0), ("ours-best", 11, 0), ("qat", 11, 2),
        ("ours-best", 11, 2)]
    for runs in ([_run("a", (12, 11)), seeded("b", (11,), 0)], [seeded("a", (12,), 1), merge([seeded("b", (12,), 1)])]):
        try:
            merge(runs)
        except ValueError as error:
            assert "P=[" in str(error) and "seed" in str(error)
        else:
            raise AssertionError("a width was merged twice with the same seed")


def _seeded_entry(scores: dict[int, dict[str, tuple[float, float]]]) -> dict:
    """A one-width (P=12) entry: per seed, per method (test score, validation score); ours-best chosen per seed by
    the benchmark's own rule (bench.sweep._ours_best)."""
    from bench.sweep import _ours_best

    rows = [{"method": "quantized", "P": None, "status": "ok", "score": 97.0, "pct_of_float": 97.0}]
    for seed, methods in scores.items():
        at_p = [{"method": m, "P": 12, "seed": seed, "status": "ok", "score": test, "pct_of_float": test,
                 "val_score": val, "val_loss": 0.1, "sparsity": 0.1, "guaranteed_width": 12, "free_width": None,
                 "overflow_fraction": 0.0} for m, (test, val) in methods.items()]
        best = _ours_best(None, [r for r in at_p if not r["method"].startswith("brevitas")])
        at_p.append({**at_p[0], **best, "method": "ours-best", "pct_of_float": best["score"]})
        rows += at_p
    config = {"widths": [12], "train_widths": [12], "equal_budget_widths": [12]}
    return {"model": "m", "setup": "all", "variant": "w4a4", "metric": "top-1 %", "float_score": 100.0,
            "plain_width": 15, "config": config, "rows": rows, "seeds": sorted(scores)}


def test_seed_means_average_ours_best_chosen_per_seed_and_compare_the_means():
    """Seed 0 alone is behind; over both seeds ours is ahead of the anchor with the higher mean (A2Q), though
    averaging each seed's better anchor (A2Q at seed 0, A2Q+ at seed 1) would put it behind."""
    from bench.markdown import comparison_summary, pivot_table
    from bench.protocol import seed_means

    entry = _seeded_entry({
        # ours best = qat at seed 0 (higher validation score), qat-float at seed 1: mean (96.5 + 97.5) / 2 = 97.0,
        # below the mean of either method (qat 98.0, qat-float 97.75): the choice is made per seed
        0: {"qat": (96.5, 100.0), "qat-float": (99.0, 99.0), "brevitas-a2q": (97.5, 99.0), "brevitas-a2q+": (96.0, 99.0)},
        1: {"qat": (99.5, 99.0), "qat-float": (97.5, 100.0), "brevitas-a2q": (96.0, 99.0), "brevitas-a2q+": (97.0, 99.0)},
    })
    means = {row["method"]: row for row in seed_means(entry)["rows"] if row["P"] == 12}
    assert means["ours-best"]["score"] == 97.0 and means["ours-best"]["selected"] == "qat/qat-float"
    assert (means["brevitas-a2q"]["score"], means["brevitas-a2q+"]["score"]) == (96.75, 96.5)
    assert (means["ours-best"]["score_min"], means["ours-best"]["score_max"], means["ours-best"]["seeds"]) == (
        96.5, 97.5, [0, 1])
    summary = "\n".join(comparison_summary({"models": {"m": seed_means(entry)}}))
    assert ("ahead or equal at 1 of 1 widths. Ahead/equal at: P=12: ours 97.00 [96.50-97.50, n=2] (qat/qat-float) "
            "vs Brevitas A2Q 96.75 [96.00-97.50, n=2] (+0.25)") in summary
    seed0 = {**entry, "rows": [r for r in entry["rows"] if r.get("seed", 0) == 0], "seeds": [0]}
    assert "Behind at: P=12: ours 96.50 (qat) vs Brevitas A2Q 97.50 (-1.00)" in "\n".join(
        comparison_summary({"models": {"m": seed_means(seed0)}}))
    table = "\n".join(pivot_table(seed_means(entry)))
    # no columns for methods without rows
    assert "| P | QAT (ours) | QAT from float (ours) | ours best | Brevitas A2Q | Brevitas A2Q+ |" in table
    assert "| 12 | 98.00 (98.0%) [96.50-99.50, n=2] |" in table


def test_protocol_merges_a_run_of_other_methods_into_the_same_width_and_seed():
    """``bench.run_all --methods qat-float-eq`` adds rows to an earlier run's width and seed; the same method twice
    is refused, and a run's 'not run' rows leave the method to the run that ran it."""
    from bench.protocol import merge

    added = _run("b", (12,))
    added["models"]["m"]["rows"] = [{"method": "float", "P": None}, {"method": "qat-float-eq", "P": 12},
                                    {"method": "qat", "P": 12, "status": "not run"}]
    first = _run("a", (12,))
    for run in (first, added):
        run["models"]["m"]["rows"] = [{"status": "ok", **row} for row in run["models"]["m"]["rows"]]
    entry = merge([first, added])["models"]["m"]
    assert [(r["method"], r["P"]) for r in entry["rows"]] == [
        ("float", None), ("qat", 12), ("ours-best", 12), ("qat-float-eq", 12)]
    try:
        merge([first, _run("c", (12,))])
    except ValueError as error:
        assert "P=[12]" in str(error) and "'qat'" in str(error)
    else:
        raise AssertionError("a method was merged twice at one width and seed")


def test_ours_best_equal_total_chooses_per_seed_among_our_rows_and_qat_from_float_with_the_total_budget():
    from bench.markdown import comparison_summary
    from bench.protocol import seed_means, with_equal_total_best

    scores = {
        # seed 0: qat-float-eq has the best validation score; seed 1: qat does. Mean (98.0 + 97.0) / 2 = 97.5
        0: {"qat": (96.0, 99.0), "qat-float-eq": (98.0, 100.0), "brevitas-a2q-eq": (97.25, 99.0)},
        1: {"qat": (97.0, 100.0), "qat-float-eq": (95.0, 99.0), "brevitas-a2q-eq": (97.25, 99.0)},
    }
    entry = with_equal_total_best(_seeded_entry(scores))
    derived = [(r["seed"], r["selected"], r["score"]) for r in entry["rows"] if r["method"] == "ours-best-eq"]
    assert sorted(derived) == [(0, "qat-float-eq", 98.0), (1, "qat", 97.0)]
    summary = "\n".join(comparison_summary({"models": {"m": seed_means(entry)}}))
    assert ("P=12: ours [ours best, equal total] 97.50 [97.00-98.00, n=2] (qat-float-eq/qat) vs A2Q, equal total "
            "97.25 [same, n=2] (+0.25)") in summary
    # ours best (benchmark budget) is qat at both seeds: 96.5, behind; ours best, equal total is ahead
    assert "P=12: ours 96.50 [96.00-97.00, n=2] (qat/qat) vs" not in summary.split("equal total training")[1]
    # a width where one seed lacks the row gets no ours-best-eq: the comparison falls back to ours best
    del scores[1]["qat-float-eq"]
    entry = with_equal_total_best(_seeded_entry(scores))
    assert not [r for r in entry["rows"] if r["method"] == "ours-best-eq"]
    summary = "\n".join(comparison_summary({"models": {"m": seed_means(entry)}}))
    assert ("P=12: ours [ours best] 96.50 [96.00-97.00, n=2] (qat/qat) vs A2Q, equal total 97.25 [same, n=2] "
            "(-0.75)") in summary


def test_protocol_replace_puts_a_rerun_method_in_place_and_chooses_ours_best_again():
    """A re-run of ``axe`` (after a change to it) replaces the earlier axe row of its width and seed; ours-best
    there is chosen again by the benchmark's rule, the other seed keeps its rows, the run is listed as replacing,
    and a re-run with nothing to replace is refused."""
    from bench.protocol import merge, replace_rows

    entry = _seeded_entry({
        0: {"axe": (90.0, 99.5), "qat": (95.0, 99.0)},  # axe has the better validation score: ours best = axe
        1: {"axe": (91.0, 98.0), "qat": (96.0, 99.0)},
    })
    earlier = {"runs": [{"command": "a", "threads": 1, "versions": {}, "total_seconds": 60.0}],
               "models": {"m": entry}}
    rerun = _run("b", (12,))
    rerun["models"]["m"]["rows"] = [{"method": "float", "P": None, "status": "ok"},
                                    {**entry["rows"][1], "score": 94.0, "val_score": 98.5}]  # seed 0's axe, re-run
    replaced = replace_rows(merge([earlier]), [rerun])
    rows = {(r["method"], r.get("seed")): r for r in replaced["models"]["m"]["rows"] if r["P"] == 12}
    assert (rows["axe", 0]["score"], rows["axe", 1]["score"]) == (94.0, 91.0)
    assert (rows["ours-best", 0]["selected"], rows["ours-best", 0]["score"]) == ("qat", 95.0)  # chosen again
    assert (rows["ours-best", 1]["selected"], rows["ours-best", 1]["score"]) == ("qat", 96.0)
    assert len(rows) == 6 and len(replaced["models"]["m"]["rows"]) == 7
    assert [(run["command"], run.get("replaces", False)) for run in replaced["runs"]] == [("a", False), ("b", True)]
    rerun["models"]["m"]["rows"][1] = {**rerun["models"]["m"]["rows"][1], "seed": 5}
    try:
        replace_rows(merge([earlier]), [rerun])
    except ValueError as error:
        assert "seed 5" in str(error) and "no single earlier row" in str(error)
    else:
        raise AssertionError("a re-run without an earlier row was added instead of refused")


def test_selection_check_compares_the_rule_with_the_lowest_validation_loss_per_seed():
    """Seed 0: the rule takes qat (higher validation score) and the loss qat-float, 1 point better on test; seed 1:
    both take qat; seed 2 (left out by ``seeds``): the loss's pick is 2 points worse."""
    from bench.selection_check import compare
    from bench.sweep import OUR_METHODS

    def row(method: str, seed: int, test: float, val: float, loss: float) -> dict:
        return {"method": method, "P": 12, "seed": seed, "status": "ok", "score": test, "val_score": val,
                "val_loss": loss}

    rows = [row("qat", 0, 90.0, 95.0, 0.30), row("qat-float", 0, 91.0, 94.0, 0.20),
            row("qat", 1, 92.0, 95.0, 0.20), row("qat-float", 1, 91.0, 94.0, 0.30),
            row("qat", 2, 93.0, 95.0, 0.30), row("qat-float", 2, 91.0, 94.0, 0.20)]
    models = {"m": {"rows": [{"method": "float", "P": None}, *rows]}}
    result = compare(models, OUR_METHODS, {0, 1})
    assert result["counts"] == {"higher": 1, "same": 1} and result["differences"] == {("m", 12): [1.0, 0.0]}
    result = compare(models, OUR_METHODS, None)
    assert result["counts"] == {"higher": 1, "same": 1, "lower": 1} and sum(result["differences"]["m", 12]) == -1.0
