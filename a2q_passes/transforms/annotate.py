"""``AnnotateAccumulators``: record each layer's minimal (exact) accumulator in the model metadata."""

from __future__ import annotations

import copy

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import Claim, certify_claims
from a2q_passes.errors import PostconditionError
from a2q_passes.input_annotations import annotate_input_dtypes
from a2q_passes.tensor_store import check_in_memory
from a2q_passes.metadata import record_accumulators, recorded_widths
from a2q_passes.model_io import declare_custom_domains
from a2q_passes.passes import A2QPass, PassResult


class AnnotateAccumulators(A2QPass):
    """Writes ``{node: {acc_bits, acc_dtype, acc_min, acc_max}}`` to ``metadata_props``.

    Only metadata changes: the graph, and so its execution, stay exactly as they were, but for the DataType
    annotations of the inputs given ``input_dtypes`` (:mod:`a2q_passes.input_annotations`), on which the widths rest.
    """

    def __init__(self, input_dtypes: dict[str, str] | None = None, zero_point: str = "fold",
                 input_ranges: str = "exact") -> None:
        super().__init__()
        self.input_dtypes = input_dtypes
        self.zero_point = zero_point
        self.input_ranges = input_ranges

    def call(self, model: ModelWrapper) -> PassResult:
        annotated = annotate_input_dtypes(model, self.input_dtypes)
        self._graph_before = copy.deepcopy(model.graph)
        report = analyze_model(model, self.input_dtypes, self.zero_point, input_ranges=self.input_ranges)
        layers = {
            r.node: {"acc_bits": r.bounds["exact"], "acc_dtype": r.acc_dtype, "acc_min": r.acc_min, "acc_max": r.acc_max,
                     "input_ranges": self.input_ranges}
            for r in report.layers if r.status == "ok"
        }
        before = recorded_widths(model)
        record_accumulators(model, layers, source="annotate")
        # FINN's own graph builders (qonnx_make_model) declare no opset for its custom domains: the output does
        declared = declare_custom_domains(model.model)
        return PassResult(model, annotated or declared or before != recorded_widths(model),
                          {"report": report, "layers": layers})

    def ensures(self, result: PassResult) -> None:
        if result.model.graph != self._graph_before:
            raise PostconditionError("AnnotateAccumulators changed the graph; it may only add metadata")
        check_in_memory(result.model)
        certify_claims(result.model, {node: Claim(info["acc_min"], info["acc_max"], info["acc_bits"])
                                      for node, info in result.details["layers"].items()},
                       what="annotate", input_dtypes=self.input_dtypes, zero_point=self.zero_point,
                       input_ranges=self.input_ranges)
