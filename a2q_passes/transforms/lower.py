"""``LowerToFINN``: lower a QONNX model to FINN HW layers and give every MVAU/VVAU a guaranteed accumulator.

1. :func:`a2q_passes.finn_flow.lower_to_finn_hw` runs FINN's own conversion, streamlining and
   ``step_convert_to_hw``. The result keeps non-specialised MVAU/VVAU nodes, which execute in numpy.
2. Every MVAU/VVAU is mapped back to the QONNX layer it came from. FINN renames nodes, and the
   lowering reorders a conv's weights from ``(cin, kh, kw)`` to ``(kh, kw, cin)``. The link is
   therefore the integer weight content, compared in a form that ignores both reorderings: each
   channel's weights sorted, then the channels sorted (:func:`weight_signature`). Identical layers
   are paired in graph order. Streamlining leaves integer weights alone, and the exact accumulator
   range depends only on that multiset, so two layers with equal signatures have equal ranges.
3. :func:`a2q_passes.finn_accumulators.set_accumulator_datatypes` sets each node's ``accDataType`` to the
   minimal type holding the exact range of its lowered integer weights. With a target width
   (``acc_bits`` for every node, else the widths ``project``/``annotate`` recorded for the mapped
   QONNX layer), a node that needs more bits is an error. The range is taken over the node's
   ``inputDataType``, FINN's own view of its input: a narrow signed n-bit quantizer's codes
   ``[-2^(n-1)+1, 2^(n-1)-1]`` become ``INTn``, one code wider. Sizing from the quantizer's codes
   instead would be safe for the hardware today (the MultiThreshold in front never emits the extra
   code), but FINN's ``MinimizeAccumulatorWidth`` (run again by later build steps), the
   thresholds' ``RoundAndClipThresholds`` and ``a2q verify`` of the lowered graph all read
   ``inputDataType``, and FINN has no narrow DataType to state the smaller range in: the lowered
   graph would carry a width its own types contradict. A model projected for the exact codes is
   therefore refused by name (:func:`refuse_exact_input_targets`), and ``a2q project --input-ranges
   finn`` sizes it for FINN's view.
4. Metadata: every ``metadata_props`` entry of the input is kept. The accumulator record
   (:data:`a2q_passes.metadata.ACCUMULATORS_KEY`) is re-keyed by HW node name, so ``a2q verify``
   checks the lowered graph at the widths its hardware uses. Each entry keeps ``qonnx_node``
   and ``target_bits``, and the QONNX-level record is kept verbatim under
   :data:`QONNX_ACCUMULATORS_KEY`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import PostconditionError, PreconditionError
from a2q_passes import bounds
from a2q_passes.finn_accumulators import (HW_DOMAIN_PREFIX, check_thresholds_hold, hw_accumulator_ranges,
                                          iterate_mac_nodes, set_accumulator_datatypes)
from a2q_passes.finn_execution import compare_execution
from a2q_passes.finn_flow import LoweringError, LoweringReport, lower_to_finn_hw
from a2q_passes.finn_runtime import ensure_finn_importable
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, find_mac_layers
from a2q_passes.metadata import ACCUMULATORS_KEY, read_record, record_accumulators, recorded_accumulators
from a2q_passes.model_io import data_inputs, declare_custom_domains
from a2q_passes.passes import A2QPass, PassResult

QONNX_ACCUMULATORS_KEY = "a2q.accumulators.qonnx"
WEIGHT_SIGNATURES_KEY = "a2q.weight_signatures"  # {qonnx node: signature}, for mapping after the model is gone
TARGETS_GLOBAL, TARGETS_RECORDED, TARGETS_NONE = "global", "model metadata", "none"


# ---------------------------------------------------------------------------------------------
# QONNX layer <-> HW node mapping by weight content


def weight_signature(rows: np.ndarray) -> str:
    """Name-free identity of a layer's integer weights ``(channels, K)``.

    It does not change when channels or the terms within a channel are permuted, or when a whole
    channel is negated. That covers what lowering does to the weights: a conv's ``(cin, kh, kw)``
    becomes ``(kh, kw, cin)``, a Gemm's ``(out, in)`` becomes MatMul ``(in, out)``, and FINN's
    streamlining negates the channels whose folded BatchNorm scale is negative
    (``FactorOutMulSignMagnitude`` then ``Absorb1BitMulIntoMatMul``). Only the pairing uses it: each
    HW node's accumulator range is computed from its own weights.
    """
    rows = np.asarray(rows, dtype=np.int64)
    up, down = np.sort(rows, axis=1), np.sort(-rows, axis=1)
    canonical = [min(a.tobytes(), b.tobytes()) for a, b in zip(up, down)]
    digest = hashlib.sha1(b"".join(sorted(canonical))).hexdigest()[:20]
    return f"{rows.shape[0]}x{rows.shape[1]}:{digest}"


def layer_signatures(model: ModelWrapper) -> dict[str, str]:
    """Signature per MAC layer with readable integer weights (QONNX layers or MVAU/VVAU), in graph order.

    FINN stores binary xnor weights as ``{0, 1}`` for ``{-1, +1}``; they are mapped back first so
    a bipolar QONNX layer and its xnor MVAU get the same signature.
    """
    signatures = {}
    for layer in find_mac_layers(model):
        if layer.source is None or layer.status == STATUS_WEIGHTS_NOT_QUANTIZED or layer.status.startswith("unsupported"):
            continue
        rows = layer.integer_rows(model)
        signatures[layer.node] = weight_signature(2 * rows - 1 if layer.binary_xnor else rows)
    return signatures


def match_layers(qonnx_signatures: dict[str, str], hw_signatures: dict[str, str]) -> dict[str, str]:
    """HW node -> QONNX layer with the same signature; equal signatures are paired in graph order."""
    waiting: dict[str, list[str]] = defaultdict(list)
    for name, signature in qonnx_signatures.items():
        waiting[signature].append(name)
    mapping = {}
    for hw_name, signature in hw_signatures.items():
        if waiting[signature]:
            mapping[hw_name] = waiting[signature].pop(0)
    return mapping


def _metadata(model: ModelWrapper, key: str) -> str | None:
    return next((p.value for p in model.model.metadata_props if p.key == key), None)


def recorded_signatures(model: ModelWrapper) -> dict[str, str]:
    """Signatures stored by :func:`record_weight_signatures` (empty if none)."""
    value = _metadata(model, WEIGHT_SIGNATURES_KEY)
    return json.loads(value) if value is not None else {}


def record_weight_signatures(model: ModelWrapper) -> None:
    """Store the QONNX layers' signatures in the model, so the mapping works after conversion to FINN."""
    _set_metadata(model, WEIGHT_SIGNATURES_KEY, json.dumps(layer_signatures(model), sort_keys=True))


def _set_metadata(model: ModelWrapper, key: str, value: str) -> None:
    entry = next((p for p in model.model.metadata_props if p.key == key), None)
    if entry is None:
        entry = model.model.metadata_props.add()
        entry.key = key
    entry.value = value


# ---------------------------------------------------------------------------------------------


@dataclass
class HWLayer:
    """One MVAU/VVAU after lowering (JSON-ready via ``asdict``)."""

    node: str
    op_type: str
    qonnx_node: str | None
    K: int  # MW (MVAU) or kh*kw (VVAU)
    channels: int  # MH (MVAU) or Channels (VVAU)
    acc_min: int
    acc_max: int
    target_bits: int | None
    acc_dtype: str  # ours
    finn_acc_dtype: str  # what FINN's MinimizeAccumulatorWidth picks on the same graph


def hw_targets(hw_model: ModelWrapper, mapping: dict[str, str], acc_bits: int | None,
               recorded: dict[str, int]) -> tuple[dict[str, int], str]:
    """Target width per HW node, and where the targets come from (one of ``TARGETS_*``)."""
    nodes = [node.name for node in iterate_mac_nodes(hw_model)]
    if acc_bits is not None:
        return {name: int(acc_bits) for name in nodes}, TARGETS_GLOBAL
    if recorded:
        return {name: recorded[mapping[name]] for name in nodes if mapping.get(name) in recorded}, TARGETS_RECORDED
    return {}, TARGETS_NONE


def refuse_exact_input_targets(qonnx_model: ModelWrapper, hw_model: ModelWrapper, mapping: dict[str, str],
                               targets: dict[str, int]) -> None:
    """Raise :class:`LoweringError` naming every MVAU/VVAU whose target fits the QONNX layer's exact input
    codes but not FINN's wider ``inputDataType``, with both ranges and the fix (project with FINN's ranges).

    Nodes whose target is missed for another reason are left to :func:`set_accumulator_datatypes`.
    """
    from qonnx.custom_op.registry import getCustomOp

    hw_ranges = hw_accumulator_ranges(hw_model)
    short = [node for node in iterate_mac_nodes(hw_model) if targets.get(node.name) is not None
             and not bounds.fits(*hw_ranges[node.name], targets[node.name])]
    if not short:
        return
    exact = analyze_model(qonnx_model, input_ranges="exact").by_node()
    record = {name: info.get("input_ranges") for name, info in _qonnx_record(qonnx_model).items()}
    problems, already_finn = [], []
    for node in short:
        target, (acc_min, acc_max) = targets[node.name], hw_ranges[node.name]
        layer = exact.get(mapping.get(node.name, ""))
        if layer is None or layer.acc_min is None:
            continue
        idt = DataType[getCustomOp(node).get_nodeattr("inputDataType")]
        widened = [int(idt.min()), int(idt.max())] != layer.input_range
        if not (widened and bounds.fits(layer.acc_min, layer.acc_max, target)):
            continue
        recorded = record.get(layer.node)
        if recorded == "finn":
            already_finn.append(f"--layer {layer.node}={bounds.accumulator_width(acc_min, acc_max)}")
        problems.append(
            f"{node.name} (QONNX layer {layer.node}): FINN annotates its input {idt.name} = [{int(idt.min())}, "
            f"{int(idt.max())}] where the quantizer's codes are {layer.input_range}; with FINN's input type the "
            f"accumulator range is [{acc_min}, {acc_max}] ({bounds.accumulator_width(acc_min, acc_max)} bits), with "
            f"the exact codes [{layer.acc_min}, {layer.acc_max}] ({bounds.accumulator_width(layer.acc_min, layer.acc_max)} "
            f"bits); target {target} bits" + (f" (recorded with input ranges '{recorded}')" if recorded else ""))
    if problems and len(already_finn) == len(problems):
        # sized for FINN's view already: FINN's streamlining moved an affine op on the input (an Add/Div of a
        # BIPOLAR input, say) behind the layer, so its MVAU multiplies codes the QONNX graph does not show
        raise LoweringError(
            "FINN sizes accumulators from its input DataType, which is wider than the codes a2q reads for FINN here: "
            + "; ".join(problems) + ". The widths were recorded for FINN's input types, but FINN's streamlining moved "
            "an operation on these layers' inputs behind them (e.g. an Add/Div of a BIPOLAR input). Give them the "
            "widths FINN needs (`a2q project ... " + " ".join(already_finn) + "`), or lower with --acc-bits")
    if problems:
        raise LoweringError(
            "FINN sizes accumulators from its input DataType, which is wider than the exact codes the model was "
            "sized for: " + "; ".join(problems) + ". Re-run `a2q project --input-ranges finn` on the QONNX model "
            "at this width, then lower its output")


def finn_accumulator_choice(hw_model: ModelWrapper) -> dict[str, str]:
    """``accDataType`` per MVAU/VVAU as FINN's own ``MinimizeAccumulatorWidth`` sets it (on a copy).

    The loop of that transformation (each node's ``minimize_accumulator_width``, then ``InferDataTypes``), with a
    node where FINN's sizing fails reported as failing: on all-zero weights it asks for a 0-bit type and stops
    ("Factor and x are <= 0"). The column is FINN's view for comparison; a2q's own widths do not depend on it.
    """
    ensure_finn_importable()
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.infer_datatypes import InferDataTypes

    from finn.util.fpgadataflow import is_fpgadataflow_node

    model = ModelWrapper(hw_model.model.SerializeToString())
    failed: dict[str, str] = {}
    for index in range(len(model.graph.node)):
        node = model.graph.node[index]
        instance = getCustomOp(node) if is_fpgadataflow_node(node) else None
        if instance is None or not hasattr(instance, "minimize_accumulator_width"):
            continue
        try:
            instance.minimize_accumulator_width(model)
        except Exception as err:  # noqa: BLE001 - FINN's own failure, shown in its column
            failed[node.name] = f"fails ({type(err).__name__})"
        model = model.transform(InferDataTypes())
    return {node.name: failed.get(node.name) or getCustomOp(node).get_nodeattr("accDataType")
            for node in iterate_mac_nodes(model)}


def describe_hw_layers(hw_model: ModelWrapper, mapping: dict[str, str], targets: dict[str, int],
                       finn_choice: dict[str, str]) -> list[HWLayer]:
    """Per MVAU/VVAU: shape, exact range (from the project's analysis), target, our and FINN's type."""
    from qonnx.custom_op.registry import getCustomOp

    analysis = analyze_model(hw_model).by_node()
    layers = []
    for node in iterate_mac_nodes(hw_model):
        report = analysis[node.name]
        layers.append(HWLayer(
            node.name, node.op_type, mapping.get(node.name), report.K, report.channels, report.acc_min,
            report.acc_max, targets.get(node.name), getCustomOp(node).get_nodeattr("accDataType"),
            finn_choice.get(node.name, "-")))
    return layers


def _qonnx_record(model: ModelWrapper) -> dict[str, dict]:
    """The accumulator record of the QONNX layers: kept aside after lowering, else the model's own."""
    record = read_record(model, QONNX_ACCUMULATORS_KEY)
    if record is None:
        record = read_record(model)
        if record is None or record.get("source") == "lower":
            return {}
    return record["layers"]


def qonnx_recorded_widths(model: ModelWrapper) -> dict[str, int]:
    """Widths recorded for the QONNX layers (by ``project``/``annotate``), also after lowering.

    A layer projected for a multi-stage datapath (``project --tile``) records its inner width as ``acc_bits``;
    FINN's single accumulator must hold the full sum, which the outer width (``outer_bits``) covers.
    """
    return {name: int(info.get("outer_bits", info["acc_bits"])) for name, info in _qonnx_record(model).items()}


def rekey_accumulator_record(hw_model: ModelWrapper, layers: list[HWLayer]) -> None:
    """Re-key the accumulator record by HW node (see module docstring); the QONNX record is kept as is."""
    current = read_record(hw_model)
    if current is not None and current.get("source") != "lower":
        _set_metadata(hw_model, QONNX_ACCUMULATORS_KEY, _metadata(hw_model, ACCUMULATORS_KEY))
    qonnx_record = _qonnx_record(hw_model)
    record = {}
    for layer in layers:
        entry = dict(qonnx_record.get(layer.qonnx_node, {})) if layer.qonnx_node else {}
        entry.update(acc_bits=DataType[layer.acc_dtype].bitwidth(), acc_dtype=layer.acc_dtype,
                     acc_min=layer.acc_min, acc_max=layer.acc_max, qonnx_node=layer.qonnx_node,
                     target_bits=layer.target_bits)
        record[layer.node] = entry
    record_accumulators(hw_model, record, source="lower")


def check_hw_accumulators(hw_model: ModelWrapper, targets: dict[str, int]) -> None:
    """Raise :class:`PostconditionError` unless every MVAU/VVAU's type holds its exact range, within its target.

    The exact ranges come from the project's analysis (``layers``/``bounds``), not from the
    code that set the types. The thresholds are also checked: each must be an integer inside
    ``[acc_min, acc_max + 1]`` of the accumulator type, and its tensor type must hold it.
    """
    from qonnx.custom_op.registry import getCustomOp

    analysis = analyze_model(hw_model).by_node()
    for node in iterate_mac_nodes(hw_model):
        report = analysis.get(node.name)
        if report is None or report.acc_min is None:
            raise PostconditionError(f"{node.name}: accumulator range cannot be read ({report and report.status})")
        adt = DataType[getCustomOp(node).get_nodeattr("accDataType")]
        if not (adt.min() <= report.acc_min and report.acc_max <= adt.max()):
            raise PostconditionError(f"{node.name}: accDataType {adt.name} cannot hold the exact accumulator range "
                                     f"[{report.acc_min}, {report.acc_max}]")
        target = targets.get(node.name)
        if target is not None and adt.bitwidth() > target:
            raise PostconditionError(f"{node.name}: accDataType {adt.name} is wider than its target {target} bits")
    check_thresholds_hold(hw_model)


def equivalence_inputs(model: ModelWrapper, samples: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic inputs ``(samples, *input_shape[1:])`` for :func:`compare_execution`, on the input's grid.

    * Graph input annotated with an integer datatype (``INTn``/``UINTn``/``BIPOLAR``...): its
      allowed values only, drawn uniformly (qonnx refuses any other value of an annotated input).
    * Graph input read by a ``Quant``: reals drawn uniformly from the quantizer's real range
      ``[(lo - z) s, (hi - z) s]``; every second sample is snapped onto the grid ``(code - z) s``,
      because grid-valued data (images as k/255 ...) sit on the float32 decision boundaries where
      a wrongly rounded threshold flips a code (see :func:`a2q_passes.finn_input_thresholds.exact_input_thresholds`).
    * Otherwise (a float input with no quantizer): a standard normal.
    """
    from a2q_passes.input_grids import GridResolver

    names = [i.name for i in data_inputs(model.graph)]
    if len(names) != 1:
        raise PreconditionError(f"the equivalence check needs a single-input model, got inputs {names}; pass --data")
    shape = (samples, *model.get_tensor_shape(names[0])[1:])
    rng = np.random.default_rng(seed)
    annotated = model.get_tensor_datatype(names[0])
    if annotated.is_integer():
        if annotated == DataType["BIPOLAR"]:
            return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
        return rng.integers(int(annotated.min()), int(annotated.max()), size=shape, endpoint=True).astype(np.float32)
    quant = next((n for n in model.find_consumers(names[0]) or [] if n.op_type in ("Quant", "IntQuant")), None)
    grid, _ = GridResolver(model).resolve(quant.output[0]) if quant is not None else (None, "")
    if grid is None or grid.scale is None:
        return rng.standard_normal(shape).astype(np.float32)
    ends = ((grid.range.lo - grid.zero_code) * grid.scale, (grid.range.hi - grid.zero_code) * grid.scale)
    inputs = rng.uniform(min(ends), max(ends), size=shape).astype(np.float32)  # a negative scale reverses them
    codes = rng.integers(grid.range.lo, grid.range.hi, size=inputs[1::2].shape, endpoint=True)
    inputs[1::2] = ((codes - grid.zero_code) * np.float32(grid.scale)).astype(np.float32)
    return inputs


def check_equivalence(original: ModelWrapper, lowered: ModelWrapper, inputs: np.ndarray,
                      attribution_samples: int = 4) -> dict[str, Any]:
    """:func:`compare_execution` end to end; the per-stage replay runs only when a difference appears.

    Tolerance (that of :func:`compare_execution`): ``1e-5 * max(1, max |original output|)``.
    A correct lowering differs only by float reassociation of the folded scales (about 1e-7
    relative); one flipped quantization step moves an output by a whole output scale step.
    """
    result = compare_execution(original, lowered, inputs, attribute=False)
    if not result["within_tolerance"]:
        result = compare_execution(original, lowered, inputs, attribution_samples=attribution_samples)
    return result


class LowerToFINN(A2QPass):
    """Lower to FINN HW layers, then set every MVAU/VVAU's ``accDataType`` (exact range, never wider than its target).

    Targets: ``acc_bits`` for every MVAU/VVAU; otherwise the widths recorded in the model
    (``a2q project`` / ``a2q annotate``), applied to the HW node the layer was mapped to;
    otherwise none (each node gets the exact minimal type). ``from_annotations=True`` makes a
    missing record an error instead of silently using no targets. Layers FINN cannot lower are
    listed in ``details["lowering"]["unlowered"]``; with ``strict=True`` they raise
    :class:`LoweringError`. The details also hold per-node :class:`HWLayer` rows
    (``details["layers"]``), the target source, and recorded layers that were not found in the
    HW graph (``details["unmapped"]``).
    """

    def __init__(self, acc_bits: int | None = None, from_annotations: bool = False, strict: bool = False) -> None:
        super().__init__()
        if acc_bits is not None and from_annotations:
            raise PreconditionError("give either one accumulator width (--acc-bits) or --from-annotations, not both")
        if acc_bits is not None and not 2 <= acc_bits <= 64:
            raise PreconditionError(f"accumulator width {acc_bits} is out of range; use 2 to 64 bits")
        self.acc_bits, self.from_annotations, self.strict = acc_bits, from_annotations, strict
        self.layers: list[HWLayer] = []
        self.lowering: LoweringReport | None = None

    def requires(self, model: ModelWrapper) -> None:
        already = [node.name for node in model.graph.node if node.domain.startswith(HW_DOMAIN_PREFIX)]
        if already:
            raise PreconditionError(f"the model already holds FINN HW layers ({', '.join(already[:3])}, ...); "
                                    "give the QONNX model it was lowered from")
        layers = find_mac_layers(model)
        if not any(layer.status != STATUS_WEIGHTS_NOT_QUANTIZED for layer in layers):
            found = ", ".join(f"{layer.node} ({layer.op_type})" for layer in layers) or "no Conv/Gemm/MatMul at all"
            raise PreconditionError(f"no quantized MAC layer to lower (found: {found}); FINN needs quantized "
                                    "weights (Quant nodes on the weights) and quantized activations")
        act_x_act = [layer.node for layer in layers if layer.act_x_act]
        if act_x_act:
            # FINN turns such a MatMul into an MVAU with mem_mode="dynamic" (the second operand streamed
            # in as weights), whose accumulator it sizes from datatypes alone; this tool maps MVAUs to
            # layers by their constant weights and has none to map these by
            raise PreconditionError(f"{', '.join(act_x_act)}: activation x activation MatMul; lowering it (FINN makes "
                                    "an MVAU with mem_mode='dynamic') is not supported by `a2q lower`. Lower the "
                                    "model with FINN directly; `a2q verify` checks these layers on the QONNX model")
        if self.from_annotations and not qonnx_recorded_widths(model):
            raise PreconditionError("--from-annotations: the model records no accumulator widths; "
                                    "run `a2q project` or `a2q annotate` on it first")

    def call(self, model: ModelWrapper) -> PassResult:
        qonnx_signatures = layer_signatures(model)
        recorded = qonnx_recorded_widths(model)
        hw, self.lowering = lower_to_finn_hw(model, strict=self.strict)
        if not self.lowering.mac_nodes:
            reasons = "; ".join(f"{n.name} ({n.op_type}): {n.reason}" for n in self.lowering.blocking) or "none found"
            raise LoweringError(f"FINN lowered no layer to an MVAU/VVAU. Nodes it could not lower: {reasons}")
        mapping = match_layers(qonnx_signatures, layer_signatures(hw))
        self._targets, source = hw_targets(hw, mapping, self.acc_bits, recorded)
        refuse_exact_input_targets(model, hw, mapping, self._targets)
        finn_choice = finn_accumulator_choice(hw)
        hw = set_accumulator_datatypes(hw, target_bits=self._targets)
        self._keys_before = [p.key for p in model.model.metadata_props]
        for prop in model.model.metadata_props:  # FINN's steps keep these today; make it a promise
            _set_metadata(hw, prop.key, prop.value)
        self.layers = describe_hw_layers(hw, mapping, self._targets, finn_choice)
        rekey_accumulator_record(hw, self.layers)
        declare_custom_domains(hw.model)  # FINN adds no opset import for its HW domains
        lowered_layers = set(mapping.values())
        unmapped = sorted(name for name in (recorded if source == TARGETS_RECORDED else {}) if name not in lowered_layers)
        details: dict[str, Any] = {
            "targets": source,
            "input_ranges": "finn",  # every range here is over the MVAU/VVAU inputDataType
            "layers": [asdict(layer) for layer in self.layers],
            "unmapped": unmapped,
            "lowering": self.lowering.to_dict(),
        }
        return PassResult(hw, True, details)

    def ensures(self, result: PassResult) -> None:
        try:
            onnx.checker.check_model(result.model.model)
        except onnx.checker.ValidationError as err:
            raise PostconditionError(f"lowered model fails onnx.checker: {err}") from err
        check_hw_accumulators(result.model, self._targets)
        # accDataType holds the analysed range (checked above); that range must hold the certified one
        certify_claims(result.model, {layer.node: Claim(layer.acc_min, layer.acc_max) for layer in self.layers},
                       what="lower")
        keys = {p.key for p in result.model.model.metadata_props}
        lost = [key for key in self._keys_before if key not in keys]
        if lost:
            raise PostconditionError(f"lowering lost the model metadata {lost}")
        recorded = recorded_accumulators(result.model)
        for layer in self.layers:
            if recorded.get(layer.node, {}).get("acc_dtype") != layer.acc_dtype:
                raise PostconditionError(f"{layer.node}: the accumulator record does not match its accDataType")
