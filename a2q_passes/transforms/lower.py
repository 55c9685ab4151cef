"""``LowerToFINN``: lower a QONNX model to FINN HW layers and give every MVAU/VVAU a guaranteed accumulator.

1. :func:`a2q_passes.finn_flow.lower_to_finn_hw` runs FINN's own conversion, streamlining and
   ``step_convert_to_hw``. The result keeps non-specialised MVAU/VVAU nodes, which execute in numpy.
2. Every MVAU/VVAU is mapped back to the QONNX layer it came from. FINN renames nodes, and the
   lowering reorders a conv's weights from ``(cin, kh, kw)`` to ``(kh, kw, cin)``. The link is
   therefore the integer weight content, compared in a form that ignores both reorderings: each
   channel's weights sorted, then the channels sorted (:func:`a2q_passes.layer_mapping.weight_signature`). Identical layers
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
   therefore refused by name (:func:`a2q_passes.hw_accumulators.refuse_exact_input_targets`), and ``a2q project --input-ranges
   finn`` sizes it for FINN's view.
4. Metadata: every ``metadata_props`` entry of the input is kept. The accumulator record
   (:data:`a2q_passes.metadata.ACCUMULATORS_KEY`) is re-keyed by HW node name, so ``a2q verify``
   checks the lowered graph at the widths its hardware uses. Each entry keeps ``qonnx_node``
   and ``target_bits``, and the QONNX-level record is kept verbatim under
   :data:`a2q_passes.hw_accumulators.QONNX_ACCUMULATORS_KEY`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import onnx
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import PostconditionError, PreconditionError
from a2q_passes.finn_accumulators import HW_DOMAIN_PREFIX, set_accumulator_datatypes
from a2q_passes.finn_flow import LoweringError, LoweringReport, lower_to_finn_hw
from a2q_passes.hw_accumulators import (TARGETS_RECORDED, HWLayer, check_hw_accumulators, describe_hw_layers,
                                        finn_accumulator_choice, hw_targets, qonnx_recorded_widths,
                                        refuse_exact_input_targets, rekey_accumulator_record)
from a2q_passes.layer_mapping import layer_signatures, match_layers
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, find_mac_layers
from a2q_passes.metadata import recorded_accumulators, set_metadata_value
from a2q_passes.model_io import declare_custom_domains
from a2q_passes.passes import A2QPass, PassResult
from a2q_passes.projection import MIN_ACC_BITS
from a2q_passes.width_resolution import EVERY_LAYER, check_width


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
        if acc_bits is not None:
            check_width(acc_bits, MIN_ACC_BITS, EVERY_LAYER)
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
            set_metadata_value(hw, prop.key, prop.value)
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
