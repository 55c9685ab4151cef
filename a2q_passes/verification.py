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
3. **Data simulation** (:func:`simulate_model`): real inputs run through the graph node by node;
   at each simulated MAC node the input is turned back into integer codes with the layer's
   :class:`~a2q_passes.layers.InputGrid`, accumulated in P bits, and the error is propagated
   downstream as ``y_sim = y_exact + (acc_sim - acc_exact) * s_w[channel] * s_x``.

Which layers are checked: ``widths`` is a global P (every quantized layer), a ``{node: P}`` map
(only those layers: the others are listed as unchecked and do not fail the verdict), or ``None``
(the widths ``annotate``/``project``/``finetune`` recorded in the model). A record covers the
whole model, so a quantized layer it gives no width (``project --layer`` on some layers only) is
checked at the width its hardware holds without a target (:func:`untargeted_width`: its own exact
width, or the ``accDataType`` its node declares), marked ``no target`` in ``width_note``; one whose
integer view cannot be read fails the verdict, since nothing can be proven there. ``overrides``
refine any of them per node. Naming a node that is not a quantized MAC layer is an error.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as rt
from onnx import NodeProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp, is_custom_op
from qonnx.util.basic import get_preferred_qonnx_opset

from a2q_passes import bounds, model_io
from a2q_passes.analysis import channel_ranges, integer_view, stage_ranges
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import A2QError
from a2q_passes.layers import (KIND_WEIGHTS, STATUS_WEIGHTS_NOT_QUANTIZED, MacLayer, find_mac_layers, node_attr,
                               node_str_attr)
from a2q_passes.batching import batch_free_reshapes
from a2q_passes.metadata import recorded_tiles, recorded_widths
from a2q_passes.model_io import data_inputs, initializer_shape, tensor_value
from a2q_passes.simulate import (
    MAX_SIMULATED_BITS, MODES, Accumulation, accumulate, accumulate_dot, accumulate_terms, exact_float_dtype,
)

PROOF_PASS, PROOF_FAIL = "pass", "fail"
PROOF_UNCHECKED = "unchecked"  # no width given for this layer
PROOF_UNKNOWN = "unknown"  # a width was given, but the layer's integer view could not be read
PROOF_NOT_QUANTIZED = "not quantized"  # float weights: no integer accumulator to verify
NO_TARGET_OWN_WIDTH = "no target: own exact width"
NO_TARGET_DECLARED = "no target: width its node declares (accDataType)"
_GRID_TOLERANCE = 1e-2  # |x / scale - code|: float32 Quant outputs sit within ~1e-5 of their codes
DEFAULT_BATCH = 512
_ADVERSARIAL_BLOCK_TERMS = 1 << 21  # int64 terms per block of rows: 16 MB per temporary

# --------------------------------------------------------------------------- widths


WIDTHS_GLOBAL, WIDTHS_SELECTED, WIDTHS_RECORDED = "global", "selected layers", "model metadata"


def resolve_widths(model: ModelWrapper, layers: list[MacLayer], widths: int | dict[str, int] | None,
                   overrides: dict[str, int] | None = None) -> tuple[dict[str, int], str]:
    """Per-layer widths and where they came from (one of ``WIDTHS_*``); errors name the bad layer."""
    quantized = {layer.node: layer for layer in layers if layer.status != STATUS_WEIGHTS_NOT_QUANTIZED}
    if isinstance(widths, (int, np.integer)):
        resolved, source = {name: int(widths) for name in quantized}, WIDTHS_GLOBAL
    elif isinstance(widths, dict):
        resolved, source = dict(widths), WIDTHS_SELECTED
    elif widths is None:
        resolved, source = recorded_widths(model), WIDTHS_RECORDED
        if not resolved and not overrides:
            raise A2QError("no accumulator width given and none recorded in the model: pass --acc-bits P, "
                           "--layer NAME=P or --widths-json FILE, or record widths with `a2q annotate` first")
    else:
        raise TypeError(f"widths must be an int, a dict or None, got {type(widths).__name__}")
    resolved.update(overrides or {})
    names = {node.name or node.output[0]: node for node in model.graph.node}
    for name, bits in resolved.items():
        where = "recorded in the model metadata" if source == WIDTHS_RECORDED and name not in (overrides or {}) else "given"
        if name not in names:
            mac = ", ".join(quantized) or "none"
            raise A2QError(f"a width is {where} for layer '{name}', but the model has no node of that name "
                           f"(quantized MAC layers: {mac})")
        if name not in quantized:
            node = names[name]
            what = "has float weights" if any(layer.node == name for layer in layers) else f"is a {node.op_type} node"
            raise A2QError(f"a width is {where} for '{name}', which {what}, not a quantized MAC layer")
        if not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 64:
            raise A2QError(f"layer '{name}': accumulator width must be an integer between 1 and 64, got {bits!r}")
    return {name: int(bits) for name, bits in resolved.items()}, source


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

INNER_REGISTER = "partial sum within a tile"  # the inner stage of a tiled datapath; every other register is outer


def register_ranges(layer: MacLayer, rows: np.ndarray, x: bounds.IntRange, mode: str,
                    tile: int | None) -> dict[str, tuple[int, int]]:
    """Layer-wide extremes of every accumulator register the datapath holds, over the input box ``x``."""
    acc_min, acc_max = bounds.exact_accumulator_range(rows, x) if layer.act_x_act else channel_ranges(layer, rows)
    ranges = {"final sum": (int(acc_min.min()), int(acc_max.max()))}
    if layer.binary_xnor:
        return ranges  # popcount: every partial count lies between 0 and the final count
    if tile is not None:
        ranges[INNER_REGISTER], ranges["running sum of tile results"] = stage_ranges(rows, x, tile)
    elif mode == "saturate":
        lo, hi = bounds.partial_sum_range(rows, x)
        ranges["prefix of the sum"] = (int(lo.min()), int(hi.max()))
    return ranges


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

    Rows are simulated in blocks of about ``_ADVERSARIAL_BLOCK_TERMS`` terms: each row's accumulation is
    independent of the others, and the int64 inputs, weights and terms of a whole large layer at once come to
    some 20 bytes per weight (3.5 GB of temporaries for an 11008 x 4096 MLP layer)."""
    if max(bits, outer_bits or 0) > MAX_SIMULATED_BITS:
        return
    outer = None
    if outer_bits is not None:
        outer_lo = min(r[0] for name, r in verdict.registers.items() if name != INNER_REGISTER)
        outer = (outer_bits, outer_lo < 0)
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
    verdict.adversarial_cases = 2 * int(rows.shape[0])
    verdict.adversarial_overflows = overflows
    verdict.adversarial_register_overflows = register_overflows


def check_layer(model: ModelWrapper, layer: MacLayer, bits: int | None, mode: str = "wrap",
                tile: int | None = None, outer_bits: int | None = None) -> LayerVerdict:
    """Static proof and adversarial simulation of one layer at ``bits`` (``None``: unchecked).

    ``outer_bits`` (with ``tile``): the outer stage's width; ``bits`` is then the inner (within-tile) width.
    """
    _check_mode(mode, tile, outer_bits)
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


def _check_mode(mode: str, tile: int | None, outer_bits: int | None = None) -> None:
    if mode not in MODES:
        raise A2QError(f"accumulation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if tile is not None and tile < 1:
        raise A2QError(f"--tile must be a positive number of terms, got {tile}")
    if outer_bits is not None and (tile is None or not 1 <= outer_bits <= 64):
        raise A2QError(f"--outer-bits {outer_bits} needs --tile T and a width from 1 to 64 bits")


# --------------------------------------------------------------------------- graph execution


class _GraphRunner:
    """Runs a graph node by node on batched tensors of any batch size.

    qonnx/FINN custom ops run through their numpy ``execute_node``; every other node runs in
    onnxruntime as a single-node model (one cached session per node), like
    ``qonnx.core.onnx_exec.execute_node`` does, but with untyped shapes so the batch may differ
    from the one the model declares. Nodes whose inputs are all constant run once up front.
    """

    def __init__(self, model: ModelWrapper) -> None:
        model = batch_free_reshapes(model)
        self.model = model
        self.opsets = {imp.domain: imp.version for imp in model.model.opset_import}
        self.shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                       for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
        # streamed weights memory-mapped from their data file, read-only (one copy each in its node's session)
        self.constants = {init.name: tensor_value(init) for init in model.graph.initializer}
        self.data_inputs = [vi.name for vi in data_inputs(model.graph)]
        first = self.shapes.get(self.data_inputs[0]) if self.data_inputs else None
        self.declared_batch = first[0] if first else 0
        self.sessions: dict[int, rt.InferenceSession] = {}
        self.pending: list[tuple[int, NodeProto]] = []
        for index, node in enumerate(model.graph.node):
            if all(name in self.constants for name in node.input if name):
                self.run_node(index, node, self.constants, batch=self.declared_batch)
            else:
                self.pending.append((index, node))

    def run_node(self, index: int, node: NodeProto, context: dict[str, np.ndarray], batch: int) -> None:
        opset = self.opsets.get(node.domain, get_preferred_qonnx_opset())
        if node.domain and is_custom_op(node.domain, node.op_type):
            # Some custom ops read the output shape from the context: give them one with this batch
            for name in node.output:
                shape = self.shapes.get(name)
                if name and shape and shape[0] == self.declared_batch and node.input[0] not in self.constants:
                    context[name] = np.zeros((batch, *shape[1:]), dtype=np.float32)
            try:
                getCustomOp(node, onnx_opset_version=opset).execute_node(context, self.model.graph)
            except Exception as err:  # third-party kernels raise anything; say which node failed
                raise A2QError(f"executing {node.op_type} node '{node.name}' on a batch of {batch} failed: {err}") from err
            return
        session = self.sessions.get(index) or self._session(index, node, context)
        feeds = {i.name: context[i.name] for i in session.get_inputs()}
        outputs = [name for name in node.output if name]
        try:
            values = session.run(outputs, feeds)
        except Exception as err:
            raise A2QError(f"executing {node.op_type} node '{node.name}' on a batch of {batch} failed: {err}") from err
        context.update(zip(outputs, values))

    def _session(self, index: int, node: NodeProto, context: dict[str, np.ndarray]) -> rt.InferenceSession:
        initializers, inputs = [], []
        for name in dict.fromkeys(n for n in node.input if n):
            if name in self.constants:
                if self.constants[name].nbytes >= model_io.PROTO_LIMIT_BYTES:
                    raise A2QError(f"{node.op_type} node '{node.name or node.output[0]}': its input '{name}' "
                                   f"({self.constants[name].nbytes / 1e9:.2f} GB) is over protobuf's 2 GiB limit on "
                                   "the one-node model onnxruntime executes it in, so the --data simulation cannot "
                                   "run it; verify without --data (the proof and worst-case simulation read it)")
                initializers.append(numpy_helper.from_array(self.constants[name], name))
            else:
                elem = helper.np_dtype_to_tensor_dtype(context[name].dtype)
                inputs.append(helper.make_tensor_value_info(name, elem, None))
        outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = helper.make_graph([node], "single_node", inputs, outputs, initializers)
        opsets = [helper.make_opsetid(domain, version) for domain, version in self.opsets.items()]
        proto = helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = min(self.model.model.ir_version or 10, 10)
        options = rt.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = rt.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.sessions[index] = session
        return session


# --------------------------------------------------------------------------- integer view of MAC nodes


class _NotSimulated(Exception):
    """This layer's data simulation is not supported; the message says why."""


class _MacKernel:
    """Integer view of one MAC node on real data: float input -> codes -> P-bit accumulator values."""

    def __init__(self, model: ModelWrapper, layer: MacLayer, node: NodeProto, bits: int, mode: str,
                 tile: int | None, outer_bits: int | None = None) -> None:
        if not layer.ok:
            raise _NotSimulated(layer.status)
        if layer.act_x_act:
            raise _NotSimulated("data simulation of an activation x activation MatMul is not implemented "
                                "(the static proof and the worst-case simulation still apply)")
        if layer.layout.kind == "blocks":
            raise _NotSimulated("data simulation of block-wise weight scales (one accumulator per block) is not "
                                "implemented (the static proof and the worst-case simulation still apply)")
        if layer.op_type not in ("Conv", "Gemm", "MatMul"):
            raise _NotSimulated(f"data simulation of {layer.op_type} nodes is not implemented "
                                "(the static proof and adversarial simulation still apply)")
        if bits > MAX_SIMULATED_BITS:
            raise _NotSimulated(f"P = {bits} > {MAX_SIMULATED_BITS} bits")
        self.layer, self.node = layer, node
        self.bits, self.mode, self.tile = bits, mode, tile
        self.rows = layer.integer_rows(model)
        # the accumulator is signed when some register can go negative, as in the static proof
        registers = register_ranges(layer, self.rows, layer.grid.range, mode, tile)
        self.signed = min(lo for lo, _ in registers.values()) < 0
        self.outer = None  # the outer stage of a tiled datapath with its own width: (bits, signed)
        if outer_bits is not None:
            self.signed = registers.get(INNER_REGISTER, registers["final sum"])[0] < 0
            self.outer = (outer_bits, min(lo for name, (lo, _) in registers.items() if name != INNER_REGISTER) < 0)
        grid = layer.grid
        self.input_scale = float(grid.scale) if grid.scale is not None else 1.0
        self.output_scale = self._weight_scales(model) * self.input_scale * float(node_attr(node, "alpha", 1.0))
        # bounds every partial sum (padding holds the zero-point code, which lies inside the range)
        self.bound = grid.range.magnitude * int(np.abs(self.rows).sum(axis=1).max(initial=0))
        if node.op_type == "Conv":
            self._conv_setup()

    def _weight_scales(self, model: ModelWrapper) -> np.ndarray:
        """Per-row weight scale ``s_w`` (rows of the accumulator), checked constant along K."""
        source = self.layer.source
        if source.scale is None:
            return np.ones(self.rows.shape[0])
        scale = np.broadcast_to(np.asarray(source.scale, dtype=np.float64), initializer_shape(model, source.tensor))
        for perm in source.perms:
            scale = np.transpose(scale, perm)
        per_term = self.layer.layout.to_rows(scale)
        if not np.all(per_term == per_term[:, :1]):
            raise _NotSimulated("the weight scale varies along the accumulation axis, so the float layer "
                                "is not a scaled integer dot product")
        return per_term[:, 0].copy()

    def _conv_setup(self) -> None:
        kernel = tuple(self.layer.layout.shape[2:])  # Conv weights: (C_out, C_in / groups, *kernel)
        n = len(kernel)
        self.groups = int(node_attr(self.node, "group", 1))
        self.strides = list(node_attr(self.node, "strides", [1] * n))
        self.dilations = list(node_attr(self.node, "dilations", [1] * n))
        self.window = [(k - 1) * d + 1 for k, d in zip(kernel, self.dilations)]
        self.auto_pad = node_str_attr(self.node, "auto_pad", "NOTSET")
        self.pads = list(node_attr(self.node, "pads", [0] * 2 * n))

    def codes(self, x: np.ndarray) -> np.ndarray:
        """Integer codes of the layer input (integer-valued float64), checked to lie on the layer's grid."""
        grid = self.layer.grid
        scaled = np.asarray(x, dtype=np.float64) / self.input_scale + grid.zero_code
        codes = np.rint(scaled)
        off = float(np.max(np.abs(scaled - codes))) if codes.size else 0.0
        lo, hi = (float(codes.min()), float(codes.max())) if codes.size else (grid.range.lo, grid.range.hi)
        if not off <= _GRID_TOLERANCE or lo < grid.range.lo or hi > grid.range.hi:
            raise A2QError(
                f"layer '{self.layer.node}': its input '{self.layer.input_tensor}' is not on the integer grid "
                f"{grid.dtype} (scale {self.input_scale:g}, zero point {grid.zero_code}, codes "
                f"[{grid.range.lo}, {grid.range.hi}]): codes span [{lo:g}, {hi:g}], up to {off:.3g} off an integer. "
                "Feed data in the range the model expects (for an --input-dtype input: the integer codes)")
        return codes

    def accumulate(self, x: np.ndarray) -> tuple[Accumulation, int]:
        """P-bit accumulation of the node on input ``x``, in the node's output layout, and its channel axis."""
        codes = self.codes(x)
        if self.node.op_type != "Conv":
            return accumulate_dot(codes, self.rows, self.bits, self.signed, self.mode, self.tile, self.outer), -1
        padded = self._padded(codes)  # float64 holding integers
        padded_int: list[np.ndarray] = []  # the int64 copy, made only if terms are needed
        n = codes.ndim - 2
        spatial = tuple((p - w) // s + 1 for p, w, s in zip(padded.shape[2:], self.window, self.strides))
        kernel = tuple(self.layer.layout.shape[2:])
        per_group_in = codes.shape[1] // self.groups
        per_group_out = self.rows.shape[0] // self.groups
        weight_shape = (1, self.rows.shape[0]) + (1,) * n

        def term_at(k: int) -> np.ndarray:  # input code of term k at every output pixel, times its weight
            channel, *tap = np.unravel_index(k, (per_group_in, *kernel))
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                           for t, d, o, s in zip(tap, self.dilations, spatial, self.strides))
            if not padded_int:
                padded_int.append(padded.astype(np.int64))
            x_k = padded_int[0][(slice(None), slice(channel, None, per_group_in), *window)]  # (B, groups, *spatial)
            if self.groups > 1:
                x_k = np.repeat(x_k, per_group_out, axis=1)
            return x_k * self.rows[:, k].reshape(weight_shape)

        exact = self._exact_conv(padded)
        return accumulate(term_at, self.rows.shape[1], self.bits, self.signed, self.mode, self.tile, exact, self.outer), 1

    def _padded(self, codes: np.ndarray) -> np.ndarray:
        n = codes.ndim - 2
        if self.auto_pad in ("NOTSET", ""):
            begin, end = self.pads[:n], self.pads[n:]
        elif self.auto_pad == "VALID":
            begin, end = [0] * n, [0] * n
        else:  # SAME_UPPER / SAME_LOWER
            total = [max((-(-size // s) - 1) * s + w - size, 0)
                     for size, s, w in zip(codes.shape[2:], self.strides, self.window)]
            small = [t // 2 for t in total]
            begin = small if self.auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
            end = [t - b for t, b in zip(total, begin)]
        # padding holds real 0, i.e. the zero-point code
        return np.pad(codes, [(0, 0), (0, 0), *zip(begin, end)], constant_values=self.layer.grid.zero_code)

    def _exact_conv(self, padded: np.ndarray) -> np.ndarray | None:
        """Exact integer convolution in float (see ``simulate.exact_float_dtype``); None if too wide."""
        import torch

        dtype = exact_float_dtype(self.bound)
        n = padded.ndim - 2
        conv = getattr(torch.nn.functional, f"conv{n}d")
        for candidate in ((dtype, np.float64) if dtype is np.float32 else (dtype,)):
            if candidate is None:
                return None  # summed term by term in int64
            weights = self.rows.reshape(self.layer.layout.shape).astype(candidate)
            with torch.no_grad():
                y = conv(torch.from_numpy(padded.astype(candidate)), torch.from_numpy(weights),
                         stride=self.strides, dilation=self.dilations, groups=self.groups).numpy()
            exact = np.rint(y)
            # a direct convolution is exact here; a transformed one (Winograd) would leave fractions
            if candidate is np.float64 or np.array_equal(exact, y):
                return exact.astype(np.int64)
        return None

    def corrected(self, y: np.ndarray, delta: np.ndarray, channel_axis: int) -> np.ndarray:
        """``y + delta * s_w[channel] * s_x`` in the node output's dtype."""
        shape = [1] * delta.ndim
        shape[channel_axis] = -1
        return (y.astype(np.float64) + delta * self.output_scale.reshape(shape)).astype(y.dtype)


# --------------------------------------------------------------------------- data simulation


@dataclass
class SimulationResult:
    """Graph outputs with P-bit accumulators next to exact accumulation, and per-layer overflow counts."""

    outputs: dict[str, np.ndarray]
    exact_outputs: dict[str, np.ndarray]
    widths: dict[str, int]  # layers simulated in P bits
    mode: str
    tile: int | None
    accumulations: dict[str, int]  # accumulator outputs simulated per layer
    overflows: dict[str, int]  # ... whose P-bit result differs from the exact sum
    register_overflows: dict[str, int]  # ... where some register left the P-bit range
    skipped: dict[str, str]  # layers given a width that could not be simulated, and why

    def max_abs_deviation(self) -> float:
        """Largest ``|y_sim - y_exact|`` over every graph output."""
        return max((float(np.max(np.abs(self.outputs[k].astype(np.float64) - self.exact_outputs[k])))
                    for k in self.outputs if self.outputs[k].size), default=0.0)

    def changed_predictions(self) -> float | None:
        """For a classifier (first output ``(N, classes)``): fraction of samples whose argmax changed."""
        name = next(iter(self.outputs), None)
        if name is None or self.outputs[name].ndim != 2 or self.outputs[name].shape[1] < 2:
            return None
        changed = np.argmax(self.outputs[name], axis=1) != np.argmax(self.exact_outputs[name], axis=1)
        return float(np.mean(changed))

    def to_json(self) -> dict[str, Any]:
        first = next(iter(self.outputs.values()), np.zeros((0,)))
        return {
            "samples": int(first.shape[0]) if first.ndim else 0,
            "mode": self.mode, "tile": self.tile, "widths": dict(self.widths),
            "accumulations": dict(self.accumulations), "overflows": dict(self.overflows),
            "register_overflows": dict(self.register_overflows), "skipped": dict(self.skipped),
            "max_abs_output_deviation": self.max_abs_deviation(),
            "changed_predictions": self.changed_predictions(),
        }


def graph_feeds(model: ModelWrapper, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Validated, batched feeds for the graph inputs; errors name the input and the expected shape."""
    declared = data_inputs(model.graph)
    names = [vi.name for vi in declared]
    if not isinstance(inputs, dict):
        if len(names) != 1:
            raise A2QError(f"the model has {len(names)} inputs ({', '.join(names)}); give the data as arrays "
                           "keyed by input name")
        inputs = {names[0]: inputs}
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise A2QError(f"data arrays {sorted(inputs)} do not match the model inputs {names}"
                       + (f" (missing: {', '.join(missing)})" if missing else ""))
    feeds, batch = {}, None
    for vi in declared:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        expected = "(N, " + ", ".join(str(d) if d else "?" for d in dims[1:]) + ")" if dims else "()"
        arr = np.asarray(inputs[vi.name])
        if arr.dtype.kind not in "biuf":
            raise A2QError(f"input '{vi.name}': data of dtype {arr.dtype} is not numeric")
        if dims and (arr.ndim != len(dims) or any(d and d != s for d, s in zip(dims[1:], arr.shape[1:]))):
            raise A2QError(f"input '{vi.name}': data shape {tuple(arr.shape)} does not match the model, "
                           f"which expects {expected} (N samples)")
        if arr.shape[0] == 0:
            raise A2QError(f"input '{vi.name}': the data holds no samples")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise A2QError(f"input '{vi.name}': the data holds {bad} NaN or infinite value(s)")
        if batch is not None and arr.shape[0] != batch:
            raise A2QError(f"input '{vi.name}' has {arr.shape[0]} samples, the other inputs {batch}")
        batch = arr.shape[0]
        feeds[vi.name] = arr.astype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return feeds


def load_inputs(path: Path, model: ModelWrapper) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz``: ``x`` (and optional labels ``y``, ignored) for single-input models, or arrays keyed by input name."""
    path = Path(path)
    if not path.is_file():
        raise A2QError(f"{path}: no such data file (expected an .npz with an array 'x' or one array per model input)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise A2QError(f"{path}: expected an .npz archive (numpy.savez), not a single .npy array")
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise A2QError(f"{path}: not a readable .npz archive ({err})") from err
    if not arrays:
        raise A2QError(f"{path}: the archive holds no arrays")
    names = [vi.name for vi in data_inputs(model.graph)]
    # the finetune data format (labels unused here), unless the arrays are keyed by input name
    if "x" in arrays and set(arrays) <= {"x", "y"} and not set(arrays) <= set(names):
        if len(names) != 1:
            raise A2QError(f"{path}: array 'x' is ambiguous for a model with inputs {names}; key the arrays by input name")
        return {names[0]: arrays["x"]}
    return arrays


def simulate_model(
    model: ModelWrapper,
    inputs: dict[str, np.ndarray] | np.ndarray,
    widths: int | dict[str, int] | None,
    mode: str = "wrap",
    tile: int | None = None,
    input_dtypes: dict[str, str] | None = None,
    zero_point: str = "fold",
    batch_size: int = DEFAULT_BATCH,
    stages: dict[str, tuple[int, int | None]] | None = None,
) -> SimulationResult:
    """Run ``inputs`` through ``model`` with P-bit accumulators in the given layers.

    ``widths`` is one P for every quantized MAC layer, ``{node: P}`` (other layers accumulate
    exactly) or ``None`` (the widths recorded in the model). The simulated error of each layer propagates to later layers, so ``outputs`` is
    what the model computes with those accumulators; ``exact_outputs`` is ordinary execution.
    Layers that cannot be simulated (e.g. FINN dataflow nodes) run exactly and are listed in
    ``skipped``. The model is not modified. ``stages``: per layer ``(tile, outer bits)`` of a multi-stage
    datapath, in place of ``tile`` (``verify`` passes what ``project --tile`` recorded).
    """
    _check_mode(mode, tile)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    layers = find_mac_layers(model, input_dtypes, zero_point)
    chosen, _ = resolve_widths(model, layers, widths)
    feeds = graph_feeds(model, inputs)
    by_name = {layer.node: layer for layer in layers}
    nodes = {node.name or node.output[0]: node for node in model.graph.node}
    kernels: dict[str, _MacKernel] = {}
    skipped: dict[str, str] = {}
    for name, bits in chosen.items():
        layer = by_name[name]
        try:
            kernels[name] = _MacKernel(model, layer, nodes[name], bits, mode, *(stages or {}).get(name, (tile, None)))
        except _NotSimulated as why:
            skipped[name] = str(why)
    runner = _GraphRunner(model)
    if any(node.domain.startswith("finn") for node in model.graph.node):
        batch_size = max(runner.declared_batch, 1)  # FINN dataflow kernels reshape to their declared batch
    total = next(iter(feeds.values())).shape[0]
    outputs_exact: dict[str, list[np.ndarray]] = {vi.name: [] for vi in model.graph.output}
    outputs_sim: dict[str, list[np.ndarray]] = {vi.name: [] for vi in model.graph.output}
    counts = {key: dict.fromkeys(kernels, 0) for key in ("accumulations", "overflows", "register_overflows")}
    for start in range(0, total, batch_size):
        exact = dict(runner.constants)
        exact.update({name: arr[start:start + batch_size] for name, arr in feeds.items()})
        sim = dict(exact)
        batch = min(batch_size, total - start)
        for index, node in runner.pending:
            shared = all(sim[n] is exact[n] for n in node.input if n)
            runner.run_node(index, node, exact, batch)
            if shared:
                sim.update({o: exact[o] for o in node.output if o})
            else:
                runner.run_node(index, node, sim, batch)
            kernel = kernels.get(node.name or node.output[0])
            if kernel is None:
                continue
            acc, channel_axis = kernel.accumulate(sim[node.input[0]])
            counts["accumulations"][kernel.layer.node] += acc.values.size
            counts["overflows"][kernel.layer.node] += acc.overflow_count
            counts["register_overflows"][kernel.layer.node] += acc.register_overflow_count
            if acc.overflow_count:
                sim[node.output[0]] = kernel.corrected(sim[node.output[0]], acc.values - acc.exact, channel_axis)
        for name in outputs_exact:
            outputs_exact[name].append(exact[name])
            outputs_sim[name].append(sim[name])
    return SimulationResult(
        outputs={k: np.concatenate(v) for k, v in outputs_sim.items()},
        exact_outputs={k: np.concatenate(v) for k, v in outputs_exact.items()},
        widths={name: chosen[name] for name in kernels}, mode=mode, tile=tile,
        accumulations=counts["accumulations"], overflows=counts["overflows"],
        register_overflows=counts["register_overflows"], skipped=skipped,
    )


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
        allowed = {PROOF_PASS, PROOF_NOT_QUANTIZED}
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
) -> VerificationReport:
    """Prove (or refute) overflow freedom per layer, simulate the worst cases, and optionally real data.

    ``input_ranges``: the input codes each layer is checked for (:data:`a2q_passes.layers.INPUT_RANGES`).
    ``tile``/``outer_bits``: a multi-stage datapath, every layer's K-tiles of ``tile`` terms at its width and the
    sum of tiles at ``outer_bits`` (default: the same width). Without ``tile``, widths read from the record
    keep the tile and outer width ``project --tile`` recorded.
    """
    _check_mode(mode, tile, outer_bits)
    layers = find_mac_layers(model, input_dtypes, zero_point, input_ranges)
    chosen, source = resolve_widths(model, layers, widths, overrides)
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
                for layer in layers]
    for verdict, layer in zip(verdicts, layers):
        verdict.width_note = notes.get(layer.node, "")
        if source == WIDTHS_RECORDED and verdict.proof == PROOF_UNCHECKED:  # quantized, unreadable, not recorded
            verdict.reason = (f"no width recorded, and its own cannot be derived ({layer.status}): nothing is proven "
                              f"for '{layer.node}'; make it readable (e.g. --input-dtype for a float input), or "
                              "verify the other layers only with --layer NAME=P")
    # a passing proof must agree with the range derived without the reader (exit 4 otherwise)
    certify_claims(model, {v.node: _claim(v) for v in verdicts if v.proof == PROOF_PASS},
                   what="verify", input_dtypes=input_dtypes, zero_point=zero_point, input_ranges=input_ranges)
    report = VerificationReport(verdicts, mode, tile, source, zero_point, input_ranges=input_ranges)
    if data is not None:
        simulation = simulate_model(model, data, chosen, mode, tile, input_dtypes, zero_point, stages=stages)
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
