"""The layers ``a2q allocate`` may narrow and the facts its cost models need about each: candidates (exact and
smallest feasible widths), and layer shapes from the analysis or from FINN's own lowering."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.allocation import LayerShape
from a2q_passes.analysis import analyze_model
from a2q_passes.errors import A2QError
from a2q_passes.finetune.selection import ACT_X_ACT_REASON, select_layers
from a2q_passes.layers import MacLayer, find_mac_layers
from a2q_passes.projection import MIN_ACC_BITS, accumulator_is_signed, min_feasible_acc_bits


@dataclass
class LayerCandidates:
    """One allocatable layer: its widths, their costs and single-layer scores (JSON-ready)."""

    node: str
    exact_bits: int
    min_feasible_bits: int
    shape: LayerShape
    costs: dict[int, int] = field(default_factory=dict)  # P -> cost (chosen cost model)
    scores: dict[int, float] = field(default_factory=dict)  # P -> calibration score, only this layer at P

    def widths(self) -> list[int]:
        """Evaluated widths, widest first."""
        return sorted(self.scores, reverse=True)

    def to_json(self) -> dict[str, Any]:
        shape = asdict(self.shape)
        shape["finn_lut"] = {str(k): v for k, v in sorted(shape["finn_lut"].items())}
        return {"node": self.node, "exact_bits": self.exact_bits, "min_feasible_bits": self.min_feasible_bits,
                "shape": shape, "costs": {str(k): v for k, v in sorted(self.costs.items())},
                "scores": {str(k): v for k, v in sorted(self.scores.items())}}


def allocatable_layers(model: ModelWrapper, input_ranges: str = "exact",
                       method: str = "project") -> list[tuple[str, int, int]]:
    """``(node, exact bits, smallest feasible bits)`` of every layer the allocation may narrow.

    ``method="project"``: every layer ``a2q project`` narrows under its defaults (quantized weights of any
    format on a quantized input, without a weight zero point); ``"finetune"``: the layers fine-tuning can
    constrain (QONNX ``Quant`` weights). Bipolar weights (no zero weight: projection cannot shrink them) and
    activation x activation products are never candidates; widths for ``input_ranges``.
    """
    if method == "finetune":
        macs = [layer.mac for layer in select_layers(model, 64, input_ranges=input_ranges).layers]
    else:
        found = find_mac_layers(model, input_ranges=input_ranges)
        why = {mac.node: _not_projectable(mac) for mac in found}
        macs = [mac for mac in found if not why[mac.node]]
        if not macs:
            reasons = "; ".join(f"{node}: {reason}" for node, reason in why.items())
            raise A2QError(f"no layer project can narrow ({reasons or 'no MAC layer found'})")
    reports = analyze_model(model, input_ranges=input_ranges).by_node()
    layers = []
    for mac in macs:
        if mac.binary_xnor or mac.source.bipolar:
            continue
        # no narrower than `project` takes (a layer of zero weights sums to [0, 0]: 1 bit)
        exact = max(int(reports[mac.node].bounds["exact"]), MIN_ACC_BITS)
        signed = accumulator_is_signed(mac.integer_rows(model), mac.grid.range)
        smallest = min(exact, min_feasible_acc_bits(mac.grid.range, mac.source.weight_range, signed))  # both >= 2
        layers.append((mac.node, exact, int(smallest)))
    return layers


def _not_projectable(mac: MacLayer) -> str:
    """Why ``project`` (its default ``--zero-point fold``) cannot narrow ``mac``; "" where it can."""
    if not mac.ok:
        return mac.status
    if mac.act_x_act:
        return ACT_X_ACT_REASON
    if mac.source.raw_zero_point:
        return ("weights with a zero point, which project narrows only under --zero-point subtract (not an allocate "
                "option): give per-layer widths to `a2q project --zero-point subtract --widths-json`")
    return ""


def analysis_layer_shapes(model: ModelWrapper, widths: dict[str, list[int]]) -> dict[str, LayerShape]:
    """Cost-model facts without FINN: each layer's output channels, one accumulator (PE = 1), no thresholds."""
    channels = {mac.node: mac.channels for mac in find_mac_layers(model)}
    return {name: LayerShape(name, int(channels[name])) for name in widths}


def finn_layer_shapes(model: ModelWrapper, widths: dict[str, list[int]], fpgapart: str) -> dict[str, LayerShape]:
    """Cost-model facts per QONNX layer from FINN's lowering, with FINN's LUT estimate at each width in ``widths``.

    Each width needs one :func:`resource_report` (all layers at once: a layer's estimate depends on
    its own width only).
    """
    from a2q_passes.finn_accumulators import iterate_mac_nodes
    from a2q_passes.finn_flow import lower_to_finn_hw
    from a2q_passes.finn_runtime import validate_fpgapart
    from a2q_passes.resources import resource_report
    from a2q_passes.layer_mapping import layer_signatures, match_layers

    part = validate_fpgapart(fpgapart)
    act_x_act = [layer.node for layer in find_mac_layers(model) if layer.act_x_act]
    if act_x_act:  # FINN makes each an MVAU with streamed (mem_mode="dynamic") weights, which have no static cost
        raise A2QError(f"{', '.join(act_x_act)}: activation x activation MatMul; this cost model lowers the "
                       "model with FINN, which has no resource estimate for such a layer. Use --cost acc-bits (no "
                       "FINN), or give per-layer widths to `a2q project --widths-json`; `a2q verify` checks these "
                       "layers")
    try:
        hw, _ = lower_to_finn_hw(model)
    except A2QError as err:
        raise A2QError(f"{str(err).rstrip('.')}. This cost model costs the layers FINN's lowering makes; --cost "
                       "acc-bits needs no FINN lowering") from err
    to_qonnx = match_layers(layer_signatures(model), layer_signatures(hw))
    to_hw = {q: h for h, q in to_qonnx.items()}
    lowered = {node.name for node in iterate_mac_nodes(hw)}  # a layer FINN left as it was still matches itself
    missing = [name for name in widths if to_hw.get(name) not in lowered]
    if missing:
        raise A2QError(f"FINN did not lower layer(s) {', '.join(missing)} to an MVAU/VVAU, so their hardware cost is "
                       f"unknown; `a2q lower MODEL OUT` shows why. This cost model needs a model FINN can lower; "
                       f"--cost acc-bits does not")
    facts = {layer["node"]: layer for layer in resource_report(hw, part)["layers"]}
    luts: dict[str, dict[int, int]] = {name: {} for name in widths}
    for bits in sorted({p for ps in widths.values() for p in ps}):
        chosen = {to_hw[name]: bits for name, ps in widths.items() if bits in ps}
        for layer in resource_report(hw, part, chosen)["layers"]:
            name = to_qonnx.get(layer["node"])
            if layer["node"] in chosen:
                luts[name][bits] = int(layer["target"]["LUT"])
    return {name: LayerShape(name, int(facts[to_hw[name]]["channels"]), int(facts[to_hw[name]]["PE"]),
                             int(facts[to_hw[name]]["output_bits"]) if facts[to_hw[name]]["has_thresholds"] else None,
                             luts[name])
            for name in widths}
