"""The benchmark suite's quick configuration, run end to end as CI runs it (`python -m bench.run_all --quick`).

Asserts the shape of the results, not fixed numbers: one row per (method, P), metrics inside their
ranges, the wrap-around collapse of the unconstrained model, every guaranteed row within its P,
the sparsity of the committed model recomputed here from its ONNX weights, the layers the A2Q
papers' set-up constrains (read here from the ONNX graph) and the equal-budget anchors' epochs
(recomputed here from models/metrics.json and the training split).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench.run_all import QUICK, only_widths
from bench.sweep import EQUAL_BUDGET_METHODS, METHODS, OUR_METHODS

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.run_all", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench-quick")
    done = _bench("--quick", "--out", str(out), "--threads", "1", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_writes_report_plots_and_json(quick):
    out, results = quick
    markdown = (out / "BENCHMARKS.md").read_text()
    for png in ("accuracy_vs_P.png", "sparsity_vs_P.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{png})" in markdown
    assert "## Reading the results" in markdown and "## Does A2Q induce unstructured sparsity?" in markdown
    assert set(results["models"]) == {bench.key for bench in QUICK}
    assert {bench.setup for bench in QUICK} == {"all", "paper"}  # the quick run covers both set-ups
    assert any(bench.equal_budget_widths for bench in QUICK)  # and the equal-budget rows
    assert "(2 models at a time, 1 torch thread each;" in markdown  # the fixture's --jobs 2 --threads 1
    assert "#### Set-up `paper`" in markdown and "*equal total training*" in markdown and "*same start*" in markdown


def test_one_row_per_method_and_width(quick):
    _, results = quick
    for bench in QUICK:
        rows = results["models"][bench.key]["rows"]
        keys = [(r["method"], r["P"]) for r in rows]
        expected = [("float", None), ("quantized", None)] + [(m.key, p) for p in bench.widths for m in METHODS]
        assert sorted(keys, key=str) == sorted(expected, key=str)
        assert {r["seed"] for r in rows} == {bench.budget.seed}  # every row records its training seed (no --seed: 0)
        for r in rows:
            trained_method = any(m.key == r["method"] and m.trained for m in METHODS) or r["method"] == "axe"
            run_at = bench.equal_budget_widths if r["method"] in EQUAL_BUDGET_METHODS else bench.train_widths
            if r["status"] == "not run":  # only trained methods may be skipped, and only outside their widths
                assert trained_method and r["P"] not in run_at, r
            else:
                assert r["status"] == "ok", r


def test_metrics_in_range(quick):
    _, results = quick
    for entry in results["models"].values():
        float_score = entry["float_score"]
        assert 50.0 < float_score <= 100.0
        for r in entry["rows"]:
            if r["status"] != "ok":
                continue
            assert 0.0 <= r["score"] <= 100.0, r
            assert r["pct_of_float"] == pytest.approx(100.0 * r["score"] / float_score)
            if r["method"] != "float":
                assert 0.0 <= r["sparsity"] <= 1.0, r
            if r["overflow_fraction"] is not None:
                assert 0.0 <= r["overflow_fraction"] <= 1.0, r


def test_unconstrained_wrap_collapses_at_the_smallest_width(quick):
    _, results = quick
    for bench in QUICK:
        if bench.setup != "all":  # the paper set-up's one hidden layer at P=12 does not overflow on this data
            continue
        rows = {(r["method"], r["P"]): r for r in results["models"][bench.key]["rows"]}
        wide, narrow = rows[("unconstrained-wrap", max(bench.widths))], rows[("unconstrained-wrap", min(bench.widths))]
        assert wide["overflow_fraction"] == 0.0 and narrow["overflow_fraction"] > 0.0
        assert narrow["score"] < wide["score"]
        assert wide["score"] == pytest.approx(rows[("quantized", None)]["score"])  # no overflow: the exact result


def test_guaranteed_rows_fit_their_width(quick):
    _, results = quick
    for entry in results["models"].values():
        for r in entry["rows"]:
            if r["status"] == "ok" and r["method"] in OUR_METHODS + ("ours-best",):
                assert r["guaranteed_width"] <= r["P"], r
                assert r["overflow_fraction"] == 0.0
            if r["status"] == "ok" and r["method"].startswith("brevitas"):
                assert r["guaranteed_width"] <= r["P"], r  # Brevitas' own forward keeps its promise
                assert r["export_width"] >= 2 and 0.0 <= r["export_overflow_fraction"] <= 1.0


def _zero_fraction_of_quant_weights(path: Path, weight_bits: int) -> float:
    """Zeros among the integer weights of every W-bit weight Quant node, read straight from the ONNX file."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zeros = total = 0
    for node in model.graph.node:
        if node.op_type != "Quant" or node.input[0] not in inits or node.input[0] == "global_in":
            continue
        weights, scale, zero_point, bits = (inits[name] for name in node.input[:4])
        if int(bits) != weight_bits or weights.ndim < 2:
            continue
        q = np.clip(np.round(weights / scale + zero_point), -(2 ** (weight_bits - 1)) + 1, 2 ** (weight_bits - 1) - 1)
        zeros += int(np.count_nonzero(q == 0))
        total += q.size
    return zeros / total


def test_baseline_sparsity_matches_the_onnx_weights(quick):
    _, results = quick
    for bench in QUICK:
        if bench.setup != "all":  # the paper set-up counts the hidden layers only
            continue
        entry = results["models"][bench.key]
        quantized = next(r for r in entry["rows"] if r["method"] == "quantized")
        expected = _zero_fraction_of_quant_weights(REPO / "models" / f"{bench.name}_{bench.variant}.onnx",
                                                   bench.weight_bits)
        assert quantized["sparsity"] == pytest.approx(expected)


def test_quick_refuses_to_overwrite_the_committed_results():
    committed = REPO / "BENCHMARKS.md"
    before = committed.read_bytes() if committed.exists() else None
    done = _bench("--quick", "--out", str(REPO))
    assert done.returncode == 2 and "must not overwrite" in done.stderr
    assert (committed.read_bytes() if committed.exists() else None) == before


def _mac_nodes(path: Path) -> list[str]:
    """MAC node names of an ONNX file in graph order, read from the graph itself."""
    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]


def test_paper_setup_leaves_the_first_and_last_layers_free(quick):
    _, results = quick
    for bench in QUICK:
        entry = results["models"][bench.key]
        macs = _mac_nodes(REPO / "models" / f"{bench.name}_{bench.variant}.onnx")
        if bench.setup == "all":
            assert entry["constrained_layers"] == macs  # digits_cnn: every MAC layer has 4-bit weights
            free = [r for r in entry["rows"] if r["status"] == "ok" and r.get("free_width") is not None]
            assert not free
        else:
            assert entry["constrained_layers"] == macs[1:-1]
            assert entry["plain_modules"] == ["conv1", "fc"]
            ours = [r for r in entry["rows"] if r["status"] == "ok" and r["method"] in OUR_METHODS]
            assert ours and all(r["free_width"] is not None for r in ours)
            # the committed model fits its own width, and P=32 leaves it unchanged: the free layers keep theirs
            quantized = next(r for r in entry["rows"] if r["method"] == "quantized")
            assert quantized["guaranteed_width"] == entry["plain_width"]
            project = next(r for r in ours if r["P"] == 32 and r["method"] == "project-exact")
            assert project["free_width"] == quantized["free_width"] > project["guaranteed_width"]


def test_equal_budget_anchors_add_the_committed_models_qat(quick):
    from models.data import load_dataset

    _, results = quick
    metrics = json.loads((REPO / "models" / "metrics.json").read_text())
    for bench in QUICK:
        qat = metrics[bench.name][bench.variant]
        full_train = len(load_dataset(metrics[bench.name]["dataset"], "train")[0])
        extra = math.ceil(qat["qat_epochs"] * full_train / bench.budget.samples)
        rows = results["models"][bench.key]["rows"]
        for method in ("brevitas-a2q-eq", "brevitas-a2q+-eq"):
            for p in bench.equal_budget_widths:
                row = next(r for r in rows if r["method"] == method and r["P"] == p)
                assert row["status"] == "ok" and row["epochs"] == bench.budget.epochs + extra, row
                assert 1 <= row["best_epoch"] <= row["epochs"]
        for p in bench.equal_budget_widths:
            same = next(r for r in rows if r["method"] == "brevitas-a2q" and r["P"] == p)
            assert same["epochs"] == bench.budget.epochs


def test_only_widths_restricts_every_width_list():
    bench = QUICK[0]
    narrowed = only_widths(bench, {12, 32})
    assert narrowed.widths == (32, 12) and narrowed.train_widths == (12,) and narrowed.equal_budget_widths == (12,)


def test_unknown_setup_is_refused():
    done = _bench("--quick", "--setups", "all,nope")
    assert done.returncode == 2 and "--setups" in done.stderr


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_models_run_concurrently_give_the_same_rows_as_one_at_a_time(quick, tmp_path):
    _, results = quick  # both quick models, 2 at a time
    assert results["jobs"] == 2
    done = _bench("--quick", "--setups", "paper", "--out", str(tmp_path), "--threads", "1", "--jobs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads((tmp_path / "results.json").read_text())
    key = next(bench.key for bench in QUICK if bench.setup == "paper")
    assert list(alone["models"]) == [key]
    assert _without_timings(alone["models"][key]["rows"]) == _without_timings(results["models"][key]["rows"])
