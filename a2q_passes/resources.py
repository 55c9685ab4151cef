"""FPGA resource estimates of a FINN HW graph at 32-bit and at chosen accumulator widths.

Per MVAU/VVAU node the numbers come from FINN's own analytical models on the specialised HLS
node (``MVAU_hls`` / ``VVAU_hls``): ``lut_estimation``, ``bram_estimation``, ``uram_estimation``
and ``dsp_estimation``. We force the HLS variant (``preferred_impl_style="hls"``) because FINN's
RTL MVU is DSP-based and its LUT model is a constant 0, so it cannot show any width effect.

FINN's LUT model caps the accumulator at the data-type bound and counts the adder tree at
``W + A`` bits, and its BRAM model counts weights only; so the bits an accumulator width
actually decides are reported explicitly next to FINN's numbers:

- accumulator registers: ``PE * P`` bits;
- threshold storage (layers with thresholds, ``noActivation=0``): ``MH * T * t`` bits with
  ``T = 2^B - 1`` thresholds per channel (the threshold tensor's columns) for ``B`` output bits
  and ``t`` the threshold type width FINN's ``RoundAndClipThresholds`` gives for the
  accumulator (thresholds span ``[acc_min, acc_max + 1]``, so one bit more than P);
- comparators: ``PE * T`` comparators of ``t`` bits (FINN's HLS ``comp::less_equal<tdt, tdt>``).

Everything is estimated on a copy; the given model is not modified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.finn_accumulators import hw_accumulator_ranges, iterate_mac_nodes
from a2q_passes.finn_runtime import ensure_finn_importable, validate_fpgapart

BASELINE_BITS = 32
_FINN_METRICS = ("LUT", "BRAM18", "URAM", "DSP")
_BIT_METRICS = ("acc_register_bits", "threshold_storage_bits", "comparator_bits")


def _specialised_copy(hw_model: ModelWrapper, fpgapart: str) -> tuple[ModelWrapper, dict[str, str]]:
    """Specialised copy and a map original node name -> specialised node name.

    SpecializeLayers renames nodes (``MVAU_0`` -> ``MVAU_hls_0``); the output tensor is kept,
    so it links the two. FINN estimates each MVAU/VVAU from its own attributes and tensors, so the copy
    holds those nodes alone: another HW layer the part cannot implement (finn-plus' float ``PWPolyF``
    outside Versal parts) does not stop the report of the MAC layers.
    """
    from qonnx.custom_op.registry import getCustomOp

    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers

    model = ModelWrapper(hw_model.model.SerializeToString())
    macs = [NodeProto.FromString(node.SerializeToString()) for node in iterate_mac_nodes(model)]
    model.graph.ClearField("node")
    model.graph.node.extend(macs)
    by_output = {}
    for node in iterate_mac_nodes(model):
        by_output[node.output[0]] = node.name
        if "_" not in node.op_type:  # not yet specialised
            getCustomOp(node).set_nodeattr("preferred_impl_style", "hls")
    model = model.transform(SpecializeLayers(fpgapart))
    specialised = list(iterate_mac_nodes(model))
    if any(not node.op_type.endswith("_hls") for node in specialised):
        found = [node.op_type for node in specialised]
        raise A2QError(f"expected HLS MVAU/VVAU variants after SpecializeLayers({fpgapart!r}), got {found}")
    return model, {by_output[node.output[0]]: node.name for node in specialised}


def _with_accumulators(model: ModelWrapper, dtypes: dict[str, str]) -> ModelWrapper:
    """Copy with the given accDataType per (specialised) node name, thresholds re-rounded/clipped as FINN does."""
    from qonnx.custom_op.registry import getCustomOp

    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    model = ModelWrapper(model.model.SerializeToString())
    for node in iterate_mac_nodes(model):
        getCustomOp(node).set_nodeattr("accDataType", dtypes[node.name])
    return model.transform(RoundAndClipThresholds())


def _node_estimate(model: ModelWrapper, node, fpgapart: str) -> dict[str, Any]:
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    pe = inst.get_nodeattr("PE")
    adt = inst.get_accumulator_datatype()
    row: dict[str, Any] = {
        "acc_dtype": adt.name,
        "LUT": int(inst.lut_estimation(fpgapart)),
        "BRAM18": int(inst.bram_estimation(fpgapart)),
        "URAM": int(inst.uram_estimation(fpgapart)),
        "DSP": int(inst.dsp_estimation(fpgapart)),
        "acc_register_bits": pe * adt.bitwidth(),
        "threshold_dtype": None,
        "comparator_width": 0,
        "threshold_storage_bits": 0,
        "comparator_bits": 0,
    }
    thresholds = model.get_initializer(node.input[2]) if len(node.input) > 2 else None
    if not inst.get_nodeattr("noActivation") and thresholds is not None:
        tdt = model.get_tensor_datatype(node.input[2])
        channels, n_thresholds = _channels(inst, node), int(thresholds.shape[1])
        row.update(
            threshold_dtype=tdt.name,
            comparator_width=tdt.bitwidth(),
            threshold_storage_bits=channels * n_thresholds * tdt.bitwidth(),
            comparator_bits=pe * n_thresholds * tdt.bitwidth(),
        )
    return row


def _channels(inst, node) -> int:
    return inst.get_nodeattr("Channels") if node.op_type.startswith("VVAU") else inst.get_nodeattr("MH")


def _layer_shape(inst, node) -> tuple[int, int]:
    """``(K, channels)`` of an MVAU (MW, MH) or VVAU (kh*kw, Channels)."""
    if node.op_type.startswith("VVAU"):
        k_h, k_w = inst.get_nodeattr("Kernel")
        return k_h * k_w, inst.get_nodeattr("Channels")
    return inst.get_nodeattr("MW"), inst.get_nodeattr("MH")


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def resource_report(
    hw_model: ModelWrapper, fpgapart: str, acc_widths: dict[str, int] | None = None
) -> dict[str, Any]:
    """FINN estimates and explicit accumulator-dependent bits per MVAU/VVAU, at INT32 and at given widths.

    ``acc_widths`` maps node name -> accumulator bits; its sign follows the node's exact range
    (``UINT`` when the range is non-negative, as FINN does). Without it, the model's current
    ``accDataType`` (e.g. after :func:`a2q_passes.finn_accumulators.set_accumulator_datatypes`) is used.
    ``holds_exact_range`` says whether the width can hold the exact accumulator range of the
    node's weights (a width that cannot would be broken hardware; it is still estimated).
    The result is JSON-serialisable.
    """
    ensure_finn_importable()
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes import bounds

    part = validate_fpgapart(fpgapart)
    exact = hw_accumulator_ranges(hw_model)
    current = {node.name: getCustomOp(node).get_nodeattr("accDataType") for node in iterate_mac_nodes(hw_model)}
    if acc_widths is not None:
        unknown = sorted(set(acc_widths) - set(current))
        if unknown:
            raise A2QError(f"acc_widths names nodes that are not MVAU/VVAU in the model: {unknown} (have {sorted(current)})")
    chosen = {}
    for name, dtype_name in current.items():
        if acc_widths is not None and name in acc_widths:
            prefix = "UINT" if exact[name][0] >= 0 else "INT"
            chosen[name] = f"{prefix}{int(acc_widths[name])}"
        else:
            chosen[name] = dtype_name
    specialised, renamed = _specialised_copy(hw_model, part)
    baseline = _with_accumulators(specialised, {renamed[name]: f"INT{BASELINE_BITS}" for name in current})
    target = _with_accumulators(specialised, {renamed[name]: dtype for name, dtype in chosen.items()})

    layers = []
    for name in current:
        node = target.get_node_from_name(renamed[name])
        inst = getCustomOp(node)
        k, channels = _layer_shape(inst, node)
        acc_min, acc_max = exact[name]
        adt = DataType[chosen[name]]
        layers.append({
            "node": name,
            "op_type": node.op_type,
            "K": int(k),
            "channels": int(channels),
            "PE": int(inst.get_nodeattr("PE")),
            "SIMD": int(inst.get_nodeattr("SIMD")),
            "weight_bits": inst.get_input_datatype(1).bitwidth(),
            "input_bits": inst.get_input_datatype(0).bitwidth(),
            "output_bits": inst.get_output_datatype().bitwidth(),
            "has_thresholds": not inst.get_nodeattr("noActivation"),
            "exact_range": [acc_min, acc_max],
            "exact_dtype": bounds.accumulator_datatype_name(acc_min, acc_max),
            "holds_exact_range": bool(adt.min() <= acc_min and adt.max() >= acc_max),
            "int32": _node_estimate(baseline, baseline.get_node_from_name(node.name), part),
            "target": _node_estimate(target, node, part),
        })
    totals = {
        config: {metric: sum(layer[config][metric] for layer in layers) for metric in _FINN_METRICS + _BIT_METRICS}
        for config in ("int32", "target")
    }
    for config in totals.values():
        config["accumulator_dependent_bits"] = sum(config[m] for m in _BIT_METRICS)
    ratios = {metric: _ratio(totals["int32"][metric], totals["target"][metric])
              for metric in _FINN_METRICS + _BIT_METRICS + ("accumulator_dependent_bits",)}
    return {
        "fpgapart": part,
        "baseline_bits": BASELINE_BITS,
        "layers": layers,
        "totals": totals,
        "ratio_int32_over_target": ratios,
        "notes": ("FINN estimates on MVAU_hls/VVAU_hls; FINN's LUT model caps the accumulator at the "
                  "data-type bound and its BRAM model counts weights only, hence the explicit bit counts"),
    }


def render_table(report: dict[str, Any]):
    """A ``rich`` table of :func:`resource_report`: per layer INT32 -> target, and totals."""
    from rich.table import Table

    table = Table(title=f"Accumulator resources on {report['fpgapart']} (INT{report['baseline_bits']} -> target)")
    for column in ("node", "K x ch", "acc", "LUT", "BRAM18", "DSP", "acc reg bits", "threshold bits", "cmp bits"):
        table.add_column(column, justify="left" if column == "node" else "right")

    def pair(a: int, b: int) -> str:
        return f"{a} -> {b}"

    for layer in report["layers"]:
        base, tgt = layer["int32"], layer["target"]
        acc = f"{base['acc_dtype']} -> {tgt['acc_dtype']}" + ("" if layer["holds_exact_range"] else " (!)")
        table.add_row(
            f"{layer['node']} ({layer['op_type']})", f"{layer['K']} x {layer['channels']}", acc,
            pair(base["LUT"], tgt["LUT"]), pair(base["BRAM18"], tgt["BRAM18"]), pair(base["DSP"], tgt["DSP"]),
            pair(base["acc_register_bits"], tgt["acc_register_bits"]),
            pair(base["threshold_storage_bits"], tgt["threshold_storage_bits"]),
            pair(base["comparator_bits"], tgt["comparator_bits"]),
        )
    base, tgt, ratio = report["totals"]["int32"], report["totals"]["target"], report["ratio_int32_over_target"]

    def total(metric: str) -> str:
        r = ratio[metric]
        return pair(base[metric], tgt[metric]) + (f" ({r:.2f}x)" if r is not None else "")

    table.add_section()
    table.add_row("total", "", "", total("LUT"), total("BRAM18"), total("DSP"), total("acc_register_bits"),
                  total("threshold_storage_bits"), total("comparator_bits"))
    return table


def plot_resources(report: dict[str, Any], path: str | Path) -> Path:
    """Bar plot (PNG) per layer: target / INT32 for FINN's LUT estimate and the accumulator-dependent bits."""
    from a2q_passes.report import grouped_bar_plot

    def fraction(metric: str) -> list[float | None]:
        return [_ratio(layer["target"][metric], layer["int32"][metric]) for layer in report["layers"]]

    grouped_bar_plot(
        path, [layer["node"] for layer in report["layers"]],
        {"LUT (FINN estimate)": fraction("LUT"), "accumulator registers": fraction("acc_register_bits"),
         "threshold storage": fraction("threshold_storage_bits"), "comparators": fraction("comparator_bits")},
        title=f"Accumulator-dependent resources on {report['fpgapart']}: target widths vs INT{report['baseline_bits']}",
        ylabel=f"target / INT{report['baseline_bits']}",
    )
    return Path(path)
