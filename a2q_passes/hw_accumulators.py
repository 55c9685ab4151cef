"""The accumulator widths of a lowered model's MVAU/VVAU nodes: targets per HW node (one width, or the widths
recorded for the QONNX layers it was mapped to), the refusal of targets FINN's wider input types cannot meet, the
per-node report, the accumulator record re-keyed by HW node, and the check that every ``accDataType`` holds its exact
range within its target. Used by :class:`a2q_passes.transforms.lower.LowerToFINN` and FINN's build steps
(:mod:`a2q_passes.finn_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.analysis import analyze_model
from a2q_passes.errors import LoweringError, PostconditionError
from a2q_passes.finn_accumulators import check_thresholds_hold, hw_accumulator_ranges, iterate_mac_nodes
from a2q_passes.finn_runtime import ensure_finn_importable
from a2q_passes.metadata import (ACCUMULATORS_KEY, metadata_value, read_record, record_accumulators,
                                 set_metadata_value)

QONNX_ACCUMULATORS_KEY = "a2q.accumulators.qonnx"
TARGETS_GLOBAL, TARGETS_RECORDED, TARGETS_NONE = "global", "model metadata", "none"


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
        set_metadata_value(hw_model, QONNX_ACCUMULATORS_KEY, metadata_value(hw_model, ACCUMULATORS_KEY))
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
