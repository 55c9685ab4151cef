"""``ProjectToAccumulator``: rewrite weights so every constrained layer fits its target accumulator width.

Only weight initializers change: scales, bit widths, rounding modes and the graph stay as
they are, and each layer's own quantizer reproduces the new integers exactly. The pass
proves its promise on its own output (``ensures``): it re-analyses the written model and
fails if any constrained layer's exact range does not fit its width.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds, progress
from a2q_passes.analysis import analyze_model, channel_ranges, stage_ranges
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import A2QError, PostconditionError, PreconditionError
from a2q_passes.input_annotations import annotate_input_dtypes
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, MacLayer, find_mac_layers
from a2q_passes.weight_sources import UnsupportedLayer
from a2q_passes.metadata import record_accumulators, recorded_accumulators
from a2q_passes.model_io import declare_custom_domains
from a2q_passes.read_only_model import ReadOnlyModel
from a2q_passes.tensor_store import check_in_memory
from a2q_passes.methods import get_method, project_weights
from a2q_passes.passes import A2QPass, PassResult
from a2q_passes.projection import (MIN_ACC_BITS, ProjectionResult, accumulator_is_signed, min_feasible_acc_bits,
                                   plain_round, project_in_parts, project_multistage)
from a2q_passes.projection_stats import projection_stats
from a2q_passes.row_blocks import projection_threads, rows_per_block
from a2q_passes.width_resolution import EVERY_LAYER, check_skips, check_width


# an activation x activation MatMul that fits its target: reported and promised, never rewritten
STATUS_CHECKED = "checked: activation x activation, nothing to project"


@dataclass
class LayerProjection:
    """What the projection did to one layer (JSON-ready via ``asdict``)."""

    node: str
    op_type: str
    status: str  # "projected", "unchanged" (already fits), STATUS_CHECKED or "skipped: <reason>"; target_bits None: --skip
    target_bits: int | None = None
    width_before: int | None = None
    width_after: int | None = None
    acc_dtype_after: str | None = None
    rel_l2_change: float = 0.0
    sparsity_before: float | None = None
    sparsity_after: float | None = None
    channels: int = 0
    channels_touched: int = 0
    rows_by_method: dict[str, int] = field(default_factory=dict)
    # --tile T: target_bits and width_after are the inner (within-tile) stage; outer_bits the sum of tiles
    # (the target given with --outer-bits, else the exact width of the projected tiles' sum)
    tile: int | None = None
    outer_bits: int | None = None
    outer_width_after: int | None = None


def resolve_targets(layers: list[MacLayer], acc_bits: int | None, overrides: dict[str, int],
                    skip: frozenset[str] = frozenset()) -> dict[str, int]:
    """Target width per layer name: the overrides, else the global width for every analysable layer not in ``skip``.

    A global width promises every quantized MAC layer: a layer with quantized weights that cannot
    be read (non-integer weight zero point, non-constant scale, Gemm transA, unquantized input, ...) would stay
    unconstrained, so it is refused unless ``skip`` names it. Raises :class:`A2QError` for that,
    for an override or skip naming a layer that does not exist (or an override one that cannot be
    constrained, or is skipped too), and for widths outside 2..64 bits.
    """
    by_name = {layer.node: layer for layer in layers}
    known = ", ".join(sorted(by_name)) or "none"
    if acc_bits is not None:
        check_width(acc_bits, MIN_ACC_BITS, EVERY_LAYER)
    for name, bits in overrides.items():
        check_width(bits, MIN_ACC_BITS, name)
    check_skips(layers, skip, overrides)
    if acc_bits is not None:
        unreadable = [layer for layer in layers
                      if not layer.ok and layer.status != STATUS_WEIGHTS_NOT_QUANTIZED and layer.node not in skip]
        if unreadable:
            problems = "; ".join(f"'{layer.node}' ({layer.status})" for layer in unreadable)
            raise A2QError(f"cannot constrain every quantized MAC layer to {acc_bits} bits, these cannot be read: "
                           f"{problems}. Fix them, or leave them unconstrained explicitly with "
                           + " ".join(f"--skip {layer.node}" for layer in unreadable))
    for name, bits in overrides.items():
        if name not in by_name:
            raise A2QError(f"--layer {name}={bits}: no MAC layer named '{name}' (layers: {known})")
        if not by_name[name].ok:
            raise A2QError(f"--layer {name}={bits}: layer '{name}' cannot be constrained ({by_name[name].status})")
    targets = {layer.node: acc_bits for layer in layers if layer.ok and acc_bits is not None and layer.node not in skip}
    targets.update(overrides)
    return targets


class ProjectToAccumulator(A2QPass):
    """Project every targeted layer's weights onto its accumulator constraint with a registered method.

    ``skip``: MAC layer names left unconstrained on purpose (reported as skipped); with a global
    ``acc_bits`` every quantized layer that cannot be read must be among them.

    ``tile``: a multi-stage datapath (:func:`projection.project_multistage`): each K-tile of ``tile`` terms
    (the tiling ``verify --tile`` checks) fits the layer's width and the sum of tiles ``outer_bits`` (default:
    whatever the projected tiles need, reported and recorded).

    ``threads``: threads projecting a large layer's row blocks at once (default: one per core, at most 8); rows are
    projected independently, so the output does not depend on it.
    """

    def __init__(self, acc_bits: int | None = None, layer_bits: dict[str, int] | None = None,
                 method: str = "exact", input_dtypes: dict[str, str] | None = None, zero_point: str = "fold",
                 skip: list[str] | None = None, input_ranges: str = "exact", tile: int | None = None,
                 outer_bits: int | None = None, threads: int | None = None) -> None:
        super().__init__()
        if threads is not None and threads < 1:
            raise A2QError(f"--threads must be at least 1, got {threads}")
        self.threads = threads
        if tile is not None and tile < 1:
            raise A2QError(f"--tile must be at least 1 term, got {tile}")
        if outer_bits is not None and (tile is None or not 2 <= outer_bits <= 64):
            raise A2QError(f"--outer-bits {outer_bits} needs --tile T and a width from 2 to 64 bits")
        self.tile, self.outer_bits = tile, outer_bits
        self.input_ranges = input_ranges
        self.acc_bits = acc_bits
        self.layer_bits = dict(layer_bits or {})
        self.skip = frozenset(skip or ())
        try:
            self.method = get_method(method)
        except ValueError as err:
            raise A2QError(str(err)) from err
        self.input_dtypes = input_dtypes
        self.zero_point = zero_point
        self.projections: list[LayerProjection] = []

    def requires(self, model: ModelWrapper) -> None:
        if self.acc_bits is None and not self.layer_bits:
            raise PreconditionError("no accumulator width given: use --acc-bits P and/or --layer NAME=P")
        # nothing changes the graph before call(): its lookups come from tables built once (a scan per lookup is
        # quadratic in the graph's size)
        layers = find_mac_layers(ReadOnlyModel(model.model), self.input_dtypes, self.zero_point, self.input_ranges)
        self._targets = resolve_targets(layers, self.acc_bits, self.layer_bits, self.skip)
        self._layers = [layer for layer in layers if layer.node in self._targets]
        self._skipped = [layer for layer in layers if layer.node in self.skip]
        if not self._layers:
            reasons = "; ".join(f"{layer.node}: {layer.status}" for layer in layers) or "the graph has no MAC layer"
            raise PreconditionError(f"nothing to project: no layer has quantized weights and a quantized input ({reasons})")

    def call(self, model: ModelWrapper) -> PassResult:
        self._check_feasible(model)
        annotated = annotate_input_dtypes(model, self.input_dtypes)
        with projection_threads(self.threads) if self.threads is not None else nullcontext():
            self.projections = [self._project(model, layer, self._targets[layer.node])
                                for layer in progress.over_layers(self._layers, "project")]
        self.projections += [LayerProjection(layer.node, layer.op_type, f"skipped: --skip ({layer.status})",
                                             channels=layer.channels) for layer in self._skipped]
        recorded = recorded_accumulators(model)
        for p in self.projections:
            if p.status in ("projected", "unchanged", STATUS_CHECKED):
                recorded[p.node] = {"acc_bits": p.target_bits, "acc_dtype": p.acc_dtype_after, "method": self.method.name,
                                    "input_ranges": self.input_ranges}
                if p.tile is not None:
                    recorded[p.node].update(tile=p.tile, outer_bits=p.outer_bits)
        record_accumulators(model, recorded, source="project")
        # FINN's own graph builders (qonnx_make_model) declare no opset for its custom domains: the output does
        declared = declare_custom_domains(model.model)
        modified = annotated or declared or any(p.status == "projected" for p in self.projections)
        return PassResult(model, modified, {"layers": [asdict(p) for p in self.projections]})

    def _check_feasible(self, model: ModelWrapper) -> None:
        """Refuse before writing anything when any layer's target is below what it can reach, naming them all.

        With a global ``--acc-bits`` the message also gives the smallest target every layer reaches
        (the largest of the per-layer minimums), so a rerun with it succeeds.
        """
        weighted = [layer for layer in self._layers if not layer.act_x_act]
        if self.tile is not None:
            fixed = [layer for layer in self._layers if layer.act_x_act or layer.binary_xnor or layer.source.bipolar
                     or layer.op_type == "ConvTranspose"]
            if fixed:
                raise A2QError(
                    "--tile: " + ", ".join(f"'{layer.node}'" for layer in fixed) + " cannot be projected for a "
                    "multi-stage datapath (activation x activation, bipolar or ConvTranspose); " +
                    " ".join(f"--skip {layer.node}" for layer in fixed))
        unsound = [layer for layer in weighted if layer.source.raw_zero_point]
        if unsound:
            raise A2QError(
                "cannot project " + ", ".join(f"'{layer.node}'" for layer in unsound) + ": their weights have a non-zero "
                "zero point and --zero-point fold multiplies the raw codes, whose 0 is not a zero weight (shrinking them "
                "would change every weight); use --zero-point subtract (the ONNX semantics: the MAC multiplies code - "
                "zero point), or --skip those layers")
        smallest = {}
        for layer in self._layers:
            try:  # reads each layer's weight groups, refusing zero points project cannot honour
                smallest[layer.node] = smallest_target(model, layer)
            except UnsupportedLayer as err:
                raise A2QError(f"cannot project layer '{layer.node}': {err}; or --skip it") from err
        # below the smallest target only a layer that already fits (its weights all 0) stays feasible: it is kept
        short = [layer for layer in self._layers
                 if smallest[layer.node] > min(self._targets[layer.node], self.outer_bits or self._targets[layer.node])
                 and (self.tile is not None or layer.act_x_act
                      or _layer_width(layer, layer.integer_rows(model))[0] > self._targets[layer.node])]
        if not short:
            return
        problems = "; ".join(f"'{layer.node}' needs at least {smallest[layer.node]} bits ({layer_why(layer)}), "
                             f"asked {self._targets[layer.node]}" for layer in short)
        overall = max((bits for node, bits in smallest.items() if node not in self.layer_bits), default=None)
        global_hint = ("" if self.acc_bits is None or overall is None else
                       f"; with one --acc-bits for every layer the smallest feasible target is {overall} bits")
        widths = " ".join(f"--layer {layer.node}={smallest[layer.node]}" for layer in short if not layer.act_x_act)
        skips = " ".join(f"--skip {layer.node}" for layer in short if layer.act_x_act)
        fixes = ([f"give those layers their own width with {widths}"] if widths else []) + (
            [f"leave the activation x activation ones unchecked with {skips}"] if skips else [])
        raise A2QError(f"accumulator target infeasible for {len(short)} layer(s): {problems}{global_hint}. "
                       "Raise the target, or " + "; or ".join(fixes))

    def _project(self, model: ModelWrapper, layer: MacLayer, bits: int) -> LayerProjection:
        report = LayerProjection(layer.node, layer.op_type, "unchanged", bits, channels=layer.channels)
        if layer.act_x_act:  # nothing to rewrite: _check_feasible made sure its fixed range fits
            report.status = STATUS_CHECKED
            report.width_before, report.acc_dtype_after = _layer_width(layer, None)
            report.width_after = report.width_before
            return report
        q_before = layer.code_rows(model)  # the integer rows' values, without an int64 copy where stored narrower
        if layer.binary_xnor or layer.source.bipolar:
            # a bipolar tensor holds only -1 and +1 and cannot be shrunk; _check_feasible made sure it already
            # fits, so it is promised (and recorded) as it stands
            report.width_before, report.acc_dtype_after = _layer_width(layer, q_before)
            report.width_after = report.width_before
            return report
        # the built-in methods and the statistics take integer rows as stored (an int8 layer: 1 byte a weight) and
        # convert a block of rows at a time; the multi-stage projection still works on whole float64 rows
        v = layer.unrounded_rows(model, keep_integers=self.tile is None)
        if v.dtype.kind in "iu":
            # the same integers as q_before, copied into C-ordered rows: the width, the comparison and the
            # statistics below then read rows, not the columns of a transposed tensor
            q_before = v
        report.width_before, _ = _layer_width(layer, q_before)
        try:
            if self.tile is not None:
                result = project_multistage(v, layer.grid.range, layer.row_weight_ranges(model), self.tile, bits,
                                            self.outer_bits, partial(project_weights, method=self.method.name))
            else:
                result = _project_rows(v, layer, model, bits, self.method.name)
        except A2QError as err:
            raise A2QError(f"layer '{layer.node}': {err}") from err
        q_after = result.weights  # in its narrow type (projection.weight_dtype): every consumer below sums in int64
        range_after = _layer_range(layer, q_after)  # one pass over the rows for both the check and the report
        if self.tile is not None:
            inner, outer = stage_ranges(q_after, layer.grid.range, self.tile)
            report.tile, report.outer_width_after = self.tile, int(bounds.accumulator_width(*outer))
            report.outer_bits = self.outer_bits if self.outer_bits is not None else report.outer_width_after
        elif not bounds.fits(*range_after, bits):
            # channels with different weight zero points are projected apart (see _project_rows); a method that
            # breaks the layer's INT/UINT choice across them is refused rather than written
            raise A2QError(f"layer '{layer.node}': its channels' weight zero points differ and the channels projected "
                           f"apart do not fit {bits} bits together; raise the target or --skip the layer")
        # same shapes: project_weights checked them; a block of rows at a time, so that no whole-layer mask of
        # changed weights joins the rows and the result at the peak of memory
        step = rows_per_block(q_after.shape[1])
        changed_rows = np.concatenate([np.any(q_after[start:start + step] != q_before[start:start + step], axis=1)
                                       for start in range(0, q_after.shape[0], step)] or [np.zeros(0, dtype=bool)])
        report.width_after, report.acc_dtype_after = _width_and_dtype(*range_after)
        if self.tile is not None:  # the inner stage is what target_bits promises
            report.width_before = int(bounds.accumulator_width(*stage_ranges(q_before, layer.grid.range, self.tile)[0]))
            report.width_after = int(bounds.accumulator_width(*inner))
            report.acc_dtype_after = bounds.accumulator_datatype_name(*inner)
        stats = projection_stats(q_before, q_after, v)
        del v  # the last use of the float64 rows: the write below then holds one layer's weights fewer
        report.rel_l2_change = stats["rel_l2_change"]
        report.sparsity_before, report.sparsity_after = stats["sparsity_before"], stats["sparsity_after"]
        report.channels_touched = int(np.count_nonzero(layer.layout.rows_to_channels(changed_rows, np.any)))
        methods, counts = np.unique(np.asarray(result.row_method, dtype=str), return_counts=True)
        report.rows_by_method = {str(m): int(c) for m, c in zip(methods, counts)}
        if changed_rows.any():
            # written last: the new weights in their narrow type are all the write needs (it transposes and checks them)
            layer.write_rows(model, q_after)  # checks the graph's quantizer reproduces the new integers exactly
            report.status = "projected"
        return report

    def ensures(self, result: PassResult) -> None:
        model = result.model
        try:
            check_in_memory(model)
        except onnx.checker.ValidationError as err:
            raise PostconditionError(f"projected model fails onnx.checker: {err}") from err
        widths = {r.node: r for r in analyze_model(model, self.input_dtypes, self.zero_point,
                                                   input_ranges=self.input_ranges, tile=self.tile).layers}
        claims = {}
        for p in self.projections:
            if p.target_bits is None:  # left unconstrained by --skip
                continue
            r = widths.get(p.node)
            if p.tile is None:
                fits = r is not None and r.status == "ok" and bounds.fits(r.acc_min, r.acc_max, p.target_bits)
                claims[p.node] = Claim(r.acc_min, r.acc_max, p.target_bits) if fits else None
            else:  # both stages: the within-tile sums at the target, the running sums of tiles at the outer width
                fits = (r is not None and r.status == "ok" and r.tile_range is not None
                        and bounds.fits(*r.tile_range, p.target_bits) and bounds.fits(*r.outer_range, p.outer_bits))
                claims[p.node] = Claim(r.acc_min, r.acc_max, p.outer_bits, p.tile, *r.tile_range,
                                       p.target_bits) if fits else None
            if claims[p.node] is None:
                raise PostconditionError(
                    f"layer '{p.node}' does not fit {p.target_bits} bits after projection "
                    f"(range {None if r is None else (r.acc_min, r.acc_max)}"
                    f"{'' if p.tile is None or r is None else f', tiles {r.tile_range}, outer {r.outer_range}'}); "
                    "nothing was written")
        # the promise must also hold for the ranges derived without the reader the projection used
        certify_claims(model, claims, what="project", input_dtypes=self.input_dtypes, zero_point=self.zero_point,
                       input_ranges=self.input_ranges)


def _project_rows(v: np.ndarray, layer: MacLayer, model: ModelWrapper, bits: int, method: str) -> ProjectionResult:
    """Project the rows of each weight range apart (one range unless per-channel weight zero points are subtracted)."""
    groups = layer.row_weight_ranges(model)
    if len(groups) == 1:
        return project_weights(v, layer.grid.range, bits, groups[0][1], method)
    return project_in_parts(v, layer.grid.range, bits, [(rows, slice(None), weight_range) for rows, weight_range in groups],
                            partial(project_weights, method=method))


def smallest_target(model: ModelWrapper, layer: MacLayer) -> int:
    """Smallest accumulator width projection can bring ``layer`` to: a single +-1 weight per row must fit.

    Bipolar weights cannot be shrunk at all, and an activation x activation MatMul has no weights, so
    their smallest target is their present exact width.
    """
    if layer.act_x_act or layer.binary_xnor or layer.source.bipolar:
        return _layer_width(layer, None if layer.act_x_act else layer.integer_rows(model))[0]
    v = layer.unrounded_row_view(model)  # usually the first block of rows decides: no copy of the rest
    groups = layer.row_weight_ranges(model)
    # signed when any plain-rounded row reaches below 0: rows are independent, so a block of rows at a time (stored
    # integer codes are rounded as they are, to themselves: no float64 copy of the block)
    step = rows_per_block(v.shape[1])
    signed = any(accumulator_is_signed(plain_round(v[rows[start:start + step]], weight_range), layer.grid.range)
                 for rows, weight_range in groups for start in range(0, rows.size, step))
    return max(min_feasible_acc_bits(layer.grid.range, weight_range, signed) for _, weight_range in groups)


def layer_why(layer: MacLayer) -> str:
    """Why a layer has a floor on its target, in a few words."""
    if layer.act_x_act:
        return "an activation x activation MatMul: its products of two activations cannot be projected"
    if layer.binary_xnor or layer.source.bipolar:
        return "bipolar weights cannot be shrunk"
    x = layer.grid.range
    return f"inputs in [{x.lo}, {x.hi}]: below it not even one +-1 weight per row fits"


def _layer_width(layer: MacLayer, rows: np.ndarray | None) -> tuple[int, str]:
    """Exact accumulator width and datatype name of a layer with integer ``rows`` (``None``: act x act)."""
    return _width_and_dtype(*(layer.act_x_act_range() if layer.act_x_act else _layer_range(layer, rows)))


def _layer_range(layer: MacLayer, rows: np.ndarray) -> tuple[int, int]:
    """Exact ``(acc_min, acc_max)`` over all channels of a layer with integer ``rows``."""
    acc_min, acc_max = channel_ranges(layer, rows)
    return int(acc_min.min()), int(acc_max.max())


def _width_and_dtype(lo: int, hi: int) -> tuple[int, str]:
    return int(bounds.accumulator_width(lo, hi)), bounds.accumulator_datatype_name(lo, hi)


def projection_summary(projections: list[LayerProjection]) -> dict[str, Any]:
    """Whole-model figures for reports: layers projected, worst width before/after."""
    done = [p for p in projections if p.width_after is not None]
    return {
        "layers_projected": sum(p.status == "projected" for p in projections),
        "max_width_before": max((p.width_before for p in done), default=None),
        "max_width_after": max((p.width_after for p in done), default=None),
    }
