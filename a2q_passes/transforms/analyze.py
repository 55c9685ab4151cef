"""``AnalyzeAccumulators``: measure every MAC layer's accumulator; leaves the model untouched."""

from __future__ import annotations

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.analysis import ModelReport, analyze_model
from a2q_passes.passes import A2QPass, PassResult


class AnalyzeAccumulators(A2QPass):
    """Analysis pass; the :class:`ModelReport` is in ``self.report`` and ``result.details["report"]``."""

    def __init__(self, input_dtypes: dict[str, str] | None = None, zero_point: str = "fold",
                 per_channel: bool = False, input_ranges: str = "exact", tile: int | None = None) -> None:
        super().__init__()
        self.tile = tile
        self.input_ranges = input_ranges
        self.input_dtypes = input_dtypes
        self.zero_point = zero_point
        self.per_channel = per_channel
        self.report: ModelReport | None = None

    def call(self, model: ModelWrapper) -> PassResult:
        self.report = analyze_model(model, self.input_dtypes, self.zero_point, self.per_channel, self.input_ranges,
                                    self.tile)
        return PassResult(model, False, {"report": self.report})
