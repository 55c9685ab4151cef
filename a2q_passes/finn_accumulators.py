"""Accumulator data types of FINN's MVAU/VVAU nodes: exact ranges from their weights, ``accDataType``
set to a guaranteed width, and thresholds checked against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.finn_runtime import ensure_finn_importable

HW_DOMAIN_PREFIX = "finn.custom_op.fpgadataflow"


def is_mac_node(node: NodeProto) -> bool:
    return node.domain.startswith(HW_DOMAIN_PREFIX) and node.op_type.split("_")[0] in ("MVAU", "VVAU")


def iterate_mac_nodes(model: ModelWrapper) -> Iterator[NodeProto]:
    """MVAU / VVAU nodes (abstract or specialised ``_hls`` / ``_rtl``) of a HW graph."""
    return (node for node in model.graph.node if is_mac_node(node))


def _mac_integer_rows(model: ModelWrapper, node) -> np.ndarray:
    """Integer weights of an MVAU/VVAU node as the project's reader makes them rows (:func:`a2q_passes.layers.
    finn_mac_layer`): ``(channels, K)``, or one row per channel and tap pattern where the MVAU reads pixel-padded
    input (:mod:`a2q_passes.pixel_padding`)."""
    from a2q_passes.layers import STATUS_OK, finn_mac_layer

    layer = finn_mac_layer(model, node)
    if layer.status != STATUS_OK:
        raise A2QError(f"{node.name}: {layer.status}; its accumulator range cannot be computed from the graph")
    return layer.integer_rows(model)


def hw_accumulator_ranges(hw_model: ModelWrapper) -> dict[str, tuple[int, int]]:
    """Exact ``(acc_min, acc_max)`` over all channels of every MVAU/VVAU, from its weights and inputDataType.

    The one place that derives accumulator ranges on a FINN HW graph for this module; the
    project's analysis (:func:`a2q_passes.analysis.analyze_model`) gives the same numbers and can
    be passed to :func:`set_accumulator_datatypes` instead.
    """
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes import bounds

    ranges = {}
    for node in iterate_mac_nodes(hw_model):
        inst = getCustomOp(node)
        rows = _mac_integer_rows(hw_model, node)
        if inst.get_nodeattr("binaryXnorMode"):
            # the accumulator counts matching bits (xnor popcount, as FINN executes it): [0, K]
            ranges[node.name] = (0, int(rows.shape[1]))
            continue
        idt = DataType[inst.get_nodeattr("inputDataType")]
        if not idt.is_integer():
            raise A2QError(f"{node.name}: inputDataType {idt.name} is not an integer type")
        acc_min, acc_max = bounds.exact_accumulator_range(
            bounds.as_integer_weights(rows),
            bounds.IntRange(int(idt.min()), int(idt.max())),
        )
        ranges[node.name] = (int(np.min(acc_min)), int(np.max(acc_max)))
    return ranges


def _target_for(target_bits: dict[str, int] | int | None, name: str) -> int | None:
    if isinstance(target_bits, dict):
        return target_bits.get(name)
    return target_bits


def set_accumulator_datatypes(
    hw_model: ModelWrapper,
    acc_ranges: dict[str, tuple[int, int]] | None = None,
    target_bits: dict[str, int] | int | None = None,
) -> ModelWrapper:
    """Set ``accDataType`` of every MVAU/VVAU to the minimal type holding its accumulator range.

    ``acc_ranges`` maps node name -> ``(acc_min, acc_max)`` (default: :func:`hw_accumulator_ranges`);
    each must contain the exact range of the node's weights, else the width would be unsafe and
    this raises. The type is ``UINT P`` when ``acc_min >= 0``, else ``INT P``. With ``target_bits``
    (one width for all nodes, or per node name) a node needing more bits raises, naming it.

    The related attributes follow FINN's ``minimize_accumulator_width`` (finn-plus 1.6.1):
    for ``noActivation=1`` the output is the accumulator, so ``outputDataType`` = ``accDataType``,
    except that FINN pads the *graph's last* node's output to a multiple of 8 bits (a byte-aligned
    output stream); we apply that padding to ``outputDataType`` only and keep the accumulator
    minimal. After each node ``InferDataTypes`` propagates the change (as FINN does); then FINN's
    ``RoundAndClipThresholds`` rounds thresholds up and clips them to ``[acc_min, acc_max + 1]`` of
    the new type, which keeps every comparison exact on integer accumulators. Finally every
    threshold tensor's datatype is checked to hold its values and the accumulator range.
    """
    ensure_finn_importable()
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.util.basic import roundup_to_integer_multiple

    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    from a2q_passes import bounds

    model = ModelWrapper(hw_model.model.SerializeToString())
    exact = hw_accumulator_ranges(model)
    acc_ranges = exact if acc_ranges is None else acc_ranges
    for name, (exact_min, exact_max) in exact.items():
        if name not in acc_ranges:
            raise A2QError(f"no accumulator range given for HW node {name!r} (have: {sorted(acc_ranges)})")
        acc_min, acc_max = (int(v) for v in acc_ranges[name])
        if acc_min > exact_min or acc_max < exact_max:
            raise A2QError(
                f"{name}: given accumulator range [{acc_min}, {acc_max}] is narrower than the exact range "
                f"[{exact_min}, {exact_max}] of its weights; an accumulator sized from it could overflow")
        adt = DataType[bounds.accumulator_datatype_name(acc_min, acc_max)]
        target = _target_for(target_bits, name)
        if target is not None and adt.bitwidth() > target:
            raise A2QError(
                f"{name}: accumulator range [{acc_min}, {acc_max}] needs {adt.name}, wider than the target "
                f"{target} bits; constrain this layer's weights to the target first")
        node = model.get_node_from_name(name)
        inst = getCustomOp(node)
        inst.set_nodeattr("accDataType", adt.name)
        if inst.get_nodeattr("noActivation"):
            odt = adt
            if model.find_direct_successors(node) is None:
                padded = roundup_to_integer_multiple(adt.bitwidth(), 8)
                odt = DataType[adt.name.replace(str(adt.bitwidth()), str(padded))]
            inst.set_nodeattr("outputDataType", odt.name)
        model = model.transform(InferDataTypes())
    model = model.transform(RoundAndClipThresholds())
    check_thresholds_hold(model)
    return model


def check_thresholds_hold(model: ModelWrapper) -> None:
    """Raise :class:`PostconditionError` unless every MVAU/VVAU threshold type holds its accumulator range and values."""
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.errors import PostconditionError

    for node in iterate_mac_nodes(model):
        inst = getCustomOp(node)
        if inst.get_nodeattr("noActivation") or len(node.input) < 3:
            continue
        thresholds = model.get_initializer(node.input[2])
        adt = DataType[inst.get_nodeattr("accDataType")]
        tdt = model.get_tensor_datatype(node.input[2])
        if thresholds is None:
            continue
        if not (tdt.min() <= adt.min() and tdt.max() >= adt.max() + 1):
            raise PostconditionError(f"{node.name}: threshold type {tdt.name} cannot hold the {adt.name} accumulator range")
        if not np.all(np.vectorize(tdt.allowed)(thresholds)):
            raise PostconditionError(f"{node.name}: thresholds do not fit their type {tdt.name} after rounding/clipping")
