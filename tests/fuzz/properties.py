"""The soundness properties, checked on one generated case by running the CLI in-process.

(a) ``analyze`` reports, per channel, a range containing every executed accumulator value;
(b) ``project --acc-bits P`` exits 0 and its output executes within P bits (recorded signedness), or it
    exits 1 naming a layer, and a "smallest feasible target" it names really is feasible;
(c) ``verify --acc-bits P`` (and ``verify`` on annotate's output) never says "no overflow" when an
    executed worst case overflows;
(d) ``annotate`` never records less than the executed range;
(e) no command leaks a traceback (exit codes other than 0/1/3, or an uncaught exception);
(f) optionally (``lower=True``), ``lower --from-annotations`` of project's (and finetune's) output: every MVAU/VVAU
    it writes holds its executed worst case in its ``accDataType`` (QONNX cases, and Q/DQ ones qonnx's QCDQToQuant
    converts whole, that FINN can lower; others must be refused by name);
(g) optionally (``finetune="METHOD [OPTIONS]"``), ``finetune --acc-bits P --method METHOD [OPTIONS]`` (one short
    epoch on random inputs, distilled from the model itself) exits 0 and its output executes within P bits, read at
    the weight scales the output holds (training may change them), or it refuses (exit 1) without a traceback.
(h) with per-layer offsets (``layer_deltas``), a width per layer ``{layer: P_layer}`` around each layer's executed
    width: ``verify --widths-json`` never says "no overflow" where a layer executes past its own P_layer, and
    ``project --widths-json`` exits 0 with every layer executing within its own P_layer (and, with ``lower``, (f)
    holds on that output; with ``finetune``, (g) holds for ``finetune --layer NAME=P_layer ...``), or refuses naming
    a layer;
    optionally (``allocate=True``, QONNX cases under the FINN cost model, Q/DQ ones under ``--cost acc-bits``), the
    map ``allocate`` writes is one ``project --widths-json`` meets;
(i) optionally (``tile=T``), on the registers of a multi-stage datapath (each K-tile's partial sum, each running sum
    of whole tiles; :func:`tests.fuzz.oracle.tile_ranges` executes them): ``analyze --tile T`` reports ranges holding
    them, ``verify --tile T`` never says "no overflow" where one leaves its width, and ``project --tile T --acc-bits
    P_inner`` (one bit below the widest executed K-tile of the input) exits 0 with every one within the widths it
    records, or refuses naming a layer (retried with the ``--skip`` or the width a refusal names);
(j) optionally (``data=True``), ``verify --data X --layer NAME=P`` on random inputs ``X``
    (the whole model executed by qonnx on them gives each layer's exact accumulators, :func:`data_accumulators`):
    at P = the layer's width on that data and one bit less, with wrap-around, it counts exactly the accumulations
    outside P bits as overflows (and every accumulation), the outputs differ from exact execution only where some
    did; with saturation, at least those differ.

Each violation is a :class:`Failure` with one of :data:`CATEGORIES`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import numpy as np
import typer
from hypothesis import strategies as st
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.cli import app
from a2q_passes.errors import A2QError
from tests.fuzz.generate import Case
from tests.fuzz.oracle import ExecutedRange, OracleError, _node, data_accumulators, executed_ranges, fits, random_data, width

CATEGORIES = {
    "unsafe_output": "project or finetune wrote a model that overflows P (or is invalid)",
    "false_no_overflow": "verify said 'no overflow' on a model that overflows",
    "too_small_analysis": "analyze reported a range smaller than executed",
    "too_small_annotation": "annotate recorded less than executed",
    "non_integer_read": "analyze read a layer whose weight scale varies along the summed axis as one integer accumulation",
    "bad_refusal": "project refused without naming a layer, or named an infeasible smallest P",
    "unsafe_lowering": "lower wrote an MVAU/VVAU whose executed worst case leaves its accDataType",
    "wrong_simulation": "verify --data counted other overflows than the executed accumulators on that data have",
    "internal_error": "a command exited 4 (self-check failed)",
    "traceback": "a command leaked a traceback / unexpected exit code",
}
FINETUNE_SAMPLES = 16
# every --method of `a2q finetune` with its default init, and each other --init (and AXE's tiles) once
FINETUNE_VARIANTS = ("norm", "qat", "a2q", "axe", "norm --init project", "qat --init axe", "a2q --init none",
                     "axe --tile 4", "qat --input-ranges finn", "norm --train-act-scales")
# generator switches whose layers finetune refuses by name (or never reads: QDQ, --zero-point subtract); leaving them
# out of (g)'s cases makes most examples train
FINETUNE_REFUSED = frozenset({"one_bit_signed_weights", "finn_bipolar_weights", "non_integer_bits",
                              "unreadable_quantized_layers", "scale_along_k", "act_x_act_matmul", "subtract_zero_point",
                              "dq_int8_without_zero_point", "qcdq_clip", "extracted_scales"})
# property (h): each layer's offset below its executed width (negative: wider than it needs), cycled over the layers
LAYER_DELTAS = st.lists(st.integers(-1, 3), min_size=1, max_size=4)
TILES = st.integers(1, 6)  # property (i): terms per K-tile
SKIP_HINT = re.compile(r"unconstrained explicitly with ((?:--skip \S+ ?)+)")
TILE_SKIP_HINT = re.compile(r"multi-stage datapath \(.*?\); ((?:--skip \S+ ?)+)")
SMALLEST_P = re.compile(r"smallest feasible target is (\d+) bits")
DATA_SAMPLES = 6  # property (j): random inputs per case


@dataclass
class Failure:
    category: str
    message: str


@dataclass
class CliResult:
    code: int | None
    stdout: str
    stderr: str
    traceback: str | None = None


@dataclass
class Outcome:
    failures: list[Failure] = field(default_factory=list)
    commands: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    checked: Counter = field(default_factory=Counter)  # what a property compared, e.g. simulated layers

    def fail(self, category: str, message: str) -> None:
        self.failures.append(Failure(category, message))


def run_cli(*args: str) -> CliResult:
    """Run ``a2q ARGS`` in this process, as ``a2q_passes.cli.main`` does, capturing its output.

    The click command is built once (typer rebuilds it on every call, 0.2 s); errors are handled as
    ``main`` handles them: an :class:`A2QError` becomes its exit code, anything else is a leak.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                _command().main(args=[str(a) for a in args], prog_name="a2q", standalone_mode=True)
                code = 0
            except A2QError as error:
                print(f"error: {error}", file=sys.stderr)
                code = error.exit_code
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 - an uncaught exception is exactly what property (e) looks for
        return CliResult(None, out.getvalue(), err.getvalue(), traceback.format_exc())
    return CliResult(code, out.getvalue(), err.getvalue())


@functools.cache
def _command() -> click.Command:
    return typer.main.get_command(app)


def _common_options(case: Case) -> list[str]:
    options = ["--zero-point", case.zero_point]
    for spec in case.input_dtypes:
        options += ["--input-dtype", spec]
    return options


class Checker:
    """Runs the commands on one case and collects violations."""

    def __init__(self, case: Case, workdir: Path, outcome: Outcome) -> None:
        self.case = case
        self.workdir = workdir
        self.outcome = outcome
        self.names = [info.node for info in case.layers]

    def cli(self, command: str, *args: str) -> CliResult:
        result = run_cli(command, *args)
        self.outcome.commands += 1
        self.outcome.exit_codes[command] = result.code
        if result.traceback is not None:
            last = result.traceback.strip().splitlines()[-1]
            self.outcome.fail("traceback", f"`a2q {command}` raised {last}")
        elif result.code == 4:
            self.outcome.fail("internal_error", f"`a2q {command}` exited 4: {result.stderr.strip()[-300:]}")
        elif result.code not in (0, 1, 3):
            self.outcome.fail("traceback", f"`a2q {command}` exited {result.code}: {result.stderr.strip()[-300:]}")
        return result

    def _names_a_layer(self, message: str) -> bool:
        return any(re.search(rf"\b{re.escape(name)}\b", message) for name in self.names)

    # (a)
    def analyze(self, path: Path, executed: dict[str, ExecutedRange]) -> None:
        result = self.cli("analyze", path, "--json", "--per-channel", *_common_options(self.case))
        if result.code not in (0, 3):
            return
        along_k = {info.node for info in self.case.layers if info.scale_along_k}
        for layer in json.loads(result.stdout)["layers"]:
            if layer["node"] in along_k and layer["status"] == "ok":
                self.outcome.fail("non_integer_read", f"analyze: {layer['node']} reported "
                                  f"[{layer['acc_min']}, {layer['acc_max']}] though its weight scale varies along K")
            done = executed.get(layer["node"])
            if done is None or layer["status"] != "ok":
                continue
            lo, hi = np.asarray(layer["per_channel"]["acc_min"]), np.asarray(layer["per_channel"]["acc_max"])
            bad = np.nonzero((done.acc_min < lo) | (done.acc_max > hi))[0]
            if bad.size:
                c = int(bad[0])
                self.outcome.fail("too_small_analysis",
                                  f"analyze: {layer['node']} channel {c} reported [{lo[c]}, {hi[c]}], "
                                  f"executed [{done.acc_min[c]}, {done.acc_max[c]}]")

    # (d) and (c) on the recorded widths
    def annotate(self, path: Path, executed: dict[str, ExecutedRange]) -> None:
        out = self.workdir / "annotated.onnx"
        result = self.cli("annotate", path, out, *_common_options(self.case))
        if result.code != 0:
            return
        records = _records(out)
        for node, info in records.items():
            done = executed.get(node)
            if done is None:
                continue
            signed = str(info["acc_dtype"]).startswith("INT")
            if done.lo < info["acc_min"] or done.hi > info["acc_max"] or not fits(done.lo, done.hi, info["acc_bits"], signed):
                self.outcome.fail("too_small_annotation",
                                  f"annotate: {node} recorded {info['acc_dtype']} [{info['acc_min']}, {info['acc_max']}], "
                                  f"executed [{done.lo}, {done.hi}]")
        result = self.cli("verify", out, "--json", *_common_options(self.case))
        if result.code == 0:
            self._no_overflow_claim(result, executed, {n: int(r["acc_bits"]) for n, r in records.items()}, "verify (recorded widths)")

    # (c)
    def verify(self, path: Path, executed: dict[str, ExecutedRange], bits: int) -> None:
        result = self.cli("verify", path, "--acc-bits", bits, "--json", *_common_options(self.case))
        if result.code == 0:
            self._no_overflow_claim(result, executed, {n: bits for n in executed}, f"verify --acc-bits {bits}")

    def _no_overflow_claim(self, result: CliResult, executed: dict[str, ExecutedRange], widths: dict[str, int],
                           what: str) -> None:
        verdicts = {v["node"]: v for v in json.loads(result.stdout)["layers"]}
        for node, done in executed.items():
            if node not in widths:
                self.outcome.fail("false_no_overflow", f"{what}: passed without checking integer layer {node}")
                continue
            signed = bool(verdicts.get(node, {}).get("signed", True))
            if not fits(done.lo, done.hi, widths[node], signed):
                kind = "INT" if signed else "UINT"
                self.outcome.fail("false_no_overflow", f"{what}: said no overflow, but {node} executes to "
                                  f"[{done.lo}, {done.hi}] outside {kind}{widths[node]}")

    # (b)
    def project(self, path: Path, bits: int) -> None:
        out = self.workdir / f"projected_{bits}.onnx"
        result = self.cli("project", path, out, "--acc-bits", bits, *_common_options(self.case))
        if result.code == 0:
            self._check_projected(out, bits)
        elif result.code == 1:
            message = result.stderr
            if not self._names_a_layer(message):
                self.outcome.fail("bad_refusal", f"project --acc-bits {bits} refused without naming a layer: "
                                  f"{message.strip()[-300:]}")
            smallest = SMALLEST_P.search(message)
            if smallest:
                self._retry_smallest(path, bits, int(smallest.group(1)))

    def _retry_smallest(self, path: Path, bits: int, p: int) -> None:
        """Re-run project with the smallest feasible target it named: it must now succeed, and fit."""
        out = self.workdir / f"projected_{p}.onnx"
        again = self.cli("project", path, out, "--acc-bits", p, *_common_options(self.case))
        if again.code == 0:
            self._check_projected(out, p)
        elif again.code in (1, 3):  # tracebacks and exit 4 are counted by cli()
            self.outcome.fail("bad_refusal", f"project --acc-bits {bits} named {p} bits as the smallest feasible "
                              f"target, but --acc-bits {p} exits {again.code}: {again.stderr.strip()[-300:]}")

    def _check_projected(self, out: Path, bits: int | dict[str, int], what: str | None = None,
                         case: Case | None = None) -> None:
        """``out`` (written by ``what``, default project) executes within ``bits`` (one width, or one per layer);
        ``case``: the generator's record with the weight scales ``out`` holds (default: the generated case's)."""
        what = what or f"project --acc-bits {bits}"
        model = ModelWrapper(str(out))
        for init in model.graph.initializer:  # FINN datatypes must still hold (no 0 in a BIPOLAR tensor)
            dt = model.get_tensor_datatype(init.name)
            if dt.is_integer() and not dt.name.startswith("SCALED"):
                values = model.get_initializer(init.name)
                if not all(dt.allowed(v) for v in np.unique(values)):
                    self.outcome.fail("unsafe_output", f"{what}: initializer {init.name} "
                                      f"holds values outside its datatype {dt.name}")
        records = _records(out)
        executed = executed_ranges(model, case or self.case)
        for node, done in executed.items():
            # a layer left without a record carries no claim: give it the accumulator its executed range needs
            signed = str(records[node]["acc_dtype"]).startswith("INT") if node in records else done.lo < 0
            p = bits.get(node) if isinstance(bits, dict) else bits
            if p is None:  # a layer the map leaves out carries no claim
                continue
            if not fits(done.lo, done.hi, p, signed):
                kind = "INT" if signed else "UINT"
                state = "" if node in records else " (layer left unconstrained)"
                self.outcome.fail("unsafe_output", f"{what} exited 0, but {node}{state} executes to "
                                  f"[{done.lo}, {done.hi}] outside {kind}{p}")

    # (h)
    def per_layer_widths(self, path: Path, executed: dict[str, ExecutedRange], widths: dict[str, int]) -> Path | None:
        """Returns project's output (None where it refused)."""
        table = self.workdir / "widths.json"
        table.write_text(json.dumps(widths))
        what = f"--widths-json {json.dumps(widths, sort_keys=True)}"
        result = self.cli("verify", path, "--widths-json", table, "--json", *_common_options(self.case))
        if result.code == 0:
            self._no_overflow_claim(result, executed, widths, f"verify {what}")
        out = self.workdir / "projected_per_layer.onnx"
        result = self.cli("project", path, out, "--widths-json", table, *_common_options(self.case))
        if result.code == 0:
            self._check_projected(out, widths, f"project {what}")
            return out
        if result.code == 1 and not self._names_a_layer(result.stderr):
            self.outcome.fail("bad_refusal", f"project {what} refused without naming a layer: "
                              f"{result.stderr.strip()[-300:]}")
        return None

    def allocate(self, path: Path, cost: str) -> None:
        """``allocate`` proves its map on the projected model before writing it, so ``project`` must meet it."""
        data = self.workdir / "calibration.npz"
        np.savez(data, x=_random_inputs(self.case.model, FINETUNE_SAMPLES))
        table = self.workdir / "allocated.json"
        result = self.cli("allocate", path, "--data", data, "--min-score-pct", 90, "--cost", cost, "-o", table,
                          "--no-progress")
        if result.code != 0:
            return  # refusals (FINN's limits under a FINN cost, the torch bridge's ops) are checked by (e) only
        widths = {node: int(p) for node, p in json.loads(table.read_text()).items()}
        out = self.workdir / "projected_allocated.onnx"
        what = f"project --widths-json (allocate's map {json.dumps(widths, sort_keys=True)})"
        again = self.cli("project", path, out, "--widths-json", table)
        if again.code == 0:
            self._check_projected(out, widths, what)
        elif again.code in (1, 3):
            self.outcome.fail("bad_refusal", f"{what} exits {again.code} on the map allocate proved: "
                              f"{again.stderr.strip()[-300:]}")

    # (i)
    def tiled(self, path: Path, tile: int) -> None:
        from tests.fuzz.oracle import tile_ranges

        tileable = [info for info in self.case.layers
                    if info.integer and not info.act_x_act and info.op_type != "ConvTranspose"]
        if not tileable:
            return
        before = {info.node: tile_ranges(self.case.model, self.case, info, tile) for info in tileable}
        widest = max(width(r.lo, r.hi) for tiles, _ in before.values() for r in tiles)
        running = max(width(r.lo, r.hi) for _, sums in before.values() for r in sums)
        # one stage a bit below what the widest layer executes (odd T: the tiles, even T: the running sums), the
        # other at it: an honest verify refuses, one that under-reports that stage claims "no overflow"
        self._tiled_claim(path, tile, widest - tile % 2, running - 1 + tile % 2, before)
        self._tiled_analysis(path, tile, before)
        bits, skips = max(widest - 1, 2), []
        out = self.workdir / f"projected_tile{tile}.onnx"
        for _ in range(3):  # again with the --skip or the smallest width a refusal names, as a user would
            result = self.cli("project", path, out, "--tile", tile, "--acc-bits", bits, *skips,
                              *_common_options(self.case))
            if result.code != 1:
                break
            if not self._names_a_layer(result.stderr):
                self.outcome.fail("bad_refusal", f"project --tile {tile} --acc-bits {bits} refused without naming a "
                                  f"layer: {result.stderr.strip()[-300:]}")
                return
            hint = TILE_SKIP_HINT.search(result.stderr) or SKIP_HINT.search(result.stderr)
            smallest = SMALLEST_P.search(result.stderr)
            if hint:
                skips += hint.group(1).split()
            elif smallest:
                bits = int(smallest.group(1))
            else:
                break
        if result.code != 0:
            return
        records = _records(out)
        model = ModelWrapper(str(out))
        for info in tileable:
            record = records.get(info.node)
            if record is None or record.get("tile") != tile:
                continue
            self._stages_fit(tile_ranges(model, self.case, info, tile), info.node, record["acc_bits"],
                             record["outer_bits"], str(record["acc_dtype"]).startswith("INT"), "unsafe_output",
                             f"project --tile {tile} --acc-bits {bits} exited 0")

    def _tiled_claim(self, path: Path, tile: int, inner: int, outer: int,
                     executed: dict[str, tuple[list[ExecutedRange], list[ExecutedRange]]]) -> None:
        """``verify --tile`` says "no overflow" only where every executed K-tile and running sum fits."""
        inner, outer = max(inner, 1), max(outer, 2)
        result = self.cli("verify", path, "--tile", tile, "--acc-bits", inner, "--outer-bits", outer, "--json",
                          *_common_options(self.case))
        if result.code != 0:
            return
        verdicts = {v["node"]: v for v in json.loads(result.stdout)["layers"]}
        for node, stages in executed.items():
            self._stages_fit(stages, node, inner, outer, bool(verdicts.get(node, {}).get("signed", True)),
                             "false_no_overflow", f"verify --tile {tile} --acc-bits {inner} --outer-bits {outer} "
                             "said no overflow")

    def _tiled_analysis(self, path: Path, tile: int,
                        executed: dict[str, tuple[list[ExecutedRange], list[ExecutedRange]]]) -> None:
        """``analyze --tile``'s ``tile_range`` and ``outer_range`` hold every executed K-tile and running sum."""
        result = self.cli("analyze", path, "--tile", tile, "--json", *_common_options(self.case))
        if result.code not in (0, 3):
            return
        for layer in json.loads(result.stdout)["layers"]:
            stages = executed.get(layer["node"])
            if stages is None or layer["status"] != "ok" or "tile_range" not in layer:
                continue
            for stage, ranges, key in (("K-tile", stages[0], "tile_range"), ("running sum", stages[1], "outer_range")):
                lo, hi = layer[key]
                for index, done in enumerate(ranges):
                    if done.lo < lo or done.hi > hi:
                        self.outcome.fail("too_small_analysis", f"analyze --tile {tile}: {layer['node']} reported "
                                          f"{key} [{lo}, {hi}], but its {stage} {index} executes to "
                                          f"[{done.lo}, {done.hi}]")

    def _stages_fit(self, stages: tuple[list[ExecutedRange], list[ExecutedRange]], node: str, inner: int, outer: int,
                    signed: bool, category: str, what: str) -> None:
        kind = "INT" if signed else "UINT"
        for stage, ranges, p in (("K-tile", stages[0], inner), ("running sum", stages[1], outer)):
            for index, done in enumerate(ranges):
                if not fits(done.lo, done.hi, p, signed):
                    self.outcome.fail(category, f"{what}, but {node}'s {stage} {index} executes to "
                                      f"[{done.lo}, {done.hi}] outside {kind}{p}")

    # (f)
    def lower(self, projected: Path) -> None:
        from qonnx.core.datatype import DataType

        from tests.fuzz.real_files import MVAU_OPS, VVAU_OPS, executed_range, mac_inputs_outside_their_types

        hw = self.workdir / f"{projected.stem}.lowered.onnx"
        result = self.cli("lower", projected, hw, "--from-annotations", "--samples", "2")
        if result.code not in (0, 3) or not hw.exists():
            return  # refusals are checked for naming by (e) only: FINN's own limits are many
        model = ModelWrapper(str(hw))
        for node in model.graph.node:
            if node.op_type not in MVAU_OPS + VVAU_OPS:
                continue
            done = executed_range(model, node.name, "fold")
            acc = DataType[next(a.s.decode() for a in node.attribute if a.name == "accDataType")]
            if done.lo < acc.min() or done.hi > acc.max():
                self.outcome.fail("unsafe_lowering", f"lower: {node.name} executes to [{done.lo}, {done.hi}] outside "
                                  f"its accDataType {acc.name}")
        for problem in mac_inputs_outside_their_types(model):
            self.outcome.fail("unsafe_lowering", f"lower: {problem}, as the lowered graph executes (the check above "
                              "executes each layer over that type)")

    # (g)
    def finetune(self, path: Path, bits: int | dict[str, int], variant: str) -> Path | None:
        """Fine-tune at ``bits`` (one width, or one per layer as ``--layer NAME=P``); where it names layers it cannot
        train, again with them skipped, as its message says: the others must then fit their widths and the skipped
        ones must not need more than analyze reported before. Returns the written model (None where finetune
        refused)."""
        data = self.workdir / "train.npz"
        np.savez(data, x=_random_inputs(self.case.model, FINETUNE_SAMPLES))
        per_layer = isinstance(bits, dict)
        out = self.workdir / ("finetuned_per_layer.onnx" if per_layer else f"finetuned_{bits}.onnx")
        widths = [arg for node, p in bits.items() for arg in ("--layer", f"{node}={p}")] if per_layer else [
            "--acc-bits", bits]
        options = [*widths, "--data", data, "--method", *variant.split(), "--epochs", 1, "--batch-size", 4,
                   "--loss", "mse", "--distill", "--no-progress", "--calib-samples", 8, "--held-out-samples", 4]
        result = self.cli("finetune", path, out, *options)
        skipped = SKIP_HINT.search(result.stderr) if result.code == 1 else None
        if skipped:
            skip = skipped.group(1).split()
            result = self.cli("finetune", path, out, *options, *skip)
            skip = skip[1::2]
        else:
            skip = []
        if result.code != 0:
            return None
        self._check_finetuned(path, out, bits, variant, set(skip))
        return out

    def _check_finetuned(self, path: Path, out: Path, bits: int | dict[str, int], variant: str,
                         skipped: set[str]) -> None:
        from tests.fuzz.real_files import weight_scale

        width_option = f"--layer {json.dumps(bits, sort_keys=True)}" if isinstance(bits, dict) else f"--acc-bits {bits}"
        what = f"finetune {width_option} --method {variant}"
        model = ModelWrapper(str(out))
        layers = [info if info.weight_scale is None or info.act_x_act else
                  replace(info, weight_scale=weight_scale(model, _node(model, info.node))) for info in self.case.layers]
        if "--train-act-scales" in variant.split():  # the activation quantizers' scales moved too: read the output's
            layers = [_with_activation_grid(model, info) for info in layers]
        case = replace(self.case, layers=layers)
        claimed = [info for info in layers if info.node not in skipped]
        self._check_projected(out, bits, what, replace(case, layers=claimed))
        options = variant.split()
        if "--tile" in options:  # AXE holds each run of T terms to the layer's width too
            self._check_tiles_within(out, model, case, claimed, int(options[options.index("--tile") + 1]), bits, what)
        if not skipped:
            return
        before = {layer["node"]: layer for layer in json.loads(run_cli("analyze", path, "--json").stdout)["layers"]}
        for info in layers:
            old = before.get(info.node)
            if info.node not in skipped or not info.integer or old is None or old["status"] != "ok":
                continue
            done = executed_ranges(model, replace(case, layers=[info]))[info.node]
            if width(done.lo, done.hi) > width(old["acc_min"], old["acc_max"]):
                self.outcome.fail("unsafe_output", f"{what} --skip {info.node}: the skipped layer grew from "
                                  f"[{old['acc_min']}, {old['acc_max']}] to executed [{done.lo}, {done.hi}]")


    def _check_tiles_within(self, out: Path, model: ModelWrapper, case: Case, layers: list, tile: int,
                            bits: int | dict[str, int], what: str) -> None:
        """Every executed K-tile partial sum of the recorded layers of ``layers`` fits the layer's width."""
        from tests.fuzz.oracle import tile_ranges

        records = _records(out)
        for info in layers:
            p = bits.get(info.node) if isinstance(bits, dict) else bits
            if info.node not in records or p is None or not info.integer or info.act_x_act or \
                    info.op_type == "ConvTranspose":  # no K order to tile (AXE tiles the others)
                continue
            tiles, _ = tile_ranges(model, case, info, tile)  # AXE promises no running-sum register
            self._stages_fit((tiles, []), info.node, p, p, str(records[info.node]["acc_dtype"]).startswith("INT"),
                             "unsafe_output", f"{what} exited 0")


    # (j)
    def simulated(self, path: Path, most: int | None = None) -> None:
        """``most``: check at most this many layers, spread over the model (large real files)."""
        inputs = random_data(self.case.model, self.case, DATA_SAMPLES)
        try:
            accumulated = data_accumulators(self.case.model, self.case, inputs)
        except OracleError:
            return
        data = self.workdir / "data.npz"
        np.savez(data, **inputs)
        names = sorted(accumulated)
        if most is not None and len(names) > most:
            names = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, most).round().astype(int))]
        for node in names:
            acc = accumulated[node]
            needed = width(int(acc.min()), int(acc.max()))
            for bits, mode in ((needed, "wrap"), (needed - 1, "wrap"), (needed - 1, "saturate")):
                if bits < 1:
                    continue
                what = f"verify --data --layer {node}={bits} --mode {mode}"
                result = self.cli("verify", path, "--layer", f"{node}={bits}", "--data", data, "--mode", mode,
                                  "--json", *_common_options(self.case))
                if result.code not in (0, 3):
                    continue
                report = json.loads(result.stdout)
                verdict = next(v for v in report["layers"] if v["node"] == node)
                if verdict["data_accumulations"] is None:  # "not simulated", with its reason
                    continue
                lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if verdict["signed"] else (0, (1 << bits) - 1)
                outside = int(np.count_nonzero((acc < lo) | (acc > hi)))
                counted, registers = verdict["data_overflows"], verdict["data_register_overflows"]
                deviation = report["data"]["max_abs_output_deviation"]
                wrong = []
                if verdict["data_accumulations"] != acc.size:
                    wrong.append(f"{verdict['data_accumulations']} accumulations, executed {acc.size}")
                if (counted != outside) if mode == "wrap" else (counted < outside):
                    wrong.append(f"{counted} overflows, {outside} executed accumulations outside {bits} bits")
                if registers < counted:
                    wrong.append(f"{registers} register overflows below {counted} results that differ")
                if counted == 0 and deviation != 0:
                    wrong.append(f"outputs differ by {deviation} with no overflow")
                self.outcome.checked[f"data simulations ({mode})"] += 1
                self.outcome.checked["data simulations with overflows"] += counted > 0
                if wrong:
                    self.outcome.fail("wrong_simulation", f"{what}: " + "; ".join(wrong))


def _with_activation_grid(model: ModelWrapper, info):
    """``info`` with the activation scale and zero point ``model`` holds for its MAC input (as generated where the
    real-file reader cannot describe that input)."""
    from tests.fuzz.real_files import Undescribed, activation_grid

    if info.act_scale is None or info.act_x_act:
        return info
    try:
        scale, zero = activation_grid(model, _node(model, info.node).input[0])
    except Undescribed:
        return info
    return replace(info, act_scale=scale, act_zero_point=zero)


def _random_inputs(model: ModelWrapper, samples: int) -> np.ndarray:
    """``samples`` inputs for the model's one graph input, spread well past its quantizers' ranges."""
    shape = model.get_tensor_shape(model.graph.input[0].name)
    rng = np.random.default_rng(0)
    return (rng.standard_normal([samples, *shape[1:]]) * 4).astype(np.float32)


def _records(path: Path) -> dict[str, dict]:
    model = ModelWrapper(str(path))
    entry = next((p for p in model.model.metadata_props if p.key == "a2q.accumulators"), None)
    return json.loads(entry.value)["layers"] if entry is not None else {}


def check_case(case: Case, workdir: Path, verify_delta: int = 0, project_delta: int = 1, lower: bool = False,
               finetune: str | None = None, layer_deltas: tuple[int, ...] = (), allocate: bool = False,
               tile: int | None = None, data: bool = False) -> Outcome:
    """Run every property on ``case``; the deltas choose P relative to the executed width; ``lower``: also (f), on
    QONNX and Q/DQ cases with no --input-dtype and the fold convention (what ``lower`` takes, converting Q/DQ
    chains with qonnx's QCDQToQuant where it can); ``finetune`` (a variant): also
    (g), on the same cases (finetune reads QONNX under the fold convention), at project's P; ``layer_deltas``: also
    (h), layer i (by name) at its executed width minus ``layer_deltas[i % len]``; ``allocate``: (h) on ``allocate``'s
    map too (QONNX and Q/DQ cases with no --input-dtype and the fold convention); ``tile``: also (i); ``data``: also
    (j)."""
    outcome = Outcome()
    path = workdir / "model.onnx"
    case.model.save(str(path))
    executed = executed_ranges(case.model, case)
    checker = Checker(case, workdir, outcome)
    checker.analyze(path, executed)
    checker.annotate(path, executed)
    needed = max((width(r.lo, r.hi) for r in executed.values()), default=8)
    checker.verify(path, executed, min(max(needed + verify_delta, 1), 64))
    bits = min(max(needed - project_delta, 2), 64)
    checker.project(path, bits)
    projected = workdir / f"projected_{bits}.onnx"
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in case.model.graph.node)
    qonnx = any(n.op_type == "Quant" for n in case.model.graph.node) and not qdq
    # Q/DQ cases too: lower takes those it converts whole to Quant nodes (refusing the others)
    lowerable = lower and (qonnx or qdq) and not case.input_dtypes and case.zero_point == "fold"
    if lowerable and projected.exists():
        checker.lower(projected)
    trainable = qonnx and not case.input_dtypes and case.zero_point == "fold"
    if finetune and trainable:
        finetuned = checker.finetune(path, bits, finetune)
        if lower and finetuned is not None:  # (f) on finetune's output too: its recorded widths go to FINN
            checker.lower(finetuned)
    if layer_deltas and executed:
        names = sorted(executed)
        widths = {node: min(max(width(executed[node].lo, executed[node].hi) - layer_deltas[i % len(layer_deltas)], 1),
                            64) for i, node in enumerate(names)}
        mixed = checker.per_layer_widths(path, executed, widths)
        if lowerable and mixed is not None:  # (f) on mixed widths: each MVAU gets its own layer's record
            checker.lower(mixed)
        if finetune and trainable and mixed is not None:  # (g) at the same widths, given as --layer NAME=P
            checker.finetune(path, widths, finetune)
    if allocate and (qonnx or qdq) and not case.input_dtypes and case.zero_point == "fold":
        checker.allocate(path, "bits" if qonnx else "acc-bits")  # Q/DQ: FINN lowers few, acc-bits needs no FINN
    if tile is not None:
        checker.tiled(path, tile)
    if data:
        checker.simulated(path)
    return outcome
