"""Overflow verification of a model's MAC layers at given accumulator widths (graph side).

Three independent checks per layer, all on the layer's integer view (bias excluded: FINN and
Brevitas add it after the accumulator):

1. **Static proof** from the exact input box (:mod:`a2q_passes.bounds`): every accumulator
   register the datapath holds must fit P bits over all inputs. Wrap-around without tiles holds
   one register whose intermediate wrap-around cancels, so only the final sum counts;
   ``mode="saturate"`` also holds every prefix of the sum; ``tile=T`` holds the partial sums
   inside each tile of T terms and the running sum of tile results (with ``outer_bits``, the tile
   registers are checked at P and the running sums and final sum at ``outer_bits``; ``project --tile``
   records both, and a recorded layer is checked that way by default). The accumulator is unsigned
   when no register can go negative (FINN's convention, see ``bounds.accumulator_width``).
2. **Adversarial simulation**: each row's worst-case inputs (``bounds.adversarial_inputs``) reach
   the extremes of *every* register at once, so the P-bit simulation (:mod:`a2q_passes.simulate`)
   must show a register overflow exactly when the proof fails.
3. **Data simulation** (:mod:`a2q_passes.data_simulation`, optional): real inputs run through the
   graph with P-bit accumulators in the checked layers.

Which layers are checked (:mod:`a2q_passes.width_resolution`): ``widths`` is a global P (every quantized
layer), a ``{node: P}`` map (only those layers: the others are listed as unchecked and do not fail the
verdict), or ``None`` (the widths ``annotate``/``project``/``finetune`` recorded in the model). A record covers the
whole model, so a quantized layer it gives no width (``project --layer`` on some layers only) is
checked at the width its hardware holds without a target (:func:`untargeted_width`: its own exact
width, or the ``accDataType`` its node declares), marked ``no target`` in ``width_note``; one whose
integer view cannot be read fails the verdict, since nothing can be proven there. ``overrides``
refine any of them per node. Naming a node that is not a quantized MAC layer is an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds, progress
from a2q_passes.analysis import INNER_REGISTER, integer_view, register_ranges
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.data_simulation import SimulationResult, check_datapath, simulate_model
from a2q_passes.errors import A2QError
from a2q_passes.graph_values import node_str_attr
from a2q_passes.layers import KIND_WEIGHTS, STATUS_WEIGHTS_NOT_QUANTIZED, MacLayer, find_mac_layers
from a2q_passes.metadata import recorded_tiles
from a2q_passes.read_only_model import ReadOnlyModel
from a2q_passes.simulate import MAX_SIMULATED_BITS, accumulate_terms
from a2q_passes.width_resolution import WIDTHS_RECORDED, WIDTHS_SELECTED, check_skips, resolve_widths

PROOF_PASS, PROOF_FAIL = "pass", "fail"
PROOF_UNCHECKED = "unchecked"  # no width given for this layer
PROOF_UNKNOWN = "unknown"  # a width was given, but the layer's integer view could not be read
PROOF_NOT_QUANTIZED = "not quantized"  # float weights: no integer accumulator to verify
PROOF_SKIPPED = "skipped"  # left out by the user (--skip): not checked, and not covered by the verdict
NO_TARGET_OWN_WIDTH = "no target: own exact width"
NO_TARGET_DECLARED = "no target: width its node declares (accDataType)"
_GRID_TOLERANCE = 1e-2  # |x / scale - code|: float32 Quant outputs sit within ~1e-5 of their codes
DEFAULT_BATCH = 512
_ADVERSARIAL_BLOCK_TERMS = 1 << 21  # int64 terms per block of rows: 16 MB per temporary
# layers from this many weights up are simulated by the compiled kernel: below it, importing numba (and compiling
# once, cached on disk) takes longer than numpy's simulation (about 80 ns per weight)
_ADVERSARIAL_KERNEL_TERMS = 1 << 22
_INT64_SAFE = 1 << 62  # the kernel's int64 registers hold every partial sum below this

# --------------------------------------------------------------------------- widths

def untargeted_width(model: ModelWrapper, layer: MacLayer, mode: str, tile: int | None) -> tuple[int, str]:
    """Width to check a readable layer at when the record gives it none, and the note saying so.

    A node that declares its accumulator (FINN's ``accDataType``) has that width in hardware, so it
    is checked there and may fail; any other layer gets its own exact width over every register the
    datapath holds (what FINN's MinimizeAccumulatorWidth picks), a promise that holds by construction
    but is still proven, certified and simulated like a recorded one.
    """
    node = next(n for n in model.graph.node if (n.name or n.output[0]) == layer.node)
    declared = node_str_attr(node, "accDataType", "")
    if declared:
        try:
            return DataType[declared].bitwidth(), NO_TARGET_DECLARED
        except KeyError as err:
            raise A2QError(f"layer '{layer.node}' declares accDataType '{declared}', which is no QONNX datatype; "
                           "fix the attribute or record a width for the layer") from err
    registers = register_ranges(layer, *integer_view(model, layer), mode, tile)
    lo, hi = min(r[0] for r in registers.values()), max(r[1] for r in registers.values())
    return int(bounds.accumulator_width(lo, hi)), NO_TARGET_OWN_WIDTH


# --------------------------------------------------------------------------- static proof

@dataclass
class LayerVerdict:
    """Proof and simulation results of one MAC layer; JSON-ready through :meth:`to_json`."""

    node: str
    op_type: str
    K: int
    channels: int
    status: str
    proof: str
    kind: str = KIND_WEIGHTS
    acc_bits: int | None = None
    required_bits: int | None = None
    margin: int | None = None
    signed: bool | None = None
    acc_min: int | None = None  # over every register checked
    acc_max: int | None = None
    registers: dict[str, list[int]] = field(default_factory=dict)
    tile: int | None = None
    # tiled datapath with its own outer width: acc_bits/required_bits/margin then describe the inner stage
    outer_bits: int | None = None
    outer_required_bits: int | None = None
    outer_margin: int | None = None
    reason: str = ""
    width_note: str = ""  # NO_TARGET_*: the width was not given or recorded but derived (untargeted_width)
    adversarial_cases: int | None = None
    adversarial_overflows: int | None = None  # results differing from the exact sum
    adversarial_register_overflows: int | None = None
    data_accumulations: int | None = None
    data_overflows: int | None = None
    data_register_overflows: int | None = None
    data_note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _stages(registers: dict[str, tuple[int, int]], bits: int,
            outer_bits: int | None) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """``(width, registers)`` per stage: one width for every register, or the inner (within-tile) registers at
    ``bits`` and the outer ones (running sums of tile results, final sum) at ``outer_bits``."""
    if outer_bits is None:
        return [(bits, registers)]
    inner = {name: r for name, r in registers.items() if name == INNER_REGISTER}
    outer = {name: r for name, r in registers.items() if name != INNER_REGISTER}
    return [(b, regs) for b, regs in ((bits, inner), (outer_bits, outer)) if regs]


def _prove(verdict: LayerVerdict, layer: MacLayer, rows: np.ndarray, x: bounds.IntRange, bits: int, mode: str,
           tile: int | None, outer_bits: int | None = None) -> None:
    registers = register_ranges(layer, rows, x, mode, tile)
    verdict.registers = {name: [a, b] for name, (a, b) in registers.items()}
    verdict.acc_min = min(r[0] for r in registers.values())
    verdict.acc_max = max(r[1] for r in registers.values())
    verdict.tile, verdict.outer_bits = tile, outer_bits
    outside, fitting = [], []
    for stage, (stage_bits, regs) in enumerate(_stages(registers, bits, outer_bits)):
        lo, hi = min(r[0] for r in regs.values()), max(r[1] for r in regs.values())
        required = int(bounds.accumulator_width(lo, hi))
        if stage == 0:
            verdict.signed, verdict.required_bits, verdict.margin = lo < 0, required, bits - required
        else:
            verdict.outer_required_bits, verdict.outer_margin = required, stage_bits - required
        dtype = f"{'INT' if lo < 0 else 'UINT'}{stage_bits}"
        a_lo, a_hi = bounds.accumulator_limits(stage_bits, lo < 0)
        wide = [f"{name} reaches [{a}, {b}]" for name, (a, b) in regs.items() if a < a_lo or b > a_hi]
        named = " and ".join(regs) + (" fits" if len(regs) == 1 else " fit")
        (outside if wide else fitting).append(f"{'; '.join(wide)}: outside {dtype} [{a_lo}, {a_hi}]" if wide else
                                              f"{named if outer_bits is not None else 'every register fits'} {dtype}")
        if wide and mode == "wrap" and "final sum" in regs and regs["final sum"][0] >= a_lo and regs["final sum"][1] <= a_hi:
            outside[-1] += " (results stay exact under wrap-around; the tile registers overflow on the way)"
    verdict.proof = PROOF_FAIL if outside else PROOF_PASS
    verdict.reason = "; ".join(outside or fitting)


def _simulate_adversarial(verdict: LayerVerdict, layer: MacLayer, rows: np.ndarray, x: bounds.IntRange, bits: int,
                          mode: str, tile: int | None, outer_bits: int | None = None) -> None:
    """Accumulate each row's two worst-case input vectors in the P-bit accumulator (tiled: the two stages).

    A layer of at least ``_ADVERSARIAL_KERNEL_TERMS`` terms is simulated by the compiled kernel of
    :mod:`a2q_passes.adversarial_kernels` (one pass over the stored weights, the same accumulator semantics);
    smaller ones in numpy, in blocks of about ``_ADVERSARIAL_BLOCK_TERMS`` terms: each row's accumulation is
    independent of the others, and the int64 inputs, weights and terms of a whole large layer at once come to
    some 20 bytes per weight (3.5 GB of temporaries for an 11008 x 4096 MLP layer)."""
    if max(bits, outer_bits or 0) > MAX_SIMULATED_BITS:
        return
    outer = None
    if outer_bits is not None:
        outer_lo = min(r[0] for name, r in verdict.registers.items() if name != INNER_REGISTER)
        outer = (outer_bits, outer_lo < 0)
    verdict.adversarial_cases = 2 * int(rows.shape[0])
    if rows.size >= _ADVERSARIAL_KERNEL_TERMS and _partial_sums_bound(rows, x, layer.binary_xnor) < _INT64_SAFE:
        from a2q_passes.adversarial_kernels import count_adversarial_overflows

        verdict.adversarial_overflows, verdict.adversarial_register_overflows = count_adversarial_overflows(
            rows, x.lo, x.hi, layer.binary_xnor, bits, verdict.signed, mode, tile, outer)
        return
    overflows = register_overflows = 0
    block = max(1, _ADVERSARIAL_BLOCK_TERMS // max(1, rows.shape[-1]))
    for start in range(0, rows.shape[0], block):
        block_rows = rows[start:start + block]
        x_for_min, x_for_max = bounds.adversarial_inputs(block_rows, x)
        inputs = np.concatenate([x_for_min, x_for_max])
        weights = np.concatenate([block_rows, block_rows])
        # binary xnor layers count matches (popcount) instead of multiplying
        terms = (inputs == weights).astype(np.int64) if layer.binary_xnor else inputs * weights
        result = accumulate_terms(terms, bits, verdict.signed, mode, tile, outer)
        overflows += result.overflow_count
        register_overflows += result.register_overflow_count
    verdict.adversarial_overflows = overflows
    verdict.adversarial_register_overflows = register_overflows


def _partial_sums_bound(rows: np.ndarray, x: bounds.IntRange, binary_xnor: bool) -> int:
    """A bound on every partial sum of a row's worst-case terms: K times the largest term (the stored type's
    largest magnitude for integers of up to 32 bits, which saves a pass over the weights)."""
    if binary_xnor:
        return rows.shape[1]
    if rows.dtype.kind in "iu" and rows.dtype.itemsize <= 4:
        info = np.iinfo(rows.dtype)
        largest = max(-int(info.min), int(info.max))
    else:
        largest = max(-int(rows.min(initial=0)), int(rows.max(initial=0)))
    return rows.shape[1] * largest * x.magnitude


def check_layer(model: ModelWrapper, layer: MacLayer, bits: int | None, mode: str = "wrap",
                tile: int | None = None, outer_bits: int | None = None) -> LayerVerdict:
    """Static proof and adversarial simulation of one layer at ``bits`` (``None``: unchecked).

    ``outer_bits`` (with ``tile``): the outer stage's width; ``bits`` is then the inner (within-tile) width.
    """
    check_datapath(mode, tile, outer_bits)
    verdict = LayerVerdict(layer.node, layer.op_type, layer.K, layer.channels, layer.status, PROOF_UNCHECKED,
                           layer.kind, acc_bits=bits)
    if layer.status == STATUS_WEIGHTS_NOT_QUANTIZED:
        verdict.proof = PROOF_NOT_QUANTIZED
        verdict.reason = "float weights: not an integer accumulator"
        return verdict
    if bits is None:
        verdict.reason = "no width given"
        return verdict
    if not layer.ok:
        verdict.proof = PROOF_UNKNOWN
        verdict.reason = f"cannot prove: {layer.status}"
        return verdict
    rows, x = integer_view(model, layer)
    _prove(verdict, layer, rows, x, bits, mode, tile, outer_bits)
    _simulate_adversarial(verdict, layer, rows, x, bits, mode, tile, outer_bits)
    return verdict


# --------------------------------------------------------------------------- the whole check


@dataclass
class VerificationReport:
    layers: list[LayerVerdict]
    mode: str
    tile: int | None
    width_source: str
    zero_point_convention: str
    simulation: SimulationResult | None = None
    input_ranges: str = "exact"

    @property
    def blocking(self) -> list[LayerVerdict]:
        """Layers that keep the verdict from passing (overflow possible, or not proven)."""
        allowed = {PROOF_PASS, PROOF_NOT_QUANTIZED, PROOF_SKIPPED}
        if self.width_source == WIDTHS_SELECTED:
            allowed.add(PROOF_UNCHECKED)  # the user asked about specific layers only
        return [v for v in self.layers if v.proof not in allowed]

    @property
    def overflow_impossible(self) -> bool:
        """The verdict: every checked layer is proven, and at least one layer with a given or recorded width."""
        return not self.blocking and any(v.proof == PROOF_PASS and not v.width_note for v in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "no overflow possible" if self.overflow_impossible else "overflow possible or not proven",
            "overflow_impossible": self.overflow_impossible,
            "mode": self.mode, "tile": self.tile, "width_source": self.width_source,
            "zero_point_convention": self.zero_point_convention,
            "input_ranges": self.input_ranges,
            "layers": [v.to_json() for v in self.layers],
            "data": self.simulation.to_json() if self.simulation is not None else None,
            "notes": "accumulator ranges exclude the bias, which FINN and Brevitas add after the accumulator",
        }


def verify_model(
    model: ModelWrapper,
    widths: int | dict[str, int] | None = None,
    mode: str = "wrap",
    tile: int | None = None,
    data: dict[str, np.ndarray] | np.ndarray | None = None,
    *,
    overrides: dict[str, int] | None = None,
    input_dtypes: dict[str, str] | None = None,
    zero_point: str = "fold",
    input_ranges: str = "exact",
    outer_bits: int | None = None,
    skip: frozenset[str] = frozenset(),
) -> VerificationReport:
    """Prove (or refute) overflow freedom per layer, simulate the worst cases, and optionally real data.

    ``skip``: layers left out by name (``--skip``); each is reported skipped, and the verdict does not cover it.

    ``input_ranges``: the input codes each layer is checked for (:data:`a2q_passes.layers.INPUT_RANGES`).
    ``tile``/``outer_bits``: a multi-stage datapath, every layer's K-tiles of ``tile`` terms at its width and the
    sum of tiles at ``outer_bits`` (default: the same width). Without ``tile``, widths read from the record
    keep the tile and outer width ``project --tile`` recorded.
    """
    check_datapath(mode, tile, outer_bits)
    executed = model  # the data simulation runs the model itself
    # graph lookups in dicts built once (the proof and the certificate only read the model): qonnx's scans of the
    # whole graph per lookup are quadratic in its depth
    model = ReadOnlyModel(model.model)
    layers = find_mac_layers(model, input_dtypes, zero_point, input_ranges)
    check_skips(layers, skip, {**(widths if isinstance(widths, dict) else {}), **(overrides or {})})
    chosen, source = resolve_widths(model, layers, widths, overrides)
    in_order, layers = layers, [layer for layer in layers if layer.node not in skip]
    chosen = {name: bits for name, bits in chosen.items() if name not in skip}
    if tile is not None:
        stages = {layer.node: (tile, outer_bits) for layer in layers}
    else:
        stages = recorded_tiles(model) if source == WIDTHS_RECORDED else {}
    notes = {}
    if source == WIDTHS_RECORDED:  # the record describes the whole model: derive the width it leaves out
        for layer in layers:
            if layer.node not in chosen and layer.ok:
                chosen[layer.node], notes[layer.node] = untargeted_width(model, layer, mode, tile)
    verdicts = [check_layer(model, layer, chosen.get(layer.node), mode, *stages.get(layer.node, (None, None)))
                for layer in progress.over_layers(layers, "verify")]
    for verdict, layer in zip(verdicts, layers):
        verdict.width_note = notes.get(layer.node, "")
        if source == WIDTHS_RECORDED and verdict.proof == PROOF_UNCHECKED:  # quantized, unreadable, not recorded
            verdict.reason = (f"no width recorded, and its own cannot be derived ({layer.status}): nothing is proven "
                              f"for '{layer.node}'; make it readable (e.g. --input-dtype for a float input), or "
                              "verify the other layers only with --layer NAME=P")
    # a passing proof must agree with the range derived without the reader (exit 4 otherwise)
    certify_claims(model, {v.node: _claim(v) for v in verdicts if v.proof == PROOF_PASS},
                   what="verify", input_dtypes=input_dtypes, zero_point=zero_point, input_ranges=input_ranges)
    checked = {verdict.node: verdict for verdict in verdicts}  # graph order, skipped layers where they are
    verdicts = [checked.get(layer.node) or LayerVerdict(layer.node, layer.op_type, layer.K, layer.channels,
                                                        layer.status, PROOF_SKIPPED, layer.kind,
                                                        reason="left out with --skip: not checked")
                for layer in in_order]
    report = VerificationReport(verdicts, mode, tile, source, zero_point, input_ranges=input_ranges)
    if data is not None:
        simulation = simulate_model(executed, data, chosen, mode, tile, input_dtypes, zero_point, stages=stages)
        for verdict in verdicts:
            if verdict.node in simulation.widths:
                verdict.data_accumulations = simulation.accumulations[verdict.node]
                verdict.data_overflows = simulation.overflows[verdict.node]
                verdict.data_register_overflows = simulation.register_overflows[verdict.node]
            elif verdict.node in simulation.skipped:
                verdict.data_note = f"not simulated: {simulation.skipped[verdict.node]}"
        report.simulation = simulation
    return report


def _claim(verdict: LayerVerdict) -> Claim:
    """What a passing verdict promises, for the certificate: the final sum's range at the outer width and, for a
    tiled datapath, the within-tile range at the inner width. ConvTranspose tiles (over its stride-phase rows)
    are proven by the reader only: the certificate ranges ConvTranspose outputs, not their term order."""
    final = verdict.registers["final sum"]
    outer = verdict.acc_bits if verdict.outer_bits is None else verdict.outer_bits
    if INNER_REGISTER in verdict.registers and verdict.kind == KIND_WEIGHTS and verdict.op_type != "ConvTranspose":
        return Claim(*final, outer, verdict.tile, *verdict.registers[INNER_REGISTER], verdict.acc_bits)
    return Claim(*final, outer)
